"""The proxy server: aiohttp in, aiohttp (keep-alive pool) out.

Per request: read and check the body by hand -> look up the alias -> estimate the prompt (only if
a rule, cap or budget needs it) -> pick a backend -> reserve the worst case (synchronously) ->
forward -> relay (streams event by event) -> settle the provider's usage -> metrics + one access
log line. Fallbacks are tried only while nothing has been sent to the client.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from ..ledger.breakdown import tag_of
from ..ledger.pricing import TokenUsage, cost, format_money
from ..plainconfig import load_proxy_config
from ..routing import tokens as tok
from ..routing.apis import CHAT, COMPLETIONS, EMBEDDINGS, MESSAGES, OPERATION, capped_output
from ..routing.rules import TAG_HEADER, select_backend
from . import spend
from .backend_load import BackendLoads, Waker, accepts_connections
from .budgets import Admission, BudgetBook, LeaseShort
from .config import (
    ANTHROPIC,
    OPENAI,
    BackendRt,
    Compiled,
    ConfigError,
    RouteRt,
    compile_config,
    parse_config_text,
    secrets_fingerprint,
)
from .errors import ProxyError, error_body, stream_error_event
from .ledger_client import LedgerClient
from .limits import (
    DEFAULT_BODY_MEMORY,
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_MAX_ANSWER,
    AnswerTooLarge,
    BodyHold,
    BodyMemory,
    read_answer,
    read_body,
)
from .metrics import OTEL_PROVIDER, Metrics
from .translate import (
    ChatStreamTranslator,
    StreamTranslator,
    chat_to_message,
    chat_to_messages,
    error_to_anthropic,
    error_to_openai,
    message_to_chat,
    messages_to_chat,
)
from .wire import (
    BadUsage,
    anthropic_stream_usage,
    bad,
    believed,
    check_request,
    event_data,
    event_object,
    openai_usage,
    split_events,
    usage_from_body,
)

log = logging.getLogger("spendwarden.proxy")

DEFAULT_MAX_TOKENS = 4096  # sent when the client gave none and a budget needs a worst case
DEFAULT_MAX_BODY = 8 * 1024 * 1024
ANTHROPIC_VERSION = "2023-06-01"
BIG_PROMPT_CHARS = 64 * 1024  # estimate larger prompts in a worker thread
MAX_TAGS = 8
_TAG_KEY = re.compile(r"^[A-Za-z0-9_.\-]{1,32}$")
# Never forwarded upstream: the client's (dummy) credentials, hop-by-hop and framing headers.
_DROP_HEADERS = frozenset((
    "authorization", "x-api-key", "api-key", "proxy-authorization", "cookie", "host", "content-length",
    "content-type", "accept", "accept-encoding", "connection", "keep-alive", "transfer-encoding", "te",
    "upgrade", "expect", "proxy-connection", "trailer"))
_PASS_HEADERS = frozenset(("x-request-id", "request-id", "openai-processing-ms", "retry-after"))
# The providers' rate-limit state, on answers and on their 429s: clients pace themselves by it.
_PASS_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-")


class _Retry(Exception):
    """An upstream attempt failed before anything reached the client."""

    def __init__(self, status: int, reason: str, body: bytes | None = None, content_type: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(reason)
        self.status, self.reason, self.body, self.content_type = status, reason, body, content_type
        self.headers = headers or {}


@dataclass(slots=True)
class Ctx:
    api: str
    fmt: str
    t0: float
    alias: str | None = None
    route: str | None = None
    backend: BackendRt | None = None
    status: int = 0
    outcome: str = "ok"
    stream: bool = False
    usage: TokenUsage | None = None
    usage_known: bool = True
    cost: Any = None
    ttft: float | None = None
    upstream_time: float = 0.0
    attempts: int = 0
    est: int | None = None
    max_output: int | None = None
    downgraded: bool = False
    over_budget: list[str] = field(default_factory=list)
    budgets: list[str] = field(default_factory=list)
    tags: dict[str, str] | None = None
    error: str | None = None
    translating: bool = False
    upstream_api: str = CHAT
    partial: bool = False  # usage = the provider's input numbers + the reserved output
    sp: Any = None  # spend.SpendReq when the route has tiers, a cache or a loop breaker
    load_key: str | None = None  # the scaled backend this request counts as in flight to
    raw: bytes | bytearray = b""  # the request body (read once; an escalation parses it again)


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


class Proxy:
    def __init__(self, config_path: str, namespace: str | None = None, state_file: str | None = None,
                 max_body: int = DEFAULT_MAX_BODY, access_log: Any = None, poll_interval: float = 1.0,
                 default_max_tokens: int = DEFAULT_MAX_TOKENS, body_timeout: float = DEFAULT_BODY_TIMEOUT,
                 body_memory: int = DEFAULT_BODY_MEMORY, max_answer: int = DEFAULT_MAX_ANSWER):
        self.config_path = config_path
        self.max_answer = max_answer
        self.body_timeout = body_timeout
        self.bodies = BodyMemory(body_memory)
        self.default_max_tokens = default_max_tokens
        self.namespace_arg = namespace
        self.max_body = max_body
        self.poll_interval = poll_interval
        self.book = BudgetBook(state_file)
        self.metrics = Metrics()
        self.compiled: Compiled | None = None
        self.session: aiohttp.ClientSession | None = None
        self._fingerprint: str | None = None
        self._timeouts: dict[tuple[float, bool], aiohttp.ClientTimeout] = {}
        self._encoder_future: asyncio.Future[tok.Encoder] | None = None
        self._out = access_log if access_log is not None else sys.stdout.buffer
        self._tasks: list[asyncio.Task] = []
        self.ledger: LedgerClient | None = None
        self.loads = BackendLoads()
        self.waker: Waker | None = None
        self._started = False
        self.load(initial=True)

    # -- configuration ------------------------------------------------------------------------------

    def _read(self) -> bytes:
        if os.path.isdir(self.config_path):
            # A policy folder as kept in Git: every YAML file in it, as one manifest stream.
            names = sorted(n for n in os.listdir(self.config_path) if n.endswith((".yaml", ".yml")))
            parts = []
            for name in names:
                with open(os.path.join(self.config_path, name), "rb") as f:
                    parts.append(f.read())
            return b"\n---\n".join(parts)
        with open(self.config_path, "rb") as f:
            return f.read()

    def load(self, initial: bool = False) -> bool:
        """(Re)load the configuration if the file or the credentials changed. Returns True on change."""
        try:
            raw = self._read()
        except FileNotFoundError:
            if initial and not os.path.isdir(os.path.dirname(os.path.abspath(self.config_path))):
                raise ConfigError(f"{self.config_path}: no such file or directory") from None
            if initial:
                # A sidecar can start before the operator rendered its namespace's first config (the
                # ConfigMap volume is optional): serve nothing yet, pick the file up when it appears.
                log.warning("%s does not exist (yet): no routes until it does", self.config_path)
                self._install(compile_config(load_proxy_config({"namespace": self.namespace_arg or "default"}),
                                             self.namespace_arg), "missing", initial=True)
            elif self._fingerprint_file != "missing":
                log.error("%s disappeared; keeping the current configuration", self.config_path)
                self._fingerprint_file = "missing"
            return False
        except OSError as exc:
            if initial:
                raise ConfigError(f"cannot read {self.config_path}: {exc}") from exc
            log.error("cannot read %s: %s; keeping the current configuration", self.config_path, exc)
            return False
        digest = hashlib.sha256(raw).hexdigest()
        if self.compiled is not None and digest == self._fingerprint_file:
            fp = secrets_fingerprint(self.compiled.source)
            if fp == self._fingerprint:
                return False
        try:
            cfg, warnings = parse_config_text(raw.decode("utf-8"), self.namespace_arg)
            if warnings and not initial:
                # A broken edit must not silently drop routes or budgets that are serving traffic.
                raise ConfigError("; ".join(warnings))
            for w in warnings:
                log.warning("%s", w)
            compiled = compile_config(cfg, self.namespace_arg)
            self._ledger_mode(compiled)
            self.book.sync(compiled.budgets)
        except (ConfigError, ValueError) as exc:
            self._fingerprint_file = digest  # do not retry the same broken file every second
            self.metrics.config_reloads.labels("error").inc()
            if initial:
                raise ConfigError(str(exc)) from exc
            log.error("invalid configuration in %s: %s; keeping the current configuration", self.config_path, exc)
            return False
        self._install(compiled, digest, initial)
        return True

    def _install(self, compiled: Compiled, digest: str, initial: bool) -> None:
        cfg = compiled.source
        self._fingerprint_file = digest
        self._fingerprint = secrets_fingerprint(cfg)
        for b in (b for r in compiled.routes.values() for b in r.backends.values()):
            if b.missing_credentials:
                log.warning("route %s backend %s: no API key found for secret %s", b.route, b.name,
                            b.missing_credentials)
        if self.compiled is not None:
            spend.carry_over(self.compiled.routes, compiled.routes)
        self.compiled = compiled
        self.loads.set_keys({b.load_key for r in compiled.routes.values() for b in r.backends.values()
                             if b.wake is not None})
        self.metrics.config_reloads.labels("initial" if initial else "ok").inc()
        log.info("configuration loaded: namespace %s, %d routes, %d budgets", compiled.namespace,
                 len(compiled.routes), len(compiled.budgets))

    _fingerprint_file: str | None = None

    def _ledger_mode(self, compiled: Compiled) -> None:
        """Leases from the operator when the config names a ledger; the whole budget locally when not.
        Must run before book.sync: that is where budgets get (or lose) their leases."""
        url = compiled.source.ledger.url
        old = self.ledger
        if old is not None and old.url == url:
            old.namespace = compiled.namespace
            return
        if old is not None:
            log.warning("ledger %s no longer configured%s", old.url, f"; now {url}" if url else
                        ": enforcing whole budgets locally")
            self.book.ledger = False
            self.ledger = None
            if self.waker is not None:
                self._tasks.append(asyncio.ensure_future(self.waker.close()))
                self.waker = None
            self._tasks.append(asyncio.ensure_future(old.close(final=True)))
        if url:
            if self.book.state_file:
                log.info("ledger mode: the state file %s is not used (usage is kept by the ledger)",
                         self.book.state_file)
            log.info("ledger mode: budgets are enforced against leases from %s", url)
            self.ledger = LedgerClient(self.book, url, compiled.namespace, self.metrics)
            self.ledger.backends = self.loads
            if self.waker is not None:
                self._tasks.append(asyncio.ensure_future(self.waker.close()))
            self.waker = Waker(url)
            if self._started:
                self.ledger.start()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                self.load()
                self.book.roll()
                self.book.save()
                self._budget_gauges()
                try:
                    self._out.flush()
                except (OSError, ValueError):
                    pass
            except Exception:  # never let the poller die
                log.exception("periodic task failed")

    def _budget_gauges(self) -> None:
        if self.compiled is None:
            return
        ns = self.compiled.namespace
        m = self.metrics
        if self.ledger is not None:
            # This proxy's numbers against its lease; the budget-wide ones are the operator's.
            self.ledger.gauges(ns)
        for name, st in self.book.states.items():
            used = st.allowance.used
            m.budget_used_tokens.labels(ns, name, "input").set(used.input_tokens)
            m.budget_used_tokens.labels(ns, name, "output").set(used.output_tokens)
            currency = st.budget.spec.limits.cost.currency if st.budget.spec.limits.cost else "USD"
            m.budget_used_cost.labels(ns, name, currency).set(float(used.cost))
            m.budget_reserved.labels(ns, name).set(st.allowance.open_reservations)
            if st.lease is not None:
                continue
            rem = st.allowance.remaining()
            m.budget_remaining_ratio.labels(ns, name).set(rem.fraction)
            if rem.tokens is not None:
                m.budget_remaining_tokens.labels(ns, name).set(rem.tokens)
            if rem.cost is not None:
                currency = st.budget.spec.limits.cost.currency if st.budget.spec.limits.cost else "USD"
                m.budget_remaining_cost.labels(ns, name, currency).set(float(rem.cost))

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self, app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30,
                                         enable_cleanup_closed=True)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=True,
                                             cookie_jar=aiohttp.DummyCookieJar(),
                                             skip_auto_headers=("User-Agent",),
                                             json_serialize=lambda o: orjson.dumps(o).decode())
        self._budget_gauges()
        self._tasks.append(asyncio.create_task(self._poll()))
        self._started = True
        if self.ledger is not None:
            self.ledger.start()

    async def stop(self, app: web.Application) -> None:
        for t in self._tasks:
            t.cancel()
        if self.session is not None:
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
        r.add_post("/v1/chat/completions", self.chat)
        r.add_post("/v1/completions", self.completions)
        r.add_post("/v1/embeddings", self.embeddings)
        r.add_post("/v1/messages", self.messages)
        r.add_get("/v1/models", self.models)
        r.add_get("/v1/models/{model}", self.model)
        r.add_post("/v1/messages/count_tokens", self.count_tokens)
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

    async def metrics_handler(self, request: web.Request) -> web.Response:
        self._budget_gauges()
        return web.Response(body=self.metrics.render(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def models(self, request: web.Request) -> web.Response:
        assert self.compiled is not None
        return web.Response(body=self.compiled.models_body, content_type="application/json")

    async def model(self, request: web.Request) -> web.Response:
        assert self.compiled is not None
        alias = request.match_info["model"]
        if alias not in self.compiled.routes:
            return web.Response(status=404, content_type="application/json", body=error_body(
                OPENAI, 404, f"The model '{alias[:256]}' does not exist", code="model_not_found", param="model"))
        return web.Response(content_type="application/json", body=orjson.dumps(
            {"id": alias, "object": "model", "created": 0, "owned_by": "spendwarden"}))

    async def count_tokens(self, request: web.Request) -> web.StreamResponse:
        """Anthropic's token counting: forwarded to the alias's Anthropic backend (not metered: it is
        free), or answered with the proxy's own estimate when the alias has no Anthropic backend."""
        hold = self.bodies.hold()
        try:
            return await self._count_tokens(request, hold)
        finally:
            hold.release()

    async def _count_tokens(self, request: web.Request, hold: BodyHold) -> web.StreamResponse:
        assert self.compiled is not None and self.session is not None
        try:
            raw = await read_body(request, self.max_body, self.body_timeout, hold)
            body = orjson.loads(raw)
            if not isinstance(body, dict) or not isinstance(body.get("model"), str):
                raise ValueError("the body must be a JSON object with a string 'model'")
        except ValueError as exc:
            return web.Response(status=400, content_type="application/json",
                                body=error_body(ANTHROPIC, 400, f"invalid request: {exc}"))
        except ProxyError as exc:
            return self._refusal(ANTHROPIC, exc)
        route = self.compiled.routes.get(body["model"])
        if route is None:
            return web.Response(status=404, content_type="application/json", body=error_body(
                ANTHROPIC, 404, f"The model '{body['model'][:256]}' does not exist"))
        backend = route.default if route.default.fmt == ANTHROPIC else \
            next((b for b in route.backends.values() if b.fmt == ANTHROPIC), None)
        if backend is not None and not backend.missing_credentials:
            url = backend.url("messages").with_path(backend.url("messages").path + "/count_tokens")
            try:
                async with self.session.post(url, data=orjson.dumps({**body, "model": backend.model}),
                                             headers=self._headers(request, backend, False),
                                             timeout=self._timeout(backend, False)) as resp:
                    data = await read_answer(resp, self.max_answer)
                    if resp.status in (200, 400):  # else (no such endpoint, 5xx, ...): estimate
                        return web.Response(status=resp.status, body=data,
                                            content_type=_ctype(resp.headers.get("Content-Type", "")))
            except (TimeoutError, aiohttp.ClientError, OSError, AnswerTooLarge):
                pass  # fall back to the estimate
        try:
            est = await self._estimate(MESSAGES, body)
        except Exception:  # noqa: BLE001 - malformed messages: count what can be counted
            est = 0
        return web.Response(content_type="application/json", body=orjson.dumps({"input_tokens": est}))

    async def not_found(self, request: web.Request) -> web.Response:
        fmt = ANTHROPIC if request.path.startswith("/v1/messages") or "anthropic-version" in request.headers \
            else OPENAI
        status = 405 if request.path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                                         "/v1/messages", "/v1/models") else 404
        msg = f"{request.method} {request.path} is not served by the spendwarden proxy"
        return web.Response(status=status, body=error_body(fmt, status, msg, code="unknown_url"),
                            content_type="application/json")

    # -- handlers -----------------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self.serve(request, CHAT, OPENAI)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self.serve(request, COMPLETIONS, OPENAI)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self.serve(request, EMBEDDINGS, OPENAI)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        return await self.serve(request, MESSAGES, ANTHROPIC)

    async def serve(self, request: web.Request, api: str, fmt: str) -> web.StreamResponse:
        ctx = Ctx(api=api, fmt=fmt, t0=time.perf_counter())
        hold = self.bodies.hold()
        try:
            ctx.raw = await read_body(request, self.max_body, self.body_timeout, hold)
            resp = await self._serve_escalating(request, ctx)
        except ProxyError as exc:
            ctx.status, ctx.outcome, ctx.error = exc.status, exc.outcome, exc.message
            resp = self._refusal(fmt, exc)
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

    @staticmethod
    def _refusal(fmt: str, exc: ProxyError) -> web.Response:
        resp = web.Response(status=exc.status, headers=exc.headers, content_type="application/json",
                            body=error_body(fmt, exc.status, exc.message, exc.code, exc.param, exc.extra))
        if exc.status == 408 or exc.code == "invalid_body":
            # a client too slow to send its body does not keep the connection; nor one whose body
            # cannot be decoded (the rest of it is not read: aiohttp would fail again draining it)
            resp.force_close()
        return resp

    async def _serve_escalating(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
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

    async def _estimate(self, api: str, body: dict[str, Any]) -> int:
        texts, fixed = tok.request_texts(api, body)
        if not texts:
            return fixed
        encoder = tok.loaded_encoder()
        loop = asyncio.get_running_loop()
        if encoder is None:
            if self._encoder_future is None:
                self._encoder_future = loop.run_in_executor(None, tok.load_encoder)
            encoder = await asyncio.shield(self._encoder_future)
        if tok.total_chars(texts) > BIG_PROMPT_CHARS:
            return await loop.run_in_executor(None, tok.estimate, encoder, texts, fixed)
        return tok.estimate(encoder, texts, fixed)

    async def _serve(self, request: web.Request, ctx: Ctx) -> web.StreamResponse:
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
        # Chat requests cross formats (OpenAI chat <-> Anthropic messages); completions/embeddings do not.
        crosses = api in (CHAT, MESSAGES)

        def compatible(b: BackendRt) -> bool:
            return b.fmt == fmt or crosses

        usable = [b for b in candidates if compatible(b)]
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

        # Reserve a little more prompt than estimated: providers count with their own tokenizers and
        # chat templates, and a reservation below the real usage could let concurrent requests overshoot.
        reserve_in = est + est // 10 + 4 if est is not None else 0
        if ctx.sp is not None:
            spend.start_capture(ctx, route)
        last: _Retry | None = None
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
            try:  # may raise 429 (503: a Closed budget without a lease)
                adm = self.book.admit(route, backend, reserve_in, want, choices, downgrade_to,
                                      may_wait=self.ledger is not None)
            except LeaseShort as short:
                # Ledger mode, the lease is too small: ask for more, then decide on what was granted.
                assert self.ledger is not None
                await self.ledger.wait_for_lease(short)
                adm = self.book.admit(route, backend, reserve_in, want, choices, downgrade_to)
            backend = adm.backend
            adm.tag = tag
            ctx.backend, ctx.attempts = backend, i + 1
            ctx.downgraded, ctx.over_budget = adm.downgraded, adm.over_budget
            out = adm.max_output if adm.max_output is not None else want
            ctx.max_output = out
            ctx.translating = backend.fmt != fmt
            ctx.upstream_api = CHAT if ctx.translating and backend.fmt == OPENAI else api
            try:
                if ctx.translating and backend.fmt == ANTHROPIC:
                    payload = orjson.dumps(chat_to_messages(body, backend.model, out or self.default_max_tokens,
                                                            stream))
                elif ctx.translating:
                    payload = orjson.dumps(messages_to_chat(body, backend.model, out or self.default_max_tokens,
                                                            stream, backend.provider == "OpenAI"))
                else:
                    payload = self._payload(body, api, backend, out, stream)
            except BaseException:
                self.book.release(adm)  # nothing was sent
                raise
            try:
                if backend.missing_credentials:
                    raise _Retry(502, f"no API key for backend {backend.name} (secret {backend.missing_credentials})")
                if stream:
                    return await self._stream(request, ctx, backend, adm, payload, client_usage, i > 0)
                return await self._unary(request, ctx, backend, adm, payload, i > 0)
            except BaseException as exc:
                if not isinstance(exc, _Retry):
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
        if last.body is not None and last.status == 429:
            # The provider's own rate limit, after every fallback: pass it on so SDKs back off.
            ctx.status, ctx.outcome, ctx.error = 429, "upstream_error", last.reason
            return web.Response(status=429, body=self._client_error(ctx, last.body),
                                content_type=_ctype(last.content_type or ""), headers=last.headers)
        status = 504 if last.status == 504 else 502
        raise ProxyError(status, f"upstream failed for route {route.name!r}: {last.reason}"
                         + (f" (after {len(usable)} backends)" if len(usable) > 1 else ""),
                         code="upstream_timeout" if status == 504 else "bad_gateway")

    def _count_in_flight(self, ctx: Ctx, backend: BackendRt | None) -> None:
        """Scaled backends: the request counts as in flight to the backend it is trying (held ones too)."""
        if ctx.load_key is not None:
            self.loads.end(ctx.load_key)
            ctx.load_key = None
        if backend is not None and backend.wake is not None:
            ctx.load_key = backend.load_key
            self.loads.begin(ctx.load_key)

    async def _replica_ready(self, ctx: Ctx, route: RouteRt, backend: BackendRt, more: bool) -> bool:
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

    def _payload(self, body: dict[str, Any], api: str, backend: BackendRt, out: int | None, stream: bool) -> bytes:
        b = dict(body)
        b["model"] = backend.model
        if out is not None and api != EMBEDDINGS:
            if api == CHAT:
                set_any = False
                for key in ("max_completion_tokens", "max_tokens"):
                    if body.get(key) is not None:
                        b[key] = out
                        set_any = True
                if not set_any:
                    b["max_completion_tokens" if backend.provider == "OpenAI" else "max_tokens"] = out
            else:
                b["max_tokens"] = out
        if stream and api in (CHAT, COMPLETIONS):
            so = body.get("stream_options")
            b["stream_options"] = {**so, "include_usage": True} if isinstance(so, dict) else {"include_usage": True}
        return orjson.dumps(b)

    def _client_error(self, ctx: Ctx, raw: bytes) -> bytes:
        """An upstream error body in the client's format."""
        if not ctx.translating:
            return raw
        return error_to_openai(raw) if ctx.fmt == OPENAI else error_to_anthropic(raw)

    def _headers(self, request: web.Request, backend: BackendRt, stream: bool) -> dict[str, str]:
        """Client headers minus credentials, hop-by-hop and our own; plus the backend's API key."""
        foreign = "anthropic-" if backend.fmt == OPENAI else "openai-"
        h = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_HEADERS
             and not k.lower().startswith(("x-spendwarden-", foreign))}
        h["Content-Type"] = "application/json"
        h["Accept"] = "text/event-stream" if stream else "application/json"
        h.update(backend.headers)
        if backend.fmt == ANTHROPIC and "anthropic-version" not in request.headers:
            h["anthropic-version"] = ANTHROPIC_VERSION
        return h

    def _timeout(self, backend: BackendRt, stream: bool) -> aiohttp.ClientTimeout:
        key = (backend.timeout, stream)
        t = self._timeouts.get(key)
        if t is None:
            connect = min(backend.timeout, 10.0)
            t = aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=backend.timeout) if stream \
                else aiohttp.ClientTimeout(total=backend.timeout, sock_connect=connect)
            self._timeouts[key] = t
        return t

    def _resp_headers(self, ctx: Ctx, backend: BackendRt, upstream: Any) -> dict[str, str]:
        return {"x-spendwarden-route": ctx.route or "", "x-spendwarden-backend": backend.name,
                **_passed_headers(upstream)}

    async def _unary(self, request: web.Request, ctx: Ctx, backend: BackendRt, adm: Admission,
                     payload: bytes, is_fallback: bool) -> web.Response:
        assert self.session is not None
        t_up = time.perf_counter()
        got_headers = False
        try:
            async with self.session.post(backend.url(ctx.upstream_api), data=payload,
                                         headers=self._headers(request, backend, False),
                                         timeout=self._timeout(backend, False)) as resp:
                got_headers = True
                status = resp.status
                try:
                    raw = await read_answer(resp, self.max_answer)
                except AnswerTooLarge:
                    resp.close()  # the rest is not read: the connection cannot be reused
                    ctx.upstream_time += time.perf_counter() - t_up
                    if status < 300:
                        # Billed, usage unknown (it is in the part not read): charge the reservation.
                        self.book.settle(adm, backend.prices, None)
                        ctx.usage_known = False
                    raise _Retry(502, self._too_large(backend, status)) from None
                ctype = resp.headers.get("Content-Type", "application/json")
                up_headers = resp.headers
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            ctx.upstream_time += time.perf_counter() - t_up
            timeout = isinstance(exc, asyncio.TimeoutError)
            if got_headers:
                # The upstream was answering: it may bill us; usage is unknown, so keep the reservation.
                self.book.settle(adm, backend.prices, None)
                ctx.usage_known = False
            raise _Retry(504 if timeout else 502,
                         f"timeout: no answer within {backend.timeout}s" if timeout
                         else f"connection failed: {type(exc).__name__}: {exc}"[:300]) from None
        ctx.upstream_time += time.perf_counter() - t_up
        if status == 429 or status >= 500:
            raise _Retry(status, f"upstream status {status}", raw, ctype, _passed_headers(up_headers))
        headers = self._resp_headers(ctx, backend, up_headers)
        if status >= 300:
            # The provider refused the request (400, 401, 404, ...): nothing billed, pass it on.
            self.book.release(adm)
            ctx.status, ctx.outcome, ctx.error = status, "upstream_error", f"upstream status {status}"
            return web.Response(status=status, body=self._client_error(ctx, raw),
                                headers=headers, content_type=_ctype(ctype))
        try:
            doc, usage = usage_from_body(backend.fmt == ANTHROPIC, raw)
            if ctx.translating:
                raw = orjson.dumps(message_to_chat(doc, ctx.alias or "") if backend.fmt == ANTHROPIC
                                   else chat_to_message(doc, ctx.alias or ""))
        except (ValueError, TypeError, AttributeError, KeyError):
            self.book.settle(adm, backend.prices, None)
            ctx.usage_known = False
            raise ProxyError(502, f"upstream backend {backend.name!r} returned an invalid response "
                                  f"(not the JSON object its API defines)", code="bad_gateway") from None
        self._settle(ctx, backend, adm, usage)
        ctx.status = status
        ctx.outcome = "fallback" if is_fallback else "ok"
        if ctx.cost is not None:
            headers["x-spendwarden-cost"] = format_money(ctx.cost)
        return web.Response(status=status, body=raw, headers=headers, content_type="application/json")

    def _too_large(self, backend: BackendRt, status: int) -> str:
        return (f"backend {backend.name!r} answered (status {status}) with more than {self.max_answer} bytes, the "
                "proxy's limit for an answer it reads whole (--max-response-bytes)"
                + ("; its usage is unknown: the request's reservation is charged" if status < 300 else ""))

    def _settle(self, ctx: Ctx, backend: BackendRt, adm: Admission, usage: TokenUsage | BadUsage | None) -> None:
        usage = believed(usage, ctx.route, backend.name)
        if usage is None:
            ctx.usage_known = False
            self.book.settle(adm, backend.prices, None)
            return
        ctx.usage = usage
        ctx.cost = cost(backend.prices, usage)
        self.book.settle(adm, backend.prices, usage)

    async def _stream(self, request: web.Request, ctx: Ctx, backend: BackendRt, adm: Admission,
                      payload: bytes, client_usage: bool, is_fallback: bool) -> web.StreamResponse:
        assert self.session is not None
        t_up = time.perf_counter()
        try:
            cm = self.session.post(backend.url(ctx.upstream_api), data=payload,
                                   headers=self._headers(request, backend, True),
                                   timeout=self._timeout(backend, True))
            resp = await cm.__aenter__()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            ctx.upstream_time += time.perf_counter() - t_up
            timeout = isinstance(exc, asyncio.TimeoutError)
            raise _Retry(504 if timeout else 502,
                         f"timeout: no answer within {backend.timeout}s" if timeout
                         else f"connection failed: {type(exc).__name__}: {exc}"[:300]) from None
        try:
            status = resp.status
            if status != 200:
                try:
                    raw = await read_answer(resp, self.max_answer)
                except (TimeoutError, aiohttp.ClientError, OSError):
                    raw = b""
                except AnswerTooLarge:
                    raise _Retry(502, self._too_large(backend, status)) from None
                ctype = resp.headers.get("Content-Type", "application/json")
                if status == 429 or status >= 500:
                    raise _Retry(status, f"upstream status {status}", raw, ctype, _passed_headers(resp.headers))
                self.book.release(adm)
                ctx.status, ctx.outcome, ctx.error = status, "upstream_error", f"upstream status {status}"
                return web.Response(status=status, body=self._client_error(ctx, raw),
                                    content_type=_ctype(ctype),
                                    headers=self._resp_headers(ctx, backend, resp.headers))
            if "text/event-stream" not in resp.headers.get("Content-Type", ""):
                self.book.settle(adm, backend.prices, None)
                ctx.usage_known = False
                raise ProxyError(502, f"upstream backend {backend.name!r} did not answer with an event stream",
                                 code="bad_gateway")
            out = web.StreamResponse(status=200, headers={
                **self._resp_headers(ctx, backend, resp.headers),
                "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await out.prepare(request)
            ctx.status = 200
            ctx.outcome = "fallback" if is_fallback else "ok"
            try:
                await self._relay(ctx, backend, adm, resp, out, client_usage)
            except Exception:  # a bug mid-stream: the status is sent, end the stream with an error event
                log.exception("relaying the stream failed")
                ctx.outcome, ctx.error = "upstream_error", "internal error while relaying the stream"
                self.book.settle(adm, backend.prices, None)
                try:
                    await out.write(stream_error_event(ctx.fmt, 500, "internal proxy error"))
                except (ConnectionError, RuntimeError):
                    pass
            ctx.upstream_time += time.perf_counter() - t_up
            return out
        finally:
            resp.release() if ctx.error is None else resp.close()

    async def _relay(self, ctx: Ctx, backend: BackendRt, adm: Admission, resp: aiohttp.ClientResponse,
                     out: web.StreamResponse, client_usage: bool) -> None:
        anthropic = backend.fmt == ANTHROPIC
        translator: Any = None
        if ctx.translating:
            translator = StreamTranslator(ctx.alias or "", client_usage) if anthropic \
                else ChatStreamTranslator(ctx.alias or "")
        buf = bytearray()
        usage: TokenUsage | BadUsage | None = None
        complete = False
        failure: str | None = None
        client_gone = False
        capture = ctx.sp.capture if ctx.sp is not None else None  # for the response cache
        try:
            async for chunk in resp.content.iter_any():
                buf += chunk
                events = split_events(buf)
                if len(buf) > self.max_answer:  # an event that never ends is not kept whole either
                    failure = (f"upstream sent a stream event of more than {self.max_answer} bytes, the proxy's "
                               "limit (--max-response-bytes)")
                    break
                if not events:
                    continue
                keep: list[bytes] = []
                for ev in events:
                    if translator is not None and not anthropic:
                        data = event_data(ev)
                        if data is not None and data.strip() == b"[DONE]":
                            complete = True
                            keep.extend(translator.done())
                            continue
                        obj = event_object(data)
                        if obj is None:
                            continue
                        if isinstance(obj.get("usage"), dict):
                            usage = openai_usage(obj["usage"])
                        keep.extend(_translated(translator, obj))
                        continue
                    if translator is not None:
                        obj = event_object(event_data(ev))
                        if obj is None:
                            continue
                        usage = anthropic_stream_usage(obj, usage)
                        if obj.get("type") == "message_stop":
                            complete = True
                        keep.extend(_translated(translator, obj))
                        continue
                    if anthropic:
                        head = ev[:48]
                        if b"message_start" in head or b"message_delta" in head:
                            obj = event_object(event_data(ev))
                            if obj is not None:
                                usage = anthropic_stream_usage(obj, usage)
                        elif b"message_stop" in head:
                            complete = True
                    elif b'"usage"' in ev:
                        obj = event_object(event_data(ev))
                        if obj is not None and isinstance(obj.get("usage"), dict):
                            usage = openai_usage(obj["usage"])
                            if not client_usage and not obj.get("choices"):
                                continue  # the usage chunk we asked for, not the client
                    elif ev.startswith(b"data: [DONE]") or ev.startswith(b"data:[DONE]"):
                        complete = True
                    keep.append(ev)
                if keep:
                    if ctx.ttft is None:
                        ctx.ttft = time.perf_counter() - ctx.t0
                    data = keep[0] if len(keep) == 1 else b"".join(keep)
                    if capture is not None:
                        capture += data
                    try:
                        await out.write(data)
                    except (ConnectionError, RuntimeError):
                        client_gone = True
                        break
            if not client_gone and failure is None and buf.strip():
                if capture is not None:
                    capture += buf
                try:
                    await out.write(bytes(buf))
                except (ConnectionError, RuntimeError):
                    client_gone = True
        except TimeoutError:
            failure = f"upstream stalled for more than {backend.timeout}s mid-stream"
        except (aiohttp.ClientError, OSError) as exc:
            failure = f"upstream connection lost mid-stream: {type(exc).__name__}"
        if not complete and failure is None and not client_gone:
            failure = "upstream ended the stream early"
        if failure is not None:
            ctx.outcome, ctx.error = "upstream_error", failure
            try:
                await out.write(stream_error_event(ctx.fmt, 502, failure))
            except (ConnectionError, RuntimeError):
                pass
        elif client_gone:
            ctx.outcome, ctx.error = "client_closed", "client disconnected mid-stream"
        # Settle: the provider's numbers when the stream ran to its end. When it broke, what is known:
        # Anthropic reports the input side up front (message_start), so the prompt is charged exactly and
        # the output at the whole reservation; otherwise the whole reservation.
        if complete and failure is None and not client_gone:
            self._settle(ctx, backend, adm, usage)
        elif anthropic and isinstance(usage, TokenUsage) and ctx.max_output is not None:
            self._settle(ctx, backend, adm, replace(usage, output_tokens=max(usage.output_tokens, ctx.max_output)))
            ctx.partial = True
        elif isinstance(usage, TokenUsage):
            self._settle(ctx, backend, adm, None)
            ctx.usage = usage  # for the log: what was known when the stream broke
        else:
            self._settle(ctx, backend, adm, usage)  # None or BadUsage: the reservation
        if not client_gone:
            try:
                await out.write_eof()
            except (ConnectionError, RuntimeError):
                pass

    # -- accounting of one request ------------------------------------------------------------------

    def _record(self, ctx: Ctx) -> None:
        dur = time.perf_counter() - ctx.t0
        cfg = self.compiled
        ns = cfg.namespace if cfg else ""
        b = ctx.backend
        op = OPERATION[ctx.api]
        route = ctx.route or ""
        base = None
        if ctx.route is not None and b is not None:
            base = (ns, op, OTEL_PROVIDER.get(b.provider, b.provider), ctx.alias or "", b.model, route, b.name)
        self.metrics.request(
            base, b.prices.currency if b else "", (ns, route, b.name if b else "", op, ctx.outcome, str(ctx.status)),
            ctx.outcome, dur, ctx.usage if ctx.usage_known else None,
            float(ctx.cost) if ctx.cost is not None else None, ctx.ttft,
            max(dur - ctx.upstream_time, 0.0) if not ctx.stream and ctx.upstream_time else None)
        if ctx.tags and ctx.cost and b is not None:
            self.metrics.tagged(ns, ctx.tags, b.prices.currency, float(ctx.cost))
        u = ctx.usage
        line: dict[str, Any] = {
            "ts": round(time.time(), 3), "namespace": ns, "api": ctx.api, "model": ctx.alias,
            "route": ctx.route, "status": ctx.status, "outcome": ctx.outcome, "stream": ctx.stream,
            "duration_ms": round(dur * 1000, 3), "attempts": ctx.attempts}
        if b is not None:
            line["backend"] = b.name
            line["upstream_model"] = b.model
            line["currency"] = b.prices.currency
        if u is not None:
            line["input_tokens"] = u.input_tokens
            line["output_tokens"] = u.output_tokens
            line["cached_input_tokens"] = u.cached_input_tokens
            if u.cache_write_tokens:
                line["cache_write_tokens"] = u.cache_write_tokens
                line["cache_write_1h_tokens"] = u.cache_write_1h_tokens
        if ctx.partial:
            line["usage_source"] = "upstream_input+reserved_output"
        elif not ctx.usage_known:
            line["usage_source"] = "reservation"
        elif u is not None:
            line["usage_source"] = "upstream"
        if ctx.cost is not None:
            line["cost"] = format_money(ctx.cost)
        if ctx.ttft is not None:
            line["ttft_ms"] = round(ctx.ttft * 1000, 3)
        if ctx.est is not None:
            line["est_prompt_tokens"] = ctx.est
        if ctx.max_output is not None:
            line["max_output_tokens"] = ctx.max_output
        if ctx.budgets:
            line["budgets"] = ctx.budgets
        if ctx.downgraded:
            line["downgraded"] = True
        if ctx.over_budget:
            line["over_budget"] = ctx.over_budget
        if ctx.translating:
            line["translated"] = True
        if ctx.tags:
            line["tags"] = ctx.tags
        if ctx.error:
            line["error"] = ctx.error
        if ctx.sp is not None:
            spend.log_fields(ctx, line)
        try:
            self._out.write(orjson.dumps(line) + b"\n")
        except (OSError, ValueError):
            return
        if not self._flush_scheduled:
            # Batch the write syscalls: lines reach the log within 50 ms.
            self._flush_scheduled = True
            asyncio.get_running_loop().call_later(0.05, self._flush)

    _flush_scheduled = False

    def _flush(self) -> None:
        self._flush_scheduled = False
        try:
            self._out.flush()
        except (OSError, ValueError):
            pass


def _translated(translator: Any, obj: dict[str, Any]) -> list[bytes]:
    """One upstream stream event in the client's format; an event of an unexpected shape is dropped
    (the response is already streaming: there is no way left to answer with an error status)."""
    try:
        return translator.event(obj)
    except (TypeError, AttributeError, KeyError, ValueError) as exc:
        log.warning("dropped an untranslatable upstream stream event: %s", type(exc).__name__)
        return []


def _ctype(ctype: str) -> str:
    """An upstream Content-Type as aiohttp's content_type takes it: without parameters (a charset there
    raises ValueError; OpenAI sends "application/json; charset=utf-8")."""
    return ctype.split(";")[0].strip() or "application/json"


def _passed_headers(upstream: Any) -> dict[str, str]:
    """The upstream answer's headers that reach the client (request ids, Retry-After, rate limits)."""
    return {k: v for k, v in upstream.items() if k.lower() in _PASS_HEADERS or k.lower().startswith(_PASS_PREFIXES)}


def raise_nofile_limit() -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 65536
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, ValueError, OSError):
        pass


__all__ = ["Proxy", "parse_tags", "select_backend", "raise_nofile_limit"]
