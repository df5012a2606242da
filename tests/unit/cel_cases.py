"""One invalid spec per CEL rule of the generated CRDs (x-kubernetes-validations), shared by
tests/unit/test_cel_rules.py (the schema carries the rule, pydantic refuses the same spec, the rule
refuses it offline) and tests/integration/test_cel_validation.py (a real apiserver refuses it).

Each spec breaks exactly one rule, so a rule that misfires on valid parts shows up too."""
from __future__ import annotations

import copy
from typing import NamedTuple

from tests.support.manifests import DELETE, GOOD_BUDGET, GOOD_ROUTE, with_change

TB, MR = "TokenBudget", "ModelRoute"
LLAMA = {"kind": "Deployment", "name": "llama"}
TWO_TIERS = [{"name": "small", "backends": ["small"]}, {"name": "large", "backends": ["big"], "minScore": 40}]


class Case(NamedTuple):
    id: str
    kind: str
    changes: dict          # dotted path -> value (DELETE removes), applied in order to GOOD_BUDGET / GOOD_ROUTE
    message: str           # the CEL rule's message, as the apiserver answers it
    pydantic: str          # what the pydantic validators answer (webhook, operator, CLI)
    where: str = "spec"    # where the rule sits, as the apiserver names the field


def spec_of(case: Case) -> dict:
    spec = copy.deepcopy(GOOD_BUDGET if case.kind == TB else GOOD_ROUTE)
    for path, value in case.changes.items():
        spec = with_change(spec, path, value)
    return spec


def _scaled(**scaling) -> dict:
    """backends.0 of GOOD_ROUTE with a deploymentRef and these scaling settings."""
    return {**GOOD_ROUTE["backends"][0], "deploymentRef": LLAMA, "scaling": {"maxReplicas": 2, **scaling}}


_CEILING = {"onExceeded": "Downgrade"}

CASES = [
    # TokenBudget
    Case("period-and-window", TB, {"window": "24h"},
         "set either period or window, not both", "set either period or window, not both"),
    Case("neither-period-nor-window", TB, {"period": DELETE},
         "one of period or window is required", "one of period or window is required"),
    Case("limits-empty", TB, {"limits": {}},
         "limits needs tokens or cost (or both)", "limits needs tokens or cost", "spec.limits"),
    Case("token-limits-empty", TB, {"limits.tokens": {}},
         "limits.tokens needs at least one of total, input, output",
         "limits.tokens needs at least one of total, input, output", "spec.limits.tokens"),
    Case("thresholds-descending", TB, {"thresholds": [80, 50]},
         "thresholds must be strictly ascending, e.g. [50, 80, 95]", "thresholds must be strictly ascending",
         "spec.thresholds"),
    Case("thresholds-repeated", TB, {"thresholds": [50, 50, 80]},
         "thresholds must be strictly ascending, e.g. [50, 80, 95]", "thresholds must be strictly ascending",
         "spec.thresholds"),
    Case("alerting-two-destinations", TB,
         {"alerting": {"webhookURL": "https://hooks.example/x", "webhookSecretRef": {"name": "spendwarden-alerting"}}},
         "alerting: set webhookURL or webhookSecretRef, not both",
         "alerting: set webhookURL or webhookSecretRef, not both", "spec.alerting"),
    Case("hard-ceiling-empty", TB, {**_CEILING, "downgrade": {"hardCeiling": {}}},
         "downgrade.hardCeiling needs tokens or cost (or both)", "downgrade.hardCeiling needs tokens or cost",
         "spec.downgrade.hardCeiling"),
    Case("hard-ceiling-without-downgrade", TB, {"downgrade": {"hardCeiling": {"tokens": 2_000_000}}},
         "downgrade.hardCeiling applies only with onExceeded: Downgrade",
         "downgrade.hardCeiling applies only with onExceeded: Downgrade, not CutOff"),
    Case("hard-ceiling-tokens-below-limit", TB, {**_CEILING, "downgrade": {"hardCeiling": {"tokens": 999_999}}},
         "downgrade.hardCeiling.tokens is below limits.tokens.total: the ceiling is absolute and must be at least the limit",
         "downgrade.hardCeiling.tokens (999999) is below limits.tokens.total (1000000)"),
    Case("hard-ceiling-cost-below-limit", TB, {**_CEILING, "downgrade": {"hardCeiling": {"cost": "249.99"}}},
         "downgrade.hardCeiling.cost is below limits.cost.amount: the ceiling is absolute and must be at least the limit",
         "downgrade.hardCeiling.cost (249.99) is below limits.cost.amount (250.00)"),
    # ModelRoute: references between fields
    Case("backend-names-repeated", MR, {"backends.1.name": "small", "rules": [], "fallbacks": []},
         "backend names must be unique within spec.backends", "backend names must be unique, duplicated: small"),
    Case("default-backend-unknown", MR, {"defaultBackend": "nope"},
         "defaultBackend must name a backend in spec.backends", "defaultBackend names unknown backend 'nope'"),
    Case("rule-backend-unknown", MR, {"rules.0.backend": "huge"},
         "each rules[].backend must name a backend in spec.backends", "rules[0].backend names unknown backend 'huge'"),
    Case("fallback-unknown", MR, {"fallbacks": ["small", "ghost"]},
         "each fallbacks[] entry must name a backend in spec.backends", "fallbacks[1] names unknown backend 'ghost'"),
    Case("downgrade-backend-unknown", MR, {"downgradeBackend": "ghost"},
         "downgradeBackend must name a backend in spec.backends", "downgradeBackend names unknown backend 'ghost'"),
    Case("currencies-mixed", MR, {"backends.1.pricing.currency": "EUR"},
         "all backends must price in one currency (spec.backends[].pricing.currency)",
         "all backends must price in one currency, got EUR, USD"),
    Case("prompt-token-bounds-crossed", MR, {"rules.0.match": {"minPromptTokens": 10, "maxPromptTokens": 5}},
         "minPromptTokens must not be above maxPromptTokens", "minPromptTokens 10 > maxPromptTokens 5",
         "spec.rules[0].match"),
    # ModelRoute: scaling
    Case("scaling-without-workload", MR, {"backends.0.scaling": {"maxReplicas": 2}},
         "scaling needs deploymentRef (the workload to scale)",
         "backends[0] (small): scaling needs deploymentRef", "spec.backends[0]"),
    Case("replicas-crossed", MR, {"backends.0": _scaled(minReplicas=3)},
         "minReplicas must not be above maxReplicas", "minReplicas 3 > maxReplicas 2", "spec.backends[0].scaling"),
    Case("stabilization-zero", MR, {"backends.0": _scaled(scaleDownStabilization="0s")},
         "scaleDownStabilization must be longer than 0s", "scaleDownStabilization must be longer than 0s, got '0s'",
         "spec.backends[0].scaling.scaleDownStabilization"),
    Case("idle-to-zero-zero", MR, {"backends.0": _scaled(idleToZeroAfter="0m")},
         "idleToZeroAfter must be longer than 0s", "idleToZeroAfter must be longer than 0s, got '0m'",
         "spec.backends[0].scaling.idleToZeroAfter"),
    Case("wake-timeout-zero", MR, {"backends.0": _scaled(wake={"timeout": "0s0m"})},
         "wake.timeout must be longer than 0s", "wake.timeout must be longer than 0s, got '0s0m'",
         "spec.backends[0].scaling.wake.timeout"),
    Case("wake-fallback-without-another", MR, {"backends.0": _scaled(wake={"mode": "Fallback"}), "fallbacks": ["small"]},
         "scaling.wake.mode Fallback needs spec.fallbacks to name another backend (requests go there while the "
         "workload is at zero)", "scaling.wake.mode Fallback needs spec.fallbacks to name another backend"),
    # ModelRoute: spending less (api/spend.py)
    Case("tier-names-repeated", MR, {"tiers": [TWO_TIERS[0], {**TWO_TIERS[1], "name": "small"}]},
         "tiers: names must be unique", "tiers: names must be unique, duplicated: small"),
    Case("tier-backend-unknown", MR, {"tiers": [TWO_TIERS[0], {**TWO_TIERS[1], "backends": ["big", "ghost"]}]},
         "each tiers[].backends[] entry must name a backend in spec.backends",
         "tiers[1].backends[1] names unknown backend 'ghost'"),
    Case("tier-scores-not-ascending", MR, {"tiers": [{**TWO_TIERS[0], "minScore": 40}, TWO_TIERS[1]]},
         "tiers go cheapest first: each tier's minScore must be above the previous tier's",
         "tiers[1].minScore 40 must be above tiers[0].minScore 40"),
    Case("judge-with-one-tier", MR, {"tiers": TWO_TIERS[:1], "judge": {"backend": "small"}},
         "judge: needs at least two tiers to decide between", "judge: needs at least two tiers to decide between"),
    Case("judge-backend-unknown", MR, {"tiers": TWO_TIERS, "judge": {"backend": "ghost"}},
         "judge.backend must name a backend in spec.backends", "judge.backend names unknown backend 'ghost'"),
    Case("escalation-without-tiers", MR, {"escalation": {"enabled": True}},
         "escalation: needs at least two tiers (it retries on the next one); add tiers or set escalation.enabled false",
         "escalation: needs at least two tiers"),
]
