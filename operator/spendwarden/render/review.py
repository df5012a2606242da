"""Admission review of TokenBudget and ModelRoute, pure: the same checks the operator applies when
it renders a namespace (render/proxyconfig.py), answered at `kubectl apply` time instead of later
as a Ready=False condition.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..api import modelroute, tokenbudget
from .proxyconfig import currency_mismatch, route_currency, validate_spec


@dataclass
class Review:
    error: str | None = None
    warnings: list[str] = field(default_factory=list)


def _order(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    # The same order render_proxy_config uses to decide which of two routes for one alias wins; an
    # object without a timestamp yet is the newest.
    return (meta.get("creationTimestamp") or "\uffff", meta.get("name") or "")


def _valid_alias(obj: Mapping[str, Any]) -> str | None:
    spec, error = validate_spec(modelroute.KIND, obj.get("spec"))
    return None if error else spec.model


def _route_currency_warnings(name: str, route: modelroute.ModelRouteSpec,
                             budgets: Iterable[Mapping[str, Any]]) -> list[str]:
    """A warning, not a refusal, unlike the budget side: moving a namespace to another currency means
    changing routes and budgets, and refusing both orders would leave GitOps no way through."""
    warnings = []
    for obj in budgets:
        budget, error = validate_spec(tokenbudget.KIND, obj.get("spec"))
        if error or (obj.get("metadata") or {}).get("deletionTimestamp"):
            continue
        if currency_mismatch(budget, [(name, route)]):
            warnings.append(f"spec.backends[].pricing.currency: {route_currency(route)}, but "
                            f"TokenBudget {obj['metadata']['name']!r} limits cost in {budget.limits.cost.currency}; "
                            f"costs are never converted, so that budget reports CurrencyMismatch until both "
                            f"use one currency")
    return warnings


def review(kind: str, obj: Mapping[str, Any], old: Mapping[str, Any] | None,
           siblings: Iterable[Mapping[str, Any]] | None = None,
           budgets: Iterable[Mapping[str, Any]] | None = None) -> Review:
    """`obj` is the object as it would be stored, `old` the stored one (UPDATE), `siblings` the
    namespace's ModelRoutes and `budgets` its TokenBudgets the operator knows of (None: unknown,
    skip the cross-object checks)."""
    meta = obj.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return Review()  # finalizer removal on the way out must never be blocked
    if old is not None and old.get("spec") == obj.get("spec"):
        # Metadata-only updates (labels, annotations, finalizers) of objects stored before the
        # webhook existed stay possible; their problems are reported as conditions.
        return Review()
    spec, error = validate_spec(kind, obj.get("spec"))
    if error:
        return Review(error=error)
    name = meta.get("name")
    live = [s for s in siblings or [] if (s.get("metadata") or {}).get("name") != name
            and not (s.get("metadata") or {}).get("deletionTimestamp")]
    if kind == modelroute.KIND and siblings is not None:
        for other in sorted(live, key=_order):
            if _order(other) >= _order(obj):
                break
            if _valid_alias(other) == spec.model:
                # Same wording as the operator's condition (render_proxy_config).
                return Review(error=f"spec.model: alias {spec.model!r} is already served by ModelRoute "
                                    f"{other['metadata']['name']!r}")
    if kind == modelroute.KIND and budgets is not None:
        # A CREATE by generateName has no name yet; the name only words a mismatch, not returned here.
        return Review(warnings=_route_currency_warnings(name or "", spec, budgets))
    if kind == tokenbudget.KIND and siblings is not None:
        routes = [(s["metadata"]["name"], route) for s in live
                  for route, error in [validate_spec(modelroute.KIND, s.get("spec"))] if not error]
        mismatch = currency_mismatch(spec, routes)
        if mismatch:
            return Review(error=mismatch)
        served = {route.model for _, route in routes}
        unknown = [a for a in spec.routes if a not in served]
        if unknown:
            # A warning, not a refusal: GitOps tools may apply the budget before its routes.
            return Review(warnings=[f"spec.routes: no ModelRoute in this namespace serves "
                                    f"{', '.join(repr(a) for a in unknown)} yet"])
    return Review()
