"""A candidate route's spend policy (tiers, escalation, response cache), as the proxy compiles it
from the ModelRoute spec (routing.spend), and the proxy's own decisions on it (spend.scorer, spend.escalation, spend.cache): the one
place where the simulator meets those cores, so it decides exactly as the proxy does.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ..routing.spend import RouteSpend
from ..spend import cache as spend_cache
from ..spend import escalation, judge, scorer
from .traffic import TrafficRequest

# The cache bounds bytes: an answer is about 4 bytes per output token plus its JSON envelope.
BYTES_PER_TOKEN = 4
ENVELOPE_BYTES = 300


@dataclass(frozen=True, slots=True)
class Tier:
    name: str
    backend: str  # the tier's first backend (the others are its fallbacks)
    min_score: int


@dataclass(frozen=True, slots=True)
class CacheSettings:
    ttl_seconds: float
    max_entries: int
    max_bytes: int


@dataclass(frozen=True, slots=True)
class JudgeSettings:
    backend: str
    band: int
    verdict_ttl: float


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    tiers: list[Tier]  # cheapest first; empty: the route's rules decide
    escalate_on: frozenset[str]  # causes that escalate (empty: no escalation)
    cache: CacheSettings | None
    judge: JudgeSettings | None = None

    def escalates(self, req: TrafficRequest, cause: str, answer: dict[str, Any]) -> bool:
        """Whether the proxy would retry an answer that failed with `cause` on the next tier."""
        if cause not in self.escalate_on:
            return False
        if req.body is None:
            return True  # an access-log line: the proxy recorded the cause after its own checks
        if cause == escalation.Cause.UPSTREAM_ERROR.value:
            found = escalation.upstream_status_cause(502)
        else:
            found = escalation.check_response(req.api, req.body, answer)
        return found is not None and found.value == cause


def route_policy(compiled: RouteSpend | None) -> RoutePolicy:
    """A route's spend policy as the proxy compiled it (routing.spend.compile_route_spend: escalation
    is on with every cause once there are two tiers, the cache is off unless set), in the simulator's
    terms: backends by name, causes as strings."""
    if compiled is None:
        return RoutePolicy(tiers=[], escalate_on=frozenset(), cache=None)
    tiers = [Tier(name=t.name, backend=t.backends[0].name, min_score=t.min_score) for t in compiled.tiers]
    cache = None
    if compiled.cache_settings is not None:
        ttl, max_entries, max_bytes = compiled.cache_settings
        cache = CacheSettings(ttl_seconds=ttl, max_entries=max_entries, max_bytes=max_bytes)
    judge = None
    if compiled.judge is not None and len(tiers) > 1:  # one tier has no boundary to judge near
        judge = JudgeSettings(backend=compiled.judge.name, band=compiled.judge_band, verdict_ttl=compiled.judge_ttl)
    return RoutePolicy(tiers=tiers, escalate_on=frozenset(c.value for c in compiled.escalate_on), cache=cache,
                       judge=judge)


def score(req: TrafficRequest) -> int | None:
    """The proxy's complexity score of the request (or the one it logged); None when unknown."""
    if req.body is not None and req.api != "embeddings":
        return scorer.score(req.body)
    if req.recorded.score is not None:
        return int(round(req.recorded.score))
    return None


def pick(score_: int, tiers: list[Tier]) -> int:
    return scorer.pick_tier(score_, [t.min_score for t in tiers])


def near_threshold(score_: int, tiers: list[Tier], band: int) -> bool:
    return scorer.near_threshold(score_, [t.min_score for t in tiers], band)


def judge_body(req: TrafficRequest, model: str) -> dict[str, Any] | None:
    """The request the proxy sends its judge (None: nothing to judge, e.g. an access-log line)."""
    return judge.judge_request(req.body, model) if req.body is not None else None


JUDGE_OUTPUT_TOKENS = judge.JUDGE_MAX_TOKENS


def wants_json(body: dict[str, Any]) -> bool:
    return escalation.wants_json(body)


def request_key(req: TrafficRequest, alias: str) -> str | None:
    """The proxy's normalised request key (or the one it logged); None when unknown."""
    if req.body is None:
        return req.recorded.cache_key
    return spend_cache.request_key(req.api, alias, req.body)


def cache_key(req: TrafficRequest, alias: str) -> str | None:
    """The proxy's cache key when the request is cacheable; None otherwise."""
    if req.body is not None and not spend_cache.cacheable(req.body, None):
        return None
    return request_key(req, alias)


class AnswerCache:
    """The proxy's response cache on the log's clock, holding only what an answer cost."""

    def __init__(self, settings: CacheSettings, clock: Callable[[], float]):
        self._cache = spend_cache.ResponseCache(settings.ttl_seconds, settings.max_entries, settings.max_bytes,
                                                clock=clock)

    def get(self, key: str) -> tuple[str, Decimal] | None:
        """(backend, what its answer cost) of a cached answer, or None on a miss."""
        answer = self._cache.get(key)
        return (answer.backend, answer.cost) if answer is not None else None

    def put(self, key: str, backend: str, cost: Decimal, input_tokens: int, output_tokens: int) -> None:
        size = max(output_tokens * BYTES_PER_TOKEN + ENVELOPE_BYTES - 256, 0)  # CachedAnswer adds 256
        self._cache.put(key, spend_cache.CachedAnswer(body=b"\0" * size, stream=False, status=200, headers=(),
                                                      cost=cost, currency="", backend=backend,
                                                      input_tokens=input_tokens, output_tokens=output_tokens))
