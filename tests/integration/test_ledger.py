"""The ledger service end to end: a real operator process, the real apiserver (TokenReview, status
persistence, Events) and simulated proxies that speak docs/ledger-protocol.md over HTTP and enforce
their ceilings with ledger.allowance.Allowance exactly as the proxy does."""
from __future__ import annotations

import asyncio
import random
import time
import uuid

import httpx
import pytest
from kubernetes import client

from spendwarden.ledger.allowance import Amount
from spendwarden.ledger.leases import Ceiling
from tests.support.ledger_cluster import (
    LIMIT,
    Operator,
    SimProxy,
    create_budget,
    create_minute_budget,
    get_budget,
    sa_token,
)
from tests.support.operator_process import wait_for


@pytest.fixture(scope="module")
def operator(control_plane, tmp_path_factory):
    op = Operator(control_plane, tmp_path_factory.mktemp("ledger"))
    op.start()
    yield op
    op.stop()
















async def _run_proxies(operator: Operator, proxies: list[SimProxy], during=None) -> None:
    stop = asyncio.Event()
    runs = [asyncio.create_task(p.run(stop, seed=i)) for i, p in enumerate(proxies)]
    if during is not None:
        await during()
    done, pending = await asyncio.wait(runs, timeout=120)
    stop.set()
    await asyncio.gather(*runs, *(p.reporting for p in proxies if p.reporting is not None))
    for p in proxies:  # idle: release what is not committed, and report the final numbers
        assert await p.report(release=True)


def _assert_exact(kube, ns: str, proxies: list[SimProxy]) -> dict:
    total = sum(p.used for p in proxies)
    obj = wait_for(lambda: (lambda o: o if o["status"].get("used", {}).get("totalTokens") == total else None)(
        get_budget(kube, ns)), timeout=15, what=f"status.used.totalTokens == {total}")
    used = obj["status"]["used"]
    assert used["inputTokens"] == sum(p.allowance.used.input_tokens for p in proxies)
    assert used["outputTokens"] == sum(p.allowance.used.output_tokens for p in proxies)
    assert total <= LIMIT
    # No headroom was ever granted twice: the ceilings proxies were told never add up past the limit.
    assert sum(p.max_ceiling for p in proxies) <= LIMIT, [p.max_ceiling for p in proxies]
    return obj


async def test_three_proxies_share_a_budget_exactly(operator, kube, lg_namespace):
    ns = lg_namespace
    start = create_budget(kube, ns)["status"]["periodStart"]
    token = sa_token(kube, ns)
    async with httpx.AsyncClient() as http:
        proxies = [SimProxy(http, operator.url, token, ns, start) for _ in range(3)]
        await _run_proxies(operator, proxies)
    obj = _assert_exact(kube, ns, proxies)
    assert sum(p.used for p in proxies) > LIMIT * 0.8, [p.used for p in proxies]  # the budget really was used up
    status = obj["status"]
    assert set(status["ledger"]["proxies"]) == {p.id for p in proxies}
    assert status["percentUsed"] == sum(p.used for p in proxies) * 100 // LIMIT
    assert status["state"] in ("Warning", "Exceeded") and status["limitSummary"] == "100k tokens"


async def test_replayed_seq_changes_nothing(operator, kube, lg_namespace):
    ns = lg_namespace
    start = create_budget(kube, ns)["status"]["periodStart"]
    async with httpx.AsyncClient() as http:
        p = SimProxy(http, operator.url, sa_token(kube, ns), ns, start)
        p.allowance.used = Amount(1000, 500)
        assert await p.report(want=Amount(0, 2000))
        body = p.body()  # the same seq again, with different (bogus) numbers
        body["budgets"]["monthly"]["used"] = {"inputTokens": 50_000, "outputTokens": 0, "cost": "0"}
        first = wait_for(lambda: (lambda o: o if o["status"].get("used", {}).get("totalTokens") == 1500 else None)(
            get_budget(kube, ns)), what="the first report persisted")
        resp = await p.post(body)
        assert resp.status_code == 200 and resp.json()["seq"] == p.seq
        assert Ceiling.from_state(resp.json()["budgets"]["monthly"]["ceiling"]).total == p.max_ceiling
    await asyncio.sleep(4.0)  # two flush intervals: a late flush must not let a wrong write pass unseen
    again = get_budget(kube, ns)
    assert again["status"]["used"] == first["status"]["used"]
    assert again["status"]["ledger"]["proxies"][p.id]["seq"] == p.seq


async def test_unauthenticated_and_foreign_reports_are_refused(operator, kube, lg_namespace):
    ns = lg_namespace
    start = create_budget(kube, ns)["status"]["periodStart"]
    other = f"lg-other-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(kube).create_namespace({"metadata": {"name": other}})
    try:
        foreign = sa_token(kube, other)
        before = {r: operator.metric("spendwarden_ledger_rejected_total", reason=r)
                  for r in ("missing_token", "invalid_token", "forbidden_namespace")}
        body = {"proxyId": "x", "namespace": ns, "seq": 1, "budgets": {"monthly": {
            "periodStart": start, "used": {"inputTokens": 5000, "outputTokens": 0, "cost": "0"}}}}
        async with httpx.AsyncClient() as http:
            url = f"{operator.url}/v1/report"
            assert (await http.post(url, json=body)).status_code == 401
            assert (await http.post(url, json=body, headers={"Authorization": "Bearer garbage.token.x"})).status_code == 401
            resp = await http.post(url, json=body, headers={"Authorization": f"Bearer {foreign}"})
            assert resp.status_code == 403 and other in resp.json()["error"]
            # The same token is fine for its own namespace (an unknown budget there is per-budget).
            ok = await http.post(url, json={**body, "namespace": other}, headers={"Authorization": f"Bearer {foreign}"})
            assert ok.status_code == 200 and ok.json()["budgets"]["monthly"]["error"] == "unknown budget"
            bad = await http.post(url, json={**body, "seq": "x"}, headers={"Authorization": f"Bearer {foreign}"})
            assert bad.status_code == 400 and "seq" in bad.json()["error"]
        after = {r: operator.metric("spendwarden_ledger_rejected_total", reason=r) for r in before}
        assert after["missing_token"] == before["missing_token"] + 1
        assert after["invalid_token"] == before["invalid_token"] + 1
        assert after["forbidden_namespace"] == before["forbidden_namespace"] + 1
        assert operator.metric("spendwarden_ledger_reports_total") >= 1
        status = get_budget(kube, ns).get("status") or {}
        assert not status.get("ledger") and (status.get("used") or {}).get("totalTokens", 0) == 0
    finally:
        client.CoreV1Api(kube).delete_namespace(other)


async def test_sigkill_and_restart_lose_nothing_and_grant_nothing_twice(control_plane, kube, own_namespace, tmp_path):
    op = Operator(control_plane, tmp_path, pattern="lk-*")  # its own process: this test kills it
    op.start()
    try:
        ns = own_namespace
        start = create_budget(kube, ns)["status"]["periodStart"]
        token = sa_token(kube, ns)

        async def kill_and_restart() -> None:
            # Mid-run: once the proxies have spent a tenth of the budget on their leases. (A fixed
            # 1.5 s was too short under load: the first grant alone took longer, nothing was spent.)
            deadline = time.monotonic() + 60
            while sum(p.used for p in proxies) < LIMIT * 0.1:
                assert time.monotonic() < deadline, "the proxies did not spend a tenth of the budget in 60 s"
                await asyncio.sleep(0.02)
            used_at_kill.append(sum(p.used for p in proxies))
            await asyncio.to_thread(op.kill)
            await asyncio.sleep(1.0)  # proxies keep going on their leases meanwhile
            await asyncio.to_thread(op.start)

        async with httpx.AsyncClient() as http:
            used_at_kill: list[int] = []
            proxies = [SimProxy(http, op.url, token, ns, start, latency=(0.05, 0.15)) for _ in range(3)]
            await _run_proxies(op, proxies, during=kill_and_restart)
        assert op.runs == 2 and any(p.errors for p in proxies)  # the outage was seen
        assert 0 < used_at_kill[0] < LIMIT * 0.8  # killed mid-run
        obj = _assert_exact(kube, ns, proxies)
        assert sum(p.used for p in proxies) > LIMIT * 0.8
        # Nobody was presumed dead, not even for a while, also when the restart took longer than
        # lease + grace: a proxy that returns is reconciled (retired back to 0) but stays excluded
        # from the breakdown for the period.
        ledger = obj["status"]["ledger"]
        assert ledger["retired"]["inputTokens"] == 0 and not ledger["tombstones"]
        assert not (ledger.get("breakdown") or {}).get("excluded"), ledger["breakdown"]
    finally:
        op.stop()


async def test_graceful_shutdown_persists_what_was_not_written_yet(control_plane, kube, own_namespace, tmp_path):
    # A long flush interval: only grants are written at once; the rest waits for the shutdown flush.
    op = Operator(control_plane, tmp_path, env={"SPENDWARDEN_LEDGER_FLUSH_INTERVAL": "600"}, pattern="lk-*")
    op.start()
    try:
        ns = own_namespace
        start = create_budget(kube, ns)["status"]["periodStart"]
        async with httpx.AsyncClient() as http:
            p = SimProxy(http, op.url, sa_token(kube, ns), ns, start)
            assert await p.report(want=Amount(0, 50_000))  # a grant: persisted before the answer
            granted = p.max_ceiling
            wait_for(lambda: get_budget(kube, ns)["status"].get("ledger"), what="the grant persisted")
            await asyncio.sleep(1.5)  # a slow burn rate: the lease's free part covers the next seconds
            p.allowance.used = Amount(700, 300)
            assert await p.report()  # fits the lease: no grant, answered at once
            assert p.max_ceiling == granted
            status = get_budget(kube, ns)["status"]
            assert status["used"]["totalTokens"] == 0  # not written yet
        await asyncio.to_thread(op.stop)  # SIGTERM: kopf's cleanup runs the shutdown flush
        status = get_budget(kube, ns)["status"]
        assert status["used"]["totalTokens"] == 1000
        assert status["ledger"]["proxies"][p.id]["seq"] == p.seq
    finally:
        op.stop()


async def test_status_state_and_threshold_event(operator, kube, lg_namespace):
    ns = lg_namespace
    start = create_budget(kube, ns)["status"]["periodStart"]
    async with httpx.AsyncClient() as http:
        p = SimProxy(http, operator.url, sa_token(kube, ns), ns, start)
        p.allowance.used = Amount(40_000, 20_000)
        assert await p.report()
    # The conditions are a second write after the usage fields: wait for both.
    obj = wait_for(lambda: (lambda o: o if o["status"].get("state") == "Warning" and any(
        c["type"] == "ForecastExhausted" for c in o["status"].get("conditions") or []) else None)(get_budget(kube, ns)),
                   what="state Warning and the ForecastExhausted condition")
    status = obj["status"]
    assert status["used"] == {"inputTokens": 40_000, "outputTokens": 20_000, "totalTokens": 60_000, "cost": "0"}
    assert status["percentUsed"] == 60 and status["remaining"] == {"tokens": 40_000}
    assert status["usedSummary"] == "60k tokens"
    conds = {c["type"]: c["status"] for c in status["conditions"]}
    # The reconcile's Ready survived the ledger's writes (ForecastExhausted depends on the day of the month).
    assert {"Ready": "True", "Exceeded": "False"}.items() <= conds.items() and "ForecastExhausted" in conds
    events = wait_for(lambda: [e for e in client.CoreV1Api(kube).list_namespaced_event(ns).items
                               if e.reason == "ThresholdCrossed" and e.involved_object.name == "monthly"],
                      what="ThresholdCrossed Event")
    assert len(events) == 1 and "50%" in events[0].message
    assert operator.metric("spendwarden_budget_percent_used", namespace=ns, budget="monthly") == 60
    assert operator.metric("spendwarden_budget_state", namespace=ns, budget="monthly", state="Warning") == 1
    assert operator.metric("spendwarden_budget_state", namespace=ns, budget="monthly", state="Active") == 0
    assert operator.metric("spendwarden_namespace_cut_off", namespace=ns) == 0


PROXY_CONFIG = """
kind: ModelRoute
metadata: {name: a}
spec:
  model: a
  defaultBackend: m
  backends:
  - {name: m, provider: OpenAI, url: "http://x/v1", model: m, pricing: {input: "1", output: "2"}}
---
kind: TokenBudget
metadata: {name: closed}
spec: {window: 24h, failMode: Closed, routes: [a], limits: {tokens: {total: 20000}}}
"""


async def test_the_proxys_own_ledger_client_against_the_operator(operator, kube, lg_namespace, tmp_path, monkeypatch):
    """Interop: proxy/ledger_client.py (HttpTransport, projected-token file) with the real BudgetBook."""
    from spendwarden.ledger.pricing import TokenUsage
    from spendwarden.proxy.budgets import BudgetBook, LeaseShort
    from spendwarden.proxy.config import compile_config, parse_config_text
    from spendwarden.proxy.errors import ProxyError
    from spendwarden.proxy.ledger_client import LedgerClient

    ns = lg_namespace
    create_budget(kube, ns, "closed", {"window": "24h", "failMode": "Closed", "routes": ["a"],
                                       "limits": {"tokens": {"total": 20000}}})
    token_file = tmp_path / "token"
    token_file.write_text(sa_token(kube, ns))
    monkeypatch.setenv("SPENDWARDEN_LEDGER_TOKEN_FILE", str(token_file))
    cfg, _ = parse_config_text(PROXY_CONFIG)
    c = compile_config(cfg)
    route = c.routes["a"]
    proxies = []
    for _ in range(2):
        book = BudgetBook()
        client_ = LedgerClient(book, operator.url, ns, interval=0.3)
        book.sync(c.budgets)
        client_.start()
        proxies.append((book, client_))
    rng = random.Random(3)
    served = refused = 0

    async def one(book, client_) -> None:
        nonlocal served, refused
        try:
            try:
                adm = book.admit(route, route.default, 100, rng.randint(100, 600), 1, route.downgrade, may_wait=True)
            except LeaseShort as short:
                await client_.wait_for_lease(short)
                adm = book.admit(route, route.default, 100, rng.randint(100, 600), 1, route.downgrade)
        except ProxyError as exc:
            assert exc.status in (429, 503)
            refused += 1
            return
        await asyncio.sleep(rng.uniform(0.005, 0.03))
        book.settle(adm, route.default.prices, TokenUsage(100, rng.randint(1, adm.max_output)))
        served += 1

    try:
        for _ in range(6):
            await asyncio.gather(*(one(b, cl) for _ in range(15) for b, cl in proxies))
    finally:
        for _, cl in proxies:
            await cl.close()  # the final report gives back what is not used
    used = sum(b.states["closed"].allowance.used.total_tokens for b, _ in proxies)
    assert served > 10 and refused > 0 and 0 < used <= 20000
    wait_for(lambda: get_budget(kube, ns, "closed")["status"].get("used", {}).get("totalTokens") == used,
             timeout=15, what=f"status.used.totalTokens == {used}")


async def test_period_rollover_keeps_history_and_late_reports(operator, kube, lg_namespace):
    """A 1-minute rolling window: at the reset the ledger starts a new period by itself (no report
    needed), the old totals go to status.history, and a late report still counts in the old period."""
    ns = lg_namespace
    if time.time() % 60 > 45:  # too close to a boundary to see the first period's usage
        await asyncio.sleep(61 - time.time() % 60)
    obj = create_minute_budget(kube, ns, "minute", {"window": "1m", "limits": {"tokens": {"total": 10_000}},
                                                    "thresholds": [50]}, need=15)
    first = obj["status"]["periodStart"]
    async with httpx.AsyncClient() as http:
        p = SimProxy(http, operator.url, sa_token(kube, ns), ns, first, budget="minute")
        p.allowance.used = Amount(4000, 2000)
        assert await p.report()
        wait_for(lambda: get_budget(kube, ns, "minute")["status"].get("state") == "Warning", what="Warning")
        deadline = time.monotonic() + 75
        while True:  # a live proxy: it keeps reporting (a silent one would be charged its escrow)
            status = get_budget(kube, ns, "minute")["status"]
            if status["ledger"]["periodStart"] != first or time.monotonic() > deadline:
                break
            assert await p.report()
            await asyncio.sleep(1)
        assert status["used"]["totalTokens"] == 0 and status["state"] == "Active" and status["percentUsed"] == 0
        assert status["history"][0]["periodStart"] == first and status["history"][0]["used"]["totalTokens"] == 6000
        assert status["ledger"]["previous"]["periodStart"] == first
        # The proxy's last numbers for the old period arrive late: they count there.
        p.allowance.used = Amount(4500, 2000)
        seq_before = p.seq
        resp = await p.post({**p.body(), "seq": seq_before + 1})
        assert resp.status_code == 200
        assert resp.json()["budgets"]["minute"]["periodStart"] == status["ledger"]["periodStart"]
    status = wait_for(lambda: (lambda s: s if s["history"][0]["used"]["totalTokens"] == 6500 else None)(
        get_budget(kube, ns, "minute")["status"]), what="the late report in history")
    assert status["used"]["totalTokens"] == 0
