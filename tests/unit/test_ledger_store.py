"""The operator's ledger store: protocol semantics, rollover, and the status persistence mapping."""
from __future__ import annotations

import copy
import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from spendwarden.api.validation import validate_spec
from spendwarden.ledger.allowance import Amount
from spendwarden.ledger.store import (
    LedgerStore,
    ReportError,
    parse_report,
    replace_patch,
)
from spendwarden.render.status import (
    LEDGER_FIELDS,
    reconcile_fields,
    status_differs,
    tokenbudget_status,
)
from tests.support.ledger_store import END, NOW, SPEC, START, TS, body, budget, send


def test_parse_report_rejects_malformed_bodies_with_the_field_named():
    for bad, field in [([], "body"), ({"budgets": {}}, "proxyId"), (body(-1), "seq"), (body(True), "seq"),
                       ({**body(1), "budgets": {"m": {"used": {}}}}, "periodStart"),
                       ({**body(1), "budgets": {"m": {"periodStart": START, "used": {"inputTokens": "5"}}}}, "inputTokens"),
                       ({**body(1), "budgets": {"m": {"periodStart": START, "used": {"cost": "abc"}}}}, "cost"),
                       ({**body(1), "budgets": {"m": {"periodStart": START, "used": {}, "releaseTo": {"x": 1}}}}, "releaseTo"),
                       (body(1, smallestAdmitted=[1]), r"budgets\.monthly\.smallestAdmitted: must be an object"),
                       (body(1, smallestAdmitted={"inputTokens": -1}), r"smallestAdmitted\.inputTokens: must be a non-negative"),
                       (body(1, smallestAdmitted={"cost": "1e400x"}), r"smallestAdmitted\.cost"),
                       (body(1, smallestAdmitted={"tokens": 5}), r"smallestAdmitted: unknown field")]:
        with pytest.raises(ReportError, match=field):
            parse_report(bad)
    rep = parse_report(body(3, used=(10, 5), want=(0, 100), releaseTo={"total": 40}))
    assert rep.seq == 3 and rep.budgets["monthly"].used == Amount(10, 5)
    assert rep.budgets["monthly"].release_to.total == 40


@pytest.mark.parametrize("cost", ["1e999999", "1e9999999", "1" + "0" * 18, "0E-999999", "1e-41", "1" * 100,
                                  "NaN", "Infinity", "-0.5", 10**18, " 1", "1_000", "\u0661", "\uff11", "1 "])
def test_report_amounts_are_bounded(cost):
    """A cost the ledger could not store or add (decimal.Overflow, a megabyte in status): refused as a
    ReportError (400) naming the field, in every amount, ceiling and breakdown row of a report."""
    entry = body(1)["budgets"]["monthly"]
    for where, change in [("used.cost", {"used": {**entry["used"], "cost": cost}}),
                          ("releaseTo.cost", {"releaseTo": {"cost": cost}}),
                          ("breakdown[0].cost", {"breakdown": [{"route": "r", "backend": "b", "cost": cost}]})]:
        with pytest.raises(ReportError, match=re.escape(f"budgets.monthly.{where}")):
            parse_report({**body(1), "budgets": {"monthly": {**entry, **change}}})


@pytest.mark.parametrize("where", ["used.inputTokens", "want.outputTokens", "releaseTo.total", "breakdown[0].inputTokens"])
def test_report_token_counts_are_bounded_below_int64(where):
    """2**63 tokens (orjson reads integers up to 2**64 - 1) made the answer unserialisable (500), and
    sums of such counts cannot be written to status (int64): a 400 naming the field."""
    entry = body(1)["budgets"]["monthly"]
    part, _, key = where.partition(".")
    change = ({"breakdown": [{"route": "r", "backend": "b", "inputTokens": 2**63}]} if part.startswith("breakdown")
              else {part: {**(entry.get(part) or {}), key: 2**63}})
    with pytest.raises(ReportError, match=re.escape(f"budgets.monthly.{where}: must be a non-negative integer and "
                                                    "at most 1000000000000000")):
        parse_report({**body(1), "budgets": {"monthly": {**entry, **change}}})
    assert parse_report({**body(1), "budgets": {"monthly": {**entry, "used": {"inputTokens": 10**15}}}})


def test_report_amounts_as_proxies_write_them_are_accepted():
    # str(Decimal) of a proxy's cost may carry an exponent: bounded ones are fine
    for cost, value in [("1.05E-7", Decimal("1.05E-7")), ("12.5", Decimal("12.5")), (7, Decimal(7)),
                        ("9" * 18, Decimal("9" * 18)), ("1e-40", Decimal("1e-40")), ("0E+99", Decimal(0))]:
        rep = parse_report({**body(1), "budgets": {"monthly": {**body(1)["budgets"]["monthly"],
                                                                "used": {"cost": cost}}}})
        assert rep.budgets["monthly"].used.cost == value


def test_report_grants_waits_for_persistence_and_replays_change_nothing():
    store = LedgerStore()
    entry = store.load(budget(), NOW)
    answer, wait = send(store, entry, body(1, want=(0, 2000)))
    assert answer["ceiling"]["total"] >= 2000 and answer["periodStart"] == START and answer["periodEnd"] == END
    assert answer["state"] == "Active" and answer["cutOff"] is False
    assert wait == entry.version > entry.persisted  # a raised ceiling must be persisted first
    version = entry.version
    again, wait2 = send(store, entry, body(1, used=(999, 999)))  # replayed seq
    assert again["ceiling"] == answer["ceiling"] and entry.version == version
    assert entry.current.ledger.used() == Amount()
    assert wait2 == wait  # the replay's answer is the same unpersisted ceiling: it waits too
    store.persisted(entry, version)
    _, wait3 = send(store, entry, body(1))
    assert wait3 == 0


def test_unknown_period_answers_an_error_with_the_current_period():
    store = LedgerStore()
    entry = store.load(budget(), NOW)
    answer, wait = send(store, entry, body(1, start="2026-09-01T00:00:00Z"))
    assert "error" in answer and answer["periodStart"] == START and wait == 0 and "ceiling" not in answer


def test_status_mapping_round_trips_through_a_restart():
    store = LedgerStore()
    entry = store.load(budget(), NOW)
    send(store, entry, body(1, used=(30_000, 10_000), want=(0, 1000)))
    send(store, entry, body(1, used=(5_000, 5_000), proxy="p2", want=(0, 1000)))
    status = store.status(entry, NOW)
    assert status["used"] == {"inputTokens": 35_000, "outputTokens": 15_000, "totalTokens": 50_000, "cost": "0"}
    assert status["percentUsed"] == 50 and status["state"] == "Warning"
    assert status["remaining"] == {"tokens": 50_000}
    assert status["ledger"]["periodStart"] == START and set(status["ledger"]["proxies"]) == {"p1", "p2"}
    assert {c["type"]: c["status"] for c in status["conditions"]}["Exceeded"] == "False"
    assert [r for r, _ in store.events(entry)] == ["ThresholdCrossed"] and store.events(entry) == []
    committed = entry.current.ledger.committed("total")

    restarted = LedgerStore()
    again = restarted.load(budget(**copy.deepcopy(status)), NOW + timedelta(seconds=5))
    assert again.current.ledger.used() == entry.current.ledger.used()
    assert again.current.ledger.committed("total") == committed  # every ceiling granted is still counted
    assert again.current.ledger.proxies["p1"].seq == 1
    assert restarted.events(again) == []  # 50% was announced before the restart
    assert not again.dirty


def test_rollover_keeps_the_previous_period_for_late_reports_and_history():
    store = LedgerStore()
    entry = store.load(budget(), NOW)
    send(store, entry, body(1, used=(100, 50), want=(0, 1000)))
    december = datetime(2026, 12, 1, 0, 0, 5, tzinfo=UTC)
    assert store.tick(december.timestamp(), december) == [entry]
    assert entry.current.start == "2026-12-01T00:00:00Z" and entry.previous.start == START
    assert entry.history[0]["used"]["totalTokens"] == 150
    # A late report for November counts there and is answered with a December lease.
    answer, _ = send(store, entry, body(2, used=(200, 50)), ts=december.timestamp(), now=december)
    assert answer["periodStart"] == "2026-12-01T00:00:00Z" and "ceiling" in answer
    assert entry.history[0]["used"]["totalTokens"] == 250
    assert entry.current.ledger.used() == Amount()
    status = store.status(entry, december)
    assert status["ledger"]["previous"]["periodStart"] == START and status["used"]["totalTokens"] == 0
    # Restart in December: both periods come back.
    again = LedgerStore().load(budget(**copy.deepcopy(status)), december)
    assert again.previous.ledger.used() == Amount(200, 50) and again.history == status["history"]


def test_restart_after_a_reset_moves_the_stored_period_to_previous():
    store = LedgerStore()
    entry = store.load(budget(), NOW)
    send(store, entry, body(1, used=(100, 0)))
    status = store.status(entry, NOW)
    later = datetime(2026, 12, 3, tzinfo=UTC)
    again = LedgerStore().load(budget(**status), later)
    assert again.current.start == "2026-12-01T00:00:00Z" and again.previous.start == START
    assert again.history[0]["used"]["totalTokens"] == 100 and again.dirty


def test_silent_proxies_are_charged_their_escrow_and_cut_off_reported():
    store = LedgerStore()
    entry = store.load(budget({**SPEC, "limits": {"tokens": {"total": 1000}}}), NOW)
    answer, _ = send(store, entry, body(1, used=(0, 0), want=(0, 600)))
    ceiling = answer["ceiling"]["total"]
    later = TS + 60
    store.tick(later, NOW + timedelta(seconds=60))
    assert entry.current.ledger.retired.total_tokens == ceiling and "p1" not in entry.current.ledger.proxies
    answer, _ = send(store, entry, body(1, used=(1000, 0), proxy="p2", want=(0, 10)), ts=later)
    assert entry.current.ledger.check_invariant() == [] or entry.current.ledger.used().total_tokens >= 1000
    assert answer["state"] == "Exceeded" and answer["cutOff"] is True


def test_thousands_of_short_lived_proxies_keep_the_status_small():
    """3,000 proxy ids, each reporting a breakdown and then dying, made a 488 KB status patch (etcd's
    request limit is 1.5 MiB): the records of the dead are bounded, their usage still counts."""
    store = LedgerStore()
    entry = store.load(budget({**SPEC, "limits": {"tokens": {"total": 10**9}}}), NOW)
    row = {"route": "chat", "backend": "mini", "tag": "cron", "inputTokens": 10, "outputTokens": 5, "cost": "0",
           "requests": 1}
    t = TS
    for i in range(3000):
        pid = f"team-a-cron-{i:05d}-7c9f8d6b5-x2x4z"
        send(store, entry, body(1, want=(0, 100), proxy=pid), ts=t)
        send(store, entry, body(2, used=(10, 5), want=(0, 100), proxy=pid, breakdown=[row]), ts=t + 1)
        t += 40
        store.tick(t, NOW + timedelta(seconds=t - TS))
    status = store.status(entry, NOW)
    assert len(json.dumps(status)) < 128 * 1024
    assert status["used"]["inputTokens"] == 3000 * 10
    assert status["breakdown"][0]["inputTokens"] == 3000 * 10  # the rows of the dead still add up


def test_an_operator_outage_does_not_make_live_proxies_look_dead():
    """Nobody can report while no operator listens: after a restart that took longer than lease +
    grace, the restored proxies get a lease and the grace from the load before they are charged."""
    store = LedgerStore()
    entry = store.load(budget(), NOW)
    answer, _ = send(store, entry, body(1, used=(100, 0), want=(0, 5000)))
    ceiling = answer["ceiling"]["total"]
    status = store.status(entry, NOW)
    back = NOW + timedelta(seconds=60)  # the operator was down for a minute (ttl 10 s + grace 20 s)
    restarted = LedgerStore()
    again = restarted.load(budget(**copy.deepcopy(status)), back)
    ledger = again.current.ledger
    # A hard ceiling added meanwhile (its second lease ledger starts from these proxies) waits too.
    restarted.observe(budget({**SPEC, "onExceeded": "Downgrade", "downgrade": {"hardCeiling": {"tokens": 150_000}}}),
                      back + timedelta(seconds=1))
    assert again.current.hard is not None
    assert restarted.tick(back.timestamp() + 29, back + timedelta(seconds=29)) == []
    assert "p1" in ledger.proxies and ledger.retired == Amount()
    # A proxy that does not report within a lease + grace of the load is presumed dead as before.
    later = back + timedelta(seconds=31)
    assert restarted.tick(later.timestamp(), later) == [again]
    assert "p1" not in ledger.proxies and ledger.retired.total_tokens == ceiling


def test_replace_patch_removes_keys_that_disappeared():
    old = {"ledger": {"proxies": {"a": {"seq": 1}, "b": {"seq": 2}}}, "used": {"cost": "1"}}
    new = {"ledger": {"proxies": {"b": {"seq": 3}}}, "used": {"cost": "2"}}
    assert replace_patch(old, new) == {"ledger": {"proxies": {"a": None, "b": {"seq": 3}}}, "used": {"cost": "2"}}
    assert replace_patch(None, new) == new


def test_spec_change_updates_limits_and_observe_heals_stale_fields():
    store = LedgerStore()
    entry = store.load(budget(), NOW)
    send(store, entry, body(1, used=(10, 0)))
    store.persisted(entry, entry.version)
    status = store.status(entry, NOW)
    assert store.observe(budget(**status), NOW) is None  # what we wrote: nothing to do
    stale = {**status, "used": {"inputTokens": 0, "outputTokens": 0, "totalTokens": 0, "cost": "0"}}
    assert store.observe(budget(**stale), NOW) is entry and entry.dirty
    store.persisted(entry, entry.version)
    bigger = {**SPEC, "limits": {"tokens": {"total": 200_000}}}
    assert store.observe(budget(bigger, **status), NOW) is entry
    assert entry.current.ledger.limits.total_tokens == 200_000


# -- the status split between the reconcile and the ledger ------------------------------------------------

def test_reconcile_leaves_ledger_owned_fields_alone_once_a_ledger_exists():
    spec = validate_spec("TokenBudget", SPEC)[0]
    store = LedgerStore()
    entry = store.load(budget(), NOW)
    send(store, entry, body(1, used=(60_000, 0)))
    ledger_status = store.status(entry, NOW)
    obj = budget(**ledger_status)
    desired = tokenbudget_status(obj, spec, NOW, ledger_owned=True)
    assert not set(desired) & set(LEDGER_FIELDS)
    assert desired["periodStart"] == START and desired["limitSummary"] == "100k tokens"
    conds = {c["type"]: c for c in desired["conditions"]}
    assert conds["Ready"]["status"] == "True" and conds["Exceeded"] == next(
        c for c in ledger_status["conditions"] if c["type"] == "Exceeded")
    # Without a ledger the reconcile computes the same usage fields with the same function, but
    # never writes `ledger`/`history` back.
    plain = tokenbudget_status(obj, spec, NOW, ledger_owned=False)
    assert plain["percentUsed"] == ledger_status["percentUsed"] == 60 and plain["state"] == "Warning"
    assert "ledger" not in plain and "history" not in plain
    assert reconcile_fields({"ledger": 1, "used": 2, "ready": 3}, ledger_owned=True) == {"ready": 3}


def test_status_differs_only_looks_at_the_patched_fields():
    assert not status_differs({"a": 1, "ledger": {"x": 1}}, {"a": 1})
    assert status_differs({"a": 1}, {"a": 2})
    assert status_differs(None, {"a": 1})


def test_cost_limits_are_granted_and_reported_as_strings():
    spec = {"window": "24h", "limits": {"cost": {"amount": "10.00"}}}
    store = LedgerStore()
    entry = store.load(budget(spec), NOW)
    b = body(1)
    b["budgets"]["monthly"]["periodStart"] = entry.current.start
    b["budgets"]["monthly"]["used"]["cost"] = "1.50"
    b["budgets"]["monthly"]["want"] = {"cost": "0.5"}
    answer, _ = send(store, entry, b)
    assert Decimal(answer["ceiling"]["cost"]) >= Decimal("2.0") and "total" not in answer["ceiling"]
    assert store.status(entry, NOW)["used"]["cost"] == "1.50"


def test_a_ledger_written_by_another_instance_is_recognised():
    store = LedgerStore(writer="me")
    entry = store.load(budget(ledger={"periodStart": START, "writer": "old-me"}), NOW)
    assert entry.loaded_writer == "old-me"
    status = store.status(entry, NOW)
    assert status["ledger"]["writer"] == "me"
    assert not store.written_by_another(budget(ledger={"periodStart": START, "writer": "old-me"}))  # not yet rewritten
    assert not store.written_by_another(budget(**status))
    assert store.written_by_another(budget(ledger={"periodStart": START, "writer": "someone-else"}))


def test_forecast_of_a_huge_budget_barely_used_is_none_not_an_overflow():
    # 1 token of 10^12 after 21.5 days projects ~10^12 periods ahead: beyond timedelta's range.
    store = LedgerStore()
    entry = store.load(budget({**SPEC, "limits": {"tokens": {"total": 10**12}}}), NOW)
    send(store, entry, body(1, used=(1, 0)))
    assert store.status(entry, NOW)["forecastExhaustion"] is None


def test_the_last_percent_asks_for_faster_reports_and_a_spent_budget_cuts_off():
    store = LedgerStore()
    entry = store.load(budget({**SPEC, "onExceeded": "CutOff", "limits": {"tokens": {"total": 1000}}}), NOW)
    answer, _ = send(store, entry, body(1, want=(0, 1000)))
    assert "reportInterval" not in answer and answer["cutOff"] is False
    answer, _ = send(store, entry, body(2, used=(0, 960)))
    assert answer["reportInterval"] == 0.25 and answer["cutOff"] is False  # 96% used
    # Another proxy needs 50 of the 40 left: nothing waiting can ever be served, the budget is spent.
    answer, _ = send(store, entry, body(1, want=(0, 64), proxy="p2", need={"inputTokens": 0, "outputTokens": 50, "cost": "0"}))
    assert answer["cutOff"] is True and "reportInterval" not in answer
    assert store.status(entry, NOW)["ledger"]["exhaustedAt"] == TS


def test_a_cut_off_answer_does_not_wait_for_the_group_commit():
    store = LedgerStore()
    entry = store.load(budget({**SPEC, "onExceeded": "CutOff", "limits": {"tokens": {"total": 1000}}}), NOW)
    _, wait = send(store, entry, body(1, want=(0, 1000)))
    assert wait > entry.persisted  # a grant: persisted before it is answered
    answer, wait = send(store, entry, body(2, used=(0, 990), want=(0, 64), need={"inputTokens": 0, "outputTokens": 16, "cost": "0"}))
    assert answer["cutOff"] is True and wait == 0  # ...but the news that it is spent goes at once


def test_a_budget_spent_short_of_its_limit_is_exceeded_everywhere_and_a_raise_lifts_it():
    """Proxies clamp the last requests: 3 tokens stay unspent and the waiting request needs 20. Not only
    cutOff: state, the Exceeded condition, the BudgetExceeded Event and the forecast say so, also
    after a restart; a raised limit turns all of it back."""
    small = {**SPEC, "limits": {"tokens": {"total": 1000}}, "onExceeded": "CutOff"}
    need = {"inputTokens": 4, "outputTokens": 16, "cost": "0"}
    store = LedgerStore()
    entry = store.load(budget(small), NOW)
    send(store, entry, body(1, want=(0, 1000)))
    answer, _ = send(store, entry, body(2, used=(400, 597), want=(4, 400), need=need))
    assert answer["state"] == "Exceeded" and answer["cutOff"] is True
    status = store.status(entry, NOW)
    assert status["state"] == "Exceeded" and status["percentUsed"] == 99 and status["remaining"] == {"tokens": 3}
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Exceeded"]["status"] == "True" and conditions["Exceeded"]["reason"] == "TooLittleLeft"
    assert "3 tokens left, less than the team's smallest request needs (20 tokens)" in conditions["Exceeded"]["message"]
    assert conditions["ForecastExhausted"]["reason"] == "Exhausted" and status["forecastExhaustion"] is None
    events = dict(store.events(entry))
    assert "exhausted (99%: 3 tokens left" in events["BudgetExceeded"]
    assert store.status_gauges(entry) == (99, "Exceeded")

    restarted = LedgerStore()
    again = restarted.load(budget(small, **copy.deepcopy(status)), NOW + timedelta(seconds=5))
    assert again.exhausted() and restarted.events(again) == []  # announced before the restart
    assert restarted.status(again, NOW)["state"] == "Exceeded"
    raised = {**small, "limits": {"tokens": {"total": 2000}}}
    assert restarted.observe(budget(raised, **status), NOW) is again
    after = restarted.status(again, NOW)
    assert after["state"] == "Active" and after["ledger"].get("exhaustedAt") is None
    assert {c["type"]: c["status"] for c in after["conditions"]}["Exceeded"] == "False"
    assert send(restarted, again, body(3, used=(400, 597)))[0]["cutOff"] is False
    # Back below the thresholds, they are re-armed: spending through the raised limit is announced again.
    assert restarted.events(again) == []
    send(restarted, again, body(4, used=(1000, 1000)))
    assert [r for r, _ in restarted.events(again)] == ["ThresholdCrossed", "BudgetExceeded"]
    assert restarted.events(again) == []


def test_smallest_admitted_keeps_a_huge_prompt_from_cutting_the_team_off_also_after_a_restart():
    """One proxy serves the team's small requests and reports the smallest it admitted; another
    cannot fit a huge prompt into what is left. Not spent (no cutOff, state not Exceeded); the
    minimum lives in status.ledger, so a restarted operator decides the same; once not even the
    small request fits, the budget is spent and says so."""
    spec = {**SPEC, "limits": {"tokens": {"total": 1000}}, "onExceeded": "CutOff"}
    small = {"inputTokens": 20, "outputTokens": 16, "cost": "0"}
    huge = {"inputTokens": 600, "outputTokens": 16, "cost": "0"}
    store = LedgerStore()
    entry = store.load(budget(spec), NOW)
    send(store, entry, body(1, want=(0, 1000), smallestAdmitted=small))
    send(store, entry, body(2, used=(400, 100), smallestAdmitted=small, releaseTo={"total": 500}))
    answer, _ = send(store, entry, body(1, proxy="p2", want=(600, 400), need=huge))
    assert answer["cutOff"] is False and answer["state"] != "Exceeded"  # 500 left: small ones still fit
    status = store.status(entry, NOW)
    assert status["ledger"]["proxies"]["p1"]["smallestAdmitted"] == small
    restarted = LedgerStore()
    again = restarted.load(budget(spec, **copy.deepcopy(status)), NOW + timedelta(seconds=1))
    answer, _ = send(restarted, again, body(2, proxy="p2", want=(600, 400), need=huge), ts=TS + 1)
    assert answer["cutOff"] is False and not again.exhausted()
    # p1 settles all but 30 tokens: the small request (36) no longer fits either.
    send(restarted, again, body(3, used=(700, 270), smallestAdmitted=small), ts=TS + 2)
    answer, _ = send(restarted, again, body(3, proxy="p2", want=(600, 400), need=huge), ts=TS + 2)
    assert answer["cutOff"] is True and answer["state"] == "Exceeded"
    assert "30 tokens left, less than the team's smallest request needs (36 tokens)" in \
        {c["type"]: c for c in restarted.status(again, NOW)["conditions"]}["Exceeded"]["message"]


def test_the_report_paths_fraction_equals_the_status_fraction():
    """amount_fraction is usage_fraction without the dict: they must never disagree."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from spendwarden.ledger.store import amount_fraction, usage_dict
    from spendwarden.ledger.usage import usage_fraction

    limits = [{"tokens": {"total": 100_000}}, {"tokens": {"input": 7, "output": 3}}, {"cost": {"amount": "0.30"}},
              {"tokens": {"total": 5, "output": 2}, "cost": {"amount": "250.00", "currency": "EUR"}}]
    specs = [validate_spec("TokenBudget", {"period": {"type": "Monthly"}, "limits": lim})[0] for lim in limits]
    assert all(specs)

    @settings(max_examples=200, deadline=None)
    @given(st.sampled_from(specs), st.integers(0, 10**7), st.integers(0, 10**7),
           st.decimals(min_value=0, max_value=10**6, places=9, allow_nan=False, allow_infinity=False))
    def check(spec, inp, out, cost):
        used = Amount(inp, out, cost)
        assert amount_fraction(spec, used) == usage_fraction(spec, usage_dict(used))[0]

    check()
