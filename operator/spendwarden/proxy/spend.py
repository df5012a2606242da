"""The proxy side of spending less for the same result (issue #7), called from server.py:

    compile_route_spend  a route's tiers, judge, escalation, cache and loop breaker as runtime objects
    carry_over           keep caches, verdicts and loop counts across configuration reloads
    begin                per request: loop breaker (429 loop_detected), cache key
    cached_response      a cache hit, answered without an upstream call or a reservation
    choose_tier          complexity score (+ the judge near a boundary) -> the tier's backends
    escalation_cause     did the answer fail a check, so that it is retried once on the next tier?
    store                remember a deterministic answer

Routes without these fields compile to `spend = None`, and the request path then only tests that.
Prompts and answers never reach logs or metrics: keys are hashes, logs carry tiers, scores and causes.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from ..ledger.pricing import cost, format_money
from ..routing.apis import CHAT, EMBEDDINGS, OPERATION, RESPONSES
from ..routing.model import ANTHROPIC, BackendRt, RouteRt
from ..routing.spend import RouteSpend, TierRt, compile_route_spend
from ..spend import cache as cache_core
from ..spend import escalation as esc
from ..spend import judge as judge_core
from ..spend import scorer
from .errors import ProxyError
from .wire import BadUsage, believed, usage_from_body

log = logging.getLogger("spendwarden.proxy")

JUDGE_TIMEOUT = 10.0  # seconds; a slow judge falls back to the local score
MAX_VERDICTS = 10000
_REPLAY_HEADERS = ("x-spendwarden-route", "x-spendwarden-backend")


@dataclass(slots=True, eq=False)
class SpendReq:
    """Per request state (on RequestState.sp); survives the second pass of an escalation."""

    body: dict[str, Any]
    key: str | None = None
    cacheable: bool = False
    tier: int | None = None         # index into RouteSpend.tiers
    tier_name: str | None = None
    score: int | None = None
    judge_verdict: int | None = None
    escalated: tuple[str, str, str] | None = None  # (from tier, to tier, cause)
    first_backend: str | None = None
    first_cost: Decimal | None = None
    first_usage: Any = None  # TokenUsage of the first pass's answer (or its reservation), for the access log
    first_attempts: int = 0
    capture: bytearray | None = None  # the streamed bytes, for the cache
    cache: str | None = None          # "hit" | "stored" for the log
    saved: Decimal | None = None
    currency: str | None = None


def carry_over(old_routes: dict[str, RouteRt], new_routes: dict[str, RouteRt]) -> None:
    """A reload keeps cached answers, verdicts and loop counts of routes whose settings did not change."""
    for alias, new in new_routes.items():
        old = old_routes.get(alias)
        if new.spend is None or old is None or old.spend is None or old.name != new.name:
            continue
        if new.spend.cache_settings == old.spend.cache_settings:
            new.spend.cache = old.spend.cache
        if new.spend.loop_settings == old.spend.loop_settings:
            new.spend.loops = old.spend.loops
        new.spend.verdicts = old.spend.verdicts


# -- per request ----------------------------------------------------------------------------------

def begin(proxy: Any, route: RouteRt, api: str, alias: str, body: dict[str, Any], headers: Any) -> SpendReq:
    """Loop breaker and cache key. Raises ProxyError(429 loop_detected)."""
    rs = route.spend
    assert rs is not None
    sp = SpendReq(body=body)
    if rs.cache is not None and api == RESPONSES:
        # Never cached: an answer is a response object the provider stored under its own id (which
        # later calls retrieve, delete or continue); a replay would hand out another call's id.
        sp.cacheable = False
    elif rs.cache is not None and api != EMBEDDINGS:
        sp.cacheable = cache_core.cacheable(body, headers.get(cache_core.CACHE_HEADER))
    elif rs.cache is not None:
        sp.cacheable = cache_core.cache_mode(headers.get(cache_core.CACHE_HEADER)) is not False
    if rs.needs_key:
        sp.key = cache_core.request_key(api, alias, body)
    if rs.loops is not None and rs.loops.observe(sp.key or ""):
        ns = proxy.compiled.namespace
        proxy.metrics.loops_detected.labels(ns, route.name).inc()
        assert rs.loop_settings is not None  # set with rs.loops
        limit, window = rs.loop_settings
        if proxy.ledger is not None:  # the operator posts a LoopDetected Event on the route's budgets
            proxy.ledger.loops.add(route.name, route.alias, sp.key or "", limit, window)
        log.warning("route %s: loop detected (request %s… repeated more than %d times within %gs)",
                    route.name, (sp.key or "")[:12], limit, window)
        raise ProxyError(429, f"loop_detected: this exact request was sent more than {limit} times within "
                              f"{window:g}s from this pod; route {route.name!r} allows {limit} (spec.loopBreaker). "
                              f"An agent is probably repeating itself: change the request or wait {window:g}s.",
                         code="loop_detected", headers={"Retry-After": str(max(1, round(window)))},
                         extra={"type": "loop_detected"}, outcome="loop_detected")
    return sp


def cached_response(proxy: Any, ctx: Any, route: RouteRt, stream: bool) -> web.Response | None:
    rs = route.spend
    if rs is None or rs.cache is None or not ctx.sp.cacheable:
        return None
    ns = proxy.compiled.namespace
    hit = rs.cache.get(ctx.sp.key)
    if hit is None or hit.stream != stream:
        proxy.metrics.cache_lookups.labels(ns, route.name, "miss").inc()
        return None
    proxy.metrics.cache_lookups.labels(ns, route.name, "hit").inc()
    proxy.metrics.cache_savings.labels(ns, route.name, hit.currency).inc(float(hit.cost))
    sp = ctx.sp
    sp.cache, sp.saved, sp.currency = "hit", hit.cost, hit.currency
    ctx.backend = route.backends.get(hit.backend)
    ctx.status, ctx.outcome = hit.status, "cache_hit"
    headers = dict(hit.headers)
    headers["x-spendwarden-cache"] = "hit"
    return web.Response(status=hit.status, body=hit.body, headers=headers,
                        content_type="text/event-stream" if stream else "application/json")


def store(proxy: Any, ctx: Any, route: RouteRt, resp: web.StreamResponse) -> None:
    """Keep a complete, successful answer (called once the response is final)."""
    rs, sp = route.spend, ctx.sp
    if rs is None or rs.cache is None or not sp.cacheable or sp.cache == "hit" or ctx.status != 200 or ctx.error is not None \
            or ctx.backend is None or ctx.partial or not ctx.usage_known:
        return
    if ctx.stream:
        if not resp.prepared or sp.capture is None:
            return
        body = bytes(sp.capture)
    else:
        if resp.prepared or not isinstance(resp, web.Response) or not isinstance(resp.body, bytes):
            return
        body = resp.body
    total = (ctx.cost or Decimal(0)) + (sp.first_cost or Decimal(0))
    headers = tuple((k, resp.headers[k]) for k in _REPLAY_HEADERS if k in resp.headers)
    usage = ctx.usage
    answer = cache_core.CachedAnswer(body=body, stream=ctx.stream, status=200, headers=headers, cost=total,
                                     currency=ctx.backend.prices.currency, backend=ctx.backend.name,
                                     input_tokens=usage.input_tokens if usage else 0,
                                     output_tokens=usage.output_tokens if usage else 0)
    if rs.cache.put(sp.key, answer):
        sp.cache = "stored"
        proxy.metrics.cache_lookups.labels(proxy.compiled.namespace, route.name, "stored").inc()


def start_capture(ctx: Any, route: RouteRt) -> None:
    rs = route.spend
    if rs is not None and rs.cache is not None and ctx.sp.cacheable and ctx.stream:
        ctx.sp.capture = bytearray()


# -- tiers ----------------------------------------------------------------------------------------

async def choose_tier(proxy: Any, ctx: Any, route: RouteRt, api: str, est: int | None) -> list[BackendRt] | None:
    """The backends of the request's tier (None: the route has no tiers). On an escalation's second
    pass the tier is the next one."""
    rs, sp = route.spend, ctx.sp
    if rs is None or not rs.tiers or api in (EMBEDDINGS, RESPONSES):
        return None  # Responses: the scorer and the judge read chat messages; the default backend serves
    if sp.tier is None:
        s = scorer.score(sp.body)
        sp.score = s
        index = scorer.pick_tier(s, rs.min_scores)
        source = "score"
        if rs.judge is not None and scorer.near_threshold(s, rs.min_scores, rs.judge_band):
            verdict = await _judge(proxy, ctx, route, rs, est)
            if verdict is not None:
                sp.judge_verdict = verdict
                index = scorer.pick_tier(verdict, rs.min_scores)
                source = "judge"
        sp.tier, sp.tier_name = index, rs.tiers[index].name
        proxy.metrics.tier_selections.labels(proxy.compiled.namespace, route.name, rs.tiers[index].name, source).inc()
    return rs.tiers[sp.tier].backends


async def _judge(proxy: Any, ctx: Any, route: RouteRt, rs: RouteSpend, est: int | None) -> int | None:
    ns = proxy.compiled.namespace
    key = ctx.sp.key
    now = time.monotonic()
    got = rs.verdicts.get(key)
    if got is not None and got[0] > now:
        proxy.metrics.judge_calls.labels(ns, route.name, "cached").inc()
        return got[1]
    b = rs.judge
    assert b is not None
    req = judge_core.judge_request(ctx.sp.body, b.model)
    if b.fmt == ANTHROPIC:
        from .translate import chat_to_messages

        payload = orjson.dumps(chat_to_messages(req, b.model, judge_core.JUDGE_MAX_TOKENS, False))
    else:
        payload = orjson.dumps(req)
    prompt = min(est or 0, judge_core.QUESTION_CHARS // 2) + 80  # worst case of the judge's own prompt
    try:
        adm = proxy.book.admit(route, b, prompt, judge_core.JUDGE_MAX_TOKENS, 1, None)
    except ProxyError:
        proxy.metrics.judge_calls.labels(ns, route.name, "refused").inc()
        return None  # the budget cannot pay for the judge: the local score decides
    result, verdict, usage = "failed", None, None
    try:
        headers = {"Content-Type": "application/json", **b.headers}
        if b.fmt == ANTHROPIC:
            headers["anthropic-version"] = "2023-06-01"
        async with proxy.session.post(b.url("messages" if b.fmt == ANTHROPIC else CHAT), data=payload,
                                      headers=headers,
                                      timeout=aiohttp.ClientTimeout(total=min(b.timeout, JUDGE_TIMEOUT))) as resp:
            raw = await resp.read()
            if resp.status == 200:
                doc, usage = usage_from_body(b.fmt == ANTHROPIC, raw)
                verdict = judge_core.parse_verdict(_answer_text(doc, b.fmt == ANTHROPIC))
                result = "ok" if verdict is not None else "unparsed"
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError, TypeError, KeyError, AttributeError):
        pass
    if isinstance(usage, BadUsage):  # it answered, but its numbers cannot be right: the reservation
        proxy.book.settle(adm, b.prices, believed(usage, route.name, b.name))
    elif usage is not None:
        proxy.book.settle(adm, b.prices, usage)
        proxy.metrics.attempt(ns, "chat", b, route, usage, cost(b.prices, usage))
    else:
        proxy.book.release(adm)
    proxy.metrics.judge_calls.labels(ns, route.name, result).inc()
    if verdict is not None:
        rs.verdicts[key] = (now + rs.judge_ttl, verdict)
        if len(rs.verdicts) > MAX_VERDICTS:
            rs.verdicts.popitem(last=False)
    return verdict


def _answer_text(doc: Any, anthropic: bool) -> str | None:
    if not isinstance(doc, dict):
        return None
    if anthropic:
        blocks = doc.get("content") or []
        return next((x.get("text") for x in blocks if isinstance(x, dict) and x.get("type") == "text"), None)
    choices = doc.get("choices") or []
    msg = choices[0].get("message") if choices and isinstance(choices[0], dict) else None
    return msg.get("content") if isinstance(msg, dict) else None


# -- escalation -----------------------------------------------------------------------------------

def escalation_cause(ctx: Any, route: RouteRt | None, resp: web.StreamResponse | None,
                     exc: ProxyError | None) -> esc.Cause | None:
    """Why this (first-pass) result should be retried on the next tier, or None."""
    sp = ctx.sp
    if sp is None or route is None or route.spend is None or sp.tier is None or sp.escalated is not None:
        return None
    rs = route.spend
    if not rs.escalate_on or sp.tier + 1 >= len(rs.tiers) or ctx.downgraded:
        return None  # (a Downgrade budget would only send the retry to the cheap backend again)
    cause: esc.Cause | None = None
    if exc is not None:
        if exc.code in ("bad_gateway", "upstream_timeout"):
            cause = esc.Cause.UPSTREAM_ERROR
    elif resp is not None and not resp.prepared:  # a stream that has started is the client's now
        if resp.status != 200:
            cause = esc.upstream_status_cause(resp.status) if ctx.outcome == "upstream_error" else None
        elif not ctx.stream and isinstance(resp, web.Response) and isinstance(resp.body, bytes):
            try:
                doc = orjson.loads(resp.body)
            except orjson.JSONDecodeError:
                doc = None
            cause = esc.check_response(ctx.api, sp.body, doc)
    return cause if cause in rs.escalate_on else None


def begin_escalation(proxy: Any, ctx: Any, route: RouteRt, cause: esc.Cause) -> None:
    """Account for the first attempt and point the request at the next tier."""
    rs, sp = route.spend, ctx.sp
    assert rs is not None and sp.tier is not None
    ns = proxy.compiled.namespace
    first, nxt = rs.tiers[sp.tier], rs.tiers[sp.tier + 1]
    sp.escalated = (first.name, nxt.name, cause.value)
    sp.first_backend = ctx.backend.name if ctx.backend is not None else None
    sp.first_cost, sp.first_usage = ctx.cost, ctx.usage
    sp.first_attempts = ctx.attempts
    if ctx.backend is not None and ctx.usage is not None and ctx.cost is not None:
        proxy.metrics.attempt(ns, OPERATION[ctx.api], ctx.backend, route, ctx.usage, ctx.cost)
    proxy.metrics.escalations.labels(ns, route.name, first.name, nxt.name, cause.value).inc()
    sp.tier, sp.tier_name = sp.tier + 1, nxt.name
    # The second pass starts clean; the first attempt's cost is in sp.first_cost.
    ctx.backend, ctx.usage, ctx.cost, ctx.usage_known, ctx.partial = None, None, None, True, False
    ctx.output_seen = False
    ctx.status, ctx.outcome, ctx.error, ctx.ttft, ctx.translating = 0, "ok", None, None, False
    if sp.capture is not None:
        sp.capture = bytearray()


def log_fields(ctx: Any, line: dict[str, Any]) -> None:
    """The access log's issue #7 fields (no prompt, no answer)."""
    sp = ctx.sp
    if sp.tier_name is not None:
        line["tier"] = sp.tier_name
    if sp.score is not None:
        line["complexity_score"] = sp.score
    if sp.judge_verdict is not None:
        line["judge_score"] = sp.judge_verdict
    if sp.escalated is not None:
        line["escalated"] = {"from": sp.escalated[0], "to": sp.escalated[1], "cause": sp.escalated[2],
                             "first_backend": sp.first_backend}
        if sp.first_cost is not None:
            line["escalated"]["first_cost"] = format_money(sp.first_cost)
            line["cost"] = format_money(sp.first_cost + (ctx.cost or Decimal(0)))
        if sp.first_usage is not None:  # the line's tokens are the second pass's: with these, the budget's
            line["escalated"]["first_input_tokens"] = sp.first_usage.input_tokens
            line["escalated"]["first_output_tokens"] = sp.first_usage.output_tokens
        line["attempts"] = sp.first_attempts + ctx.attempts
    if sp.cache is not None:
        line["cache"] = sp.cache
    if sp.saved is not None:
        line["saved"] = format_money(sp.saved)
        line["currency"] = sp.currency


__all__ = ["TierRt", "RouteSpend", "SpendReq", "compile_route_spend", "carry_over", "begin", "cached_response",
           "store", "start_capture", "choose_tier", "escalation_cause", "begin_escalation", "log_fields"]
