"""Render one namespace's TokenBudgets and ModelRoutes into its proxy configuration.

Pure: CR dicts in, a ProxyConfig and a ConfigMap manifest out. Invalid objects are left out of the
configuration and reported as problems, so one bad CR never takes down a namespace's good routes.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from .. import API_VERSION
from ..api import modelroute, tokenbudget
from ..api.modelroute import ModelRouteSpec
from ..api.proxyconfig import (
    CONFIG_KEY,
    CONFIGMAP_NAME,
    BudgetEntry,
    LedgerSettings,
    ProxyConfig,
    RouteEntry,
)
from ..api.tokenbudget import TokenBudgetSpec
from ..api.validation import validate_spec
from ..prices.resolve import UNKNOWN_PRICES, PriceBook, resolve_route

LABELS = {"app.kubernetes.io/managed-by": "spendwarden", "app.kubernetes.io/component": "proxy-config"}
CONFIG_HASH = "spendwarden.io/config-hash"


@dataclass(frozen=True)
class Problem:
    kind: str
    name: str
    message: str
    reason: str = "InvalidSpec"  # the Ready=False condition's reason and the Warning Event's


def route_currency(spec: ModelRouteSpec) -> str:
    """The currency a route prices in: its backends' own pricing's, else the catalog's."""
    return next((b.currency for b in spec.backends if b.pricing is not None), modelroute.CATALOG_CURRENCY)


def currency_mismatch(budget: TokenBudgetSpec, routes: list[tuple[str, ModelRouteSpec]]) -> str | None:
    """Why a budget's money limit cannot add up the costs of the routes it covers (None: it can).
    Costs are summed as priced, never converted: a EUR limit over USD prices would compare USD with EUR."""
    if budget.limits.cost is None:
        return None
    want = budget.limits.cost.currency
    covered = [(name, spec) for name, spec in routes if not budget.routes or spec.model in budget.routes]
    other = [(name, route_currency(spec)) for name, spec in covered
             if spec.backends and route_currency(spec) != want]  # a route prices in one currency
    if not other:
        return None
    named = ", ".join(f"ModelRoute {name!r} ({currency})" for name, currency in sorted(other))
    return (f"spec.limits.cost.currency: {want}, but {named} price(s) in another currency; costs are never "
            f"converted, so this budget would add them up as {want}. Price the routes in {want} or set the "
            f"budget's currency to theirs")


@dataclass
class RenderResult:
    config: ProxyConfig
    problems: list[Problem] = field(default_factory=list)
    prices: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # route -> effective prices per backend

    def problem_for(self, kind: str, name: str) -> Problem | None:
        return next((p for p in self.problems if p.kind == kind and p.name == name), None)


def _name(obj: dict[str, Any]) -> str:
    return obj.get("metadata", {}).get("name", "")


def render_proxy_config(namespace: str, routes: list[dict[str, Any]], budgets: list[dict[str, Any]],
                        ledger_url: str | None = None, prices: PriceBook | None = None) -> RenderResult:
    """`prices`: pins and catalog for the fields routes leave unset; default: the process's
    (prices/pins.py current: the operator's pins and the genai-prices catalog)."""
    if prices is None:
        from ..prices import pins

        prices = pins.current()
    problems: list[Problem] = []
    effective: dict[str, list[dict[str, Any]]] = {}
    valid_routes: list[RouteEntry] = []
    by_alias: dict[str, str] = {}
    for obj in sorted(routes, key=lambda o: (o.get("metadata", {}).get("creationTimestamp") or "", _name(o))):
        spec, error = validate_spec(modelroute.KIND, obj.get("spec"))
        if error:
            problems.append(Problem(modelroute.KIND, _name(obj), error))
            continue
        priced = resolve_route(spec, prices)
        if isinstance(priced, str):
            problems.append(Problem(modelroute.KIND, _name(obj), priced, reason=UNKNOWN_PRICES))
            continue
        spec, effective[_name(obj)] = priced
        # Two routes for one alias would make routing depend on list order: the older one wins.
        if spec.model in by_alias:
            problems.append(Problem(modelroute.KIND, _name(obj),
                                    f"spec.model: alias {spec.model!r} is already served by ModelRoute {by_alias[spec.model]!r}"))
            continue
        by_alias[spec.model] = _name(obj)
        valid_routes.append(RouteEntry(name=_name(obj), spec=spec))

    valid_budgets: list[BudgetEntry] = []
    for obj in sorted(budgets, key=_name):
        spec, error = validate_spec(tokenbudget.KIND, obj.get("spec"))
        if error:
            problems.append(Problem(tokenbudget.KIND, _name(obj), error))
            continue
        # A budget naming routes that do not exist yet is fine: GitOps may apply it before them.
        mismatch = currency_mismatch(spec, [(r.name, r.spec) for r in valid_routes])
        if mismatch:
            # Reported, but the budget stays in force: leaving it out would lift every limit it sets.
            problems.append(Problem(tokenbudget.KIND, _name(obj), f"{mismatch} (the budget is still enforced meanwhile)",
                                    reason="CurrencyMismatch"))
        valid_budgets.append(BudgetEntry(name=_name(obj), spec=spec))

    config = ProxyConfig(namespace=namespace, routes=sorted(valid_routes, key=lambda r: r.spec.model),
                         budgets=valid_budgets, ledger=LedgerSettings(url=ledger_url))
    return RenderResult(config=config, problems=problems, prices=effective)


def config_json(config: ProxyConfig) -> str:
    return json.dumps(config.model_dump(mode="json", exclude_none=True), sort_keys=True, separators=(",", ":"))


def config_hash(body: str) -> str:
    """The short hash a ConfigMap's annotation carries; the operator also compares it with the live
    data to notice a ConfigMap that was edited or deleted behind its back."""
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def configmap_manifest(config: ProxyConfig, owners: list[dict[str, Any]]) -> dict[str, Any]:
    """The ConfigMap holding the configuration, owned by every CR it was rendered from so that
    Kubernetes garbage-collects it once the last of them is deleted."""
    body = config_json(config)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": CONFIGMAP_NAME,
            "namespace": config.namespace,
            "labels": dict(LABELS),
            "annotations": {CONFIG_HASH: config_hash(body)},
            "ownerReferences": [owner_reference(o) for o in sorted(owners, key=lambda o: (o["kind"], _name(o)))],
        },
        "data": {CONFIG_KEY: body},
    }


def owner_reference(obj: dict[str, Any]) -> dict[str, Any]:
    # Not a controller reference: the ConfigMap has several equal owners.
    return {"apiVersion": obj.get("apiVersion", API_VERSION), "kind": obj["kind"], "name": _name(obj),
            "uid": obj["metadata"]["uid"], "blockOwnerDeletion": False}


def load_manifests(text: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split a YAML stream (or a List) into (ModelRoutes, TokenBudgets); other kinds are ignored."""
    routes, budgets = [], []
    for doc in yaml.safe_load_all(text):
        if not isinstance(doc, dict):
            continue
        items = doc.get("items", []) if doc.get("kind") == "List" else [doc]
        for item in items:
            if item.get("kind") == modelroute.KIND:
                routes.append(item)
            elif item.get("kind") == tokenbudget.KIND:
                budgets.append(item)
    return routes, budgets
