from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendwarden.api.tokenbudget import PeriodType, TokenBudgetSpec
from spendwarden.ledger.periods import calendar_period, current_period, rolling_period, seconds_until_next_reset

UTC = UTC


def test_daily_across_spring_forward_is_23_hours():
    start, end = calendar_period(PeriodType.DAILY, "Europe/Berlin", datetime(2026, 3, 29, 12, tzinfo=UTC))
    assert start == datetime(2026, 3, 28, 23, tzinfo=UTC)
    assert end - start == timedelta(hours=23)


def test_daily_across_fall_back_is_25_hours():
    start, end = calendar_period(PeriodType.DAILY, "America/New_York", datetime(2026, 11, 1, 12, tzinfo=UTC))
    assert end - start == timedelta(hours=25)


def test_weekly_starts_monday_local():
    start, end = calendar_period(PeriodType.WEEKLY, "Asia/Tokyo", datetime(2026, 11, 22, 16, tzinfo=UTC))
    # 2026-11-23 01:00 in Tokyo is a Monday: the week has just begun.
    assert start == datetime(2026, 11, 22, 15, tzinfo=UTC)
    assert end == start + timedelta(days=7)


def test_monthly_year_end():
    start, end = calendar_period(PeriodType.MONTHLY, "UTC", datetime(2026, 12, 31, 23, 59, tzinfo=UTC))
    assert (start, end) == (datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))


def test_rolling_window_spec():
    spec = TokenBudgetSpec.model_validate({"window": "6h", "limits": {"tokens": {"total": 10}}})
    assert current_period(spec, datetime(2026, 11, 22, 13, 5, tzinfo=UTC)) == (
        datetime(2026, 11, 22, 12, tzinfo=UTC), datetime(2026, 11, 22, 18, tzinfo=UTC))


ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kathmandu", "America/Santiago"]


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)),
       st.sampled_from(list(PeriodType)), st.sampled_from(ZONES))
def test_calendar_period_contains_now_and_starts_at_local_midnight(now, kind, zone):
    start, end = calendar_period(kind, zone, now)
    assert start <= now < end
    local = start.astimezone(ZoneInfo(zone))
    # A midnight skipped by DST moves the boundary to the first instant of the day instead.
    assert local.hour in (0, 1) and local.minute in (0, 30)
    assert calendar_period(kind, zone, end)[0] == end  # periods tile time without gaps


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)),
       st.integers(min_value=60, max_value=90 * 86400))
def test_rolling_period_contains_now(now, seconds):
    start, end = rolling_period(timedelta(seconds=seconds), now)
    assert start <= now < end and end - start == timedelta(seconds=seconds)


def test_the_reset_loop_wakes_at_the_earliest_period_end():
    now = datetime(2026, 11, 22, 19, 9, 50, tzinfo=UTC)
    assert seconds_until_next_reset([], now, 15) == 15
    assert seconds_until_next_reset(["2026-11-22T19:10:00Z", "2026-11-22T19:11:00Z"], now, 15) == pytest.approx(10.05)
    assert seconds_until_next_reset(["2026-12-01T00:00:00Z"], now, 15) == 15
    assert seconds_until_next_reset(["2026-11-22T19:09:00Z"], now, 15) == 1.0  # past: the next tick, not a spin
