from __future__ import annotations

import copy
import json
from datetime import UTC, datetime

from spendwarden.api.proxyconfig import CONFIG_KEY, CONFIGMAP_NAME, ProxyConfig
from spendwarden.api.validation import validate_spec
from spendwarden.render.proxyconfig import (
    configmap_manifest,
    load_manifests,
    render_proxy_config,
)
from spendwarden.render.status import (
    invalid_status,
    modelroute_status,
    tokenbudget_status,
)
from tests.support.manifests import GOOD_BUDGET, GOOD_ROUTE

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def cr(kind: str, name: str, spec: dict, uid: str = "", created: str = "2026-11-01T00:00:00Z", **status) -> dict:
    return {"apiVersion": "spendwarden.io/v1alpha1", "kind": kind,
            "metadata": {"name": name, "namespace": "team-a", "uid": uid or f"uid-{name}", "generation": 3,
                         "creationTimestamp": created},
            "spec": spec, **({"status": status} if status else {})}


def test_render_combines_routes_and_budgets_of_a_namespace():
    routes = [cr("ModelRoute", "chat", GOOD_ROUTE), cr("ModelRoute", "embed", {**GOOD_ROUTE, "model": "embed"})]
    budgets = [cr("TokenBudget", "monthly", GOOD_BUDGET)]
    result = render_proxy_config("team-a", routes, budgets, ledger_url="http://ledger:8081")
    assert result.problems == []
    assert [r.spec.model for r in result.config.routes] == ["chat", "embed"]
    assert [b.name for b in result.config.budgets] == ["monthly"]
    assert result.config.ledger.url == "http://ledger:8081"


def test_invalid_objects_are_left_out_and_reported_others_kept():
    bad = {**GOOD_ROUTE, "model": "broken", "defaultBackend": "nope"}
    result = render_proxy_config("team-a", [cr("ModelRoute", "chat", GOOD_ROUTE), cr("ModelRoute", "broken", bad)],
                                 [cr("TokenBudget", "b", {**GOOD_BUDGET, "thresholds": [90, 10]})])
    assert [r.name for r in result.config.routes] == ["chat"]
    assert result.config.budgets == []
    assert "defaultBackend names unknown backend 'nope'" in result.problem_for("ModelRoute", "broken").message
    assert "strictly ascending" in result.problem_for("TokenBudget", "b").message


def test_duplicate_alias_keeps_the_older_route():
    older = cr("ModelRoute", "first", GOOD_ROUTE, created="2026-01-01T00:00:00Z")
    newer = cr("ModelRoute", "second", GOOD_ROUTE, created="2026-02-01T00:00:00Z")
    result = render_proxy_config("team-a", [newer, older], [])
    assert [r.name for r in result.config.routes] == ["first"]
    assert "already served by ModelRoute 'first'" in result.problem_for("ModelRoute", "second").message


def test_configmap_is_owned_by_every_cr_and_round_trips():
    objs = [cr("ModelRoute", "chat", GOOD_ROUTE), cr("TokenBudget", "monthly", GOOD_BUDGET)]
    result = render_proxy_config("team-a", objs[:1], objs[1:])
    cm = configmap_manifest(result.config, objs)
    assert cm["metadata"]["name"] == CONFIGMAP_NAME and cm["metadata"]["namespace"] == "team-a"
    assert {o["uid"] for o in cm["metadata"]["ownerReferences"]} == {"uid-chat", "uid-monthly"}
    assert not any(o.get("controller") for o in cm["metadata"]["ownerReferences"])
    parsed = ProxyConfig.model_validate(json.loads(cm["data"][CONFIG_KEY]))
    assert parsed == result.config
    # Rendering is deterministic: the same input gives the same bytes (no spurious ConfigMap writes).
    assert configmap_manifest(render_proxy_config("team-a", objs[:1], objs[1:]).config, objs[::-1]) == cm


def test_load_manifests_splits_kinds_and_lists():
    text = """
apiVersion: spendwarden.io/v1alpha1
kind: ModelRoute
metadata: {name: chat}
spec: {}
---
apiVersion: v1
kind: Namespace
metadata: {name: team-a}
---
apiVersion: v1
kind: List
items:
- {apiVersion: spendwarden.io/v1alpha1, kind: TokenBudget, metadata: {name: b}, spec: {}}
"""
    routes, budgets = load_manifests(text)
    assert [r["metadata"]["name"] for r in routes] == ["chat"]
    assert [b["metadata"]["name"] for b in budgets] == ["b"]


def test_tokenbudget_status_fresh_budget():
    obj = cr("TokenBudget", "monthly", GOOD_BUDGET)
    status = tokenbudget_status(obj, validate_spec("TokenBudget", GOOD_BUDGET)[0], NOW)
    assert status["periodStart"] == "2026-10-31T23:00:00Z"  # midnight in Berlin (CET)
    assert status["periodEnd"] == "2026-11-30T23:00:00Z"
    assert status["state"] == "Active" and status["percentUsed"] == 0
    assert status["limitSummary"] == "1M tokens, 250.00 USD"
    assert status["remaining"] == {"tokens": 1_000_000, "cost": "250.00"}
    assert status["observedGeneration"] == 3
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["Ready"]["status"] == "True" and conds["Exceeded"]["status"] == "False"


def test_tokenbudget_status_thresholds_and_exceeded_use_the_tightest_limit():
    spec = validate_spec("TokenBudget", GOOD_BUDGET)[0]
    start = "2026-10-31T23:00:00Z"
    warn = cr("TokenBudget", "b", GOOD_BUDGET, periodStart=start,
              used={"inputTokens": 1, "outputTokens": 1, "totalTokens": 2, "cost": "205.10"})
    status = tokenbudget_status(warn, spec, NOW)
    assert status["percentUsed"] == 82 and status["state"] == "Warning"
    assert status["remaining"]["cost"] == "44.90"
    over = cr("TokenBudget", "b", GOOD_BUDGET, periodStart=start,
              used={"inputTokens": 600_000, "outputTokens": 400_000, "totalTokens": 1_000_000, "cost": "1"})
    status = tokenbudget_status(over, spec, NOW)
    assert status["state"] == "Exceeded" and status["remaining"]["tokens"] == 0
    assert {c["type"]: c["status"] for c in status["conditions"]}["Exceeded"] == "True"


def test_usage_of_a_past_period_is_not_carried_over():
    spec = validate_spec("TokenBudget", GOOD_BUDGET)[0]
    old = cr("TokenBudget", "b", GOOD_BUDGET, periodStart="2026-09-30T22:00:00Z",
             used={"inputTokens": 5, "outputTokens": 5, "totalTokens": 10, "cost": "9"})
    status = tokenbudget_status(old, spec, NOW)
    assert status["used"]["totalTokens"] == 0 and status["used"]["cost"] == "0"


def test_condition_transition_time_is_stable_when_nothing_changes():
    obj = cr("ModelRoute", "chat", GOOD_ROUTE)
    spec = validate_spec("ModelRoute", GOOD_ROUTE)[0]
    first = modelroute_status(obj, spec, NOW)
    again = modelroute_status({**obj, "status": first}, spec, datetime(2026, 11, 23, tzinfo=UTC))
    assert again == first
    broken = invalid_status({**obj, "status": first}, "defaultBackend names unknown backend 'x'", datetime(2026, 11, 23, tzinfo=UTC))
    ready = next(c for c in broken["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
    assert ready["lastTransitionTime"] == "2026-11-23T00:00:00Z"
    assert broken["ready"] == "False"


def _eur(spec: dict) -> dict:
    out = copy.deepcopy(spec)
    for b in out["backends"]:
        b["pricing"]["currency"] = "EUR"
    return out


def test_a_budget_over_routes_priced_in_another_currency_is_reported_and_still_enforced():
    eur_route = cr("ModelRoute", "euro", {**_eur(GOOD_ROUTE), "model": "euro"})
    usd_budget = cr("TokenBudget", "monthly", GOOD_BUDGET)  # cost in USD (the default), all routes
    result = render_proxy_config("team-a", [cr("ModelRoute", "chat", GOOD_ROUTE), eur_route], [usd_budget])
    problem = result.problem_for("TokenBudget", "monthly")
    assert problem is not None and problem.reason == "CurrencyMismatch"
    assert "USD" in problem.message and "ModelRoute 'euro' (EUR)" in problem.message and "'chat'" not in problem.message
    assert problem.message.endswith("(the budget is still enforced meanwhile)")
    assert [b.name for b in result.config.budgets] == ["monthly"]  # left out, it would lift its limits
    # A budget covering only same-currency routes, or without a money limit, is fine.
    only_chat = cr("TokenBudget", "chat-only", {**GOOD_BUDGET, "routes": ["chat"]})
    tokens_only = cr("TokenBudget", "tokens", {**GOOD_BUDGET, "limits": {"tokens": {"total": 5}}})
    result = render_proxy_config("team-a", [cr("ModelRoute", "chat", GOOD_ROUTE), eur_route], [only_chat, tokens_only])
    assert result.problems == []
