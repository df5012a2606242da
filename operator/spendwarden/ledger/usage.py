"""A budget's usage against its limits: the used fraction, the state, and the status fields and
Exceeded condition derived from them. One implementation for the reconcile (before a ledger exists),
the ledger store and the alerts.
"""
from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from ..api.common import set_condition
from ..api.tokenbudget import BudgetState, TokenBudgetSpec


def format_tokens(n: int) -> str:
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if n >= size:
            text = f"{Decimal(n) / size:.1f}".rstrip("0").rstrip(".")
            return f"{text}{unit}"
    return str(n)


def usage_fraction(spec: TokenBudgetSpec, used: dict[str, Any]) -> tuple[Decimal, dict[str, Any]]:
    """The tightest limit's used fraction, and what remains of each limit."""
    fractions: list[Decimal] = []
    remaining: dict[str, Any] = {}
    t = spec.limits.tokens
    if t is not None:
        pairs = [(t.total, used.get("totalTokens", 0)), (t.input, used.get("inputTokens", 0)),
                 (t.output, used.get("outputTokens", 0))]
        left = [limit - value for limit, value in pairs if limit is not None]
        fractions += [Decimal(value) / limit for limit, value in pairs if limit is not None]
        remaining["tokens"] = max(0, min(left))
    if spec.limits.cost is not None:
        limit = Decimal(spec.limits.cost.amount)
        spent = Decimal(used.get("cost", "0"))
        remaining["cost"] = str(max(Decimal(0), limit - spent))
        fractions.append(spent / limit if limit > 0 else Decimal(1))
    return max(fractions), remaining


# Who writes which TokenBudget status field. Once the ledger (controller/ledger_service.py) keeps a
# budget's accounts it owns the usage fields and the Exceeded condition; the namespace reconcile
# keeps observedGeneration, periodStart/periodEnd, limitSummary and Ready. Both send JSON merge
# patches with only their own fields, so neither overwrites the other with a stale copy.
def normalise_used(used: dict[str, Any] | None) -> dict[str, Any]:
    used = used or {}
    return {"inputTokens": int(used.get("inputTokens", 0)), "outputTokens": int(used.get("outputTokens", 0)),
            "totalTokens": int(used.get("totalTokens", 0)), "cost": str(used.get("cost", "0"))}


def budget_state(spec: TokenBudgetSpec, fraction: Decimal, exhausted: bool | None = None) -> tuple[int, BudgetState]:
    """Percent used and the state. `exhausted`: the ledger's verdict (ledger/leases.py shortfall: a
    budget that stops short of its limit can be exhausted too); None: the limit reached."""
    percent = int(fraction * 100)
    crossed = [t for t in spec.thresholds if percent >= t]
    if exhausted is None:
        exhausted = fraction >= 1
    state = BudgetState.EXCEEDED if exhausted else BudgetState.WARNING if crossed else BudgetState.ACTIVE
    return percent, state


def usage_status(spec: TokenBudgetSpec, used: dict[str, Any], conditions: list[dict], period_end: str,
                 generation: int | None, now: datetime, short_of: str | None = None) -> dict[str, Any]:
    """The usage-derived fields (used, remaining, percentUsed, state, usedSummary) and the conditions
    with Exceeded set: one function for the reconcile (before a ledger exists) and the ledger.
    `short_of`: the ledger found the budget exhausted below its limit, and says why."""
    used = normalise_used(used)
    fraction, remaining = usage_fraction(spec, used)
    percent, state = budget_state(spec, fraction, True if short_of else None)
    used_parts = [f"{format_tokens(used['totalTokens'])} tokens"] if spec.limits.tokens is not None else []
    if spec.limits.cost is not None:
        used_parts.append(f"{used['cost']} {spec.limits.cost.currency}")
    if state == BudgetState.EXCEEDED and fraction < 1 and short_of:
        conds = set_condition(conditions, "Exceeded", "True", "TooLittleLeft",
                              f"{percent}% of the limit used: {short_of}; onExceeded={spec.onExceeded.value} "
                              f"until {period_end}", generation, now)
    elif state == BudgetState.EXCEEDED:
        conds = set_condition(conditions, "Exceeded", "True", "LimitReached",
                              f"{percent}% of the limit used; onExceeded={spec.onExceeded.value} until {period_end}",
                              generation, now)
    else:
        conds = set_condition(conditions, "Exceeded", "False", "WithinLimit", f"{percent}% of the limit used", generation, now)
    return {"used": used, "remaining": remaining, "percentUsed": percent, "state": state.value,
            "usedSummary": ", ".join(used_parts), "conditions": conds}
