"""The bad inputs we have tried: each must be refused with a message that names the field."""
from __future__ import annotations

import pytest

from spendwarden.api.validation import validate_spec
from tests.support.manifests import DELETE, GOOD_BUDGET, GOOD_ROUTE, with_change

BAD_ROUTES = [
    ("rules.0.backend", "huge", "rules[0].backend names unknown backend 'huge'"),
    ("defaultBackend", "nope", "defaultBackend names unknown backend 'nope'"),
    ("fallbacks", ["small", "ghost"], "fallbacks[1] names unknown backend 'ghost'"),
    ("backends.0.pricing.input", "-1", "spec.backends[0].pricing.input: String should match pattern"),
    ("backends.0.pricing.output", 0.6, "spec.backends[0].pricing.output: Input should be a valid string"),
    ("backends.0.pricing.output", "9" * 16, "spec.backends[0].pricing.output: String should match pattern"),
    ("backends.0.provider", "Gemini", "spec.backends[0].provider: Input should be 'OpenAI', 'Anthropic' or 'OpenAICompatible'"),
    ("backends.0.url", "ftp://x", "spec.backends[0].url: String should match pattern"),
    ("backends.1.name", "small", "backend names must be unique, duplicated: small"),
    ("backends", [], "spec.backends: List should have at least 1 item"),
    ("model", DELETE, "spec.model: Field required"),
    ("rules.0.match", {"minPromptTokens": 10, "maxPromptTokens": 5}, "minPromptTokens 10 > maxPromptTokens 5"),
    ("backends.0.timeoutSeconds", 0, "spec.backends[0].timeoutSeconds: Input should be greater than or equal to 1"),
    ("backends.1.pricing.currency", "EUR", "all backends must price in one currency"),
    ("surprise", 1, "spec.surprise: Extra inputs are not permitted"),
    ("backends.0.credentials", {"secretRef": {"name": "/some/other/dir"}},
     "spec.backends[0].credentials.secretRef.name: String should match pattern"),
    ("backends.0.credentials", {"secretRef": {"name": "../other"}}, "credentials.secretRef.name: String should match"),
    ("backends.0.credentials", {"secretRef": {"name": "OpenAI"}}, "credentials.secretRef.name: String should match"),
    ("backends.0.credentials", {"secretRef": {"name": "openai", "key": "../../etc/passwd"}},
     "spec.backends[0].credentials.secretRef.key: String should match pattern"),
    ("backends.0.credentials", {"secretRef": {"name": "openai", "key": ".."}}, "credentials.secretRef.key: String"),
    ("backends.0.credentials", {"secretRef": {"name": "openai", "key": "..data"}}, "credentials.secretRef.key: String"),
    ("limits", {"maxTokens": 0}, "spec.limits.maxTokens: Input should be greater than or equal to 1"),
]

BAD_BUDGETS = [
    ("thresholds", [80, 50], "thresholds must be strictly ascending, got [80, 50]"),
    ("thresholds", [50, 50], "thresholds must be strictly ascending"),
    ("thresholds", [0, 150], "threshold 0 is outside 1..100"),
    ("window", "24h", "set either period or window, not both"),
    ("period", DELETE, "one of period or window is required"),
    ("period.type", "Hourly", "spec.period.type: Input should be 'Daily', 'Weekly' or 'Monthly'"),
    ("period.timeZone", "Mars/Olympus", "unknown timeZone 'Mars/Olympus'"),
    ("limits", {}, "limits needs tokens or cost"),
    ("limits.tokens", {}, "limits.tokens needs at least one of total, input, output"),
    ("limits.tokens.total", -5, "spec.limits.tokens.total: Input should be greater than or equal to 1"),
    ("limits.cost.amount", "ten", "spec.limits.cost.amount: String should match pattern"),
    ("limits.cost.amount", 10.5, "spec.limits.cost.amount: Input should be a valid string"),
    ("limits.cost.amount", "1" + "0" * 15, "spec.limits.cost.amount: String should match pattern"),  # > 15 digits
    ("limits.cost.amount", "1e999999", "spec.limits.cost.amount: String should match pattern"),
    ("limits.cost.currency", "usd", "spec.limits.cost.currency: String should match pattern"),
    ("onExceeded", "Explode", "spec.onExceeded: Input should be 'CutOff', 'Downgrade' or 'AlertOnly'"),
    ("alerting", {"webhookSecretRef": {"name": "a/b"}}, "spec.alerting.webhookSecretRef.name: String should match"),
    ("alerting", {"webhookSecretRef": {"name": "hook", "key": "x/y"}}, "webhookSecretRef.key: String should match"),
    ("failMode", "Maybe", "spec.failMode: Input should be 'Open' or 'Closed'"),
]


def test_good_specs_validate():
    assert validate_spec("ModelRoute", GOOD_ROUTE)[1] is None
    assert validate_spec("TokenBudget", GOOD_BUDGET)[1] is None
    assert validate_spec("TokenBudget", with_change(GOOD_BUDGET, "limits.cost.amount", "9" * 15 + ".99"))[1] is None
    for name, key in [("openai", "apiKey"), ("team-a.openai-1", "API_KEY.v2"), ("o", ".hidden"), ("a" * 253, "k")]:
        route = with_change(GOOD_ROUTE, "backends.0.credentials", {"secretRef": {"name": name, "key": key}})
        assert validate_spec("ModelRoute", route)[1] is None, (name, key)


@pytest.mark.parametrize("path,value,expected", BAD_ROUTES, ids=[b[0] for b in BAD_ROUTES])
def test_bad_modelroute_is_refused_precisely(path, value, expected):
    spec, message = validate_spec("ModelRoute", with_change(GOOD_ROUTE, path, value))
    assert spec is None
    assert expected in message


@pytest.mark.parametrize("path,value,expected", BAD_BUDGETS, ids=[b[0] for b in BAD_BUDGETS])
def test_bad_tokenbudget_is_refused_precisely(path, value, expected):
    spec, message = validate_spec("TokenBudget", with_change(GOOD_BUDGET, path, value))
    assert spec is None
    assert expected in message


def test_window_below_minimum_and_garbage_window():
    base = with_change(GOOD_BUDGET, "period", DELETE)
    assert "shorter than the 1m minimum" in validate_spec("TokenBudget", {**base, "window": "30s"})[1]
    assert "spec.window: String should match pattern" in validate_spec("TokenBudget", {**base, "window": "a day"})[1]


def test_spec_that_is_not_an_object():
    assert validate_spec("TokenBudget", "x")[1] == "spec: must be an object"
    assert validate_spec("ModelRoute", None)[1] == "spec: must be an object"
