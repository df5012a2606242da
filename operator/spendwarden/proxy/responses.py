"""OpenAI's Responses API: what the pipeline (server.py) needs to meter `POST /v1/responses` like
chat, and the endpoints around it that are free.

Metered (server.py `_serve`, as chat): the alias from `model`, the route's rules and fallbacks,
budgets with a reservation. The prompt is estimated from `instructions` and `input` (a string, or
input items: messages with content parts, function calls and outputs, reasoning items), the output
bounded by `max_output_tokens`, which for reasoning models bounds reasoning and visible output
together, as the provider bills both as output (the proxy's default cap is sent when the client
gave none and a budget needs a worst case). Usage comes from the body, or in a stream from its
terminal event (`response.completed`, `.incomplete` or `.failed`), with
input_tokens_details.cached_tokens priced as cached input and output_tokens_details.reasoning_tokens
reported on its own (as output). Tiers and the response cache do not apply (spend.py): the tier
scorer and judge read chat messages, and a cached answer would replay a response id the provider
stored for another call.

OpenAI-format backends serve it as it is. An Anthropic backend serves it only when the request is
text only (instructions and input messages of text, no tools, no server-side state, no reasoning
or structured format: wire/responses.py), translated both ways, streams included, and billed by
Anthropic's usage; the answer is not stored (its id cannot be retrieved or continued). Anything
else skips the route's Anthropic backends, and when none other is left it is refused with a 400
naming the field and the endpoints that do work, rather than a translation that silently drops
what the Responses API adds.

previous_response_id (and `conversation`, `prompt` templates, `item_reference` input items): the
earlier conversation is stored by the provider and billed as prompt again, but is not in the body,
so the body's estimate does not bound it. When a budget applies, the request reserves as its prompt
the backend's `maxContextTokens` (the largest of those it may be sent to): no call can bill more
prompt than its context window holds (with truncation "disabled", the provider's default, a longer
conversation fails; with "auto" it is cut to fit). The output is reserved as for any request and
clamped to what the budget allows; a budget that cannot hold the prompt bound refuses with 429.
When no backend of the route declares maxContextTokens there is no bound to reserve, and the
request is refused with a 400 that says what to do (declare it, or send the conversation in
`input`) instead of guessing: a guessed default would be either too small to be safe or so large
that it refuses everything. Without a budget nothing is reserved and the provider's usage is
recorded as always. The settled charge is always the provider's reported usage.

Built-in tools billed per call besides their tokens (web_search*, file_search, code_interpreter,
image_generation) are refused under a budget with a 400 naming the tool: the route has no price
for those fees, and a budget must not be passed by what it cannot see. Function, custom and MCP
tools are metered by their tokens like any other.

Free (not metered, no budget): `GET/DELETE /v1/responses/{id}`, `GET /v1/responses/{id}/input_items`
and `POST /v1/responses/{id}/cancel` are forwarded to an OpenAI backend. The proxy does not record
which backend created an id, so the backend is the default one of the route named by a `model`
query parameter (the SDKs: extra_query={"model": alias}), else the namespace's only OpenAI backend
(account: base URL and key); when there are several, a 400 asks for `model`.
`POST /v1/responses/input_tokens` is forwarded to the alias's OpenAI backend (provider OpenAI) or
answered with the proxy's estimate of the body (which cannot count a previous_response_id).
"""
from __future__ import annotations

import logging
import re
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from ..ledger.pricing import TokenUsage
from ..routing.apis import RESPONSES
from .config import OPENAI, BackendRt, RouteRt
from .counting import TokenCounting
from .errors import ProxyError, error_body, refusal
from .limits import AnswerTooLarge, read_answer
from .upstream import media_type, passed_headers
from .wire import BadUsage, bad, event_data, event_object, openai_usage

log = logging.getLogger("spendwarden.proxy")

# The stream's last event, each with the response's usage (response.failed's may be null).
_TERMINAL = (b"response.completed", b"response.incomplete", b"response.failed")
# Built-in tools with per-call (or per-container, per-image) fees besides their tokens.
_FEE_TOOLS = ("web_search", "file_search", "code_interpreter", "image_generation")
# A response id as the provider makes them (resp_...): anything else never reaches a backend's path.
_ID = re.compile(r"^[A-Za-z0-9_\-]{1,200}$")
# (method, path, handler name): served by Proxy.app and the gateway alike.
RESPONSE_ROUTES = (
    ("POST", "/v1/responses/input_tokens", "responses_input_tokens"),
    ("GET", "/v1/responses/{id}", "stored_response"),
    ("DELETE", "/v1/responses/{id}", "stored_response"),
    ("GET", "/v1/responses/{id}/input_items", "stored_response"),
    ("POST", "/v1/responses/{id}/cancel", "stored_response"),
)


def terminal_usage(ev: bytes) -> tuple[TokenUsage | BadUsage | None] | None:
    """The usage of a Responses stream's terminal event, as a 1-tuple; None for any other event.
    Only events whose first bytes name a terminal type are parsed (the hot path skips the deltas)."""
    head = ev[:80]
    if not any(t in head for t in _TERMINAL):
        return None
    obj = event_object(event_data(ev))
    kind = obj.get("type") if obj is not None else None
    if obj is None or not isinstance(kind, str) or kind.encode() not in _TERMINAL:
        return None
    r = obj.get("response")
    return (openai_usage(r.get("usage")) if isinstance(r, dict) else None,)


def unknown_conversation(body: dict[str, Any]) -> bool:
    """The request's prompt includes what the provider stored, which the body does not hold."""
    if body.get("previous_response_id") is not None or body.get("conversation") is not None \
            or body.get("prompt") is not None:
        return True
    inp = body.get("input")
    return isinstance(inp, list) and any(isinstance(i, dict) and i.get("type") == "item_reference" for i in inp)


def conversation_backends(route: RouteRt, usable: list[BackendRt]) -> list[BackendRt]:
    """The backends whose context window bounds a continued conversation's prompt; a 400 when none."""
    bounded = [b for b in usable if b.max_context is not None]
    if not bounded:
        raise bad(f"this request continues a conversation stored by the provider (previous_response_id, "
                  f"conversation, prompt or item_reference), whose prompt cost is not in the request, and "
                  f"route {route.name!r} has a budget but no backend with maxContextTokens to bound it: set "
                  f"maxContextTokens on the route's backends, or send the conversation in 'input' instead",
                  "previous_response_id", "unbounded_prompt")
    return bounded


def conversation_bound(usable: list[BackendRt], downgrade_to: BackendRt | None) -> int:
    """The prompt tokens to reserve for a continued conversation: the largest context window it may
    be sent to (a Downgrade budget's backend included, when it declares one)."""
    windows = [b.max_context for b in usable if b.max_context is not None]
    if downgrade_to is not None and downgrade_to.max_context is not None:
        windows.append(downgrade_to.max_context)
    return max(windows)


def unpriced_tools(route: RouteRt, body: dict[str, Any]) -> None:
    """Under a budget, a built-in tool the provider bills per call (on top of the tokens, which are
    metered) is refused: no route can price those fees yet, and a budget must not be passed by
    what it cannot see (as a model without a price is not reserved at zero)."""
    for i, tool in enumerate(body.get("tools") or ()):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(kind, str) and kind.startswith(_FEE_TOOLS):
            raise bad(f"tools[{i}]: the built-in tool {kind!r} is billed per call on top of its tokens, which route "
                      f"{route.name!r} cannot price, so its budget cannot bound it: use a function tool, or call "
                      "this model on a route without a budget", f"tools[{i}]", "unpriced_tool")


def wrong_format(route: RouteRt, selected: BackendRt, reason: str | None) -> ProxyError:
    """The request cannot go to the route's (Anthropic) backends: `reason`, what is not translated."""
    return bad(f"the Responses API (/v1/responses) is served only by OpenAI backends, or translated to an "
               f"Anthropic one when the request is text only ({reason}); route {route.name!r} (model "
               f"{route.alias!r}) sends it to backend {selected.name!r}, which speaks the {selected.provider} API: "
               f"use /v1/chat/completions or /v1/messages for this model", "model", "format_mismatch")


def _account(b: BackendRt) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Where a stored response lives: the provider account (base URL and credentials)."""
    return b.base_url, tuple(sorted(b.headers.items()))


class ResponsesEndpoints(TokenCounting):
    """Mixed into Proxy: the Responses API's endpoints that call no completion."""

    def response_routes(self) -> list[tuple[str, str, Any]]:
        return [(method, path, getattr(self, name)) for method, path, name in RESPONSE_ROUTES]

    def stored_backend(self, model: str | None) -> BackendRt:
        """The backend holding the stored responses (see the module docstring); ProxyError otherwise."""
        cfg = self.compiled
        assert cfg is not None
        if model is not None:
            route = cfg.routes.get(model)
            if route is None:
                raise ProxyError(404, f"The model '{model[:256]}' does not exist in namespace {cfg.namespace}",
                                 code="model_not_found", param="model")
            found = route.default if route.default.fmt == OPENAI else \
                next((b for b in route.backends.values() if b.fmt == OPENAI), None)
            if found is None:
                raise bad(f"route {route.name!r} has no OpenAI backend; the Responses API is served only by "
                          "OpenAI backends", "model", "format_mismatch")
            return found
        accounts: dict[Any, BackendRt] = {}
        for route in sorted(cfg.routes.values(), key=lambda r: r.name):
            for b in route.backends.values():
                if b.fmt == OPENAI:
                    accounts.setdefault(_account(b), b)
        if len(accounts) == 1:
            return next(iter(accounts.values()))
        if not accounts:
            raise bad(f"namespace {cfg.namespace} has no OpenAI backend: no stored responses to reach", "model",
                      "format_mismatch")
        raise bad(f"namespace {cfg.namespace} has {len(accounts)} OpenAI backends and the proxy does not record "
                  "which one created a response: add the query parameter model=<the alias that created it> "
                  "(openai SDK: extra_query={'model': '<alias>'})", "model", "ambiguous_backend")

    async def stored_response(self, request: web.Request) -> web.StreamResponse:
        """GET/DELETE a stored response, its input_items, cancel: forwarded, not metered (free)."""
        assert self.session is not None
        rid = request.match_info["id"]
        try:
            if not _ID.match(rid):
                raise bad("the response id must be letters, digits, '_' or '-'", "response_id", "invalid_value")
            backend = self.stored_backend(request.query.get("model"))
            if backend.missing_credentials:
                raise ProxyError(502, f"no API key for backend {backend.name} (secret {backend.missing_credentials})",
                                 code="bad_gateway")
        except ProxyError as exc:
            return refusal(OPENAI, exc)
        query = [(k, v) for k, v in request.query.items() if k != "model"]
        url = URL(backend.base_url + request.path[len("/v1"):]).with_query(query)
        try:
            async with self.session.request(request.method, url, headers=self._headers(request, backend, False),
                                            data=b"{}" if request.method == "POST" else None,
                                            timeout=self._timeout(backend, False)) as resp:
                raw = await read_answer(resp, self.max_answer)
                headers = {"x-spendwarden-backend": backend.name, **passed_headers(resp.headers)}
                return web.Response(status=resp.status, body=raw, headers=headers,
                                    content_type=media_type(resp.headers.get("Content-Type", "")))
        except (TimeoutError, aiohttp.ClientError, OSError, AnswerTooLarge) as exc:
            log.warning("backend %s: %s %s failed: %s", backend.name, request.method, "/v1/responses/{id}",
                        type(exc).__name__)
            return web.Response(status=502, content_type="application/json", body=error_body(
                OPENAI, 502, f"upstream backend {backend.name!r} failed: {type(exc).__name__}", code="bad_gateway"))

    async def responses_input_tokens(self, request: web.Request) -> web.StreamResponse:
        """Token counting of a Responses body: forwarded to the alias's default backend when it is
        OpenAI's own (free, not metered), else the proxy's estimate (alias-less bodies too)."""
        def backend_of(body: dict[str, Any]) -> BackendRt | None:
            model = body.get("model")
            if model is not None and not isinstance(model, str):
                raise ValueError("'model' must be a string")
            assert self.compiled is not None
            route = self.compiled.routes.get(model) if model else None
            if model and route is None:
                raise ProxyError(404, f"The model '{model[:256]}' does not exist", code="model_not_found",
                                 param="model")
            b = route.default if route is not None else None
            return b if b is not None and b.fmt == OPENAI and b.provider == "OpenAI" else None
        return await self._count(request, OPENAI, RESPONSES, backend_of, "/input_tokens",
                                 lambda est: {"object": "response.input_tokens", "input_tokens": est})


__all__ = ["RESPONSE_ROUTES", "ResponsesEndpoints", "terminal_usage", "unknown_conversation", "unpriced_tools",
           "conversation_backends", "conversation_bound", "wrong_format"]
