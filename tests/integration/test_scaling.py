"""Demand-driven scaling on the real control plane: a real operator process, kube-controller-manager
(Deployments -> ReplicaSets -> Pods, which stay Pending: there is no kubelet), proxies that report
their in-flight requests over the ledger protocol (simulated ones, and a real proxy process for wake).

Where a step needs a replica to be ready, the test marks the workload's Pods Ready itself by
patching their status (what a kubelet would do); it says so where it does.

The scaling timeline of one run: `pytest -s tests/integration/test_scaling.py -k timeline`.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import httpx
import pytest
from kubernetes import client

from spendwarden.localcluster.node import PAUSE_IMAGE
from tests.support.ledger_cluster import (
    GROUP,
    VERSION,
    Operator,
    create_budget,
    create_minute_budget,
    get_budget,
    sa_token,
)
from tests.support.operator_process import wait_for

LLAMA_PRICE = "3.60"


@pytest.fixture(scope="module")
def operator(control_plane, tmp_path_factory):
    op = Operator(control_plane, tmp_path_factory.mktemp("scaling"), pattern="sc-*",
                  env={"SPENDWARDEN_SCALE_INTERVAL": "0.25", "SPENDWARDEN_SCALE_STATUS_INTERVAL": "1"})
    op.start()
    yield op
    op.stop()


@pytest.fixture
def ns(kube):
    name = f"sc-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(kube)
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


def create_deployment(kube, ns: str, name: str, replicas: int, annotations: dict | None = None) -> None:
    client.AppsV1Api(kube).create_namespaced_deployment(ns, {
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": "server", "image": PAUSE_IMAGE}]}}}})


def deployment(kube, ns: str, name: str) -> Any:
    return client.AppsV1Api(kube).read_namespaced_deployment(name, ns)


def ready_pods(kube, ns: str, app: str) -> int:
    """How many of the workload's Pods the kubelet reports Ready (the pause image: it runs at once)."""
    pods = client.CoreV1Api(kube).list_namespaced_pod(ns, label_selector=f"app={app}").items
    return sum(1 for p in pods if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or []))


def backend(name: str, url: str, workload: str | None = None, scaling: dict | None = None) -> dict:
    b = {"name": name, "provider": "OpenAICompatible", "url": url, "model": name,
         "pricing": {"input": "0", "output": "0"}}
    if workload:
        b["deploymentRef"] = {"name": workload}
    if scaling:
        b["scaling"] = scaling
    return b


def create_route(kube, ns: str, name: str, spec: dict) -> None:
    client.CustomObjectsApi(kube).create_namespaced_custom_object(GROUP, VERSION, ns, "modelroutes", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelRoute", "metadata": {"name": name}, "spec": spec})


def get_route(kube, ns: str, name: str) -> dict:
    return client.CustomObjectsApi(kube).get_namespaced_custom_object(GROUP, VERSION, ns, "modelroutes", name)


def scaling_status(kube, ns: str, route: str, backend_name: str = "llama") -> dict:
    for entry in (get_route(kube, ns, route).get("status") or {}).get("scaling") or []:
        if entry["backend"] == backend_name:
            return entry
    return {}


class LoadReporter:
    """A proxy as the scaler sees it: reports `backends` {inFlight, queueMs} every 0.25 s."""

    def __init__(self, url: str, token: str, ns: str, key: str = "chat/llama"):
        self.url, self.token, self.ns, self.key = url, token, ns, key
        self.load = 0
        self.seq = 0
        self.answers: list[dict] = []
        self.id = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def post(self, budgets: dict | None = None) -> httpx.Response:
        self.seq += 1
        return httpx.post(f"{self.url}/v1/report", headers={"Authorization": f"Bearer {self.token}"}, timeout=10,
                          json={"proxyId": self.id, "namespace": self.ns, "seq": self.seq, "budgets": budgets or {},
                                "backends": {self.key: {"inFlight": self.load, "queueMs": 0}}})

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                r = self.post()
                if r.status_code == 200:
                    self.answers.append(r.json())
            except httpx.HTTPError:
                pass
            self._stop.wait(0.25)

    def __enter__(self) -> LoadReporter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def _reports(proxy: Any) -> float:
    """Ledger reports the proxy has had answered (its report-duration histogram's count)."""
    return sum(float(line.split()[-1]) for line in proxy.metrics().splitlines()
               if line.startswith("spendwarden_ledger_report_duration_seconds_count"))


def test_scaling_timeline_up_down_and_idle_to_zero(operator, kube, ns):
    """Up with load at once, down only after the stabilisation window, to zero after the idle period;
    replica-hours and their cost in status and metrics. Prints the timeline."""
    create_deployment(kube, ns, "llama", replicas=1)
    create_route(kube, ns, "chat", {"model": "chat", "defaultBackend": "llama", "backends": [backend(
        "llama", "http://llama:8080/v1", "llama", {"minReplicas": 1, "maxReplicas": 4, "targetInFlightPerReplica": 2,
                                                   "scaleDownStabilization": "4s", "idleToZeroAfter": "8s",
                                                   "costPerReplicaHour": LLAMA_PRICE})]})
    wait_for(lambda: scaling_status(kube, ns, "chat").get("desiredReplicas") == 1, what="the scaler's first decision")
    phases = [(0, 2.0), (7, 6.0), (3, 8.0), (0, 12.0)]   # (in-flight, seconds)
    timeline: list[tuple[float, int, int, int, str]] = []
    with LoadReporter(operator.url, sa_token(kube, ns), ns) as proxy:
        t0 = time.monotonic()
        for load, seconds in phases:
            proxy.load = load
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                d = deployment(kube, ns, "llama")
                reason = scaling_status(kube, ns, "chat").get("reason", "")
                timeline.append((time.monotonic() - t0, load, d.spec.replicas, d.status.replicas or 0, reason))
                time.sleep(0.5)
    print("\nscaling timeline (target 2 in flight per replica, min 1, max 4, stabilisation 4s, idle to zero 8s)")
    print(f"{'t(s)':>6} {'in-flight':>9} {'desired':>7} {'actual':>6}  reason")
    for t, load, desired, actual, reason in timeline:
        print(f"{t:6.1f} {load:9d} {desired:7d} {actual:6d}  {reason}")

    def first(pred, after: float = 0.0) -> float:
        return next(t for t, *row in timeline if t >= after and pred(*row))

    up_at = first(lambda load, desired, actual, r: load == 7)
    four = first(lambda load, desired, actual, r: desired == 4)
    assert four - up_at < 2.0, "up at once (ceil(7 / 2) = 4)"
    assert first(lambda load, desired, actual, r: actual == 4) - up_at < 4.0, "kube-controller-manager created the Pods"
    drop_at = first(lambda load, desired, actual, r: load == 3)
    two = first(lambda load, desired, actual, r: desired == 2, after=drop_at)
    assert 3.0 <= two - drop_at < 6.5, f"down to ceil(3 / 2) = 2 only after the 4 s window (took {two - drop_at:.1f}s)"
    assert all(desired == 4 for t, load, desired, *_ in timeline if drop_at <= t < drop_at + 3.0), "no early scale-down"
    idle_at = first(lambda load, desired, actual, r: load == 0, after=drop_at)
    zero = first(lambda load, desired, actual, r: desired == 0, after=idle_at)
    assert 7.0 <= zero - idle_at < 10.5, f"to zero 8 s after the last request (took {zero - idle_at:.1f}s)"
    assert any(desired == 1 for t, load, desired, *_ in timeline if idle_at < t < zero), "min 1 while idle, before zero"
    assert timeline[-1][3] == 0 or wait_for(lambda: (deployment(kube, ns, "llama").status.replicas or 0) == 0,
                                            what="Pods deleted at zero")

    # Cost of capacity: replica-hours (exact decimal) and their cost at 3.60 per replica-hour.
    from decimal import Decimal
    st = wait_for(lambda: (lambda s: s if s.get("reason") == "Idle" and Decimal(s.get("replicaHours", "0")) > 0 else None)(
        scaling_status(kube, ns, "chat")), what="replica-hours in status")
    hours, cost = Decimal(st["replicaHours"]), Decimal(st["cost"])
    assert Decimal("0.005") < hours < Decimal("0.05"), hours   # ~ (2 + 4x~8 + 2x~4 + ...) replica-seconds
    assert abs(cost - hours * Decimal(LLAMA_PRICE)) <= Decimal("0.0004") and st["currency"] == "USD"
    assert operator.metric("spendwarden_backend_replica_seconds_total", namespace=ns, workload="Deployment/llama") > 30
    assert operator.metric("spendwarden_backend_capacity_cost_total", currency="USD", namespace=ns,
                           workload="Deployment/llama") > 0


def test_hpa_conflict_is_reported_and_left_alone(operator, control_plane, kube, ns):
    create_deployment(kube, ns, "llama", replicas=2)
    # An HPA written in autoscaling/v2 (the scaler lists them through autoscaling/v1).
    status, _ = control_plane.request("POST", f"/apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers", {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "llama-cpu"},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llama"},
                 "minReplicas": 2, "maxReplicas": 6,
                 "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 60}}}]}})
    assert status == 201
    create_route(kube, ns, "chat", {"model": "chat", "defaultBackend": "llama", "backends": [backend(
        "llama", "http://llama:8080/v1", "llama", {"minReplicas": 1, "maxReplicas": 4, "scaleDownStabilization": "1s"})]})
    cond = wait_for(lambda: next((c for c in get_route(kube, ns, "chat")["status"].get("conditions", [])
                                  if c["type"] == "ScalingConflict" and c["status"] == "True"), None),
                    what="ScalingConflict=True")
    assert "HorizontalPodAutoscaler llama-cpu targets Deployment/" in cond["message"]
    wait_for(lambda: any(e.reason == "ScalingConflict" and e.type == "Warning" and "llama-cpu" in e.message
                         for e in client.CoreV1Api(kube).list_namespaced_event(ns, field_selector="involvedObject.name=chat").items),
             what="a Warning Event ScalingConflict")
    with LoadReporter(operator.url, sa_token(kube, ns), ns) as proxy:
        proxy.load = 40  # would be 4 replicas (ceil(40 / 4) capped at 4); the HPA owns them: stays 2
        time.sleep(2.0)
        assert deployment(kube, ns, "llama").spec.replicas == 2, "neither min 1 nor the load's 4: the HPA owns it"
        assert scaling_status(kube, ns, "chat")["reason"] == "Conflict"
        client.AutoscalingV1Api(kube).delete_namespaced_horizontal_pod_autoscaler("llama-cpu", ns)
        wait_for(lambda: deployment(kube, ns, "llama").spec.replicas == 4, what="scaling resumes without the HPA")
    # the condition is written after the scale, in the same tick
    wait_for(lambda: (conflict_condition(kube, ns) or {}).get("status") == "False", what="ScalingConflict=False")


def test_cut_off_scales_to_zero_and_back_at_the_reset(operator, kube, ns):
    """The namespace's CutOff budget is exhausted: its backend goes to zero at once, whatever the
    demand; at the reset (a 1-minute window) the scaler's policy applies again."""
    if time.time() % 60 > 40:  # leave time for the cut-off within the first window
        time.sleep(61 - time.time() % 60)
    create_deployment(kube, ns, "llama", replicas=1)
    create_route(kube, ns, "chat", {"model": "chat", "defaultBackend": "llama", "backends": [backend(
        "llama", "http://llama:8080/v1", "llama", {"minReplicas": 1, "maxReplicas": 3, "scaleDownStabilization": "1m"})]})
    budget = create_minute_budget(kube, ns, "minute", {"window": "1m", "onExceeded": "CutOff",
                                                       "limits": {"tokens": {"total": 1000}}}, need=20)
    period = budget["status"]["periodStart"]
    with LoadReporter(operator.url, sa_token(kube, ns), ns) as proxy:
        proxy.load = 9
        wait_for(lambda: deployment(kube, ns, "llama").spec.replicas == 3, what="3 replicas for 9 in flight")
        spend = {"minute": {"periodStart": period, "used": {"inputTokens": 600, "outputTokens": 400, "cost": "0"},
                            "held": {"inputTokens": 0, "outputTokens": 0, "cost": "0"}}}
        assert proxy.post(spend).status_code == 200
        t_cut = time.monotonic()
        wait_for(lambda: deployment(kube, ns, "llama").spec.replicas == 0, timeout=10, what="zero on cut-off")
        print(f"\ncut-off to zero replicas in {time.monotonic() - t_cut:.2f}s (stabilisation window 1m not waited for)")
        wait_for(lambda: scaling_status(kube, ns, "chat").get("reason") == "CutOff", what="reason CutOff in status")
        time.sleep(1.0)
        assert deployment(kube, ns, "llama").spec.replicas == 0, "demand of a cut-off namespace does not count"
        # The cut-off did its part (label) and left the replicas to the scaler: one owner, nothing
        # remembered to be restored over the scaler at the reset.
        core = client.CoreV1Api(kube)
        wait_for(lambda: (core.read_namespace(ns).metadata.labels or {}).get("spendwarden.io/cut-off") == "true",
                 what="the namespace labelled cut off")
        annotations = core.read_namespace(ns).metadata.annotations or {}
        assert "llama" not in annotations.get("spendwarden.io/replicas-before-cut-off", ""), annotations
        wait_for(lambda: get_budget(kube, ns, "minute")["status"]["ledger"]["periodStart"] != period, timeout=75,
                 what="the reset")
        wait_for(lambda: deployment(kube, ns, "llama").spec.replicas == 3, timeout=10, what="back at the reset")


def test_shared_backend_scales_on_the_namespaces_still_allowed(operator, kube, ns):
    """One Deployment in an inference namespace, shared (annotation) with two team namespaces: it
    scales on their summed demand, and on only the other's while one is cut off."""
    core = client.CoreV1Api(kube)
    teams = [f"sc-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    for t in teams:
        core.create_namespace({"metadata": {"name": t}})
    try:
        create_deployment(kube, ns, "llama", replicas=1,
                          annotations={"spendwarden.io/scaling-shared-with": ",".join(teams)})
        create_route(kube, ns, "own", {"model": "own", "defaultBackend": "llama", "backends": [backend(
            "llama", "http://llama:8080/v1", "llama", {"minReplicas": 1, "maxReplicas": 10, "targetInFlightPerReplica": 1,
                                                       "scaleDownStabilization": "1s"})]})
        for t in teams:
            b = backend("llama", f"http://llama.{ns}:8080/v1")
            b["deploymentRef"] = {"name": "llama", "namespace": ns}
            create_route(kube, t, "chat", {"model": "chat", "defaultBackend": "llama", "backends": [b]})
        create_budget(kube, teams[0], "daily", {"window": "24h", "onExceeded": "CutOff", "limits": {"tokens": {"total": 100}}})
        with LoadReporter(operator.url, sa_token(kube, teams[0]), teams[0]) as a, \
                LoadReporter(operator.url, sa_token(kube, teams[1]), teams[1]) as b:
            a.load, b.load = 3, 4
            wait_for(lambda: deployment(kube, ns, "llama").spec.replicas == 7, what="3 + 4 in flight")
            period = get_budget(kube, teams[0], "daily")["status"]["periodStart"]
            assert a.post({"daily": {"periodStart": period, "used": {"inputTokens": 100, "outputTokens": 0, "cost": "0"},
                                     "held": {"inputTokens": 0, "outputTokens": 0, "cost": "0"}}}).status_code == 200
            wait_for(lambda: deployment(kube, ns, "llama").spec.replicas == 4, what="only the uncut team's 4")
    finally:
        for t in teams:
            core.delete_namespace(t)


def ledger_proxy(operator, kube, ns: str, tmp_path, routes: list[dict]) -> Any:
    """The routes created as ModelRoutes and served by a real proxy process in ledger mode, with a
    ServiceAccount token of `ns` (the caller stops it)."""
    from tests.proxy.conftest import ProxyProcess

    for r in routes:
        create_route(kube, ns, r["name"], r["spec"])
    token = tmp_path / "token"
    token.write_text(sa_token(kube, ns))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"namespace": ns, "routes": routes, "ledger": {"url": operator.url}}))
    work = tmp_path / "proxy"
    work.mkdir()
    return ProxyProcess(config, work, env={"SPENDWARDEN_LEDGER_TOKEN_FILE": str(token)}).start()


def test_wake_on_demand_hold_and_fallback(operator, kube, ns, tmp_path):
    """A real proxy process in ledger mode. Hold: the request waits while the operator scales the
    workload from zero and the kubelet starts its Pod and reports it Ready, then it is served by
    that backend. Fallback: the request is served by the fallback at once, and the workload wakes."""
    from spendwarden.devtools.mock_upstream import MockUpstream

    zero = {"minReplicas": 0, "maxReplicas": 2, "scaleDownStabilization": "1s", "idleToZeroAfter": "1h"}
    create_deployment(kube, ns, "llama", replicas=0)
    create_deployment(kube, ns, "qwen", replicas=0)
    with MockUpstream(tokens=5) as up:
        routes = [
            {"name": "chat", "spec": {"model": "chat", "defaultBackend": "llama", "backends": [backend(
                "llama", up.openai_url, "llama", {**zero, "wake": {"mode": "Hold", "timeout": "30s"}})]}},
            {"name": "fast", "spec": {"model": "fast", "defaultBackend": "qwen", "fallbacks": ["mini"], "backends": [
                backend("qwen", up.openai_url, "qwen", {**zero, "wake": {"mode": "Fallback"}}),
                backend("mini", up.openai_url)]}},
        ]
        proxy = ledger_proxy(operator, kube, ns, tmp_path, routes)
        try:
            # The proxy learns from its reports' answers that both backends are at zero.
            wait_for(lambda: scaling_status(kube, ns, "chat").get("availableReplicas") == 0
                     and scaling_status(kube, ns, "fast", "qwen").get("availableReplicas") == 0, what="both at zero")
            # ... from a report sent after that: one in flight now may carry the older answer.
            sent = _reports(proxy)
            wait_for(lambda: _reports(proxy) >= sent + 3, what="the proxy's next reports answered")

            # Fallback: answered at once by mini; qwen is woken in the background.
            t = time.monotonic()
            r = httpx.post(proxy.openai_url + "/chat/completions", timeout=30,
                           json={"model": "fast", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200 and r.json()["model"] == "mini", r.text
            assert time.monotonic() - t < 2.0
            wait_for(lambda: deployment(kube, ns, "qwen").spec.replicas == 1, what="qwen woken")

            # Hold: the request waits for an available llama replica.
            result: dict = {}

            def call() -> None:
                t0 = time.monotonic()
                resp = httpx.post(proxy.openai_url + "/chat/completions", timeout=60,
                                  json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
                result.update(status=resp.status_code, body=resp.json(), seconds=time.monotonic() - t0)

            caller = threading.Thread(target=call)
            caller.start()
            wait_for(lambda: deployment(kube, ns, "llama").spec.replicas == 1, what="llama scaled from zero by the wake")
            wait_for(lambda: ready_pods(kube, ns, "llama") == 1, timeout=60, what="the woken Pod Ready (kubelet)")
            t_ready = time.monotonic()
            caller.join(40)
            assert result["status"] == 200 and result["body"]["model"] == "llama", result
            assert result["seconds"] > 0.5
            print(f"\nwake (Hold): request held {result['seconds']:.2f}s in all, "
                  f"served {time.monotonic() - t_ready:.2f}s after the Pod was seen Ready")
            metrics = httpx.get(f"http://127.0.0.1:{proxy.metrics_port}/metrics").text
            assert 'outcome="held"' in metrics and 'outcome="fallback"' in metrics
        finally:
            proxy.stop()


def test_a_refused_connection_to_a_scaled_backend_is_held_as_a_wake_not_a_502(operator, kube, ns, tmp_path):
    """The operator's answer says a replica serves, but nothing listens (scaled down, or not Ready,
    since the proxy's last report): the request is held as at zero and served once a server is up,
    instead of failing with 502 "connection refused"."""
    from spendwarden.devtools.mock_upstream import MockUpstream, free_port

    create_deployment(kube, ns, "llama", replicas=1)
    port = free_port()
    routes = [{"name": "chat", "spec": {"model": "chat", "defaultBackend": "llama", "backends": [backend(
        "llama", f"http://127.0.0.1:{port}/v1", "llama",
        {"minReplicas": 0, "maxReplicas": 1, "scaleDownStabilization": "1s", "idleToZeroAfter": "1h",
         "wake": {"mode": "Hold", "timeout": "30s"}})]}}]
    proxy = ledger_proxy(operator, kube, ns, tmp_path, routes)
    try:
        wait_for(lambda: scaling_status(kube, ns, "chat").get("availableReplicas") == 1, timeout=60,
                 what="the pause replica Ready")
        sent = _reports(proxy)
        wait_for(lambda: _reports(proxy) >= sent + 3, what="the proxy's next reports answered (available 1)")
        result: dict = {}

        def call() -> None:
            resp = httpx.post(proxy.openai_url + "/chat/completions", timeout=60,
                              json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
            result.update(status=resp.status_code, body=resp.json())

        caller = threading.Thread(target=call)
        caller.start()
        caller.join(2.0)
        assert caller.is_alive(), f"answered at once instead of held: {result}"
        with MockUpstream(port=port, tokens=5):
            caller.join(30)
            assert result.get("status") == 200 and result["body"]["model"] == "llama", result
        # The idle floor: minReplicas 0 with idleToZeroAfter 1h keeps the replica (not 0 after 1 s).
        assert deployment(kube, ns, "llama").spec.replicas == 1
        metrics = httpx.get(f"http://127.0.0.1:{proxy.metrics_port}/metrics").text
        assert 'outcome="held"' in metrics
    finally:
        proxy.stop()


def conflict_condition(kube, ns: str, route: str = "chat") -> dict | None:
    return next((c for c in (get_route(kube, ns, route).get("status") or {}).get("conditions", [])
                 if c["type"] == "ScalingConflict"), None)


def warning_events(kube, ns: str, reason: str, involved: str = "chat") -> list:
    return [e for e in client.CoreV1Api(kube).list_namespaced_event(ns, field_selector=f"involvedObject.name={involved}").items
            if e.reason == reason and e.type == "Warning"]


SCALE_BY_LOAD = {"minReplicas": 1, "maxReplicas": 6, "targetInFlightPerReplica": 1, "scaleDownStabilization": "1s"}


def test_kubectl_scale_is_a_foreign_writer_left_alone_until_forced(operator, kube, ns):
    """`kubectl scale` writes through the scale subresource, which records its field manager: the
    scaler sees a count it did not write, names the writer, stops overwriting; the annotation
    spendwarden.io/scaling=force gives the count back to the scaler."""
    create_deployment(kube, ns, "llama", replicas=1)
    create_route(kube, ns, "chat", {"model": "chat", "defaultBackend": "llama", "backends": [backend(
        "llama", "http://llama:8080/v1", "llama", SCALE_BY_LOAD)]})
    apps = client.AppsV1Api(kube)
    with LoadReporter(operator.url, sa_token(kube, ns), ns) as proxy:
        proxy.load = 2
        wait_for(lambda: deployment(kube, ns, "llama").spec.replicas == 2, what="2 replicas for 2 in flight")
        apps.patch_namespaced_deployment_scale("llama", ns, {"spec": {"replicas": 5}}, field_manager="kubectl")
        cond = wait_for(lambda: (lambda c: c if c and c["status"] == "True" else None)(conflict_condition(kube, ns)),
                        what="ScalingConflict=True")
        assert cond["reason"] == "ForeignReplicaWriter"
        assert "field manager kubectl set the replicas" in cond["message"], cond["message"]
        assert "spendwarden.io/scaling=force" in cond["message"]
        wait_for(lambda: scaling_status(kube, ns, "chat").get("foreignWriter") == "kubectl", what="foreignWriter in status")
        assert scaling_status(kube, ns, "chat")["reason"] == "Conflict"
        wait_for(lambda: len(warning_events(kube, ns, "ScalingConflict")) == 1, what="one Warning Event")
        time.sleep(2.0)  # 8 scaler ticks with 2 in flight
        assert deployment(kube, ns, "llama").spec.replicas == 5, "the scaler no longer overwrites the count"
        assert len(warning_events(kube, ns, "ScalingConflict")) == 1, "the Event is posted once"

        apps.patch_namespaced_deployment("llama", ns, {"metadata": {"annotations": {"spendwarden.io/scaling": "force"}}})
        wait_for(lambda: deployment(kube, ns, "llama").spec.replicas == 2, what="the scaler takes the count back")
        wait_for(lambda: (conflict_condition(kube, ns) or {}).get("status") == "False", what="ScalingConflict=False")
        assert "foreignWriter" not in scaling_status(kube, ns, "chat")


def apply_deployment(kube, ns: str, name: str, manager: str, replicas: int | None) -> None:
    """A GitOps tool syncing the Deployment with server-side apply (Argo CD, Flux)."""
    spec: dict = {"selector": {"matchLabels": {"app": name}},
                  "template": {"metadata": {"labels": {"app": name}},
                               "spec": {"containers": [{"name": "server", "image": PAUSE_IMAGE}]}}}
    if replicas is not None:
        spec["replicas"] = replicas
    client.AppsV1Api(kube).patch_namespaced_deployment(
        name, ns, {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": ns}, "spec": spec},
        field_manager=manager, force=True, _content_type="application/apply-patch+yaml")


def test_gitops_sync_of_replicas_is_named_and_left_alone_until_it_lets_go(operator, kube, ns):
    """A manager that server-side-applies spec.replicas after the scaler wrote them is named from
    managedFields; the conflict ends when its manifest no longer has replicas (it no longer owns
    the field) and the scaler scales on demand again."""
    apply_deployment(kube, ns, "llama", "argocd-controller", replicas=1)
    create_route(kube, ns, "chat", {"model": "chat", "defaultBackend": "llama", "backends": [backend(
        "llama", "http://llama:8080/v1", "llama", SCALE_BY_LOAD)]})
    with LoadReporter(operator.url, sa_token(kube, ns), ns) as proxy:
        proxy.load = 3
        wait_for(lambda: deployment(kube, ns, "llama").spec.replicas == 3, what="3 replicas for 3 in flight")
        apply_deployment(kube, ns, "llama", "argocd-controller", replicas=1)   # the sync (self-heal)
        cond = wait_for(lambda: (lambda c: c if c and c["status"] == "True" else None)(conflict_condition(kube, ns)),
                        what="ScalingConflict=True")
        assert cond["reason"] == "ForeignReplicaWriter" and "field manager argocd-controller" in cond["message"], cond
        # The Event is posted after the condition, in a call of its own.
        wait_for(lambda: any("argocd-controller" in e.message for e in warning_events(kube, ns, "ScalingConflict")),
                 what="the ScalingConflict Event naming argocd-controller")
        time.sleep(2.0)
        assert deployment(kube, ns, "llama").spec.replicas == 1, "the GitOps tool's count stands"
        assert scaling_status(kube, ns, "chat")["foreignWriter"] == "argocd-controller"

        apply_deployment(kube, ns, "llama", "argocd-controller", replicas=None)   # replicas dropped from git
        wait_for(lambda: deployment(kube, ns, "llama").spec.replicas == 3, what="scaling on demand again")
        wait_for(lambda: (conflict_condition(kube, ns) or {}).get("status") == "False", what="ScalingConflict=False")


def test_cut_off_wins_over_a_foreign_writer_whose_count_comes_back_at_the_reset(operator, kube, ns):
    """Budgets win: a workload left to another writer still goes to zero when its namespace is cut
    off, and gets that writer's count back at the reset (then is left alone again)."""
    if time.time() % 60 > 40:  # leave time for the cut-off within the first window
        time.sleep(61 - time.time() % 60)
    create_deployment(kube, ns, "llama", replicas=1)
    create_route(kube, ns, "chat", {"model": "chat", "defaultBackend": "llama", "backends": [backend(
        "llama", "http://llama:8080/v1", "llama", SCALE_BY_LOAD)]})
    budget = create_minute_budget(kube, ns, "minute", {"window": "1m", "onExceeded": "CutOff",
                                                       "limits": {"tokens": {"total": 1000}}}, need=20)
    period = budget["status"]["periodStart"]
    wait_for(lambda: scaling_status(kube, ns, "chat").get("desiredReplicas") == 1, what="the scaler's first decision")
    client.AppsV1Api(kube).patch_namespaced_deployment_scale("llama", ns, {"spec": {"replicas": 4}}, field_manager="kubectl")
    wait_for(lambda: (conflict_condition(kube, ns) or {}).get("reason") == "ForeignReplicaWriter", what="the conflict")
    with LoadReporter(operator.url, sa_token(kube, ns), ns) as proxy:
        proxy.load = 1
        spend = {"minute": {"periodStart": period, "used": {"inputTokens": 600, "outputTokens": 400, "cost": "0"},
                            "held": {"inputTokens": 0, "outputTokens": 0, "cost": "0"}}}
        assert proxy.post(spend).status_code == 200
        wait_for(lambda: deployment(kube, ns, "llama").spec.replicas == 0, timeout=10, what="zero on cut-off")
        wait_for(lambda: scaling_status(kube, ns, "chat").get("reason") == "CutOff", what="reason CutOff in status")
        assert (conflict_condition(kube, ns) or {}).get("status") == "True", "still another writer's workload"
        wait_for(lambda: get_budget(kube, ns, "minute")["status"]["ledger"]["periodStart"] != period, timeout=75,
                 what="the reset")
        wait_for(lambda: deployment(kube, ns, "llama").spec.replicas == 4, timeout=10, what="the writer's 4 back")
        time.sleep(1.5)
        assert deployment(kube, ns, "llama").spec.replicas == 4, "left alone again, not the load's 1"
