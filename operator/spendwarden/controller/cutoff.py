"""Applies and reverses the namespace cut-off of exhausted CutOff budgets (render/cutoff.py decides).

Level-triggered: `CutOffController.notify(ns)` recomputes the namespace's desired cut-off from the
ledger's budgets and the namespace's ModelRoutes and makes the apiserver match it, idempotently:
  - NetworkPolicy spendwarden-cut-off: server-side apply, or deleted;
  - namespace label spendwarden.io/cut-off=true (and spendwarden.io/cut-off-budgets), or removed;
  - the namespace's own inference workloads held at 0 replicas through the scale subresource, their
    replicas remembered in the namespace annotation spendwarden.io/replicas-before-cut-off (written
    BEFORE scaling, so a crash cannot lose them) and restored when lifted.
The ledger service notifies on every report, flush, load and deletion of a budget (a flush follows
each period reset and spec change: a raised limit); a ModelRoute event re-applies a cut namespace;
at start the labelled namespaces are re-examined (reversals owed from before a restart) and cut
namespaces are resynced every `resync` seconds (SPENDWARDEN_CUTOFF_RESYNC) (DNS answers change, someone scales back up). Failures
are logged and retried with backoff, never raised.

Remembering replicas on the namespace, not the workload, keeps the operator's rights to the scale
subresource (it may not patch Deployment specs). `scale_to_zero` and `restore_replicas` are the
only functions that touch replica counts here, for the scaling controller (issue #5) to share.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol
from urllib.parse import urlsplit

from prometheus_client import Gauge

from ..api import modelroute, tokenbudget
from ..ledger.allowance import hard_ceiling
from ..ledger.store import BudgetEntry
from ..render.cutoff import (
    BUDGETS_ANNOTATION,
    NAME_LABEL,
    NAMESPACE_LABEL,
    POLICY_NAME,
    BudgetCut,
    CutOffSettings,
    DesiredCutOff,
    Workload,
    desired_cut_off,
)
from ..render.gateway import MODE_GATEWAY, GatewaySettings, egress_open, namespace_mode
from ..render.proxyconfig import render_proxy_config, validate_spec
from . import kube

log = logging.getLogger(__name__)

REPLICAS_ANNOTATION = "spendwarden.io/replicas-before-cut-off"
FIELD_MANAGER = "spendwarden"
RETRY_MIN, RETRY_MAX = 2.0, 60.0
CUT_OFF = Gauge("spendwarden_namespace_cut_off", "1 while a CutOff budget of the namespace is exhausted (or a "
                "Downgrade budget is at its hard ceiling).", ["namespace"])


def budget_cut(entry: BudgetEntry) -> BudgetCut:
    """A CutOff budget spent, or a Downgrade budget spent to its hard ceiling: the proxies refuse in
    both cases (the answer's cutOff), so the namespace is closed for what bypasses them as well."""
    cur = entry.current
    spent = entry.spec.onExceeded == tokenbudget.OnExceeded.CUT_OFF and cur.ledger.exhausted()
    at_hard_ceiling = cur.hard is not None and cur.hard.exhausted()
    return BudgetCut(entry.name, entry.uid, tuple(entry.spec.routes), spent or at_hard_ceiling)


def apiserver_cidrs() -> tuple[str, ...]:
    """The apiserver's addresses (the in-cluster Service IP and the kubeconfig's host)."""
    hosts = {os.environ.get("KUBERNETES_SERVICE_HOST") or "", urlsplit(kube.api_client().configuration.host).hostname or ""}
    out = []
    for host in filter(None, hosts):
        try:
            out += [f"{a}/{32 if ':' not in a else 128}" for a in resolve(host)]
        except OSError:
            pass
    return tuple(sorted(set(out)))


def resolve(host: str) -> list[str]:
    return sorted({str(info[4][0]) for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)})


# -- apiserver I/O (blocking; run in threads) ----------------------------------------------------------

def read_namespace(namespace: str) -> dict[str, Any] | None:
    api = kube.core()
    found = kube.or_none(lambda: api.read_namespace(namespace))
    return api.api_client.sanitize_for_serialization(found) if found is not None else None


def namespace_exists(namespace: str) -> bool:
    return read_namespace(namespace) is not None


def list_routes(namespace: str) -> list[dict[str, Any]]:
    return kube.list_custom(modelroute.PLURAL, namespace)


def list_budgets(namespace: str) -> list[dict[str, Any]]:
    return kube.list_custom(tokenbudget.PLURAL, namespace)


def cut_namespaces() -> list[str]:
    items = kube.core().list_namespace(label_selector=f"{NAMESPACE_LABEL}=true").items
    return [ns.metadata.name for ns in items if ns.metadata is not None and ns.metadata.name]  # listed: always named


def _patch_namespace(namespace: str, labels: dict[str, Any] | None = None,
                     annotations: dict[str, Any] | None = None) -> None:
    meta = {k: v for k, v in (("labels", labels), ("annotations", annotations)) if v}
    if meta:
        kube.core().patch_namespace(namespace, {"metadata": meta})


def _policy_matches(current: dict[str, Any], manifest: dict[str, Any]) -> bool:
    have, want = current.get("metadata") or {}, manifest["metadata"]
    return (current.get("spec") == manifest["spec"]
            and all((have.get(k) or {}).get(n) == v for k in ("labels", "annotations") for n, v in want[k].items())
            and sorted(o.get("uid") for o in have.get("ownerReferences") or []) == sorted(o["uid"] for o in want["ownerReferences"]))


def apply_policy(manifest: dict[str, Any]) -> bool:
    """Server-side apply, unless the policy is already as desired: on 1.20 even a no-op apply writes
    (managedFields' timestamps), and cut namespaces are re-applied every resync. True if written."""
    meta = manifest["metadata"]
    net = kube.networking()
    found = kube.or_none(lambda: net.read_namespaced_network_policy(meta["name"], meta["namespace"]))
    if found is not None and _policy_matches(net.api_client.sanitize_for_serialization(found), manifest):
        return False
    net.patch_namespaced_network_policy(meta["name"], meta["namespace"], manifest, field_manager=FIELD_MANAGER,
                                               force=True, _content_type="application/apply-patch+yaml")
    return True


def delete_policy(namespace: str) -> bool:
    return kube.or_none(lambda: kube.networking().delete_namespaced_network_policy(POLICY_NAME, namespace)) is not None


def remembered_replicas(namespace_obj: dict[str, Any] | None) -> dict[str, int]:
    """Workload key ("Deployment/name") -> replicas before the cut-off, from the namespace."""
    raw = (((namespace_obj or {}).get("metadata") or {}).get("annotations") or {}).get(REPLICAS_ANNOTATION)
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        log.warning("unreadable %s annotation ignored", REPLICAS_ANNOTATION)
        return {}
    return {k: int(v) for k, v in data.items() if isinstance(v, int) and not isinstance(v, bool)} if isinstance(data, dict) else {}


def _remember(namespace: str, remembered: dict[str, int]) -> None:
    _patch_namespace(namespace, annotations={
        REPLICAS_ANNOTATION: json.dumps(remembered, sort_keys=True, separators=(",", ":")) if remembered else None})


def scale_to_zero(namespace: str, workloads: Iterable[Workload], remembered: dict[str, int]) -> list[str]:
    """Hold the workloads at 0 replicas; `remembered` (updated in place and on the namespace first)
    keeps what they had. Returns notes about workloads that do not exist."""
    notes = []
    for w in workloads:
        read, patch = kube.scale_api(w.kind)
        found = kube.or_none(partial(read, w.name, namespace))
        if found is None:
            notes.append(f"{w.key} not found: not scaled")
            continue
        replicas = found.spec.replicas or 0
        if w.key not in remembered:
            remembered[w.key] = replicas
            _remember(namespace, remembered)
        if replicas != 0:
            patch(w.name, namespace, {"spec": {"replicas": 0}})
            log.info("workload scaled to 0 (cut-off)", extra={"namespace": namespace, "workload": w.key, "was": replicas})
    return notes


def restore_replicas(namespace: str, keys: Iterable[str], remembered: dict[str, int]) -> None:
    """Give the workloads back the replicas they had before the cut-off and forget them (a workload
    someone scaled up meanwhile keeps its count; a deleted one is just forgotten)."""
    for key in sorted(keys):
        w = Workload.from_key(key)
        read, patch = kube.scale_api(w.kind)
        found = kube.or_none(partial(read, w.name, namespace))
        # A deleted workload is just forgotten. (Patching one deleted meanwhile: a 404, forgotten too.)
        if found is not None and (found.spec.replicas or 0) == 0 and remembered[key]:
            kube.or_none(partial(patch, w.name, namespace, {"spec": {"replicas": remembered[key]}}))
            log.info("workload scale restored (cut-off lifted)",
                     extra={"namespace": namespace, "workload": key, "replicas": remembered[key]})
        del remembered[key]
        _remember(namespace, remembered)


def apply_cut_off(desired: DesiredCutOff, namespace_obj: dict[str, Any], scaled: Iterable[str] = ()) -> list[str]:
    """Make the apiserver match `desired`; returns what changed (for Events and logs). `scaled`:
    workload keys whose replicas the scaler owns (forgotten here, never restored over the scaler)."""
    ns = desired.namespace
    meta = namespace_obj.get("metadata") or {}
    was_cut = (meta.get("labels") or {}).get(NAMESPACE_LABEL) == "true"
    remembered = remembered_replicas(namespace_obj)
    handed = [k for k in scaled if k in remembered]
    if handed:
        for k in handed:
            del remembered[k]
        _remember(ns, remembered)
    changes: list[str] = []
    if desired.cut:
        # Fastest effect first: the policy, then the label, then the (slow to drain) scale-down.
        for other in desired.denied_namespaces:  # Kubernetes 1.20 does not set the label itself
            kube.or_none(partial(_patch_namespace, other, labels={NAME_LABEL: other}))
        if desired.policy is not None:
            apply_policy(desired.policy)
        elif delete_policy(ns):
            changes.append("policy deleted")
        budgets = ",".join(b.name for b in desired.budgets)
        if not was_cut or meta.get("annotations", {}).get(BUDGETS_ANNOTATION) != budgets:
            _patch_namespace(ns, labels={NAMESPACE_LABEL: "true"}, annotations={BUDGETS_ANNOTATION: budgets})
            changes.append("cut")
        keep = {w.key for w in desired.workloads}
        restore_replicas(ns, [k for k in remembered if k not in keep], remembered)
        desired.notes.extend(scale_to_zero(ns, desired.workloads, remembered))
    else:
        restore_replicas(ns, list(remembered), remembered)
        if delete_policy(ns):
            changes.append("policy deleted")
        if was_cut or BUDGETS_ANNOTATION in (meta.get("annotations") or {}):
            _patch_namespace(ns, labels={NAMESPACE_LABEL: None}, annotations={BUDGETS_ANNOTATION: None})
            changes.append("lifted")
    return changes


# -- the controller ------------------------------------------------------------------------------------

class LedgerView(Protocol):
    """What the controller needs of controller/ledger_service.LedgerService."""

    store: Any
    config: Any  # LedgerConfig: .serves(namespace)

    async def entry(self, namespace: str, name: str) -> BudgetEntry | None:
        """The budget's entry, loaded with its persisted ledger first if need be."""


# (namespace, kind, name) -> whether the scaler owns that workload's replica count (scaler.Scaler.owns)
ReplicaOwnerFn = Callable[[str, str, str], bool]


@dataclass
class _Namespace:
    task: asyncio.Task | None = None
    again: bool = False
    failures: int = 0
    retry_at: float = 0.0


@dataclass
class CutOffController:
    ledger: LedgerView
    settings: CutOffSettings = field(default_factory=CutOffSettings)  # the apiserver's addresses added at start()
    resync: float = 30.0  # cut namespaces are re-applied this often (DNS answers change, someone scales up)
    replica_owner: ReplicaOwnerFn | None = None
    gateway: GatewaySettings = field(default_factory=GatewaySettings)  # which namespaces are in gateway mode
    started: bool = False
    seen: dict[tuple[str, str], BudgetCut] = field(default_factory=dict)
    cut: set[str] = field(default_factory=set)     # namespaces cut off as last applied
    _ns: dict[str, _Namespace] = field(default_factory=dict)
    _loop: asyncio.Task | None = None
    applied_at: dict[str, float] = field(default_factory=dict)  # namespace -> time.time() of the last cut

    async def start(self) -> None:
        self.started = True
        if not self.settings.protected_cidrs:  # they need a DNS lookup: not in the settings read at start
            self.settings = replace(self.settings, protected_cidrs=await asyncio.to_thread(apiserver_cidrs))
        self._loop = asyncio.create_task(self._resync_forever(), name="spendwarden-cut-off-resync")

    async def stop(self) -> None:
        tasks = [t for t in (self._loop, *(s.task for s in self._ns.values())) if t is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    # triggers (cheap: called on every report)

    def observe(self, entry: BudgetEntry) -> None:
        """A budget's ledger changed: re-examine its namespace if its part in a cut-off changed."""
        key, cut = (entry.namespace, entry.name), budget_cut(entry)
        before = self.seen.get(key)
        self.seen[key] = cut
        if cut != before and (before is not None or cut.cut):
            self._gauge(entry.namespace)
            self.notify(entry.namespace)

    def forget(self, namespace: str, name: str) -> None:
        before = self.seen.pop((namespace, name), None)
        if (before is not None and before.cut) or namespace in self.cut:
            self._gauge(namespace)
            self.notify(namespace)

    def _gauge(self, namespace: str) -> None:
        """Set with the ledger change itself (not after the status flush), as the cut-off is."""
        CUT_OFF.labels(namespace=namespace).set(
            1 if any(cut.cut for (ns, _), cut in self.seen.items() if ns == namespace) else 0)

    def notify(self, namespace: str) -> None:
        if not self.started or not self.ledger.config.serves(namespace):
            return  # another operator instance (other --namespace patterns) owns it
        st = self._ns.setdefault(namespace, _Namespace())
        if st.task is not None and not st.task.done():
            st.again = True
            return
        st.task = asyncio.create_task(self._run(namespace), name=f"cut-off-{namespace}")

    # reconcile

    async def _run(self, namespace: str) -> None:
        st = self._ns[namespace]
        while True:
            st.again = False
            try:
                await self.reconcile(namespace)
                st.failures, st.retry_at = 0, 0.0
            except Exception as exc:  # noqa: BLE001 - retried by the resync loop with backoff
                st.failures += 1
                st.retry_at = time.monotonic() + min(RETRY_MAX, RETRY_MIN * 2 ** (st.failures - 1))
                log.warning("cut-off of namespace %s failed (%s %s); retrying", namespace, type(exc).__name__,
                            getattr(exc, "status", "") or "", extra={"namespace": namespace})
            if not st.again:
                break
        if not st.failures and namespace not in self.cut:
            self._ns.pop(namespace, None)

    async def budgets(self, namespace: str) -> list[BudgetCut]:
        """The namespace's budgets that can cut it off (CutOff, Downgrade with a hard ceiling) as the
        ledger sees them; one with persisted usage that the ledger has not loaded yet (just after a
        restart) is loaded first."""
        out = []
        for obj in await asyncio.to_thread(list_budgets, namespace):
            name = obj["metadata"]["name"]
            spec, problem = validate_spec(tokenbudget.KIND, obj.get("spec"))
            if problem is not None or (spec.onExceeded != tokenbudget.OnExceeded.CUT_OFF and hard_ceiling(spec) is None):
                continue
            entry = self.ledger.store.get(namespace, name)
            if entry is None and (obj.get("status") or {}).get("ledger"):
                entry = await self.ledger.entry(namespace, name)
            if entry is not None:
                cut = budget_cut(entry)
                self.seen[(namespace, name)] = cut
                out.append(cut)
        return out

    async def reconcile(self, namespace: str) -> DesiredCutOff:
        settings = self.settings
        began = time.monotonic()
        ns_obj = await asyncio.to_thread(read_namespace, namespace)
        if ns_obj is None or (ns_obj.get("metadata") or {}).get("deletionTimestamp"):
            self.cut.discard(namespace)
            return DesiredCutOff(namespace, cut=False)
        budgets = await self.budgets(namespace)
        routes: list[Any] = []
        if any(b.cut for b in budgets):
            objs = await asyncio.to_thread(list_routes, namespace)
            routes = [r.spec for r in render_proxy_config(namespace, objs, []).config.routes]
        computed = time.monotonic()
        labels = (ns_obj.get("metadata") or {}).get("labels") or {}
        gateway = (namespace_mode(namespace, labels, self.gateway).mode == MODE_GATEWAY and not egress_open(labels))
        desired = await asyncio.to_thread(desired_cut_off, namespace, budgets, routes, resolve, namespace_exists, settings,
                                          gateway)
        # One owner of replica counts: workloads with scaling settings are the scaler's.
        owns = self.replica_owner
        scaled = [w for w in desired.workloads if owns is not None and owns(namespace, w.kind, w.name)]
        if scaled:
            desired.workloads = tuple(w for w in desired.workloads if w not in scaled)
            desired.notes.append(f"held at 0 by the scaler: {', '.join(w.key for w in scaled)}")
        changes = await asyncio.to_thread(apply_cut_off, desired, ns_obj, [w.key for w in scaled])
        if desired.cut:
            if namespace not in self.cut:
                self.applied_at[namespace] = time.time()
            self.cut.add(namespace)
        else:
            self.cut.discard(namespace)
        if changes:
            log.warning(desired.message(), extra={"namespace": namespace, "changes": changes,
                                                  "seconds": round(time.monotonic() - began, 3),
                                                  "readSeconds": round(computed - began, 3)})
            await asyncio.to_thread(self._events, desired, ns_obj, changes)
        return desired

    def _events(self, desired: DesiredCutOff, ns_obj: dict[str, Any], changes: list[str]) -> None:
        if "cut" in changes:
            targets = [(b.name, b.uid) for b in desired.budgets]
            reason = "NamespaceCutOff"
        elif "lifted" in changes:
            names = ((ns_obj.get("metadata") or {}).get("annotations") or {}).get(BUDGETS_ANNOTATION) or ""
            targets = [(n, None) for n in names.split(",") if n]
            for i, (n, _) in enumerate(targets):
                entry = self.ledger.store.get(desired.namespace, n)
                targets[i] = (n, entry.uid if entry is not None else None)
            reason = "CutOffLifted"
        else:
            return
        message = desired.message() if reason == "NamespaceCutOff" else (
            f"cut-off of namespace {desired.namespace} lifted: NetworkPolicy removed, label removed, replicas restored")
        for name, uid in targets:
            try:
                kube.post_budget_event(desired.namespace, name, uid, reason, message)
            except Exception as exc:  # noqa: BLE001 - an Event is not worth a retry of the cut-off
                log.warning("cut-off Event not posted: %s", type(exc).__name__)

    async def _resync_forever(self) -> None:
        """Reversals owed from before a restart first, then cut namespaces every `resync` seconds and
        failed ones when their backoff is over."""
        pending = True  # reversals owed from before a restart
        last = time.monotonic()
        while True:
            try:
                if pending:
                    for ns in await asyncio.to_thread(cut_namespaces):
                        self.notify(ns)
                    pending = False
                now = time.monotonic()
                due = now - last >= self.resync
                if due:
                    last = now
                for ns, st in list(self._ns.items()):
                    if (st.task is None or st.task.done()) and ((st.failures and st.retry_at <= now) or (due and ns in self.cut)):
                        self.notify(ns)
            except Exception as exc:  # noqa: BLE001 - the apiserver is down: try again shortly
                log.warning("cut-off resync failed: %s", type(exc).__name__)
            await asyncio.sleep(1.0)
