"""spendwarden: Kubernetes-native AI spend policies."""
__version__ = "0.1.0"
GROUP = "spendwarden.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
# Where the injected sidecar finds the provider keys: the operator mounts them there, the proxy reads them.
SECRETS_DIR = "/var/run/spendwarden/secrets"
