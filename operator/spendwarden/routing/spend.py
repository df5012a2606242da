"""A route's spend policy (issue #7: tiers, judge, escalation, response cache, loop breaker)
compiled from its ModelRoute spec, once, for the proxy (which keeps its stores) and the offline
simulator (which reads its settings). Routes without these fields compile to None.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..plainconfig import parse_duration
from ..spend import cache as cache_core
from ..spend import escalation as esc
from ..spend.loop import LoopDetector

if TYPE_CHECKING:
    from .model import BackendRt


@dataclass(slots=True, eq=False)
class TierRt:
    name: str
    backends: list[BackendRt]
    min_score: int


@dataclass(slots=True, eq=False)
class RouteSpend:
    """A route's issue #7 settings, compiled; the stores live as long as their settings do."""

    tiers: list[TierRt]
    min_scores: list[int]
    judge: BackendRt | None
    judge_band: int
    judge_ttl: float
    escalate_on: frozenset[esc.Cause]  # empty: escalation off
    cache: cache_core.ResponseCache | None
    cache_settings: tuple[float, int, int] | None  # (ttl seconds, maxEntries, maxBytes)
    loops: LoopDetector | None
    loop_settings: tuple[int, float] | None  # (maxRepeats, window seconds)
    verdicts: OrderedDict[str, tuple[float, int]] = field(default_factory=OrderedDict)

    @property
    def needs_key(self) -> bool:
        return self.cache is not None or self.loops is not None or self.judge is not None


def compile_route_spend(spec: Any, backends: dict[str, BackendRt]) -> RouteSpend | None:
    if not (spec.tiers or spec.cache or spec.loopBreaker):
        return None
    tiers = [TierRt(t.name, [backends[b] for b in t.backends], t.minScore) for t in spec.tiers]
    escalate_on: frozenset[esc.Cause] = frozenset()
    if len(tiers) > 1:
        e = spec.escalation
        if e is None:
            escalate_on = esc.ALL_CAUSES
        elif e.enabled:
            escalate_on = frozenset(esc.Cause(c) for c in e.causes)
    cache: cache_core.ResponseCache | None = None
    cache_settings: tuple[float, int, int] | None = None
    if spec.cache is not None:
        c = spec.cache
        cache_settings = (parse_duration(c.ttl).total_seconds(), c.maxEntries, c.maxBytes)
        cache = cache_core.ResponseCache(*cache_settings)
    loops: LoopDetector | None = None
    loop_settings: tuple[int, float] | None = None
    if spec.loopBreaker is not None:
        loop_settings = (spec.loopBreaker.maxRepeats, parse_duration(spec.loopBreaker.window).total_seconds())
        loops = LoopDetector(*loop_settings)
    j = spec.judge
    return RouteSpend(tiers=tiers, min_scores=[t.min_score for t in tiers],
                      judge=backends[j.backend] if j else None, judge_band=j.band if j else 0,
                      judge_ttl=parse_duration(j.verdictTTL).total_seconds() if j else 0.0,
                      escalate_on=escalate_on, cache=cache, cache_settings=cache_settings,
                      loops=loops, loop_settings=loop_settings)


__all__ = ["TierRt", "RouteSpend", "compile_route_spend"]
