"""Replica-hours of a workload per accounting period, and their cost.

Exact: time is integrated in integer replica-milliseconds and priced with Decimal (never a float).
Observations split at period boundaries; the last finished period is kept for reports.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal

from ..api.common import now_rfc3339

MS_PER_HOUR = 3_600_000
HOURS_QUANTUM = Decimal("0.0001")
COST_QUANTUM = Decimal("0.000001")

# now -> (period start, period end)
PeriodFn = Callable[[datetime], tuple[datetime, datetime]]


def calendar_month(now: datetime) -> tuple[datetime, datetime]:
    """The default accounting period when no TokenBudget of the namespace gives one."""
    now = now.astimezone(UTC)
    start = datetime(now.year, now.month, 1, tzinfo=UTC)
    end = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=UTC)
    return start, end


def hours(replica_ms: int) -> Decimal:
    return (Decimal(replica_ms) / MS_PER_HOUR).quantize(HOURS_QUANTUM, rounding=ROUND_HALF_UP)


def price(replica_ms: int, per_hour: Decimal) -> Decimal:
    return (Decimal(replica_ms) * per_hour / MS_PER_HOUR).quantize(COST_QUANTUM, rounding=ROUND_HALF_UP)


@dataclass(slots=True)
class PeriodTotal:
    start: datetime
    end: datetime
    replica_ms: int = 0


@dataclass(slots=True)
class ReplicaMeter:
    current: PeriodTotal
    last_at: datetime
    replicas: int = 0
    previous: PeriodTotal | None = None

    @classmethod
    def start(cls, now: datetime, period: PeriodFn, replicas: int = 0, replica_ms: int = 0) -> ReplicaMeter:
        s, e = period(now)
        return cls(current=PeriodTotal(s, e, replica_ms), last_at=now, replicas=replicas)

    def observe(self, replicas: int, now: datetime, period: PeriodFn) -> int:
        """Count the time since the last observation at the replicas seen then; then remember `replicas`.
        Returns the replica-milliseconds added."""
        added = 0
        while now >= self.current.end:   # close finished periods
            added += self._add(self.current.end)
            s, e = period(self.current.end)
            if s < self.current.end:     # a period function that does not move forward: stop there
                s = self.current.end
            self.previous, self.current = self.current, PeriodTotal(s, max(e, s))
            if e <= s:
                break
        added += self._add(now)
        self.replicas = max(0, replicas)
        return added

    def _add(self, until: datetime) -> int:
        ms = int((until - self.last_at).total_seconds() * 1000) if until > self.last_at else 0
        add = ms * self.replicas
        self.current.replica_ms += add
        self.last_at = max(self.last_at, until)
        return add

    def status(self, per_hour: Decimal | None, currency: str) -> dict[str, object]:
        out: dict[str, object] = {"periodStart": now_rfc3339(self.current.start),
                                  "replicaHours": str(hours(self.current.replica_ms))}
        if per_hour is not None:
            out.update(cost=str(price(self.current.replica_ms, per_hour)), currency=currency)
        if self.previous is not None:
            prev = {"periodStart": now_rfc3339(self.previous.start), "replicaHours": str(hours(self.previous.replica_ms))}
            if per_hour is not None:
                prev["cost"] = str(price(self.previous.replica_ms, per_hour))
            out["previous"] = prev
        return out
