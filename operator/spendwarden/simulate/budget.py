"""When a TokenBudget would run out under a candidate's simulated spend.

The replayed requests are charged, in time order, to the budget's periods (ledger.periods: calendar
periods in the budget's time zone, or epoch-aligned rolling windows) with the ledger's own limit
arithmetic (ledger.allowance). A period whose usage reaches a limit records the request that did it
and how many requests came after it in that period (the ones CutOff would refuse, Downgrade would
send to the cheap backend). The replay itself does not change after that point: the figures show
what the traffic asks for. For the last period, when the log ends before it is exhausted, the
period's average burn rate so far projects when it would run out (as the operator's forecast does).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from ..ledger.allowance import Allowance, Amount, Limits
from ..ledger.periods import current_period
from .candidates import Budget
from .replay import RequestResult


@dataclass(frozen=True, slots=True)
class PeriodRun:
    start: datetime
    end: datetime
    requests: int
    used: Amount
    percent: float  # of the tightest limit
    exhausted_at: datetime | None
    after_exhaustion: int  # requests in the period after the limit was reached
    projected_exhaustion: datetime | None  # only for the last period, when not exhausted


def _percent(a: Allowance) -> float:
    return round((1.0 - a.remaining().fraction) * 100, 1)


def run_out(budget: Budget, results: list[RequestResult]) -> list[PeriodRun]:
    """Per period touched by the covered requests (in time order)."""
    limits = Limits.from_spec(budget.spec.limits)
    periods: list[PeriodRun] = []
    allowance: Allowance | None = None
    bounds: tuple[datetime, datetime] | None = None
    count = after = 0
    exhausted_at: datetime | None = None
    first_ts: datetime | None = None
    last_ts: datetime | None = None

    def close(project: bool) -> None:
        assert allowance is not None and bounds is not None
        projected = None
        if project and exhausted_at is None and first_ts is not None and last_ts is not None:
            fraction = 1.0 - allowance.remaining().fraction
            since = max(bounds[0], first_ts)
            elapsed = (last_ts - since).total_seconds()
            if fraction > 0 and elapsed > 0:
                at = since + (last_ts - since) / fraction
                projected = at if at < bounds[1] else None
        periods.append(PeriodRun(start=bounds[0], end=bounds[1], requests=count, used=allowance.used,
                                 percent=_percent(allowance), exhausted_at=exhausted_at,
                                 after_exhaustion=after, projected_exhaustion=projected))

    for r in results:
        if r.route is None or not budget.covers(r.route):
            continue
        b = current_period(budget.spec, r.ts)
        if bounds != b:
            if allowance is not None:
                close(project=False)
            allowance, bounds = Allowance(limits), b
            count = after = 0
            exhausted_at = None
            first_ts = r.ts
        assert allowance is not None
        count += 1
        last_ts = r.ts
        if exhausted_at is not None:
            after += 1
        allowance.used = allowance.used + Amount(r.input_tokens, r.output_tokens, r.cost)
        if exhausted_at is None and allowance.exhausted():
            exhausted_at = r.ts
    if allowance is not None:
        close(project=True)
    return periods


def currency_problem(budget: Budget, currency: str) -> str | None:
    """Why the budget's cost limit cannot apply to a candidate priced in `currency`."""
    cost = budget.spec.limits.cost
    if cost is not None and currency and cost.currency != currency:
        return (f"the budget {budget.name!r} limits spend in {cost.currency} but the route prices in {currency}: "
                f"prices and limit must be in one currency")
    return None


def limit_summary(budget: Budget) -> str:
    spec = budget.spec
    parts = []
    if spec.limits.cost is not None:
        parts.append(f"{Decimal(spec.limits.cost.amount)} {spec.limits.cost.currency}")
    t = spec.limits.tokens
    if t is not None:
        for label, v in (("tokens", t.total), ("input tokens", t.input), ("output tokens", t.output)):
            if v is not None:
                parts.append(f"{v} {label}")
    per = spec.period.type.value.lower() if spec.period is not None else f"per {spec.window}"
    return f"{' / '.join(parts)} {per}"
