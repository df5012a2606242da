"""The operator's Kubernetes I/O, over the official client: one shared ApiClient, typed API getters,
get-or-none reads, and Events. Every module of controller/ goes through here (blocking calls: run
them in threads)."""
from __future__ import annotations

import functools
import json
import logging
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import urllib3
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from .. import GROUP, VERSION
from ..api import tokenbudget

log = logging.getLogger(__name__)
T = TypeVar("T")

# (connect, read) seconds for every call that names no timeout of its own. The client's default is
# none at all: one connection the apiserver never answers would hold a reconcile thread for good.
REQUEST_TIMEOUT = (10.0, 60.0)


class _ApiClient(client.ApiClient):
    def call_api(self, method, url, header_params=None, body=None, post_params=None, _request_timeout=None):
        return super().call_api(method, url, header_params, body, post_params, _request_timeout or REQUEST_TIMEOUT)


@functools.cache
def api_client() -> client.ApiClient:
    """The process's one connection pool to the apiserver, made on first use (a lazily loaded
    kubeconfig, not state of the operator). Test hook: every getter here calls it by name, so
    `monkeypatch.setattr(kube, "api_client", lambda: their_client)` points them at another apiserver."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    # kopf's handler threads, the ledger's and cutoff's threads share it; the default (5 per CPU)
    # made urllib3 discard and reopen TLS connections under load.
    configuration.connection_pool_maxsize = 32
    return _ApiClient(configuration)


def separate_client() -> client.ApiClient:
    """An ApiClient with a connection pool of its own, configured as the shared one."""
    api_client()  # loads the configuration
    return client.ApiClient()


def core() -> client.CoreV1Api:
    return client.CoreV1Api(api_client())


def custom() -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client())


def apps() -> client.AppsV1Api:
    return client.AppsV1Api(api_client())


def networking() -> client.NetworkingV1Api:
    return client.NetworkingV1Api(api_client())


def autoscaling_v1() -> client.AutoscalingV1Api:
    return client.AutoscalingV1Api(api_client())


def authentication() -> client.AuthenticationV1Api:
    return client.AuthenticationV1Api(api_client())


def version() -> client.VersionApi:
    return client.VersionApi(api_client())


def scale_api(kind: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(read, patch) of a Deployment's or StatefulSet's scale subresource: the cut-off and the scaler
    change replica counts only through these."""
    api = apps()
    if kind == "StatefulSet":
        return api.read_namespaced_stateful_set_scale, api.patch_namespaced_stateful_set_scale
    return api.read_namespaced_deployment_scale, api.patch_namespaced_deployment_scale


def not_found(exc: BaseException) -> bool:
    return getattr(exc, "status", None) == 404


def or_none(read: Callable[[], T]) -> T | None:
    """`read()`, or None where the object does not exist (404); other errors propagate."""
    try:
        return read()
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def get_custom(plural: str, namespace: str, name: str) -> dict[str, Any] | None:
    """One of our custom objects, None if it does not exist."""
    # The stubs type custom objects as `object`: the client returns the decoded JSON, a dict.
    return or_none(lambda: cast(dict[str, Any], custom().get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)))


def list_custom(plural: str, namespace: str) -> list[dict[str, Any]]:
    listed = cast(dict[str, Any], custom().list_namespaced_custom_object(GROUP, VERSION, namespace, plural))  # as above
    return listed["items"]


def read_json(response: Any) -> Any:
    """The body of a `_preload_content=False` call: skips the client's slow model deserialisation."""
    return json.loads(response.data)


def drain(response: Any) -> None:
    """Read the body of a `_preload_content=False` call we need nothing from: frees the connection."""
    _ = response.data


def patch_status(plural: str, namespace: str, name: str, status: dict[str, Any]) -> None:
    try:
        drain(custom().patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, plural, name, {"status": status}, _preload_content=False))
    except ApiException as exc:
        if exc.status != 404:  # deleted meanwhile: nothing to report on
            raise


def apply_configmap(manifest: dict[str, Any], attempts: int = 5) -> str:
    """Create or replace the ConfigMap; returns 'created', 'updated' or 'unchanged'.

    Conflicts are expected, not exceptional: when one of several owners is deleted,
    kube-controller-manager's garbage collector removes its ownerReference from the ConfigMap at
    the same moment we re-render it. Re-read and retry.
    """
    api = core()
    meta = manifest["metadata"]
    for attempt in range(attempts):
        try:
            current = read_json(api.read_namespaced_config_map(meta["name"], meta["namespace"], _preload_content=False))
        except ApiException as exc:
            if exc.status != 404:
                raise
            try:
                # The client serialises a plain dict as well as a V1ConfigMap; the stubs accept only the model.
                drain(api.create_namespaced_config_map(meta["namespace"], manifest, _preload_content=False))  # type: ignore[arg-type]
                return "created"
            except ApiException as create_exc:
                if create_exc.status != 409 or attempt == attempts - 1:  # created meanwhile: replace it
                    raise
                continue
        owners_now = sorted(o["uid"] for o in current["metadata"].get("ownerReferences") or [])
        owners_want = sorted(o["uid"] for o in meta["ownerReferences"])
        if current.get("data") == manifest["data"] and owners_now == owners_want:
            return "unchanged"
        body = {**manifest, "metadata": {**meta, "resourceVersion": current["metadata"]["resourceVersion"]}}
        try:
            drain(api.replace_namespaced_config_map(meta["name"], meta["namespace"], body,  # type: ignore[arg-type]  # a dict, as above
                                                    _preload_content=False))
            return "updated"
        except ApiException as exc:
            if exc.status != 409 or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def delete_configmap(namespace: str, name: str) -> None:
    try:
        core().delete_namespaced_config_map(name, namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise


EVENT_ATTEMPTS = 3  # an Event is often the only place a cut-off or a conflict is told: a blip must not lose it


def involved_object(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj["metadata"]
    return {"apiVersion": obj.get("apiVersion", f"{GROUP}/{VERSION}"), "kind": obj["kind"], "name": meta["name"],
            "namespace": meta["namespace"], **({"uid": meta["uid"]} if meta.get("uid") else {})}


def post_warning(involved: dict[str, Any], reason: str, message: str, component: str = "operator",
                 attempts: int = EVENT_ATTEMPTS, backoff: float = 0.5) -> None:
    """A Warning Event on `involved` (involved_object()), posted directly: kopf.warn only works inside
    kopf's handler context. Transient failures (429, 5xx, no connection) are retried with backoff;
    the last one is raised. Blocking: call it from a thread."""
    # A cluster-scoped object's (a Namespace's) Events live in "default", as the apiserver requires.
    ns, now = involved.get("namespace") or "default", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {"metadata": {"generateName": f"{involved['name']}.", "namespace": ns}, "involvedObject": involved,
            "reason": reason, "message": message[:1024], "type": "Warning",
            "source": {"component": f"spendwarden-{component}"}, "reportingComponent": f"spendwarden.io/{component}",
            "reportingInstance": socket.gethostname(), "firstTimestamp": now, "lastTimestamp": now, "count": 1}
    for attempt in range(1, attempts + 1):
        try:
            # A plain dict: the client serialises it; the stubs accept only the model.
            drain(core().create_namespaced_event(ns, body, _preload_content=False))  # type: ignore[arg-type]
            return
        except ApiException as exc:
            if attempt == attempts or not (exc.status in (0, 429) or exc.status >= 500):
                raise
        except (OSError, urllib3.exceptions.HTTPError):
            if attempt == attempts:
                raise
        time.sleep(backoff * 2 ** (attempt - 1))


def post_budget_event(namespace: str, name: str, uid: str | None, reason: str, message: str,
                      component: str = "cut-off") -> None:
    """A Warning Event on a TokenBudget (the cut-off's and the ledger's announcements)."""
    post_warning({"apiVersion": f"{GROUP}/{VERSION}", "kind": tokenbudget.KIND, "name": name, "namespace": namespace,
                  **({"uid": uid} if uid else {})}, reason, message, component=component)
