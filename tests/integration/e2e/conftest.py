"""tests/integration/e2e: the product as a platform engineer installs it, on the local cluster's node.

The image is built from the project's Dockerfile with buildah (scripts/build-image.sh) and imported
into the node's containerd; the chart is installed with the real helm binary (built by
scripts/cluster/build.sh); the operator, the sidecars, the mock upstream and the sample app run
as real Pods. A second image, the testbed (testbed.Dockerfile: the product image plus the
official openai SDK and llama.cpp), runs the apps and the llama.cpp server.

The release watches only this suite's namespaces (prefix e2e-), so the host-process operators of
the other integration tests never meet it, and it is uninstalled at the end of the module.
"""
from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from spendwarden.localcluster.controlplane import ControlPlane
from spendwarden.localcluster.node import Node

ROOT = Path(__file__).resolve().parents[3]
IMAGE = "spendwarden:dev"
TESTBED = "spendwarden-testbed:dev"
RELEASE_NS = "e2e-spendwarden"
TIMINGS = pytest.StashKey[dict]()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (subprocess.CalledProcessError, KeyError, IndexError, ValueError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {str(last)[-1500:]}")


# Run in an app container: whether it can open a TCP connection to host:port (NetworkPolicy checks).
DIRECT_CONNECT = textwrap.dedent("""
    import json, socket
    s = socket.socket(); s.settimeout(3)
    try:
        s.connect(("{host}", {port})); print(json.dumps({{"connected": True}}))
    except OSError as e:
        print(json.dumps({{"connected": False, "error": repr(e)}}))
""")


def ready(pod: dict) -> bool:
    conditions = {x["type"]: x["status"] for x in pod.get("status", {}).get("conditions", [])}
    return conditions.get("Ready") == "True" and not pod["metadata"].get("deletionTimestamp")


def record(config: pytest.Config, name: str, seconds: float) -> None:
    config.stash.setdefault(TIMINGS, {})[name] = seconds


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    timings = config.stash.get(TIMINGS, {})
    if timings:
        terminalreporter.write_sep("-", "spendwarden e2e timings")
        for name, seconds in timings.items():
            terminalreporter.write_line(f"{name}: {seconds:.1f}s")


def _build_image(name: str, dockerfile: Path) -> Path:
    """scripts/build-image.sh; its progress goes to the terminal (a first build takes minutes)."""
    res = subprocess.run(["bash", str(ROOT / "scripts" / "build-image.sh"), name, str(dockerfile)],
                         stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise RuntimeError(f"building {name} failed (exit {res.returncode}); see the build's output above")
    return Path(res.stdout.strip().splitlines()[-1])


_archives = pytest.StashKey[dict]()
_archives_error = pytest.StashKey[str]()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the images here, as the integration conftest builds the cluster's binaries: a first
    build takes about 8 minutes, and a fixture's set-up counts against the per-test timeout."""
    config = session.config
    here = Path(__file__).parent
    if config.option.collectonly or not any(here in Path(str(i.path)).resolve().parents for i in session.items):
        return
    capman = config.pluginmanager.getplugin("capturemanager")
    t = time.monotonic()
    try:
        with capman.global_and_fixture_disabled():
            config.stash[_archives] = {IMAGE: _build_image(IMAGE, ROOT / "Dockerfile"),
                                       TESTBED: _build_image(TESTBED, here / "testbed.Dockerfile")}
    except RuntimeError as e:
        config.stash[_archives_error] = str(e)
    record(config, "images built or taken from the cache", time.monotonic() - t)


@pytest.fixture(scope="session")
def node(control_plane: ControlPlane) -> Node:
    if control_plane.node is None:
        pytest.fail("the e2e tests need the local cluster's node (ControlPlane(node=True))", pytrace=False)
    return control_plane.node


@pytest.fixture(scope="session")
def images(node: Node, request: pytest.FixtureRequest) -> dict[str, str]:
    """Both images (built at collection) imported into the node."""
    if _archives_error in request.config.stash:
        pytest.fail(request.config.stash[_archives_error], pytrace=False)
    built = request.config.stash[_archives]
    t = time.monotonic()
    for name, archive in built.items():
        node.import_image(archive)
        assert node.has_image(f"docker.io/library/{name}"), f"{name} not in the node after the import"
    record(request.config, "images imported into the node", time.monotonic() - t)
    return {name: f"docker.io/library/{name}" for name in built}


@dataclass
class Cluster:
    """kubectl and helm against the local cluster, for the e2e tests."""
    cp: ControlPlane
    helm_binary: Path
    namespaces: list[str] = field(default_factory=list)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.cp.kubectl(*args, input=input, check=check, timeout=timeout)

    def json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def apply(self, docs: list[dict] | dict) -> None:
        docs = docs if isinstance(docs, list) else [docs]
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                     input="\n---\n".join(json.dumps(d) for d in docs))

    def helm(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = self.cp.env()
        res = subprocess.run([str(self.helm_binary), *args], capture_output=True, text=True, env=env, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({res.returncode}):\n{res.stderr}\n{res.stdout}")
        return res

    def namespace(self, name: str, labels: dict[str, str] | None = None) -> str:
        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}})
        wait_for(lambda: self.kubectl("-n", name, "get", "serviceaccount", "default", check=False).returncode == 0,
                 30, f"the default ServiceAccount of {name}")
        self.namespaces.append(name)
        return name

    def logs(self, namespace: str, selector: str, container: str | None = None, tail: int = 200) -> str:
        args = ["-n", namespace, "logs", "-l", selector, f"--tail={tail}", "--prefix"]
        if container:
            args += ["-c", container]
        else:
            args.append("--all-containers")
        return self.kubectl(*args, check=False).stdout

    def tail(self, lines: int = 80) -> str:
        """What a failed test shows (the integration conftest's report hook calls this)."""
        return dump_on_failure(self, self.namespaces, lines)

    def exec_python(self, namespace: str, pod: str, container: str, code: str, timeout: float = 120) -> Any:
        """Run Python in a container (kubectl exec: apiserver -> kubelet -> containerd); its last stdout line is JSON."""
        res = self.kubectl("-n", namespace, "exec", pod, "-c", container, "--", "python", "-c", code,
                           check=False, timeout=timeout)
        if res.returncode != 0:
            raise AssertionError(f"exec in {namespace}/{pod} failed ({res.returncode}):\n{res.stderr[-3000:]}\n"
                                 f"{res.stdout[-2000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cluster(control_plane: ControlPlane, images: dict[str, str]) -> Iterator[Cluster]:
    helm = control_plane.binaries.get("helm") if control_plane.binaries else None
    if not helm:
        pytest.fail("no helm binary among the cluster's binaries (scripts/cluster/build.sh builds it)", pytrace=False)
    c = Cluster(control_plane, Path(helm))
    yield c
    if os.environ.get("SPENDWARDEN_E2E_KEEP") == "1":
        return
    for ns in reversed(c.namespaces):
        c.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def dump_on_failure(c: Cluster, namespaces: list[str], lines: int) -> str:
    """Pods, Events and container logs of the namespaces."""
    out = []
    for ns in namespaces:
        out.append(f"=== namespace {ns}")
        out.append(c.kubectl("-n", ns, "get", "pods,deploy,svc,networkpolicy", "-o", "wide", check=False).stdout)
        out.append(c.kubectl("-n", ns, "get", "events", "--sort-by=.lastTimestamp", check=False).stdout[-4000:])
        for pod in (c.kubectl("-n", ns, "get", "pods", "-o", "name", check=False).stdout.split()):
            out.append(c.kubectl("-n", ns, "logs", pod, "--all-containers", "--prefix", f"--tail={lines}",
                                 check=False).stdout[-6000:])
    return "\n".join(out)

