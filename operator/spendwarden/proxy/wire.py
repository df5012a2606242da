"""Wire formats: request checks by hand (no pydantic per request), usage extraction, SSE events."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import orjson

from ..ledger.pricing import TokenUsage
from ..routing.apis import CHAT, COMPLETIONS, EMBEDDINGS, MESSAGES, OUTPUT_CAP_FIELDS, RESPONSES
from .errors import ProxyError

log = logging.getLogger("spendwarden.proxy")


# More tokens than this in one answer cannot be real (the largest context windows hold about 10M):
# such a count, a negative one or a non-integer is a broken upstream, and believing it would credit or
# wreck the budget. The request is then charged as if usage were unknown: its whole reservation.
MAX_REPORTED_TOKENS = 10**8
# What one request may ask for. Past these its worst case is absurd, and the client was told that the
# budget is exhausted (n = 10**9 on a barely used budget) instead of what is wrong with its request.
MAX_CHOICES = 128  # n: OpenAI's own maximum
MAX_PROMPTS = 2048  # prompts of one /v1/completions request
MAX_OUTPUT_TOKENS = MAX_REPORTED_TOKENS  # max_tokens: no answer can be longer


def bad(message: str, param: str | None = None, code: str = "invalid_request_error") -> ProxyError:
    return ProxyError(400, message, code=code, param=param)


def _int_field(body: dict[str, Any], key: str, maximum: int, minimum: int = 1) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if type(value) is not int:
        raise bad(f"'{key}' must be an integer, got {type(value).__name__}", key, "invalid_type")
    if value < minimum:
        raise bad(f"'{key}' must be at least {minimum}, got {value}", key, "invalid_value")
    if value > maximum:
        raise bad(f"'{key}' must be at most {maximum}, got {value}", key, "invalid_value")
    return value


def _prompts(prompt: Any) -> int:
    """How many prompts a /v1/completions `prompt` holds: a list of strings or of token lists is
    several, a string or one token list is one."""
    if not (isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list))):
        return 1
    if len(prompt) > MAX_PROMPTS:
        raise bad(f"'prompt' holds {len(prompt)} prompts; at most {MAX_PROMPTS} per request", "prompt",
                  "invalid_value")
    return len(prompt)


def _bool_field(body: dict[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if type(value) is not bool:
        raise bad(f"'{key}' must be a boolean, got {type(value).__name__}", key, "invalid_type")
    return value


def _messages(body: dict[str, Any], anthropic: bool) -> None:
    msgs = body.get("messages")
    if not isinstance(msgs, list):
        raise bad("'messages' must be an array of message objects" if msgs is not None
                  else "'messages' is required", "messages", "invalid_type" if msgs is not None else "missing_required_parameter")
    if not msgs:
        raise bad("'messages' must contain at least one message", "messages", "invalid_value")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"'messages[{i}]' must be an object, got {type(m).__name__}", f"messages[{i}]", "invalid_type")
        if not isinstance(m.get("role"), str):
            raise bad(f"'messages[{i}].role' must be a string", f"messages[{i}].role", "invalid_type")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise bad(f"'messages[{i}].content' must be a string or an array of content parts, "
                      f"got {type(content).__name__}", f"messages[{i}].content", "invalid_type")
        if anthropic and content is None:
            raise bad(f"'messages[{i}].content' is required", f"messages[{i}].content", "missing_required_parameter")


def _responses(body: dict[str, Any]) -> None:
    """A Responses API body: `input` a string or a list of input items (objects), `instructions` a
    string; one of input or previous_response_id (a conversation continued server-side) given."""
    inp = body.get("input")
    if inp is not None and not isinstance(inp, (str, list)):
        raise bad(f"'input' must be a string or an array of input items, got {type(inp).__name__}", "input",
                  "invalid_type")
    if isinstance(inp, list):
        for i, item in enumerate(inp):
            if not isinstance(item, dict):
                raise bad(f"'input[{i}]' must be an object, got {type(item).__name__}", f"input[{i}]", "invalid_type")
            content = item.get("content")
            if content is not None and not isinstance(content, (str, list)):
                raise bad(f"'input[{i}].content' must be a string or an array of content parts",
                          f"input[{i}].content", "invalid_type")
    for key in ("instructions", "previous_response_id"):
        value = body.get(key)
        if value is not None and not isinstance(value, str):
            raise bad(f"'{key}' must be a string, got {type(value).__name__}", key, "invalid_type")
    if inp is None and body.get("previous_response_id") is None and body.get("prompt") is None:
        raise bad("'input' is required (or 'previous_response_id' to continue a conversation)", "input",
                  "missing_required_parameter")


def _output_cap(api: str, body: dict[str, Any]) -> int | None:
    """The client's output cap (routing.apis.OUTPUT_CAP_FIELDS, first field given), every field checked."""
    caps = [_int_field(body, key, MAX_OUTPUT_TOKENS) for key in OUTPUT_CAP_FIELDS[api]]
    return next((c for c in caps if c is not None), None)


def check_request(api: str, body: Any) -> tuple[str, bool, int | None, int, bool]:
    """Validate the fields the proxy relies on.

    Returns (model alias, stream, client's output cap or None, choices, tools present).
    """
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}", None, "invalid_type")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' must be a non-empty string" if model is not None else "'model' is required",
                  "model", "invalid_type" if model is not None else "missing_required_parameter")
    if len(model) > 256:  # no alias is longer (ModelRoute spec.model); keeps logs and errors bounded
        raise bad(f"'model' is {len(model)} characters long; model aliases have at most 256", "model",
                  "invalid_value")
    stream = _bool_field(body, "stream") if api != EMBEDDINGS else False
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise bad(f"'tools' must be an array, got {type(tools).__name__}", "tools", "invalid_type")
    choices = 1
    if api == CHAT:
        _messages(body, anthropic=False)
        out = _output_cap(api, body)
        choices = _int_field(body, "n", MAX_CHOICES) or 1
        so = body.get("stream_options")
        if so is not None and not isinstance(so, dict):
            raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
    elif api == COMPLETIONS:
        prompt = body.get("prompt")
        if not isinstance(prompt, (str, list)):
            raise bad("'prompt' must be a string or an array", "prompt", "invalid_type")
        out = _output_cap(api, body)
        choices = (_int_field(body, "n", MAX_CHOICES) or 1) * _prompts(prompt)
        so = body.get("stream_options")
        if so is not None and not isinstance(so, dict):
            raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
    elif api == EMBEDDINGS:
        inp = body.get("input")
        if not isinstance(inp, (str, list)) or (isinstance(inp, list) and not inp):
            raise bad("'input' must be a string or a non-empty array", "input", "invalid_type")
        out = None
    elif api == RESPONSES:
        _responses(body)
        out = _output_cap(api, body)
    else:  # Anthropic messages
        assert api == MESSAGES
        _messages(body, anthropic=True)
        out = _output_cap(api, body)
        system = body.get("system")
        if system is not None and not isinstance(system, (str, list)):
            raise bad("'system' must be a string or an array of text blocks", "system", "invalid_type")
    return model, stream, out, choices, bool(tools)


# -- usage ------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BadUsage:
    """Usage an upstream reported that cannot be right; `reason` names the field (never a value
    the client sent: the log may say it)."""

    reason: str


class _Nonsense(Exception):
    pass


def _count(u: dict[str, Any], key: str) -> int | None:
    """A token count of a usage object: None when absent (or null), _Nonsense when not believable."""
    v = u.get(key)
    if v is None:
        return None
    if type(v) is not int:
        raise _Nonsense(f"{key} is a {type(v).__name__}, not an integer")
    if v < 0:
        raise _Nonsense(f"{key} is negative")
    if v > MAX_REPORTED_TOKENS:
        raise _Nonsense(f"{key} is above {MAX_REPORTED_TOKENS}")
    return v


def believed(usage: TokenUsage | BadUsage | None, route: str | None, backend: str) -> TokenUsage | None:
    """The usage to settle: a BadUsage is logged (field and reason only) and settles as unknown."""
    if isinstance(usage, BadUsage):
        log.warning("route %s backend %s reported usage that cannot be right (%s): charging the reservation",
                    route, backend, usage.reason)
        return None
    return usage


def openai_usage(u: Any) -> TokenUsage | BadUsage | None:
    """OpenAI usage, in either of its shapes: chat/completions/embeddings (prompt_tokens,
    completion_tokens, *_tokens_details) or the Responses API's (input_tokens, output_tokens,
    input_tokens_details.cached_tokens, output_tokens_details.reasoning_tokens). Reasoning tokens are
    inside the output count in both: kept as their part of it, not added."""
    if not isinstance(u, dict):
        return None
    shape = ("prompt_tokens", "completion_tokens") if "prompt_tokens" in u else ("input_tokens", "output_tokens")
    try:
        inp = _count(u, shape[0])
        if inp is None:
            return None
        out = _count(u, shape[1]) or 0  # embeddings report none
        cached = _detail(u, shape[0] + "_details", "cached_tokens")
        reasoning = _detail(u, shape[1] + "_details", "reasoning_tokens")
    except _Nonsense as exc:
        return BadUsage(str(exc))
    return TokenUsage(inp, out, cached, reasoning_tokens=min(reasoning, out))


def _detail(u: dict[str, Any], key: str, field: str) -> int:
    details = u.get(key)
    return (_count(details, field) if isinstance(details, dict) else None) or 0


def anthropic_usage(u: Any, base: TokenUsage | BadUsage | None = None) -> TokenUsage | BadUsage | None:
    """Anthropic usage; `input_tokens` excludes cache reads/writes, which are added here.

    In a stream, message_start carries the input side and message_delta the cumulative output
    (newer APIs repeat input fields there too); `base` is what message_start said, and a field the
    delta leaves out (or sends as null) keeps its value: a delta without cache_creation_input_tokens
    must not drop writes message_start reported, as that would bill them at nothing. Once a part of
    the answer's usage was nonsense, the whole answer's is (`base` stays a BadUsage).
    """
    if not isinstance(u, dict) or isinstance(base, BadUsage):
        return base
    try:
        inp, read, write, out = (_count(u, k) for k in ("input_tokens", "cache_read_input_tokens",
                                                        "cache_creation_input_tokens", "output_tokens"))
        write_1h = _cache_write_1h(u.get("cache_creation"), base)
    except _Nonsense as exc:
        return BadUsage(str(exc))
    if base is not None and inp is None and read is None and write is None:
        if out is None:
            return base
        return replace(base, output_tokens=out)
    if inp is None and out is None:
        return base
    if base is not None:
        read = base.cached_input_tokens if read is None else read
        write = base.cache_write_tokens if write is None else write
        inp = base.input_tokens - base.cached_input_tokens - base.cache_write_tokens if inp is None else inp
    total_in = (inp or 0) + (read or 0) + (write or 0)
    return TokenUsage(total_in, out if out is not None else (base.output_tokens if base else 0), read or 0,
                      write or 0, write_1h if write else 0)


def _cache_write_1h(detail: Any, base: TokenUsage | None) -> int:
    """The 1-hour-TTL part of the cache writes (newer APIs' usage.cache_creation); when absent,
    what message_start said, else none (all writes billed at the 5-minute price)."""
    if isinstance(detail, dict):
        return _count(detail, "ephemeral_1h_input_tokens") or 0
    return base.cache_write_1h_tokens if base is not None else 0


def usage_from_body(fmt_anthropic: bool, raw: bytes) -> tuple[Any, TokenUsage | BadUsage | None]:
    """Parse a non-streamed response body; raises ValueError on garbage."""
    doc = orjson.loads(raw)
    if not isinstance(doc, dict):
        raise ValueError("response is not a JSON object")
    u = doc.get("usage")
    return doc, (anthropic_usage(u) if fmt_anthropic else openai_usage(u))


# -- server-sent events -----------------------------------------------------------------------------

def split_events(buf: bytearray) -> list[bytes]:
    """Remove and return the complete events (each with its blank-line terminator) from `buf`."""
    end = buf.rfind(b"\n\n")
    end_crlf = buf.rfind(b"\r\n\r\n")
    if end < 0 and end_crlf < 0:
        return []
    cut = max(end + 2 if end >= 0 else -1, end_crlf + 4 if end_crlf >= 0 else -1)
    block = bytes(buf[:cut])
    del buf[:cut]
    if b"\r\n" in block:
        block = block.replace(b"\r\n", b"\n")
    parts = block.split(b"\n\n")
    return [p + b"\n\n" for p in parts if p.strip()]


def event_data(event: bytes) -> bytes | None:
    """The data payload of one event (joined data: lines)."""
    data = None
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            chunk = line[5:]
            if chunk.startswith(b" "):
                chunk = chunk[1:]
            data = chunk if data is None else data + b"\n" + chunk
    return data


def event_object(data: bytes | None) -> dict[str, Any] | None:
    """An event's data (event_data) as a JSON object; None for [DONE], garbage or anything else."""
    try:
        obj = orjson.loads(data) if data else None
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def anthropic_stream_usage(obj: dict[str, Any], usage: TokenUsage | BadUsage | None
                           ) -> TokenUsage | BadUsage | None:
    """The usage so far after one Anthropic stream event: message_start carries the prompt's,
    message_delta the output's (merged into what message_start said)."""
    kind = obj.get("type")
    if kind == "message_start":
        msg = obj.get("message")
        return anthropic_usage(msg.get("usage") if isinstance(msg, dict) else None)
    if kind == "message_delta":
        return anthropic_usage(obj.get("usage"), usage)
    return usage
