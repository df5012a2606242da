"""tests/e2e: the chart with real pods on a kind cluster (Docker + kind + kubectl needed).

Where any of them is missing the whole directory is skipped with the reason; the suite CI runs is
the local control-plane one (tests/unit, tests/integration, tests/proxy), which needs none of them.
SPENDWARDEN_E2E_CLUSTER=<name> reuses an existing kind cluster instead of creating (and deleting)
one; SPENDWARDEN_E2E_KEEP=1 keeps the created cluster for inspection.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "spendwarden:e2e"
TOOLS = ("docker", "kind", "kubectl")


def missing_prerequisites() -> str | None:
    """Why tests/e2e cannot run here, or None."""
    absent = [t for t in TOOLS if shutil.which(t) is None]
    if absent:
        return (f"tests/e2e needs {', '.join(TOOLS)} on PATH; not found: {', '.join(absent)}. "
                "CI runs the local control-plane suite (tests/unit, tests/integration, tests/proxy) instead")
    info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if info.returncode != 0:
        return f"tests/e2e: the Docker daemon is not reachable (`docker info`: {info.stderr.strip()[:200]})"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = missing_prerequisites()
    if reason is None:
        return
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.skip(reason=reason))


@dataclass
class Kind:
    name: str
    kubeconfig: Path

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 300) -> subprocess.CompletedProcess:
        res = subprocess.run(["kubectl", "--kubeconfig", str(self.kubeconfig), *args], input=input,
                             capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{res.stderr}\n{res.stdout}")
        return res


def _run(*args: str, timeout: float = 1800) -> None:
    res = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{res.stderr[-4000:]}")


@pytest.fixture(scope="session")
def kind_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kind]:
    existing = os.environ.get("SPENDWARDEN_E2E_CLUSTER")
    name = existing or f"sw-e2e-{uuid.uuid4().hex[:6]}"
    kubeconfig = tmp_path_factory.mktemp("kind") / "kubeconfig"
    _run("docker", "build", "-t", IMAGE, str(ROOT))
    if not existing:
        _run("kind", "create", "cluster", "--name", name, "--kubeconfig", str(kubeconfig), "--wait", "180s")
    else:
        kubeconfig.write_text(subprocess.run(["kind", "get", "kubeconfig", "--name", name], capture_output=True,
                                             text=True, check=True).stdout)
    try:
        _run("kind", "load", "docker-image", IMAGE, "--name", name)
        yield Kind(name, kubeconfig)
    finally:
        if not existing and os.environ.get("SPENDWARDEN_E2E_KEEP") != "1":
            subprocess.run(["kind", "delete", "cluster", "--name", name], capture_output=True)
