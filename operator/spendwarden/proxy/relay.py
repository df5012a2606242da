"""The proxy's streaming stage: a backend's server-sent events relayed to the client event by event (translated between the OpenAI and Anthropic formats where the client and backend differ), its usage read from the stream and settled."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any

import aiohttp
from aiohttp import web

from ..ledger.pricing import TokenUsage
from ..routing.apis import RESPONSES
from .budgets import Admission
from .config import (
    ANTHROPIC,
    BackendRt,
)
from .errors import ProxyError, stream_error_event
from .limits import (
    AnswerTooLarge,
    read_answer,
)
from .request import AttemptFailed, RequestState
from .responses import terminal_usage
from .translate import (
    ChatStreamTranslator,
    ResponsesStreamTranslator,
    StreamTranslator,
)
from .upstream import UpstreamCalls, media_type, passed_headers
from .wire import (
    BadUsage,
    anthropic_stream_usage,
    event_data,
    event_object,
    openai_usage,
    split_events,
)

log = logging.getLogger("spendwarden.proxy")


def translated_events(translator: Any, obj: dict[str, Any]) -> list[bytes]:
    """One upstream stream event in the client's format; an event of an unexpected shape is dropped
    (the response is already streaming: there is no way left to answer with an error status)."""
    try:
        return translator.event(obj)
    except (TypeError, AttributeError, KeyError, ValueError) as exc:
        log.warning("dropped an untranslatable upstream stream event: %s", type(exc).__name__)
        return []


class StreamRelay(UpstreamCalls):
    """Mixed into Proxy: one streamed call to one backend."""

    async def _stream(self, request: web.Request, ctx: RequestState, backend: BackendRt, adm: Admission,
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
            raise AttemptFailed(504 if timeout else 502,
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
                    raise AttemptFailed(502, self._too_large(backend, status)) from None
                ctype = resp.headers.get("Content-Type", "application/json")
                if status == 429 or status >= 500:
                    raise AttemptFailed(status, f"upstream status {status}", raw, ctype, passed_headers(resp.headers))
                self.book.release(adm)
                ctx.status, ctx.outcome, ctx.error = status, "upstream_error", f"upstream status {status}"
                return web.Response(status=status, body=self._client_error(ctx, raw, status),
                                    content_type=media_type(ctype),
                                    headers=self._resp_headers(ctx, backend, resp.headers))
            if "text/event-stream" not in resp.headers.get("Content-Type", ""):
                await self._charge_unknown(ctx, backend, adm)
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
                if ctx.usage is None:  # not settled yet
                    await self._charge_unknown(ctx, backend, adm)
                try:
                    await out.write(stream_error_event(ctx.fmt, 500, "internal proxy error"))
                except (ConnectionError, RuntimeError):
                    pass
            ctx.upstream_time += time.perf_counter() - t_up
            return out
        finally:
            resp.release() if ctx.error is None else resp.close()

    async def _relay(self, ctx: RequestState, backend: BackendRt, adm: Admission, resp: aiohttp.ClientResponse,
                     out: web.StreamResponse, client_usage: bool) -> None:
        anthropic = backend.fmt == ANTHROPIC
        responses = ctx.api == RESPONSES  # OpenAI's response.* events, relayed as they are
        translator: Any = None
        if ctx.translating and responses:
            translator = ResponsesStreamTranslator(ctx.alias or "", ctx.raw)
        elif ctx.translating:
            translator = StreamTranslator(ctx.alias or "", client_usage, ctx.structured) if anthropic \
                else ChatStreamTranslator(ctx.alias or "")
        buf = bytearray()
        usage: TokenUsage | BadUsage | None = None
        complete = False
        failure: str | None = None
        client_gone = False
        seen = 0  # events relayed: what an uncapped stream that breaks is charged for its output
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
                        keep.extend(translated_events(translator, obj))
                        continue
                    if translator is not None:
                        obj = event_object(event_data(ev))
                        if obj is None:
                            continue
                        usage = anthropic_stream_usage(obj, usage)
                        if obj.get("type") == "message_stop":
                            complete = True
                        keep.extend(translated_events(translator, obj))
                        continue
                    if anthropic:
                        head = ev[:48]
                        if b"message_start" in head or b"message_delta" in head:
                            obj = event_object(event_data(ev))
                            if obj is not None:
                                usage = anthropic_stream_usage(obj, usage)
                        elif b"message_stop" in head:
                            complete = True
                    elif responses:
                        found = terminal_usage(ev)
                        if found is not None:  # response.completed, .incomplete or .failed: the last
                            complete, usage = True, found[0]
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
                    seen += len(keep)
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
        # the output at the whole reservation; OpenAI sends its usage chunk (Responses: its terminal
        # response.* event) last, after every choice has
        # finished, so once seen it is final; otherwise the reservation (_charge_unknown). Whichever it
        # is, the access log and the metrics record what the budget was charged.
        if complete and failure is None and not client_gone:
            await self._settle(ctx, backend, adm, usage, seen)
        elif anthropic and isinstance(usage, TokenUsage):
            cap = self._output_cap(ctx, backend) or 0
            await self._settle(ctx, backend, adm, replace(usage, output_tokens=max(usage.output_tokens, cap)))
            ctx.partial = True
        elif isinstance(usage, TokenUsage):
            await self._settle(ctx, backend, adm, usage)
        else:
            await self._charge_unknown(ctx, backend, adm, seen)  # None or BadUsage: the reservation
        if not client_gone:
            try:
                await out.write_eof()
            except (ConnectionError, RuntimeError):
                pass
