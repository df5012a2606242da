"""controller/gateway.py's sequencing with the apiserver faked: what one sync writes, that unchanged
state writes nothing, that a restarted operator waits for every tenant's render, and that a namespace
leaving gateway mode loses its key and its egress policy."""
from __future__ import annotations

import pytest

from spendwarden.controller import gateway as ctl
from spendwarden.controller.inventory import Inventory
from spendwarden.render import gateway as gw
from spendwarden.render.proxyconfig import config_json, render_proxy_config

GWNS = "spendwarden-gw"


def route(ns, name, secret="openai"):
    return {"kind": "ModelRoute", "apiVersion": "spendwarden.io/v1alpha1",
            "metadata": {"name": name, "namespace": ns, "uid": f"{ns}-{name}", "generation": 1},
            "spec": {"model": name, "defaultBackend": "b", "backends": [{
                "name": "b", "provider": "OpenAI", "url": "https://api.openai.com/v1", "model": "gpt-4.1",
                "pricing": {"input": "1", "output": "2"},
                "credentials": {"secretRef": {"name": secret, "key": "apiKey"}}}]}}


class Fake:
    def __init__(self, monkeypatch):
        self.configmap = self.secret = None
        self.policies: dict[str, dict] = {}
        self.statuses: list[tuple] = []
        self.events: list[tuple] = []
        self.writes = 0
        self.secrets = {"openai": gw.GatewaySecret({gw.TENANTS_ANNOTATION: "team-a"}, {"apiKey": "c2s="})}
        m = monkeypatch.setattr
        m(ctl, "apply_configmap", self._configmap)
        m(ctl, "apply_secret", self._secret)
        m(ctl, "list_secrets", lambda ns: dict(self.secrets))
        m(ctl, "policy_namespaces", lambda: set(self.policies))
        m(ctl, "delete_policy", lambda ns: self.policies.pop(ns, None))
        m(ctl, "apply_policy", self._policy)
        m(ctl.kube, "patch_status", lambda plural, ns, name, status: self.statuses.append((ns, name, status)))
        m(ctl, "_warn", lambda involved, reason, message: self.events.append((involved["name"], reason)))

    def _configmap(self, manifest):
        changed = self.configmap != manifest["data"]
        self.configmap = manifest["data"]
        self.writes += changed
        return changed

    def _secret(self, manifest):
        changed = self.secret != manifest["data"]
        self.secret = manifest["data"]
        self.writes += changed
        return changed

    def _policy(self, manifest):
        self.policies[manifest["metadata"]["namespace"]] = manifest
        return True


def controller(routes, labels):
    inventory = Inventory()
    inventory.expect([])
    for r in routes:
        inventory.observe("ADDED", r)
    c = ctl.GatewayController(gw.GatewaySettings(namespace=GWNS), inventory, serves=lambda ns: True,
                              excluded=frozenset({"spendwarden"}))
    c.labels.update(labels)
    return c, inventory


def render(c, inventory, ns):
    routes, budgets = inventory.in_namespace(ns)
    config = render_proxy_config(ns, routes, budgets, "http://ledger:8081").config if routes or budgets else None
    c.rendered(ns, config)
    return config


@pytest.fixture
def fake(monkeypatch):
    return Fake(monkeypatch)


def test_one_sync_writes_config_credentials_conditions_and_egress(fake):
    c, inv = controller([route("team-a", "chat"), route("team-b", "chat"), route("team-s", "chat")],
                        {"team-a": {gw.MODE_LABEL: "gateway"}, "team-b": {gw.MODE_LABEL: "gateway"},
                         "team-s": {}, "team-e": {gw.MODE_LABEL: "gateway", gw.EGRESS_LABEL: "open"}})
    configs = {ns: render(c, inv, ns) for ns in ("team-a", "team-b", "team-s")}
    c.sync()
    assert fake.configmap == {"team-a.json": config_json(configs["team-a"]),
                              "team-b.json": config_json(configs["team-b"])}
    assert fake.secret == {"team-a_openai_apiKey": "c2s="}   # team-b is not in the annotation
    assert set(fake.policies) == {"team-a", "team-b"}       # not sidecar team-s, not team-e while open
    assert fake.policies["team-a"]["metadata"]["name"] == gw.EGRESS_POLICY_NAME
    conditions = {(ns, name): status["conditions"][-1] for ns, name, status in fake.statuses}
    assert conditions[("team-a", "chat")]["status"] == "True"
    assert (conditions[("team-b", "chat")]["status"], conditions[("team-b", "chat")]["reason"]) == (
        "False", "SecretNotShared")
    assert ("team-s", "chat") not in conditions
    assert fake.events == [("chat", "SecretNotShared")]
    # Unchanged state: no write, no second Event.
    writes, events = fake.writes, len(fake.events)
    c.sync()
    assert (fake.writes, len(fake.events)) == (writes, events)


def test_nothing_is_written_until_every_tenant_was_rendered(fake):
    c, inv = controller([route("team-a", "chat"), route("team-b", "chat")],
                        {"team-a": {gw.MODE_LABEL: "gateway"}, "team-b": {gw.MODE_LABEL: "gateway"}})
    render(c, inv, "team-a")
    c.sync(late=False)
    assert fake.configmap is None and fake.secret is None  # team-b's key would have been dropped
    c.sync(late=True)  # past the start-up grace, team-b's failing render holds up nobody
    assert list(fake.configmap) == ["team-a.json"]
    render(c, inv, "team-b")
    c.sync()
    assert sorted(fake.configmap) == ["team-a.json", "team-b.json"]


def test_leaving_gateway_mode_drops_the_key_the_policy_and_the_condition(fake):
    c, inv = controller([route("team-a", "chat")], {"team-a": {gw.MODE_LABEL: "gateway"}})
    render(c, inv, "team-a")
    c.sync()
    assert "team-a" in fake.policies and fake.configmap
    ns, name, status = fake.statuses[-1]
    inv.observe("MODIFIED", {**route("team-a", "chat"), "status": status})
    c.observe_namespace({"type": "MODIFIED"}, "team-a", {gw.MODE_LABEL: "sidecar"})
    c.sync()
    assert fake.configmap == {} and fake.secret == {} and fake.policies == {}
    assert fake.statuses[-1][2]["conditions"] == []


def test_migration_label_keeps_the_policy_off_and_an_unknown_namespace_keeps_its_policy(fake):
    c, inv = controller([], {"team-a": {gw.MODE_LABEL: "gateway", gw.EGRESS_LABEL: "open"}})
    fake.policies["team-x"] = {}  # a namespace the watch has not delivered yet
    c.sync()
    assert set(fake.policies) == {"team-x"}
    c.observe_namespace({"type": "MODIFIED"}, "team-a", {gw.MODE_LABEL: "gateway"})
    c.sync()
    assert set(fake.policies) == {"team-a", "team-x"}


def test_a_configmap_that_would_not_fit_is_not_written(fake):
    c, inv = controller([route("team-a", "chat"), route("team-b", "chat")],
                        {"team-a": {gw.MODE_LABEL: "gateway"}, "team-b": {gw.MODE_LABEL: "gateway"}})
    render(c, inv, "team-a")
    render(c, inv, "team-b")
    c.sync()
    good = dict(fake.configmap)
    size = sum(len(k) + len(v) for k, v in good.items())
    c.max_config_bytes = size - 1
    c._applied.clear()
    c.sync()
    assert fake.configmap == good  # the last good one stays
    assert ("spendwarden-gateway-config", "GatewayConfigTooLarge") in fake.events


def test_without_the_gateway_a_gateway_label_is_told_once(fake):
    notes = ctl.ModeNotes(gw.GatewaySettings())
    for _ in range(3):
        notes.observe_namespace({"type": "MODIFIED"}, "team-a", {gw.MODE_LABEL: "gateway"})
    notes.observe_namespace({"type": "MODIFIED"}, "team-b", {gw.MODE_LABEL: "sidecar"})
    assert fake.events == [("team-a", "GatewayNotEnabled")]
    notes.observe_namespace({"type": "MODIFIED"}, "team-a", {})  # label removed, then set again: told again
    notes.observe_namespace({"type": "MODIFIED"}, "team-a", {gw.MODE_LABEL: "gateway"})
    assert len(fake.events) == 2


def test_a_cut_tenant_egress_policy_excludes_the_cut_off_namespaces(fake, monkeypatch):
    cut = {"spec": {"egress": [{"to": [{"namespaceSelector": {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["inference"]}]}}]}]}}
    monkeypatch.setattr(ctl, "read_cut_off_policy", lambda ns: cut)
    c, inv = controller([], {"team-a": {gw.MODE_LABEL: "gateway"}})
    c.sync()
    assert fake.policies["team-a"]["spec"]["egress"][1] == {"to": [{"namespaceSelector": {}}]}
    c.observe_namespace({"type": "MODIFIED"}, "team-a", {gw.MODE_LABEL: "gateway", "spendwarden.io/cut-off": "true"})
    c.sync()
    selector = fake.policies["team-a"]["spec"]["egress"][1]["to"][0]["namespaceSelector"]
    assert selector["matchExpressions"][0]["values"] == ["inference"]
    c.observe_namespace({"type": "MODIFIED"}, "team-a", {gw.MODE_LABEL: "gateway"})  # lifted
    c.sync()
    assert fake.policies["team-a"]["spec"]["egress"][1] == {"to": [{"namespaceSelector": {}}]}
