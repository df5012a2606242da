"""Pure builders: CRs in, manifests out. No I/O, no Kubernetes client."""
