"""Admission webhooks served by the operator (off unless SPENDWARDEN_WEBHOOK_PORT is set, which
`spendwarden operator --webhooks` does): thin kopf handlers over render/review.py (TokenBudget and
ModelRoute validation) and render/injection.py (the proxy sidecar for Pods).

Registered only when enabled: kopf refuses to start with admission handlers but no server.

Pod selection: kopf's managed webhook configurations carry an objectSelector (from `labels=`) but
no namespaceSelector, and one selector could not express "namespace labelled OR pod labelled"
anyway. So the Pod webhook matches all Pods and the handler decides (render/injection.decide),
reading namespace labels from an in-memory map kept by a namespace watch (an API call only for a
namespace the watch has not delivered yet). The price is one webhook call per Pod creation cluster-wide, hence
failurePolicy Ignore by default for it (see webhooks.WebhookSettings).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from .. import GROUP
from ..api import modelroute, tokenbudget
from ..render import injection
from ..render.review import review
from . import inventory
from .bodies import plain
from .webhooks import CertStore, WebhookServer, WebhookSettings

log = logging.getLogger(__name__)
SETTINGS = WebhookSettings.from_env()
_tasks: dict[str, Any] = {}



async def configure_admission(settings: kopf.OperatorSettings, **_: Any) -> None:
    global NATIVE_SIDECAR
    if SETTINGS.in_cluster and not SETTINGS.namespace:
        raise kopf.PermanentError("SPENDWARDEN_WEBHOOK_SERVICE needs SPENDWARDEN_POD_NAMESPACE (the Secret's namespace)")
    store = CertStore(SETTINGS)
    await asyncio.to_thread(store.ensure)
    settings.admission.server = WebhookServer(
        addr=SETTINGS.addr, port=SETTINGS.port, host=SETTINGS.host,
        certfile=str(store.certfile), pkeyfile=str(store.certfile), cafile=str(store.cafile),
        service=SETTINGS.service_ref())
    settings.admission.managed = SETTINGS.configuration
    NATIVE_SIDECAR = await asyncio.to_thread(injection.use_native_sidecar, INJECTION.native_sidecar, _server_version)
    _tasks["store"] = store
    _tasks["rotation"] = asyncio.create_task(store.keep_fresh(), name="spendwarden-webhook-certs")
    log.info("admission webhooks enabled", extra={
        "port": SETTINGS.port, "configuration": SETTINGS.configuration,
        "client": "service" if SETTINGS.in_cluster else f"https://{SETTINGS.host}:{SETTINGS.port}",
        "pod_failure_policy": SETTINGS.pod_failure_policy,
        "proxy_shape": "native sidecar" if NATIVE_SIDECAR else "container",
        "native_sidecar_setting": INJECTION.native_sidecar,
        "validation_failure_policy": SETTINGS.validation_failure_policy})
    if SETTINGS.pod_failure_policy == "Fail":
        log.warning("pod injection webhook has failurePolicy Fail: while the operator is unreachable, "
                    "no Pod can be created in any namespace")


async def stop_admission(**_: Any) -> None:
    task = _tasks.pop("rotation", None)
    if task is not None:
        task.cancel()
    store = _tasks.pop("store", None)
    if store is not None:
        store.cleanup()


# Namespace name -> labels, kept by a plain event handler rather than a kopf.index: kopf holds every
# handler of every kind until each object of an indexed kind has been indexed, and each one indexed
# wakes all the waiting ones (quadratic: thousands of namespaces stalled the cold start).
_namespace_labels: dict[str, dict[str, str]] = {}


def remember_namespace_labels(event: Mapping[str, Any], name: str, labels: Mapping[str, str], **_: Any) -> None:
    if event.get("type") == "DELETED":
        _namespace_labels.pop(name, None)
    else:
        _namespace_labels[name] = dict(labels)


def _review(kind: str, body: kopf.Body, old: Any, namespace: str | None, warnings: list[str]) -> None:
    known = inventory.objects_by_namespace()
    routes, budgets = known.in_namespace(namespace) if known is not None and namespace else (None, None)
    result = review(kind, plain(body), plain(old) if old is not None else None,
                    [plain(s) for s in routes] if routes is not None else None,
                    [plain(b) for b in budgets] if budgets is not None else None)
    warnings.extend(result.warnings)
    if result.error:
        raise kopf.AdmissionError(result.error, code=422)


def validate_modelroute(body: kopf.Body, old: Any, namespace: str | None, warnings: list[str], **_: Any) -> None:
    _review(modelroute.KIND, body, old, namespace, warnings)


def validate_tokenbudget(body: kopf.Body, old: Any, namespace: str | None, warnings: list[str], **_: Any) -> None:
    _review(tokenbudget.KIND, body, old, namespace, warnings)


def _lookup_namespace_labels(name: str) -> dict[str, str] | None:
    """For a namespace the watch has not delivered yet; `list` with a field selector because the
    operator's RBAC grants list/watch on namespaces, not get."""
    from kubernetes import client

    from . import kube
    items = client.CoreV1Api(kube.api_client()).list_namespace(field_selector=f"metadata.name={name}").items
    return dict(items[0].metadata.labels or {}) if items else None


INJECTION = injection.InjectionSettings.from_env()
# Decided once at start (configure_admission): the proxy as a native sidecar, or as a plain container.
NATIVE_SIDECAR = False


def _server_version() -> tuple[int, int] | None:
    """The apiserver's (major, minor) from GET /version (readable by every client); None, with a
    warning, when it cannot be read: injection then keeps the plain container."""
    from kubernetes import client

    from . import kube
    try:
        info = client.VersionApi(kube.api_client()).get_code()
        version = injection.parse_server_version(info.major, info.minor, info.git_version)
    except Exception as exc:  # noqa: BLE001 - the plain container works on every cluster
        log.warning("cannot read the apiserver version (%s): injecting the proxy as a plain container; "
                    "set sidecar.native (SPENDWARDEN_NATIVE_SIDECAR) to choose", exc)
        return None
    if version is None:
        log.warning("unrecognised apiserver version %r.%r (%s): injecting the proxy as a plain container; "
                    "set sidecar.native (SPENDWARDEN_NATIVE_SIDECAR) to choose", info.major, info.minor, info.git_version)
    return version


def namespace_secrets(namespace: str, known: inventory.Inventory | None) -> list[str]:
    """The Secrets the namespace's served routes reference, from the operator's inventory
    (rendered exactly as the ConfigMap is, so invalid routes do not add mounts)."""
    from ..render.proxyconfig import render_proxy_config
    routes = [plain(r) for r in known.in_namespace(namespace)[0]] if known is not None else []
    return injection.referenced_secrets(render_proxy_config(namespace, routes, []).config) if routes else []


def inject_proxy(body: kopf.Body, patch: kopf.Patch, namespace: str | None, **_: Any) -> None:
    pod = plain(body)
    ns = namespace or ""
    labels = _namespace_labels.get(ns)
    decision = injection.decide(pod, ns, labels, INJECTION)
    if not decision.inject and labels is None and decision.reason == "not selected":
        labels = _lookup_namespace_labels(ns)
        decision = injection.decide(pod, ns, labels, INJECTION)
    meta = pod.get("metadata") or {}
    who = f"{ns}/{meta.get('name') or meta.get('generateName', '') + '*'}"
    if not decision.inject:
        log.debug("pod %s: no proxy (%s)", who, decision.reason)
        return
    secrets = namespace_secrets(ns, inventory.objects_by_namespace())
    ops = injection.patch(pod, ns, INJECTION, secrets, native=NATIVE_SIDECAR)
    # kopf builds the JSON Patch it returns by diffing the body before/after these functions.
    patch.fns.append(lambda raw: _apply(raw, ops))
    log.info("pod %s: proxy injected as a %s (%s; secrets mounted: %s)", who,
             "native sidecar" if NATIVE_SIDECAR else "container", decision.reason, ", ".join(secrets) or "none")


def _apply(raw: Any, ops: list[dict[str, Any]]) -> None:
    import jsonpatch
    jsonpatch.JsonPatch(ops).apply(raw, in_place=True)


if SETTINGS.enabled:
    kopf.on.startup(id="spendwarden-admission")(configure_admission)
    kopf.on.cleanup(id="spendwarden-admission")(stop_admission)
    kopf.on.event("v1", "namespaces", id="namespace-labels")(remember_namespace_labels)
    _validation = dict(operations=["CREATE", "UPDATE"],
                       ignore_failures=SETTINGS.validation_failure_policy == "Ignore")
    kopf.on.validate(GROUP, modelroute.PLURAL, id="validate-modelroute", **_validation)(validate_modelroute)
    kopf.on.validate(GROUP, tokenbudget.PLURAL, id="validate-tokenbudget", **_validation)(validate_tokenbudget)
    kopf.on.mutate("v1", "pods", id="inject-proxy", operations=["CREATE"],
                   ignore_failures=SETTINGS.pod_failure_policy == "Ignore")(inject_proxy)
