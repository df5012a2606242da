"""A fast, scriptable mock LLM upstream speaking the OpenAI and Anthropic wire formats.

Used by the tests, the demo and the benchmarks (where it is the "direct" baseline, so the hot path
does as little as possible: one JSON parse, response bytes assembled from precomputed pieces, no
access log, uvloop when installed).

Endpoints
    POST /v1/chat/completions   OpenAI chat (stream or not; stream_options.include_usage honoured)
    POST /v1/completions        OpenAI legacy completions (stream or not)
    POST /v1/embeddings         OpenAI embeddings (float or base64 encoding)
    GET  /v1/models             the configured model names
    POST /v1/messages           Anthropic Messages (stream or not; max_tokens required, as upstream)
    POST /v1/responses          OpenAI Responses API (stream or not; mock_responses.py), and
                                GET/DELETE /v1/responses/{id}, GET .../input_items, POST .../cancel,
                                POST /v1/responses/input_tokens
    POST /_mock/script          JSON list of behaviours, consumed one per API request, in order
    DELETE /_mock/script        drop the remaining scripted behaviours
    GET  /_mock/requests        received requests and the usage reported for each, plus totals
    POST /_mock/reset           forget requests, totals and script
    GET  /_mock/health          liveness

Usage is deterministic and documented so that tests can predict it:
    prompt tokens  = sum over messages of (ceil(chars/4) + 4) + 2 for chat/messages, where chars counts
                     the text of the message (string content or the "text" of content parts; an
                     Anthropic `system` counts as one more message); ceil(chars/4) per prompt for
                     /v1/completions and per input for /v1/embeddings (a token-id list counts its length).
    output tokens  = min(behaviour `tokens` (default 16), max_tokens / max_completion_tokens if given).
                     finish_reason is "length" ("max_tokens" for Anthropic) when the cap was hit,
                     else "stop" ("end_turn").
    cached tokens  = only when asked (behaviour `cached_tokens`): OpenAI reports it inside
                     prompt_tokens (usage.prompt_tokens_details.cached_tokens); Anthropic reports
                     input_tokens without it and cache_read_input_tokens = cached, as the real APIs do.
    cache writes   = only when asked (behaviour `cache_write_tokens`), Anthropic only: input_tokens =
                     prompt - cached - written, cache_creation_input_tokens = written and
                     cache_creation = {"ephemeral_5m_input_tokens": written, "ephemeral_1h_input_tokens": 0}.

Behaviours (all optional; later sources override earlier ones, field by field):
    server defaults (CLI flags / MockUpstream kwargs) < per-model behaviours (`model_behaviours`,
    selected by the request's "model") < the next scripted behaviour < x-mock-* request headers.

    field            header                     meaning
    latency_ms       x-mock-latency-ms          wait before the first byte (status line)
    chunk_delay_ms   x-mock-chunk-delay-ms      wait between stream events
    tokens           x-mock-tokens              output tokens to generate (before the max_tokens cap)
    status           x-mock-status              answer with this HTTP status and the provider's error body
                                                (OpenAI's as "application/json; charset=utf-8"; a 429 with
                                                the provider's x-ratelimit-* / anthropic-ratelimit-* headers;
                                                x-request-id / request-id on every error; 529 is Anthropic's
                                                overloaded_error)
    retry_after      x-mock-retry-after         Retry-After header value (seconds) on errors
    garbage          x-mock-garbage             200 with a non-JSON body (or non-JSON SSE data)
    disconnect_after x-mock-disconnect-after    close the connection after k stream events (non-stream:
                                                after the headers and half of the body)
    hang             x-mock-hang                never answer (until the client goes away)
    prompt_tokens    x-mock-prompt-tokens       report this prompt/input token count
    completion_tokens x-mock-completion-tokens  report this completion/output token count
    cached_tokens    x-mock-cached-tokens       report this many cached prompt tokens
    cache_write_tokens x-mock-cache-write-tokens  Anthropic: report this many prompt tokens written to the
                                                prompt cache (5-minute TTL)
    reasoning_tokens x-mock-reasoning-tokens    Anthropic with thinking enabled: the thinking tokens (default 8, at
                                                most budget_tokens), output within max_tokens, sent as a thinking
                                                block (mock_anthropic_blocks.py; a forced tool_choice answers a
                                                tool_use block). OpenAI chat and Responses: a reasoning model, which reasons this many
                                                tokens before its `tokens` of answer; the output cap bounds both, and
                                                the output reported includes them (*_tokens_details.reasoning_tokens)
    pad_bytes        x-mock-pad-bytes           make the answer this many bytes larger: a non-streamed answer gets
                                                an "x_mock_padding" string field, a stream a leading SSE comment
    chunked          x-mock-chunked             send a non-streamed answer chunked, without Content-Length
    usage_json       x-mock-usage-json          non-streamed answers: the "usage" object replaced by this JSON text
                                                verbatim (any value: "null", "-3", '{"prompt_tokens": "x"}');
                                                "absent" leaves "usage" out (what is recorded is unchanged)
    content          (script / per model only)  the answer's text instead of lorem ipsum (non-streamed answers)
    refusal          (script / per model only)  refuse: OpenAI message.refusal = this text (content null),
                                                Anthropic stop_reason "refusal" with this text (non-streamed)

Recorded per request (never message contents, never credential headers): path, api, model, stream,
include_usage, max_tokens (and cap_field, the field that carried it), status, the headers minus anything credential-like, the usage reported to
the client (None when none was sent, e.g. a stream without include_usage or a disconnect) and whether
the response completed (usage: prompt_tokens, the whole prompt, completion_tokens, cached_tokens and
cache_write_tokens, the parts of the prompt read from and written to the cache). `totals` sums the usage actually reported, and, as `billed_*`, the usage of
every answer generated (what a provider bills, even when the client went away mid-stream).

Longer than 500 lines: one server speaks two wire formats, streamed and not, with scripted
latencies, errors and usage; the tests' and benchmarks' upstream, not shipped in a runtime path.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import dataclasses
import functools
import json
import math
import os
import socket
import struct
import threading
import time
from typing import Any

from aiohttp import web

from . import mock_anthropic_blocks as blocks_mod
from .mock_responses import ResponsesMock
from .mock_text import (  # noqa: F401 - re-exported: tests and tools import them from here
    _JSON,
    DEFAULT_TOKENS,
    PER_MESSAGE_OVERHEAD,
    REPLY_PRIMING,
    _dumps,
    _loads,
    _piece_json,
    _text,
    _text_chars,
    _with_usage,
    _word_piece,
    chat_prompt_tokens,
    text_tokens,
)

DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4o", "claude-haiku-4-5", "mock-small", "mock-large")
# Headers never recorded: anything that may carry a credential.
_SECRET_MARKERS = ("auth", "key", "cookie", "secret", "token", "password")

_INT_FIELDS = ("latency_ms", "chunk_delay_ms", "tokens", "status", "retry_after", "disconnect_after",
               "prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens", "pad_bytes",
               "reasoning_tokens")
_BOOL_FIELDS = ("garbage", "hang", "chunked")
_CAP_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_STR_FIELDS = ("content", "refusal", "usage_json")
_HEADER_STR_FIELDS = ("usage_json",)


@dataclasses.dataclass(frozen=True)
class Behaviour:
    """How to answer one request. None means "not set here" so that sources can be layered."""

    latency_ms: float | None = None
    chunk_delay_ms: float | None = None
    tokens: int | None = None
    status: int | None = None
    retry_after: int | None = None
    garbage: bool | None = None
    disconnect_after: int | None = None
    hang: bool | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None
    pad_bytes: int | None = None
    chunked: bool | None = None
    content: str | None = None
    refusal: str | None = None
    usage_json: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Behaviour:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown behaviour fields: {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for k, v in data.items():
            if v is None:
                continue
            if k in _BOOL_FIELDS:
                values[k] = _truthy(v)
            elif k in _STR_FIELDS:
                values[k] = str(v)
            elif k in ("latency_ms", "chunk_delay_ms"):
                values[k] = float(v)
            else:
                values[k] = int(v)
        return cls(**values)

    def over(self, base: Behaviour) -> Behaviour:
        """This behaviour layered over `base`: fields set here win."""
        changes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
        return dataclasses.replace(base, **changes) if changes else base

    def as_dict(self) -> dict[str, Any]:
        return dict(_behaviour_dict(self))


@functools.lru_cache(maxsize=256)
def _behaviour_dict(b: Behaviour) -> dict[str, Any]:
    # Cached: recording runs on every request and most requests share a handful of behaviours.
    return {f.name: getattr(b, f.name) for f in dataclasses.fields(b) if getattr(b, f.name) is not None}


@functools.lru_cache(maxsize=1024)
def _recordable_header(name: str) -> str | None:
    """The lower-cased name if the header may be recorded, None if it may carry a credential."""
    low = name.lower()
    return None if any(m in low for m in _SECRET_MARKERS) else low


def _truthy(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


class _State:
    """Everything the handlers share; also read by MockUpstream from the test's thread."""

    def __init__(self, default: Behaviour, model_behaviours: dict[str, Behaviour], models: list[str], record_limit: int):
        self.default = default
        self.model_behaviours = model_behaviours
        self.models = models
        self.script: collections.deque[Behaviour] = collections.deque()
        self.records: collections.deque[dict[str, Any]] = collections.deque(maxlen=record_limit)
        self.lock = threading.Lock()
        self.seq = 0
        self.rid = 0  # response ids; not reset, so ids stay unique for the server's life
        self.stored: dict[str, dict[str, Any]] = {}  # Responses API: what GET /v1/responses/{id} returns
        self.reset_totals()

    def reset_totals(self) -> None:
        self.totals = {"requests": 0, "responses_with_usage": 0, "prompt_tokens": 0, "completion_tokens": 0,
                       "total_tokens": 0, "cached_tokens": 0, "cache_write_tokens": 0,
                       "billed_requests": 0, "billed_prompt_tokens": 0, "billed_completion_tokens": 0}


_EMBEDDING = [round(math.sin(i) / 4, 6) for i in range(16)]
_EMBEDDING_B64 = base64.b64encode(struct.pack(f"<{len(_EMBEDDING)}f", *_EMBEDDING)).decode()

_OPENAI_ERRORS = {
    400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"), 429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None), 502: ("server_error", None), 503: ("server_error", "service_unavailable"),
}
_ANTHROPIC_ERRORS = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 503: "overloaded_error",
    529: "overloaded_error",
}
# What the providers send with a 429 (values of a spent minute), for proxies to pass on.
_OPENAI_RATE_LIMIT_HEADERS = {
    "x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "120ms",
    "x-ratelimit-limit-tokens": "200000", "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "6s"}
_ANTHROPIC_RATE_LIMIT_HEADERS = {
    "anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "0",
    "anthropic-ratelimit-requests-reset": "2030-01-01T00:00:01Z", "anthropic-ratelimit-tokens-limit": "40000",
    "anthropic-ratelimit-tokens-remaining": "0", "anthropic-ratelimit-tokens-reset": "2030-01-01T00:00:06Z"}
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


class _Handlers:
    def __init__(self, state: _State):
        self.s = state

    # -- plumbing ---------------------------------------------------------------------------------

    def behaviour(self, request: web.Request, model: Any) -> Behaviour:
        s = self.s
        b = s.default
        if s.model_behaviours and isinstance(model, str):
            mb = s.model_behaviours.get(model)
            if mb is not None:
                b = mb.over(b)
        if s.script:
            try:
                b = s.script.popleft().over(b)
            except IndexError:  # raced with another request for the last one
                pass
        hdr = None
        for k, v in request.headers.items():
            if len(k) > 7 and k[:7].lower() == "x-mock-":
                if hdr is None:
                    hdr = {}
                hdr[k[7:].lower().replace("-", "_")] = v
        if hdr:
            try:
                b = Behaviour.from_dict({k: v for k, v in hdr.items()
                                         if k in _INT_FIELDS or k in _BOOL_FIELDS or k in _HEADER_STR_FIELDS}).over(b)
            except ValueError as exc:  # a typo in a test's header should say so, not 500
                raise web.HTTPBadRequest(text=f"bad x-mock-* header: {exc}") from exc
        return b

    def record(self, request: web.Request, api: str, req: dict[str, Any], b: Behaviour, status: int,
               usage: dict[str, int] | None, completed: bool) -> dict[str, Any]:
        s = self.s
        with s.lock:
            s.seq += 1
            t = s.totals
            t["requests"] += 1
            if usage is not None:
                t["responses_with_usage"] += 1
                t["prompt_tokens"] += usage["prompt_tokens"]
                t["completion_tokens"] += usage["completion_tokens"]
                t["total_tokens"] += usage["prompt_tokens"] + usage["completion_tokens"]
                t["cached_tokens"] += usage.get("cached_tokens", 0)
                t["cache_write_tokens"] += usage.get("cache_write_tokens", 0)
            so = req.get("stream_options")
            rec = {
                "seq": s.seq,
                "time": time.time(),
                "method": request.method,
                "path": request.path,
                "api": api,
                "model": req.get("model"),
                "stream": bool(req.get("stream")),
                "include_usage": bool(isinstance(so, dict) and so.get("include_usage")),
                "max_tokens": req.get("max_completion_tokens", req.get("max_tokens", req.get("max_output_tokens"))),
                "cap_field": next((k for k in _CAP_FIELDS if k in req), None),  # which field carried it
                "status": status,
                # what translation sent (forced tools, thinking, reasoning): tests check it arrived
                "fields": sorted(req),
                "tool_choice": req.get("tool_choice"),
                "thinking": req.get("thinking"),
                "reasoning_effort": req.get("reasoning_effort"),
                "behaviour": _behaviour_dict(b),  # shared, read-only
                "headers": {low: v for k, v in request.headers.items() if (low := _recordable_header(k))},
                "usage": usage,
                "completed": completed,
            }
            s.records.append(rec)
        return rec

    def bill(self, usage: dict[str, int]) -> None:
        """Bill a request the moment its answer is generated, as a provider does: whether the client
        then reads all of it or goes away (a killed proxy) does not matter."""
        s = self.s
        with s.lock:
            t = s.totals
            t["billed_requests"] += 1
            t["billed_prompt_tokens"] += usage["prompt_tokens"]
            t["billed_completion_tokens"] += usage["completion_tokens"]

    def retract(self, rec: dict[str, Any]) -> None:
        """Undo the usage of a record whose response did not reach the client after all."""
        s = self.s
        with s.lock:
            usage = rec["usage"]
            if usage is not None:
                t = s.totals
                t["responses_with_usage"] -= 1
                t["prompt_tokens"] -= usage["prompt_tokens"]
                t["completion_tokens"] -= usage["completion_tokens"]
                t["total_tokens"] -= usage["prompt_tokens"] + usage["completion_tokens"]
                t["cached_tokens"] -= usage.get("cached_tokens", 0)
                t["cache_write_tokens"] -= usage.get("cache_write_tokens", 0)
            rec["usage"] = None
            rec["completed"] = False

    async def parse(self, request: web.Request) -> dict[str, Any] | web.Response:
        body = await request.read()
        try:
            req = _loads(body)
        except ValueError:
            req = None
        if not isinstance(req, dict):
            return web.Response(status=400, content_type=_JSON,
                                body=_dumps({"error": {"message": "request body is not a JSON object", "type": "invalid_request_error",
                                                       "param": None, "code": None}}))
        return req

    async def pre(self, request: web.Request, b: Behaviour) -> bool:
        """Latency and hang; False when the client went away while hanging."""
        if b.hang:
            # aiohttp does not cancel handlers when the client disconnects, so poll for it (bounded).
            deadline = time.monotonic() + 3600
            while time.monotonic() < deadline:
                tr = request.transport
                if tr is None or tr.is_closing():
                    return False
                await asyncio.sleep(0.05)
            return False
        if b.latency_ms:
            await asyncio.sleep(b.latency_ms / 1000)
        return True

    @staticmethod
    def error(api: str, status: int, b: Behaviour) -> web.Response:
        headers = {"Retry-After": str(b.retry_after)} if b.retry_after is not None else (
            {"Retry-After": "1"} if status == 429 else {})
        msg = f"mock upstream error {status}"
        if api == "anthropic":
            # Anthropic's shape, also for its 529 overloaded_error; every answer carries a request-id.
            body = {"type": "error", "error": {"type": _ANTHROPIC_ERRORS.get(status, "api_error"), "message": msg}}
            headers["Content-Type"] = _JSON
            headers["request-id"] = f"req_mock{status}"
            if status == 429:
                headers.update(_ANTHROPIC_RATE_LIMIT_HEADERS)
        else:
            etype, code = _OPENAI_ERRORS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
            body = {"error": {"message": msg, "type": etype, "param": None, "code": code}}
            headers["Content-Type"] = _JSON + "; charset=utf-8"  # as OpenAI sends its errors
            headers["x-request-id"] = f"req_mock{status}"
            if status == 429:
                headers.update(_OPENAI_RATE_LIMIT_HEADERS)
        return web.Response(status=status, body=_dumps(body), headers=headers)

    @staticmethod
    async def disconnect_midway(request: web.Request, body: bytes) -> web.StreamResponse:
        """Promise the whole body (Content-Length) but send half of it, then close."""
        resp = web.StreamResponse(status=200, headers={"Content-Type": _JSON, "Content-Length": str(len(body))})
        await resp.prepare(request)
        await resp.write(body[: len(body) // 2])
        _close(request)
        return resp

    @staticmethod
    async def answer(request: web.Request, body: bytes, b: Behaviour) -> web.StreamResponse:
        """A non-streamed 200 answer, padded and chunked when asked."""
        if b.pad_bytes:
            body = body[:-1] + b',"x_mock_padding":"' + b"p" * b.pad_bytes + b'"}'
        if not b.chunked:
            return web.Response(body=body, content_type=_JSON)
        resp = web.StreamResponse(status=200, headers={"Content-Type": _JSON})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            for i in range(0, len(body), 65536):
                await resp.write(body[i:i + 65536])
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client stopped reading (a proxy refusing a large answer)
        return resp

    def counts(self, b: Behaviour, cap: Any, prompt_tokens: int) -> tuple[int, int, int, bool]:
        """(prompt tokens reported, tokens generated, completion tokens reported, cap hit)."""
        want = b.tokens if b.tokens is not None else DEFAULT_TOKENS
        hit = isinstance(cap, int) and cap >= 0 and cap <= want
        n = cap if hit else want
        p = b.prompt_tokens if b.prompt_tokens is not None else prompt_tokens
        c = b.completion_tokens if b.completion_tokens is not None else n
        return p, n, c, hit

    def reasoning_counts(self, b: Behaviour, cap: Any, prompt_tokens: int) -> tuple[int, int, int, bool, int]:
        """counts() for a reasoning model (behaviour `reasoning_tokens`): it reasons first, then
        answers, and the output cap bounds both, so (prompt, visible tokens, output reported, cap hit,
        reasoning tokens), the output reported including the reasoning."""
        r = b.reasoning_tokens or 0
        want = (b.tokens if b.tokens is not None else DEFAULT_TOKENS) + r
        p, n, c, hit = self.counts(dataclasses.replace(b, tokens=want), cap, prompt_tokens)
        reasoning = min(r, n)
        return p, n - reasoning, c, hit, reasoning

    # -- OpenAI -----------------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        req = await self.parse(request)
        if isinstance(req, web.Response):
            return req
        prompt = chat_prompt_tokens(req.get("messages") or [])
        return await self._openai(request, req, "chat", prompt, req.get("max_completion_tokens", req.get("max_tokens")))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req = await self.parse(request)
        if isinstance(req, web.Response):
            return req
        return await self._openai(request, req, "completions", text_tokens(req.get("prompt")), req.get("max_tokens"))

    async def early_answer(self, request: web.Request, api: str, req: dict[str, Any], b: Any) -> web.Response | None:
        """Scripted hang, latency and error statuses, the same for both wire formats."""
        if (b.hang or b.latency_ms) and not await self.pre(request, b):
            self.record(request, api, req, b, 0, None, False)
            return web.Response(status=499)
        if b.status and b.status >= 400:
            self.record(request, api, req, b, b.status, None, True)
            return self.error(api, b.status, b)
        return None

    async def _openai(self, request: web.Request, req: dict[str, Any], kind: str, prompt: int, cap: Any) -> web.StreamResponse:
        model = req.get("model")
        b = self.behaviour(request, model)
        early = await self.early_answer(request, "openai", req, b)
        if early is not None:
            return early
        p, n, c, hit, reasoning = self.reasoning_counts(b, cap, prompt)
        usage: dict[str, Any] = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
        if b.cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": min(b.cached_tokens, p)}
        if b.reasoning_tokens is not None:
            usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
        rec = {"prompt_tokens": p, "completion_tokens": c, "cached_tokens": min(b.cached_tokens or 0, p),
               "reasoning_tokens": reasoning}
        finish = "length" if hit else "stop"
        if not b.garbage:
            self.bill(rec)
        self.s.rid += 1
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-mock{self.s.rid}"
        created = int(time.time())
        mjson = _dumps(model)

        if not req.get("stream"):
            if b.garbage:
                self.record(request, "openai", req, b, 200, None, True)
                return web.Response(body=b"<html>upstream exploded</html>", content_type=_JSON)
            if kind == "chat":
                text = b.content if b.content is not None else _text(n)
                choice = {"index": 0, "message": {"role": "assistant", "content": None if b.refusal else text,
                                                  "refusal": b.refusal}, "logprobs": None, "finish_reason": finish}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": _text(n), "logprobs": None, "finish_reason": finish}
                obj = "text_completion"
            body = _dumps(_with_usage({"id": rid, "object": obj, "created": created, "model": model,
                                       "choices": [choice], "usage": usage, "system_fingerprint": None}, b))
            if b.disconnect_after is not None:
                self.record(request, "openai", req, b, 200, None, False)
                return await self.disconnect_midway(request, body)
            self.record(request, "openai", req, b, 200, rec, True)
            return await self.answer(request, body, b)

        so = req.get("stream_options")
        include_usage = isinstance(so, dict) and bool(so.get("include_usage"))
        u = b',"usage":null' if include_usage else b""  # OpenAI sends usage:null on every other chunk
        if kind == "chat":
            head = (b'data: {"id":"' + rid.encode() + b'","object":"chat.completion.chunk","created":' + str(created).encode()
                    + b',"model":' + mjson + b',"system_fingerprint":null,"choices":[{"index":0,')
            events = [head + b'"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]' + u + b"}\n\n"]
            events += [head + b'"delta":{"content":' + _piece_json(i) + b'},"logprobs":null,"finish_reason":null}]' + u + b"}\n\n"
                       for i in range(n)]
            events.append(head + b'"delta":{},"logprobs":null,"finish_reason":"' + finish.encode() + b'"}]' + u + b"}\n\n")
            tail_obj = "chat.completion.chunk"
        else:
            head = (b'data: {"id":"' + rid.encode() + b'","object":"text_completion","created":' + str(created).encode()
                    + b',"model":' + mjson + b',"system_fingerprint":null,"choices":[{"index":0,')
            events = [head + b'"text":' + _piece_json(i) + b',"logprobs":null,"finish_reason":null}]' + u + b"}\n\n"
                      for i in range(n)]
            events.append(head + b'"text":"","logprobs":null,"finish_reason":"' + finish.encode() + b'"}]' + u + b"}\n\n")
            tail_obj = "text_completion"
        if include_usage:
            events.append(b"data: " + _dumps({"id": rid, "object": tail_obj, "created": created, "model": model,
                                              "system_fingerprint": None, "choices": [], "usage": usage}) + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        if b.garbage:
            events = [b"data: {this is not json\n\n", b"data: <html>\n\n"]
        return await self._stream(request, "openai", req, b, events, rec if include_usage and not b.garbage else None)

    async def _stream(self, request: web.Request, api: str, req: dict[str, Any], b: Behaviour, events: list[bytes],
                      usage: dict[str, int] | None) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers=_SSE_HEADERS)
        await resp.prepare(request)
        if b.pad_bytes:
            events = [b": " + b"p" * b.pad_bytes + b"\n\n", *events]
        k = b.disconnect_after
        delay = (b.chunk_delay_ms or 0) / 1000
        # Recorded just before the last event goes out, so that a client that has read the whole
        # stream always finds its record; retracted if the write fails.
        rec = None
        try:
            if k is None and not delay:
                rec = self.record(request, api, req, b, 200, usage, True)
                await resp.write(b"".join(events))  # one write: fewest syscalls for the baseline
            else:
                last = len(events) - 1
                for i, ev in enumerate(events):
                    if k is not None and i >= k:
                        self.record(request, api, req, b, 200, None, False)
                        _close(request)
                        return resp
                    if delay and i:
                        await asyncio.sleep(delay)
                    if i == last:
                        rec = self.record(request, api, req, b, 200, usage, True)
                    await resp.write(ev)
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            # The client went away: the usage was never delivered.
            if rec is not None:
                self.retract(rec)
            else:
                self.record(request, api, req, b, 200, None, False)
        return resp

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        req = await self.parse(request)
        if isinstance(req, web.Response):
            return req
        b = self.behaviour(request, req.get("model"))
        if (b.hang or b.latency_ms) and not await self.pre(request, b):
            self.record(request, "openai", req, b, 0, None, False)
            return web.Response(status=499)
        if b.status and b.status >= 400:
            self.record(request, "openai", req, b, b.status, None, True)
            return self.error("openai", b.status, b)
        inp = req.get("input")
        items = inp if isinstance(inp, list) and inp and not all(isinstance(x, int) for x in inp) else [inp]
        p = b.prompt_tokens if b.prompt_tokens is not None else text_tokens(inp)
        vec: Any = _EMBEDDING_B64 if req.get("encoding_format") == "base64" else _EMBEDDING
        body = _dumps(_with_usage({"object": "list", "model": req.get("model"), "data": [
            {"object": "embedding", "index": i, "embedding": vec} for i in range(len(items))],
            "usage": {"prompt_tokens": p, "total_tokens": p}}, b))
        self.bill({"prompt_tokens": p, "completion_tokens": 0})
        self.record(request, "openai", req, b, 200, {"prompt_tokens": p, "completion_tokens": 0, "cached_tokens": 0}, True)
        return web.Response(body=body, content_type=_JSON)

    async def models(self, request: web.Request) -> web.Response:
        return web.Response(content_type=_JSON, body=_dumps({"object": "list", "data": [
            {"id": m, "object": "model", "created": 1700000000, "owned_by": "spendwarden-mock"} for m in self.s.models]}))

    # -- Anthropic --------------------------------------------------------------------------------

    async def opening(self, request: web.Request, api: str) -> tuple[dict[str, Any], Behaviour] | web.Response:
        """A request's body and behaviour, or the answer already due (not a JSON object; a scripted
        hang, latency or error status)."""
        req = await self.parse(request)
        if isinstance(req, web.Response):
            return req
        b = self.behaviour(request, req.get("model"))
        early = await self.early_answer(request, api, req, b)
        return early if early is not None else (req, b)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        if isinstance(opened := await self.opening(request, "anthropic"), web.StreamResponse):
            return opened
        req, b = opened
        model = req.get("model")
        cap = req.get("max_tokens")
        if not isinstance(cap, int) or cap < 1:
            self.record(request, "anthropic", req, b, 400, None, True)
            return web.Response(status=400, content_type=_JSON, body=_dumps(
                {"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"}}))
        prompt = chat_prompt_tokens(req.get("messages") or [], req.get("system"))
        budget = blocks_mod.thinking_budget(req)
        thought = 0
        if budget is not None:  # extended thinking: output too, within max_tokens (reasoning_counts)
            r = min(b.reasoning_tokens if b.reasoning_tokens is not None else blocks_mod.DEFAULT_THINKING, budget)
            p, n, c, hit, thought = self.reasoning_counts(dataclasses.replace(b, reasoning_tokens=r), cap, prompt)
        else:
            p, n, c, hit = self.counts(b, cap, prompt)
        special = budget is not None or blocks_mod.forced_tool(req) is not None
        cached = min(b.cached_tokens or 0, p)
        written = min(b.cache_write_tokens or 0, p - cached)
        usage = {"input_tokens": p - cached - written, "output_tokens": c, "cache_creation_input_tokens": written,
                 "cache_read_input_tokens": cached,
                 "cache_creation": {"ephemeral_5m_input_tokens": written, "ephemeral_1h_input_tokens": 0}}
        rec = {"prompt_tokens": p, "completion_tokens": c, "cached_tokens": cached, "cache_write_tokens": written}
        stop = "max_tokens" if hit else "tool_use" if blocks_mod.forced_tool(req) is not None else "end_turn"
        if not b.garbage:
            self.bill(rec)
        self.s.rid += 1
        mid = f"msg_mock{self.s.rid}"

        if not req.get("stream"):
            if b.garbage:
                self.record(request, "anthropic", req, b, 200, None, True)
                return web.Response(body=b"<html>upstream exploded</html>", content_type=_JSON)
            text = b.refusal or (b.content if b.content is not None else _text(n))
            content = blocks_mod.blocks(req, text, thought) if special else [{"type": "text", "text": text}]
            body = _dumps(_with_usage({"id": mid, "type": "message", "role": "assistant", "model": model,
                                       "content": content,
                                       "stop_reason": "refusal" if b.refusal else stop,
                                       "stop_sequence": None, "usage": usage}, b))
            if b.disconnect_after is not None:
                self.record(request, "anthropic", req, b, 200, None, False)
                return await self.disconnect_midway(request, body)
            self.record(request, "anthropic", req, b, 200, rec, True)
            return await self.answer(request, body, b)

        def ev(name: bytes, data: bytes) -> bytes:
            return b"event: " + name + b"\ndata: " + data + b"\n\n"

        # message_start carries the input tokens and a provisional output count (1, as upstream does);
        # message_delta carries the final, cumulative output count.
        start_usage = dict(usage, output_tokens=1)
        events = [
            ev(b"message_start", _dumps({"type": "message_start", "message": {
                "id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": start_usage}})),
            ev(b"content_block_start", b'{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}'),
            ev(b"ping", b'{"type":"ping"}'),
        ]
        events += [ev(b"content_block_delta", b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":'
                      + _piece_json(i) + b"}}") for i in range(n)]
        events.append(ev(b"content_block_stop", b'{"type":"content_block_stop","index":0}'))
        if special:  # thinking and forced-tool blocks replace the text block
            content = blocks_mod.blocks(req, _text(n), thought)
            events[1:] = [ev(b"ping", b'{"type":"ping"}')] + [ev(name.encode(), _dumps(data))
                                                            for name, data in blocks_mod.stream_events(content)]
        events.append(ev(b"message_delta", _dumps({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                                   "usage": {"output_tokens": c}})))
        events.append(ev(b"message_stop", b'{"type":"message_stop"}'))
        if b.garbage:
            events = [b"event: message_start\ndata: {not json\n\n"]
        return await self._stream(request, "anthropic", req, b, events, None if b.garbage else rec)

    # -- control ----------------------------------------------------------------------------------

    async def set_script(self, request: web.Request) -> web.Response:
        try:
            items = _loads(await request.read())
            if not isinstance(items, list):
                raise ValueError("expected a JSON list of behaviours")
            parsed = [Behaviour.from_dict(x or {}) for x in items]
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        self.s.script.extend(parsed)
        return web.json_response({"queued": len(self.s.script)})

    async def clear_script(self, request: web.Request) -> web.Response:
        self.s.script.clear()
        return web.json_response({"queued": 0})

    async def get_requests(self, request: web.Request) -> web.Response:
        with self.s.lock:
            data = {"requests": list(self.s.records), "totals": dict(self.s.totals)}
        return web.Response(body=_dumps(data), content_type=_JSON)

    async def reset(self, request: web.Request) -> web.Response:
        with self.s.lock:
            self.s.records.clear()
            self.s.script.clear()
            self.s.reset_totals()
        return web.json_response({"ok": True})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})


def _close(request: web.Request) -> None:
    """Close the connection after flushing what was written (a truncated response to the client)."""
    tr = request.transport
    if tr is not None:
        tr.close()


STATE_KEY = web.AppKey("mock_state", _State)


def _key_check(keys: set[str]) -> Any:
    """A provider's authentication: the key as `Authorization: Bearer` (OpenAI) or `x-api-key`."""
    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        presented = auth[7:] if auth.startswith("Bearer ") else request.headers.get("x-api-key")
        if request.path.startswith("/v1/") and presented not in keys:
            return web.json_response({"error": {"message": "Incorrect API key provided", "type":
                                                "invalid_request_error", "code": "invalid_api_key"}}, status=401)
        return await handler(request)
    return check


def make_app(default: Behaviour | None = None, model_behaviours: dict[str, Behaviour] | None = None,
             models: list[str] | None = None, record_limit: int = 10000) -> web.Application:
    state = _State(default or Behaviour(), dict(model_behaviours or {}), list(models or DEFAULT_MODELS), record_limit)
    h = _Handlers(state)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE_KEY] = state
    app.add_routes([
        web.post("/v1/chat/completions", h.chat),
        web.post("/v1/completions", h.completions),
        web.post("/v1/embeddings", h.embeddings),
        web.get("/v1/models", h.models),
        web.post("/v1/messages", h.messages),
        *ResponsesMock(h).routes(),
        web.post("/_mock/script", h.set_script),
        web.delete("/_mock/script", h.clear_script),
        web.get("/_mock/requests", h.get_requests),
        web.post("/_mock/reset", h.reset),
        web.get("/_mock/health", h.health),
    ])
    return app


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class MockUpstream:
    """The mock upstream on a free 127.0.0.1 port, served from a background thread with its own loop.

    Works from sync and async tests alike (the test's loop is never blocked by the server):

        with MockUpstream(tokens=8) as up:
            OpenAI(base_url=up.openai_url, api_key="x")...     # up.url for Anthropic(base_url=...)
            up.script({"status": 503}, {"disconnect_after": 3})
            up.requests(); up.totals(); up.reset()
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, models: list[str] | None = None,
                 model_behaviours: dict[str, dict[str, Any] | Behaviour] | None = None, record_limit: int = 10000,
                 api_keys: set[str] | None = None, **defaults: Any):
        self.host = host
        self.api_keys = api_keys  # set: a request without one of these keys gets 401, as a provider answers
        self.port = port
        self._default = Behaviour.from_dict(defaults)
        self._model_behaviours = {m: (b if isinstance(b, Behaviour) else Behaviour.from_dict(b))
                                  for m, b in (model_behaviours or {}).items()}
        self._models = models
        self._record_limit = record_limit
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._state: _State | None = None

    @property
    def url(self) -> str:
        """Base URL without /v1 (what the Anthropic SDK wants)."""
        return f"http://{self.host}:{self.port}"

    @property
    def openai_url(self) -> str:
        """Base URL with /v1 (what the OpenAI SDK wants)."""
        return self.url + "/v1"

    def start(self) -> MockUpstream:
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._start_async())
            except BaseException as exc:  # noqa: BLE001 - surface bind errors to the caller, who re-raises
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            if self._runner is not None:  # set by _start_async, which succeeded
                loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, name="mock-upstream", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise failure[0]
        return self

    async def _start_async(self) -> None:
        app = make_app(self._default, self._model_behaviours, self._models, self._record_limit)
        if self.api_keys is not None:
            app.middlewares.append(_key_check(self.api_keys))
        self._state = app[STATE_KEY]
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if not self.port:
            self.port = self._runner.addresses[0][1]

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = self._thread = None

    def __enter__(self) -> MockUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> MockUpstream:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.stop()

    # Direct access to the server's state (same process), no HTTP round trip needed.

    def script(self, *behaviours: dict[str, Any] | Behaviour) -> None:
        """Queue behaviours for the next requests, one each, in order."""
        assert self._state is not None
        self._state.script.extend(b if isinstance(b, Behaviour) else Behaviour.from_dict(b) for b in behaviours)

    def requests(self) -> list[dict[str, Any]]:
        assert self._state is not None
        with self._state.lock:
            return list(self._state.records)

    def totals(self) -> dict[str, int]:
        assert self._state is not None
        with self._state.lock:
            return dict(self._state.totals)

    def reset(self) -> None:
        assert self._state is not None
        with self._state.lock:
            self._state.records.clear()
            self._state.script.clear()
            self._state.reset_totals()


# -- CLI ------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (default 127.0.0.1).")
    parser.add_argument("--port", type=int, default=8000, help="Port (default 8000; 0 picks a free one).")
    parser.add_argument("--tokens", type=int, default=None, help=f"Output tokens per response (default {DEFAULT_TOKENS}).")
    parser.add_argument("--latency-ms", type=float, default=None, help="Delay before the first byte.")
    parser.add_argument("--chunk-delay-ms", type=float, default=None, help="Delay between stream events.")
    parser.add_argument("--status", type=int, default=None, help="Answer every request with this error status.")
    parser.add_argument("--model-behaviour", action="append", default=[], metavar="MODEL=JSON",
                        help='Behaviour for one model name, e.g. \'slow={"chunk_delay_ms": 100}\' (repeatable).')
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="Comma-separated names listed by /v1/models.")
    parser.add_argument("--record-limit", type=int, default=10000, help="Requests kept for /_mock/requests (totals are exact).")
    parser.add_argument("--api-key", action="append", default=[], help="Accept only this API key (repeatable; "
                        "default: any). Read from the environment variable MOCK_API_KEY too.")


def run(args: argparse.Namespace) -> int:
    default = Behaviour.from_dict({"tokens": args.tokens, "latency_ms": args.latency_ms,
                                   "chunk_delay_ms": args.chunk_delay_ms, "status": args.status})
    per_model = {}
    for item in args.model_behaviour:
        name, _, spec = item.partition("=")
        per_model[name] = Behaviour.from_dict(json.loads(spec or "{}"))
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up

        uvloop.install()
    except ImportError:
        pass
    app = make_app(default, per_model, [m for m in args.models.split(",") if m], args.record_limit)
    keys = set(args.api_key) | ({os.environ["MOCK_API_KEY"]} if os.environ.get("MOCK_API_KEY") else set())
    if keys:
        app.middlewares.append(_key_check(keys))
    print(f"mock upstream on http://{args.host}:{args.port} (OpenAI: /v1, Anthropic: /v1/messages)", flush=True)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, shutdown_timeout=1.0)
    return 0
