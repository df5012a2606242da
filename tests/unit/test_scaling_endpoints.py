"""The scaler's edges without a cluster: POST /v1/wake and the report's `backends` on the ledger
service (auth, namespace check, 400s that name the field), and the proxy's side of the numbers."""
from __future__ import annotations

import time

from aiohttp.test_utils import TestClient, TestServer

from spendwarden.controller import ledger_service as svc
from spendwarden.controller import scaler
from spendwarden.proxy.backend_load import BackendLoads

ROUTE = {"apiVersion": "spendwarden.io/v1alpha1", "kind": "ModelRoute",
         "metadata": {"name": "chat", "namespace": "team-a", "uid": "r1", "generation": 1},
         "spec": {"model": "chat", "defaultBackend": "llama", "backends": [{
             "name": "llama", "provider": "OpenAICompatible", "url": "http://llama:8080/v1", "model": "l",
             "pricing": {"input": "0", "output": "0"}, "deploymentRef": {"name": "llama"},
             "scaling": {"maxReplicas": 3}}]}}


class Reviewer:
    async def review(self, token):
        return {"token-a": ("team-a", "proxy"), "token-b": ("team-b", "proxy")}.get(token)


async def _client(monkeypatch) -> tuple[TestClient, scaler.Scaler]:
    s = scaler.Scaler()
    s.observe_route("ADDED", ROUTE)

    async def no_tick():
        return None

    monkeypatch.setattr(s, "tick", no_tick)
    service = svc.LedgerService(svc.LedgerConfig(port=0), scaling=scaler.ScalingEndpoints(lambda: s))
    service.reviewer = Reviewer()
    client = TestClient(TestServer(service.app()))
    await client.start_server()
    return client, s


async def test_wake_needs_a_token_of_the_routes_namespace(monkeypatch):
    client, s = await _client(monkeypatch)
    body = {"namespace": "team-a", "route": "chat", "backend": "llama"}
    try:
        assert (await client.post("/v1/wake", json=body)).status == 401
        assert (await client.post("/v1/wake", json=body, headers={"Authorization": "Bearer forged"})).status == 401
        r = await client.post("/v1/wake", json=body, headers={"Authorization": "Bearer token-b"})
        assert r.status == 403 and "namespace team-b" in (await r.json())["error"]
        r = await client.post("/v1/wake", json={"namespace": "team-a"}, headers={"Authorization": "Bearer token-a"})
        assert r.status == 400 and (await r.json())["error"] == "route, backend: required (non-empty strings)"
        r = await client.post("/v1/wake", json={**body, "backend": "gpt"}, headers={"Authorization": "Bearer token-a"})
        assert r.status == 404 and "is not a scaled backend" in (await r.json())["error"]
        assert not s.tracked
        r = await client.post("/v1/wake", json=body, headers={"Authorization": "Bearer token-a"})
        assert r.status == 200
        (wk, tracked), = s.tracked.items()
        assert str(wk) == "Deployment/team-a/llama" and tracked.state.wake_at is not None
    finally:
        await client.close()


async def test_a_report_with_bad_backends_is_refused_whole(monkeypatch):
    client, s = await _client(monkeypatch)
    body = {"proxyId": "p", "namespace": "team-a", "seq": 1, "budgets": {},
            "backends": {"chat/llama": {"inFlight": "3"}}}
    try:
        r = await client.post("/v1/report", json=body, headers={"Authorization": "Bearer token-a"})
        assert r.status == 400 and (await r.json())["error"] == "backends.chat/llama.inFlight: must be a non-negative integer"
        assert s.book.load(0) == {} and not s.book._proxies
        body["backends"]["chat/llama"]["inFlight"] = 3
        r = await client.post("/v1/report", json=body, headers={"Authorization": "Bearer token-a"})
        assert r.status == 200
        assert [(k, v.in_flight) for k, v in s.book.load(time.time()).items()] == [(("team-a", "chat/llama"), 3)]
    finally:
        await client.close()


def test_proxy_reports_the_peak_since_the_last_report():
    loads = BackendLoads()
    loads.set_keys({"chat/llama"})
    assert loads.report() == {"chat/llama": {"inFlight": 0, "queueMs": 0}}   # idle is news too
    for _ in range(3):
        loads.begin("chat/llama")
    for _ in range(3):
        loads.end("chat/llama")
    loads.begin("chat/llama")
    loads.queued("chat/llama", 1.25)
    assert loads.report() == {"chat/llama": {"inFlight": 3, "queueMs": 1250}}  # the burst between reports
    assert loads.report() == {"chat/llama": {"inFlight": 1, "queueMs": 0}}     # still one in flight
    loads.begin("other/x")  # not a scaled backend: never reported
    assert set(loads.report()) == {"chat/llama"}


def test_proxy_knows_a_backend_is_at_zero_only_from_the_operator():
    loads = BackendLoads()
    loads.set_keys({"chat/llama"})
    assert not loads.at_zero("chat/llama")              # unknown: try it
    loads.apply({"chat/llama": {"replicas": 0, "availableReplicas": 0}, "ghost/x": {"availableReplicas": 0}})
    assert loads.at_zero("chat/llama") and "ghost/x" not in loads.state
    loads.apply({"chat/llama": {"replicas": 0, "availableReplicas": 0, "conflict": True}})
    assert not loads.at_zero("chat/llama")              # an HPA owns it: not ours to wake
    loads.apply({"chat/llama": {"replicas": 1, "availableReplicas": 1}})
    assert not loads.at_zero("chat/llama")


async def test_a_woken_backend_counts_as_reachable_only_once_it_takes_a_connection():
    """The hold ends when the backend's address accepts a connection, not when the operator reports
    the replica available (its Service's endpoints follow readiness by a moment)."""
    import asyncio
    import socket

    from spendwarden.proxy.backend_load import accepts_connections

    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    assert await accepts_connections(f"http://127.0.0.1:{port}/v1")
    server.close()
    await server.wait_closed()
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert not await accepts_connections(f"http://127.0.0.1:{closed}/v1")


async def test_a_report_answers_replicas_only_of_workloads_shared_with_its_namespace(monkeypatch):
    """A route may name a workload of any namespace in deploymentRef: the report's answer must not
    tell that team the workload's replica counts unless the workload is shared with it (the wake
    endpoint's rule), or any team could watch another's capacity."""
    import copy

    other = copy.deepcopy(ROUTE)
    other["spec"]["backends"][0]["deploymentRef"] = {"name": "gpu", "namespace": "inference"}
    client, s = await _client(monkeypatch)
    s.observe_route("MODIFIED", other)
    (wk,) = s.uses
    assert str(wk) == "Deployment/inference/gpu"
    s.tracked[wk] = scaler.Tracked(scaler.ScaleState.new(time.time()),
                                   view=scaler.WorkloadView(spec_replicas=3, replicas=3, available=2, annotations={}))
    body = {"proxyId": "p", "namespace": "team-a", "seq": 1, "budgets": {},
            "backends": {"chat/llama": {"inFlight": 1}}}
    auth = {"Authorization": "Bearer token-a"}
    try:
        r = await client.post("/v1/report", json=body, headers=auth)
        assert r.status == 200 and "backends" not in await r.json()
        s.tracked[wk].view.annotations["spendwarden.io/scaling-shared-with"] = "team-a"
        r = await client.post("/v1/report", json={**body, "seq": 2}, headers=auth)
        assert r.status == 200
        assert (await r.json())["backends"]["chat/llama"] == {"replicas": 3, "availableReplicas": 2}
    finally:
        await client.close()


async def test_another_namespace_reusing_a_proxy_id_does_not_replace_its_demand(monkeypatch):
    """The demand book was keyed by proxyId alone: team-b reporting team-a's proxyId (visible in
    team-a's budget status) replaced team-a's in-flight numbers, scaling its backend down."""
    client, s = await _client(monkeypatch)
    mine = {"proxyId": "p1", "namespace": "team-a", "seq": 1, "budgets": {}, "backends": {"chat/llama": {"inFlight": 3}}}
    theirs = {**mine, "namespace": "team-b", "seq": 10**9, "backends": {"chat/llama": {"inFlight": 0}}}
    try:
        assert (await client.post("/v1/report", json=mine, headers={"Authorization": "Bearer token-a"})).status == 200
        assert (await client.post("/v1/report", json=theirs, headers={"Authorization": "Bearer token-b"})).status == 200
        assert s.book.load(time.time())[("team-a", "chat/llama")].in_flight == 3
    finally:
        await client.close()
    book = scaler.DemandBook(ttl=5, max_proxies=10)
    for i in range(50):  # one namespace's many proxy ids stay within its own cap
        book.record(f"x{i}", "team-b", {"chat/llama": scaler.BackendLoad(1, 0)}, now=100)
    book.record("p1", "team-a", {"chat/llama": scaler.BackendLoad(2, 0)}, now=100)
    assert book.load(100) == {("team-b", "chat/llama"): scaler.BackendLoad(10, 0),
                              ("team-a", "chat/llama"): scaler.BackendLoad(2, 0)}


def test_the_workloads_uses_follow_the_routes_that_name_workloads_only():
    """observe_route recomputes the uses only for routes with a deploymentRef (it used to, over all
    routes, on every ModelRoute event): the result is the same as recomputing from all routes."""
    import copy

    s = scaler.Scaler()
    plain_route = copy.deepcopy(ROUTE)
    plain_route["metadata"]["name"] = "plain"
    del plain_route["spec"]["backends"][0]["deploymentRef"], plain_route["spec"]["backends"][0]["scaling"]
    s.observe_route("ADDED", plain_route)
    assert s.uses == {}
    s.observe_route("ADDED", ROUTE)
    (key, uses), = s.uses.items()
    assert (key.name, [u.route for u in uses]) == ("llama", ["chat"])
    s.observe_route("MODIFIED", plain_route)
    assert list(s.uses) == [key]
    unref = copy.deepcopy(ROUTE)
    del unref["spec"]["backends"][0]["deploymentRef"], unref["spec"]["backends"][0]["scaling"]
    s.observe_route("MODIFIED", unref)  # the route stops naming the workload
    assert s.uses == {}
    s.observe_route("MODIFIED", ROUTE)
    s.observe_route("DELETED", ROUTE)
    assert s.uses == {} and ("team-a", "chat") not in s.routes
