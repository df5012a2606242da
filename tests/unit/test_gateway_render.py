"""render/gateway.py: a namespace's mode, the gateway's ConfigMap and credentials, the tenants'
egress policy and the ledger's trust in gateway mode (issue #13)."""
from __future__ import annotations

import json

import pytest

from spendwarden.render import gateway as gw
from spendwarden.render.proxyconfig import config_json, render_proxy_config

ON = gw.GatewaySettings(namespace="spendwarden-gw")
OFF = gw.GatewaySettings()
GATEWAY = {gw.MODE_LABEL: "gateway"}
SIDECAR = {gw.MODE_LABEL: "sidecar"}
OPEN = {**GATEWAY, gw.EGRESS_LABEL: "open"}


def route(name, alias, refs):
    backends = [{"name": f"b{i}", "provider": "OpenAI", "url": "https://api.openai.com/v1", "model": "gpt-4.1",
                 "pricing": {"input": "1", "output": "2"},
                 **({"credentials": {"secretRef": {"name": s, "key": k}}} if s else {})}
                for i, (s, k) in enumerate(refs)]
    return {"kind": "ModelRoute", "metadata": {"name": name}, "spec": {"model": alias, "backends": backends,
                                                                       "defaultBackend": "b0"}}


def config(ns, *routes):
    return render_proxy_config(ns, list(routes), [], "http://ledger.sw.svc:8081").config


def secret(data, tenants=None):
    return gw.GatewaySecret({gw.TENANTS_ANNOTATION: tenants} if tenants is not None else {}, data)


# -- modes

@pytest.mark.parametrize("labels, settings, mode", [
    (None, ON, "sidecar"), ({}, ON, "sidecar"), (GATEWAY, ON, "gateway"), (SIDECAR, ON, "sidecar"),
    ({}, gw.GatewaySettings(namespace="g", default_mode="gateway"), "gateway"),
    (SIDECAR, gw.GatewaySettings(namespace="g", default_mode="gateway"), "sidecar"),
    (GATEWAY, OFF, "sidecar"),  # the chart did not enable the gateway
])
def test_mode_is_the_label_else_the_default_and_needs_the_gateway_enabled(labels, settings, mode):
    assert gw.namespace_mode("team-a", labels, settings).mode == mode


def test_a_gateway_label_without_the_gateway_is_explained():
    assert "gateway.enabled" in gw.namespace_mode("team-a", GATEWAY, OFF).note
    assert gw.namespace_mode("team-a", SIDECAR, OFF).note is None
    assert "unknown" in gw.namespace_mode("team-a", {gw.MODE_LABEL: "Gateway"}, ON).note


def test_the_gateway_namespace_and_system_namespaces_are_never_tenants():
    default_gateway = gw.GatewaySettings(namespace="spendwarden-gw", default_mode="gateway")
    assert gw.namespace_mode("spendwarden-gw", GATEWAY, default_gateway).mode == "sidecar"
    assert gw.namespace_mode("kube-system", {}, default_gateway).mode == "sidecar"


def test_settings_from_the_chart_environment():
    s = gw.GatewaySettings.from_env({"SPENDWARDEN_GATEWAY_NAMESPACE": "gw", "SPENDWARDEN_DEFAULT_MODE": "Gateway",
                                     "SPENDWARDEN_GATEWAY_SERVICE_ACCOUNT": "gwsa",
                                     "SPENDWARDEN_GATEWAY_EGRESS_CIDRS": "10.0.0.0/8, 192.168.1.0/24"})
    assert (s.enabled, s.namespace, s.service_account, s.default_mode) == (True, "gw", "gwsa", "gateway")
    assert s.egress_cidrs == ("10.0.0.0/8", "192.168.1.0/24")
    assert s.base_url() == "http://spendwarden-gateway.gw.svc:8787"
    assert not gw.GatewaySettings.from_env({}).enabled
    with pytest.raises(ValueError, match="gateway or sidecar"):
        gw.GatewaySettings.from_env({"SPENDWARDEN_DEFAULT_MODE": "proxy"})


# -- the ConfigMap

def test_config_data_is_each_tenants_proxy_config_json_sorted():
    a, b = config("team-a", route("chat", "chat", [("openai", "apiKey")])), config("team-b")
    data = gw.gateway_config_data({"team-b": config_json(b), "team-a": config_json(a)})
    assert data.fits and list(data.data) == ["team-a.json", "team-b.json"]
    assert data.data["team-a.json"] == config_json(a)  # byte for byte the spendwarden-proxy ConfigMap's
    assert json.loads(data.data["team-a.json"])["ledger"]["url"] == "http://ledger.sw.svc:8081"
    manifest = gw.configmap_manifest("spendwarden-gw", data.data)
    assert manifest["metadata"]["name"] == "spendwarden-gateway-config"
    assert manifest["metadata"]["namespace"] == "spendwarden-gw" and manifest["data"] == data.data


def test_config_data_that_would_exceed_the_bound_names_who_does_not_fit():
    body = "x" * 400
    data = gw.gateway_config_data({"a": body, "b": body, "c": body}, max_bytes=900)
    assert not data.fits and data.left_out == ("c",)
    assert gw.MAX_CONFIGMAP_BYTES == 900 * 1024


# -- the credentials

def test_credentials_are_given_only_to_tenants_the_secret_is_shared_with():
    tenants = {"team-a": config("team-a", route("chat", "chat", [("openai", "apiKey"), ("anthropic", "key")])),
               "team-b": config("team-b", route("emb", "emb", [("openai", "apiKey")]))}
    secrets = {"openai": secret({"apiKey": "c2stb3Blbg=="}, "team-a, team-b"),
               "anthropic": secret({"key": "c2stYW50"}, "*")}
    sel = gw.select_credentials(tenants, secrets, "spendwarden-gw")
    assert sel.data == {"team-a_anthropic_key": "c2stYW50", "team-a_openai_apiKey": "c2stb3Blbg==",
                        "team-b_openai_apiKey": "c2stb3Blbg=="}
    assert list(sel.data) == sorted(sel.data)
    assert sel.problems == {} and sel.routes == {("team-a", "chat"), ("team-b", "emb")}
    manifest = gw.credentials_manifest("spendwarden-gw", sel.data)
    assert manifest["metadata"]["name"] == "spendwarden-gateway-credentials" and manifest["data"] == sel.data


@pytest.mark.parametrize("secrets, reason", [
    ({}, "SecretNotFound"),
    ({"openai": secret({"apiKey": "eA=="})}, "SecretNotShared"),                 # no annotation
    ({"openai": secret({"apiKey": "eA=="}, "team-b,team-c")}, "SecretNotShared"),  # another tenant's
    ({"openai": secret({"apiKey": "eA=="}, "")}, "SecretNotShared"),
    ({"openai": secret({"other": "eA=="}, "*")}, "KeyNotFound"),
])
def test_a_credential_not_shared_is_left_out_with_the_reason(secrets, reason):
    tenants = {"team-a": config("team-a", route("chat", "chat", [("openai", "apiKey")]))}
    sel = gw.select_credentials(tenants, secrets, "spendwarden-gw")
    assert sel.data == {}
    [problem] = sel.problems[("team-a", "chat")]
    assert problem.reason == reason and "openai" in problem.message
    if reason == "SecretNotShared":
        assert gw.TENANTS_ANNOTATION in problem.message and "team-a" in problem.message


def test_key_names_split_at_the_first_two_underscores():
    key = gw.credential_key("team-a", "openai.keys", "api_key_2")
    assert key == "team-a_openai.keys_api_key_2"
    assert key.split("_", 2) == ["team-a", "openai.keys", "api_key_2"]


def test_routes_get_a_credentials_condition_and_lose_it_outside_gateway_mode():
    problem = gw.CredentialProblem("SecretNotShared", "not shared")
    conds = gw.credentials_condition({"conditions": [{"type": "Ready", "status": "True"}]}, [problem], 3, None)
    assert conds[0] == {"type": "Ready", "status": "True"}
    assert {k: conds[1][k] for k in ("type", "status", "reason", "message")} == {
        "type": "CredentialsReady", "status": "False", "reason": "SecretNotShared", "message": "not shared"}
    ok = gw.credentials_condition({"conditions": conds}, None, 3, None)
    assert ok[1]["status"] == "True"
    assert gw.without_credentials_condition({"conditions": ok}) == [{"type": "Ready", "status": "True"}]
    assert gw.without_credentials_condition({"conditions": [{"type": "Ready"}]}) is None


# -- the egress policy

def test_egress_policy_allows_only_dns_cluster_pods_apiserver_and_allowed_cidrs():
    p = gw.egress_policy("team-a", [("10.96.0.1/32", 443), ("172.18.0.2/32", 6443), ("10.244.0.1/32", 6443)],
                         ["203.0.113.0/24"])
    assert p["kind"] == "NetworkPolicy" and p["metadata"]["name"] == "spendwarden-gateway-egress"
    assert p["metadata"]["namespace"] == "team-a"
    spec = p["spec"]
    assert spec["podSelector"] == {} and spec["policyTypes"] == ["Egress"]
    dns, pods, service, endpoints, allowed = spec["egress"]
    assert dns == {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
    assert pods == {"to": [{"namespaceSelector": {}}]}
    # The apiserver only on its port: its address is often the node's, whose other ports are not it.
    assert service == {"to": [{"ipBlock": {"cidr": "10.96.0.1/32"}}], "ports": [{"protocol": "TCP", "port": 443}]}
    assert endpoints == {"to": [{"ipBlock": {"cidr": c}} for c in ("10.244.0.1/32", "172.18.0.2/32")],
                         "ports": [{"protocol": "TCP", "port": 6443}]}
    assert allowed == {"to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}]}
    # Nothing opens the internet: no 0.0.0.0/0, no ::/0, no rule without a destination but DNS's.
    assert not any(b["ipBlock"]["cidr"] in ("0.0.0.0/0", "::/0") for r in spec["egress"][2:] for b in r["to"])
    assert [r for r in spec["egress"] if "to" not in r] == [dns]


def test_egress_policy_without_addresses_has_no_ip_rule():
    assert len(gw.egress_policy("team-a", [])["spec"]["egress"]) == 2


# -- the ledger's trust

def labels_of(table):
    return lambda ns: table.get(ns)


NS = {"team-a": GATEWAY, "team-b": {}, "team-c": OPEN}
GW = ("spendwarden-gw", "spendwarden-gateway")


@pytest.mark.parametrize("principal, target, reason", [
    (("team-b", "app"), "team-b", None),                    # sidecar mode: its own namespace
    (("team-b", "app"), "team-a", "forbidden_namespace"),    # never another namespace's
    (("team-a", "app"), "team-a", "gateway_mode"),           # gateway mode, egress enforced: only the gateway
    (("team-c", "app"), "team-c", None),                     # gateway mode while migrating (egress open)
    (GW, "team-a", None), (GW, "team-c", None),              # the gateway: any gateway-mode namespace
    (GW, "team-b", "forbidden_namespace"),                   # ... but no sidecar-mode one
    (("spendwarden-gw", "other"), "team-a", "forbidden_namespace"),  # another SA of the gateway namespace
])
def test_ledger_trust(principal, target, reason):
    refusal = gw.ledger_refusal(principal, target, labels_of(NS), ON)
    assert (refusal.reason if refusal else None) == reason


def test_ledger_trust_without_the_gateway_is_todays():
    assert gw.ledger_refusal(("team-a", "app"), "team-a", labels_of(NS), OFF) is None
    assert gw.ledger_refusal(GW, "team-a", labels_of(NS), OFF).reason == "forbidden_namespace"


def test_egress_policy_of_a_cut_namespace_excludes_the_namespaces_the_cut_off_denies():
    p = gw.egress_policy("team-a", [], [], cut_namespaces=["models", "inference"])
    assert p["spec"]["egress"][1] == {"to": [{"namespaceSelector": {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["inference", "models"]}]}}]}
