"""The proxy's upstream stage: the request body and headers a backend is sent, its timeouts, and a unary (non-streamed) answer read within bounds and settled."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from ..ledger.pricing import TokenUsage, cost, format_money, worst_case_cost
from ..routing.apis import CHAT, COMPLETIONS, EMBEDDINGS, OPERATION, RESPONSES
from .budgets import Admission
from .config import (
    ANTHROPIC,
    OPENAI,
    BackendRt,
)
from .errors import ProxyError, error_body, provider_error
from .estimate import PromptEstimate, reserved_prompt
from .limits import (
    AnswerTooLarge,
    read_answer,
)
from .request import AttemptFailed, RequestState, usage_source
from .translate import (
    chat_to_message,
    error_to_anthropic,
    error_to_openai,
    message_to_chat,
    message_to_response,
)
from .wire import (
    BadUsage,
    believed,
    usage_from_body,
)

log = logging.getLogger("spendwarden.proxy")

ANTHROPIC_VERSION = "2023-06-01"


# Never forwarded upstream: the client's (dummy) credentials, hop-by-hop and framing headers.
_DROP_HEADERS = frozenset((
    "authorization", "x-api-key", "api-key", "proxy-authorization", "cookie", "host", "content-length",
    "content-type", "accept", "accept-encoding", "connection", "keep-alive", "transfer-encoding", "te",
    "upgrade", "expect", "proxy-connection", "trailer"))


_PASS_HEADERS = frozenset(("x-request-id", "request-id", "openai-processing-ms", "retry-after"))


# The providers' rate-limit state, on answers and on their 429s: clients pace themselves by it.
_PASS_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-")


def passed_headers(upstream: Any) -> dict[str, str]:
    """The upstream answer's headers that reach the client (request ids, Retry-After, rate limits)."""
    return {k: v for k, v in upstream.items() if k.lower() in _PASS_HEADERS or k.lower().startswith(_PASS_PREFIXES)}


def media_type(ctype: str) -> str:
    """An upstream Content-Type as aiohttp's content_type takes it: without parameters (a charset there
    raises ValueError; OpenAI sends "application/json; charset=utf-8")."""
    return ctype.split(";")[0].strip() or "application/json"


class UpstreamCalls(PromptEstimate):
    """Mixed into Proxy: one call to one backend, answered whole."""

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
            elif api == RESPONSES:  # bounds reasoning and visible output together, as billed
                b["max_output_tokens"] = out
            else:
                b["max_tokens"] = out
        if stream and api in (CHAT, COMPLETIONS):
            so = body.get("stream_options")
            b["stream_options"] = {**so, "include_usage": True} if isinstance(so, dict) else {"include_usage": True}
        return orjson.dumps(b)

    def _client_error(self, ctx: RequestState, raw: bytes, status: int | None = None) -> bytes:
        """An upstream error body in the client's format."""
        if not ctx.translating:
            return raw
        return error_to_openai(raw, status) if ctx.fmt == OPENAI else error_to_anthropic(raw, status)

    def _relayed_failure(self, ctx: RequestState, failed: AttemptFailed) -> web.Response:
        """The provider's own error answer (a 429, a 5xx, Anthropic's 529 overloaded) when no fallback
        is left: its status, error type and message in the client's format, with Retry-After and the
        rate-limit headers, so the SDKs raise what the provider meant (RateLimitError, OverloadedError,
        InternalServerError) and back off as told, instead of retrying a generic 502 at once."""
        status, raw = failed.status, failed.body or b""
        backend = ctx.backend
        name = backend.name if backend is not None else ""
        ctx.status, ctx.outcome, ctx.error = status, "upstream_error", failed.reason
        if provider_error(raw) is not None:
            body = self._client_error(ctx, raw, status)
            ctype = media_type(failed.content_type or "") if not ctx.translating else "application/json"
        else:  # not an error in its API's shape (a load balancer's page, nothing): one in the client's
            body = error_body(ctx.fmt, status, f"upstream backend {name!r} answered status {status} "
                                               "without an error body in its API's format", code="upstream_error")
            ctype = "application/json"
        headers = {"x-spendwarden-route": ctx.route or "", "x-spendwarden-backend": name, **failed.headers}
        return web.Response(status=status, body=body, headers=headers, content_type=ctype)

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

    def _resp_headers(self, ctx: RequestState, backend: BackendRt, upstream: Any) -> dict[str, str]:
        return {"x-spendwarden-route": ctx.route or "", "x-spendwarden-backend": backend.name,
                **passed_headers(upstream)}

    async def _unary(self, request: web.Request, ctx: RequestState, backend: BackendRt, adm: Admission,
                     payload: bytes, is_fallback: bool) -> web.Response:
        assert self.session is not None
        self._fold_billed_failure(ctx)
        t_up = time.perf_counter()
        got_headers, status = False, 0
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
                        await self._charge_unknown(ctx, backend, adm)
                        ctx.billed_failure = backend
                    raise AttemptFailed(502, self._too_large(backend, status)) from None
                ctype = resp.headers.get("Content-Type", "application/json")
                up_headers = resp.headers
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            ctx.upstream_time += time.perf_counter() - t_up
            timeout = isinstance(exc, asyncio.TimeoutError)
            if got_headers and status < 300:
                # The upstream was answering: it may bill us; usage is unknown, so charge the reservation.
                await self._charge_unknown(ctx, backend, adm)
                ctx.billed_failure = backend
            raise AttemptFailed(504 if timeout else 502,
                         f"timeout: no answer within {backend.timeout}s" if timeout
                         else f"connection failed: {type(exc).__name__}: {exc}"[:300]) from None
        ctx.upstream_time += time.perf_counter() - t_up
        if status == 429 or status >= 500:
            raise AttemptFailed(status, f"upstream status {status}", raw, ctype, passed_headers(up_headers))
        headers = self._resp_headers(ctx, backend, up_headers)
        if status >= 300:
            # The provider refused the request (400, 401, 404, ...): nothing billed, pass it on.
            self.book.release(adm)
            ctx.status, ctx.outcome, ctx.error = status, "upstream_error", f"upstream status {status}"
            return web.Response(status=status, body=self._client_error(ctx, raw, status),
                                headers=headers, content_type=media_type(ctype))
        try:
            doc, usage = usage_from_body(backend.fmt == ANTHROPIC, raw)
            if ctx.translating and ctx.api == RESPONSES:
                raw = orjson.dumps(message_to_response(doc, ctx.alias or "", ctx.raw))
            elif ctx.translating:
                raw = orjson.dumps(message_to_chat(doc, ctx.alias or "", ctx.structured) if backend.fmt == ANTHROPIC
                                   else chat_to_message(doc, ctx.alias or ""))
        except (ValueError, TypeError, AttributeError, KeyError):
            await self._charge_unknown(ctx, backend, adm)
            raise ProxyError(502, f"upstream backend {backend.name!r} returned an invalid response "
                                  f"(not the JSON object its API defines)", code="bad_gateway") from None
        await self._settle(ctx, backend, adm, usage)
        ctx.status = status
        ctx.outcome = "fallback" if is_fallback else "ok"
        if ctx.cost is not None:
            headers["x-spendwarden-cost"] = format_money(ctx.cost)
        return web.Response(status=status, body=raw, headers=headers, content_type="application/json")

    def _fold_billed_failure(self, ctx: RequestState) -> None:
        """A fallback after an attempt its provider may bill (a body broken midway, an answer too large
        to read): that attempt's charge goes to the metrics under its own backend and to the access
        log's earlier_attempts, so that the request's line plus those add up to what the budgets were
        charged; the line's own tokens and cost are the next attempt's."""
        failed, ctx.billed_failure = ctx.billed_failure, None
        if failed is None or ctx.usage is None or self.compiled is None:
            return
        route = self.compiled.routes.get(ctx.alias or "")
        if route is not None:
            self.metrics.attempt(self.compiled.namespace, OPERATION[ctx.api], failed, route, ctx.usage, ctx.cost)
        ctx.earlier.append({"backend": failed.name, "input_tokens": ctx.usage.input_tokens,
                            "output_tokens": ctx.usage.output_tokens, "cost": format_money(ctx.cost),
                            "usage_source": usage_source(ctx)})
        ctx.usage, ctx.cost, ctx.usage_known, ctx.output_seen = None, None, True, False

    def _too_large(self, backend: BackendRt, status: int) -> str:
        return (f"backend {backend.name!r} answered (status {status}) with more than {self.max_answer} bytes, the "
                "proxy's limit for an answer it reads whole (--max-response-bytes)"
                + ("; its usage is unknown: the request's reservation is charged" if status < 300 else ""))

    async def _settle(self, ctx: RequestState, backend: BackendRt, adm: Admission,
                      usage: TokenUsage | BadUsage | None, seen: int = 0) -> None:
        """Settle the provider's usage; none, or none to believe: the reservation (_charge_unknown)."""
        usage = believed(usage, ctx.route, backend.name)
        if usage is None:
            await self._charge_unknown(ctx, backend, adm, seen)
            return
        ctx.usage = usage
        ctx.cost = cost(backend.prices, usage)
        self.book.settle(adm, backend.prices, usage)

    async def _charge_unknown(self, ctx: RequestState, backend: BackendRt, adm: Admission, seen: int = 0) -> None:
        """The provider answered, so it may bill, but its usage is unknown (a body or a stream broken
        midway, a client gone, an answer too large to read, numbers not to believe): the budgets are
        charged the reservation, and the same tokens and cost go to the access log and the metrics
        (usage_source "reservation"), with or without a budget, so that the three agree call for call.
        Without a budget the reservation is what one would have held: the prompt estimate (made now if
        the route needed none) and the output cap sent upstream. When no cap was sent (an OpenAI
        backend, no max_tokens, no budget) the output side is `seen`, the stream events relayed so far
        (about one token each), named usage_source "reserved_input+seen_output"."""
        self.book.settle(adm, backend.prices, None)
        ctx.usage_known = False
        if adm.reserved is not None:  # what the budgets held, and were just charged
            held = adm.reserved
            ctx.usage, ctx.cost = TokenUsage(held.input_tokens, held.output_tokens), held.cost
            return
        if ctx.est is None:
            ctx.est = await self._body_estimate(ctx)
        out = self._output_cap(ctx, backend)
        if out is None:
            out, ctx.output_seen = seen, True
        else:
            out *= adm.choices
        inp = reserved_prompt(ctx.est)
        ctx.usage, ctx.cost = TokenUsage(inp, out), worst_case_cost(backend.prices, inp, out)

    def _output_cap(self, ctx: RequestState, backend: BackendRt) -> int | None:
        """The output cap (per choice) the upstream was sent; None when none was (server.py _serve,
        _payload and translate.py: Anthropic backends always get one)."""
        if ctx.api == EMBEDDINGS:
            return 0
        if ctx.max_output is not None:
            return ctx.max_output
        return self.default_max_tokens if backend.fmt == ANTHROPIC else None

    async def _body_estimate(self, ctx: RequestState) -> int:
        """The prompt estimate of the request's body, for a reservation the route did not need to make."""
        try:
            return await self._estimate(ctx.api, orjson.loads(ctx.raw))
        except Exception:  # noqa: BLE001 - a body the pipeline accepted: count what can be, never fail the accounting
            log.warning("could not estimate the prompt of a request whose usage is unknown; counting it as 0")
            return 0
