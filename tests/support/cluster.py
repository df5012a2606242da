"""Objects in the real cluster, as the integration tests create and read them: custom objects, the
rendered proxy ConfigMap, the cut-off NetworkPolicy, Events, and proxy processes on the rendered config."""
from __future__ import annotations

import json

from kubernetes import client

from tests.proxy.conftest import ProxyProcess
from tests.support.ledger_cluster import GROUP, VERSION, sa_token
from tests.support.operator_process import wait_for


def apply_custom(kube, ns: str, kind: str, plural: str, name: str, spec: dict) -> None:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": spec}
    client.CustomObjectsApi(kube).create_namespaced_custom_object(GROUP, VERSION, ns, plural, body)


def start_proxies(kube, ns: str, tmp_path, into: list[ProxyProcess], count: int = 2) -> None:
    """`count` proxy processes on the configuration the operator rendered for `ns` (with the ledger URL),
    with a ServiceAccount token of `ns`; appended to `into` as they start, for the caller to stop.
    The config must hold the routes as well as the budgets: the operator watches each kind on its own
    stream, so a render can have seen the budget before the route created just before it."""
    def rendered(c):
        cfg = json.loads(c.data["config.json"]) if c and c.data else {}
        return c if cfg.get("budgets") and cfg.get("routes") and cfg.get("ledger", {}).get("url") else None
    cm = wait_for(lambda: rendered(proxy_configmap(kube, ns)), timeout=30,
                  what="the rendered proxy config with its routes, budgets and the ledger URL")
    config = tmp_path / "config.json"
    config.write_text(cm.data["config.json"])
    token = tmp_path / "token"
    token.write_text(sa_token(kube, ns))
    for i in range(count):
        work = tmp_path / f"p{i}"
        work.mkdir()
        into.append(ProxyProcess(config, work, env={"SPENDWARDEN_LEDGER_TOKEN_FILE": str(token)},
                                 extra_args=["--namespace", ns]).start())


def proxy_configmap(kube, ns: str):
    try:
        return client.CoreV1Api(kube).read_namespaced_config_map("spendwarden-proxy", ns)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def cut_off_policy(kube, ns: str):
    try:
        return client.NetworkingV1Api(kube).read_namespaced_network_policy("spendwarden-cut-off", ns)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def events(kube, ns: str, reason: str) -> list:
    return [e for e in client.CoreV1Api(kube).list_namespaced_event(ns).items if e.reason == reason]
