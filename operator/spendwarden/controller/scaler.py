"""The scaler: sets the replicas of ModelRoute backends' workloads (deploymentRef + scaling) through
the scale subresource, from the demand the proxies report to the ledger service.

Thin I/O around the pure core (scaling/): every `interval` seconds, and at once on a wake request,
each scaled workload is read, checked for another autoscaler, decided (scaling.policy.decide) and
scaled; replica-hours are metered (scaling.capacity) and ModelRoute status.scaling written when
something a person would look at changed (at least every `status_interval` for the hours).

No fight: while a HorizontalPodAutoscaler targets the workload, or another writer set its replicas
after the scaler (metadata.managedFields and the changed count; scaling/owners.py has the policy),
its replicas are left alone and the routes that use it get the condition ScalingConflict=True and a
Warning Event. Budgets still win: a workload whose payers are all cut off is held at 0 regardless.
The scaler writes as field manager spendwarden-scaler.

Demand arrives in the ledger reports (`backends`, docs/ledger-protocol.md); a proxy holding a request
for a workload at zero calls POST /v1/wake (same TokenReview auth, only its own namespace's routes).

Longer than 500 lines: the tick, the metering and the status writes share one state per workload
(Tracked) and the index of the routes that use it; the pure parts already live in scaling/, and
what is left is the I/O around them, which split apart would reach into each other's state.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from prometheus_client import Counter, Gauge

from .. import GROUP, VERSION
from ..api import modelroute
from ..api.common import now_rfc3339, set_condition
from ..ledger.periods import current_period
from ..ledger.store import BudgetEntry
from ..render.cutoff import BudgetCut, cut_routes
from ..render.proxyconfig import validate_spec
from ..scaling.capacity import MS_PER_HOUR, PeriodFn, ReplicaMeter, calendar_month
from ..scaling.demand import BackendLoad, DemandBook, parse_backends
from ..scaling.owners import SCALER_MANAGER, UNRECORDED, Ownership, ReplicaOwner, replica_owners
from ..scaling.policy import Decision, Policy, ScaleState, decide
from ..scaling.workloads import Use, WorkloadKey, allowed, demand, governing, uses_by_workload
from . import kube
from .cutoff import budget_cut

log = logging.getLogger(__name__)
BudgetsFn = Callable[[], Iterable[BudgetEntry]]

CONFLICT = "ScalingConflict"

REPLICAS = Gauge("spendwarden_backend_replicas", "Replicas of scaled backend workloads, by kind (desired, actual, available).",
                 ["namespace", "workload", "kind"])
IN_FLIGHT = Gauge("spendwarden_backend_in_flight", "Requests in flight to a scaled workload, summed over the proxies that may use it.",
                  ["namespace", "workload"])
REPLICA_SECONDS = Counter("spendwarden_backend_replica_seconds_total", "Replica-seconds of scaled workloads (capacity held).",
                          ["namespace", "workload"])
CAPACITY_COST = Counter("spendwarden_backend_capacity_cost_total", "Cost of the replica-seconds at costPerReplicaHour.",
                        ["namespace", "workload", "currency"])
SCALE_WRITES = Counter("spendwarden_scaler_writes_total", "Replica changes written through the scale subresource, by outcome.",
                       ["outcome"])


@dataclass
class WorkloadView:
    spec_replicas: int
    replicas: int
    available: int
    annotations: dict[str, str]
    owners: tuple[ReplicaOwner, ...] = ()   # managedFields entries owning spec.replicas


@dataclass
class Tracked:
    """What the scaler keeps per workload between ticks."""

    state: ScaleState
    meter: ReplicaMeter | None = None
    view: WorkloadView | None = None
    decision: Decision | None = None
    in_flight: int = 0
    conflict: tuple[str, str] | None = None   # (reason, message) while another owner has the count
    ownership: Ownership = field(default_factory=Ownership)
    missing: str | None = None       # the message while the workload cannot be read
    last_scale: str | None = None


@dataclass
class RouteWrite:
    scaling: list[dict[str, Any]] | None = None
    conflict: tuple[str, str, str] | None = None
    at: float = 0.0


# -- apiserver I/O (in threads) -----------------------------------------------------------------------

def read_workload(key: WorkloadKey) -> WorkloadView | None:
    apps = kube.apps()
    read = apps.read_namespaced_deployment if key.kind == "Deployment" else apps.read_namespaced_stateful_set
    obj = kube.or_none(lambda: read(key.name, key.namespace))
    if obj is None:
        return None
    st, meta = obj.status, obj.metadata
    assert st is not None and meta is not None  # the apiserver's read always carries both
    available = (st.available_replicas if key.kind == "Deployment" else st.ready_replicas) or 0
    return WorkloadView(spec_replicas=obj.spec.replicas if obj.spec.replicas is not None else 1,
                        replicas=st.replicas or 0, available=available,
                        annotations=dict(meta.annotations or {}),
                        owners=replica_owners(apps.api_client.sanitize_for_serialization(meta.managed_fields)))


def hpa_targeting(key: WorkloadKey) -> str | None:
    """The name of a HorizontalPodAutoscaler that targets the workload. autoscaling/v1 lists every HPA
    whatever version it was written in (v2beta2 on 1.20, v2 later: one stored object)."""
    for hpa in kube.autoscaling_v1().list_namespaced_horizontal_pod_autoscaler(key.namespace).items:
        ref = hpa.spec.scale_target_ref
        if ref.kind == key.kind and ref.name == key.name:
            return hpa.metadata.name if hpa.metadata is not None else None  # listed objects carry metadata
    return None


def scale(key: WorkloadKey, replicas: int) -> None:
    patch = kube.scale_api(key.kind)[1]  # the one place that writes replica counts
    patch(key.name, key.namespace, {"spec": {"replicas": replicas}}, field_manager=SCALER_MANAGER)


def _get_route(namespace: str, name: str) -> dict[str, Any] | None:
    return kube.get_custom(modelroute.PLURAL, namespace, name)


def _patch_route_status(namespace: str, name: str, body: Any, json_patch: bool = False) -> bool:
    """False when the route is gone or (JSON Patch `test`) its conditions changed meanwhile."""
    kwargs: dict[str, Any] = {"_content_type": "application/json-patch+json"} if json_patch else {}
    try:
        kube.custom().patch_namespaced_custom_object_status(GROUP, VERSION, namespace, modelroute.PLURAL, name, body, **kwargs)
        return True
    except kube.ApiException as exc:
        if exc.status in (404, 409, 422):
            return False
        raise


def _warn_route(route: dict[str, Any], reason: str, message: str) -> None:
    kube.post_warning(kube.involved_object({**route, "kind": modelroute.KIND}), reason, message, component="scaler")


# -- the scaler ------------------------------------------------------------------------------------------

class WakeError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Scaler:
    def __init__(self, interval: float = 1.0, status_interval: float = 30.0, demand_ttl: float = 5.0,
                 budgets: BudgetsFn = lambda: ()):
        self.interval = interval
        self.budgets = budgets  # the ledger's budget entries: replica-hours' period, cut-off state
        self.status_interval = status_interval
        self.book = DemandBook(ttl=demand_ttl)
        self.routes: dict[tuple[str, str], tuple[dict[str, Any], modelroute.ModelRouteSpec]] = {}
        self.tracked: dict[WorkloadKey, Tracked] = {}
        self.uses: dict[WorkloadKey, list[Use]] = {}
        # The routes with a deploymentRef backend: the only ones `uses` is made of.
        self._referring: dict[tuple[str, str], modelroute.ModelRouteSpec] = {}
        self._written: dict[tuple[str, str], RouteWrite] = {}
        self._kick = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    # inputs

    def observe_route(self, event_type: str | None, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        spec, problem = validate_spec(modelroute.KIND, obj.get("spec"))
        if event_type == "DELETED" or meta.get("deletionTimestamp") or problem is not None:
            self.routes.pop(key, None)
            self._written.pop(key, None)
        else:
            self.routes[key] = (obj, spec)
        # Recomputed only when a route that names workloads came, changed or went: every ModelRoute
        # event (each status write's echo too) recomputing it over all routes was quadratic, 40% of
        # the operator's CPU while it reconciled 2,000 namespaces.
        refers = key in self.routes and any(b.deploymentRef is not None for b in spec.backends)
        if not refers and self._referring.pop(key, None) is None:
            return
        if refers:
            self._referring[key] = spec
        self.uses = uses_by_workload((ns, name, sp) for (ns, name), sp in sorted(self._referring.items()))

    def record(self, proxy_id: str, namespace: str, backends: dict[str, BackendLoad]) -> dict[str, Any]:
        """A report's `backends`: remembered as demand; answered with what the proxy needs to know of
        each scaled backend it reported (replicas, available replicas)."""
        now = time.time()
        self.book.record(proxy_id, namespace, backends, now)
        answer: dict[str, Any] = {}
        for key in backends:
            found = self._find(namespace, key)
            # The wake endpoint's rule: replica counts of a workload of another namespace only where
            # it is shared with this one (else any team could watch another's capacity).
            if found is not None and self._shared(*found):
                answer[key] = self._backend_answer(*found)
        return answer

    def _shared(self, wk: WorkloadKey, use: Use) -> bool:
        tr = self.tracked.get(wk)
        return allowed(wk, use, tr.view.annotations if tr is not None and tr.view is not None else None)

    def _find(self, namespace: str, key: str) -> tuple[WorkloadKey, Use] | None:
        for wk, uses in self.uses.items():
            for u in uses:
                if u.namespace == namespace and u.key == key and u.scaling is not None:
                    return wk, u
        return None

    def _backend_answer(self, wk: WorkloadKey, use: Use) -> dict[str, Any]:
        tr = self.tracked.get(wk)
        if tr is None or tr.view is None:
            return {}
        out = {"replicas": tr.view.replicas, "availableReplicas": tr.view.available}
        if tr.decision is not None:
            out["desiredReplicas"] = tr.decision.desired
        if tr.conflict:
            out["conflict"] = True
        return out

    async def wake(self, namespace: str, route: str, backend: str) -> dict[str, Any]:
        """A proxy has a request for this backend and no available replica: one replica, now."""
        found = self._find(namespace, f"{route}/{backend}")
        if found is None:
            raise WakeError(404, f"route {route!r} backend {backend!r} of namespace {namespace} is not a scaled backend")
        wk, use = found
        tr = self.tracked.setdefault(wk, Tracked(ScaleState.new(time.time())))
        if not self._shared(wk, use):
            raise WakeError(403, f"{wk} is not shared with namespace {namespace} (annotation spendwarden.io/scaling-shared-with)")
        tr.state.wake(time.time())
        await self.tick()
        return self._backend_answer(wk, use)

    # the loop

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="spendwarden-scaler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._kick.wait(), self.interval)
            except TimeoutError:
                pass
            self._kick.clear()
            try:
                await self.tick()
            except Exception:  # the next tick tries again; never let the loop die
                log.exception("scaler tick failed")

    async def tick(self) -> None:
        async with self._lock:
            now = time.time()
            self.book.prune(now)
            load = self.book.load(now)
            scaled = {wk: uses for wk, uses in self.uses.items() if any(u.scaling is not None for u in uses)}
            for wk in [wk for wk in self.tracked if wk not in scaled]:
                self._forget(wk)
            is_cut = self._cut_checker()
            for wk, uses in scaled.items():
                try:
                    await self._one(wk, uses, load, is_cut)
                except Exception as exc:  # noqa: BLE001 - one workload's trouble does not stop the others
                    log.warning("scaling %s failed: %s: %s", wk, type(exc).__name__, exc)
            await self._write_statuses()

    async def _one(self, wk: WorkloadKey, uses: list[Use], load: dict, is_cut: Any) -> None:
        now = time.time()
        view = await asyncio.to_thread(read_workload, wk)
        tr = self.tracked.setdefault(wk, Tracked(ScaleState.new(now, view.spec_replicas if view else None)))
        if view is None:
            tr.view, tr.decision = None, None
            tr.missing = f"{wk} not found"
            return
        tr.missing = None
        tr.view = view
        gov = governing(wk, uses, view.annotations)
        if gov is None or gov.scaling is None:  # governing() returns only a use with scaling
            tr.decision = None
            return
        policy = Policy.from_spec(gov.scaling)
        wanted, _queue = demand(wk, uses, view.annotations, load, is_cut)
        tr.in_flight = wanted.in_flight
        tr.decision = decide(tr.state, policy, wanted, now)
        hpa = await asyncio.to_thread(hpa_targeting, wk)
        own = tr.ownership
        if own.written is None and own.foreign is None:
            own.foreign = self._persisted_foreign(wk)  # a conflict from before an operator restart
        if own.observe(view.spec_replicas, view.owners, view.annotations, autoscaler=hpa is not None):
            log.warning("%s: spec.replicas written by %s after the scaler: left alone", wk, own.foreign)
        tr.conflict = (("HorizontalPodAutoscaler", f"HorizontalPodAutoscaler {hpa} targets {wk}: spendwarden leaves "
                        "its replicas alone except at 0 while cut off (delete the HPA or the route's scaling settings)")
                       if hpa else ("ForeignReplicaWriter", foreign_message(wk, own.foreign)) if own.foreign else None)
        target = own.target(tr.decision.desired, wanted.cut_off, view.spec_replicas, tr.conflict is not None)
        if target is not None and view.spec_replicas != target:
            try:
                await asyncio.to_thread(scale, wk, target)
            except Exception:
                SCALE_WRITES.labels("error").inc()
                raise
            own.wrote(target, view.owners)
            SCALE_WRITES.labels("ok").inc()
            log.info("scaled %s from %d to %d replicas (%s, in flight %d)", wk, view.spec_replicas,
                     target, "Conflict" if tr.conflict and not wanted.cut_off else tr.decision.reason, wanted.in_flight)
            tr.last_scale = now_rfc3339()
        self._meter(wk, tr, gov, view.replicas)
        labels = (wk.namespace, f"{wk.kind}/{wk.name}")
        REPLICAS.labels(*labels, "desired").set(tr.decision.desired)
        REPLICAS.labels(*labels, "actual").set(view.replicas)
        REPLICAS.labels(*labels, "available").set(view.available)
        IN_FLIGHT.labels(*labels).set(wanted.in_flight)

    def _meter(self, wk: WorkloadKey, tr: Tracked, gov: Use, replicas: int) -> None:
        now = datetime.now(UTC)
        period = self._period_for(gov.namespace)
        if tr.meter is None:
            tr.meter = ReplicaMeter.start(now, period, replicas, self._persisted_ms(gov, now, period))
            return
        added = tr.meter.observe(replicas, now, period)
        if added:
            labels = (wk.namespace, f"{wk.kind}/{wk.name}")
            REPLICA_SECONDS.labels(*labels).inc(added / 1000)
            per_hour = gov.scaling.costPerReplicaHour if gov.scaling else None
            if per_hour is not None:
                CAPACITY_COST.labels(*labels, gov.currency).inc(float(Decimal(added) * Decimal(per_hour) / MS_PER_HOUR))

    def _persisted_ms(self, gov: Use, now: datetime, period: PeriodFn) -> int:
        """Replica-hours already in the governing route's status for this period (operator restarts)."""
        obj, _ = self.routes.get((gov.namespace, gov.route), ({}, None))
        start = now_rfc3339(period(now)[0])
        for entry in (obj.get("status") or {}).get("scaling") or []:
            if entry.get("backend") == gov.backend and entry.get("periodStart") == start and entry.get("replicaHours"):
                try:
                    return int(Decimal(entry["replicaHours"]) * MS_PER_HOUR)
                except ArithmeticError:
                    return 0
        return 0

    def _persisted_foreign(self, wk: WorkloadKey) -> str | None:
        """The foreign writer a route's status.scaling still names for the workload."""
        for u in self.uses.get(wk, []):
            obj, _ = self.routes.get((u.namespace, u.route), ({}, None))
            for entry in (obj.get("status") or {}).get("scaling") or []:
                if entry.get("workload") == str(wk) and entry.get("foreignWriter"):
                    return str(entry["foreignWriter"])
        return None

    def _forget(self, wk: WorkloadKey) -> None:
        self.tracked.pop(wk, None)
        labels = (wk.namespace, f"{wk.kind}/{wk.name}")
        for gauge, extra in ((REPLICAS, ("desired",)), (REPLICAS, ("actual",)), (REPLICAS, ("available",)), (IN_FLIGHT, ())):
            try:
                gauge.remove(*labels, *extra)
            except KeyError:
                pass

    # status

    def _route_entries(self) -> dict[tuple[str, str], tuple[list[dict[str, Any]], tuple[str, str] | None]]:
        """(namespace, route) -> (status.scaling entries, (conflict reason, message) or None)."""
        out: dict[tuple[str, str], tuple[list[dict[str, Any]], tuple[str, str] | None]] = {}
        for wk, uses in self.uses.items():
            tr = self.tracked.get(wk)
            for u in uses:
                if u.scaling is None:
                    continue
                entries, conflict = out.setdefault((u.namespace, u.route), ([], None))
                entry: dict[str, Any] = {"backend": u.backend, "workload": str(wk)}
                view = tr.view if tr else None
                if tr is None or (tr.missing is None and view is None):
                    entry["reason"] = "Pending"
                elif tr.missing or view is None:  # view is None only with tr.missing set
                    entry["reason"] = "WorkloadNotFound"
                elif not allowed(wk, u, view.annotations):
                    entry["reason"] = "NotShared"
                else:
                    entry.update(replicas=view.replicas, availableReplicas=view.available, inFlight=tr.in_flight)
                    if tr.decision is not None:
                        entry.update(desiredReplicas=tr.decision.desired, reason="Conflict" if tr.conflict
                                     and tr.decision.reason != "CutOff" else tr.decision.reason)
                    if tr.ownership.foreign:
                        entry["foreignWriter"] = tr.ownership.foreign
                    if tr.last_scale:
                        entry["lastScaleTime"] = tr.last_scale
                    if tr.meter is not None:
                        per_hour = Decimal(u.scaling.costPerReplicaHour) if u.scaling.costPerReplicaHour else None
                        entry.update(tr.meter.status(per_hour, u.currency))
                    if tr.conflict:
                        conflict = tr.conflict
                entries.append(entry)
                out[(u.namespace, u.route)] = (entries, conflict)
        return out

    async def _write_statuses(self) -> None:
        now = time.monotonic()
        for key, (entries, conflict) in self._route_entries().items():
            if key not in self.routes:
                continue
            w = self._written.setdefault(key, RouteWrite())
            if _material(w.scaling) != _material(entries) or now - w.at >= self.status_interval:
                if await asyncio.to_thread(_patch_route_status, *key, {"status": {"scaling": entries}}):
                    w.scaling, w.at = entries, now
            want = ("True", *conflict) if conflict else ("False", "NoConflict", "no other owner of the scaled workloads' replicas")
            if w.conflict != want:
                if await self._set_conflict(key, want):
                    w.conflict = want

    async def _set_conflict(self, key: tuple[str, str], want: tuple[str, str, str]) -> bool:
        route = await asyncio.to_thread(_get_route, *key)
        if route is None:
            return False
        conditions = list((route.get("status") or {}).get("conditions") or [])
        current = next((c for c in conditions if c.get("type") == CONFLICT), None)
        if current is None and want[0] == "False":
            return True  # never had a conflict: nothing to say
        if current is not None and (current.get("status"), current.get("reason"), current.get("message")) == want:
            return True
        desired = set_condition(conditions, CONFLICT, *want, (route.get("metadata") or {}).get("generation"))
        ops = ([{"op": "test", "path": "/status/conditions", "value": conditions}] if conditions else [])
        ops.append({"op": "add", "path": "/status/conditions", "value": desired})
        if not await asyncio.to_thread(_patch_route_status, *key, ops, True):
            return False  # the reconcile wrote meanwhile: next tick
        if want[0] == "True":
            try:
                await asyncio.to_thread(_warn_route, route, CONFLICT, want[2])
            except Exception as exc:  # noqa: BLE001
                log.warning("cannot post the ScalingConflict event: %s", type(exc).__name__)
        return True

    def _period_for(self, namespace: str) -> PeriodFn:
        """Replica-hours are counted in the period of the namespace's first TokenBudget (so they stand
        next to its token cost), else per calendar month (UTC)."""
        entries = sorted((e for e in self.budgets() if e.namespace == namespace), key=lambda e: e.name)
        if entries:
            spec = entries[0].spec
            return lambda now: current_period(spec, now)
        return calendar_month


    def _cut_checker(self) -> Any:
        """use -> whether an exhausted onExceeded=CutOff budget of its namespace covers its route (the
        cut-off's own definition: controller/cutoff.budget_cut, render/cutoff.cut_routes)."""
        by_ns: dict[str, list[BudgetCut]] = {}
        for e in self.budgets():
            by_ns.setdefault(e.namespace, []).append(budget_cut(e))
        return lambda u: u.alias in cut_routes(by_ns.get(u.namespace, ()), [u.alias])[1]


    def owns(self, namespace: str, kind: str, name: str) -> bool:
        """Whether the scaler owns this workload's replica count (some allowed route backend has scaling
        settings for it): then the cut-off leaves it to the scaler, whose desired count is 0 while every
        route using it is cut off and follows demand again after the reset. One owner per workload
        (while an HPA or another writer has the count the scaler still holds it at 0 when cut off, and
        gives that owner its count back after the reset: scaling/owners.py)."""
        wk = WorkloadKey(kind, namespace, name)
        tr = self.tracked.get(wk)
        return governing(wk, self.uses.get(wk, []), tr.view.annotations if tr and tr.view else None) is not None


def foreign_message(wk: WorkloadKey, manager: str) -> str:
    """Stable for one writer (the condition and its one Event are not rewritten every tick)."""
    who = ("a writer the apiserver did not record (a scale-subresource write such as kubectl scale)"
           if manager == UNRECORDED else f"field manager {manager}")
    until = ("" if manager == UNRECORDED else f" until {manager} no longer owns spec.replicas (e.g. drop replicas from its manifest) or")
    return (f"{who} set the replicas of {wk} after spendwarden: the scaler leaves them alone except at 0 while cut off,"
            f"{until} the workload is annotated spendwarden.io/scaling=force")


def _material(entries: list[dict[str, Any]] | None) -> Any:
    """What makes a status write worth it at once: everything but the slowly growing hours and cost."""
    if entries is None:
        return None
    return [{k: v for k, v in e.items() if k not in ("replicaHours", "cost", "inFlight", "previous")} for e in entries]


# -- the ledger's endpoints ---------------------------------------------------------------------------

class ScalingEndpoints:
    """The scaler's side of the ledger's report and wake endpoints (ledger_service.ScalingPort), for
    whichever Scaler is running now (None before start and after stop)."""

    def __init__(self, running: Callable[[], Scaler | None]):
        self.running = running

    def report(self, proxy_id: str, namespace: str, raw: Any) -> dict[str, Any] | None:
        backends = parse_backends(raw)  # BackendsError: 400
        scaler = self.running()
        if scaler is None or not backends:
            return None
        return scaler.record(proxy_id, namespace, backends)

    async def wake(self, namespace: str, route: str, backend: str) -> dict[str, Any]:
        scaler = self.running()
        if scaler is None:
            raise WakeError(503, "the scaler is not running")
        return await scaler.wake(namespace, route, backend)
