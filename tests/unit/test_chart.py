"""The Helm chart charts/spendwarden, rendered and linted offline with Helm v4 (helm-python-sdk,
no helm binary): what it renders, that its RBAC covers what the operator does and no more, that
its values schema refuses bad values, and that its CRDs are the generated ones."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import helm_python as helm
import pytest
import yaml

import spendwarden
from spendwarden.controller import ledger_service
from spendwarden.controller import run as operator_cli

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "spendwarden"
NS = "spendwarden-system"

CUSTOM = {
    "watchNamespaces": ["team-support", "team-*, !team-sandbox"],
    "rbac": {"create": False},
    "serviceAccount": {"create": True, "name": "warden"},
    "webhooks": {"enabled": True},
    "metrics": {"serviceMonitor": {"enabled": True, "additionalLabels": {"release": "kube-prometheus"}},
                "prometheusRule": {"enabled": True, "budgetPercentThreshold": 90}},
    "image": {"repository": "registry.example/spendwarden", "tag": "1.2.3", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "podAnnotations": {"example.com/team": "platform"},
    "extraArgs": ["--verbose"],
    "logFormat": "plain",
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
}


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as c:
        yield c


def render(chart, values=None, *, name="spendwarden", namespace=NS) -> dict[tuple[str, str], dict]:
    """Rendered objects keyed by (kind, name); NOTES.txt under ("NOTES", "")."""
    objects: dict[tuple[str, str], dict] = {}
    for path, text in chart.render(values, name=name, namespace=namespace, is_install=True).items():
        if path.endswith("NOTES.txt"):
            objects[("NOTES", "")] = {"text": text}
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                key = (doc["kind"], doc["metadata"]["name"])
                assert key not in objects, f"{key} rendered twice"
                objects[key] = doc
    return objects


def of_kind(objects, kind) -> list[dict]:
    return [o for (k, _), o in objects.items() if k == kind]


def one(objects, kind) -> dict:
    found = of_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def container(objects) -> dict:
    return one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


# -- CRDs and metadata -------------------------------------------------------------------------------

def test_chart_crds_are_byte_identical_to_the_generated_crds():
    top = {p.name: p.read_bytes() for p in (ROOT / "crds").glob("*.yaml")}
    ours = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert top, "crds/ is empty"
    assert sorted(ours) == sorted(top), "charts/spendwarden/crds differs from crds/: run `spendwarden crds` from the repo root"
    for name in top:
        assert ours[name] == top[name], f"charts/spendwarden/crds/{name} is stale: run `spendwarden crds` from the repo root"


def test_chart_ships_the_crds_and_app_version_matches_the_package(chart):
    assert sorted(Path(c["filename"]).name for c in chart.crds) == sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    assert chart.metadata["appVersion"] == spendwarden.__version__
    assert chart.metadata["apiVersion"] == "v2"


# -- lint ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [None, CUSTOM], ids=["defaults", "custom"])
def test_lint_passes_without_errors_or_warnings(values):
    # v1.20.2: the oldest apiserver supported (Chart.yaml kubeVersion), the one the integration tests run.
    report = helm.lint(CHART, values, strict=True, namespace=NS, kube_version="v1.20.2")
    assert report["errors"] == [], report
    serious = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert serious == [], serious


# -- default render -----------------------------------------------------------------------------------

def test_default_render_objects(chart):
    objects = render(chart)
    kinds = sorted(k for k, _ in objects if k != "NOTES")
    assert kinds == sorted(["Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
                            "RoleBinding", "Service", "ConfigMap",  # ConfigMap: the Grafana dashboard
                            "ConfigMap",  # and the pinned prices
                            "NetworkPolicy"])
    for obj in objects.values():
        if "metadata" in obj and obj["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == NS, obj["kind"]


def test_network_policy_opens_the_ledger_to_pods_and_metrics_only_to_monitoring(chart):
    def rules(values=None) -> dict[str, list | None]:
        objects = render(chart, values)
        policy = one(objects, "NetworkPolicy")
        deployment = one(objects, "Deployment")
        assert policy["spec"]["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        named = {p["name"] for p in container(objects)["ports"]}
        out = {}
        for rule in policy["spec"]["ingress"]:
            [port] = rule["ports"]
            assert port["port"] in named, port  # a named port of the operator's container
            out[port["port"]] = rule.get("from")
        return out

    monitoring = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    # Default: the ledger from every namespace's Pods, metrics from "monitoring", nothing else
    # (healthz only from the node, which NetworkPolicy always allows).
    assert rules() == {"ledger": [{"namespaceSelector": {}}], "metrics": monitoring}
    # The webhook port from any source: the apiserver is not a Pod.
    assert rules({"webhooks": {"enabled": True}})["webhook"] is None
    assert "metrics" not in rules({"networkPolicy": {"enabled": True, "metricsFrom": []}})
    peers = [{"podSelector": {"matchLabels": {"app": "prometheus"}}, "namespaceSelector": {}}]
    assert rules({"networkPolicy": {"enabled": True, "metricsFrom": peers}})["metrics"] == peers
    assert not of_kind(render(chart, {"networkPolicy": {"enabled": False}}), "NetworkPolicy")


def test_deployment_runs_one_operator_safely(chart):
    objects = render(chart)
    deploy = one(objects, "Deployment")
    spec = deploy["spec"]
    # Leader election (on by default) makes an overlap safe; standbys are never Ready, so a rollout
    # that waited for them to become available would stall.
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": "100%"}}
    assert spec["replicas"] == 1
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "spendwarden"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the Dockerfile's numeric USER
    c = container(objects)
    assert c["image"] == f"ghcr.io/spendwarden/spendwarden:{spendwarden.__version__}"
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]  # the only writable place
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert c["args"] == ["operator", "--liveness=http://0.0.0.0:8080/healthz", "--log-format=json",
                         "--leader-elect", "--lease-name=spendwarden", "--lease-duration=15"]
    probe = c["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "healthz"}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"healthz": 8080, "ledger": 8081, "metrics": 9090}
    assert ports[probe["port"]] == 8080
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["SPENDWARDEN_LOG_FORMAT"] == "json"
    assert env["SPENDWARDEN_LEDGER_URL"] == f"http://spendwarden.{NS}.svc:8081"
    assert env["SPENDWARDEN_PROXY_PORT"] == "8787" and env["SPENDWARDEN_PROXY_METRICS_PORT"] == "9464"
    assert "SPENDWARDEN_WEBHOOK_PORT" not in env
    assert env["SPENDWARDEN_NATIVE_SIDECAR"] == "auto"


@pytest.mark.parametrize("native, expected", [("auto", "auto"), (True, "true"), (False, "false"),
                                              ("true", "true"), ("false", "false")])
def test_native_sidecar_value_reaches_the_operator(chart, native, expected):
    """`--set sidecar.native=false` arrives as a boolean, `--set-string` as a string: both work, and
    the operator accepts what the chart passes."""
    from spendwarden.render import injection
    env = {e["name"]: e.get("value") for e in container(render(chart, {"sidecar": {"native": native}}))["env"]}
    assert env["SPENDWARDEN_NATIVE_SIDECAR"] == expected
    assert injection.InjectionSettings.from_env(env).native_sidecar == expected


def test_pinned_prices_are_a_configmap_mounted_where_the_operator_reads_them(chart):
    from spendwarden.prices import pins

    pinned = [{"provider": "OpenAI", "model": "gpt-4.1", "input": "1.60", "output": "6.40"},
              {"provider": "OpenAICompatible", "model": "llama-3.1-8b", "input": "0", "output": "0"}]
    objects = render(chart, {"prices": {"pinned": pinned, "pollIntervalSeconds": 2}})
    cm = objects[("ConfigMap", "spendwarden-prices")]
    found, warnings = pins.parse_pins(cm["data"]["prices.yaml"])
    assert warnings == [] and sorted(found) == [("OpenAI", "gpt-4.1"), ("OpenAICompatible", "llama-3.1-8b")]
    assert found[("OpenAI", "gpt-4.1")].values == {"input": "1.60", "output": "6.40"}  # strings stay strings
    c = container(objects)
    env = {e["name"]: e.get("value") for e in c["env"]}
    mount = next(m for m in c["volumeMounts"] if m["name"] == "prices")
    assert env[pins.ENV] == f"{mount['mountPath']}/prices.yaml" and env["SPENDWARDEN_PRICES_POLL_INTERVAL"] == "2"
    volume = next(v for v in one(objects, "Deployment")["spec"]["template"]["spec"]["volumes"] if v["name"] == "prices")
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    # By default nothing is pinned, and the file still parses.
    assert pins.parse_pins(render(chart)[("ConfigMap", "spendwarden-prices")]["data"]["prices.yaml"]) == ({}, [])


def test_rendered_args_are_accepted_by_the_operator_cli(chart):
    """The chart and `spendwarden operator` agree on flags: an unknown one would crash-loop the pod."""
    parser = argparse.ArgumentParser()
    operator_cli.add_arguments(parser)
    for values in (None, CUSTOM):
        args = container(render(chart, values))["args"]
        assert args[0] == "operator"
        parsed = parser.parse_args(args[1:])
        assert parsed.liveness == "http://0.0.0.0:8080/healthz"
    parsed = parser.parse_args(container(render(chart, CUSTOM))["args"][1:])
    assert parsed.namespace == ["team-support", "team-*, !team-sandbox"] and parsed.log_format == "plain" and parsed.verbose
    assert parsed.leader_elect and parsed.lease_name == "spendwarden" and parsed.lease_duration == 15


def test_without_leader_election_one_replica_is_recreated(chart):
    objects = render(chart, {"leaderElection": {"enabled": False}})
    assert one(objects, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    assert not any(a.startswith("--lease") or a == "--leader-elect" for a in container(objects)["args"])
    two = render(chart, {"replicaCount": 2, "leaderElection": {"leaseName": "warden-lock", "leaseDurationSeconds": 30}})
    assert one(two, "Deployment")["spec"]["replicas"] == 2
    assert "--lease-name=warden-lock" in container(two)["args"] and "--lease-duration=30" in container(two)["args"]


def test_services_select_the_operator_pod_by_named_ports(chart):
    objects = render(chart, {"webhooks": {"enabled": True}})
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in container(objects)["ports"]}
    services = {o["metadata"]["name"]: o for o in of_kind(objects, "Service")}
    assert set(services) == {"spendwarden", "spendwarden-webhook"}
    for svc in services.values():
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names
    assert {p["name"]: p["port"] for p in services["spendwarden"]["spec"]["ports"]} == {"ledger": 8081, "metrics": 9090}
    assert [p["port"] for p in services["spendwarden-webhook"]["spec"]["ports"]] == [443]
    assert {p["name"]: p["containerPort"] for p in container(objects)["ports"]}["webhook"] == 9443


def test_ledger_and_metrics_can_be_turned_off(chart, monkeypatch):
    objects = render(chart, {"ledger": {"enabled": False}, "metrics": {"enabled": False}})
    assert of_kind(objects, "Service") == []
    assert {p["name"] for p in container(objects)["ports"]} == {"healthz"}
    # The operator serves the ledger unless told otherwise: "0" must reach it and mean off.
    env = {e["name"]: e.get("value") for e in container(objects)["env"]}
    assert env["SPENDWARDEN_LEDGER_PORT"] == "0" and "SPENDWARDEN_LEDGER_URL" not in env
    monkeypatch.setenv("SPENDWARDEN_LEDGER_PORT", env["SPENDWARDEN_LEDGER_PORT"])
    parser = argparse.ArgumentParser()
    operator_cli.add_arguments(parser)
    assert parser.parse_args([]).ledger_port == 0
    assert ledger_service.LedgerConfig.from_env({"SPENDWARDEN_LEDGER_PORT": "0"}).port == 0


def test_ledger_limits_reach_the_operator(chart):
    def config(values=None) -> ledger_service.LedgerConfig:
        env = {e["name"]: e.get("value") for e in container(render(chart, values))["env"]}
        return ledger_service.LedgerConfig.from_env(env)

    default, code_default = config(), ledger_service.LedgerConfig()
    assert (default.max_connections, default.request_timeout) == (code_default.max_connections, code_default.request_timeout)
    # A large integer must not render as 1e+06 (int() of that fails at the operator's start).
    custom = config({"ledger": {"maxConnections": 1000000, "requestTimeoutSeconds": 2.5}})
    assert (custom.max_connections, custom.request_timeout) == (1000000, 2.5)


def test_cut_off_cluster_cidrs_reach_the_operator(chart):
    from spendwarden.controller.settings import CutOffConfig

    default = {e["name"]: e.get("value") for e in container(render(chart))["env"]}
    assert "SPENDWARDEN_CUTOFF_CLUSTER_CIDRS" not in default
    env = {e["name"]: e.get("value") for e in container(render(chart, {"cutOff": {
        "clusterCIDRs": ["10.244.0.0/16", "fd00::/48"]}}))["env"]}
    settings = CutOffConfig.from_env({**env, "SPENDWARDEN_POD_NAMESPACE": NS}).settings
    assert settings.cluster_cidrs == ("10.244.0.0/16", "fd00::/48")
    # The operator's own namespace (its ledger Service) is never denied, nor DNS's.
    assert settings.protected_namespaces == {NS, "kube-system"}


# -- RBAC ---------------------------------------------------------------------------------------------

# (apiGroup, resource, verb) the operator needs, now and for the features already planned.
NEEDED_CLUSTER = {
    *(("spendwarden.io", r, v) for r in ("tokenbudgets", "modelroutes") for v in ("get", "list", "watch", "patch")),
    *(("spendwarden.io", r, v) for r in ("tokenbudgets/status", "modelroutes/status") for v in ("patch", "update")),
    ("", "events", "create"), ("", "events", "patch"),
    ("events.k8s.io", "events", "create"), ("events.k8s.io", "events", "patch"),
    *(("", "configmaps", v) for v in ("get", "list", "create", "update", "delete")),
    *(("", "namespaces", v) for v in ("get", "list", "watch", "patch")),
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    *(("networking.k8s.io", "networkpolicies", v) for v in ("get", "create", "patch", "delete")),
    *(("apps", r, v) for r in ("deployments/scale", "statefulsets/scale") for v in ("get", "patch")),
    ("apps", "deployments", "get"), ("apps", "statefulsets", "get"), ("autoscaling", "horizontalpodautoscalers", "list"),
    ("authentication.k8s.io", "tokenreviews", "create"),
}
NEEDED_WEBHOOK_CLUSTER = {
    ("admissionregistration.k8s.io", r, v)
    for r in ("validatingwebhookconfigurations", "mutatingwebhookconfigurations") for v in ("create", "patch")
}
NEEDED_ROLE = {("coordination.k8s.io", "leases", v) for v in ("get", "create", "update")}
NEEDED_WEBHOOK_ROLE = {("", "secrets", v) for v in ("create", "get", "update")}


def grants(role) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def test_rbac_is_least_privilege_without_wildcards(chart):
    for values in (None, {"webhooks": {"enabled": True}}):
        objects = render(chart, values)
        for role in of_kind(objects, "ClusterRole") + of_kind(objects, "Role"):
            for rule in role["rules"]:
                for field in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule[field], f"{role['kind']} has a wildcard in {field}: {rule}"
                    assert not any("*" in x for x in rule[field]), rule
            assert not ({"escalate", "bind", "impersonate"} & {v for _, _, v in grants(role)})
        cluster = grants(one(objects, "ClusterRole"))
        role = grants(one(objects, "Role"))
        assert NEEDED_CLUSTER <= cluster, NEEDED_CLUSTER - cluster
        assert NEEDED_ROLE <= role, NEEDED_ROLE - role
        # Secrets: cluster-wide only `get` of the one alerting Secret name (webhookSecretRef); the rest
        # only in its own namespace (Role). No kopf peering (--standalone).
        cluster_secrets = [r for r in one(objects, "ClusterRole")["rules"] if "secrets" in r["resources"]]
        assert cluster_secrets == [{"apiGroups": [""], "resources": ["secrets"],
                                    "resourceNames": ["spendwarden-alerting"], "verbs": ["get"]}]
        assert not any("kopfpeerings" in r for _, r, _ in cluster | role)
        # Nothing it has no use for: no deletes of its own CRs, no pods, no cluster-wide writes of CRDs.
        assert not any(g == "spendwarden.io" and v in ("create", "delete") for g, _, v in cluster)
        assert not any(g == "apiextensions.k8s.io" and v not in ("list", "watch") for g, _, v in cluster)
        assert not any(r == "pods" for _, r, _ in cluster)
        # Workloads written only through their scale subresource (the scaler reads them: available
        # replicas, the scaling-shared-with annotation); namespaces never deleted.
        assert not any(g == "apps" and "/" not in r and v != "get" for g, r, v in cluster)
        assert ("", "namespaces", "delete") not in cluster
        if values is None:
            assert not any(g == "admissionregistration.k8s.io" for g, _, _ in cluster)
            assert not any(r == "secrets" for _, r, _ in role)
        else:
            assert NEEDED_WEBHOOK_CLUSTER <= cluster and NEEDED_WEBHOOK_ROLE <= role


def test_rbac_writes_are_limited_to_named_objects_where_the_api_allows(chart):
    objects = render(chart, {"webhooks": {"enabled": True, "configurationName": "sw.example.com"}})
    webhook_rules = [r for r in one(objects, "ClusterRole")["rules"] if r["apiGroups"] == ["admissionregistration.k8s.io"]]
    # "create" cannot be limited by name in Kubernetes RBAC; everything else is.
    assert all(r["verbs"] == ["create"] or r.get("resourceNames") == ["sw.example.com"] for r in webhook_rules)
    # Of ConfigMaps and NetworkPolicies only the operator's own: spendwarden-proxy, spendwarden-cut-off.
    own = {"configmaps": ["spendwarden-proxy"], "networkpolicies": ["spendwarden-cut-off"]}
    for rule in one(objects, "ClusterRole")["rules"]:
        for resource in set(rule["resources"]) & set(own):
            assert rule["verbs"] == ["create"] or rule.get("resourceNames") == own[resource], rule
    secret_rules = [r for r in one(objects, "Role")["rules"] if r["resources"] == ["secrets"]]
    assert all(r["verbs"] == ["create"] or r.get("resourceNames") == ["spendwarden-webhook-tls"] for r in secret_rules)
    env = {e["name"]: e.get("value") for e in container(objects)["env"]}
    assert env["SPENDWARDEN_WEBHOOK_CONFIGURATION"] == "sw.example.com"
    assert env["SPENDWARDEN_WEBHOOK_CERT_SECRET"] == "spendwarden-webhook-tls"
    assert env["SPENDWARDEN_WEBHOOK_SERVICE"] == "spendwarden-webhook"


def test_alerting_secret_access_follows_the_value_and_can_be_turned_off(chart):
    def secret_rules(values):
        return [r for r in one(render(chart, values), "ClusterRole")["rules"] if "secrets" in r["resources"]]
    assert [r["resourceNames"] for r in secret_rules({"alerting": {"webhookSecretName": "team-hooks"}})] == [["team-hooks"]]
    assert secret_rules({"alerting": {"webhookSecretName": ""}}) == []


def test_bindings_name_the_service_account(chart):
    objects = render(chart, {"serviceAccount": {"name": "warden"}}, name="prod", namespace="ops")
    assert one(objects, "ServiceAccount")["metadata"]["name"] == "warden"
    for binding in of_kind(objects, "ClusterRoleBinding") + of_kind(objects, "RoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "warden", "namespace": "ops"}]
        assert binding["roleRef"]["name"] == "prod-spendwarden"


# -- custom values --------------------------------------------------------------------------------------

def test_custom_values_render(chart):
    objects = render(chart, CUSTOM)
    kinds = sorted(k for k, _ in objects if k != "NOTES")
    # rbac.create false: no roles or bindings; serviceAccount.create with a custom name.
    # webhooks.enabled: the two webhook configurations are the release's (helm uninstall removes them).
    assert kinds == sorted(["Deployment", "ServiceAccount", "Service", "Service", "ServiceMonitor", "PrometheusRule",
                            "ConfigMap", "ConfigMap", "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
                            "NetworkPolicy"])
    assert one(objects, "ServiceAccount")["metadata"]["name"] == "warden"
    pod = one(objects, "Deployment")["spec"]["template"]
    assert pod["spec"]["serviceAccountName"] == "warden"
    assert pod["metadata"]["annotations"] == {"example.com/team": "platform"}
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["spec"]["tolerations"][0]["key"] == "dedicated"
    c = container(objects)
    assert c["image"] == "registry.example/spendwarden:1.2.3" and c["imagePullPolicy"] == "Always"
    # One --namespace per watched namespace, in order, then extraArgs last.
    assert [a for a in c["args"] if a.startswith("--namespace")] == ["--namespace=team-support", "--namespace=team-*, !team-sandbox"]
    assert c["args"][-1] == "--verbose"
    assert "--log-format=plain" in c["args"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["SPENDWARDEN_WEBHOOK_PORT"] == "9443"
    assert env["SPENDWARDEN_PROXY_IMAGE"] == "registry.example/spendwarden:1.2.3"
    notes = objects[("NOTES", "")]["text"]
    assert "team-support, team-*, !team-sandbox" in notes and "rbac.create is false" in notes


def test_service_account_can_be_brought_by_the_user(chart):
    objects = render(chart, {"serviceAccount": {"create": False, "name": "preexisting"}})
    assert of_kind(objects, "ServiceAccount") == []
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "preexisting"
    assert one(objects, "ClusterRoleBinding")["subjects"][0]["name"] == "preexisting"


def test_service_monitor_scrapes_the_metrics_port_and_keeps_team_namespaces(chart):
    objects = render(chart, CUSTOM)
    sm = one(objects, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus"
    matched = [s for s in of_kind(objects, "Service")
               if sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in matched] == ["spendwarden"]  # not the webhook Service
    endpoint = sm["spec"]["endpoints"][0]
    assert endpoint["port"] in {p["name"] for p in matched[0]["spec"]["ports"]}
    assert endpoint["honorLabels"] is True  # the series' "namespace" is the team's, not the operator's
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NS]}


def test_pod_monitor_scrapes_the_injected_proxies(chart):
    from spendwarden.render import injection
    assert of_kind(render(chart, {}), "PodMonitor") == []  # off by default
    pm = one(render(chart, {"metrics": {"enabled": False, "podMonitor": {
        "enabled": True, "interval": "15s", "additionalLabels": {"release": "kube-prometheus"}}}}), "PodMonitor")
    assert pm["metadata"]["namespace"] == NS and pm["metadata"]["labels"]["release"] == "kube-prometheus"
    # It selects what the injection puts on pods, at the proxy container's metrics port.
    assert pm["spec"]["selector"] == {"matchLabels": {injection.PROXY_LABEL: injection.PROXY_LABEL_VALUE}}
    proxy = injection.proxy_container("team", injection.InjectionSettings(image="i"))
    endpoint = pm["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] in {p["name"] for p in proxy["ports"]} and endpoint["port"] == "sw-metrics"
    assert endpoint["path"] == "/metrics" and endpoint["honorLabels"] is True and endpoint["interval"] == "15s"
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    only = one(render(chart, {"metrics": {"podMonitor": {"enabled": True, "namespaces": ["team-a", "team-b"]}}}),
               "PodMonitor")
    assert only["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def test_proxy_limits_resources_and_log_level_reach_every_injected_sidecar(chart):
    """chart values -> the operator's env -> InjectionSettings -> the sidecar's env -> the proxy's own
    argument parser: each value arrives as the proxy reads it (1000000 not as 1e+06)."""
    from spendwarden.proxy import run as proxy_run
    from spendwarden.render import injection

    def sidecar(values):
        env = {e["name"]: e.get("value") for e in container(render(chart, values))["env"] if "value" in e}
        return injection.proxy_container("team", injection.InjectionSettings.from_env(env))

    default = sidecar(None)
    assert default["resources"] == injection.DEFAULT_RESOURCES
    # the chart states the measured default (values.yaml) and the operator falls back to the same
    chart_default = yaml.safe_load((Path(CHART) / "values.yaml").read_text())["proxy"]["resources"]
    assert chart_default == injection.DEFAULT_RESOURCES
    assert {e["name"] for e in default["env"]} == {"SPENDWARDEN_LEDGER_TOKEN_FILE", "SPENDWARDEN_SECRETS_DIR"}
    limits = {"headTimeoutSeconds": 2.5, "bodyTimeoutSeconds": 0, "maxBodyBytes": 1000000,
              "maxBufferedBytes": 64 * 2**20, "maxResponseBytes": 4 * 2**20}
    resources = {"requests": {"cpu": "20m", "memory": "48Mi"}, "limits": {"memory": "96Mi"}}
    proxy = sidecar({"proxy": {"limits": limits, "resources": resources, "logLevel": "WARNING"}})
    assert proxy["resources"] == resources
    env = {e["name"]: e["value"] for e in proxy["env"]}
    parser = argparse.ArgumentParser()
    old = dict(os.environ)
    try:
        os.environ.update(env)
        proxy_run.add_arguments(parser)
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert proxy["args"][0] == "proxy"
    args = parser.parse_args(proxy["args"][1:])  # the sidecar's command line, as injected
    assert (args.head_timeout, args.body_timeout, args.max_body_bytes, args.max_buffered_bytes,
            args.max_response_bytes, args.log_level) == (2.5, 0.0, 1000000, 64 * 2**20, 4 * 2**20, "WARNING")


def test_only_the_listed_proxy_settings_reach_tenant_pods():
    from spendwarden.render import injection
    settings = injection.InjectionSettings.from_env({"SPENDWARDEN_SIDECAR_HEAD_TIMEOUT": "3",
                                                     "SPENDWARDEN_SIDECAR_LEDGER_TOKEN": "secret",
                                                     "SPENDWARDEN_LEDGER_URL": "http://x"})
    assert settings.env == (("SPENDWARDEN_HEAD_TIMEOUT", "3"),)
    with pytest.raises(ValueError, match="SPENDWARDEN_PROXY_RESOURCES is not JSON"):
        injection.InjectionSettings.from_env({"SPENDWARDEN_PROXY_RESOURCES": "{memory: 1Gi"})
    with pytest.raises(ValueError, match="must be {requests"):
        injection.InjectionSettings.from_env({"SPENDWARDEN_PROXY_RESOURCES": '{"memory": "1Gi"}'})


CONTRACT_METRICS = {"spendwarden_budget_percent_used", "spendwarden_budget_state", "spendwarden_budget_forecast_exceeded",
                    "spendwarden_namespace_cut_off", "spendwarden_ledger_reports_total", "up"}


def test_prometheus_rule_alerts(chart):
    objects = render(chart, CUSTOM)
    rule = one(objects, "PrometheusRule")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"SpendwardenBudgetThresholdCrossed", "SpendwardenBudgetForecastExceeded", "SpendwardenNamespaceCutOff",
            "SpendwardenLedgerUnreachable"} <= set(alerts)
    assert alerts["SpendwardenBudgetThresholdCrossed"]["expr"].endswith(">= 90")
    assert 'job="spendwarden"' in alerts["SpendwardenLedgerUnreachable"]["expr"]  # the ServiceMonitor's job
    assert f'namespace="{NS}"' in alerts["SpendwardenLedgerUnreachable"]["expr"]
    for name, alert in alerts.items():
        assert alert["labels"]["severity"] in ("warning", "critical"), name
        assert alert["annotations"]["summary"], name
        assert "{{ $labels" in alert["annotations"]["summary"] or "Ledger" in name  # Prometheus templating survived Helm
    # The rules parse as PromQL and use only the metric names the operator promises to export.
    promql = pytest.importorskip("promql_parser", reason="promql-parser not installed: PromQL syntax not checked")
    for name, alert in alerts.items():
        names: list[str] = []
        promql.walk(promql.parse(alert["expr"]),
                    lambda node: names.append(node.name) if isinstance(node, promql.VectorSelector) else None)
        assert names and set(names) <= CONTRACT_METRICS, (name, names)
        promql.parse_duration(alert["for"])


def test_prometheus_rule_needs_metrics(chart):
    objects = render(chart, {"metrics": {"enabled": False, "serviceMonitor": {"enabled": True},
                                         "prometheusRule": {"enabled": True}}})
    assert of_kind(objects, "ServiceMonitor") == [] and of_kind(objects, "PrometheusRule") == []
    assert "WARNING: metrics.enabled is false" in objects[("NOTES", "")]["text"]


# -- values schema --------------------------------------------------------------------------------------

@pytest.mark.parametrize("values, message", [
    ({"replicaCount": "two"}, "at '/replicaCount': got string, want integer"),
    ({"replicaCount": 2, "leaderElection": {"enabled": False}}, "at '/replicaCount': maximum: got 2, want 1"),
    ({"replicaCount": 9}, "at '/replicaCount': maximum: got 9, want 5"),
    ({"leaderElection": {"leaseDurationSeconds": 1}}, "at '/leaderElection/leaseDurationSeconds'"),
    ({"replicas": 1}, "additional properties 'replicas' not allowed"),
    ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy'"),
    ({"image": {"tags": "x"}}, "additional properties 'tags' not allowed"),
    ({"watchNamespaces": "team-a"}, "at '/watchNamespaces': got string, want array"),
    ({"watchNamespaces": ["Team_A"]}, "at '/watchNamespaces/0'"),
    ({"ledger": {"port": 70000}}, "at '/ledger/port'"),
    ({"ledger": {"maxConnections": 0}}, "at '/ledger/maxConnections'"),
    ({"ledger": {"requestTimeoutSeconds": 0}}, "at '/ledger/requestTimeoutSeconds'"),
    ({"cutOff": {"clusterCIDRs": ["10.244.0.0"]}}, "at '/cutOff/clusterCIDRs/0'"),
    ({"logFormat": "yaml"}, "at '/logFormat'"),
    ({"rbac": {"create": "yes"}}, "at '/rbac/create': got string, want boolean"),
    ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "at '/metrics/serviceMonitor/interval'"),
    ({"metrics": {"podMonitor": {"interval": "often"}}}, "at '/metrics/podMonitor/interval'"),
    ({"metrics": {"podMonitor": {"namespaces": ["Team_A"]}}}, "at '/metrics/podMonitor/namespaces/0'"),
    ({"sidecar": {"native": "sometimes"}}, "at '/sidecar/native'"),
    ({"prices": {"pinned": [{"provider": "OpenAI", "model": "gpt-4.1", "input": 1.6}]}},
     "at '/prices/pinned/0/input': got number, want string"),
    ({"prices": {"pinned": [{"provider": "Mistral", "model": "large", "input": "1"}]}}, "at '/prices/pinned/0/provider'"),
    ({"prices": {"pinned": [{"model": "gpt-4.1", "input": "1"}]}}, "at '/prices/pinned/0'"),
])
def test_schema_rejects_bad_values_with_a_clear_error(chart, values, message):
    with pytest.raises(helm.HelmValuesError) as excinfo:
        chart.validate_schema(values)
    assert message in str(excinfo.value)
    # install/upgrade/template refuse them the same way.
    with pytest.raises(helm.HelmValuesError, match="values don't meet the specifications"):
        chart.render(values, name="spendwarden", namespace=NS)


def test_schema_accepts_the_defaults_and_the_custom_values(chart):
    chart.validate_schema(None)
    chart.validate_schema(CUSTOM)


def _undeclared(values, schema, path="") -> list[str]:
    missing = []
    if isinstance(values, dict) and schema.get("type") == "object" and "properties" in schema:
        for key, value in values.items():
            if key not in schema["properties"]:
                missing.append(f"{path}.{key}")
            else:
                missing += _undeclared(value, schema["properties"][key], f"{path}.{key}")
    return missing


def test_schema_declares_every_value_and_closes_the_top_level():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == set(values), "values.yaml and values.schema.json disagree on top-level keys"
    assert _undeclared(values, schema) == []


# -- the image the chart runs ---------------------------------------------------------------------------

def test_chart_and_dockerfile_agree(chart):
    """The Dockerfile's contract with the chart, checked as text in a second (tests/integration/e2e
    builds the image and runs it under the chart): the numeric non-root USER, the entrypoint."""
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    user = [line.split()[1] for line in instructions if line.startswith("USER ")][-1]
    uid, _, gid = user.partition(":")
    pod = one(render(chart), "Deployment")["spec"]["template"]["spec"]
    assert int(uid) == pod["securityContext"]["runAsUser"] and int(gid) == pod["securityContext"]["runAsGroup"]
    entrypoint = json.loads([line for line in instructions if line.startswith("ENTRYPOINT ")][-1][len("ENTRYPOINT "):])
    cmd = json.loads([line for line in instructions if line.startswith("CMD ")][-1][len("CMD "):])
    assert entrypoint[-1] == "spendwarden" and cmd == ["operator"]
    assert sum(line.startswith("FROM ") for line in instructions) >= 2  # multi-stage: no build tools at run time


def test_webhook_configurations_are_the_releases_and_empty_until_the_operator_fills_them(chart):
    """helm uninstall must remove them: left behind, the validating one (Fail) refused every change."""
    objects = render(chart, {"webhooks": {"enabled": True, "configurationName": "hooks.example"}})
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        cfg = one(objects, kind)
        assert cfg["metadata"]["name"] == "hooks.example" and cfg["webhooks"] == []
        assert cfg["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    assert not of_kind(render(chart, {}), "MutatingWebhookConfiguration")
