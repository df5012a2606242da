"""Pure status builders: what each CR's status should say after a render.

The operator compares the result with the object's current status and patches only on a
difference, so status writes never feed back into endless reconciles.
"""
from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from ..api.common import now_rfc3339, set_condition
from ..api.modelroute import ModelRouteSpec
from ..api.tokenbudget import BudgetState, TokenBudgetSpec
from ..ledger.periods import current_period


def _generation(obj: dict[str, Any]) -> int | None:
    return obj.get("metadata", {}).get("generation")


# ModelRoute status fields the scaler (controller/scaler.py) owns: never written back by the reconcile,
# whose copy of the object may be older than the scaler's last write.
SCALER_FIELDS = ("scaling",)


def invalid_status(obj: dict[str, Any], message: str, now: datetime, reason: str = "InvalidSpec") -> dict[str, Any]:
    """Status of an object whose spec the operator refuses: Ready=False with the exact reason."""
    status = {k: v for k, v in (obj.get("status") or {}).items() if k not in SCALER_FIELDS}
    status["observedGeneration"] = _generation(obj)
    status["conditions"] = set_condition(status.get("conditions", []), "Ready", "False", reason,
                                         message, _generation(obj), now)
    if obj.get("kind") == "ModelRoute":
        status["ready"] = "False"
    return status


def modelroute_status(obj: dict[str, Any], spec: ModelRouteSpec, now: datetime,
                      prices: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """`prices`: the effective prices per backend, in spec order (render.proxyconfig RenderResult.prices)."""
    status = {k: v for k, v in (obj.get("status") or {}).items() if k not in SCALER_FIELDS}
    backends = [{"name": b.name, "provider": b.provider.value, "model": b.model, "url": b.url} for b in spec.backends]
    for entry, pricing in zip(backends, prices or []):
        entry["pricing"] = pricing
    status.update({
        "observedGeneration": _generation(obj),
        "ready": "True",
        "backendCount": len(spec.backends),
        "backends": backends,
    })
    message = f"alias {spec.model!r} served by {len(spec.backends)} backend(s), default {spec.defaultBackend!r}"
    status["conditions"] = set_condition(status.get("conditions", []), "Ready", "True", "Rendered", message,
                                         _generation(obj), now)
    return status


def _fmt_tokens(n: int) -> str:
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if n >= size:
            text = f"{Decimal(n) / size:.1f}".rstrip("0").rstrip(".")
            return f"{text}{unit}"
    return str(n)


def limit_summary(spec: TokenBudgetSpec) -> str:
    parts = []
    if spec.limits.tokens is not None:
        t = spec.limits.tokens
        for label, value in (("tokens", t.total), ("in", t.input), ("out", t.output)):
            if value is not None:
                parts.append(f"{_fmt_tokens(value)} {label}")
    if spec.limits.cost is not None:
        parts.append(f"{spec.limits.cost.amount} {spec.limits.cost.currency}")
    return ", ".join(parts)


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
LEDGER_FIELDS = ("used", "remaining", "percentUsed", "state", "usedSummary", "ledger", "history", "forecastExhaustion",
                 "breakdown")
# Never written by the reconcile, even before a ledger exists: a stale copy of `ledger` written back
# would forget grants already made, and a restarted operator could then grant them twice.
LEDGER_ONLY_FIELDS = ("ledger", "history", "breakdown")


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
    used_parts = [f"{_fmt_tokens(used['totalTokens'])} tokens"] if spec.limits.tokens is not None else []
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


def tokenbudget_status(obj: dict[str, Any], spec: TokenBudgetSpec, now: datetime,
                       ledger_owned: bool = False) -> dict[str, Any]:
    """The status the reconcile wants. With `ledger_owned`, the ledger-owned fields are left out
    (and the Exceeded condition is kept as the object has it)."""
    status = dict(obj.get("status") or {})
    start, end = current_period(spec, now)
    start_s, end_s = now_rfc3339(start), now_rfc3339(end)
    gen = _generation(obj)
    status.update({
        "observedGeneration": gen,
        "periodStart": start_s,
        "periodEnd": end_s,
        "limitSummary": limit_summary(spec),
    })
    conds = set_condition(status.get("conditions", []), "Ready", "True", "Rendered",
                          f"budget in force for {', '.join(spec.routes) or 'all routes'}; period ends {end_s}", gen, now)
    if ledger_owned:
        status["conditions"] = conds
        return reconcile_fields(status, ledger_owned=True)
    used = status.get("used") or {}
    if (obj.get("status") or {}).get("periodStart") not in (None, start_s):
        used = {}  # a new period has begun; the ledger keeps the old totals in history
    status.update(usage_status(spec, used, conds, end_s, gen, now))
    return reconcile_fields(status, ledger_owned=False)


def reconcile_fields(status: dict[str, Any], ledger_owned: bool) -> dict[str, Any]:
    """Only the fields the reconcile may write (see LEDGER_FIELDS)."""
    drop = LEDGER_FIELDS if ledger_owned else LEDGER_ONLY_FIELDS
    return {k: v for k, v in status.items() if k not in drop}


def status_differs(current: dict[str, Any] | None, desired: dict[str, Any]) -> bool:
    """Whether a merge patch of `desired` would change anything: only its own keys count, because
    fields it leaves out (another writer's) stay as they are."""
    current = current or {}
    return any(current.get(k) != v for k, v in desired.items())
