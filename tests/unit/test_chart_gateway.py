"""The chart's gateway mode (issue #13), rendered offline as tests/unit/test_chart.py does: the
gateway objects with gateway.enabled and none without, the exact contract of the gateway's
Deployment, and the operator's settings and RBAC for it."""
from __future__ import annotations

import helm_python as helm
import pytest

from spendwarden.render import gateway as gw
from spendwarden.render import injection
from tests.unit.test_chart import CHART, NS, grants, render

ON = {"gateway": {"enabled": True}}


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as c:
        yield c
GATEWAY_OBJECTS = {("ServiceAccount", "spendwarden-gateway"), ("Deployment", "spendwarden-gateway"),
                   ("Service", "spendwarden-gateway"), ("PodDisruptionBudget", "spendwarden-gateway"),
                   ("ClusterRoleBinding", "spendwarden-gateway-auth-delegator"),
                   ("Role", "spendwarden-gateway"), ("RoleBinding", "spendwarden-gateway")}


def env_of(c) -> dict:
    return {e["name"]: e.get("value") for e in c.get("env") or []}


def operator_env(objects) -> dict:
    return env_of(objects[("Deployment", "spendwarden")]["spec"]["template"]["spec"]["containers"][0])


def test_without_the_gateway_nothing_of_it_is_rendered(chart):
    objects = render(chart)
    assert not any("gateway" in name for _, name in objects)
    env = operator_env(objects)
    assert env["SPENDWARDEN_DEFAULT_MODE"] == "sidecar"
    assert not any(k.startswith("SPENDWARDEN_GATEWAY_") for k in env)
    assert not any("spendwarden-gateway-egress" in r.get("resourceNames", [])
                   for r in objects[("ClusterRole", "spendwarden")]["rules"])


def test_the_gateway_objects_in_the_release_namespace_by_default(chart):
    objects = render(chart, ON)
    assert GATEWAY_OBJECTS <= set(objects)
    for key in GATEWAY_OBJECTS - {("ClusterRoleBinding", "spendwarden-gateway-auth-delegator")}:
        assert objects[key]["metadata"]["namespace"] == NS, key
    assert ("HorizontalPodAutoscaler", "spendwarden-gateway") not in objects  # off by default
    env = operator_env(objects)
    assert env["SPENDWARDEN_GATEWAY_NAMESPACE"] == NS
    assert env["SPENDWARDEN_GATEWAY_SERVICE_ACCOUNT"] == "spendwarden-gateway"


def test_the_gateway_deployment_is_the_contract(chart):
    objects = render(chart, {"gateway": {"enabled": True, "namespace": "sw-gateway", "replicas": 3,
                                         "rateLimit": {"namespace": {"rate": 7, "burst": 9},
                                                       "serviceAccount": {"rate": 0, "burst": 0}}}})
    dep = objects[("Deployment", "spendwarden-gateway")]
    assert dep["metadata"]["namespace"] == "sw-gateway" and dep["spec"]["replicas"] == 3
    pod = dep["spec"]["template"]
    assert {"app.kubernetes.io/name": "spendwarden", "app.kubernetes.io/component": "gateway"}.items() \
        <= pod["metadata"]["labels"].items()
    spec = pod["spec"]
    assert spec["serviceAccountName"] == "spendwarden-gateway" and spec["automountServiceAccountToken"] is True
    [c] = spec["containers"]
    assert c["image"] == objects[("Deployment", "spendwarden")]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert c["args"] == ["gateway", "--config-dir", "/etc/spendwarden/gateway", "--secrets-dir",
                         "/var/run/spendwarden/gateway-secrets", "--host", "0.0.0.0", "--port", "8787",
                         "--metrics-port", "9464", "--namespace-rate", "7", "--namespace-burst", "9",
                         "--serviceaccount-rate", "0", "--serviceaccount-burst", "0"]
    assert env_of(c)["SPENDWARDEN_LEDGER_TOKEN_FILE"] == "/var/run/secrets/spendwarden/token"
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8787, "metrics": 9464}
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["runAsUser"] == injection.PROXY_UID and sc["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols[mounts["/etc/spendwarden/gateway"]]["configMap"] == {"name": gw.CONFIGMAP_NAME, "optional": True}
    assert vols[mounts["/var/run/spendwarden/gateway-secrets"]]["secret"] == {
        "secretName": gw.CREDENTIALS_SECRET, "optional": True}
    token = vols[mounts["/var/run/secrets/spendwarden"]]
    assert token["projected"] == injection.token_volume(injection.InjectionSettings(image="x"))["projected"]
    svc = objects[("Service", "spendwarden-gateway")]
    assert [(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [
        ("http", 8787, 8787), ("metrics", 9464, 9464)]
    assert svc["spec"]["selector"] == objects[("PodDisruptionBudget", "spendwarden-gateway")]["spec"]["selector"][
        "matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    crb = objects[("ClusterRoleBinding", "spendwarden-gateway-auth-delegator")]
    assert crb["roleRef"]["name"] == "system:auth-delegator"
    assert crb["subjects"] == [{"kind": "ServiceAccount", "name": "spendwarden-gateway", "namespace": "sw-gateway"}]


def test_autoscaling_and_a_single_replica(chart):
    objects = render(chart, {"gateway": {"enabled": True, "autoscaling": {"enabled": True, "minReplicas": 3,
                                                                           "maxReplicas": 12}}})
    hpa = objects[("HorizontalPodAutoscaler", "spendwarden-gateway")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    assert hpa["spec"]["metrics"][0]["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    assert "replicas" not in objects[("Deployment", "spendwarden-gateway")]["spec"]  # the HPA owns it
    single = render(chart, {"gateway": {"enabled": True, "replicas": 1}})
    assert ("PodDisruptionBudget", "spendwarden-gateway") not in single


def test_operator_rbac_reads_secrets_only_in_the_gateway_namespace(chart):
    objects = render(chart, {"gateway": {"enabled": True, "namespace": "sw-gateway",
                                         "tenantEgress": {"allowCIDRs": ["10.0.0.0/8", "203.0.113.7/32"]},
                                         "defaultMode": "gateway"}})
    role = objects[("Role", "spendwarden-gateway")]
    assert role["metadata"]["namespace"] == "sw-gateway"
    assert {("", "secrets", v) for v in ("get", "list", "watch")} <= grants(role)
    named = {(r["resources"][0], tuple(r["verbs"])): r.get("resourceNames") for r in role["rules"]}
    assert named[("secrets", ("patch", "update"))] == [gw.CREDENTIALS_SECRET]
    assert named[("configmaps", ("get", "patch", "update"))] == [gw.CONFIGMAP_NAME]
    binding = objects[("RoleBinding", "spendwarden-gateway")]
    assert binding["subjects"][0]["namespace"] == NS
    # Cluster-wide: still only the alerting Secret, and the egress policy by name.
    cluster = objects[("ClusterRole", "spendwarden")]["rules"]
    assert [r["resourceNames"] for r in cluster if "secrets" in r["resources"]] == [["spendwarden-alerting"]]
    assert {"resourceNames": [gw.EGRESS_POLICY_NAME], "verbs": ["get", "list", "patch", "delete"]}.items() <= next(
        r for r in cluster if gw.EGRESS_POLICY_NAME in r.get("resourceNames", [])).items()
    env = operator_env(objects)
    assert env["SPENDWARDEN_GATEWAY_NAMESPACE"] == "sw-gateway" and env["SPENDWARDEN_DEFAULT_MODE"] == "gateway"
    assert env["SPENDWARDEN_GATEWAY_EGRESS_CIDRS"] == "10.0.0.0/8,203.0.113.7/32"
    # What the chart sets is what the operator reads.
    settings = gw.GatewaySettings.from_env(env)
    assert settings.namespace == "sw-gateway" and settings.egress_cidrs == ("10.0.0.0/8", "203.0.113.7/32")


def test_lint_with_the_gateway_and_the_schema_refuses_a_bad_mode(chart):
    report = helm.lint(CHART, {"gateway": {"enabled": True, "autoscaling": {"enabled": True}}}, strict=True,
                       namespace=NS, kube_version="v1.23.0")
    assert report["errors"] == [], report
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema({"gateway": {"defaultMode": "proxy"}})


def test_no_service_links_reach_the_operator_or_the_gateway(chart):
    """The Service spendwarden-gateway made the kubelet inject SPENDWARDEN_GATEWAY_PORT=tcp://... into
    the operator's Pod, which read it as a port number and crashed at start on the real node."""
    objects = render(chart, ON)
    for name in ("spendwarden", "spendwarden-gateway"):
        assert objects[("Deployment", name)]["spec"]["template"]["spec"]["enableServiceLinks"] is False, name
    links = {"SPENDWARDEN_GATEWAY_PORT": "tcp://10.96.128.145:8787", "SPENDWARDEN_GATEWAY_SERVICE_HOST": "10.96.128.145",
             "SPENDWARDEN_GATEWAY_SERVICE_PORT": "8787", "SPENDWARDEN_GATEWAY_PORT_8787_TCP": "tcp://10.96.128.145:8787"}
    settings = gw.GatewaySettings.from_env({"SPENDWARDEN_GATEWAY_NAMESPACE": "gw", **links})
    assert settings.base_url() == "http://spendwarden-gateway.gw.svc:8787"
