"""Desired replicas of one scaled workload.

    raw      = ceil(in-flight / targetInFlightPerReplica) clamped to minReplicas..maxReplicas
    desired  = the highest raw recommendation within the scale-down stabilisation window

so replicas go up at once and down only once a lower count has been enough for the whole window
(the HorizontalPodAutoscaler's rule). Two cases skip the window: every namespace that pays for the
workload is cut off (0 at once: a cut-off team keeps no GPU warm), and no request for
`idleToZeroAfter` (0; the idle period is itself the stabilisation). With `idleToZeroAfter` set, that
is the only way to zero: until the idle period has passed the floor is one replica, whatever
minReplicas says (minReplicas 0 means "may reach zero", not "zero after the stabilisation window").
A wake request (a proxy holding a request for a workload at zero) counts as demand for one replica.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..api.common import parse_duration
from ..api.modelroute import BackendScaling

# A wake request counts as demand this long: until the proxies' next reports carry the held request.
WAKE_GRACE_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class Policy:
    min_replicas: int
    max_replicas: int
    target: int
    stabilization: float
    idle_to_zero: float | None

    @classmethod
    def from_spec(cls, s: BackendScaling) -> Policy:
        return cls(min_replicas=s.minReplicas, max_replicas=s.maxReplicas, target=s.targetInFlightPerReplica,
                   stabilization=parse_duration(s.scaleDownStabilization).total_seconds(),
                   idle_to_zero=parse_duration(s.idleToZeroAfter).total_seconds() if s.idleToZeroAfter else None)


@dataclass(frozen=True, slots=True)
class Demand:
    in_flight: int = 0          # summed over the proxies of namespaces that are not cut off
    cut_off: bool = False       # every namespace that uses the workload is cut off


@dataclass(frozen=True, slots=True)
class Decision:
    desired: int
    raw: int
    reason: str   # Demand | Wake | Stabilizing | Idle | CutOff


@dataclass(slots=True)
class ScaleState:
    """What one workload's decisions remember: recent recommendations, last activity, wake."""

    last_active: float
    recommendations: list[tuple[float, int]] = field(default_factory=list)
    wake_at: float | None = None
    cut_off: bool = False

    @classmethod
    def new(cls, now: float, replicas: int | None = None) -> ScaleState:
        # A fresh operator counts as activity: nothing goes idle-to-zero before a full idle period.
        # A workload it finds at zero is already idle: a restart must not wake every scaled-down model.
        return cls(last_active=float("-inf") if replicas == 0 else now)

    def wake(self, now: float) -> None:
        self.wake_at = now
        self.last_active = now


def raw_replicas(policy: Policy, in_flight: int) -> int:
    wanted = math.ceil(in_flight / policy.target) if in_flight > 0 else 0
    # Idle-to-zero owns the way down to zero; before it, an idle workload keeps one replica.
    floor = max(policy.min_replicas, 1) if policy.idle_to_zero is not None else policy.min_replicas
    return min(policy.max_replicas, max(floor, wanted))


def decide(state: ScaleState, policy: Policy, demand: Demand, now: float) -> Decision:
    if demand.cut_off:
        state.recommendations.clear()
        state.wake_at = None
        state.cut_off = True
        return Decision(0, 0, "CutOff")
    if state.cut_off:
        # Back at the reset (or a raised limit): a full idle period before idle-to-zero again.
        state.cut_off = False
        state.last_active = now
    waking = state.wake_at is not None and now - state.wake_at < WAKE_GRACE_SECONDS
    if not waking:
        state.wake_at = None
    if demand.in_flight > 0:
        state.last_active = now
    raw = raw_replicas(policy, demand.in_flight)
    if waking:
        raw = max(raw, 1)
    if (not waking and demand.in_flight == 0 and policy.idle_to_zero is not None
            and now - state.last_active >= policy.idle_to_zero):
        state.recommendations.clear()
        return Decision(0, 0, "Idle")
    recs = [(t, r) for t, r in state.recommendations if now - t < policy.stabilization]
    recs.append((now, raw))
    state.recommendations = recs
    desired = max(r for _, r in recs)
    reason = "Stabilizing" if desired > raw else "Wake" if waking and demand.in_flight == 0 else "Demand"
    return Decision(desired, raw, reason)
