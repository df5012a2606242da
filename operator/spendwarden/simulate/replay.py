"""Replaying traffic against one candidate policy, offline: what each request would have cost.

Per request, in time order, with the proxy's own code wherever the proxy decides:
    route       the candidate's route for the alias (candidates.Candidate.route_for)
    prompt      the proxy's tokenizer estimate (routing/tokens.py) of the batch body, or the access
                log's billed input tokens (its estimate when usage was not known)
    cache       for a route with a response cache: the proxy's request key and cacheability rule
                (spend.cache) and its TTL/size-bounded store on the log's clock; a hit costs nothing
    tier        for a route with tiers: the proxy's complexity score (spend.scorer) and pick_tier;
                otherwise the proxy's rule matching (routing.rules.select_backend)
    escalation  on a tier below the top, outcomes.py says whether the answer fails; a failed answer is
                built as the provider would send it and put through the proxy's checks
                (spend.escalation.check_response); when the route escalates that cause the request
                costs the failed attempt plus one attempt on the next tier
    price       ledger.pricing.cost with the backend's prices (Decimal)
    judge       near a tier boundary the judge's request (spend.judge) is priced on the judge backend,
                once per request key and verdict TTL; its verdict cannot be known offline, so the
                local score stands in for it
Not replayed: the loop breaker (a log does not say which pod sent what), fallbacks (they matter
only while a backend is down) and a budget's CutOff/Downgrade (budget.py says when they would
start). Nothing here reads a clock or the network; the tokenizer is the only thing loaded.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from ..api.modelroute import ModelRouteSpec
from ..api.proxyconfig import ProxyConfig, RouteEntry
from ..ledger.pricing import ZERO, TokenUsage, cost
from ..routing import tokens as tok
from ..routing.apis import CHAT, COMPLETIONS, EMBEDDINGS, MESSAGES, RESPONSES, capped_output, client_output_cap
from ..routing.model import RouteRt, compile_config
from ..routing.rules import TAG_HEADER, select_backend
from . import policy as pol
from .candidates import Candidate
from .outcomes import DEFAULT_OUTPUT_TOKENS, OK, REFUSAL_TOKENS, FailureModel, expected_output_tokens
from .traffic import Recorded, TrafficRequest

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Attempt:
    backend: str
    usage: TokenUsage
    cost: Decimal
    cause: str | None = None  # the escalation cause when this attempt's answer failed


@dataclass(frozen=True, slots=True)
class RequestResult:
    index: int
    ts: datetime
    scenario: str
    alias: str | None
    route: str | None  # alias of the candidate route that served it; None: no route
    cost: Decimal
    currency: str
    backend: str | None = None  # the backend whose answer the client got
    tier: int | None = None
    score: int | None = None
    attempts: tuple[Attempt, ...] = ()
    cache_hit: bool = False
    escalated: bool = False
    input_tokens: int = 0
    output_tokens: int = 0
    saved: Decimal = ZERO  # a cache hit: what the cached answer cost when it was made
    judge_cost: Decimal = ZERO  # the judge's call, when the score was near a tier boundary

    @property
    def escalation_cause(self) -> str | None:
        return self.attempts[0].cause if self.escalated else None


@dataclass(frozen=True, slots=True)
class Settings:
    """The assumptions where a log is silent (outcomes.py)."""

    output_tokens: int = DEFAULT_OUTPUT_TOKENS
    failures: FailureModel = field(default_factory=FailureModel)


# -- the prompt -----------------------------------------------------------------------------------

def prompt_tokens(api: str, body: dict[str, Any]) -> int:
    """The proxy's estimate of a request's prompt tokens (cl100k_base plus chat framing)."""
    texts, fixed = tok.request_texts(api, body)
    return tok.estimate(tok.load_encoder(), texts, fixed) if texts else fixed


# -- a failed answer, as the provider would send it -----------------------------------------------

def failed_answer(api: str, cause: str) -> dict[str, Any]:
    """A minimal response body (in the client's format) that fails in the way `cause` says."""
    text = {"refusal": "I'm sorry, but I can't help with that.", "invalid_json": "Sure! Here is the data: {name: x"}
    content = text.get(cause, "partial answer")
    if api == MESSAGES:
        return {"type": "message", "role": "assistant", "content": [{"type": "text", "text": content}],
                "stop_reason": "max_tokens" if cause == "length" else "end_turn"}
    finish = "length" if cause == "length" else "stop"
    if api == COMPLETIONS:
        return {"object": "text_completion", "choices": [{"index": 0, "text": content, "finish_reason": finish}]}
    return {"object": "chat.completion",
            "choices": [{"index": 0, "finish_reason": finish, "message": {"role": "assistant", "content": content}}]}


# -- one candidate ---------------------------------------------------------------------------------

class Replay:
    """Replays requests against one candidate. Call `run(requests)` once."""

    def __init__(self, candidate: Candidate, settings: Settings | None = None,
                 prompt_counter: Callable[[str, dict[str, Any]], int] = prompt_tokens):
        self.candidate = candidate
        self.settings = settings or Settings()
        self.count_prompt = prompt_counter
        cfg = ProxyConfig(namespace="simulate",
                          routes=[RouteEntry(name=spec.model, spec=spec) for spec in candidate.routes.values()])
        self._compiled = compile_config(cfg)  # no API keys: nothing is sent
        self._policies = {alias: pol.route_policy(self._compiled.routes[spec.model].spend)
                          for alias, spec in candidate.routes.items()}
        self._caches: dict[str, pol.AnswerCache] = {}
        self._verdicts: dict[str, dict[str, float]] = {}  # alias -> request key -> fresh until
        self.now = 0.0  # the log's clock, seconds since the epoch, for the cache's TTL

    def _route_rt(self, spec: ModelRouteSpec) -> RouteRt:
        return self._compiled.routes[spec.model]

    def run(self, requests: list[TrafficRequest], times: list[datetime]) -> list[RequestResult]:
        return [self.one(r, t) for r, t in zip(requests, times)]

    def one(self, req: TrafficRequest, ts: datetime) -> RequestResult:
        spec = self.candidate.route_for(req.alias)
        if spec is None:
            return RequestResult(index=req.index, ts=ts, scenario=req.scenario, alias=req.alias, route=None,
                                 cost=ZERO, currency="")
        self.now = (ts - EPOCH).total_seconds()
        route = self._route_rt(spec)
        policy = self._policies[spec.model]
        body = req.body
        rec = req.recorded
        currency = route.default.prices.currency
        # The prompt.
        if body is not None:
            n_in = self.count_prompt(req.api, body)
        else:
            n_in = rec.input_tokens if rec.input_tokens is not None else (rec.est_prompt_tokens or 0)
        # The cache.
        cache = None
        key = None
        if body is None and rec.cache_hit:
            # A logged hit has no key to replay: it stays a hit for a candidate with a cache, and
            # costs what the cached answer had cost for one without.
            saved = rec.saved if rec.saved is not None else ZERO
            hit = policy.cache is not None
            return RequestResult(index=req.index, ts=ts, scenario=req.scenario, alias=req.alias, route=spec.model,
                                 cost=ZERO if hit else saved, currency=currency, backend=rec.backend,
                                 cache_hit=hit, saved=saved if hit else ZERO)
        # As the proxy (proxy/spend.py): no cache and no tiers for embeddings, nor for the Responses API.
        untiered = req.api in (EMBEDDINGS, RESPONSES)
        if policy.cache is not None and not untiered:
            key = pol.cache_key(req, spec.model)
            if key is not None:
                cache = self._caches.get(spec.model)
                if cache is None:
                    cache = self._caches[spec.model] = pol.AnswerCache(policy.cache, lambda: self.now)
                cached = cache.get(key)
                if cached is not None:
                    return RequestResult(index=req.index, ts=ts, scenario=req.scenario, alias=req.alias,
                                         route=spec.model, cost=ZERO, currency=currency, backend=cached[0],
                                         cache_hit=True, saved=cached[1])
        # The rule, else the tier, and the answer's length.
        score = None
        tier = None
        judge_cost = ZERO
        tiers = policy.tiers
        headers = {TAG_HEADER: ",".join(f"{k}={v}" for k, v in req.tags.items())} if req.tags else {}
        tools = bool(body.get("tools") or body.get("functions")) if body is not None else False
        if body is None and rec.backend in route.backends and not (tiers and rec.score is not None):
            # No prompt to match rules against or score: keep what served it.
            backend = route.backends[rec.backend]
        else:
            backend, rule = select_backend(route, headers, n_in, tools)
            if tiers and rule == "default" and not untiered:
                score = pol.score(req)
                if score is not None:
                    tier = pol.pick(score, tiers)
                    if policy.judge is not None and pol.near_threshold(score, tiers, policy.judge.band):
                        judge_cost = self._judge(req, spec.model, route, policy.judge)
                else:  # an access-log line without a logged score: the tier it was served by
                    tier = next((i for i, t in enumerate(tiers) if t.name == rec.tier or t.backend == rec.backend), 0)
                backend = route.backends[tiers[tier].backend]
        cap = capped_output(client_output_cap(req.api, body) if body is not None else rec.max_output_tokens,
                            route.max_tokens_cap)
        n_out = expected_output_tokens(rec.output_tokens, cap, self.settings.output_tokens,
                                       embeddings=req.api == EMBEDDINGS)
        logged = rec if body is None else Recorded()  # the prompt cache as logged; a batch body has none
        attempts: list[Attempt] = []
        escalated = False
        if tiers and tier is not None and tier + 1 < len(tiers) and not untiered:
            cause = self._outcome(req, backend.model, score, tier, tiers, cap is not None)
            if cause != OK and policy.escalates(req, cause, failed_answer(req.api, cause)):
                attempts.append(self._failed_attempt(backend, cause, n_in, n_out, cap))
                escalated = True
                tier += 1
                backend = route.backends[tiers[tier].backend]
        usage = TokenUsage(input_tokens=n_in, output_tokens=n_out, cached_input_tokens=logged.cached_input_tokens or 0,
                           cache_write_tokens=logged.cache_write_tokens or 0,
                           cache_write_1h_tokens=logged.cache_write_1h_tokens or 0)
        attempts.append(Attempt(backend=backend.name, usage=usage, cost=cost(backend.prices, usage)))
        total = sum((a.cost for a in attempts), judge_cost)
        if cache is not None and key is not None:
            # A hit saves what the answer cost, the failed attempt of an escalation included.
            cache.put(key, backend.name, total - judge_cost, n_in, n_out)
        return RequestResult(index=req.index, ts=ts, scenario=req.scenario, alias=req.alias, route=spec.model,
                             cost=total, currency=currency, backend=backend.name, tier=tier, score=score,
                             attempts=tuple(attempts), escalated=escalated, judge_cost=judge_cost,
                             input_tokens=sum(a.usage.input_tokens for a in attempts),
                             output_tokens=sum(a.usage.output_tokens for a in attempts))

    def _outcome(self, req: TrafficRequest, model: str, score: int | None, tier: int,
                 tiers: list[pol.Tier], capped: bool) -> str:
        rec = req.recorded
        if req.body is not None and rec.outcome is not None:
            return rec.outcome
        here = (tiers[tier].name, tiers[tier].backend)
        if rec.escalated_from in here and rec.escalation_cause:
            return rec.escalation_cause
        if req.body is None and (rec.tier in here or rec.backend in here) and rec.status is not None \
                and rec.status < 400:
            return OK  # the tier (or backend) whose answer the client got
        band = (tiers[tier].min_score, tiers[tier + 1].min_score)
        rid = req.request_id or str(req.index)
        return self.settings.failures.outcome(rid, model, score, band, capped,
                                              pol.wants_json(req.body) if req.body is not None else False)

    def _judge(self, req: TrafficRequest, alias: str, route: RouteRt, judge: pol.JudgeSettings) -> Decimal:
        """The judge's cost for this request: nothing while a verdict for the same request is fresh.
        Its verdict cannot be known offline; the local score stands in for it."""
        key = pol.request_key(req, alias)
        verdicts = self._verdicts.setdefault(alias, {})
        fresh = verdicts.get(key) if key is not None else None
        if fresh is not None and self.now < fresh:
            return ZERO
        backend = route.backends[judge.backend]
        body = pol.judge_body(req, backend.model)
        if body is None:
            return ZERO
        if key is not None:
            verdicts[key] = self.now + judge.verdict_ttl
        usage = TokenUsage(input_tokens=self.count_prompt(CHAT, body), output_tokens=pol.JUDGE_OUTPUT_TOKENS)
        return cost(backend.prices, usage)

    @staticmethod
    def _failed_attempt(backend: Any, cause: str, n_in: int, n_out: int, cap: int | None) -> Attempt:
        if cause == "upstream_error":
            usage = TokenUsage()  # an error is not billed
        elif cause == "length":
            usage = TokenUsage(input_tokens=n_in, output_tokens=cap if cap is not None else n_out)
        elif cause == "refusal":
            usage = TokenUsage(input_tokens=n_in, output_tokens=min(REFUSAL_TOKENS, n_out))
        else:
            usage = TokenUsage(input_tokens=n_in, output_tokens=n_out)
        return Attempt(backend=backend.name, usage=usage, cost=cost(backend.prices, usage), cause=cause)


def arrival_times(requests: list[TrafficRequest], start: datetime, per_day: int | None) -> list[datetime]:
    """Each request's time: its own, else spread evenly from `start` at `per_day` requests a day
    (default: the untimed requests make one day)."""
    untimed = sum(1 for r in requests if r.ts is None)
    rate = per_day or max(untimed, 1)
    step = timedelta(seconds=86400 / rate)
    out: list[datetime] = []
    k = 0
    for r in requests:
        if r.ts is not None:
            out.append(r.ts)
        else:
            out.append(start + k * step)
            k += 1
    return out


__all__ = ["Attempt", "RequestResult", "Settings", "Replay", "arrival_times", "prompt_tokens", "failed_answer"]
