"""Where the money went: the bounded (route, backend, tag) breakdown on both sides of the ledger.

Proxy side: settlements feed it and reports carry it; operator side: per-proxy cumulative rows,
retired proxies, status and history; the metric of costs per tag stays bounded."""
from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from spendwarden.ledger.allowance import Amount
from spendwarden.ledger.breakdown import MAX_ROWS, OTHER, OTHER_KEY, Breakdown, PeriodBreakdown, merged, tag_of
from spendwarden.ledger.store import LedgerStore, ReportError, parse_report
from tests.support.ledger_store import END, NOW, START, TS, body, budget, send


def rows(b: Breakdown) -> dict:
    """Rows by (route, backend, tag); every row here is a sidecar's (no workload), OTHER's excepted."""
    assert all(k[3] == ("" if k[0] != OTHER else OTHER) for k in b.rows)
    return {k[:3]: (r.input_tokens, r.output_tokens, str(r.cost), r.requests) for k, r in b.rows.items()}


def wire(*items):
    return [{"route": r, "backend": b, **({"tag": t} if t else {}), "inputTokens": i, "outputTokens": o, "cost": c,
             "requests": n} for r, b, t, i, o, c, n in items]


# -- the pure breakdown ---------------------------------------------------------------------------------

def test_rows_add_up_and_overflow_into_one_other_row():
    b = Breakdown(max_rows=4)
    b.add("chat", "mini", "ticket", Amount(10, 5, Decimal("0.01")))
    b.add("chat", "mini", "ticket", Amount(1, 1, Decimal("0.001")))
    b.add("chat", "big", None, Amount(100, 50, Decimal("1")))
    b.add("chat", "mini", "t1", Amount(1, 0, Decimal("0")))
    b.add("chat", "mini", "t2", Amount(2, 0, Decimal("0.5")))  # over the cap
    b.add("chat", "mini", "t3", Amount(3, 0, Decimal("0.5")))
    assert rows(b) == {("chat", "mini", "ticket"): (11, 6, "0.011", 2), ("chat", "big", ""): (100, 50, "1", 1),
                       ("chat", "mini", "t1"): (1, 0, "0", 1), (OTHER, OTHER, OTHER): (5, 0, "1.0", 2)}
    assert b.total() == Amount(117, 56, Decimal("2.011"))


def test_capped_keeps_the_most_expensive_rows_and_sums_the_rest():
    b = Breakdown(max_rows=100)
    for i in range(10):
        b.add("r", "b", f"t{i}", Amount(i, 0, Decimal(i)))
    capped = b.capped(4)
    assert set(capped.rows) == {("r", "b", "t9", ""), ("r", "b", "t8", ""), ("r", "b", "t7", ""), OTHER_KEY}
    assert capped.rows[OTHER_KEY].cost == sum(range(7)) and capped.total() == b.total()
    assert b.capped(20) == b
    assert merged([b, b], 4).total() == b.total() + b.total()


def test_wire_round_trip_and_validation_names_the_field():
    b = Breakdown()
    b.add("chat", "mini", "ticket", Amount(10, 5, Decimal("0.0125")))
    b.add("chat", "big", "", Amount(1, 1, Decimal("3")))
    out = b.to_wire()
    assert out[0]["backend"] == "big" and out[1] == {"route": "chat", "backend": "mini", "tag": "ticket", "inputTokens": 10,
                                                     "outputTokens": 5, "cost": "0.0125", "requests": 1}
    assert Breakdown.from_wire(out) == b
    # Tiny costs are written as plain decimals (the CRD's Money pattern refuses "3.6E-7" or "0E-7").
    tiny = Breakdown()
    tiny.add("r", "b", "", Amount(1, 0, Decimal("3.6E-7")))
    tiny.add("r", "b", "z", Amount(1, 0, Decimal("0E-7")))
    assert [r["cost"] for r in tiny.to_wire()] == ["0.00000036", "0"]
    for bad, field in [({}, "must be a list"), ([1], r"\[0\]: must be an object"),
                       (wire(("r", "b", "t", -1, 0, "0", 1)), r"\[0\].inputTokens"),
                       (wire(("r", "b", "t", 0, 0, "x", 1)), r"\[0\].cost"),
                       (wire(("r", 5, "t", 0, 0, "0", 1)), r"\[0\].backend"),
                       (wire(*[("r", "b", str(i), 0, 0, "0", 1) for i in range(MAX_ROWS + 1)]), "at most")]:
        with pytest.raises(ValueError, match=field):
            Breakdown.from_wire(bad)


def test_tag_is_the_scenario_tag():
    assert tag_of({"scenario": "ticket", "team": "x"}) == "ticket"
    assert tag_of({"team": "x"}) == "" and tag_of(None) == ""


def test_period_breakdown_keeps_cumulative_rows_per_proxy_and_folds_retired_ones():
    pb = PeriodBreakdown()
    one = Breakdown.from_wire(wire(("chat", "mini", "a", 10, 0, "1", 1)))
    pb.report("p1", one)
    pb.report("p1", one)  # cumulative: the same numbers again change nothing
    pb.report("p2", Breakdown.from_wire(wire(("chat", "mini", "a", 5, 0, "0.5", 1))))
    pb.report("p3", None)  # an old proxy: no breakdown
    assert rows(pb.merged()) == {("chat", "mini", "a"): (15, 0, "1.5", 2)}
    pb.retire(["p1", "p3"])
    assert set(pb.proxies) == {"p2"} and rows(pb.retired) == {("chat", "mini", "a"): (10, 0, "1", 1)}
    # p1 was presumed dead but reports again: its cumulative rows would count twice, so they are ignored.
    pb.report("p1", Breakdown.from_wire(wire(("chat", "mini", "a", 20, 0, "2", 2))))
    assert rows(pb.merged()) == {("chat", "mini", "a"): (15, 0, "1.5", 2)}
    again = PeriodBreakdown.from_state(copy.deepcopy(pb.to_state()))
    assert rows(again.merged()) == rows(pb.merged()) and again.excluded == ["p1"]
    assert not PeriodBreakdown.from_state({"proxies": {"x": "junk"}})  # damaged state: empty, never an error


# -- the operator's store -------------------------------------------------------------------------------

def with_rows(b, *items):
    b["budgets"]["monthly"]["breakdown"] = wire(*items)
    return b


def test_reports_carry_the_breakdown_into_status_and_replays_do_not_count_twice():
    store = LedgerStore()
    entry = store.load(budget(), NOW)
    send(store, entry, with_rows(body(1, used=(100, 50)), ("chat", "mini", "ticket", 100, 50, "0", 3)))
    send(store, entry, with_rows(body(1, used=(10, 0), proxy="p2"), ("chat", "mini", "ticket", 10, 0, "0", 1)))
    send(store, entry, with_rows(body(1, used=(999, 0), proxy="p2"), ("chat", "mini", "ticket", 999, 0, "0", 9)))  # replay
    send(store, entry, body(1, used=(7, 0), proxy="old"))  # a proxy without breakdown support
    status = store.status(entry, NOW)
    assert status["breakdown"] == wire(("chat", "mini", "ticket", 110, 50, "0", 4))
    assert status["used"]["totalTokens"] == 167  # the old proxy's 7 are unattributed, not lost
    restarted = LedgerStore().load(budget(**copy.deepcopy(status)), NOW + timedelta(seconds=1))
    assert store.status(restarted, NOW)["breakdown"] == status["breakdown"]


def test_a_malformed_breakdown_is_a_400_naming_the_field():
    with pytest.raises(ReportError, match=r"budgets.monthly.breakdown\[0\].cost"):
        parse_report(with_rows(body(1), ("chat", "mini", "t", 1, 1, "-1", 1)))


def test_finished_periods_keep_their_breakdown_in_history_and_late_reports_land_there():
    store = LedgerStore()
    entry = store.load(budget(), NOW)
    send(store, entry, with_rows(body(1, used=(100, 0)), ("chat", "mini", "a", 100, 0, "0", 1)))
    december = datetime(2026, 12, 1, 0, 0, 5, tzinfo=UTC)
    store.tick(december.timestamp(), december)
    assert entry.history[0]["breakdown"] == wire(("chat", "mini", "a", 100, 0, "0", 1))
    send(store, entry, with_rows(body(2, used=(150, 0)), ("chat", "mini", "a", 150, 0, "0", 2)),
         ts=december.timestamp(), now=december)
    assert entry.history[0]["periodStart"] == START and entry.history[0]["periodEnd"] == END
    assert entry.history[0]["breakdown"] == wire(("chat", "mini", "a", 150, 0, "0", 2))
    assert store.status(entry, december)["breakdown"] == []


def test_dead_proxies_rows_are_retired_and_stay_counted():
    store = LedgerStore()
    entry = store.load(budget(), NOW)
    send(store, entry, with_rows(body(1, used=(100, 0)), ("chat", "mini", "a", 100, 0, "0", 1)))
    store.tick(TS + 120, NOW + timedelta(seconds=120))
    assert "p1" not in entry.current.ledger.proxies
    assert store.status(entry, NOW)["breakdown"] == wire(("chat", "mini", "a", 100, 0, "0", 1))
    assert entry.current.usage.retired.total() == Amount(100, 0)


# -- the proxy side --------------------------------------------------------------------------------------

def test_settlements_feed_the_breakdown_and_reports_carry_it():
    from spendwarden.ledger.pricing import TokenUsage
    from spendwarden.proxy.budgets import BudgetBook
    from spendwarden.proxy.config import compile_config, parse_config_text
    from spendwarden.proxy.ledger_client import LedgerClient

    text = """
apiVersion: spendwarden.io/v1alpha1
kind: ModelRoute
metadata: {name: chat}
spec:
  model: chat
  backends:
    - {name: mini, provider: OpenAI, url: "http://x/v1", model: m, pricing: {input: "1", output: "2"}}
  defaultBackend: mini
---
apiVersion: spendwarden.io/v1alpha1
kind: TokenBudget
metadata: {name: monthly}
spec: {period: {type: Monthly}, limits: {tokens: {total: 100000}}, onExceeded: AlertOnly}
"""
    clock = [TS]
    compiled = compile_config(parse_config_text(text, "team-a")[0])
    book = BudgetBook(clock=lambda: clock[0])
    book.sync(compiled.budgets)
    route = compiled.routes["chat"]
    adm = book.admit(route, route.default, 10, 100, 1, None)
    adm.tag = "ticket"
    book.settle(adm, route.default.prices, TokenUsage(10, 20))
    adm = book.admit(route, route.default, 10, 100, 1, None)
    book.settle(adm, route.default.prices, None)  # usage unknown: the reservation is charged, and shown
    st = book.states["monthly"]
    assert rows(st.breakdown) == {("chat", "mini", "ticket"): (10, 20, "0.00005", 1),
                                  ("chat", "mini", ""): (10, 100, "0.00021", 1)}
    assert st.breakdown.total() == st.allowance.used

    book.ledger = True
    client = LedgerClient(book, "http://ledger", "team-a", clock=lambda: clock[0])
    book.sync(compiled.budgets)
    report = client.build()
    assert report["budgets"]["monthly"]["breakdown"] == st.breakdown.to_wire()
    parsed = parse_report(report).budgets["monthly"].breakdown
    assert parsed == st.breakdown


def test_tagged_cost_metric_is_bounded():
    from spendwarden.proxy.metrics import MAX_TAG_KEYS, MAX_TAG_VALUES, Metrics
    m = Metrics()
    for i in range(MAX_TAG_VALUES + 20):
        m.tagged("ns", {"scenario": f"s{i}"}, "USD", 1.0)
    for i in range(MAX_TAG_KEYS + 5):
        m.tagged("ns", {f"k{i}": "v"}, "USD", 1.0)
    scenario = {k: v for k, v in m.tagged_cost.items() if k[1] == "scenario"}
    assert len(scenario) == MAX_TAG_VALUES + 1 and scenario[("ns", "scenario", OTHER, "USD")] == 20.0
    assert len({k[1] for k in m.tagged_cost}) == MAX_TAG_KEYS + 1
    assert sum(m.tagged_cost.values()) == MAX_TAG_VALUES + 20 + MAX_TAG_KEYS + 5
    assert 'spendwarden_tagged_cost_total{currency="USD",namespace="ns",tag="scenario",value="s0"} 1.0' \
        in m.render().decode()


def test_the_gateway_s_workload_is_a_row_of_its_own_and_survives_the_wire():
    b = Breakdown()
    b.add("chat", "mini", None, Amount(10, 5, Decimal("0.01")), workload="ingest")
    b.add("chat", "mini", None, Amount(1, 1, Decimal("0.001")), workload="web")
    b.add("chat", "mini", None, Amount(2, 2, Decimal("0.002")))
    out = b.to_wire()
    assert [r.get("workload") for r in out] == ["ingest", None, "web"]
    assert Breakdown.from_wire(out) == b
