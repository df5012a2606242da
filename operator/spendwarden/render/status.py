"""Pure status builders: what each CR's status should say after a render.

The operator compares the result with the object's current status and patches only on a
difference, so status writes never feed back into endless reconciles.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from ..api.common import now_rfc3339, set_condition
from ..api.modelroute import ModelRouteSpec
from ..api.tokenbudget import TokenBudgetSpec
from ..ledger.periods import current_period
from ..ledger.usage import format_tokens, usage_status


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
    backends: list[dict[str, Any]] = [{"name": b.name, "provider": b.provider.value, "model": b.model, "url": b.url}
                                      for b in spec.backends]
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


def limit_summary(spec: TokenBudgetSpec) -> str:
    parts = []
    if spec.limits.tokens is not None:
        t = spec.limits.tokens
        for label, value in (("tokens", t.total), ("in", t.input), ("out", t.output)):
            if value is not None:
                parts.append(f"{format_tokens(value)} {label}")
    if spec.limits.cost is not None:
        parts.append(f"{spec.limits.cost.amount} {spec.limits.cost.currency}")
    return ", ".join(parts)


LEDGER_FIELDS = ("used", "remaining", "percentUsed", "state", "usedSummary", "ledger", "history", "forecastExhaustion",
                 "breakdown")
# Never written by the reconcile, even before a ledger exists: a stale copy of `ledger` written back
# would forget grants already made, and a restarted operator could then grant them twice.
LEDGER_ONLY_FIELDS = ("ledger", "history", "breakdown")


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
