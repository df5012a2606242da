"""The proxy server: aiohttp in, aiohttp (keep-alive pool) out. This module holds the app and the
request pipeline; the endpoints that call no backend are in endpoints.py, and each later stage has its own module (reload.py, upstream.py, relay.py,
access_log.py; request.py the state a request carries through them).

Per request: read and check the body by hand -> look up the alias -> estimate the prompt (only if
a rule, cap or budget needs it) -> pick a backend -> reserve the worst case (synchronously) ->
forward -> relay (streams event by event) -> settle the provider's usage -> metrics + one access
log line. Fallbacks are tried only while nothing has been sent to the client.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from ..enums import Provider
from ..ledger.breakdown import tag_of
from ..routing.apis import CHAT, COMPLETIONS, EMBEDDINGS, MESSAGES, RESPONSES, capped_output
from ..routing.rules import TAG_HEADER, select_backend
from ..wire.responses import untranslatable
from . import spend
from .access_log import AccessLog
from .backend_load import BackendLoads, accepts_connections
from .budgets import BudgetBook, LeaseShort
from .calibration import PromptCalibration
from .config import (
    ANTHROPIC,
    OPENAI,
    BackendRt,
    RouteRt,
    read_secret,
)
from .endpoints import SmallEndpoints
from .errors import ProxyError, error_body, refusal
from .estimate import reserved_prompt
from .limits import (
    DEFAULT_BODY_MEMORY,
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_MAX_ANSWER,
    BodyMemory,
    read_body,
)
from .metrics import Metrics
from .relay import StreamRelay
from .request import AttemptFailed, RequestState
from .responses import (
    ResponsesEndpoints,
    conversation_backends,
    conversation_bound,
    unknown_conversation,
    unpriced_tools,
    wrong_format,
)
from .translate import (
    chat_to_messages,
    messages_to_chat,
    responses_to_messages,
    structured,
)
from .wire import (
    bad,
    check_request,
)

log = logging.getLogger("spendwarden.proxy")
OPENAI_COMPATIBLE = Provider.OPENAI_COMPATIBLE.value

# The metered endpoints: (path, API, the client's wire format). The gateway serves the same.
SERVED = (("/v1/chat/completions", CHAT, OPENAI), ("/v1/completions", COMPLETIONS, OPENAI),
          ("/v1/embeddings", EMBEDDINGS, OPENAI), ("/v1/messages", MESSAGES, ANTHROPIC),
          ("/v1/responses", RESPONSES, OPENAI))
DEFAULT_MAX_TOKENS = 4096  # sent when the client gave none and a budget needs a worst case
DEFAULT_MAX_BODY = 8 * 1024 * 1024
MAX_TAGS = 8
_TAG_KEY = re.compile(r"^[A-Za-z0-9_.\-]{1,32}$")


def parse_tags(value: str | None) -> dict[str, str] | None:
    """`scenario=ticket,team=x` -> dict; bounded (8 tags, short keys/values); junk is dropped."""
    if not value:
        return None
    tags: dict[str, str] = {}
    for part in value.split(",")[: MAX_TAGS * 2]:
        key, sep, val = part.partition("=")
        key, val = key.strip(), val.strip()
        if sep and _TAG_KEY.match(key) and len(val) <= 64 and val.isprintable():
            tags[key] = val
            if len(tags) >= MAX_TAGS:
                break
    return tags or None


class Proxy(SmallEndpoints, ResponsesEndpoints, StreamRelay, AccessLog):
    """The request pipeline (serve, _serve: alias, estimate, backend choice, reservation, fallbacks)
    and the app; the other stages are the mixins: reload.py, upstream.py, relay.py, access_log.py."""

    def __init__(self, config_path: str, namespace: str | None = None, state_file: str | None = None,
                 max_body: int = DEFAULT_MAX_BODY, access_log: Any = None, poll_interval: float = 1.0,
                 default_max_tokens: int = DEFAULT_MAX_TOKENS, body_timeout: float = DEFAULT_BODY_TIMEOUT,
                 body_memory: int = DEFAULT_BODY_MEMORY, max_answer: int = DEFAULT_MAX_ANSWER,
                 shared: Shared | None = None):
        self.config_path = config_path
        self.max_answer = max_answer
        self.body_timeout = body_timeout
        # A gateway serves many namespaces, one Proxy each: they share its memory pool, metrics,
        # upstream connections and access log, and read API keys from its per-tenant files.
        self.shared = shared
        self.bodies = shared.bodies if shared is not None else BodyMemory(body_memory)
        self.secret_reader = shared.secret_reader if shared is not None else read_secret
        self.default_max_tokens = default_max_tokens
        self.namespace_arg = namespace
        self.max_body = max_body
        self.poll_interval = poll_interval
        self.book = BudgetBook(state_file)
        self.metrics = shared.metrics if shared is not None else Metrics()
        self.compiled = None
        self.session = None
        self._fingerprint = None
        self._timeouts = {}
        self._encoder_future = None
        self._out = access_log if access_log is not None else shared.access_log if shared is not None \
            else sys.stdout.buffer
        self._tasks = []
        self.ledger = None
        self.loads = BackendLoads()
        self.calibration = PromptCalibration()
        self.waker = None
        self._started = False
        self.load(initial=True)

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self, app: web.Application | None = None) -> None:
        self.session = self.shared.session if self.shared is not None else upstream_session()
        self._budget_gauges()
        self._tasks.append(asyncio.create_task(self._poll()))
        self._started = True
        if self.ledger is not None:
            self.ledger.start()

    async def stop(self, app: web.Application | None = None) -> None:
        for t in self._tasks:
            t.cancel()
        if self.session is not None and self.shared is None:
            await self.session.close()
        self.book.shutdown()
        if self.ledger is not None:
            await self.ledger.close(final=True)
        if self.waker is not None:
            await self.waker.close()
        try:
            self._out.flush()
        except (OSError, ValueError):
            pass

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body, handler_args={"max_field_size": 16384})
        r = app.router
        for path, api, fmt in SERVED:
            r.add_post(path, functools.partial(self.serve, api=api, fmt=fmt))
        r.add_get("/v1/models", self.models)
        r.add_get("/v1/models/{model}", self.model)
        r.add_post("/v1/messages/count_tokens", self.count_tokens)
        for method, path, handler in self.response_routes():
            r.add_route(method, path, handler)
        r.add_get("/healthz", self.health)
        r.add_route("*", "/{tail:.*}", self.not_found)
        app.on_startup.append(self.start)
        app.on_cleanup.append(self.stop)
        return app

    def metrics_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics_handler)
        app.router.add_get("/healthz", self.health)
        return app


    # -- handlers -----------------------------------------------------------------------------------

    async def serve(self, request: web.Request, api: str, fmt: str,
                    serviceaccount: str | None = None) -> web.StreamResponse:
        """`serviceaccount`: the caller the gateway authenticated (None in a sidecar)."""
        ctx = RequestState(api=api, fmt=fmt, t0=time.perf_counter(), serviceaccount=serviceaccount)
        hold = self.bodies.hold()
        try:
            ctx.raw = await read_body(request, self.max_body, self.body_timeout, hold)
            resp = await self._serve_escalating(request, ctx)
        except ProxyError as exc:
            ctx.status, ctx.outcome, ctx.error = exc.status, exc.outcome, exc.message
            resp = refusal(fmt, exc)
        except Exception as exc:  # a bug: answer 500 in the provider's shape, stay up
            log.exception("internal error")
            ctx.status, ctx.outcome, ctx.error = 500, "upstream_error", f"internal error: {type(exc).__name__}"
            resp = web.Response(status=500, content_type="application/json",
                                body=error_body(fmt, 500, "internal proxy error"))
        finally:
            hold.release()
            self._count_in_flight(ctx, None)
        self._record(ctx)
        return resp

    async def _serve_escalating(self, request: web.Request, ctx: RequestState) -> web.StreamResponse:
        """One pass; for a route with tiers, a second one on the next tier when the first answer failed
        a check (spend.py); then the response cache keeps a deterministic answer."""
        try:
            resp: web.StreamResponse | None = await self._serve(request, ctx)
            failure = None
        except ProxyError as exc:
            if ctx.sp is None:
                raise
            resp, failure = None, exc
        if ctx.sp is None:
            return resp  # type: ignore[return-value]
        assert self.compiled is not None
        route = self.compiled.routes.get(ctx.alias or "")
        cause = spend.escalation_cause(ctx, route, resp, failure)
        if cause is not None:
            assert route is not None
            log.info("route %s: escalating to the next tier (%s)", route.name, cause.value)
            spend.begin_escalation(self, ctx, route, cause)
            resp = await self._serve(request, ctx)
            failure = None
            if ctx.outcome in ("ok", "fallback"):
                ctx.outcome = "escalated"
        if failure is not None:
            raise failure
        assert resp is not None
        if route is not None:
            spend.store(self, ctx, route, resp)
        return resp


    async def _serve(self, request: web.Request, ctx: RequestState) -> web.StreamResponse:
        api, fmt = ctx.api, ctx.fmt
        cfg = self.compiled
        assert cfg is not None
        try:
            body = orjson.loads(ctx.raw)
        except orjson.JSONDecodeError as exc:
            raise bad(f"malformed JSON in request body: {exc}", None, "invalid_json") from None
        alias, stream, client_out, choices, tools = check_request(api, body)
        ctx.alias, ctx.stream = alias, stream
        ctx.tags = parse_tags(request.headers.get(TAG_HEADER))
        route = cfg.routes.get(alias)
        if route is None:
            known = ", ".join(sorted(cfg.routes)) or "none"
            raise ProxyError(404, f"The model '{alias}' does not exist in namespace {cfg.namespace} "
                                  f"(known aliases: {known})", code="model_not_found", param="model")
        ctx.route = route.name
        ctx.budgets = [b.name for b in route.budgets]
        if route.spend is not None:
            if ctx.sp is None:  # not on an escalation's second pass
                ctx.sp = spend.begin(self, route, api, alias, body, request.headers)  # may refuse: a loop
                hit = spend.cached_response(self, ctx, route, stream)
                if hit is not None:
                    return hit
            else:
                ctx.sp.body = body
        est = await self._estimate(api, body) if route.needs_estimate else None
        ctx.est = est
        if est is not None and route.max_prompt_tokens is not None and est > route.max_prompt_tokens:
            raise bad(f"the prompt has about {est} tokens, more than this route's maxPromptTokens "
                      f"({route.max_prompt_tokens})", "messages", "prompt_too_long")
        selected, _rule = select_backend(route, request.headers, est, tools)
        tier = await spend.choose_tier(self, ctx, route, api, est) if route.spend is not None and _rule == "default" \
            else None
        if tier:
            selected = tier[0]
        candidates = (tier or [selected]) + [b for b in route.fallbacks if b not in (tier or [selected])]
        # Chat requests cross formats (OpenAI chat <-> Anthropic messages), Responses requests when they
        # are text only (wire/responses.py); completions/embeddings do not.
        refused = untranslatable(body) if api == RESPONSES else None
        crosses = api in (CHAT, MESSAGES) or (api == RESPONSES and refused is None)

        def compatible(b: BackendRt) -> bool:
            return b.fmt == fmt or crosses

        usable = [b for b in candidates if compatible(b)]
        if not usable and api == RESPONSES:
            raise wrong_format(route, selected, refused)
        if not usable:
            got = "Anthropic Messages" if fmt == ANTHROPIC else f"OpenAI /v1/{api}"
            raise bad(f"route {route.name!r} (model {alias!r}) sends this request to backend {selected.name!r}, "
                      f"which speaks the {selected.provider} API, but the request uses the {got} API; "
                      f"only chat requests are translated between formats: call the "
                      f"{'/v1/messages' if selected.fmt == ANTHROPIC else '/v1/chat/completions'} endpoint instead",
                      "model", "format_mismatch")
        if est is not None:
            fitting = [b for b in usable if b.max_context is None or est <= b.max_context]
            if not fitting:
                raise bad(f"the prompt has about {est} tokens, more than the context window of every backend "
                          f"of route {route.name!r}", "messages", "context_length_exceeded")
            usable = fitting
        if api == RESPONSES and route.budgets:
            unpriced_tools(route, body)
        conversation = api == RESPONSES and unknown_conversation(body) and bool(route.budgets)
        if conversation:  # previous_response_id: the prompt's bound is the backend's context window
            usable = conversation_backends(route, usable)
        # The output cap to send upstream.
        want: int | None
        if api == EMBEDDINGS:
            want = 0 if route.budgets else None
        else:
            want = capped_output(client_out, route.max_tokens_cap)
            if want is None and (route.budgets or api == MESSAGES):
                want = self.default_max_tokens
        downgrade_to = route.downgrade if compatible(route.downgrade) else \
            min((b for b in route.backends.values() if compatible(b)), key=lambda b: (b.prices.output, b.prices.input))
        client_usage = False
        if stream and api != MESSAGES:
            so = body.get("stream_options")
            client_usage = isinstance(so, dict) and so.get("include_usage") is True

        reserve_in = reserved_prompt(est) if est is not None else 0
        if conversation:
            reserve_in = ctx.prompt_bound = conversation_bound(usable, downgrade_to)
        if ctx.sp is not None:
            spend.start_capture(ctx, route)
        last: AttemptFailed | None = None
        tag = tag_of(ctx.tags)
        rewoken: set[str] = set()
        i = -1
        while i + 1 < len(usable):
            i += 1
            backend = usable[i]
            self._count_in_flight(ctx, backend)
            if backend.wake is not None and self.loads.at_zero(backend.load_key) \
                    and not await self._replica_ready(ctx, route, backend, i + 1 < len(usable)):
                continue  # Fallback: the next backend serves while this one wakes
            # An OpenAI-compatible backend's tokenizer is unknown: its reservation follows what it bills.
            prompt_in = self.calibration.scaled((route.name, backend.name), reserve_in) \
                if backend.provider == OPENAI_COMPATIBLE and not conversation else reserve_in
            try:  # may raise 429 (503: a Closed budget without a lease)
                adm = self.book.admit(route, backend, prompt_in, want, choices, downgrade_to,
                                      may_wait=self.ledger is not None)
            except LeaseShort as short:
                # Ledger mode, the lease is too small: ask for more, then decide on what was granted.
                assert self.ledger is not None
                await self.ledger.wait_for_lease(short)
                adm = self.book.admit(route, backend, prompt_in, want, choices, downgrade_to)
            backend = adm.backend
            adm.tag = tag
            adm.workload = ctx.serviceaccount or ""
            ctx.backend, ctx.attempts = backend, i + 1
            ctx.downgraded, ctx.over_budget = adm.downgraded, adm.over_budget
            out = adm.max_output if adm.max_output is not None else want
            ctx.max_output = out
            ctx.translating = backend.fmt != fmt
            ctx.upstream_api = CHAT if ctx.translating and backend.fmt == OPENAI else api
            try:
                if ctx.translating and api == RESPONSES:
                    payload = orjson.dumps(responses_to_messages(body, backend.model, out or self.default_max_tokens,
                                                                 stream))
                elif ctx.translating and backend.fmt == ANTHROPIC:
                    payload = orjson.dumps(chat_to_messages(body, backend.model, out or self.default_max_tokens,
                                                            stream))
                    ctx.structured = structured(body)  # valid: chat_to_messages checked it
                elif ctx.translating:
                    payload = orjson.dumps(messages_to_chat(body, backend.model, out or self.default_max_tokens,
                                                            stream, backend.provider == "OpenAI"))
                else:
                    payload = self._payload(body, api, backend, out, stream)
            except BaseException as exc:
                self.book.release(adm)  # nothing was sent
                if isinstance(exc, orjson.JSONEncodeError):  # parsed (1024 levels) but deeper than orjson writes
                    raise bad("the request body is nested too deeply (more than 254 levels)", None,
                              "invalid_value") from None
                raise
            try:
                if backend.missing_credentials:
                    raise AttemptFailed(502, f"no API key for backend {backend.name} (secret {backend.missing_credentials})")
                if stream:
                    return await self._stream(request, ctx, backend, adm, payload, client_usage, i > 0)
                return await self._unary(request, ctx, backend, adm, payload, i > 0)
            except BaseException as exc:
                if not isinstance(exc, AttemptFailed):
                    # Outcome unknown (a bug, or cancelled at shutdown): charge the reservation.
                    self.book.settle(adm, backend.prices, None)
                    raise
                self.book.release(adm)  # no-op when the attempt already settled
                last = exc
                if (backend.wake is not None and self.waker is not None and backend.name not in rewoken
                        and exc.reason.startswith("connection failed")):
                    # The operator's last answer (up to a report old) said it serves, but nothing
                    # listens: scaled down or not Ready since. Wake and hold as at zero, then again.
                    rewoken.add(backend.name)
                    self.loads.assume_at_zero(backend.load_key)
                    log.info("route %s backend %s refused the connection: waking it", route.name, backend.name)
                    i -= 1
                    continue
                self.metrics.fallbacks.labels(cfg.namespace, route.name, backend.name,
                                              exc.reason.split(":")[0][:40]).inc()
                log.warning("route %s backend %s failed: %s%s", route.name, backend.name, exc.reason,
                            "; trying the next fallback" if i + 1 < len(usable) else "")
        assert last is not None
        if last.body is not None:
            # The provider's own answer (429, 5xx, 529), after every fallback: passed on as it meant it.
            return self._relayed_failure(ctx, last)
        # The proxy could not reach or read the upstream: its own 502/504.
        status = 504 if last.status == 504 else 502
        raise ProxyError(status, f"upstream failed for route {route.name!r}: {last.reason}"
                         + (f" (after {len(usable)} backends)" if len(usable) > 1 else ""),
                         code="upstream_timeout" if status == 504 else "bad_gateway")

    def _count_in_flight(self, ctx: RequestState, backend: BackendRt | None) -> None:
        """Scaled backends: the request counts as in flight to the backend it is trying (held ones too)."""
        if ctx.load_key is not None:
            self.loads.end(ctx.load_key)
            ctx.load_key = None
        if backend is not None and backend.wake is not None:
            ctx.load_key = backend.load_key
            self.loads.begin(ctx.load_key)

    async def _replica_ready(self, ctx: RequestState, route: RouteRt, backend: BackendRt, more: bool) -> bool:
        """The backend's workload is at zero: ask the operator for a replica, then hold the request
        until one is available (True) or, with wake mode Fallback and a backend left, give up at
        once (False). Raises 503 when the hold times out or nothing is left to fall back to."""
        assert backend.wake is not None and self.compiled is not None
        mode, timeout = backend.wake
        labels = (self.compiled.namespace, route.name, backend.name)
        ns = self.compiled.namespace
        if self.waker is None:
            return True  # no operator to ask: try it as it is
        if mode == "Fallback":
            task = asyncio.ensure_future(self.waker(ns, route.name, backend.name))
            self._tasks = [t for t in self._tasks if not t.done()] + [task]
            if more:
                self.metrics.wakes.labels(*labels, "fallback").inc()
                self.metrics.fallbacks.labels(ns, route.name, backend.name, "scaled_to_zero").inc()
                return False
            self.metrics.wakes.labels(*labels, "refused").inc()
            raise ProxyError(503, f"backend {backend.name!r} of route {route.name!r} is scaled to zero and waking; "
                                  "no fallback is left: retry shortly", code="backend_waking", headers={"Retry-After": "10"})
        t0 = time.monotonic()
        while True:
            answer = await self.waker(ns, route.name, backend.name)
            if answer is not None:
                self.loads.apply({backend.load_key: answer})
            waited = time.monotonic() - t0
            self.loads.queued(backend.load_key, waited)
            if not self.loads.at_zero(backend.load_key) and await accepts_connections(backend.base_url):
                self.metrics.wakes.labels(*labels, "held").inc()
                return True
            if waited >= timeout:
                self.metrics.wakes.labels(*labels, "timeout").inc()
                raise ProxyError(503, f"backend {backend.name!r} of route {route.name!r} has no replica available "
                                      f"after {timeout:g}s (scaled to zero, waking): retry shortly",
                                 code="backend_waking", headers={"Retry-After": "10"})
            await asyncio.sleep(min(0.5, max(0.05, timeout - waited)))


    # -- accounting of one request ------------------------------------------------------------------


def upstream_session() -> aiohttp.ClientSession:
    """The keep-alive pool to the backends."""
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30, enable_cleanup_closed=True)
    return aiohttp.ClientSession(connector=connector, auto_decompress=True, cookie_jar=aiohttp.DummyCookieJar(),
                                 skip_auto_headers=("User-Agent",), json_serialize=lambda o: orjson.dumps(o).decode())


@dataclass
class Shared:
    """What the tenants of one gateway process share (see Proxy.__init__)."""

    bodies: BodyMemory
    metrics: Metrics
    session: aiohttp.ClientSession | None
    access_log: Any
    secret_reader: Callable[[str, str], str | None]


def raise_nofile_limit() -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 65536
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, ValueError, OSError):
        pass


__all__ = ["SERVED", "Proxy", "Shared", "upstream_session", "parse_tags", "select_backend", "raise_nofile_limit"]
