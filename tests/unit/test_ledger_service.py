"""The ledger service's persistence rules with the apiserver faked: group commit, the shutdown flush,
restoring before serving. (The HTTP, TokenReview and real-apiserver paths: tests/integration/test_ledger.py.)"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import time
from datetime import UTC, datetime

from spendwarden.controller import ledger_service as svc
from spendwarden.ledger.store import parse_report
from tests.support.ledger_fake import OBJ, START, FakeApi


def report(proxy, seq, want=2000, used=0, start=START):
    return parse_report({"proxyId": proxy, "namespace": "team-a", "seq": seq, "budgets": {"monthly": {
        "periodStart": start, "used": {"inputTokens": used, "outputTokens": 0, "cost": "0"},
        "want": {"inputTokens": 0, "outputTokens": want, "cost": "0"}}}})


def current_start():
    from spendwarden.api.common import now_rfc3339
    from spendwarden.api.validation import validate_spec
    from spendwarden.ledger.periods import current_period
    return now_rfc3339(current_period(validate_spec("TokenBudget", OBJ["spec"])[0], datetime.now(UTC))[0])


async def test_grants_are_answered_only_after_they_are_persisted_and_writes_are_batched(monkeypatch):
    api = FakeApi(monkeypatch)
    service = svc.LedgerService(svc.LedgerConfig(port=0))
    start = current_start()

    async def one(i):
        answer = await service.apply(report(f"p{i}", 1, start=start))
        ceiling = answer["budgets"]["monthly"]["ceiling"]["total"]
        # At the moment of the answer the apiserver already holds this ceiling.
        with api.lock:
            persisted = api.obj["status"]["ledger"]["proxies"][f"p{i}"]["ceiling"]["total"]
        assert persisted >= ceiling
        return ceiling

    ceilings = await asyncio.gather(*(one(i) for i in range(8)))
    assert all(c >= 2000 for c in ceilings)
    assert len(api.writes) <= 3  # eight grants, a few writes: they ride on each other's flush
    await service.stop()


async def test_restart_restores_before_serving_and_shutdown_flushes(monkeypatch):
    api = FakeApi(monkeypatch, delay=0)
    start = current_start()
    first = svc.LedgerService(svc.LedgerConfig(port=0, flush_interval=3600))
    answer = await first.apply(report("p1", 1, start=start))
    granted = answer["budgets"]["monthly"]["ceiling"]["total"]
    # More usage, no grant needed: not written yet (interval), but written at shutdown.
    entry = first.store.get("team-a", "monthly")
    first.store.report(entry, "p1", 2, report("p1", 2, want=0, used=700, start=start).budgets["monthly"],
                       time.time(), datetime.now(UTC))
    await first.stop()
    assert api.obj["status"]["used"]["inputTokens"] == 700

    second = svc.LedgerService(svc.LedgerConfig(port=0))
    answer = await second.apply(report("p2", 1, want=10**9, start=start))
    # p1's grant came back from status.ledger: p2 cannot be given the same headroom again.
    restored = second.store.get("team-a", "monthly").current.ledger
    assert restored.proxies["p1"].ceiling.total >= granted
    assert restored.committed("total") <= 100_000
    assert answer["budgets"]["monthly"]["ceiling"]["total"] <= 100_000 - granted
    await second.stop()


async def test_unknown_budgets_are_answered_per_budget(monkeypatch):
    api = FakeApi(monkeypatch)
    monkeypatch.setattr(svc, "_get_budget", lambda ns, name: None)
    service = svc.LedgerService(svc.LedgerConfig(port=0))
    answer = await service.apply(report("p1", 1))
    assert answer == {"seq": 1, "budgets": {"monthly": {"error": "unknown budget"}}}
    assert not api.writes


def test_only_the_watched_namespaces_are_served():
    assert svc.LedgerConfig().serves("anything")
    config = svc.LedgerConfig(namespaces=("team-*", "!team-x"))
    assert config.serves("team-a") and not config.serves("team-x") and not config.serves("other")
    assert svc.LedgerConfig(namespaces=("!kube-*",)).serves("team-a")


async def _client(service):
    from aiohttp.test_utils import TestClient, TestServer
    client = TestClient(TestServer(service.app()))
    await client.start_server()
    return client


async def test_http_answers_400_with_the_field_and_401_without_a_token(monkeypatch):
    FakeApi(monkeypatch)
    service = svc.LedgerService(svc.LedgerConfig(port=0))
    client = await _client(service)
    try:
        resp = await client.post("/v1/report", json={"proxyId": "p"})
        assert resp.status == 401
        service.config = dataclasses.replace(service.config, insecure=True)  # standalone mode: no token needed
        resp = await client.post("/v1/report", data=b"{not json")
        assert resp.status == 400 and "JSON" in (await resp.json())["error"]
        resp = await client.post("/v1/report", json={"proxyId": "p", "namespace": "team-a", "seq": 1, "budgets": {
            "monthly": {"periodStart": START, "used": {"inputTokens": -1}}}})
        assert resp.status == 400 and "budgets.monthly.used.inputTokens" in (await resp.json())["error"]
        resp = await client.post("/v1/report", json={"proxyId": "p", "namespace": "team-a", "seq": 1, "budgets": {
            "monthly": {"periodStart": current_start(), "used": {}, "want": {"outputTokens": 100}}}})
        body = await resp.json()
        assert resp.status == 200 and body["seq"] == 1 and body["budgets"]["monthly"]["ceiling"]["total"] >= 100
        assert (await (await client.get("/healthz")).json())["budgets"] == 1
    finally:
        await client.close()
        await service.stop()


async def test_http_answers_400_to_amounts_the_ledger_cannot_hold(monkeypatch):
    """"1e9999999" overflowed the ledger's arithmetic (503) and "1e999999" went into status as a million
    digits: both are a 400 naming the field, and nothing reaches the status."""
    api = FakeApi(monkeypatch, delay=0)
    api.obj["spec"]["limits"] = {"cost": {"amount": "5"}}
    service = svc.LedgerService(svc.LedgerConfig(port=0, insecure=True))  # no TokenReview in this test
    client = await _client(service)
    try:
        for cost in ("1e9999999", "1e999999"):
            resp = await client.post("/v1/report", json={"proxyId": "p", "namespace": "team-a", "seq": 1, "budgets": {
                "monthly": {"periodStart": current_start(), "used": {"cost": cost}, "want": {"cost": "0.01"}}}})
            error = (await resp.json())["error"]
            assert resp.status == 400 and "budgets.monthly.used.cost" in error and "at most" in error, error
        resp = await client.post("/v1/report", json={"proxyId": "p", "namespace": "team-a", "seq": 1, "budgets": {
            "monthly": {"periodStart": current_start(), "used": {"cost": "1.05E-7"}, "want": {"cost": "0.01"}}}})
        assert resp.status == 200, await resp.text()
    finally:
        await client.close()
        await service.stop()
    assert all(len(str(w)) < 10_000 for w in api.writes)


class _Review:
    """What the kubernetes client returns for a TokenReview (only the fields the reviewer reads)."""

    def __init__(self, authenticated=True, audiences=None, username="system:serviceaccount:team-a:proxy"):
        user = type("User", (), {"username": username})()
        self.status = type("Status", (), {"authenticated": authenticated, "user": user, "audiences": audiences})()


def test_a_token_review_must_name_the_spendwarden_audience(monkeypatch):
    """A TokenReview answered without audiences (an authenticator that ignores them, e.g. a webhook
    one, or a token for any audience) proves nothing about who the token was issued for."""
    from kubernetes import client

    from spendwarden.controller import kube

    answers, sent = [], []

    class Api:
        def __init__(self, _api_client):
            pass

        def create_token_review(self, body):
            sent.append(body)
            return answers.pop(0)

    monkeypatch.setattr(client, "AuthenticationV1Api", Api)
    monkeypatch.setattr(kube, "api_client", lambda: None)
    reviewer = svc.TokenReviewer()
    answers[:] = [_Review(audiences=None), _Review(audiences=[]), _Review(audiences=["https://kubernetes.default.svc"]),
                  _Review(audiences=["spendwarden"]), _Review(authenticated=False, audiences=["spendwarden"])]
    assert [reviewer._review_sync("t") for _ in range(5)] == [None, None, None, ("team-a", "proxy"), None]
    assert all(b["spec"]["audiences"] == ["spendwarden"] for b in sent)


async def test_token_reviews_are_cached_by_hash_and_namespaces_enforced(monkeypatch):
    FakeApi(monkeypatch)
    calls = []
    reviewer = svc.TokenReviewer(ttl=60)

    def review_sync(token):
        calls.append(1)
        return ("team-a", "proxy") if token == "good-token" else None

    monkeypatch.setattr(reviewer, "_review_sync", review_sync)
    service = svc.LedgerService(svc.LedgerConfig(port=0))
    service.reviewer = reviewer
    client = await _client(service)
    try:
        body = {"proxyId": "p", "namespace": "team-b", "seq": 1, "budgets": {}}
        for _ in range(3):
            resp = await client.post("/v1/report", json=body, headers={"Authorization": "Bearer good-token"})
            assert resp.status == 403
        assert len(calls) == 1  # cached
        assert all("good-token" not in k for k in reviewer._cache)  # only hashes are kept
        resp = await client.post("/v1/report", json=body, headers={"Authorization": "Bearer bad"})
        assert resp.status == 401
        resp = await client.post("/v1/report", json={**body, "namespace": "team-a"},
                                 headers={"Authorization": "Bearer good-token"})
        assert resp.status == 200 and (await resp.json()) == {"seq": 1, "budgets": {}}
    finally:
        await client.close()
        await service.stop()


async def test_a_budget_with_a_persisted_ledger_is_loaded_when_seen(monkeypatch):
    api = FakeApi(monkeypatch, delay=0)
    service = svc.LedgerService(svc.LedgerConfig(port=0))
    service.observe("ADDED", api.obj)  # no ledger yet: stays lazy
    await asyncio.sleep(0.05)
    assert service.store.get("team-a", "monthly") is None
    api.obj["status"] = {"ledger": {"periodStart": "2026-01-01T00:00:00Z", "periodEnd": "2026-02-01T00:00:00Z",
                                    "retired": {"inputTokens": 5, "outputTokens": 0, "cost": "0"}}}
    service.observe("MODIFIED", api.obj)
    await asyncio.sleep(0.05)
    entry = service.store.get("team-a", "monthly")
    assert entry is not None and entry.previous is not None and entry.history[0]["used"]["totalTokens"] == 5
    await service.stop()
    assert api.obj["status"]["used"]["totalTokens"] == 0  # the reset was written


async def test_unknown_budget_names_cost_a_bounded_number_of_gets_and_no_lasting_state(monkeypatch):
    """50 reports of 64 names that do not exist cost 3,200 GETs in series (66 s) and grew two dicts
    by an entry per name for good. Now: at most MAX_LOOKUPS_PER_REPORT GETs a report, in parallel,
    a name found missing is not asked again within the TTL, and the negative cache is bounded."""
    api = FakeApi(monkeypatch, delay=0)
    gets: list[str] = []

    def get(namespace, name):
        gets.append(name)
        time.sleep(0.02)  # an apiserver round trip
        return copy.deepcopy(api.obj) if name == "monthly" else None

    monkeypatch.setattr(svc, "_get_budget", get)
    service = svc.LedgerService(svc.LedgerConfig(port=0))
    service._unknown = svc.ExpiringMap(svc.UNKNOWN_TTL, 100)
    start = current_start()

    def body(seq, names):
        return parse_report({"proxyId": "p1", "namespace": "team-a", "seq": seq, "budgets": {
            n: {"periodStart": start, "used": {}, "want": {"outputTokens": 10}} for n in names}})

    names = [f"ghost-{i}" for i in range(63)] + ["monthly"]
    began = time.monotonic()
    answers = [await service.apply(body(seq, names)) for seq in range(1, 51)]
    assert len(gets) == 64, "each name asked once"
    assert answers[0]["budgets"]["ghost-0"] == {"error": "unknown budget"}
    assert answers[0]["budgets"]["monthly"] == svc.NOT_LOADED  # past the per-report lookups: next time
    assert "ceiling" in answers[-1]["budgets"]["monthly"]        # the real budget is served
    assert time.monotonic() - began < 10  # 4 rounds of 16 parallel GETs, not 64 in series
    gets.clear()
    for seq in range(51, 101):  # fresh names in every report: the GETs are capped, the state bounded
        await service.apply(body(seq, [f"new-{seq}-{i}" for i in range(64)]))
    assert len(gets) == 50 * svc.MAX_LOOKUPS_PER_REPORT
    assert len(service._unknown) <= 100 and not service._loading
    await service.stop()


async def test_a_flood_of_unknown_tokens_neither_starves_known_callers_nor_is_reviewed_twice(monkeypatch):
    """Refusals were not cached and reviews ran on the threads that persist grants: 1,500 connections
    of garbage tokens made legitimate grants take 5-10 s (some 503). Now a refused token is not
    reviewed again within the negative TTL, reviews have their own bounded pool (more unknown tokens
    than MAX_PENDING_REVIEWS at once: 503 at once), and a cached token's grant does not wait on it."""
    import aiohttp

    FakeApi(monkeypatch, delay=0)
    reviewer = svc.TokenReviewer(max_pending=16)
    reviews, running, peak = [], [0], [0]

    def review_sync(token):
        reviews.append(token)
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        try:
            time.sleep(0.3)  # a slow apiserver
            return ("team-a", "proxy") if token == "good-token" else None
        finally:
            running[0] -= 1

    monkeypatch.setattr(reviewer, "_review_sync", review_sync)
    service = svc.LedgerService(svc.LedgerConfig(port=0))
    service.reviewer = reviewer
    client = await _client(service)
    start = current_start()

    def body(proxy):
        return {"proxyId": proxy, "namespace": "team-a", "seq": 1, "budgets": {"monthly": {
            "periodStart": start, "used": {}, "want": {"outputTokens": 100}}}}

    url = str(client.make_url("/v1/report"))
    try:
        async with aiohttp.ClientSession() as legit:
            async def grant(i):
                began = time.monotonic()
                async with legit.post(url, json=body(f"good-{i}"), headers={"Authorization": "Bearer good-token"}) as r:
                    assert r.status == 200 and "ceiling" in (await r.json())["budgets"]["monthly"]
                return time.monotonic() - began

            await grant(0)  # the token is now known good
            statuses = []

            async def garbage(i):
                async with client.post("/v1/report", json=body("x"), headers={"Authorization": f"Bearer junk-{i}"}) as r:
                    statuses.append(r.status)

            flood = asyncio.gather(*(garbage(i) for i in range(200)))
            await asyncio.sleep(0.1)
            took = [await grant(i) for i in range(1, 6)]
            await flood
        assert max(took) < 2.0, took
        assert set(statuses) <= {401, 503} and 401 in statuses
        assert peak[0] <= svc.REVIEW_WORKERS and len(reviewer._pending) == 0
        reviews.clear()
        for _ in range(20):  # one refused token, again and again: one review
            resp = await client.post("/v1/report", json=body("x"), headers={"Authorization": "Bearer junk-again"})
            assert resp.status == 401
        assert reviews == ["junk-again"]
        assert all("junk" not in k for k in reviewer._refused._items)  # hashes only
    finally:
        await client.close()
        await service.stop()


# -- the ledger's own HTTP server, bounded against callers that are not proxies -------------------------

async def _served(monkeypatch, **config) -> tuple[svc.LedgerService, int, list[str]]:
    """The real service on its ledger_http server on 127.0.0.1 (apiserver faked, no cut-off loop)."""
    FakeApi(monkeypatch, delay=0)
    reviews: list[str] = []
    service = svc.LedgerService(svc.LedgerConfig(port=0, addr="127.0.0.1", **config))

    def review_sync(token):
        reviews.append(token)
        time.sleep(0.05)
        return ("team-a", "proxy") if token == "good-token" else None

    monkeypatch.setattr(service.reviewer, "_review_sync", review_sync)

    async def no_cutoff():
        return None

    monkeypatch.setattr(service.cutoff, "start", no_cutoff)
    await service.start()
    return service, service.port, reviews


async def _exchange(port: int, data: bytes, wait: float = 3.0) -> bytes:
    """Send `data`, read until the server closes (or `wait` passes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    out = b""
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), wait)
            if not chunk:
                break
            out += chunk
    except (TimeoutError, ConnectionError):
        pass
    writer.close()
    return out


def _head(path: str, length: int, auth: str | None, method: str = "POST") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: x", f"Content-Length: {length}"]
    lines += [f"Authorization: {auth}"] if auth is not None else []
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _report(start: str, pad: int = 0) -> bytes:
    import json
    return json.dumps({"proxyId": "p1", "namespace": "team-a", "seq": 1, "pad": "x" * pad, "budgets": {
        "monthly": {"periodStart": start, "used": {}, "want": {"outputTokens": 10}}}}).encode()


async def test_a_large_body_is_read_only_for_a_token_known_good_or_reviewed_first(monkeypatch):
    """Bodies up to 1 MiB were read (and 32 requests queued) before the token was looked at. Now the
    head alone is answered 401 without a token, with one of the wrong syntax, or one refused before;
    an unknown token's large body waits for its review; a public path takes only a small body."""
    service, port, reviews = await _served(monkeypatch)
    big = 1 << 20
    try:
        for auth in (None, "Basic abc", "Bearer ", "Bearer a b", "Bearer " + "x" * 9000):
            out = await _exchange(port, _head("/v1/report", big, auth))  # the head only: no body is sent
            assert out.startswith(b"HTTP/1.1 401 ") and b"Connection: close" in out, (auth, out[:80])
        assert reviews == []
        out = await _exchange(port, _head("/v1/report", big, "Bearer junk"))  # reviewed before its body
        assert out.startswith(b"HTTP/1.1 401 ") and reviews == ["junk"]
        out = await _exchange(port, _head("/v1/report", big, "Bearer junk") * 32)  # refused before: no review
        assert out.count(b"HTTP/1.1 401 ") == 1 and reviews == ["junk"]
        out = await _exchange(port, _head("/healthz", 100_000, None, "GET"))
        assert out.startswith(b"HTTP/1.1 413 ")
        body = _report(current_start(), pad=100_000)  # a big report of a token not known yet: served after its review
        out = await _exchange(port, _head("/v1/report", len(body), "Bearer good-token") + body, wait=1.0)
        assert out.startswith(b"HTTP/1.1 200 ") and b'"ceiling"' in out, out[:200]
        assert reviews == ["junk", "good-token"]
    finally:
        await service.stop()


async def test_connections_are_bounded_and_a_silent_one_holds_its_slot_only_briefly(monkeypatch):
    """No connection limit: 30 connections of queued 1 MiB bodies took the operator from 186 to 602 MB.
    Now at most max_connections; one more is answered 503 and closed at once, and a connection that
    sends nothing is closed at request_timeout, so proxies get their slots back."""
    service, port, _ = await _served(monkeypatch, max_connections=20, request_timeout=1.0)
    try:
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
        await asyncio.sleep(0.1)
        began = time.monotonic()
        out = await _exchange(port, b"")
        assert out.startswith(b"HTTP/1.1 503 ") and b"too many connections" in out and time.monotonic() - began < 1.0
        assert len(service._server.connections) == 20 and service._server.refused == 1
        for reader, _ in silent:  # closed with a 408 at the deadline (the sweep runs every 0.5 s)
            assert (await asyncio.wait_for(reader.read(), 4.0)).startswith(b"HTTP/1.1 408 ")
        for _, writer in silent:
            writer.close()
        body = _report(current_start())
        out = await _exchange(port, _head("/v1/report", len(body), "Bearer good-token") + body, wait=1.0)
        assert out.startswith(b"HTTP/1.1 200 ")
    finally:
        await service.stop()


async def test_pipelined_requests_read_ahead_are_bounded(monkeypatch):
    """32 pipelined requests (of up to 1 MiB each) were read ahead per connection; now MAX_QUEUED and
    at most max_body bytes of bodies, and all are still answered in order."""
    from spendwarden.controller import ledger_http
    service, port, _ = await _served(monkeypatch)
    seen: list[int] = []
    handler = service.handle_healthz

    async def healthz(request):
        seen.append(max(len(c.queue) for c in service._server.connections))
        await asyncio.sleep(0.01)
        return await handler(request)

    service._server.routes["/healthz"]["GET"] = healthz
    try:
        out = await _exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 40, wait=1.0)
        assert out.count(b"HTTP/1.1 200 ") == 40
        assert max(seen) <= ledger_http.MAX_QUEUED < 32
    finally:
        await service.stop()


async def test_gateway_mode_trust_the_gateway_reports_for_its_tenants_and_their_own_tokens_are_refused(monkeypatch):
    """Issue #13: the gateway's ServiceAccount may report and wake for gateway-mode namespaces; a tenant's
    own token may not while its egress is enforced (403 gateway_mode), and may while it is open."""
    from spendwarden.render.gateway import EGRESS_LABEL, MODE_LABEL, GatewaySettings

    FakeApi(monkeypatch)
    tokens = {"gateway": ("spendwarden-gw", "spendwarden-gateway"), "tenant-a": ("team-a", "app"),
              "tenant-c": ("team-c", "app"), "tenant-b": ("team-b", "app")}
    labels = {"team-a": {MODE_LABEL: "gateway"}, "team-b": {},
              "team-c": {MODE_LABEL: "gateway", EGRESS_LABEL: "open"}}
    reviewer = svc.TokenReviewer(ttl=60)
    monkeypatch.setattr(reviewer, "_review_sync", tokens.get)
    service = svc.LedgerService(svc.LedgerConfig(port=0), gateway=GatewaySettings(namespace="spendwarden-gw"),
                                namespace_labels=labels.get)
    service.reviewer = reviewer
    client = await _client(service)

    async def post(token, namespace, path="/v1/report"):
        body = ({"proxyId": "p", "namespace": namespace, "seq": 1, "budgets": {}} if path == "/v1/report"
                else {"namespace": namespace, "route": "r", "backend": "b"})
        resp = await client.post(path, json=body, headers={"Authorization": f"Bearer {token}"})
        return resp.status, (await resp.json()).get("error", "")

    try:
        assert (await post("gateway", "team-a"))[0] == 200
        assert (await post("gateway", "team-c"))[0] == 200
        status, error = await post("gateway", "team-b")
        assert status == 403 and "sidecar mode" in error
        status, error = await post("tenant-a", "team-a")
        assert status == 403 and "gateway mode" in error and EGRESS_LABEL in error
        assert (await post("tenant-c", "team-c"))[0] == 200   # migrating: its sidecars still report
        assert (await post("tenant-b", "team-b"))[0] == 200   # sidecar mode as before
        assert (await post("tenant-b", "team-a"))[0] == 403
        # Wake-ups follow the same rules (no scaler here: 404 once allowed).
        assert (await post("gateway", "team-a", "/v1/wake"))[0] == 404
        assert (await post("tenant-a", "team-a", "/v1/wake"))[0] == 403
        assert svc.REJECTED.labels(reason="gateway_mode")._value.get() >= 2
        # A namespace the watch has not delivered yet: its mode is unknown, so nobody is trusted for it yet.
        assert (await post("gateway", "team-new"))[0] == 503
        assert (await post("tenant-b", "team-new"))[0] == 503
    finally:
        await client.close()
        await service.stop()
