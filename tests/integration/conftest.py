"""Integration tests: a real Kubernetes 1.37 cluster (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and one node: containerd, kubelet, kube-proxy, CoreDNS, kube-router), started once per session.

Fixtures:
  control_plane  (session)  spendwarden.localcluster.ControlPlane, CRDs from crds/ installed
  kube           (session)  kubernetes.client.ApiClient (admin, system:masters)
  namespace      (function) name of a fresh namespace, deleted after the test
  lg_namespace, own_namespace (function) fresh lg-* / lk-* namespaces for tests with a ledger operator

Everything under tests/integration is marked `integration` (deselect with -m "not integration").
Missing binaries make the tests FAIL, never skip, so CI cannot pass without running them; set
SPENDWARDEN_SKIP_INTEGRATION=1 to skip them on purpose. To use an existing cluster instead, set
SPENDWARDEN_TEST_KUBECONFIG (or USE_EXISTING_CLUSTER=true and KUBECONFIG).
"""
from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from spendwarden.localcluster.controlplane import (
    BinariesUnavailable,
    ControlPlane,
    ControlPlaneError,
    ensure_binaries,
    existing_cluster_kubeconfig,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CRDS = REPO / "crds"
log = logging.getLogger("spendwarden.tests.control_plane")

_binaries = pytest.StashKey[dict]()
_binaries_error = pytest.StashKey[str]()
_report = pytest.StashKey[list]()


def _skip_requested() -> bool:
    return os.environ.get("SPENDWARDEN_SKIP_INTEGRATION") == "1"


def _is_integration(item: pytest.Item) -> bool:
    return HERE in Path(str(item.path)).resolve().parents


@pytest.hookimpl(tryfirst=True)  # before -m deselection, so `-m "not integration"` sees the mark
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _is_integration(item):
            item.add_marker(pytest.mark.integration)
            if _skip_requested():
                item.add_marker(pytest.mark.skip(reason="SPENDWARDEN_SKIP_INTEGRATION=1"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failed test shows the end of each operator log it used: a timeout alone says nothing of why."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    for name, value in getattr(item, "funcargs", {}).items():
        tail = getattr(value, "tail", None)
        if callable(tail):
            try:
                report.sections.append((f"log of fixture {name!r} (last 80 lines)", tail(80)))
            except Exception as exc:  # noqa: BLE001 - the report must not fail on its garnish
                report.sections.append((f"log of fixture {name!r}", f"unreadable: {exc}"))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Obtain the binaries here, not in the fixture: a first build takes minutes and a fixture's set-up
    counts against the per-test timeout. Only when integration tests were selected to run."""
    config = session.config
    config.stash[_report] = []
    if (config.option.collectonly or _skip_requested() or existing_cluster_kubeconfig()
            or not any(_is_integration(i) for i in session.items)):
        return
    capman = config.pluginmanager.getplugin("capturemanager")
    t = time.monotonic()
    try:
        with capman.global_and_fixture_disabled():  # show the build's progress live
            config.stash[_binaries] = ensure_binaries()
    except BinariesUnavailable as e:
        config.stash[_binaries_error] = str(e)
        return
    if time.monotonic() - t > 1:
        config.stash[_report].append(f"control-plane binaries obtained in {time.monotonic() - t:.0f}s")


@pytest.fixture(scope="session")
def control_plane(request: pytest.FixtureRequest) -> Iterator[ControlPlane]:
    config = request.config
    if _skip_requested():
        pytest.skip("SPENDWARDEN_SKIP_INTEGRATION=1")
    if _binaries_error in config.stash:
        pytest.fail("cannot run the integration tests: the local control plane binaries are unavailable.\n"
                    f"{config.stash[_binaries_error]}\n"
                    "Run scripts/cluster/build.sh (or set KUBEBUILDER_ASSETS / TEST_ASSET_*), "
                    "or set SPENDWARDEN_SKIP_INTEGRATION=1 to skip these tests on purpose.", pytrace=False)
    # SPENDWARDEN_TEST_NODE=0: the control plane alone (one node per machine; for a second session
    # beside a running one, e.g. while debugging tests that need no running Pods).
    cp = ControlPlane(crds=[CRDS], binaries=config.stash.get(_binaries, None),
                      node=os.environ.get("SPENDWARDEN_TEST_NODE") != "0")
    t = time.monotonic()
    try:
        cp.start()
    except BinariesUnavailable as e:
        pytest.fail(f"control plane binaries unavailable: {e}", pytrace=False)
    except ControlPlaneError as e:
        pytest.fail(f"the local control plane did not start: {e}", pytrace=False)
    took = time.monotonic() - t
    phases = ", ".join(f"{k} {v:.2f}s" for k, v in cp.timings.items() if k not in ("total", "binaries"))
    if cp.existing:
        msg = f"existing cluster {cp.server} (kubeconfig {cp.kubeconfig}) ready in {took:.2f}s"
    else:
        msg = f"control plane {cp.server} started in {took:.2f}s ({phases})"
    log.info(msg)
    config.stash.setdefault(_report, []).append(msg)
    yield cp
    t = time.monotonic()
    cp.stop()
    config.stash[_report].append(f"control plane stopped in {time.monotonic() - t:.2f}s")


@pytest.fixture(scope="session")
def kube(control_plane: ControlPlane) -> Iterator[kubernetes.client.ApiClient]:  # noqa: F821
    api = control_plane.api_client()
    yield api
    api.close()


def _namespace_name(test_name: str) -> str:
    base = re.sub(r"[^a-z0-9-]+", "-", test_name.lower()).strip("-")[:40].strip("-") or "test"
    return f"{base}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def namespace(kube, control_plane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace, labelled spendwarden.io/test-namespace=<name>, with its default ServiceAccount
    (ServiceAccount admission refuses Pods in a namespace until the controller has made it)."""
    from kubernetes import client

    control_plane.check()  # a crashed apiserver/controller-manager shows up as such, not as timeouts
    name = _namespace_name(request.node.name)
    core = client.CoreV1Api(kube)
    core.create_namespace({"metadata": {"name": name, "labels": {
        "spendwarden.io/test": "true", "spendwarden.io/test-namespace": name}}})
    deadline = time.monotonic() + 30
    while not core.list_namespaced_service_account(name, field_selector="metadata.name=default").items:
        if time.monotonic() > deadline:
            raise AssertionError(f"namespace {name}: no default ServiceAccount after 30 s")
        time.sleep(0.1)
    yield name
    try:  # the namespace controller deletes the contents in the background; no need to wait
        core.delete_namespace(name, propagation_policy="Background")
    except client.ApiException as e:
        if e.status != 404:
            raise


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    lines = config.stash.get(_report, [])
    if lines:
        terminalreporter.write_sep("-", "spendwarden control plane")
        for line in lines:
            terminalreporter.write_line(line)


def _prefixed_namespace(kube, prefix: str) -> Iterator[str]:
    from kubernetes import client

    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(kube)
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


@pytest.fixture
def lg_namespace(kube) -> Iterator[str]:
    """Watched by test_ledger's module operator (lg-*)."""
    yield from _prefixed_namespace(kube, "lg")


@pytest.fixture
def own_namespace(kube) -> Iterator[str]:
    """For tests with their own operator (watching lk-*), away from the module operator's lg-*."""
    yield from _prefixed_namespace(kube, "lk")
