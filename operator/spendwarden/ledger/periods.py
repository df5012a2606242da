"""Budget periods: calendar Daily/Weekly/Monthly in the budget's time zone, or a rolling window.

Calendar boundaries are computed as local wall-clock midnights and then converted to UTC, so a day
across a daylight-saving change is 23 or 25 hours long, as users expect of "daily".
"""
from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from ..enums import PeriodType
from ..plainconfig import parse_duration

# Rolling windows are anchored at the Unix epoch so every proxy and the operator agree on the
# boundaries without sharing state.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _local_midnight(year: int, month: int, day: int, zone: ZoneInfo) -> datetime:
    # fold=0 and then normalising through UTC handles zones whose midnight is skipped by DST.
    local = datetime(year, month, day, tzinfo=zone)
    return local.astimezone(UTC)


def calendar_period(kind: PeriodType, zone_name: str, now: datetime) -> tuple[datetime, datetime]:
    zone = ZoneInfo(zone_name)
    local = now.astimezone(zone)
    if kind == PeriodType.DAILY:
        start_day = local.date()
        end_day = start_day + timedelta(days=1)
    elif kind == PeriodType.WEEKLY:
        start_day = local.date() - timedelta(days=local.weekday())
        end_day = start_day + timedelta(days=7)
    else:
        start_day = local.date().replace(day=1)
        end_day = (start_day.replace(year=start_day.year + 1, month=1) if start_day.month == 12
                   else start_day.replace(month=start_day.month + 1))
    return (_local_midnight(start_day.year, start_day.month, start_day.day, zone),
            _local_midnight(end_day.year, end_day.month, end_day.day, zone))


def rolling_period(window: timedelta, now: datetime) -> tuple[datetime, datetime]:
    """Fixed-length windows aligned to the epoch: [start, start + window)."""
    seconds = int(window.total_seconds())
    elapsed = int((now - _EPOCH).total_seconds())
    start = _EPOCH + timedelta(seconds=elapsed - elapsed % seconds)
    return start, start + window


def current_period(spec: Any, now: datetime) -> tuple[datetime, datetime]:
    """The [start, end) of the period containing `now`, as aware UTC datetimes."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if spec.period is not None:
        return calendar_period(spec.period.type, spec.period.timeZone, now)
    assert spec.window is not None  # the spec validator guarantees one of them
    return rolling_period(parse_duration(spec.window), now)


def seconds_until_next_reset(ends: Iterable[str], now: datetime, longest: float, shortest: float = 1.0) -> float:
    """How long the reset loop may sleep: until the earliest period end (RFC 3339) is due, so status
    shows the new period at once rather than up to `longest` later, but never less than `shortest`:
    an end still listed as past (a status event older than the reset's own write) must not spin it."""
    earliest = min(ends, default=None)
    if earliest is None:
        return longest
    due = datetime.fromisoformat(earliest.replace("Z", "+00:00")) - now
    return min(longest, max(shortest, due.total_seconds() + 0.05))
