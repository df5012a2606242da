"""`helm template` with the real helm binary (the one scripts/cluster/build.sh builds into the cluster
bin dir, or KUBEBUILDER_ASSETS'): the gateway objects with gateway.enabled=true, none with false.
Needs no control plane; a missing binary fails, as every integration test's does."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "spendwarden"
GATEWAY_KINDS = {("ServiceAccount", "spendwarden-gateway"), ("Deployment", "spendwarden-gateway"),
                 ("Service", "spendwarden-gateway"), ("PodDisruptionBudget", "spendwarden-gateway"),
                 ("HorizontalPodAutoscaler", "spendwarden-gateway"),
                 ("ClusterRoleBinding", "spendwarden-gateway-auth-delegator"),
                 ("Role", "spendwarden-gateway"), ("RoleBinding", "spendwarden-gateway")}


def helm_binary() -> str:
    dirs = [os.environ.get("KUBEBUILDER_ASSETS", ""), *map(str, Path.home().glob(".cache/spendwarden/cluster/*/bin"))]
    for d in filter(None, dirs):
        if (Path(d) / "helm").is_file():
            return str(Path(d) / "helm")
    found = shutil.which("helm")
    if found is None:
        pytest.fail("no helm binary: run scripts/cluster/build.sh (or set KUBEBUILDER_ASSETS)", pytrace=False)
    return found


def template(*sets: str) -> dict[tuple[str, str], dict]:
    args = [helm_binary(), "template", "spendwarden", str(CHART), "--namespace", "spendwarden-system"]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out.stdout) if d}


def test_helm_template_renders_the_gateway_only_when_enabled():
    off = template()
    assert not any("gateway" in name for _, name in off)
    on = template("gateway.enabled=true", "gateway.autoscaling.enabled=true", "gateway.namespace=sw-gateway")
    assert GATEWAY_KINDS <= set(on)
    dep = on[("Deployment", "spendwarden-gateway")]
    assert dep["metadata"]["namespace"] == "sw-gateway"
    assert dep["spec"]["template"]["spec"]["containers"][0]["args"][:2] == ["gateway", "--config-dir"]
    assert on[("HorizontalPodAutoscaler", "spendwarden-gateway")]["apiVersion"] == "autoscaling/v2"
    env = {e["name"]: e.get("value") for e in
           on[("Deployment", "spendwarden")]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SPENDWARDEN_GATEWAY_NAMESPACE"] == "sw-gateway"
