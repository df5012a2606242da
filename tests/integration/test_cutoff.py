"""The namespace cut-off of an exhausted CutOff budget on the real apiserver (issue #4): a real
operator process, a budget spent through the ledger API with a real ServiceAccount token, then the
NetworkPolicy, the namespace label and the scale-to-zero checked on the apiserver, and all of it
reversed at the period reset (1-minute rolling window) and when the limit is raised (also while
the operator was down)."""
from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx
import pytest
from kubernetes import client

from spendwarden.ledger.allowance import Amount
from spendwarden.localcluster.node import PAUSE_IMAGE
from tests.support.cluster import cut_off_policy, events
from tests.support.ledger_cluster import (
    GROUP,
    VERSION,
    Operator,
    SimProxy,
    create_budget,
    create_minute_budget,
    get_budget,
    sa_token,
)
from tests.support.operator_process import wait_for

LIMIT = 10_000
EXTERNAL_IP = "203.0.113.7"


@pytest.fixture(scope="module")
def operator(control_plane, tmp_path_factory):
    op = Operator(control_plane, tmp_path_factory.mktemp("cutoff"), pattern="co-*",
                  env={"SPENDWARDEN_CUTOFF_RESYNC": "3"})  # a short resync, to see drift repaired
    op.start()
    yield op
    op.stop()


@pytest.fixture
def team(kube):
    """A team namespace with its own inference Deployment (2 replicas) and an inference namespace."""
    core, apps = client.CoreV1Api(kube), client.AppsV1Api(kube)
    suffix = uuid.uuid4().hex[:8]
    ns, inference = f"co-{suffix}", f"co-inf-{suffix}"
    for name in (ns, inference):
        core.create_namespace({"metadata": {"name": name}})
    labels = {"app": "llama"}
    apps.create_namespaced_deployment(ns, {
        "metadata": {"name": "llama"},
        "spec": {"replicas": 2, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {"containers": [{"name": "llama", "image": PAUSE_IMAGE}]}}}})
    route = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelRoute", "metadata": {"name": "chat"}, "spec": {
        "model": "chat", "defaultBackend": "external", "backends": [
            {"name": "external", "provider": "OpenAI", "url": f"http://{EXTERNAL_IP}:8000/v1", "model": "m",
             "pricing": {"input": "1", "output": "2"}},
            {"name": "vllm", "provider": "OpenAICompatible", "url": f"http://vllm.{inference}.svc:8000/v1", "model": "m",
             "pricing": {"input": "1", "output": "2"}},
            {"name": "llama", "provider": "OpenAICompatible", "url": "http://llama:8080/v1", "model": "m",
             "pricing": {"input": "0", "output": "0"}, "deploymentRef": {"name": "llama"}}]}}
    client.CustomObjectsApi(kube).create_namespaced_custom_object(GROUP, VERSION, ns, "modelroutes", route)
    wait_for(lambda: sum(rs.status.replicas or 0 for rs in apps.list_namespaced_replica_set(ns).items) == 2,
             what="kube-controller-manager's ReplicaSet with 2 replicas")
    yield ns, inference
    for name in (ns, inference):
        core.delete_namespace(name)




def replicas(kube, ns: str) -> int:
    return client.AppsV1Api(kube).read_namespaced_deployment_scale("llama", ns).spec.replicas or 0  # 0 is omitted




async def spend_all(operator: Operator, kube, ns: str, start: str, budget: str) -> float:
    """Report the whole budget as used; returns the seconds from the report to the NetworkPolicy."""
    seen: list[float] = []

    def watch() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and cut_off_policy(kube, ns) is None:
            time.sleep(0.01)
        seen.append(time.perf_counter())

    watcher = asyncio.create_task(asyncio.to_thread(watch))
    async with httpx.AsyncClient() as http:
        p = SimProxy(http, operator.url, sa_token(kube, ns), ns, start, budget=budget)
        p.allowance.used = Amount(100, 100)
        assert await p.report()  # the proxy is known (token reviewed, budget loaded) before it spends the rest
        p.allowance.used = Amount(LIMIT // 2, LIMIT // 2)
        t0 = time.perf_counter()
        assert await p.report()
    await watcher
    assert cut_off_policy(kube, ns) is not None, "no NetworkPolicy within 20 s"
    latency = seen[0] - t0
    print(f"\ncut-off latency, exhausting report -> NetworkPolicy on the apiserver: {latency * 1000:.0f} ms")
    assert latency < 5  # one report round trip and a few apiserver writes; generous for 2 shared cores
    return latency


def assert_cut(kube, ns: str, inference: str, budget: str) -> None:
    core = client.CoreV1Api(kube)
    # The policy comes first (fastest effect), then the label, then the scale-down.
    wait_for(lambda: replicas(kube, ns) == 0, what="llama scaled to 0")
    spec = cut_off_policy(kube, ns).spec
    assert spec.pod_selector.match_labels is None and spec.pod_selector.match_expressions is None  # every pod
    assert spec.policy_types == ["Egress"]
    dns, addresses, namespaces = spec.egress
    assert sorted((p.protocol, p.port) for p in dns.ports) == [("TCP", 53), ("UDP", 53)] and dns.to is None
    blocks = {b.ip_block.cidr: b.ip_block._except for b in addresses.to}
    assert blocks == {"0.0.0.0/0": [f"{EXTERNAL_IP}/32"], "::/0": None}
    (peer,) = namespaces.to
    (expr,) = peer.namespace_selector.match_expressions
    assert (expr.key, expr.operator, expr.values) == ("kubernetes.io/metadata.name", "NotIn", [inference])
    # 1.20 does not set that label itself: the operator did, or the NotIn would not match.
    assert core.read_namespace(inference).metadata.labels["kubernetes.io/metadata.name"] == inference
    meta = core.read_namespace(ns).metadata
    assert meta.labels["spendwarden.io/cut-off"] == "true"
    assert meta.annotations["spendwarden.io/cut-off-budgets"] == budget
    assert json.loads(meta.annotations["spendwarden.io/replicas-before-cut-off"]) == {"Deployment/llama": 2}
    wait_for(lambda: sum(rs.spec.replicas or 0 for rs in client.AppsV1Api(kube).list_namespaced_replica_set(ns).items) == 0,
             what="the ReplicaSet scaled to 0 by kube-controller-manager")
    (event,) = wait_for(lambda: events(kube, ns, "NamespaceCutOff"), what="NamespaceCutOff Event")
    assert event.type == "Warning" and event.involved_object.name == budget and EXTERNAL_IP in event.message


def lifted(kube, ns: str) -> bool:
    meta = client.CoreV1Api(kube).read_namespace(ns).metadata
    return (cut_off_policy(kube, ns) is None and "spendwarden.io/cut-off" not in (meta.labels or {})
            and "spendwarden.io/replicas-before-cut-off" not in (meta.annotations or {}) and replicas(kube, ns) == 2)


async def test_cut_off_and_its_reversal_at_the_period_reset(operator, kube, team):
    ns, inference = team
    if time.time() % 60 > 30:  # leave time to check the cut-off before the window rolls
        await asyncio.sleep(61 - time.time() % 60)
    start = create_minute_budget(kube, ns, "minute", {"window": "1m", "limits": {"tokens": {"total": LIMIT}},
                                                      "onExceeded": "CutOff"}, need=20)["status"]["periodStart"]
    await spend_all(operator, kube, ns, start, "minute")
    assert_cut(kube, ns, inference, "minute")
    assert operator.metric("spendwarden_namespace_cut_off", namespace=ns) == 1
    wait_for(lambda: lifted(kube, ns), timeout=75, interval=0.5, what="the cut-off lifted at the reset")
    # The lift follows the ledger's reset at once; its status write follows at the next flush (2 s).
    wait_for(lambda: get_budget(kube, ns, "minute")["status"]["ledger"]["periodStart"] != start, timeout=10,
             interval=0.3, what="status.ledger.periodStart of the new period")
    # The reconcile's fields follow at the reset too (the reset loop wakes at the period end).
    wait_for(lambda: get_budget(kube, ns, "minute")["status"]["periodStart"] != start, timeout=10,
             interval=0.3, what="status.periodStart of the new period")
    wait_for(lambda: events(kube, ns, "CutOffLifted"), what="CutOffLifted Event")
    wait_for(lambda: operator.metric("spendwarden_namespace_cut_off", namespace=ns) == 0, what="gauge back to 0")


async def test_raising_the_limit_lifts_the_cut_off_also_across_a_restart(operator, kube, team):
    ns, inference = team
    custom = client.CustomObjectsApi(kube)
    start = create_budget(kube, ns, "monthly", {"period": {"type": "Monthly"}, "limits": {"tokens": {"total": LIMIT}},
                                                "onExceeded": "CutOff"})["status"]["periodStart"]
    await spend_all(operator, kube, ns, start, "monthly")
    assert_cut(kube, ns, inference, "monthly")

    # Someone scales the workload back up by hand: the resync holds it at zero again.
    client.AppsV1Api(kube).patch_namespaced_deployment_scale("llama", ns, {"spec": {"replicas": 3}})
    wait_for(lambda: replicas(kube, ns) == 0, timeout=20, interval=0.5, what="the resync scaling llama to 0 again")

    # The limit is raised while the operator is down: the restarted one lifts the cut-off.
    operator.stop()
    custom.patch_namespaced_custom_object(GROUP, VERSION, ns, "tokenbudgets", "monthly",
                                          {"spec": {"limits": {"tokens": {"total": LIMIT * 2}}}})
    await asyncio.sleep(1)
    assert cut_off_policy(kube, ns) is not None  # nothing lifts it but the operator
    operator.start()
    wait_for(lambda: lifted(kube, ns), timeout=30, interval=0.3, what="the cut-off lifted after the raise")
    (event,) = wait_for(lambda: events(kube, ns, "CutOffLifted"), what="CutOffLifted Event")
    assert event.involved_object.name == "monthly"

    # Another proxy spends the rest of the new limit (the first one's 10k still count): cut off
    # again; raised again with the operator running.
    async with httpx.AsyncClient() as http:
        p = SimProxy(http, operator.url, sa_token(kube, ns), ns, start, budget="monthly")
        p.allowance.used = Amount(LIMIT // 2, LIMIT // 2)
        assert await p.report()
    wait_for(lambda: cut_off_policy(kube, ns) is not None and replicas(kube, ns) == 0, what="cut off again")
    custom.patch_namespaced_custom_object(GROUP, VERSION, ns, "tokenbudgets", "monthly",
                                          {"spec": {"limits": {"tokens": {"total": LIMIT * 3}}}})
    wait_for(lambda: lifted(kube, ns), timeout=30, interval=0.3, what="the cut-off lifted after the second raise")


async def test_a_downgrade_budget_at_its_hard_ceiling_cuts_off_and_a_raised_ceiling_lifts_it(operator, kube, team):
    ns, inference = team
    spec = {"period": {"type": "Monthly"}, "limits": {"tokens": {"total": LIMIT // 2}}, "onExceeded": "Downgrade",
            "downgrade": {"hardCeiling": {"tokens": LIMIT}}}
    start = create_budget(kube, ns, "capped", spec)["status"]["periodStart"]
    await spend_all(operator, kube, ns, start, "capped")  # LIMIT used: past the limit, at the hard ceiling
    assert_cut(kube, ns, inference, "capped")
    client.CustomObjectsApi(kube).patch_namespaced_custom_object(
        GROUP, VERSION, ns, "tokenbudgets", "capped", {"spec": {"downgrade": {"hardCeiling": {"tokens": LIMIT * 2}}}})
    wait_for(lambda: lifted(kube, ns), timeout=30, interval=0.3, what="the cut-off lifted after the raised ceiling")


async def test_deleting_the_budget_lifts_the_cut_off(operator, kube, team):
    ns, inference = team
    start = create_budget(kube, ns, "gone", {"window": "24h", "limits": {"tokens": {"total": LIMIT}}})["status"]["periodStart"]
    await spend_all(operator, kube, ns, start, "gone")  # onExceeded defaults to CutOff
    assert_cut(kube, ns, inference, "gone")
    client.CustomObjectsApi(kube).delete_namespaced_custom_object(GROUP, VERSION, ns, "tokenbudgets", "gone")
    wait_for(lambda: lifted(kube, ns), timeout=30, interval=0.3, what="the cut-off lifted after the budget was deleted")


def test_applying_is_idempotent_and_a_manual_scale_up_survives_the_reversal(kube, team, monkeypatch):
    """controller/cutoff.apply_cut_off on its own against the apiserver (no operator process)."""
    from spendwarden.api.modelroute import ModelRouteSpec
    from spendwarden.controller import cutoff
    from spendwarden.controller import kube as kube_module
    from spendwarden.render.cutoff import BudgetCut, desired_cut_off

    monkeypatch.setattr(kube_module, "api_client", lambda: kube)
    ns, inference = team
    apps, core = client.AppsV1Api(kube), client.CoreV1Api(kube)
    apps.create_namespaced_stateful_set(ns, {"metadata": {"name": "embed"}, "spec": {
        "replicas": 1, "serviceName": "embed", "selector": {"matchLabels": {"app": "embed"}},
        "template": {"metadata": {"labels": {"app": "embed"}}, "spec": {"containers": [{"name": "e", "image": PAUSE_IMAGE}]}}}})
    spec = ModelRouteSpec.model_validate({"model": "chat", "defaultBackend": "llama", "backends": [
        {"name": "llama", "provider": "OpenAICompatible", "url": "http://llama:8080/v1", "model": "m",
         "pricing": {"input": "0", "output": "0"}, "deploymentRef": {"name": "llama"}},
        {"name": "embed", "provider": "OpenAICompatible", "url": f"http://embed.{inference}:80/v1", "model": "m",
         "pricing": {"input": "0", "output": "0"}, "deploymentRef": {"name": "embed", "kind": "StatefulSet"}},
        {"name": "missing", "provider": "OpenAICompatible", "url": "http://missing:80/v1", "model": "m",
         "pricing": {"input": "0", "output": "0"}, "deploymentRef": {"name": "missing"}}]})

    def desired(cut: bool):
        return desired_cut_off(ns, [BudgetCut("b", None, (), cut)], [spec], cutoff.resolve, cutoff.namespace_exists)

    def apply(cut: bool):
        d = desired(cut)
        return d, cutoff.apply_cut_off(d, cutoff.read_namespace(ns))

    d, changes = apply(True)
    assert changes == ["cut"] and "Deployment/missing not found: not scaled" in d.notes
    assert d.denied_namespaces == (inference,)  # "embed.<namespace>": the short in-cluster form
    assert json.loads(core.read_namespace(ns).metadata.annotations["spendwarden.io/replicas-before-cut-off"]) == {
        "Deployment/llama": 2, "StatefulSet/embed": 1}
    assert replicas(kube, ns) == 0 and not apps.read_namespaced_stateful_set_scale("embed", ns).spec.replicas
    versions = (core.read_namespace(ns).metadata.resource_version, cut_off_policy(kube, ns).metadata.resource_version,
                core.read_namespace(inference).metadata.resource_version)
    time.sleep(1.1)  # a second later: on 1.20 a no-op server-side apply would still write managedFields' time
    assert apply(True)[1] == []  # level-triggered: the same state again writes nothing
    assert versions == (core.read_namespace(ns).metadata.resource_version, cut_off_policy(kube, ns).metadata.resource_version,
                        core.read_namespace(inference).metadata.resource_version)

    apps.patch_namespaced_deployment_scale("llama", ns, {"spec": {"replicas": 5}})  # someone's decision: kept
    assert apply(False)[1] == ["policy deleted", "lifted"]
    assert replicas(kube, ns) == 5 and apps.read_namespaced_stateful_set_scale("embed", ns).spec.replicas == 1
    meta = core.read_namespace(ns).metadata
    assert not (meta.labels or {}).get("spendwarden.io/cut-off") and not (meta.annotations or {}).get(
        "spendwarden.io/replicas-before-cut-off")
    assert apply(False)[1] == []
