"""Two operator processes with --leader-elect on the real apiserver: only the Lease holder reconciles
and serves the ledger; when it is SIGKILLed the standby takes over within the lease duration and
resumes the ledger from TokenBudget status; a leader that loses its Lease exits (fencing)."""
from __future__ import annotations

import time
import uuid

import httpx
import pytest
from kubernetes import client

from tests.support.ledger_cluster import create_budget, get_budget, sa_token
from tests.support.operator_process import OperatorProcess, free_port, wait_for

LEASE_SECONDS = 4
PATTERN = "le-*"


class Replica:
    def __init__(self, control_plane, log_dir, identity: str, lease_ns: str, lease: str):
        self.identity = identity
        self.ledger_port, self.metrics_port = free_port(), free_port()
        self.proc = OperatorProcess(str(control_plane.kubeconfig), log_dir / f"{identity}.log", env={
            "SPENDWARDEN_POD_NAME": identity}, extra_args=[
            "--namespace", PATTERN, "--ledger-port", str(self.ledger_port), "--metrics-port", str(self.metrics_port),
            "--leader-elect", "--lease-namespace", lease_ns, "--lease-name", lease,
            "--lease-duration", str(LEASE_SECONDS)])

    @property
    def ledger(self) -> str:
        return f"http://127.0.0.1:{self.ledger_port}"

    def ready(self) -> bool:
        try:
            return httpx.get(self.proc.liveness_url.replace("/healthz", "/readyz"), timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def serves_ledger(self) -> bool:
        try:
            return httpx.get(f"{self.ledger}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def log_text(self) -> str:
        return self.proc.log_path.read_text(errors="replace")


@pytest.fixture
def le_namespace(kube):
    name = f"le-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(kube)
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


def lease(kube, ns: str, name: str):
    return client.CoordinationV1Api(kube).read_namespaced_lease(name, ns)


def report(url: str, token: str, ns: str, start: str, proxy: str, seq: int, used: tuple[int, int],
           want: int = 0) -> httpx.Response:
    entry = {"periodStart": start, "used": {"inputTokens": used[0], "outputTokens": used[1], "cost": "0"},
             "held": {"inputTokens": 0, "outputTokens": 0, "cost": "0"}}
    if want:
        entry["want"] = {"inputTokens": 0, "outputTokens": want, "cost": "0"}
    return httpx.post(f"{url}/v1/report", timeout=15, headers={"Authorization": f"Bearer {token}"},
                      json={"proxyId": proxy, "namespace": ns, "seq": seq, "budgets": {"monthly": entry}})


def test_only_the_leader_serves_and_the_standby_takes_over_after_sigkill(control_plane, kube, namespace, le_namespace, tmp_path):
    lease_name = f"op-{uuid.uuid4().hex[:6]}"
    a = Replica(control_plane, tmp_path, "op-a", namespace, lease_name)
    b = Replica(control_plane, tmp_path, "op-b", namespace, lease_name)
    try:
        a.proc.start()
        wait_for(a.ready, what="the first replica leads")
        b.proc.start()  # live (its liveness answers) but waiting
        time.sleep(LEASE_SECONDS * 0.5)
        assert lease(kube, namespace, lease_name).spec.holder_identity == "op-a"
        assert a.ready() and a.serves_ledger()
        assert not b.ready() and not b.serves_ledger() and b.proc.alive()

        ns = le_namespace
        start = create_budget(kube, ns)["status"]["periodStart"]  # reconciled by the leader
        token, proxy = sa_token(kube, ns), uuid.uuid4().hex
        first = report(a.ledger, token, ns, start, proxy, 1, (1000, 500), want=5000)
        assert first.status_code == 200, first.text
        ceiling = first.json()["budgets"]["monthly"]["ceiling"]
        wait_for(lambda: get_budget(kube, ns)["status"].get("used", {}).get("totalTokens") == 1500, what="usage persisted")
        assert "namespace reconciled" in a.log_text() and "namespace reconciled" not in b.log_text()
        assert "budget ledger loaded" not in b.log_text()

        a.proc.proc.kill()  # SIGKILL: no shutdown flush, no release
        killed = time.monotonic()
        a.proc.proc.wait()
        wait_for(b.ready, timeout=LEASE_SECONDS * 4, interval=0.1, what="the standby takes over")
        took = time.monotonic() - killed
        print(f"takeover after SIGKILL: {took:.2f}s (lease {LEASE_SECONDS}s)")
        # It waited out the lease (it cannot tell a dead leader from a slow one), then started quickly.
        assert LEASE_SECONDS * 0.9 <= took <= LEASE_SECONDS + 10
        held = lease(kube, namespace, lease_name).spec
        assert held.holder_identity == "op-b" and held.lease_transitions == 1

        # The ledger resumes from status: a replayed report changes nothing, the next one counts once.
        replay = report(b.ledger, token, ns, start, proxy, 1, (9999, 9999))
        assert replay.status_code == 200 and replay.json()["budgets"]["monthly"]["ceiling"] == ceiling
        assert report(b.ledger, token, ns, start, proxy, 2, (2000, 1000)).status_code == 200
        status = wait_for(lambda: (lambda s: s if s.get("used", {}).get("totalTokens") == 3000 else None)(
            get_budget(kube, ns)["status"]), what="the new leader persisted the next report")
        assert status["ledger"]["proxies"][proxy]["seq"] == 2
        # ... and it reconciles: a new budget gets its status from the new leader.
        create_budget(kube, ns, name="second")

        b.proc.stop()  # SIGTERM: the shutdown flush, then the Lease is released for the next replica
        assert b.proc.proc.returncode == 0, b.proc.tail()
        assert lease(kube, namespace, lease_name).spec.holder_identity == ""
    finally:
        a.proc.stop()
        b.proc.stop()


def test_a_leader_that_loses_its_lease_stops_serving_and_exits(control_plane, kube, namespace, tmp_path):
    lease_name = f"op-{uuid.uuid4().hex[:6]}"
    a = Replica(control_plane, tmp_path, "op-a", namespace, lease_name)
    try:
        a.proc.start()
        wait_for(a.ready, what="the replica leads")
        # Another replica took the Lease (as if this one had been partitioned away).
        api = client.CoordinationV1Api(kube)
        current = lease(kube, namespace, lease_name)
        current.spec.holder_identity = "op-elsewhere"
        api.replace_namespaced_lease(lease_name, namespace, current)
        wait_for(lambda: a.proc.proc.poll() is not None, timeout=LEASE_SECONDS * 2, what="the old leader exits")
        assert a.proc.proc.returncode == 3
        assert "lost the leader lease" in a.log_text()
        assert not a.serves_ledger()
    finally:
        a.proc.stop()
