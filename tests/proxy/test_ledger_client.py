"""The proxy's ledger client against the real lease core (BudgetLedger behind LedgerStub), in-process:
a fake transport, a fake clock for lease expiry, the real BudgetBook."""
from __future__ import annotations

import asyncio
import copy
import logging
import random
from decimal import Decimal

import pytest

from spendwarden.ledger.allowance import Amount
from spendwarden.ledger.leases import LeaseSettings
from spendwarden.ledger.pricing import TokenUsage
from spendwarden.proxy.budgets import BudgetBook, LeaseShort
from spendwarden.proxy.config import compile_config, parse_config_text
from spendwarden.proxy.errors import ProxyError
from spendwarden.proxy.ledger_client import LedgerClient
from spendwarden.proxy.ledger_http import HttpTransport
from spendwarden.proxy.metrics import Metrics
from tests.support.clock import Clock

from .ledger_stub import LedgerServer, LedgerStub


def config(total=10000):
    text = f"""
kind: ModelRoute
metadata: {{name: a}}
spec:
  model: a
  defaultBackend: m
  backends:
  - {{name: m, provider: OpenAI, url: "http://x/v1", model: m, pricing: {{input: "1", output: "2"}}}}
---
kind: ModelRoute
metadata: {{name: b}}
spec:
  model: b
  defaultBackend: m
  backends:
  - {{name: m, provider: OpenAI, url: "http://x/v1", model: m, pricing: {{input: "1", output: "2"}}}}
---
kind: TokenBudget
metadata: {{name: closed}}
spec: {{window: 24h, failMode: Closed, routes: [a], limits: {{tokens: {{total: {total}}}}}}}
---
kind: TokenBudget
metadata: {{name: open}}
spec: {{window: 24h, failMode: Open, routes: [b], limits: {{tokens: {{total: {total}}}}}}}
"""
    cfg, _ = parse_config_text(text)
    return compile_config(cfg)



class FakeTransport:
    """Answers with the stub unless told to fail; records every body sent and the local limits at that moment."""

    def __init__(self, stub: LedgerStub, book: BudgetBook):
        self.stub, self.book = stub, book
        self.sent: list[dict] = []
        self.limits_at_send: list[dict] = []
        self.fail = 0        # fail the next n calls
        self.down = False
        self.status: int | None = None

    async def __call__(self, body):
        self.sent.append(copy.deepcopy(body))
        self.limits_at_send.append({n: st.allowance.limits for n, st in self.book.states.items()})
        await asyncio.sleep(0)
        if self.fail:
            self.fail -= 1
            raise ConnectionError("ledger down")
        if self.down:
            raise ConnectionRefusedError("ledger down")
        if self.status is not None:
            return self.status, None
        return 200, self.stub.answer(copy.deepcopy(body))


def make(stub: LedgerStub, clock: Clock, c=None, **kw):
    c = c or config()
    book = BudgetBook(clock=clock)
    t = FakeTransport(stub, book)
    client = LedgerClient(book, "http://ledger", "team-a", Metrics(), transport=t, clock=clock,
                          interval=kw.pop("interval", 0.05), **kw)
    book.sync(c.budgets)
    client.start()
    return book, client, t, c


async def admit(book, client, route, inp=100, out=500):
    """What server.py does: admit, and when the lease is short wait once for the ledger."""
    m = route.default
    try:
        return book.admit(route, m, inp, out, 1, route.downgrade, may_wait=True)
    except LeaseShort as short:
        await client.wait_for_lease(short)
        return book.admit(route, m, inp, out, 1, route.downgrade)


async def until(cond, timeout=3.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.01)


def specs(c):
    return {n: b.spec for n, b in c.budgets.items()}


async def test_a_request_waits_for_its_lease_and_the_ledger_gets_the_usage():
    clock = Clock()
    c = config()
    stub = LedgerStub(specs(c), clock=clock)
    book, client, t, _ = make(stub, clock, c)
    try:
        adm = await admit(book, client, c.routes["a"])  # no lease yet: asks for one with `want`
        assert adm.max_output == 500
        first_want = next(b["budgets"]["closed"]["want"] for b in t.sent if "want" in b["budgets"]["closed"])
        assert first_want == {"inputTokens": 100, "outputTokens": 500, "cost": str(Amount.worst_case(
            c.routes["a"].default.prices, 100, 500).cost)}
        book.settle(adm, c.routes["a"].default.prices, TokenUsage(90, 400))
        await until(lambda: stub.used("closed") == Amount(90, 400, stub.used("closed").cost))
        seqs = [b["seq"] for b in t.sent]
        assert seqs == sorted(set(seqs))  # strictly increasing
        assert all(set(b["budgets"]) == {"closed", "open"} for b in t.sent)  # all budgets in each report
        assert book.states["closed"].allowance.limits.total_tokens == stub.ledgers["closed"].proxies[
            client.proxy_id].ceiling.total
    finally:
        await client.close()


async def test_three_proxies_share_one_budget_without_exceeding_it():
    clock = Clock()
    c = config(total=6000)
    stub = LedgerStub(specs(c), clock=clock)
    proxies = [make(stub, clock, c) for _ in range(3)]
    rng = random.Random(7)
    served = refused = 0
    peak_violation = []

    async def one(book, client):
        nonlocal served, refused
        route = c.routes["a"]
        try:
            adm = await admit(book, client, route, inp=50, out=rng.randint(50, 300))
        except ProxyError as exc:
            assert exc.status == 429
            refused += 1
            return
        # Whatever happens, all proxies together never commit more than the budget.
        total = sum(b.states["closed"].allowance.used.total_tokens + b.states["closed"].allowance.reserved.total_tokens
                    for b, *_ in proxies)
        if total > 6000:
            peak_violation.append(total)
        await asyncio.sleep(rng.random() * 0.05)
        out = adm.max_output
        book.settle(adm, route.default.prices, TokenUsage(50, rng.randint(out // 2, out)))
        served += 1

    try:
        await asyncio.gather(*(one(b, cl) for _ in range(40) for b, cl, *_ in proxies))
        assert not peak_violation
        used = sum(b.states["closed"].allowance.used.total_tokens for b, *_ in proxies)
        assert used <= 6000 and served > 10 and refused > 0
        assert used > 6000 * 0.5  # leases do not strand most of the budget
        await until(lambda: stub.used("closed").total_tokens == used)
        assert not stub.ledgers["closed"].check_invariant()
    finally:
        for _, cl, *_ in proxies:
            await cl.close()


async def test_a_retry_resends_the_same_body():
    clock = Clock()
    c = config()
    stub = LedgerStub(specs(c), clock=clock)
    book, client, t, _ = make(stub, clock, c)
    try:
        await until(lambda: client.answered_seq >= 1)
        t.fail = 2
        n = len(t.sent)
        await until(lambda: client.answered_seq > 1)
        retried = t.sent[n:n + 3]
        assert retried[0] == retried[1] == retried[2]
        assert client.metrics.ledger_report_failures.labels("unreachable")._value.get() == 2
    finally:
        await client.close()


async def test_idle_proxy_releases_after_lowering_its_own_ceiling_first():
    clock = Clock()
    c = config()
    stub = LedgerStub(specs(c), clock=clock)
    book, client, t, _ = make(stub, clock, c, idle_release=5.0)
    try:
        route = c.routes["a"]
        adm = await admit(book, client, route, inp=100, out=2000)
        book.settle(adm, route.default.prices, TokenUsage(100, 100))
        assert book.states["closed"].allowance.limits.total_tokens >= 2100
        clock.t += 6
        await until(lambda: any(b["budgets"]["closed"].get("releaseTo") for b in t.sent))
        i = next(i for i, b in enumerate(t.sent) if b["budgets"]["closed"].get("releaseTo"))
        assert t.sent[i]["budgets"]["closed"]["releaseTo"] == {"total": 200}
        assert t.limits_at_send[i]["closed"].total_tokens == 200  # lowered before the report left
        # once per idle spell, not every second
        await asyncio.sleep(0.3)
        assert sum(1 for b in t.sent if b["budgets"]["closed"].get("releaseTo")) == 1
    finally:
        await client.close()


async def test_cut_off_applies_at_once_and_is_lifted():
    clock = Clock()
    c = config()
    stub = LedgerStub(specs(c), clock=clock)
    book, client, t, _ = make(stub, clock, c)
    try:
        route = c.routes["a"]
        book.release(await admit(book, client, route))
        stub.cut_off.add("closed")
        await until(lambda: book.states["closed"].lease.cut_off)
        with pytest.raises(ProxyError) as e:
            await admit(book, client, route, out=10)
        assert e.value.status == 429 and e.value.code == "budget_exceeded"
        assert 1 <= int(e.value.headers["Retry-After"]) <= 86400
        stub.cut_off.clear()
        await until(lambda: not book.states["closed"].lease.cut_off)
        book.release(await admit(book, client, route, out=10))
    finally:
        await client.close()


async def test_unreachable_ledger_lease_then_fail_modes_then_reconciled():
    clock = Clock()
    c = config(total=10000)
    stub = LedgerStub(specs(c), settings=LeaseSettings(ttl=10, grace=20), clock=clock)
    book, client, t, _ = make(stub, clock, c)
    a, b = c.routes["a"], c.routes["b"]
    try:
        for route in (a, b):
            book.settle(await admit(book, client, route, 100, 200), route.default.prices, TokenUsage(100, 200))
        t.down = True
        await until(lambda: book.states["closed"].lease.down)
        # The current lease is still spent while it is valid...
        book.settle(await admit(book, client, a, 10, 10), a.default.prices, TokenUsage(10, 10))
        clock.t += 8.5  # ...and not once expiresAt minus the 2 s margin has passed
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(ProxyError) as e:
            await admit(book, client, a, 10, 10)
        assert loop.time() - t0 < 0.5  # no waiting on a ledger known to be down
        assert e.value.status == 503 and "closed" in e.value.message and "unreachable" in e.value.message
        # Open: the whole budget on local accounting, far beyond the lease
        for _ in range(10):
            book.settle(await admit(book, client, b, 100, 800), b.default.prices, TokenUsage(100, 800))
        assert book.states["open"].allowance.used.total_tokens == 300 + 9000
        adm = await admit(book, client, b, 100, 800)  # ...clamped to what the budget has left
        assert adm.max_output == 600
        book.settle(adm, b.default.prices, TokenUsage(100, 600))
        with pytest.raises(ProxyError) as e:  # ...and never beyond it
            await admit(book, client, b, 100, 800)
        assert e.value.status == 429
        client.gauges("team-a")
        assert client.metrics.ledger_fail_mode.labels("team-a", "open")._value.get() == 1
        # The ledger is back (after presuming this proxy dead): cumulative usage is reported and reconciled.
        clock.t += 30
        t.down = False
        await until(lambda: not book.states["open"].lease.down and not book.states["open"].lease.local)
        await until(lambda: stub.used("open").total_tokens == 10000 and stub.used("closed").total_tokens == 320)
        book.release(await admit(book, client, a, 10, 10))  # Closed serves again
    finally:
        await client.close()


async def test_refused_token_counts_and_means_unreachable(caplog):
    clock = Clock()
    c = config()
    stub = LedgerStub(specs(c), clock=clock)
    book, client, t, _ = make(stub, clock, c)
    t.status = 401
    try:
        await until(lambda: book.states["closed"].lease.down)
        with pytest.raises(ProxyError) as e:
            await admit(book, client, c.routes["a"])
        assert e.value.status == 503
        assert client.metrics.ledger_report_failures.labels("unauthorized")._value.get() >= 1
        assert "refused this proxy's token with HTTP 401" in caplog.text
    finally:
        await client.close()


async def test_unknown_budget_fails_over_to_its_fail_mode():
    clock = Clock()
    c = config()
    stub = LedgerStub({"closed": c.budgets["closed"].spec}, clock=clock)  # the operator is a second behind
    book, client, t, _ = make(stub, clock, c)
    try:
        await until(lambda: book.states["open"].lease.down)
        adm = await admit(book, client, c.routes["b"])  # Open: local accounting
        assert book.states["open"].lease.local
        book.release(adm)
        book.release(await admit(book, client, c.routes["a"]))  # the known one has a lease
    finally:
        await client.close()


async def test_http_transport_reads_the_token_on_every_call(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    c = config()
    stub = LedgerStub(specs(c))
    token = tmp_path / "token"
    monkeypatch.setenv("SPENDWARDEN_LEDGER_TOKEN_FILE", str(token))
    with LedgerServer(stub) as server:
        tr = HttpTransport(server.url)
        body = {"proxyId": "p", "namespace": "team-a", "seq": 1, "budgets": {}}
        token.write_text("first-secret\n")
        assert (await tr(body))[0] == 200
        token.write_text("rotated-secret")
        assert (await tr({**body, "seq": 2}))[0] == 200
        token.unlink()
        assert (await tr({**body, "seq": 3}))[0] == 200
        server.status = 403
        assert (await tr({**body, "seq": 4}))[0] == 403
        await tr.close()
    assert server.auth == ["Bearer first-secret", "Bearer rotated-secret", None, None]
    assert "secret" not in caplog.text.replace("SPENDWARDEN", "")


def test_standalone_book_has_no_leases():
    c = config()
    book = BudgetBook(clock=Clock())
    book.sync(c.budgets)
    assert all(st.lease is None for st in book.states.values())
    route = c.routes["a"]
    adm = book.admit(route, route.default, 100, 500, 1, route.downgrade, may_wait=True)
    assert adm.max_output == 500 and book.states["closed"].allowance.limits.total_tokens == 10000
    assert Decimal(0) == book.states["closed"].allowance.used.cost


async def test_a_new_period_reports_the_old_one_and_starts_without_a_lease():
    clock = Clock(1_800_000_000.0 - 1_800_000_000.0 % 86400 + 86400 - 30)  # 30 s before a 24h window ends
    c = config()
    stub = LedgerStub(specs(c), clock=clock)
    book, client, t, _ = make(stub, clock, c, interval=5.0)  # no regular reports during the test
    route = c.routes["a"]
    try:
        old_start = _iso_of(book.states["closed"].period_start)
        book.settle(await admit(book, client, route, 100, 200), route.default.prices, TokenUsage(100, 200))
        # settled after the last report: only the report for the finished period carries it
        clock.t += 31
        book.settle(await admit(book, client, route, 10, 20), route.default.prices, TokenUsage(10, 20))
        assert stub.used("closed", old_start).total_tokens == 300
        assert stub.used("closed").total_tokens == 0  # the new period's usage is in the next report
        await until(lambda: stub.used("closed").total_tokens == 30)
        assert book.states["closed"].allowance.used.total_tokens == 30
    finally:
        await client.close()


def _iso_of(dt):
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


async def test_ledger_url_added_and_removed_by_a_reload(tmp_path):
    import json

    from spendwarden.proxy.server import Proxy

    doc = {"namespace": "team-a", "routes": [{"name": "a", "spec": {
        "model": "a", "defaultBackend": "m", "backends": [{"name": "m", "provider": "OpenAI", "url": "http://x/v1",
                                                            "model": "m", "pricing": {"input": "1", "output": "2"}}]}}],
        "budgets": [{"name": "b", "spec": {"window": "24h", "limits": {"tokens": {"total": 1000}}}}]}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(doc))
    proxy = Proxy(str(path), state_file=str(tmp_path / "state.json"))
    assert proxy.ledger is None and proxy.book.states["b"].lease is None
    path.write_text(json.dumps({**doc, "ledger": {"url": "http://127.0.0.1:9"}}))
    assert proxy.load()
    assert proxy.ledger is not None and proxy.book.ledger
    st = proxy.book.states["b"]
    assert st.lease is not None and st.allowance.limits.total_tokens == 0  # nothing before a grant
    path.write_text(json.dumps(doc))
    assert proxy.load()
    assert proxy.ledger is None and not proxy.book.ledger
    assert st.lease is None and st.allowance.limits.total_tokens == 1000
    for task in proxy._tasks:
        await task


async def test_loop_detections_ride_on_the_next_report_and_a_refusing_operator_only_loses_them(caplog):
    clock = Clock()
    c = config()
    stub = LedgerStub(specs(c), clock=clock)
    book, client, t, _ = make(stub, clock, c)
    try:
        await until(lambda: client.answered_seq >= 1)
        assert all("loops" not in b for b in t.sent)  # nothing detected: the field is absent
        for _ in range(3):
            client.loops.add("a", "a", "0123456789abcdef" * 4, 3, 60.0)
        await until(lambda: any("loops" in b for b in t.sent))
        [carrier] = [b for b in t.sent if "loops" in b]
        assert carrier["loops"] == [{"route": "a", "model": "a", "request": "0123456789ab", "refused": 3,
                                     "maxRepeats": 3, "windowSeconds": 60.0, "pod": client.loops.pod}]
        # An operator that answers 400 to the field: the same report again without it, budgets go on.
        async def strict(body):
            t.sent.append(copy.deepcopy(body))
            return (400, None) if "loops" in body else (200, stub.answer(copy.deepcopy(body)))

        client.transport = strict
        client.loops.add("a", "a", "f" * 64, 3, 60.0)
        n = len(t.sent)

        def refused_seq():
            return next((b["seq"] for b in t.sent[n:] if "loops" in b), None)

        with caplog.at_level(logging.WARNING, "spendwarden.proxy.ledger"):
            await until(lambda: refused_seq() is not None and client.answered_seq >= refused_seq())
        sent = t.sent[n:]
        i = next(i for i, b in enumerate(sent) if "loops" in b)
        assert sent[i + 1]["seq"] == sent[i]["seq"] and "loops" not in sent[i + 1]
        assert client.answered_seq >= sent[i]["seq"] and not any(st.lease.down for st in book.states.values())
        assert "refused a report with loop detections" in caplog.text
    finally:
        await client.close()


async def test_a_short_request_gives_back_the_free_lease_and_says_what_it_needs():
    clock = Clock()
    c = config()
    stub = LedgerStub(specs(c), clock=clock)
    book, client, t, _ = make(stub, clock, c)
    try:
        route = c.routes["a"]
        adm = await admit(book, client, route, inp=100, out=2000)
        book.settle(adm, route.default.prices, TokenUsage(100, 100))
        ceiling = book.states["closed"].allowance.limits.total_tokens
        sent = len(t.sent)
        # A request bigger than what is free here: the report asks with want and need, and gives
        # back the free part (lowered locally before the report leaves).
        book.release(await admit(book, client, route, inp=100, out=ceiling))
        i = next(i for i in range(sent, len(t.sent)) if "want" in t.sent[i]["budgets"]["closed"])
        entry = t.sent[i]["budgets"]["closed"]
        assert entry["need"]["outputTokens"] == 16 and entry["want"]["outputTokens"] == ceiling
        assert entry["releaseTo"] == {"total": 200} and t.limits_at_send[i]["closed"].total_tokens == 200
    finally:
        await client.close()


async def test_a_huge_prompt_that_cannot_fit_leaves_the_budget_open_for_the_small_requests():
    """Every report carries the smallest request admitted this period (its least reservation): a
    huge prompt that what is left cannot hold is refused as "retry shortly", the ledger does not
    find the budget spent, and the team's small requests are still served. A new period starts
    without it."""
    clock = Clock()
    c = config()
    stub = LedgerStub(specs(c), clock=clock)
    book, client, t, _ = make(stub, clock, c)
    route = c.routes["a"]
    small = Amount.worst_case(route.default.prices, 100, 16)
    try:
        for _ in range(4):  # 8,000 of the 10,000 tokens
            book.settle(await admit(book, client, route, inp=100, out=1900), route.default.prices,
                        TokenUsage(100, 1900))
        await until(lambda: stub.used("closed").total_tokens == 8000)
        assert t.sent[-1]["budgets"]["closed"]["smallestAdmitted"] == {
            "inputTokens": 100, "outputTokens": 16, "cost": str(small.cost)}
        assert "smallestAdmitted" not in t.sent[-1]["budgets"]["open"]  # nothing admitted there
        with pytest.raises(ProxyError) as refused:
            await admit(book, client, route, inp=5000, out=100)  # needs 5,016; 2,000 are left
        assert refused.value.status == 429 and "retry shortly" in refused.value.message
        ledger = stub.ledgers["closed"]
        assert client.proxy_id in ledger.unmet and not ledger.exhausted()
        book.settle(await admit(book, client, route, inp=100, out=500), route.default.prices, TokenUsage(100, 500))
        assert not book.states["closed"].lease.exceeded and not ledger.exhausted()

        clock.t += 86400  # the next period: the smallest admitted request belongs to the old one
        book.roll()
        assert book.states["closed"].lease.admitted.value(clock()) is None
        n = len(t.sent)
        await until(lambda: any(b["budgets"]["closed"]["periodStart"] == _iso_of(book.states["closed"].period_start)
                                for b in t.sent[n:]))
        assert all("smallestAdmitted" not in b["budgets"]["closed"] for b in t.sent[n:])
    finally:
        await client.close()


async def test_the_operator_can_ask_for_faster_reports():
    clock = Clock()
    c = config()
    stub = LedgerStub(specs(c), clock=clock)
    answer, hint = stub.answer, {}

    def hinting(body):
        out = answer(body)
        out["budgets"]["closed"].update(hint)
        return out

    stub.answer = hinting
    book, client, t, _ = make(stub, clock, c, interval=0.3)
    try:
        await until(lambda: client.reports >= 1)
        hint["reportInterval"] = 0.05  # e.g. the budget's last percent
        await until(lambda: client.hinted_interval == 0.05, timeout=1)
        n = len(t.sent)
        await asyncio.sleep(0.3)
        assert len(t.sent) - n >= 3  # about every 0.05 s instead of every 0.3 s
        hint.clear()
        await until(lambda: client.hinted_interval is None, timeout=1)
    finally:
        await client.close()
