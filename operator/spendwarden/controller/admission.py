"""Admission webhooks served by the operator (off unless SPENDWARDEN_WEBHOOK_PORT is set, which
`spendwarden operator --webhooks` does): thin kopf handlers over render/review.py (TokenBudget and
ModelRoute validation) and render/injection.py (the proxy sidecar for Pods).

Registered only when enabled (controller/handlers.py register_admission): kopf refuses to start
with admission handlers but no server.

Pod selection: kopf's managed webhook configurations carry an objectSelector (from `labels=`) but
no namespaceSelector, and one selector could not express "namespace labelled OR pod labelled"
anyway. So the Pod webhook matches all Pods and the handler decides (render/injection.decide),
reading namespace labels from an in-memory map kept by a namespace watch (an API call only for a
namespace the watch has not delivered yet). The price is one webhook call per Pod creation cluster-wide, hence
failurePolicy Ignore by default for it (see webhooks.WebhookSettings).

Gateway mode: the namespace's mode (render/gateway.namespace_mode) decides the patch's shape, the
sidecar's or injection.gateway_patch (base URLs at the gateway, a projected token); the inject
labels decide, as always, whether a Pod is touched at all.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from ..api import modelroute, tokenbudget
from ..render import injection
from ..render.gateway import MODE_GATEWAY, GatewaySettings, namespace_mode
from ..render.review import review
from . import kube
from .bodies import plain
from .inventory import Inventory
from .webhooks import CertStore, WebhookServer, WebhookSettings

log = logging.getLogger(__name__)


def _lookup_namespace_labels(name: str) -> dict[str, str] | None:
    """For a namespace the watch has not delivered yet; `list` with a field selector because the
    operator's RBAC grants list/watch on namespaces, not get."""
    items = kube.core().list_namespace(field_selector=f"metadata.name={name}").items
    meta = items[0].metadata if items else None
    return dict(meta.labels or {}) if meta is not None else None  # listed objects carry metadata


def _server_version() -> tuple[int, int] | None:
    """The apiserver's (major, minor) from GET /version (readable by every client); None, with a
    warning, when it cannot be read: injection then keeps the plain container."""
    try:
        info = kube.version().get_code()
        version = injection.parse_server_version(info.major, info.minor, info.git_version)
    except Exception as exc:  # noqa: BLE001 - the plain container works on every cluster
        log.warning("cannot read the apiserver version (%s): injecting the proxy as a plain container; "
                    "set sidecar.native (SPENDWARDEN_NATIVE_SIDECAR) to choose", exc)
        return None
    if version is None:
        log.warning("unrecognised apiserver version %r.%r (%s): injecting the proxy as a plain container; "
                    "set sidecar.native (SPENDWARDEN_NATIVE_SIDECAR) to choose", info.major, info.minor, info.git_version)
    return version


def namespace_secrets(namespace: str, known: Inventory | None) -> list[str]:
    """The Secrets the namespace's served routes reference, from the operator's inventory
    (rendered exactly as the ConfigMap is, so invalid routes do not add mounts)."""
    from ..render.proxyconfig import render_proxy_config
    routes = [plain(r) for r in known.in_namespace(namespace)[0]] if known is not None else []
    return injection.referenced_secrets(render_proxy_config(namespace, routes, []).config) if routes else []


def _apply(raw: Any, ops: list[dict[str, Any]]) -> None:
    import jsonpatch
    jsonpatch.JsonPatch(ops).apply(raw, in_place=True)


class AdmissionWebhooks:
    """The webhooks' handlers and what they keep: namespace labels, the sidecar's shape, the TLS
    material and its rotation."""

    def __init__(self, settings: WebhookSettings, injection_settings: injection.InjectionSettings,
                 inventory: Inventory, gateway_settings: GatewaySettings | None = None):
        self.settings = settings
        self.injection = injection_settings
        self.gateway = gateway_settings or GatewaySettings()
        self._noted: set[str] = set()  # namespaces whose mode label was logged as not followed
        self.inventory = inventory
        # Namespace name -> labels, kept by a plain event handler rather than a kopf.index: kopf holds every
        # handler of every kind until each object of an indexed kind has been indexed, and each one indexed
        # wakes all the waiting ones (quadratic: thousands of namespaces stalled the cold start).
        self.namespace_labels: dict[str, dict[str, str]] = {}
        self.native_sidecar = False  # decided once at start (configure): a native sidecar, or a plain container
        self._store: CertStore | None = None
        self._rotation: asyncio.Task | None = None

    async def configure(self, settings: kopf.OperatorSettings, **_: Any) -> None:
        config = self.settings
        if config.in_cluster and not config.namespace:
            raise kopf.PermanentError("SPENDWARDEN_WEBHOOK_SERVICE needs SPENDWARDEN_POD_NAMESPACE (the Secret's namespace)")
        store = CertStore(config)
        await asyncio.to_thread(store.ensure)
        settings.admission.server = WebhookServer(
            addr=config.addr, port=config.port, host=config.host,
            certfile=str(store.certfile), pkeyfile=str(store.certfile), cafile=str(store.cafile),
            service=config.service_ref())
        settings.admission.managed = config.configuration
        self.native_sidecar = await asyncio.to_thread(injection.use_native_sidecar, self.injection.native_sidecar,
                                                      _server_version)
        self._store = store
        self._rotation = asyncio.create_task(store.keep_fresh(), name="spendwarden-webhook-certs")
        log.info("admission webhooks enabled", extra={
            "port": config.port, "configuration": config.configuration,
            "client": "service" if config.in_cluster else f"https://{config.host}:{config.port}",
            "pod_failure_policy": config.pod_failure_policy,
            "proxy_shape": "native sidecar" if self.native_sidecar else "container",
            "native_sidecar_setting": self.injection.native_sidecar,
            "validation_failure_policy": config.validation_failure_policy})
        if config.pod_failure_policy == "Fail":
            log.warning("pod injection webhook has failurePolicy Fail: while the operator is unreachable, "
                        "no Pod can be created in any namespace")

    async def stop(self, **_: Any) -> None:
        task, self._rotation = self._rotation, None
        if task is not None:
            task.cancel()
        store, self._store = self._store, None
        if store is not None:
            store.cleanup()

    def remember_namespace_labels(self, event: Mapping[str, Any], name: str, labels: Mapping[str, str], **_: Any) -> None:
        if event.get("type") == "DELETED":
            self.namespace_labels.pop(name, None)
        else:
            self.namespace_labels[name] = dict(labels)

    def _review(self, kind: str, body: kopf.Body, old: Any, namespace: str | None, warnings: list[str]) -> None:
        known = self.inventory.if_complete()
        routes, budgets = known.in_namespace(namespace) if known is not None and namespace else (None, None)
        result = review(kind, plain(body), plain(old) if old is not None else None,
                        [plain(s) for s in routes] if routes is not None else None,
                        [plain(b) for b in budgets] if budgets is not None else None)
        warnings.extend(result.warnings)
        if result.error:
            raise kopf.AdmissionError(result.error, code=422)

    def validate_modelroute(self, body: kopf.Body, *, old: Any = None, namespace: str | None, warnings: list[str], **_: Any) -> None:
        self._review(modelroute.KIND, body, old, namespace, warnings)

    def validate_tokenbudget(self, body: kopf.Body, *, old: Any = None, namespace: str | None, warnings: list[str], **_: Any) -> None:
        self._review(tokenbudget.KIND, body, old, namespace, warnings)

    def _decide(self, pod: dict[str, Any], ns: str, labels: dict[str, str] | None) -> tuple[bool, injection.Decision]:
        """(whether the namespace is in gateway mode, whether the pod is touched)."""
        mode = namespace_mode(ns, labels, self.gateway)
        if mode.note and ns not in self._noted:
            self._noted.add(ns)
            log.warning("namespace %s: %s", ns, mode.note)
        gateway = mode.mode == MODE_GATEWAY
        return gateway, injection.decide(pod, ns, labels, self.injection, gateway=gateway)

    def inject_proxy(self, body: kopf.Body, patch: kopf.Patch, namespace: str | None, **_: Any) -> None:
        pod = plain(body)
        ns = namespace or ""
        labels = self.namespace_labels.get(ns)
        if labels is None and self.gateway.enabled:  # the mode decides the shape, whatever selects the pod
            labels = _lookup_namespace_labels(ns)
        gateway, decision = self._decide(pod, ns, labels)
        if not decision.inject and labels is None and decision.reason == "not selected":
            labels = _lookup_namespace_labels(ns)
            gateway, decision = self._decide(pod, ns, labels)
        meta = pod.get("metadata") or {}
        who = f"{ns}/{meta.get('name') or meta.get('generateName', '') + '*'}"
        if not decision.inject:
            log.debug("pod %s: no proxy (%s)", who, decision.reason)
            return
        if gateway:
            gateway_ops = injection.gateway_patch(pod, self.injection, self.gateway.base_url())
            patch.fns.append(lambda raw: _apply(raw, gateway_ops))
            log.info("pod %s: pointed at the gateway %s (%s)", who, self.gateway.base_url(), decision.reason)
            return
        secrets = namespace_secrets(ns, self.inventory.if_complete())
        native = self.native_sidecar
        ops = injection.patch(pod, ns, self.injection, secrets, native=native)
        # kopf builds the JSON Patch it returns by diffing the body before/after these functions.
        patch.fns.append(lambda raw: _apply(raw, ops))
        log.info("pod %s: proxy injected as a %s (%s; secrets mounted: %s)", who,
                 "native sidecar" if native else "container", decision.reason, ", ".join(secrets) or "none")
