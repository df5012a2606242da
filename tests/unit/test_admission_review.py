"""render/review.py (what the validating webhook answers) and the webhook plumbing's pure parts."""
from __future__ import annotations

import copy
import datetime

import pytest

from spendwarden.controller.webhooks import WebhookSettings, service_client_config
from spendwarden.render.review import review
from spendwarden.tls import WebhookTLS, issue_webhook_tls, webhook_tls_problem
from tests.support.manifests import GOOD_BUDGET, GOOD_ROUTE


def obj(kind, name, spec, ts="2026-01-01T00:00:00Z", **meta):
    return {"kind": kind, "metadata": {"name": name, "creationTimestamp": ts, **meta}, "spec": spec}


def route(name, ts="2026-01-01T00:00:00Z", **changes):
    return obj("ModelRoute", name, {**copy.deepcopy(GOOD_ROUTE), **changes}, ts)


def test_invalid_specs_get_the_operators_message():
    bad = {**GOOD_BUDGET, "thresholds": [80, 50]}
    assert review("TokenBudget", obj("TokenBudget", "b", bad), None).error == \
        "spec: thresholds must be strictly ascending, got [80, 50]"
    r = route("r", rules=[{"match": {"minPromptTokens": 1}, "backend": "huge"}])
    assert review("ModelRoute", r, None).error == "spec: rules[0].backend names unknown backend 'huge' (known: big, small)"
    assert review("ModelRoute", route("ok"), None).error is None


def test_unchanged_spec_and_deletion_are_never_blocked():
    bad = route("r", defaultBackend="huge")
    assert review("ModelRoute", bad, copy.deepcopy(bad)).error is None  # e.g. a label added
    gone = copy.deepcopy(bad)
    gone["metadata"]["deletionTimestamp"] = "2026-01-02T00:00:00Z"
    assert review("ModelRoute", gone, bad).error is None
    assert review("ModelRoute", route("r", defaultBackend="huge"), route("r")).error  # a spec change is checked


def test_duplicate_alias_follows_the_operators_order():
    first = route("first", "2026-01-01T00:00:00Z")
    new = route("second", "2026-01-02T00:00:00Z")
    assert review("ModelRoute", new, None, [first]).error == \
        "spec.model: alias 'chat' is already served by ModelRoute 'first'"
    assert review("ModelRoute", first, route("first"), [first, new]).error is None  # the older one keeps it
    assert review("ModelRoute", route("x", ts=None), None, [first]).error  # not stamped yet: newest
    assert review("ModelRoute", new, None, [route("first", model="other")]).error is None
    assert review("ModelRoute", new, None, [route("first", defaultBackend="huge")]).error is None  # invalid: serves nothing
    dying = route("first")
    dying["metadata"]["deletionTimestamp"] = "2026-01-03T00:00:00Z"
    assert review("ModelRoute", new, None, [dying]).error is None
    assert review("ModelRoute", new, None, None).error is None  # unknown siblings: no cross-object check


def test_budget_for_unknown_routes_only_warns():
    b = obj("TokenBudget", "b", {**GOOD_BUDGET, "routes": ["chat", "nope"]})
    result = review("TokenBudget", b, None, [route("r")])
    assert result.error is None and result.warnings == ["spec.routes: no ModelRoute in this namespace serves 'nope' yet"]
    assert review("TokenBudget", b, None, None).warnings == []


def test_webhook_settings_from_env():
    assert not WebhookSettings.from_env({}).enabled
    local = WebhookSettings.from_env({"SPENDWARDEN_WEBHOOK_PORT": "9555"})
    assert local.enabled and not local.in_cluster and local.port == 9555 and local.addr == "127.0.0.1"
    assert local.hosts() == ["localhost", "127.0.0.1"] and local.service_ref() is None
    assert (local.pod_failure_policy, local.validation_failure_policy) == ("Ignore", "Fail")
    incl = WebhookSettings.from_env({"SPENDWARDEN_WEBHOOK_PORT": "9443", "SPENDWARDEN_WEBHOOK_SERVICE": "sw-webhook",
                                     "SPENDWARDEN_POD_NAMESPACE": "ops", "SPENDWARDEN_WEBHOOK_FAILURE_POLICY": "fail"})
    assert incl.in_cluster and incl.addr == "0.0.0.0" and incl.pod_failure_policy == "Fail"
    assert incl.hosts()[0] == "sw-webhook.ops.svc"
    assert incl.service_ref() == {"namespace": "ops", "name": "sw-webhook", "port": 443}
    with pytest.raises(ValueError):
        WebhookSettings.from_env({"SPENDWARDEN_WEBHOOK_FAILURE_POLICY": "Maybe"})


def test_service_client_config_keeps_path_and_ca_bundle():
    cfg = service_client_config({"url": "https://localhost:9443", "caBundle": "Q0E="}, {"namespace": "ops", "name": "s", "port": 443})
    assert cfg == {"service": {"namespace": "ops", "name": "s", "port": 443}, "caBundle": "Q0E="}
    cfg = service_client_config({"url": "https://localhost:9443/root"}, {"namespace": "ops", "name": "s", "port": 443})
    assert cfg["service"]["path"] == "/root"


def test_webhook_tls_reuse_rotation_and_secret_round_trip():
    hosts = ["svc.ns.svc", "svc"]
    tls = issue_webhook_tls(hosts)
    assert webhook_tls_problem(tls, hosts) is None
    assert webhook_tls_problem(None, hosts) == "absent"
    assert webhook_tls_problem(tls, ["other"]) == "does not name other"
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=340)
    assert webhook_tls_problem(tls, hosts, now=soon).startswith("expires")
    assert WebhookTLS.from_secret_data(tls.secret_data()) == tls
    assert WebhookTLS.from_secret_data({"tls.crt": "x"}) is None
    other = issue_webhook_tls(hosts)
    mixed = WebhookTLS(ca_cert=other.ca_cert, ca_key=other.ca_key, cert=tls.cert, key=tls.key)
    assert webhook_tls_problem(mixed, hosts).startswith("unusable")
    renewed = issue_webhook_tls(hosts, tls)
    assert renewed.ca_cert == tls.ca_cert and renewed.cert != tls.cert
    near_ca_end = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3640)
    assert issue_webhook_tls(hosts, tls, now=near_ca_end).ca_cert != tls.ca_cert


def test_webhook_tls_files_serve_tls(tmp_path):
    import ssl
    tls = issue_webhook_tls(["localhost", "127.0.0.1"])
    pem, ca = tls.write(tmp_path)
    ctx = ssl.create_default_context(purpose=ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pem, pem)  # kopf's WebhookServer is given the same file for both
    client = ssl.create_default_context(cafile=str(ca))
    assert client.get_ca_certs()
    assert oct(pem.stat().st_mode & 0o777) == "0o600"


def test_cert_store_rotates_the_files_locally():
    from spendwarden.controller.webhooks import CertStore
    store = CertStore(WebhookSettings.from_env({"SPENDWARDEN_WEBHOOK_PORT": "9443"}))
    try:
        assert store.ensure() == "absent"
        first_pem, first_ca = store.certfile.read_bytes(), store.cafile.read_bytes()
        assert store.ensure() is None and store.certfile.read_bytes() == first_pem
        later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=340)
        assert store.ensure(now=later).startswith("expires")
        assert store.certfile.read_bytes() != first_pem and store.cafile.read_bytes() == first_ca
    finally:
        store.cleanup()
    assert not store.dir.exists()


def test_a_budget_whose_money_limit_cannot_add_up_its_routes_costs_is_refused():
    eur = copy.deepcopy(GOOD_ROUTE)
    for b in eur["backends"]:
        b["pricing"]["currency"] = "EUR"
    siblings = [route("chat"), obj("ModelRoute", "euro", {**eur, "model": "euro"})]
    verdict = review("TokenBudget", obj("TokenBudget", "b", GOOD_BUDGET), None, siblings)
    assert verdict.error and verdict.error.startswith("spec.limits.cost.currency: USD, but ModelRoute 'euro' (EUR)")
    assert "still enforced" not in verdict.error  # refused: nothing is enforced yet
    scoped = {**GOOD_BUDGET, "routes": ["chat"]}
    assert review("TokenBudget", obj("TokenBudget", "b", scoped), None, siblings).error is None
    euro_budget = copy.deepcopy(GOOD_BUDGET)
    euro_budget["limits"]["cost"]["currency"] = "EUR"
    assert "ModelRoute 'chat' (USD)" in review("TokenBudget", obj("TokenBudget", "b", euro_budget), None, siblings).error


def test_a_route_priced_in_another_currency_than_a_budget_only_warns():
    # Warned, not refused: a namespace moving to another currency changes routes and budgets, and
    # the budget side is refused already, so refusing here too would block both orders.
    eur = copy.deepcopy(GOOD_ROUTE)
    for b in eur["backends"]:
        b["pricing"]["currency"] = "EUR"
    usd_budget = obj("TokenBudget", "team", GOOD_BUDGET)
    verdict = review("ModelRoute", obj("ModelRoute", "chat", eur), None, [], [usd_budget])
    assert verdict.error is None
    assert verdict.warnings == ["spec.backends[].pricing.currency: EUR, but TokenBudget 'team' limits cost in USD; "
                                "costs are never converted, so that budget reports CurrencyMismatch until both use "
                                "one currency"]
    assert review("ModelRoute", route("chat"), None, [], [usd_budget]).warnings == []
    other_routes = obj("TokenBudget", "scoped", {**GOOD_BUDGET, "routes": ["other"]})
    tokens_only = obj("TokenBudget", "tokens", {k: v for k, v in GOOD_BUDGET.items() if k != "limits"}
                      | {"limits": {"tokens": {"total": 1000}}})
    dying = copy.deepcopy(usd_budget)
    dying["metadata"]["deletionTimestamp"] = "2026-01-03T00:00:00Z"
    assert review("ModelRoute", obj("ModelRoute", "chat", eur), None, [], [other_routes, tokens_only, dying]).warnings == []
    assert review("ModelRoute", obj("ModelRoute", "chat", eur), None, None, None).warnings == []
