"""Which workloads are scaled, by whose settings, on whose demand.

A workload (Deployment or StatefulSet) is scaled when some valid ModelRoute backend names it in
deploymentRef with `scaling`. Its settings come from a route in the workload's own namespace if
there is one, else from the first route by (namespace, name): one set of settings per workload, so
two teams cannot make the operator flap between theirs.

Routes of OTHER namespaces (a shared backend in an inference namespace) count only if the workload
allows them with the annotation spendwarden.io/scaling-shared-with ("*" or a comma-separated list of
namespaces): otherwise any team could scale another team's GPUs up.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from ..api.modelroute import BackendScaling, ModelRouteSpec
from .demand import BackendLoad
from .policy import Demand

SHARED_WITH_ANNOTATION = "spendwarden.io/scaling-shared-with"


@dataclass(frozen=True, slots=True, order=True)
class WorkloadKey:
    kind: str        # Deployment | StatefulSet
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Use:
    """One route backend that names the workload."""

    namespace: str
    route: str       # the ModelRoute's name
    alias: str       # its spec.model (what budgets' spec.routes name)
    backend: str
    scaling: BackendScaling | None
    currency: str

    @property
    def key(self) -> str:
        return f"{self.route}/{self.backend}"


def uses_by_workload(routes: Iterable[tuple[str, str, ModelRouteSpec]]) -> dict[WorkloadKey, list[Use]]:
    """(namespace, route name, valid spec) -> every workload named by a deploymentRef, with its uses."""
    out: dict[WorkloadKey, list[Use]] = {}
    for ns, name, spec in routes:
        for b in spec.backends:
            ref = b.deploymentRef
            if ref is None:
                continue
            key = WorkloadKey(ref.kind.value, ref.namespace or ns, ref.name)
            out.setdefault(key, []).append(Use(ns, name, spec.model, b.name, b.scaling, b.currency))
    for uses in out.values():
        uses.sort(key=lambda u: (u.namespace, u.route, u.backend))
    return out


def allowed(key: WorkloadKey, use: Use, annotations: Mapping[str, str] | None) -> bool:
    if use.namespace == key.namespace:
        return True
    value = (annotations or {}).get(SHARED_WITH_ANNOTATION, "")
    names = {n.strip() for n in value.split(",") if n.strip()}
    return "*" in names or use.namespace in names


def governing(key: WorkloadKey, uses: list[Use], annotations: Mapping[str, str] | None) -> Use | None:
    """The use whose scaling settings apply: own namespace first, then the first allowed one."""
    candidates = [u for u in uses if u.scaling is not None and allowed(key, u, annotations)]
    own = [u for u in candidates if u.namespace == key.namespace]
    return next(iter(own or candidates), None)


def demand(key: WorkloadKey, uses: list[Use], annotations: Mapping[str, str] | None,
           load: Mapping[tuple[str, str], BackendLoad], is_cut: Callable[[Use], bool]) -> tuple[Demand, int]:
    """The demand of the uses still allowed to spend (a route of a cut-off budget counts for nothing),
    and the longest queueing time among them. Cut off means: every allowed use is cut off."""
    payers = [u for u in uses if allowed(key, u, annotations)]
    cut = [is_cut(u) for u in payers]
    in_flight = queue = 0
    for u, u_cut in zip(payers, cut):
        bl = load.get((u.namespace, u.key))
        if bl is not None and not u_cut:
            in_flight += bl.in_flight
            queue = max(queue, bl.queue_ms)
    return Demand(in_flight=in_flight, cut_off=bool(payers) and all(cut)), queue
