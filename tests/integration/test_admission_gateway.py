"""The injection webhook in gateway mode (issue #13), called by the real kube-apiserver: a Pod of a
namespace labelled spendwarden.io/mode=gateway gets no sidecar but the SDKs' base URLs at the gateway,
the projected token and the label spendwarden.io/proxy=gateway; the inject labels still decide which
Pods are touched. Pods stay Pending (no kubelet needed)."""
from __future__ import annotations

import uuid

import pytest
from kubernetes import client

from spendwarden.render import gateway as gw
from spendwarden.render import injection
from tests.support.operator_process import wait_for

from .test_admission import INJECT, _pod, create_pod, env_of, serve_webhooks

GWNS = f"adm-gw-{uuid.uuid4().hex[:6]}"
BASE = f"http://spendwarden-gateway.{GWNS}.svc:8787"


@pytest.fixture(scope="module")
def operator(control_plane, kube, tmp_path_factory):
    conf = f"admgw-{uuid.uuid4().hex[:8]}.spendwarden.io"
    core = client.CoreV1Api(kube)
    operator_ns = f"adm-operator-{uuid.uuid4().hex[:6]}"
    for ns in (operator_ns, GWNS):
        core.create_namespace({"metadata": {"name": ns}})
    yield from serve_webhooks(control_plane, kube, tmp_path_factory.mktemp("admission-gateway"), conf, operator_ns,
                              native_sidecar="false", env={"SPENDWARDEN_GATEWAY_NAMESPACE": GWNS})
    for ns in (operator_ns, GWNS):
        core.delete_namespace(ns)


@pytest.fixture
def tenant(kube, operator):
    name = f"adm-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(kube).create_namespace({"metadata": {"name": name, "labels": {gw.MODE_LABEL: "gateway"}}})
    yield name
    client.CoreV1Api(kube).delete_namespace(name)


def test_a_gateway_mode_pod_is_pointed_at_the_gateway_without_a_sidecar(kube, tenant):
    labelled = _pod("probe", labels={INJECT: "true"})
    pod = wait_for(lambda: (p := create_pod(kube, tenant, labelled, dry_run="All"))["metadata"].get("labels", {}).get(
        injection.PROXY_LABEL) and p, timeout=30, what="the mutating webhook")
    assert pod["metadata"]["labels"][injection.PROXY_LABEL] == "gateway"
    [app] = pod["spec"]["containers"]  # no sidecar, in either shape
    assert not pod["spec"].get("initContainers")
    assert env_of(app) == {"OPENAI_BASE_URL": f"{BASE}/v1", "ANTHROPIC_BASE_URL": BASE,
                           "SPENDWARDEN_TOKEN_FILE": "/var/run/secrets/spendwarden/token"}
    assert {"name": "spendwarden-token", "mountPath": "/var/run/secrets/spendwarden", "readOnly": True} in app[
        "volumeMounts"]
    token = next(v for v in pod["spec"]["volumes"] if v["name"] == "spendwarden-token")
    assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "spendwarden"
    # The inject labels still decide: an unlabelled Pod of an unlabelled-for-injection namespace is untouched.
    plain = create_pod(kube, tenant, _pod("plain"), dry_run="All")
    assert injection.PROXY_LABEL not in (plain["metadata"].get("labels") or {})
