"""The operator as a real process against the real apiserver (+ kube-controller-manager)."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from spendwarden.api.proxyconfig import CONFIG_KEY, CONFIGMAP_NAME
from spendwarden.render.proxyconfig import configmap_manifest, render_proxy_config
from tests.support.operator_process import OperatorProcess, wait_for

from ..unit.test_api_validation import GOOD_BUDGET, GOOD_ROUTE

GROUP, VERSION = "spendwarden.io", "v1alpha1"


@pytest.fixture(scope="module")
def prices_file(tmp_path_factory):
    """The operator's pinned prices (the chart mounts them from the spendwarden-prices ConfigMap)."""
    path = tmp_path_factory.mktemp("prices") / "prices.yaml"
    path.write_text("pinned: []\n")
    return path


@pytest.fixture(scope="module")
def operator(control_plane, tmp_path_factory, prices_file):
    proc = OperatorProcess(str(control_plane.kubeconfig), tmp_path_factory.mktemp("operator") / "operator.log",
                           extra_args=["--namespace", "op-*"], env={"SPENDWARDEN_ROLLOVER_INTERVAL": "1", "SPENDWARDEN_DRIFT_INTERVAL": "1",
                                                                    "SPENDWARDEN_PRICES_FILE": str(prices_file),
                                                                    "SPENDWARDEN_PRICES_POLL_INTERVAL": "1"})
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def op_namespace(kube, request):
    """A namespace the operator under test watches (op-*); removed after the test."""
    import uuid
    name = f"op-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(kube)
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


def custom(kube):
    return client.CustomObjectsApi(kube)


def create(kube, ns, kind, name, spec):
    plural = {"ModelRoute": "modelroutes", "TokenBudget": "tokenbudgets"}[kind]
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": spec}
    return custom(kube).create_namespaced_custom_object(GROUP, VERSION, ns, plural, body)


def get(kube, ns, plural, name):
    return custom(kube).get_namespaced_custom_object(GROUP, VERSION, ns, plural, name)


def proxy_config(kube, ns):
    cm = client.CoreV1Api(kube).read_namespaced_config_map(CONFIGMAP_NAME, ns)
    return cm, json.loads(cm.data[CONFIG_KEY])


def configmap_gone(kube, ns) -> bool:
    try:
        client.CoreV1Api(kube).read_namespaced_config_map(CONFIGMAP_NAME, ns)
        return False
    except ApiException as exc:
        if exc.status != 404:
            raise
        return True


def condition(obj, type_):
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == type_), None)


def test_configmap_rendered_updated_and_removed_with_the_crs(operator, kube, op_namespace):
    ns = op_namespace
    route = create(kube, ns, "ModelRoute", "chat", GOOD_ROUTE)
    budget = create(kube, ns, "TokenBudget", "monthly", GOOD_BUDGET)

    cm, config = wait_for(lambda: (lambda c: c if len(c[1]["routes"]) == 1 and len(c[1]["budgets"]) == 1 else None)(
        proxy_config(kube, ns)), what="ConfigMap with the route and the budget")
    assert config["namespace"] == ns
    assert config["routes"][0]["spec"]["model"] == "chat"
    assert config["budgets"][0]["spec"]["limits"]["cost"]["amount"] == "250.00"
    assert {o.uid for o in cm.metadata.owner_references} == {route["metadata"]["uid"], budget["metadata"]["uid"]}

    tb = wait_for(lambda: (lambda o: o if o.get("status", {}).get("state") else None)(get(kube, ns, "tokenbudgets", "monthly")),
                  what="TokenBudget status")
    assert tb["status"]["state"] == "Active"
    assert tb["status"]["limitSummary"] == "1M tokens, 250.00 USD"
    assert tb["status"]["periodEnd"].endswith("T23:00:00Z") or tb["status"]["periodEnd"].endswith("T22:00:00Z")
    assert condition(tb, "Ready")["status"] == "True"
    mr = wait_for(lambda: (lambda o: o if o.get("status", {}).get("ready") else None)(get(kube, ns, "modelroutes", "chat")),
                  what="ModelRoute status")
    assert mr["status"]["ready"] == "True" and mr["status"]["backendCount"] == 2
    assert mr["status"]["observedGeneration"] == mr["metadata"]["generation"]

    # An update is rendered.
    patched = copy.deepcopy(GOOD_ROUTE)
    patched["limits"] = {"maxTokens": 512}
    custom(kube).patch_namespaced_custom_object(GROUP, VERSION, ns, "modelroutes", "chat", {"spec": patched})
    wait_for(lambda: proxy_config(kube, ns)[1]["routes"][0]["spec"].get("limits", {}).get("maxTokens") == 512,
             what="ConfigMap to carry the update")

    # kubectl shows the printer columns with live values.
    out = subprocess.run(["kubectl", "--kubeconfig", str(operator.kubeconfig), "get", "tb,mr", "-n", ns],
                         capture_output=True, text=True, check=True).stdout
    assert "LIMIT" in out and "1M tokens, 250.00 USD" in out and "Active" in out
    assert "MODEL" in out and "chat" in out and "True" in out

    # spendwarden status reads the same status, as a table and as JSON.
    status_cmd = [sys.executable, "-m", "spendwarden.cli", "status", "--kubeconfig", str(operator.kubeconfig), "-n", ns]
    table = subprocess.run(status_cmd, capture_output=True, text=True, check=True).stdout
    assert "monthly" in table and "0 tokens, 0 USD / 1M tokens, 250.00 USD" in table and "Active" in table
    rows = json.loads(subprocess.run(status_cmd + ["-o", "json"], capture_output=True, text=True, check=True).stdout)
    assert [(r["name"], r["percentUsed"], r["state"]) for r in rows] == [("monthly", 0, "Active")]

    # Deleting one CR re-renders without it; deleting the last removes the ConfigMap.
    custom(kube).delete_namespaced_custom_object(GROUP, VERSION, ns, "tokenbudgets", "monthly")
    wait_for(lambda: proxy_config(kube, ns)[1]["budgets"] == [], what="budget to leave the ConfigMap")
    custom(kube).delete_namespaced_custom_object(GROUP, VERSION, ns, "modelroutes", "chat")

    wait_for(lambda: configmap_gone(kube, ns), what="ConfigMap removal")
    assert operator.alive()


def test_invalid_cr_gets_condition_and_event_and_the_operator_stays_up(operator, kube, op_namespace):
    ns = op_namespace
    # Specs the apiserver accepts (its CEL rules refuse what needs no other object) but the operator
    # does not: a second route for a served alias (the older one wins; by name within a second, and
    # "good" < "second"), and a time zone that is no IANA zone.
    create(kube, ns, "ModelRoute", "good", GOOD_ROUTE)
    bad_spec = copy.deepcopy(GOOD_ROUTE)
    create(kube, ns, "ModelRoute", "second", bad_spec)
    bad_budget = {**GOOD_BUDGET, "period": {"type": "Monthly", "timeZone": "Mars/Olympus_Mons"}}
    create(kube, ns, "TokenBudget", "both", bad_budget)

    broken = wait_for(lambda: (lambda o: o if condition(o, "Ready") else None)(get(kube, ns, "modelroutes", "second")),
                      what="Ready condition on the second route")
    ready = condition(broken, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
    assert f"alias {GOOD_ROUTE['model']!r} is already served by ModelRoute 'good'" in ready["message"]
    both = wait_for(lambda: (lambda o: o if condition(o, "Ready") else None)(get(kube, ns, "tokenbudgets", "both")),
                    what="Ready condition on the bad budget")
    assert "unknown timeZone 'Mars/Olympus_Mons'" in condition(both, "Ready")["message"]

    def warning_events():
        events = client.CoreV1Api(kube).list_namespaced_event(ns).items
        return {(e.involved_object.name, e.reason): e.message for e in events if e.type == "Warning"}
    events = wait_for(lambda: (lambda ev: ev if ("second", "InvalidSpec") in ev and ("both", "InvalidSpec") in ev else None)(
        warning_events()), what="Warning Events")
    assert "is already served by ModelRoute 'good'" in events[("second", "InvalidSpec")]

    # The good route is still served; the bad ones are not.
    _, config = wait_for(lambda: proxy_config(kube, ns), what="ConfigMap")
    assert [r["name"] for r in config["routes"]] == ["good"] and config["budgets"] == []
    assert operator.alive()

    # Fixing the spec makes it Ready.
    fixed = {**bad_spec, "model": "broken"}
    custom(kube).patch_namespaced_custom_object(GROUP, VERSION, ns, "modelroutes", "second", {"spec": fixed})
    wait_for(lambda: condition(get(kube, ns, "modelroutes", "second"), "Ready")["status"] == "True", what="fixed route Ready")
    wait_for(lambda: sorted(r["name"] for r in proxy_config(kube, ns)[1]["routes"]) == ["good", "second"],
             what="fixed route in the ConfigMap")


def test_catalog_prices_an_unknown_model_is_not_ready_until_pinned(operator, kube, op_namespace, prices_file):
    """A backend without pricing gets the catalog's prices in the ConfigMap and its source in status;
    an in-cluster model nobody prices is Ready=False UnknownPrices with a Warning Event, and its
    route is not served, until the platform pins its prices in the operator's file."""
    from spendwarden.prices import catalog

    ns = op_namespace
    cloud = {"model": "cloud", "defaultBackend": "mini",
             "backends": [{"name": "mini", "provider": "OpenAI", "url": "https://api.openai.com/v1", "model": "gpt-4o-mini",
                           "pricing": {"output": "0.5"}}]}
    local = {"model": "local", "defaultBackend": "llama",
             "backends": [{"name": "llama", "provider": "OpenAICompatible", "url": "http://llama.inference:8080/v1",
                           "model": "in-house-llm"}]}
    create(kube, ns, "ModelRoute", "cloud", cloud)
    create(kube, ns, "ModelRoute", "local", local)

    listed = catalog.lookup("OpenAI", "gpt-4o-mini").values
    ready = wait_for(lambda: (lambda o: o if (condition(o, "Ready") or {}).get("status") == "True" else None)(
        get(kube, ns, "modelroutes", "cloud")), what="cloud route Ready")
    shown = ready["status"]["backends"][0]["pricing"]
    assert (shown["input"], shown["output"]) == (listed["input"], "0.5")
    assert shown["source"] == f"route+{catalog.source()}" and shown["sources"]["output"] == "route"
    _, config = wait_for(lambda: proxy_config(kube, ns), what="ConfigMap")
    assert [r["name"] for r in config["routes"]] == ["cloud"]
    assert config["routes"][0]["spec"]["backends"][0]["pricing"]["input"] == listed["input"]

    unpriced = wait_for(lambda: (lambda o: o if condition(o, "Ready") else None)(get(kube, ns, "modelroutes", "local")),
                        what="Ready condition on the unpriced route")
    cond = condition(unpriced, "Ready")
    assert cond["status"] == "False" and cond["reason"] == "UnknownPrices"
    assert "no input or output price for OpenAICompatible model 'in-house-llm'" in cond["message"]

    def warning():
        events = client.CoreV1Api(kube).list_namespaced_event(ns).items
        return next((e.message for e in events if e.type == "Warning" and e.reason == "UnknownPrices"
                     and e.involved_object.name == "local"), None)
    assert "in-house-llm" in wait_for(warning, what="UnknownPrices Event")

    # The platform team pins it: no CR changes, yet the namespace is rendered again.
    prices_file.write_text('pinned:\n  - {provider: OpenAICompatible, model: in-house-llm, input: "0.01", output: "0.02"}\n'
                           '  - {provider: OpenAI, model: not-a-price}\n')
    try:
        wait_for(lambda: sorted(r["name"] for r in proxy_config(kube, ns)[1]["routes"]) == ["cloud", "local"],
                 what="the pinned route in the ConfigMap")
        fixed = wait_for(lambda: (lambda o: o if condition(o, "Ready")["status"] == "True" else None)(
            get(kube, ns, "modelroutes", "local")), what="pinned route Ready")
        assert fixed["status"]["backends"][0]["pricing"]["source"] == "pinned"
        assert fixed["status"]["backends"][0]["pricing"]["output"] == "0.02"
        assert operator.alive()
    finally:
        prices_file.write_text("pinned: []\n")


def test_a_budget_over_routes_priced_in_another_currency_is_flagged_and_still_enforced(operator, kube, op_namespace):
    ns = op_namespace
    euro = copy.deepcopy(GOOD_ROUTE)
    for b in euro["backends"]:
        b["pricing"]["currency"] = "EUR"
    create(kube, ns, "ModelRoute", "euro", euro)
    create(kube, ns, "TokenBudget", "usd", GOOD_BUDGET)  # cost limit in USD (the default)

    budget = wait_for(lambda: (lambda o: o if (condition(o, "Ready") or {}).get("reason") == "CurrencyMismatch" else None)(
        get(kube, ns, "tokenbudgets", "usd")), what="Ready=False CurrencyMismatch on the budget")
    ready = condition(budget, "Ready")
    assert ready["status"] == "False" and "ModelRoute 'euro' (EUR)" in ready["message"]
    events = wait_for(lambda: [e for e in client.CoreV1Api(kube).list_namespaced_event(ns).items
                               if e.reason == "CurrencyMismatch" and e.involved_object.name == "usd"], what="CurrencyMismatch Event")
    assert events[0].type == "Warning"
    _, config = wait_for(lambda: proxy_config(kube, ns), what="ConfigMap")
    assert [b["name"] for b in config["budgets"]] == ["usd"]  # still enforced

    fixed = copy.deepcopy(GOOD_BUDGET)
    fixed["limits"]["cost"]["currency"] = "EUR"
    custom(kube).patch_namespaced_custom_object(GROUP, VERSION, ns, "tokenbudgets", "usd", {"spec": fixed})
    wait_for(lambda: condition(get(kube, ns, "tokenbudgets", "usd"), "Ready")["status"] == "True", what="budget Ready once fixed")


def test_configmap_deleted_or_edited_by_hand_is_rendered_again(operator, kube, op_namespace):
    # Nothing about the CRs changes, so only the operator's drift check can notice.
    ns = op_namespace
    create(kube, ns, "ModelRoute", "chat", GOOD_ROUTE)
    _, rendered = wait_for(lambda: proxy_config(kube, ns), what="ConfigMap")
    core = client.CoreV1Api(kube)

    core.patch_namespaced_config_map(CONFIGMAP_NAME, ns, {"data": {CONFIG_KEY: json.dumps({**rendered, "routes": []})}})
    wait_for(lambda: proxy_config(kube, ns)[1] == rendered, timeout=30, what="the edited ConfigMap restored")

    core.delete_namespaced_config_map(CONFIGMAP_NAME, ns)
    wait_for(lambda: proxy_config(kube, ns)[1] == rendered, timeout=30, what="the deleted ConfigMap rendered again")
    assert operator.alive()


def test_schema_violations_are_refused_by_the_apiserver(kube, op_namespace):
    with pytest.raises(ApiException) as err:
        create(kube, op_namespace, "TokenBudget", "bad", {**GOOD_BUDGET, "onExceeded": "Explode"})
    assert err.value.status == 422 and "onExceeded" in err.value.body
    with pytest.raises(ApiException) as err:
        create(kube, op_namespace, "ModelRoute", "bad", {**GOOD_ROUTE, "backends": []})
    assert err.value.status == 422


def test_rendered_configmap_is_garbage_collected_by_kubernetes(kube, namespace):
    """Ownership as rendered makes kube-controller-manager delete the ConfigMap with its owners
    (here without the operator, which is not watching this namespace)."""
    route = create(kube, namespace, "ModelRoute", "chat", GOOD_ROUTE)
    budget = create(kube, namespace, "TokenBudget", "monthly", GOOD_BUDGET)
    result = render_proxy_config(namespace, [route], [budget])
    client.CoreV1Api(kube).create_namespaced_config_map(namespace, configmap_manifest(result.config, [route, budget]))
    custom(kube).delete_namespaced_custom_object(GROUP, VERSION, namespace, "modelroutes", "chat")
    # One owner left: the ConfigMap stays.
    import time
    time.sleep(2)
    client.CoreV1Api(kube).read_namespaced_config_map(CONFIGMAP_NAME, namespace)
    custom(kube).delete_namespaced_custom_object(GROUP, VERSION, namespace, "tokenbudgets", "monthly")

    wait_for(lambda: configmap_gone(kube, namespace), timeout=30, what="garbage collection of the ConfigMap")


def test_period_reset_moves_status_to_the_next_period_without_finalizers(operator, kube, op_namespace):
    """A 1-minute rolling window: at the boundary the status moves on and usage starts from zero.
    The operator writes nothing into the object itself (no finalizer blocks deletion while it is down)."""
    ns = op_namespace
    create(kube, ns, "TokenBudget", "minute", {"window": "1m", "limits": {"tokens": {"total": 1000}}})
    first = wait_for(lambda: (lambda o: o if o.get("status", {}).get("periodEnd") else None)(get(kube, ns, "tokenbudgets", "minute")),
                     what="first period")
    assert not first["metadata"].get("finalizers")
    # Usage within the period (the ledger writes this in production) makes the reset visible.
    custom(kube).patch_namespaced_custom_object_status(GROUP, VERSION, ns, "tokenbudgets", "minute", {"status": {
        "used": {"inputTokens": 300, "outputTokens": 300, "totalTokens": 600, "cost": "0"}}})
    end = first["status"]["periodEnd"]
    wait_for(lambda: get(kube, ns, "tokenbudgets", "minute")["status"].get("percentUsed") == 60, what="usage seen")
    after = wait_for(lambda: (lambda o: o if o["status"]["periodStart"] == end else None)(get(kube, ns, "tokenbudgets", "minute")),
                     timeout=75, interval=0.5, what=f"the reset at {end}")
    assert after["status"]["used"]["totalTokens"] == 0 and after["status"]["percentUsed"] == 0
    assert after["status"]["state"] == "Active"
    assert not after["metadata"].get("finalizers")
