"""The local control plane does what the operator's tests rely on: served CRDs with their schema,
controllers (Deployments -> ReplicaSets -> Pods, garbage collection), TokenRequest/TokenReview, webhooks."""
from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from spendwarden.localcluster import node as nodes
from spendwarden.localcluster.controlplane import ControlPlane
from tests.support.operator_process import wait_for

CRDS = Path(__file__).resolve().parents[2] / "crds"




def token_budget(name: str, **spec) -> dict:
    return {"apiVersion": "spendwarden.io/v1alpha1", "kind": "TokenBudget", "metadata": {"name": name},
            "spec": {"period": {"type": "Daily"}, "limits": {"tokens": {"total": 1000}}, **spec}}


def owner_ref(obj, api_version: str, kind: str) -> dict:
    meta = obj["metadata"] if isinstance(obj, dict) else obj.metadata
    name, uid = (meta["name"], meta["uid"]) if isinstance(meta, dict) else (meta.name, meta.uid)
    return {"apiVersion": api_version, "kind": kind, "name": name, "uid": uid}


# --- CRDs ----------------------------------------------------------------------------------------


def test_crds_served(control_plane: ControlPlane, namespace: str):
    assert {"tokenbudgets.spendwarden.io", "modelroutes.spendwarden.io"} <= set(control_plane.crd_names)
    res = control_plane.kubectl("api-resources", "--api-group=spendwarden.io", "-o", "name")
    assert set(res.stdout.split()) >= {"tokenbudgets.spendwarden.io", "modelroutes.spendwarden.io"}
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(token_budget("daily")))
    res = control_plane.kubectl("get", "tb,mr", "-A")  # short names from the CRDs
    assert "daily" in res.stdout and namespace in res.stdout


def test_explain_shows_crd_descriptions(control_plane: ControlPlane):
    crd = yaml.safe_load((CRDS / "spendwarden.io_tokenbudgets.yaml").read_text())
    limits = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["limits"]

    def explain():
        # the apiserver publishes a new CRD's OpenAPI a moment after it is served
        res = control_plane.kubectl("explain", "tokenbudget.spec.limits", check=False)
        return res if res.returncode == 0 else None

    out = " ".join(wait_for(explain, timeout=20, what="kubectl explain").stdout.split())
    assert limits["description"] in out
    for field, schema in limits["properties"].items():
        assert field in out and schema["description"] in out


def test_schema_violation_is_rejected(kube, namespace: str):
    objs = client.CustomObjectsApi(kube)
    with pytest.raises(client.ApiException) as e:
        objs.create_namespaced_custom_object("spendwarden.io", "v1alpha1", namespace, "tokenbudgets",
                                             token_budget("bad", onExceeded="Explode"))
    assert e.value.status == 422
    assert "spec.onExceeded" in e.value.body and "Explode" in e.value.body
    # defaults from the schema are applied by the apiserver
    ok = objs.create_namespaced_custom_object("spendwarden.io", "v1alpha1", namespace, "tokenbudgets",
                                              token_budget("good"))
    assert ok["spec"]["onExceeded"] == "CutOff"


# --- kube-controller-manager -----------------------------------------------------------------------


def test_deployment_gets_replicaset_and_running_pods(kube, namespace: str):
    """controller-manager makes the ReplicaSet and Pods, the scheduler binds them to the node, and the
    kubelet runs them (the pause image, imported into the node: no registry is reachable)."""
    apps, core = client.AppsV1Api(kube), client.CoreV1Api(kube)
    labels = {"app": "web"}
    dep = apps.create_namespaced_deployment(namespace, {
        "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [{"name": "web", "image": nodes.PAUSE_IMAGE}]}}}})

    rs = wait_for(lambda: apps.list_namespaced_replica_set(namespace).items, what="ReplicaSet")[0]
    assert rs.metadata.owner_references[0].uid == dep.metadata.uid
    pods = wait_for(lambda: (p := core.list_namespaced_pod(namespace, label_selector="app=web").items)
                    and len(p) == 2 and all(x.status.phase == "Running" for x in p) and p,
                    timeout=60, what="2 running Pods")
    for pod in pods:
        assert pod.metadata.owner_references[0].uid == rs.metadata.uid
        assert pod.spec.node_name == nodes.NODE_NAME
        assert pod.status.pod_ip and pod.status.pod_ip.startswith("10.244.0.")
    assert len({p.status.pod_ip for p in pods}) == 2


def test_an_image_not_in_the_node_fails_to_pull_at_once(kube, namespace: str):
    """Every registry resolves to a closed local port: nothing is fetched from outside."""
    core = client.CoreV1Api(kube)
    core.create_namespaced_pod(namespace, {"metadata": {"name": "absent"}, "spec": {
        "containers": [{"name": "c", "image": "example.invalid/absent:1"}]}})
    reason = wait_for(lambda: next((s.state.waiting.reason for s in (core.read_namespaced_pod(
        "absent", namespace).status.container_statuses or []) if s.state.waiting and s.state.waiting.reason in (
        "ErrImagePull", "ImagePullBackOff")), None), timeout=60, what="ErrImagePull")
    assert reason in ("ErrImagePull", "ImagePullBackOff")


def test_garbage_collection_of_owned_configmaps(kube, namespace: str):
    core, objs = client.CoreV1Api(kube), client.CustomObjectsApi(kube)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    budget = objs.create_namespaced_custom_object("spendwarden.io", "v1alpha1", namespace, "tokenbudgets",
                                                  token_budget("owner"))
    core.create_namespaced_config_map(namespace, {"metadata": {
        "name": "owned-by-configmap", "ownerReferences": [owner_ref(owner, "v1", "ConfigMap")]}})
    core.create_namespaced_config_map(namespace, {"metadata": {
        "name": "owned-by-budget", "ownerReferences": [owner_ref(budget, "spendwarden.io/v1alpha1", "TokenBudget")]}})
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "bystander"}})

    def names():
        return {c.metadata.name for c in core.list_namespaced_config_map(namespace).items}

    time.sleep(1)  # give the garbage collector a chance to get it wrong: dependents of live owners stay
    assert {"owned-by-configmap", "owned-by-budget", "bystander"} <= names()
    core.delete_namespaced_config_map("owner", namespace)
    objs.delete_namespaced_custom_object("spendwarden.io", "v1alpha1", namespace, "tokenbudgets", "owner")

    # custom-resource owners too: the CRDs were installed before kube-controller-manager started
    wait_for(lambda: not names() & {"owned-by-configmap", "owned-by-budget"}, timeout=30,
             what="garbage collection of the dependents")
    assert "bystander" in names()


def test_namespace_controller_deletes_namespaces(kube, control_plane: ControlPlane):
    core = client.CoreV1Api(kube)
    name = f"doomed-{time.monotonic_ns() % 10**8}"
    core.create_namespace({"metadata": {"name": name}})
    core.create_namespaced_config_map(name, {"metadata": {"name": "x"}})
    core.delete_namespace(name)

    def gone():
        try:
            core.read_namespace(name)
            return False
        except client.ApiException as e:
            return e.status == 404

    wait_for(gone, timeout=30, what="namespace deletion")


# --- tokens ----------------------------------------------------------------------------------------


def test_token_request_and_review(control_plane: ControlPlane, kube, namespace: str):
    core, authn = client.CoreV1Api(kube), client.AuthenticationV1Api(kube)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "proxy"}})
    tr = core.create_namespaced_service_account_token("proxy", namespace, {
        "spec": {"audiences": ["spendwarden"], "expirationSeconds": 600}})
    # kubectl (1.32) goes through the same TokenRequest API
    kubectl_token = control_plane.kubectl("create", "token", "proxy", "-n", namespace,
                                          "--audience", "spendwarden").stdout.strip()

    for token in (tr.status.token, kubectl_token):
        review = authn.create_token_review({"spec": {"token": token, "audiences": ["spendwarden"]}})
        assert review.status.authenticated is True, review.status.error
        assert review.status.user.username == f"system:serviceaccount:{namespace}:proxy"
        assert f"system:serviceaccounts:{namespace}" in review.status.user.groups
        assert review.status.audiences == ["spendwarden"]

    # A "spendwarden" token is not an apiserver token (--api-audiences is only the issuer).
    review = authn.create_token_review({"spec": {"token": tr.status.token}})
    assert not review.status.authenticated
    review = authn.create_token_review({"spec": {"token": tr.status.token + "x", "audiences": ["spendwarden"]}})
    assert not review.status.authenticated


# --- admission webhooks ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["Validating", "Mutating"])
def test_admission_webhooks_are_called(kube, namespace: str, kind: str):
    """A webhook nobody serves, failurePolicy Fail: the apiserver must call it and so refuse the object."""
    adm, core = client.AdmissionregistrationV1Api(kube), client.CoreV1Api(kube)
    name = f"unreachable-{namespace}"
    body = {"metadata": {"name": name}, "webhooks": [{
        "name": "unreachable.spendwarden.io",
        "clientConfig": {"url": "https://127.0.0.1:1/"},
        "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["configmaps"]}],
        "namespaceSelector": {"matchLabels": {"spendwarden.io/test-namespace": namespace}},
        "failurePolicy": "Fail", "sideEffects": "None", "admissionReviewVersions": ["v1"], "timeoutSeconds": 2}]}
    create = getattr(adm, f"create_{kind.lower()}_webhook_configuration")
    delete = getattr(adm, f"delete_{kind.lower()}_webhook_configuration")
    create(body)
    try:
        def refused():  # the webhook configuration reaches the apiserver's admission through an informer
            try:
                core.create_namespaced_config_map(namespace, {"metadata": {"generateName": "cm-"}})
                return None
            except client.ApiException as e:
                return e

        err = wait_for(refused, timeout=10, what="webhook to be called")
        assert "unreachable.spendwarden.io" in err.body and "failed calling webhook" in err.body
    finally:
        delete(name)


# --- lifecycle -------------------------------------------------------------------------------------


def _port_free(port: int) -> bool:
    """Bindable by a new server (servers set SO_REUSEADDR, so closed connections in TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_second_control_plane_starts_and_stop_frees_everything(control_plane: ControlPlane):
    if control_plane.existing:
        pytest.skip("uses local binaries")
    cp = ControlPlane(binaries=control_plane.binaries, use_existing=False)
    with cp:
        assert cp.server != control_plane.server
        assert cp.kubectl("get", "serviceaccount", "default", "-n", "default").returncode == 0
        procs = [p.popen for p in cp._procs]
        ports, dirs = dict(cp.ports), [cp.dir, cp.etcd_dir]
        assert all(not _port_free(p) for p in ports.values())
    assert all(p.poll() is not None for p in procs)
    assert all(_port_free(p) for p in ports.values()), ports
    assert not any(d.exists() for d in dirs)
    # the session's control plane is untouched
    assert control_plane.kubectl("get", "ns", "default").returncode == 0
    with pytest.raises(subprocess.CalledProcessError):
        cp.kubectl("get", "ns", "default", "--request-timeout=2s")


def test_stale_dirs_of_dead_owners_are_swept(tmp_path, monkeypatch):
    """Dirs left by a control plane whose Python process was SIGKILLed are removed at the next start."""
    import os
    import tempfile

    from spendwarden.localcluster import controlplane

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live, unowned = (tmp_path / f"spendwarden-cp-{n}" for n in ("stale", "live", "unowned"))
    for d in (stale, live, unowned):
        d.mkdir()
    (stale / controlplane._OWNER_FILE).write_text(str(dead.pid))
    (live / controlplane._OWNER_FILE).write_text(str(os.getpid()))
    controlplane._sweep_stale_dirs()
    assert not stale.exists() and live.exists() and unowned.exists()
