"""The forecast: recent burn rate (pure), and the ledger's ForecastExhausted condition and Event."""
from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta

import pytest

from spendwarden.ledger.forecast import BurnRate, projected_exhaustion, time_constant
from spendwarden.ledger.store import LedgerStore
from tests.support.ledger_store import NOW, SPEC, TS, body, budget, send

DAY = 86400.0
START_TS = datetime(2026, 11, 1, tzinfo=UTC).timestamp()
END_TS = datetime(2026, 12, 1, tzinfo=UTC).timestamp()


def test_time_constant_is_an_eighth_of_the_period_capped_at_15_minutes():
    assert time_constant(0, 60) == 7.5
    assert time_constant(0, 30 * DAY) == 900
    assert time_constant(0, 10) == 4


def test_first_sample_is_the_average_since_the_period_start_then_recent_spend_dominates():
    burn = BurnRate.at_period_start(START_TS)
    tau = time_constant(START_TS, END_TS)
    t = START_TS + 10 * DAY
    assert burn.observe(t, 0.10, tau) and burn.rate == pytest.approx(0.01 / DAY)
    assert not burn.observe(t + tau / 10, 0.2, tau)  # too soon: no sample, nothing changes
    # A steady hour at 1% per hour: the recent rate moves almost all the way to it.
    f = 0.10
    for _ in range(36):
        t += 100
        f += 0.01 * 100 / 3600
        burn.observe(t, f, tau)
    assert burn.rate == pytest.approx(0.01 / 3600, rel=0.05)
    # Spending stops: the idle proxies' reports keep sampling, the rate decays towards zero.
    for _ in range(36):
        t += 100
        burn.observe(t, f, tau)
    assert burn.rate < 0.05 * 0.01 / 3600  # e^-4 after four time constants


def test_projection_from_the_recent_rate_not_the_period_average():
    # 10 days at 1% a day, then the last hour at 1% an hour: the average says "lasts", the recent
    # rate says "runs out in about 89 hours", before the period ends.
    burn = BurnRate(at=START_TS + 10 * DAY, fraction=0.11, rate=0.01 / 3600)
    now = START_TS + 10 * DAY
    at = projected_exhaustion(burn, 0.11, now, START_TS, END_TS)
    assert at == pytest.approx(now + 0.89 / (0.01 / 3600))
    assert projected_exhaustion(BurnRate(now, 0.11, 0.001 / DAY), 0.11, now, START_TS, END_TS) is None  # lasts
    assert projected_exhaustion(burn, 1.0, now, START_TS, END_TS) is None  # already spent
    assert projected_exhaustion(BurnRate(now, 0.11, 0.0), 0.11, now, START_TS, END_TS) is None  # idle


def test_no_forecast_in_the_first_half_time_constant_and_average_until_the_first_sample():
    burn = BurnRate.at_period_start(START_TS)
    assert projected_exhaustion(burn, 0.5, START_TS + 60, START_TS, END_TS) is None  # a burst in minute one
    at = projected_exhaustion(burn, 0.5, START_TS + DAY, START_TS, END_TS)
    assert at == pytest.approx(START_TS + 2 * DAY)  # no sample yet: the average since the start


def test_state_round_trips_and_garbage_falls_back_to_the_period_start():
    burn = BurnRate(at=1.5, fraction=0.25, rate=1e-7)
    assert BurnRate.from_state(burn.to_state(), START_TS) == burn
    assert BurnRate.from_state({"at": "x"}, START_TS) == BurnRate.at_period_start(START_TS)


def _hourly_spend(store, entry, hours: float, per_hour: int, used: int, seq: int, t: datetime) -> tuple[int, int, datetime]:
    """Reports every 100 s spending `per_hour` tokens an hour."""
    for _ in range(int(hours * 36)):
        t += timedelta(seconds=100)
        used += per_hour // 36
        seq += 1
        send(store, entry, body(seq, used=(used, 0)), ts=t.timestamp(), now=t)
    return used, seq, t


def conditions(status):
    return {c["type"]: (c["status"], c["reason"], c["message"]) for c in status["conditions"]}


def test_forecast_condition_and_event_once_per_period_also_across_a_restart():
    store = LedgerStore()
    entry = store.load(budget(), NOW)  # 100k tokens, Nov 22 12:00: 8.5 days left
    used, seq, t = _hourly_spend(store, entry, 1, 360, 0, 0, NOW)  # ~0.4% a hour: lasts
    status = store.status(entry, t)
    assert status["forecastExhaustion"] is None
    assert conditions(status)["ForecastExhausted"][:2] == ("False", "WithinPeriod")
    assert [r for r, _ in store.events(entry)] == []

    used, seq, t = _hourly_spend(store, entry, 1, 3600, used, seq, t)  # 3.6k an hour: out in ~26 h
    status = store.status(entry, t)
    at = datetime.strptime(status["forecastExhaustion"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert timedelta(hours=20) < at - t < timedelta(hours=32)
    state, reason, message = conditions(status)["ForecastExhausted"]
    assert (state, reason) == ("True", "BurnRate") and status["forecastExhaustion"][:13] in message
    events = store.events(entry)
    assert [r for r, _ in events] == ["ForecastExhaustion"] and "2026-12-01T00:00:00Z" in events[0][1]
    assert store.events(entry) == []
    # The next flushes: the projection moves a little, the condition's message does not.
    used, seq, t = _hourly_spend(store, entry, 0.1, 3600, used, seq, t)
    assert conditions(store.status(entry, t))["ForecastExhausted"] == (state, reason, message)

    restarted = LedgerStore()
    again = restarted.load(budget(**copy.deepcopy(store.status(entry, t))), t)
    assert again.burn == entry.burn  # the recent rate survives the restart
    assert restarted.status(again, t)["forecastExhaustion"] is not None
    assert restarted.events(again) == []  # announced before the restart

    # The next period starts afresh: a new announcement is possible.
    december = datetime(2026, 12, 1, 0, 0, 5, tzinfo=UTC)
    restarted.roll(again, december)
    assert again.burn is None and not again.forecast_announced


def test_an_exhausted_budget_has_no_forecast():
    store = LedgerStore()
    entry = store.load(budget({**SPEC, "limits": {"tokens": {"total": 1000}}}), NOW)
    send(store, entry, body(1, used=(1000, 0)), ts=TS + 100, now=NOW + timedelta(seconds=100))
    status = store.status(entry, NOW + timedelta(seconds=100))
    assert status["forecastExhaustion"] is None
    assert conditions(status)["ForecastExhausted"][:2] == ("False", "Exhausted")
    assert "ForecastExhaustion" not in [r for r, _ in store.events(entry)]
