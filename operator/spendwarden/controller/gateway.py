"""Gateway mode's control plane (issue #13): keeps what the shared gateway pool reads, and the
tenant namespaces' egress, in step with the CRs, the namespaces' labels and the gateway
namespace's Secrets. render/gateway.py decides; this module only sequences the I/O.

Level-triggered, one sync at a time (`notify()` from the namespace watch and after each namespace
render; a resync every `resync` seconds, since Secrets are not watched):
  - ConfigMap spendwarden-gateway-config in the gateway namespace: `<tenant>.json` per gateway-mode
    namespace, the same JSON as that namespace's spendwarden-proxy ConfigMap. During the first
    STARTUP_GRACE seconds written only once every gateway-mode namespace of the inventory has been
    rendered (a restarted operator drops no tenant it has not rendered yet), and never above MAX_CONFIGMAP_BYTES
    (the last good one stays; an error and an Event name the tenants that do not fit);
  - Secret spendwarden-gateway-credentials there: the keys the tenants' routes name, from Secrets
    of the gateway namespace that share themselves with the tenant (annotation spendwarden.io/tenants);
    a route whose credentials cannot be given gets CredentialsReady=False and a Warning Event;
  - NetworkPolicy spendwarden-gateway-egress in every gateway-mode namespace (not while it carries
    spendwarden.io/gateway-egress=open), deleted when the namespace leaves gateway mode. While the
    namespace is cut off it also excludes the inference namespaces the cut-off denies (policies add
    up: allowing every namespace would undo the cut-off's denial), read from the cut-off's policy.
Writes are server-side applies made only when the live object differs; what was applied is
remembered between resyncs, and forgotten at each full resync so hand edits are repaired.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from ..api import modelroute
from ..api.proxyconfig import ProxyConfig
from ..render import gateway as gw
from ..render.cutoff import NAMESPACE_LABEL as CUT_OFF_LABEL
from ..render.cutoff import POLICY_NAME as CUT_OFF_POLICY
from ..render.cutoff import denied_namespaces
from ..render.proxyconfig import config_json
from . import kube
from .cutoff import FIELD_MANAGER, apply_policy, resolve
from .inventory import Inventory

log = logging.getLogger(__name__)

# Seconds after start during which the gateway's ConfigMap and Secret wait for every tenant's labels
# and first render (so a restart drops nobody); after that a namespace whose reconcile keeps failing
# must not hold up everyone else's changes (it is logged, and left out until it renders).
STARTUP_GRACE = 60.0


def _apply(manifest: dict[str, Any], read: Callable[[], Any], patch: Callable[..., Any]) -> bool:
    """Server-side apply of a ConfigMap or Secret unless its live data is already the manifest's."""
    found = kube.or_none(read)
    if found is not None and (kube.read_json(found).get("data") or {}) == manifest["data"]:
        return False
    meta = manifest["metadata"]
    kube.drain(patch(meta["name"], meta["namespace"], manifest, field_manager=FIELD_MANAGER, force=True,
                     _content_type="application/apply-patch+yaml", _preload_content=False))
    return True


def apply_configmap(manifest: dict[str, Any]) -> bool:
    api, meta = kube.core(), manifest["metadata"]
    return _apply(manifest, lambda: api.read_namespaced_config_map(meta["name"], meta["namespace"], _preload_content=False),
                  api.patch_namespaced_config_map)


def apply_secret(manifest: dict[str, Any]) -> bool:
    api, meta = kube.core(), manifest["metadata"]
    return _apply(manifest, lambda: api.read_namespaced_secret(meta["name"], meta["namespace"], _preload_content=False),
                  api.patch_namespaced_secret)


def list_secrets(namespace: str) -> dict[str, gw.GatewaySecret]:
    items = kube.read_json(kube.core().list_namespaced_secret(namespace, _preload_content=False))["items"]
    return {s["metadata"]["name"]: gw.GatewaySecret.from_object(s) for s in items
            if s["metadata"]["name"] != gw.CREDENTIALS_SECRET}


def policy_namespaces() -> set[str]:
    """Namespaces holding our egress policy (a field-selected list: RBAC limits it to that name)."""
    items = kube.read_json(kube.networking().list_network_policy_for_all_namespaces(
        field_selector=f"metadata.name={gw.EGRESS_POLICY_NAME}", _preload_content=False))["items"]
    return {p["metadata"]["namespace"] for p in items}


def read_cut_off_policy(namespace: str) -> dict[str, Any] | None:
    net = kube.networking()
    found = kube.or_none(lambda: net.read_namespaced_network_policy(CUT_OFF_POLICY, namespace, _preload_content=False))
    return kube.read_json(found) if found is not None else None


def delete_policy(namespace: str) -> None:
    kube.or_none(lambda: kube.networking().delete_namespaced_network_policy(gw.EGRESS_POLICY_NAME, namespace))


def _warn(involved: dict[str, Any], reason: str, message: str) -> None:
    try:
        kube.post_warning(involved, reason, message, component="gateway")
    except Exception as exc:  # noqa: BLE001 - the log and the condition say it too
        log.warning("gateway Event not posted: %s", type(exc).__name__)



def apiserver_destinations() -> tuple[tuple[str, int], ...]:
    """(CIDR, port) of the apiserver as tenant pods reach it: the address and port pods are given
    (KUBERNETES_SERVICE_HOST/PORT, or the kubeconfig's server) and, since policies are enforced
    after the Service's address translation, the endpoints of Service default/kubernetes."""
    out: set[tuple[str, int]] = set()
    url = urlsplit(kube.api_client().configuration.host)
    targets = [(os.environ.get("KUBERNETES_SERVICE_HOST") or "", int(os.environ.get("KUBERNETES_SERVICE_PORT") or 443)),
               (url.hostname or "", url.port or 443)]
    for host, port in targets:
        if host:
            try:
                out |= {(f"{a}/{32 if ':' not in a else 128}", port) for a in resolve(host)}
            except OSError:
                pass
    endpoints = kube.or_none(lambda: kube.core().read_namespaced_endpoints("kubernetes", "default"))
    for subset in (endpoints.subsets or []) if endpoints is not None else []:
        for address in subset.addresses or []:
            for p in subset.ports or []:
                ip = address.ip
                out.add((f"{ip}/{32 if ':' not in ip else 128}", int(p.port)))
    return tuple(sorted(out))

class GatewayController:
    """`serves(ns)`: the operator's --namespace patterns; `excluded`: namespaces never tenants (the
    operator's own)."""

    def __init__(self, settings: gw.GatewaySettings, inventory: Inventory, serves: Callable[[str], bool],
                 excluded: frozenset[str] = frozenset(), resync: float = 10.0, full_resync: float = 60.0):
        assert settings.namespace, "GatewayController needs the gateway namespace"
        self.settings = settings
        self.namespace: str = settings.namespace
        self.inventory = inventory
        self.serves = serves
        self.excluded = excluded | {self.namespace}
        self.resync, self.full_resync = resync, full_resync
        self.max_config_bytes = gw.MAX_CONFIGMAP_BYTES
        self.labels: dict[str, dict[str, str]] = {}          # namespace -> labels (the namespace watch)
        self._lock = threading.Lock()
        self.configs: dict[str, ProxyConfig | None] = {}      # namespace -> last render (None: no CRs)
        self.apiserver: tuple[tuple[str, int], ...] = ()
        self._applied: dict[str, Any] = {}                    # what this process last wrote, by object
        self._said: dict[str, str] = {}                       # what was last logged/posted, by subject
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._started = 0.0

    # -- inputs

    def labels_of(self, namespace: str) -> Mapping[str, str] | None:
        return self.labels.get(namespace)

    def mode(self, namespace: str) -> str:
        return gw.namespace_mode(namespace, self.labels.get(namespace), self.settings).mode

    def observe_namespace(self, event: Mapping[str, Any], name: str, labels: Mapping[str, str], **_: Any) -> None:
        """kopf's namespace event handler."""
        before = self.labels.get(name)
        if event.get("type") == "DELETED":
            self.labels.pop(name, None)
        else:
            self.labels[name] = dict(labels)
        if self.labels.get(name) != before:
            self.notify()

    def rendered(self, namespace: str, config: ProxyConfig | None) -> None:
        """From a reconcile thread: the namespace's newest rendered configuration (None: it has no CRs)."""
        with self._lock:
            changed = namespace not in self.configs or self.configs[namespace] != config
            self.configs[namespace] = config
        if changed:
            self.notify()

    def notify(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            loop.call_soon_threadsafe(wake.set)

    # -- lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._started = self._loop.time()
        try:
            self.apiserver = await asyncio.to_thread(apiserver_destinations)
        except Exception as exc:  # noqa: BLE001 - the policy then allows no apiserver address but in-cluster pods
            log.warning("cannot resolve the apiserver's addresses for the gateway egress policy: %s", type(exc).__name__)
        self._task = asyncio.create_task(self._run_forever(), name="spendwarden-gateway")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task], timeout=5)

    async def _run_forever(self) -> None:
        assert self._wake is not None and self._loop is not None
        last_full = self._loop.time()
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.resync)
            except TimeoutError:
                pass
            self._wake.clear()
            await asyncio.sleep(0.2)  # a burst of events costs one sync
            self._wake.clear()
            if self._loop.time() - last_full >= self.full_resync:
                last_full = self._loop.time()
                self._applied.clear()
            try:
                await asyncio.to_thread(self.sync, self._loop.time() - self._started >= STARTUP_GRACE)
            except Exception:  # never let the loop die: the next resync tries again
                log.exception("gateway sync failed")

    # -- the sync (blocking: in a thread)

    def tenants(self, late: bool = True) -> dict[str, ProxyConfig] | None:
        """The gateway-mode namespaces' configurations; None while the inventory is incomplete or, unless
        `late`, one of them waits for its first render."""
        with self._lock:
            configs = dict(self.configs)
        if not self.inventory.complete():
            return None
        waiting = sorted(ns for ns in self.inventory.namespaces() if ns not in configs and self._tenant(ns))
        if waiting:
            if not late:
                return None
            if self._once("waiting", ",".join(waiting)):
                log.warning("gateway-mode namespaces not rendered yet are left out of the gateway's configuration",
                            extra={"namespaces": waiting[:20], "count": len(waiting)})
        return {ns: c for ns, c in sorted(configs.items()) if c is not None and self._tenant(ns)}

    def _tenant(self, namespace: str) -> bool:
        return namespace not in self.excluded and self.serves(namespace) and self.mode(namespace) == gw.MODE_GATEWAY

    def sync(self, late: bool = True) -> None:
        """`late`: past the start-up grace, write even though the namespace watch has not delivered every
        namespace's labels or a tenant has not been rendered yet."""
        unlabelled = [ns for ns in self.inventory.namespaces() if ns not in self.labels]
        if unlabelled and not late:
            return
        tenants = self.tenants(late)
        if tenants is not None:
            self._sync_config(tenants)
            self._sync_credentials(tenants)
        self._sync_policies()

    def _once(self, subject: str, said: str) -> bool:
        """True the first time `said` is to be told about `subject` (not again until it changes)."""
        if self._said.get(subject) == said:
            return False
        self._said[subject] = said
        return True

    def _sync_config(self, tenants: dict[str, ProxyConfig]) -> None:
        data = gw.gateway_config_data({ns: config_json(c) for ns, c in tenants.items()}, self.max_config_bytes)
        involved = {"apiVersion": "v1", "kind": "ConfigMap", "name": gw.CONFIGMAP_NAME, "namespace": self.namespace}
        if not data.fits:
            message = (f"ConfigMap {gw.CONFIGMAP_NAME} would exceed {self.max_config_bytes} bytes: namespaces "
                       f"{', '.join(data.left_out)} do not fit; the last complete configuration stays in force")
            if self._once("configmap-size", message):
                log.error(message, extra={"namespaces": list(data.left_out)})
                _warn(involved, "GatewayConfigTooLarge", message)
            return
        self._said.pop("configmap-size", None)
        if self._applied.get("configmap") == data.data:
            return
        if apply_configmap(gw.configmap_manifest(self.namespace, data.data)):
            log.info("gateway configuration written", extra={"tenants": len(data.data)})
        self._applied["configmap"] = data.data

    def _sync_credentials(self, tenants: dict[str, ProxyConfig]) -> None:
        selection = gw.select_credentials(tenants, list_secrets(self.namespace), self.namespace)
        if self._applied.get("credentials") != selection.data:
            if apply_secret(gw.credentials_manifest(self.namespace, selection.data)):
                log.info("gateway credentials written", extra={"keys": len(selection.data)})  # names, never values
            self._applied["credentials"] = selection.data
        now = datetime.now(UTC)
        for ns in self.inventory.namespaces():
            for route in self.inventory.in_namespace(ns)[0]:
                self._route_condition(route, (ns, route["metadata"]["name"]), selection, ns in tenants, now)

    def _route_condition(self, route: dict[str, Any], key: tuple[str, str], selection: gw.CredentialSelection,
                         tenant: bool, now: datetime) -> None:
        status = route.get("status") or {}
        subject = f"route/{key[0]}/{key[1]}"
        if tenant and key in selection.routes:
            problems = selection.problems.get(key)
            conditions = gw.credentials_condition(status, problems, route["metadata"].get("generation"), now)
            if problems:
                message = "; ".join(p.message for p in problems)
                if self._once(subject, message):
                    log.warning("gateway credentials missing", extra={"namespace": key[0], "route": key[1],
                                                                     "reason": problems[0].reason})
                    _warn(kube.involved_object(route), problems[0].reason, message)
            else:
                self._said.pop(subject, None)
        else:
            removed = gw.without_credentials_condition(status)
            if removed is None:
                return
            conditions = removed
        if _condition_changed(status.get("conditions") or [], conditions):
            kube.patch_status(modelroute.PLURAL, key[0], key[1], {"conditions": conditions})

    def _sync_policies(self) -> None:
        labels_now = dict(self.labels)  # a copy: kopf's namespace handler changes it from another thread
        want = {ns for ns, labels in labels_now.items() if self._tenant(ns) and not gw.egress_open(labels)}
        applied: dict[str, Any] | None = self._applied.get("policies")  # namespace -> manifest last applied
        present = set(applied) if applied is not None else policy_namespaces()
        done: dict[str, Any] = {}
        for ns in sorted(want):
            manifest = gw.egress_policy(ns, self.apiserver, self.settings.egress_cidrs, self._cut_namespaces(ns))
            if (applied or {}).get(ns) != manifest and apply_policy(manifest):
                log.info("gateway egress policy applied", extra={"namespace": ns})
            done[ns] = manifest
        # Only a namespace whose labels are known loses it: one the watch has not delivered yet keeps it.
        kept = {ns for ns in present - want if ns not in labels_now}
        for ns in sorted(present - want - kept):
            delete_policy(ns)
            log.info("gateway egress policy removed", extra={"namespace": ns})
        self._applied["policies"] = {**done, **dict.fromkeys(kept)}

    def _cut_namespaces(self, namespace: str) -> tuple[str, ...]:
        """The inference namespaces the namespace's cut-off denies (its policy, while the cut-off label is set)."""
        if (self.labels.get(namespace) or {}).get(CUT_OFF_LABEL) != "true":
            return ()
        return denied_namespaces(read_cut_off_policy(namespace))


def _condition_changed(current: list[dict[str, Any]], desired: list[dict[str, Any]]) -> bool:
    def strip(conds: list[dict[str, Any]]) -> list[tuple]:
        return [(c.get("type"), c.get("status"), c.get("reason"), c.get("message"), c.get("observedGeneration"))
                for c in conds]
    return strip(current) != strip(desired)


class ModeNotes:
    """Without the gateway (chart gateway.enabled false): a namespace labelled spendwarden.io/mode=gateway
    is served in sidecar mode; said once per namespace in the log and as a Warning Event on it."""

    def __init__(self, settings: gw.GatewaySettings):
        self.settings = settings
        self._noted: set[str] = set()

    def observe_namespace(self, event: Mapping[str, Any], name: str, labels: Mapping[str, str], **_: Any) -> None:
        note = None if event.get("type") == "DELETED" else gw.namespace_mode(name, labels, self.settings).note
        if note is None:
            self._noted.discard(name)
            return
        if name in self._noted:
            return
        self._noted.add(name)
        log.warning("namespace %s: %s", name, note)
        _warn({"apiVersion": "v1", "kind": "Namespace", "name": name}, "GatewayNotEnabled", note)
