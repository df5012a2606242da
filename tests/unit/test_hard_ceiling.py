"""onExceeded Downgrade with downgrade.hardCeiling: validation, the ledger's second lease ledger, and
the proxy's admission (downgrade past the limit, refusal at the ceiling) without a ledger."""
from __future__ import annotations

import asyncio
import copy
import random
from datetime import UTC, datetime

import pytest

from spendwarden.api.tokenbudget import TokenBudgetSpec
from spendwarden.controller.cutoff import budget_cut
from spendwarden.ledger.pricing import TokenUsage
from spendwarden.ledger.store import LedgerStore, parse_report
from spendwarden.proxy.budgets import BudgetBook, LeaseShort
from spendwarden.proxy.errors import ProxyError
from spendwarden.proxy.ledger_client import LedgerClient
from tests.support.clock import Clock
from tests.support.ledger_store import NOW, TS, body, budget, send

from .test_proxy_budgets import config

DOWNGRADE = {"period": {"type": "Monthly"}, "limits": {"tokens": {"total": 1000}}, "thresholds": [50], "onExceeded": "Downgrade",
             "downgrade": {"hardCeiling": {"tokens": 1500}}}


@pytest.mark.parametrize("change, message", [
    ({"downgrade": {"hardCeiling": {"tokens": 999}}}, r"hardCeiling.tokens \(999\) is below limits.tokens.total \(1000\)"),
    ({"limits": {"cost": {"amount": "5.00"}}, "downgrade": {"hardCeiling": {"cost": "4.99"}}},
     r"hardCeiling.cost \(4.99\) is below limits.cost.amount \(5.00\)"),
    ({"onExceeded": "CutOff"}, "applies only with onExceeded: Downgrade, not CutOff"),
    ({"downgrade": {"hardCeiling": {}}}, "needs tokens or cost"),
])
def test_hard_ceiling_validation_names_the_problem(change, message):
    with pytest.raises(ValueError, match=message):
        TokenBudgetSpec.model_validate({**DOWNGRADE, **change})


def test_ledger_grants_past_the_limit_only_up_to_the_hard_ceiling_then_cuts_off():
    store = LedgerStore()
    entry = store.load(budget(DOWNGRADE), NOW)
    a, _ = send(store, entry, body(1, want=(0, 400)))
    assert a["ceiling"]["total"] >= 400 and a["hardCeiling"]["total"] >= 400 and a["cutOff"] is False
    b, _ = send(store, entry, body(1, proxy="p2", want=(0, 400)))
    # The limit: the two soft ceilings never add up past 1000; the hard ones never past 1500.
    assert a["ceiling"]["total"] + b["ceiling"]["total"] <= 1000
    a, _ = send(store, entry, body(2, used=(0, a["ceiling"]["total"]), want=(0, 600)))
    b, _ = send(store, entry, body(2, used=(0, b["ceiling"]["total"]), proxy="p2", want=(0, 600)))
    assert not budget_cut(entry).cut  # past the limit, short of the hard ceiling: downgraded, not cut off
    assert b["state"] == "Warning" and b["ceiling"]["total"] + a["ceiling"]["total"] <= 1000
    assert a["hardCeiling"]["total"] + b["hardCeiling"]["total"] <= 1500
    assert entry.current.hard.check_invariant() == []
    # Spent to the ceiling (downgraded requests): cutOff tells every proxy to refuse.
    a, _ = send(store, entry, body(3, used=(0, a["hardCeiling"]["total"])))
    b, _ = send(store, entry, body(3, used=(0, b["hardCeiling"]["total"]), proxy="p2"))
    assert entry.current.ledger.used().total_tokens == 1500 and b["cutOff"] is True and b["state"] == "Exceeded"
    assert budget_cut(entry).cut  # ... and the namespace is cut off, as for onExceeded CutOff
    # Restart: the hard ledger comes back with every grant.
    again = LedgerStore().load(budget(DOWNGRADE, **copy.deepcopy(store.status(entry, NOW))), NOW)
    assert again.current.hard.committed("total") == entry.current.hard.committed("total") == 1500


def test_a_hard_ceiling_added_mid_period_starts_from_what_was_committed():
    store = LedgerStore()
    spec = {**DOWNGRADE}
    spec.pop("downgrade")
    entry = store.load(budget(spec), NOW)
    send(store, entry, body(1, used=(0, 900), want=(0, 50)))
    assert entry.current.hard is None
    store.observe(budget(DOWNGRADE), NOW)
    hard = entry.current.hard
    assert hard is not None and hard.used().total_tokens == 900 and hard.committed("total") == 900
    a, _ = send(store, entry, body(2, used=(0, 950), want=(0, 1000)), ts=TS + 1)
    assert a["hardCeiling"]["total"] <= 1500


# -- the proxy -----------------------------------------------------------------------------------------

def proxy_config(hard: int | None = 1500, limit: int = 1000):
    """Route chat: big (default, dear) and small (cheap); budget b: Downgrade, with a hard ceiling."""
    return config("Downgrade", limits=f"{{tokens: {{total: {limit}}}}}",
                  extra=f"downgrade: {{hardCeiling: {{tokens: {hard}}}}}" if hard else "")


def test_standalone_downgrades_past_the_limit_then_clamps_and_refuses_at_the_ceiling():

    c = proxy_config(hard=1400)
    book = BudgetBook(clock=Clock())
    book.sync(c.budgets)
    route = c.routes["chat"]
    seen = []
    for _ in range(5):
        adm = book.admit(route, route.backends["big"], 100, 200, 1, route.downgrade)
        seen.append((adm.backend.name, adm.max_output))
        book.settle(adm, adm.backend.prices, TokenUsage(100, adm.max_output))
    # 300 tokens a request: three on the big backend (900 of the 1000 limit), then the cheap one,
    # the last clamped to what the 1400-token ceiling leaves (1400 - 1200 - 100 prompt).
    assert seen == [("big", 200), ("big", 200), ("big", 200), ("small", 200), ("small", 100)]
    with pytest.raises(ProxyError) as e:
        book.admit(route, route.backends["big"], 100, 200, 1, route.downgrade)
    assert e.value.status == 429 and "hard ceiling" in e.value.message
    assert book.states["b"].allowance.used.total_tokens == 1400


def test_without_a_ceiling_downgrade_keeps_serving_on_the_cheap_backend():

    c = proxy_config(hard=None)
    book = BudgetBook(clock=Clock())
    book.sync(c.budgets)
    route = c.routes["chat"]
    for _ in range(10):
        adm = book.admit(route, route.backends["big"], 100, 200, 1, route.downgrade)
        book.settle(adm, adm.backend.prices, TokenUsage(100, 200))
    assert adm.backend.name == "small" and book.states["b"].allowance.used.total_tokens == 3000


async def test_three_proxies_on_the_real_ledger_store_never_pass_the_hard_ceiling():
    """Ledger mode, exactness: proxies (BudgetBook + LedgerClient) spend a Downgrade budget through the
    operator's real LedgerStore; the cheap backend takes over past the limit, the ceiling is kept."""


    clock = Clock()
    c = proxy_config(hard=6000, limit=4000)
    store = LedgerStore()
    now = datetime.fromtimestamp(clock(), UTC)
    entry = store.load({"metadata": {"name": "b", "namespace": "team-a"},
                        "spec": c.budgets["b"].spec.model_dump(mode="json", exclude_none=True)}, now)

    async def transport(body):
        await asyncio.sleep(0)
        rep = parse_report(body)
        answers = {n: store.report(entry, rep.proxy_id, rep.seq, r, clock(), now)[0] for n, r in rep.budgets.items()}
        return 200, {"seq": rep.seq, "budgets": answers}

    proxies = []
    for _ in range(3):
        book = BudgetBook(clock=clock)
        client = LedgerClient(book, "http://ledger", "team-a", transport=transport, clock=clock, interval=0.02)
        book.sync(c.budgets)
        client.start()
        proxies.append((book, client))
    route = c.routes["chat"]
    rng = random.Random(5)
    backends: list[str] = []
    refused: list[str] = []
    over: list[int] = []

    async def one(book, client):
        out = rng.randint(50, 200)
        try:
            try:
                adm = book.admit(route, route.default, 50, out, 1, route.downgrade, may_wait=True)
            except LeaseShort as short:
                await client.wait_for_lease(short)
                adm = book.admit(route, route.default, 50, out, 1, route.downgrade)
        except ProxyError as exc:
            assert exc.status == 429
            refused.append(exc.message)
            return
        backends.append(adm.backend.name)
        committed = sum(b.states["b"].allowance.used.total_tokens + b.states["b"].allowance.reserved.total_tokens
                        for b, _ in proxies)
        if committed > 6000:
            over.append(committed)
        await asyncio.sleep(rng.random() * 0.01)
        book.settle(adm, adm.backend.prices, TokenUsage(50, rng.randint(adm.max_output // 2, adm.max_output)))

    try:
        for _ in range(6):
            await asyncio.gather(*(one(b, cl) for _ in range(10) for b, cl in proxies))
    finally:
        for _, cl in proxies:
            await cl.close()
    used = sum(b.states["b"].allowance.used.total_tokens for b, _ in proxies)
    assert not over and 4000 < used <= 6000
    assert "big" in backends and "small" in backends and backends.index("small") < len(backends) - 1
    assert refused  # at the ceiling ("retry shortly" while other proxies still hold some of it)
    assert entry.current.ledger.used().total_tokens == used  # the final reports carried everything
    assert entry.current.hard.check_invariant() == []
