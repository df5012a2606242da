"""The proxy injected as a native sidecar (init container with restartPolicy Always) by an operator in
its default mode (sidecar.native auto), on apiservers that have native sidecars (1.29+); skipped on
older ones, where test_admission.py covers the plain container. Stored Pods are inspected; whether
a Job's Pod completes needs a node (the end-to-end suite).
"""
from __future__ import annotations

import uuid

import pytest
from kubernetes import client

from spendwarden.render import injection

from .test_admission import INJECT, _ns, _pod, _ready_for_pods, create_pod, env_of, serve_webhooks


@pytest.fixture(scope="module")
def native_operator(control_plane, kube, tmp_path_factory):
    info = client.VersionApi(kube).get_code()
    version = injection.parse_server_version(info.major, info.minor, info.git_version)
    if version is None or version < injection.NATIVE_SIDECAR_SINCE:
        pytest.skip(f"apiserver {info.git_version} has no native sidecars (1.29+)")
    operator_ns = f"adm-operator-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(kube).create_namespace({"metadata": {"name": operator_ns}})
    try:
        yield from serve_webhooks(control_plane, kube, tmp_path_factory.mktemp("native-sidecar"),
                                  f"adm-{uuid.uuid4().hex[:8]}.spendwarden.io", operator_ns, native_sidecar="auto")
    finally:
        client.CoreV1Api(kube).delete_namespace(operator_ns)


@pytest.fixture
def labelled_ns(kube, native_operator):
    name = _ns(kube, {INJECT: "true"})
    yield name
    client.CoreV1Api(kube).delete_namespace(name)


def test_proxy_is_the_first_init_container_restarting_always(kube, labelled_ns):
    _ready_for_pods(kube, labelled_ns)
    body = _pod("app")
    body["spec"]["initContainers"] = [{"name": "migrate", "image": "migrate:1"}]
    pod = create_pod(kube, labelled_ns, body)
    spec = pod["spec"]
    assert [c["name"] for c in spec["containers"]] == ["app"]
    assert [c["name"] for c in spec["initContainers"]] == [injection.CONTAINER_NAME, "migrate"]
    proxy = spec["initContainers"][0]
    assert proxy["restartPolicy"] == "Always"  # the apiserver kept it: SidecarContainers is on
    assert proxy["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "sw-metrics", "scheme": "HTTP"}
    assert {p["name"]: p["containerPort"] for p in proxy["ports"]} == {"sw-proxy": 8787, "sw-metrics": 9464}
    assert env_of(spec["containers"][0]) == {"OPENAI_BASE_URL": "http://127.0.0.1:8787/v1",
                                             "ANTHROPIC_BASE_URL": "http://127.0.0.1:8787"}
    assert pod["metadata"]["labels"][injection.PROXY_LABEL] == "injected"


def test_pod_with_the_proxy_as_an_init_container_already_is_unchanged(kube, labelled_ns):
    _ready_for_pods(kube, labelled_ns)
    body = _pod("already")
    body["spec"]["initContainers"] = [{"name": injection.CONTAINER_NAME, "image": "own:1", "restartPolicy": "Always"}]
    pod = create_pod(kube, labelled_ns, body)
    assert [(c["name"], c["image"]) for c in pod["spec"]["initContainers"]] == [(injection.CONTAINER_NAME, "own:1")]
    assert [c["name"] for c in pod["spec"]["containers"]] == ["app"]
    assert "env" not in pod["spec"]["containers"][0]
