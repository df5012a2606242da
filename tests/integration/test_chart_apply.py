"""The Helm chart's rendered manifests on the real apiserver: every object is accepted (server-side
apply, as `helm install` would create them), the Deployment's pod template passes pod validation
(the ReplicaSet controller creates its Pod), and the RBAC the chart grants lets the operator's
ServiceAccount do exactly what it needs, checked by the apiserver's own authorizer."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import helm_python as helm
import pytest
import yaml
from kubernetes import client

from tests.support.operator_process import wait_for

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "spendwarden"
FIELD_MANAGER = "spendwarden-chart-test"

ALL_ON = {
    "watchNamespaces": ["team-*"],
    "serviceAccount": {"name": "warden"},
    "webhooks": {"enabled": True},
    "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
                "podMonitor": {"enabled": True, "namespaces": ["team-a"]}},
    "podAnnotations": {"example.com/owner": "platform"},
    "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
}

# The monitoring.coreos.com kinds are not part of a bare apiserver. These are structural subsets of
# the Prometheus Operator's v1 CRDs (prometheus-operator v0.82, example/prometheus-operator-crd/):
# the same field names and types for everything the chart writes, without descriptions or the
# fields the chart does not use. No x-kubernetes-preserve-unknown-fields, so a misspelt field is
# pruned by the apiserver and the round-trip comparison in the test catches it.
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_LABEL_SELECTOR = {"type": "object", "x-kubernetes-map-type": "atomic", "properties": {
    "matchLabels": _STR_MAP,
    "matchExpressions": {"type": "array", "items": {"type": "object", "required": ["key", "operator"], "properties": {
        "key": {"type": "string"}, "operator": {"type": "string"},
        "values": {"type": "array", "items": {"type": "string"}}}}}}}


def _crd(kind: str, plural: str, spec_schema: dict) -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
                 "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower()},
                 "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                     "type": "object", "required": ["spec"], "properties": {
                         "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
                         "spec": spec_schema}}}}]},
    }


MONITORING_CRDS = [
    _crd("ServiceMonitor", "servicemonitors", {"type": "object", "required": ["selector"], "properties": {
        "jobLabel": {"type": "string"},
        "selector": _LABEL_SELECTOR,
        "namespaceSelector": {"type": "object", "properties": {
            "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
        "endpoints": {"type": "array", "items": {"type": "object", "properties": {
            "port": {"type": "string"}, "path": {"type": "string"}, "scheme": {"type": "string"},
            "interval": _DURATION, "scrapeTimeout": _DURATION, "honorLabels": {"type": "boolean"}}}}}}),
    _crd("PodMonitor", "podmonitors", {"type": "object", "required": ["selector"], "properties": {
        "jobLabel": {"type": "string"},
        "selector": _LABEL_SELECTOR,
        "namespaceSelector": {"type": "object", "properties": {
            "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
        "podMetricsEndpoints": {"type": "array", "items": {"type": "object", "properties": {
            "port": {"type": "string"}, "path": {"type": "string"}, "scheme": {"type": "string"},
            "interval": _DURATION, "scrapeTimeout": _DURATION, "honorLabels": {"type": "boolean"}}}}}}),
    _crd("PrometheusRule", "prometheusrules", {"type": "object", "properties": {
        "groups": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                   "items": {"type": "object", "required": ["name"], "properties": {
                       "name": {"type": "string", "minLength": 1}, "interval": _DURATION, "limit": {"type": "integer"},
                       "labels": _STR_MAP,
                       "rules": {"type": "array", "items": {"type": "object", "required": ["expr"], "properties": {
                           "alert": {"type": "string"}, "record": {"type": "string"},
                           "expr": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
                           "for": _DURATION, "keep_firing_for": _DURATION,
                           "labels": _STR_MAP, "annotations": _STR_MAP}}}}}}}}),
]

CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "MutatingWebhookConfiguration",
                  "ValidatingWebhookConfiguration"}


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as c:
        yield c


@pytest.fixture(scope="module")
def monitoring_crds(control_plane, tmp_path_factory):
    path = tmp_path_factory.mktemp("monitoring-crds") / "monitoring.coreos.com.yaml"
    path.write_text(yaml.safe_dump_all(MONITORING_CRDS))
    control_plane.install_crds([path])


@pytest.fixture
def release(control_plane, namespace):
    """A release name unique to the test; its cluster-scoped objects are deleted afterwards
    (the namespace fixture takes care of the namespaced ones)."""
    name = f"sw-{uuid.uuid4().hex[:6]}"
    yield name
    for kind in ("clusterrolebinding", "clusterrole", "mutatingwebhookconfiguration", "validatingwebhookconfiguration"):
        control_plane.kubectl("delete", kind, "-l", f"app.kubernetes.io/instance={name}",
                              "--ignore-not-found", "--wait=false", check=False)


def render(chart, values, release, namespace) -> list[dict]:
    docs = []
    for path, text in sorted(chart.render(values, name=release, namespace=namespace, is_install=True).items()):
        if not path.endswith(".yaml"):
            continue  # NOTES.txt
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def apply(control_plane, docs: list[dict]) -> None:
    res = control_plane.kubectl("apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "-f", "-",
                                input=yaml.safe_dump_all(docs), check=False)
    assert res.returncode == 0, f"server-side apply refused the chart:\n{res.stderr}\n{res.stdout}"


def read_back(control_plane, doc: dict) -> dict:
    group = doc["apiVersion"].rpartition("/")[0]  # "" for the core group ("v1")
    resource = f"{doc['kind'].lower()}.{group}" if group else doc["kind"].lower()
    args = ["get", resource, doc["metadata"]["name"], "-o", "json"]
    if doc["kind"] not in CLUSTER_SCOPED:
        args[1:1] = ["-n", doc["metadata"]["namespace"]]
    return json.loads(control_plane.kubectl(*args).stdout)




GATEWAY_ON = {"gateway": {"enabled": True, "autoscaling": {"enabled": True},
                           "tenantEgress": {"allowCIDRs": ["203.0.113.0/24"]}}}


@pytest.mark.parametrize("values", [None, ALL_ON, GATEWAY_ON], ids=["defaults", "all-features", "gateway"])
def test_every_rendered_object_is_accepted(chart, control_plane, kube, monitoring_crds, namespace, release, values):
    docs = render(chart, values, release, namespace)
    kinds = {d["kind"] for d in docs}
    if values is ALL_ON:
        assert {"ServiceMonitor", "PodMonitor", "PrometheusRule"} <= kinds
    # What `helm install` does first: the chart's crds/ (identical to crds/, already served here).
    crds = [yaml.safe_load(c["data"]) for c in chart.crds]
    apply(control_plane, crds)
    apply(control_plane, docs)

    for doc in docs:
        stored = read_back(control_plane, doc)
        assert stored["metadata"]["labels"]["app.kubernetes.io/instance"] == release, doc["kind"]
        if doc["kind"] in ("ServiceMonitor", "PodMonitor", "PrometheusRule"):
            # Unknown fields would have been pruned silently: the spec must come back as sent.
            assert stored["spec"] == doc["spec"], f"{doc['kind']} spec changed on the apiserver (pruned field?)"

    # The ReplicaSet controller creates the Pod: the pod template (security contexts, probes, volumes,
    # env from the downward API) passes the apiserver's Pod validation, not only the Deployment's.
    core = client.CoreV1Api(kube)
    selector = f"app.kubernetes.io/instance={release},app.kubernetes.io/component=operator"
    pod = wait_for(lambda: (core.list_namespaced_pod(namespace, label_selector=selector).items or [None])[0],
                   what="the operator Pod created by the ReplicaSet")
    sa = (values or {}).get("serviceAccount", {}).get("name") or release + "-spendwarden"
    assert pod.spec.service_account_name == sa
    assert pod.spec.security_context.run_as_non_root is True
    assert pod.spec.containers[0].security_context.read_only_root_filesystem is True
    if values is ALL_ON:
        assert pod.metadata.annotations["example.com/owner"] == "platform"
        assert "--namespace=team-*" in pod.spec.containers[0].args
    if values is GATEWAY_ON:
        # The gateway's pod template passes Pod validation too (projected token, optional volumes).
        selector = f"app.kubernetes.io/instance={release},app.kubernetes.io/component=gateway"
        gateway = wait_for(lambda: (core.list_namespaced_pod(namespace, label_selector=selector).items or [None])[0],
                           what="a gateway Pod created by the ReplicaSet")
        assert gateway.spec.service_account_name == "spendwarden-gateway"
        assert gateway.spec.containers[0].args[0] == "gateway"
        assert {"HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds


def can(kube, sa_user: str, sa_namespace: str, verb: str, resource: str, group: str = "", namespace: str | None = None,
        subresource: str | None = None, name: str | None = None) -> bool:
    review = client.AuthorizationV1Api(kube).create_subject_access_review({
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": sa_user,
                 "groups": ["system:serviceaccounts", f"system:serviceaccounts:{sa_namespace}", "system:authenticated"],
                 "resourceAttributes": {k: v for k, v in {
                     "verb": verb, "group": group, "resource": resource, "namespace": namespace,
                     "subresource": subresource, "name": name}.items() if v is not None}}})
    return bool(review.status.allowed)


def test_the_service_account_gets_exactly_the_rbac_it_needs(chart, control_plane, kube, namespace, release):
    values = {"webhooks": {"enabled": True}}
    apply(control_plane, render(chart, values, release, namespace))
    user = f"system:serviceaccount:{namespace}:{release}-spendwarden"
    team = "team-elsewhere"  # any other namespace: the ClusterRole applies everywhere
    allowed = [
        ("watch", "tokenbudgets", "spendwarden.io", team, None, None),
        ("patch", "modelroutes", "spendwarden.io", team, None, None),
        ("patch", "tokenbudgets", "spendwarden.io", team, "status", None),
        ("update", "modelroutes", "spendwarden.io", team, "status", None),
        ("create", "events", "", team, None, None),
        ("create", "events", "events.k8s.io", team, None, None),
        ("create", "configmaps", "", team, None, None),
        *((v, "configmaps", "", team, None, "spendwarden-proxy") for v in ("get", "update", "delete")),
        ("list", "configmaps", "", None, None, "spendwarden-proxy"),  # the drift check, all namespaces
        ("list", "namespaces", "", None, None, None),
        ("patch", "namespaces", "", None, None, team),
        ("watch", "customresourcedefinitions", "apiextensions.k8s.io", None, None, None),
        ("get", "namespaces", "", None, None, team),
        *(((v, "networkpolicies", "networking.k8s.io", team, None, n) for v, n in (
            ("get", "spendwarden-cut-off"), ("create", None), ("patch", "spendwarden-cut-off"),
            ("delete", "spendwarden-cut-off")))),
        *((v, w, "apps", team, "scale", None) for v in ("get", "patch") for w in ("deployments", "statefulsets")),
        ("get", "deployments", "apps", team, None, None),
        ("list", "horizontalpodautoscalers", "autoscaling", team, None, None),
        ("create", "tokenreviews", "authentication.k8s.io", None, None, None),
        ("update", "leases", "coordination.k8s.io", namespace, None, None),
        ("create", "secrets", "", namespace, None, None),
        ("get", "secrets", "", namespace, None, f"{release}-spendwarden-webhook-tls"),
        ("patch", "validatingwebhookconfigurations", "admissionregistration.k8s.io", None, None, "spendwarden.io"),
    ]
    denied = [
        ("get", "secrets", "", team, None, "anything"),  # no Secrets outside its namespace
        ("get", "secrets", "", namespace, None, "someone-elses"),  # only its own Secret
        ("list", "secrets", "", namespace, None, None),
        ("delete", "tokenbudgets", "spendwarden.io", team, None, None),
        ("create", "pods", "", team, None, None),
        ("delete", "namespaces", "", None, None, team),
        ("patch", "deployments", "apps", team, None, None),  # scale only, not the spec
        ("update", "statefulsets", "apps", team, None, None),
        ("delete", "deployments", "apps", team, None, None),
        ("update", "leases", "coordination.k8s.io", team, None, None),  # leases only at home
        ("patch", "validatingwebhookconfigurations", "admissionregistration.k8s.io", None, None, "another-webhook"),
        ("create", "customresourcedefinitions", "apiextensions.k8s.io", None, None, None),
        # Of ConfigMaps and NetworkPolicies only its own: spendwarden-proxy and spendwarden-cut-off.
        *((v, "configmaps", "", team, None, "kube-root-ca.crt") for v in ("get", "update", "patch", "delete")),
        ("list", "configmaps", "", team, None, None),
        ("watch", "configmaps", "", team, None, "spendwarden-proxy"),
        *((v, "networkpolicies", "networking.k8s.io", team, None, "default-deny") for v in ("get", "patch", "delete")),
        ("list", "networkpolicies", "networking.k8s.io", team, None, None),
    ]
    wrong = [("allowed", a) for a in allowed if not can(kube, user, namespace, *a)]
    wrong += [("denied", d) for d in denied if can(kube, user, namespace, *d)]
    assert wrong == [], f"RBAC differs from what the operator needs (expected -> request): {wrong}"


def test_default_render_has_no_webhook_rbac_on_the_apiserver(chart, control_plane, kube, namespace, release):
    apply(control_plane, render(chart, None, release, namespace))
    user = f"system:serviceaccount:{namespace}:{release}-spendwarden"
    assert can(kube, user, namespace, "list", "namespaces")
    assert not can(kube, user, namespace, "create", "secrets", namespace=namespace)
    assert not can(kube, user, namespace, "create", "validatingwebhookconfigurations", "admissionregistration.k8s.io")


def test_gateway_mode_rbac_reads_secrets_only_in_the_gateway_namespace(chart, control_plane, kube, namespace, release):
    """gateway.enabled (gateway namespace: the release's): the operator reads Secrets there and nowhere
    else, writes only the gateway's own ConfigMap and Secret there and only its egress policy in teams;
    the gateway's ServiceAccount may create TokenReviews and nothing of the operator's."""
    apply(control_plane, render(chart, {"gateway": {"enabled": True}}, release, namespace))
    user = f"system:serviceaccount:{namespace}:{release}-spendwarden"
    gateway = f"system:serviceaccount:{namespace}:spendwarden-gateway"
    team = "team-elsewhere"
    allowed = [
        *((v, "secrets", "", namespace, None, None) for v in ("get", "list", "watch", "create")),
        *((v, "secrets", "", namespace, None, "spendwarden-gateway-credentials") for v in ("patch", "update")),
        *((v, "configmaps", "", namespace, None, "spendwarden-gateway-config") for v in ("get", "patch", "update")),
        *((v, "networkpolicies", "networking.k8s.io", team, None, "spendwarden-gateway-egress")
          for v in ("get", "patch", "delete")),
        ("list", "networkpolicies", "networking.k8s.io", None, None, "spendwarden-gateway-egress"),
        ("patch", "modelroutes", "spendwarden.io", team, "status", None),
    ]
    denied = [
        *((v, "secrets", "", team, None, None) for v in ("list", "watch")),
        ("get", "secrets", "", team, None, "openai"),
        ("patch", "secrets", "", namespace, None, "openai"),  # reads the provider keys, never changes them
        ("patch", "configmaps", "", namespace, None, "another"),
        ("delete", "networkpolicies", "networking.k8s.io", team, None, "default-deny"),
    ]
    wrong = [("allowed", a) for a in allowed if not can(kube, user, namespace, *a)]
    wrong += [("denied", d) for d in denied if can(kube, user, namespace, *d)]
    if not can(kube, gateway, namespace, "create", "tokenreviews", "authentication.k8s.io"):
        wrong.append(("allowed", "the gateway's tokenreviews create"))
    for d in (("get", "secrets", "", namespace, None, None), ("patch", "tokenbudgets", "spendwarden.io", team)):
        if can(kube, gateway, namespace, *d):
            wrong.append(("denied", ("gateway", *d)))
    assert wrong == [], f"RBAC differs from what gateway mode needs (expected -> request): {wrong}"
