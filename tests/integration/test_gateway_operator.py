"""Gateway mode's control plane on the real apiserver (issue #13): a real operator process with the
gateway enabled writes, for a namespace labelled spendwarden.io/mode=gateway, its key of the gateway's
ConfigMap (the same JSON as its own spendwarden-proxy ConfigMap), the credentials a shared Secret of
the gateway namespace gives it (and a CredentialsReady=False condition for one not shared), and its
egress NetworkPolicy; the ledger takes the gateway's reports and refuses the tenant's own; a cut-off
reported by the gateway reopens no address; all of it goes when the namespace returns to sidecar mode. Control plane only (SPENDWARDEN_TEST_NODE=0 works)."""
from __future__ import annotations

import base64
import uuid

import httpx
import pytest
from kubernetes import client

from spendwarden.ledger.allowance import Amount
from spendwarden.render import gateway as gw
from tests.support.cluster import cut_off_policy
from tests.support.ledger_cluster import GROUP, VERSION, Operator, SimProxy, create_budget, sa_token
from tests.support.operator_process import wait_for

SUFFIX = uuid.uuid4().hex[:6]
GWNS = f"gwx-gateway-{SUFFIX}"
TENANT = f"gwx-team-{SUFFIX}"
INFERENCE = f"gwx-inference-{SUFFIX}"


def route(name, secret):
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelRoute", "metadata": {"name": name}, "spec": {
        "model": name, "defaultBackend": "b", "backends": [{
            "name": "b", "provider": "OpenAI", "url": "https://api.openai.com/v1", "model": "gpt-4.1",
            "pricing": {"input": "1", "output": "2"}, "credentials": {"secretRef": {"name": secret, "key": "apiKey"}}}]}}


@pytest.fixture(scope="module")
def setup(control_plane, kube, tmp_path_factory):
    core = client.CoreV1Api(kube)
    core.create_namespace({"metadata": {"name": GWNS}})
    core.create_namespace({"metadata": {"name": TENANT, "labels": {gw.MODE_LABEL: "gateway"}}})
    core.create_namespaced_secret(GWNS, {"metadata": {"name": "openai", "annotations": {
        gw.TENANTS_ANNOTATION: f"someone-else, {TENANT}"}}, "stringData": {"apiKey": "sk-shared"}})
    core.create_namespaced_secret(GWNS, {"metadata": {"name": "anthropic"}, "stringData": {"apiKey": "sk-private"}})
    custom = client.CustomObjectsApi(kube)
    for name, secret in (("chat", "openai"), ("claude", "anthropic")):
        custom.create_namespaced_custom_object(GROUP, VERSION, TENANT, "modelroutes", route(name, secret))
    op = Operator(control_plane, tmp_path_factory.mktemp("gateway"), pattern="gwx-*",
                  env={"SPENDWARDEN_GATEWAY_NAMESPACE": GWNS, "SPENDWARDEN_GATEWAY_EGRESS_CIDRS": "198.51.100.0/24"})
    op.start()
    yield op
    op.stop()
    for ns in (TENANT, GWNS):
        core.delete_namespace(ns)


def gateway_config(kube) -> dict:
    return client.CoreV1Api(kube).read_namespaced_config_map(gw.CONFIGMAP_NAME, GWNS).data or {}


def credentials(kube) -> dict:
    return client.CoreV1Api(kube).read_namespaced_secret(gw.CREDENTIALS_SECRET, GWNS).data or {}


def egress_policy(kube):
    try:
        return client.NetworkingV1Api(kube).read_namespaced_network_policy(gw.EGRESS_POLICY_NAME, TENANT)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def condition(kube, name) -> dict | None:
    obj = client.CustomObjectsApi(kube).get_namespaced_custom_object(GROUP, VERSION, TENANT, "modelroutes", name)
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == "CredentialsReady"), None)


def test_a_gateway_mode_namespace_gets_its_config_credentials_and_egress_policy(setup, kube):
    core = client.CoreV1Api(kube)
    data = wait_for(lambda: gateway_config(kube).get(f"{TENANT}.json"), timeout=60, what="the tenant's gateway config")
    own = core.read_namespaced_config_map("spendwarden-proxy", TENANT).data["config.json"]
    assert data == own  # byte for byte what the namespace's own ConfigMap holds (still written)
    keys = wait_for(lambda: credentials(kube), what="the gateway credentials Secret")
    assert keys == {f"{TENANT}_openai_apiKey": base64.b64encode(b"sk-shared").decode()}  # anthropic: not shared
    cond = wait_for(lambda: condition(kube, "claude"), what="CredentialsReady on claude")
    assert (cond["status"], cond["reason"]) == ("False", "SecretNotShared")
    assert gw.TENANTS_ANNOTATION in cond["message"] and "anthropic" in cond["message"]
    assert wait_for(lambda: condition(kube, "chat"), what="CredentialsReady on chat")["status"] == "True"
    policy = wait_for(lambda: egress_policy(kube), what="the egress NetworkPolicy")
    assert policy.spec.policy_types == ["Egress"]
    cidrs = {b.ip_block.cidr for rule in policy.spec.egress for b in rule.to or [] if b.ip_block}
    assert "198.51.100.0/24" in cidrs and "0.0.0.0/0" not in cidrs


def test_the_ledger_takes_the_gateways_reports_and_refuses_the_tenants_own(setup, kube):
    body = {"proxyId": "p", "namespace": TENANT, "seq": 1, "budgets": {}}
    gateway = sa_token(kube, GWNS, "spendwarden-gateway")
    tenant = sa_token(kube, TENANT, "app")
    ok = httpx.post(f"{setup.url}/v1/report", json=body, headers={"Authorization": f"Bearer {gateway}"}, timeout=10)
    assert ok.status_code == 200, ok.text
    refused = httpx.post(f"{setup.url}/v1/report", json=body, headers={"Authorization": f"Bearer {tenant}"}, timeout=10)
    assert refused.status_code == 403 and "gateway mode" in refused.json()["error"]


async def test_a_cut_off_in_gateway_mode_opens_no_address_and_the_egress_policy_denies_its_namespaces(setup, kube):
    """Reported by the gateway's token (the tenant's own is refused): the budget is spent, the cut-off's
    policy has no every-other-address rule (it would reopen the internet) and the egress policy leaves
    out the inference namespace the cut-off denies; a raised limit gives both back."""
    core, custom = client.CoreV1Api(kube), client.CustomObjectsApi(kube)
    core.create_namespace({"metadata": {"name": INFERENCE}})
    local = route("local", "openai")
    local["spec"]["backends"][0].update(provider="OpenAICompatible", url=f"http://vllm.{INFERENCE}.svc:8000/v1")
    custom.create_namespaced_custom_object(GROUP, VERSION, TENANT, "modelroutes", local)
    start = create_budget(kube, TENANT, "monthly", {"period": {"type": "Monthly"}, "limits": {"tokens": {"total": 10_000}},
                                                    "onExceeded": "CutOff"})["status"]["periodStart"]
    async with httpx.AsyncClient() as http:
        p = SimProxy(http, setup.url, sa_token(kube, GWNS, "spendwarden-gateway"), TENANT, start, budget="monthly")
        p.allowance.used = Amount(5_000, 5_000)
        assert await p.report()
    cut = wait_for(lambda: cut_off_policy(kube, TENANT), timeout=30, what="the cut-off policy")
    assert not any(peer.ip_block for rule in cut.spec.egress for peer in rule.to or [])

    def excluded() -> list[str]:
        policy = egress_policy(kube)
        exprs = [e for rule in policy.spec.egress for peer in rule.to or [] if peer.namespace_selector
                 for e in peer.namespace_selector.match_expressions or []]
        return [v for e in exprs for v in e.values]

    wait_for(lambda: excluded() == [INFERENCE], timeout=30, what="the egress policy without the inference namespace")
    custom.patch_namespaced_custom_object(GROUP, VERSION, TENANT, "tokenbudgets", "monthly",
                                          {"spec": {"limits": {"tokens": {"total": 100_000}}}})
    wait_for(lambda: cut_off_policy(kube, TENANT) is None, timeout=30, what="the cut-off lifted")
    wait_for(lambda: excluded() == [], timeout=30, what="the egress policy back to every namespace")
    core.delete_namespace(INFERENCE)


def test_leaving_gateway_mode_removes_the_key_the_credentials_and_the_policy(setup, kube):
    core = client.CoreV1Api(kube)
    core.patch_namespace(TENANT, {"metadata": {"labels": {gw.MODE_LABEL: "sidecar"}}})
    wait_for(lambda: egress_policy(kube) is None, what="the egress policy removed")
    wait_for(lambda: f"{TENANT}.json" not in gateway_config(kube), what="the tenant's key removed")
    wait_for(lambda: not credentials(kube), what="the tenant's credentials removed")
    wait_for(lambda: condition(kube, "claude") is None, what="CredentialsReady removed")
