"""Chat requests across wire formats, both ways: the proxy's side of `spendwarden.wire.translate`.

The pure conversions (requests, responses, stream events) live in spendwarden.wire.translate; this
module adapts them to the proxy: the admitted output cap replaces the client's, streams become
SSE bytes (with `[DONE]` for OpenAI clients and `event:` lines for Anthropic ones), errors (bodies
and mid-stream error events) change shape, and what cannot be translated is a 400 naming it.

/v1/completions and /v1/embeddings have no Anthropic counterpart and are refused by the server.

Every request field, and what it becomes (wire/fields.py refuses any field not listed, naming it;
"refused" means a 400 in the client's error format, param = the field, nothing sent upstream):

OpenAI chat -> Anthropic Messages
    model, messages             the backend's model; system/developer -> system; tool -> tool_result
    max_tokens, max_completion_tokens   max_tokens = the admitted output cap (what is reserved)
    temperature, top_p          as is; temperature above 1 (Anthropic's maximum) refused
    stop                        stop_sequences
    user, safety_identifier     metadata.user_id (both name the end user)
    tools, tool_choice          Anthropic tools / tool_choice (required -> any, function -> tool)
    parallel_tool_calls         false -> tool_choice.disable_parallel_tool_use; true/absent: the default
    response_format             text: nothing; json_schema {name, schema} -> the one tool the model must
                                call (tools=[{name, input_schema: schema}], tool_choice {type: tool});
                                json_object -> the same with input_schema {type: object} (JSON mode
                                promises a valid object, no shape: exactly a tool's input). The call's
                                input is returned as message.content (a JSON string; streamed as
                                content deltas from input_json_delta), finish_reason "stop". Refused with
                                tools (the model could no longer choose them) and with reasoning_effort
                                (Anthropic forbids forcing a tool while thinking); schema type must be object
    reasoning_effort            none/minimal: no thinking; low/medium/high/xhigh -> thinking {type:
                                enabled, budget_tokens: 1024/4096/16384/32768, at most half the admitted
                                cap, at least 1024}; thinking tokens are output within max_tokens, so the
                                reservation still bounds the bill; a cap of 1024 or less is refused
    n                           1 passes; more refused
    stream, stream_options      stream; include_usage answered by the proxy from Anthropic's usage
    prompt_cache_key            no-op: a routing hint for OpenAI's cache, the answer does not depend on it
    modalities ["text"], service_tier auto/default   no-ops (what Anthropic serves); other values refused
    logprobs, top_logprobs, seed, logit_bias, presence_penalty, frequency_penalty, functions,
    function_call, store, metadata, audio, prediction, web_search_options, verbosity
                                refused unless at their default (false, 0, {}, null: SDKs send those)
    anything else               refused
Anthropic Messages -> OpenAI chat
    model, messages, system     as is (system first; tool_use -> tool_calls; tool_result -> tool)
    max_tokens                  max_completion_tokens (api.openai.com) or max_tokens (compatible servers)
    temperature, top_p, stop_sequences (stop), stream (with include_usage), tools, tool_choice
                                as is (any -> required, tool -> function)
    tool_choice.disable_parallel_tool_use   parallel_tool_calls false
    metadata.user_id            user (other metadata keys refused)
    thinking                    enabled -> reasoning_effort low (budget < 4096), medium (< 16384), high;
                                disabled: nothing; other types (adaptive) refused. OpenAI returns no
                                thinking blocks (its chat API shows no reasoning); reasoning tokens are
                                billed as output (completion_tokens)
    cache_control (on blocks)   no-op: OpenAI caches prompt prefixes by itself, cached tokens are priced
    service_tier auto           no-op; other values refused
    top_k, server tools (web_search, code execution...), thinking blocks in history, anything else
                                refused
"""
from __future__ import annotations

import time
from typing import Any

import orjson

from ..wire import responses as wr
from ..wire import translate as wt
from .errors import anthropic_error_type, openai_error_type, provider_error
from .wire import bad


def _refused(exc: wt.TranslationError) -> Exception:
    # A refused field is named first, quoted ('logprobs' ...): it is the error's param as well.
    text = str(exc)
    param = text[1:].split("'", 1)[0].split("[", 1)[0] if text.startswith("'") else "messages"
    return bad(f"cannot translate this request for the backend's API: {text}", param, "untranslatable")


def chat_to_messages(body: dict[str, Any], model: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    """An OpenAI chat request as an Anthropic Messages request, with the admitted output cap."""
    try:
        out = wt.openai_chat_to_anthropic(body, model)
    except wt.TranslationError as exc:
        raise _refused(exc) from None
    out["max_tokens"] = max_tokens
    # The thinking budget lives within the admitted cap (thinking is output, billed within max_tokens).
    out.pop("thinking", None)
    try:
        thinking = wt.thinking_for(body.get("reasoning_effort"), max_tokens)
    except wt.TranslationError as exc:
        raise _refused(exc) from None
    if thinking is not None:
        out["thinking"] = thinking
    out.pop("stream", None)
    if stream:
        out["stream"] = True
    return out


def responses_to_messages(body: dict[str, Any], model: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    """A Responses API request (text only: wire/responses.py) as an Anthropic Messages request."""
    try:
        return wr.responses_to_anthropic(body, model, max_tokens, stream)
    except wt.TranslationError as exc:
        raise bad(f"cannot translate this request for the backend's API: {exc}", "input", "untranslatable") from None


def message_to_response(doc: dict[str, Any], alias: str, raw_request: bytes | bytearray) -> dict[str, Any]:
    return wr.anthropic_to_response(doc, alias, orjson.loads(raw_request), int(time.time()))


def messages_to_chat(body: dict[str, Any], model: str, max_tokens: int, stream: bool,
                     openai_native: bool) -> dict[str, Any]:
    """An Anthropic Messages request as an OpenAI chat request, with the admitted output cap."""
    try:
        out = wt.anthropic_to_openai_chat(body, model)
    except wt.TranslationError as exc:
        raise _refused(exc) from None
    out.pop("max_tokens", None)
    # api.openai.com wants max_completion_tokens (reasoning models refuse max_tokens); servers that
    # merely speak the API (vLLM, llama.cpp, TGI) know max_tokens.
    out["max_completion_tokens" if openai_native else "max_tokens"] = max_tokens
    out.pop("stream", None)
    out.pop("stream_options", None)
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def structured(body: dict[str, Any]) -> bool:
    """The chat request's response_format is sent to Anthropic as a forced tool (its input: the answer)."""
    return wt.structured_tool(body.get("response_format")) is not None


def message_to_chat(doc: dict[str, Any], alias: str, structured: bool = False) -> dict[str, Any]:
    return wt.anthropic_to_openai_response(doc, alias, structured)


def chat_to_message(doc: dict[str, Any], alias: str) -> dict[str, Any]:
    return wt.openai_to_anthropic_response(doc, alias)


def error_to_openai(raw: bytes, status: int | None = None) -> bytes:
    """An Anthropic error body in OpenAI's shape (unchanged if it is not one). With the provider's
    `status`, the type is OpenAI's for it and the code keeps Anthropic's type (e.g. overloaded_error)."""
    err = provider_error(raw)
    if err is None:
        return raw
    etype, message = err
    if status is None:
        return orjson.dumps({"error": {"message": message, "type": etype or "api_error", "param": None,
                                       "code": etype}})
    code = "rate_limit_exceeded" if status == 429 else etype
    return orjson.dumps({"error": {"message": message, "type": openai_error_type(status), "param": None,
                                   "code": code}})


def error_to_anthropic(raw: bytes, status: int | None = None) -> bytes:
    """An OpenAI error body in Anthropic's shape (unchanged if it is not one). With the provider's
    `status`, the type is Anthropic's for it (OpenAI's "server_error" is no Anthropic type)."""
    err = provider_error(raw)
    if err is None:
        return raw
    etype, message = err
    atype = anthropic_error_type(status, etype) if status is not None else etype or "api_error"
    return orjson.dumps({"type": "error", "error": {"type": atype, "message": message}})


def _openai_sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _anthropic_sse(obj: dict[str, Any]) -> bytes:
    return b"event: " + str(obj.get("type", "")).encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


class StreamTranslator:
    """Anthropic stream events (parsed) in, OpenAI chat.completion.chunk SSE bytes out."""

    def __init__(self, alias: str, include_usage: bool, structured: bool = False):
        self._t = wt.AnthropicToOpenAIStream(alias, include_usage, structured)

    def event(self, obj: dict[str, Any]) -> list[bytes]:
        if obj.get("type") == "error":
            err = obj.get("error") or {}
            return [_openai_sse({"error": {"message": err.get("message", ""), "type": err.get("type", "api_error"),
                                           "param": None, "code": err.get("type")}})]
        out = [_openai_sse(chunk) for chunk in self._t.feed(obj)]
        if obj.get("type") == "message_stop":
            out.append(b"data: [DONE]\n\n")
        return out


class ResponsesStreamTranslator:
    """Anthropic stream events (parsed) in, the Responses API's SSE events (event: + data:) out."""

    def __init__(self, alias: str, raw_request: bytes | bytearray):
        self._t = wr.AnthropicToResponsesStream(alias, orjson.loads(raw_request), int(time.time()))

    def event(self, obj: dict[str, Any]) -> list[bytes]:
        if obj.get("type") == "error":  # as the SDK raises it mid-stream: a data event with "error"
            err = obj.get("error") or {}
            return [_openai_sse({"error": {"message": err.get("message", ""), "type": err.get("type", "api_error"),
                                           "param": None, "code": err.get("type")}})]
        return [_anthropic_sse(ev) for ev in self._t.feed(obj)]


class ChatStreamTranslator:
    """OpenAI chat.completion.chunk objects (parsed) in, Anthropic SSE events out."""

    def __init__(self, alias: str):
        self._t = wt.OpenAIToAnthropicStream(alias)

    def event(self, obj: dict[str, Any]) -> list[bytes]:
        if isinstance(obj.get("error"), dict):
            err = obj["error"]
            return [_anthropic_sse({"type": "error", "error": {"type": err.get("type") or "api_error",
                                                               "message": err.get("message", "")}})]
        return [_anthropic_sse(ev) for ev in self._t.feed(obj)]

    def done(self) -> list[bytes]:
        return [_anthropic_sse(ev) for ev in self._t.finish()]
