"""The few Kubernetes API calls the operator makes, over the official client."""
from __future__ import annotations

import logging
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from .. import GROUP, VERSION

log = logging.getLogger(__name__)
_api: client.ApiClient | None = None


def api_client() -> client.ApiClient:
    global _api
    if _api is None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        _api = client.ApiClient()
    return _api


def patch_status(plural: str, namespace: str, name: str, status: dict[str, Any]) -> None:
    try:
        client.CustomObjectsApi(api_client()).patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, plural, name, {"status": status})
    except ApiException as exc:
        if exc.status != 404:  # deleted meanwhile: nothing to report on
            raise


def apply_configmap(manifest: dict[str, Any], attempts: int = 5) -> str:
    """Create or replace the ConfigMap; returns 'created', 'updated' or 'unchanged'.

    Conflicts are expected, not exceptional: when one of several owners is deleted,
    kube-controller-manager's garbage collector removes its ownerReference from the ConfigMap at
    the same moment we re-render it. Re-read and retry.
    """
    core = client.CoreV1Api(api_client())
    meta = manifest["metadata"]
    for attempt in range(attempts):
        try:
            current = core.read_namespaced_config_map(meta["name"], meta["namespace"])
        except ApiException as exc:
            if exc.status != 404:
                raise
            try:
                core.create_namespaced_config_map(meta["namespace"], manifest)
                return "created"
            except ApiException as create_exc:
                if create_exc.status != 409 or attempt == attempts - 1:  # created meanwhile: replace it
                    raise
                continue
        owners_now = sorted((o.uid for o in current.metadata.owner_references or []))
        owners_want = sorted(o["uid"] for o in meta["ownerReferences"])
        if current.data == manifest["data"] and owners_now == owners_want:
            return "unchanged"
        body = {**manifest, "metadata": {**meta, "resourceVersion": current.metadata.resource_version}}
        try:
            core.replace_namespaced_config_map(meta["name"], meta["namespace"], body)
            return "updated"
        except ApiException as exc:
            if exc.status != 409 or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def delete_configmap(namespace: str, name: str) -> None:
    try:
        client.CoreV1Api(api_client()).delete_namespaced_config_map(name, namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise
