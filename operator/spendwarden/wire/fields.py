"""Which request fields cross between OpenAI chat and Anthropic Messages, and how.

Every top-level field of a request is either translated (spendwarden.wire.translate), a documented
no-op on the other side, or refused with TranslationError naming it: a field not listed here is
refused too, so that a field added to either API later is never dropped silently. The table of
what each field becomes is in spendwarden.proxy.translate's docstring.

Also here: OpenAI's `response_format` as an Anthropic forced tool, and `reasoning_effort` <->
Anthropic's `thinking.budget_tokens`.
"""
from __future__ import annotations

from typing import Any


class TranslationError(ValueError):
    """The request uses something the other API cannot express."""


# OpenAI chat fields that translate.openai_chat_to_anthropic turns into Anthropic ones.
OPENAI_TRANSLATED = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stream", "stop",
    "user", "safety_identifier", "tools", "tool_choice", "parallel_tool_calls", "response_format",
    "reasoning_effort", "n",
})
# OpenAI chat fields with no effect on what the model answers, or answered by the proxy itself.
OPENAI_NO_OPS = frozenset({
    "stream_options",    # include_usage: the proxy builds the usage chunk from Anthropic's usage
    "prompt_cache_key",  # a routing hint for OpenAI's prompt cache; the answer does not depend on it
})


def _default(value: Any) -> bool:
    """The value a client sends when it does not use the field (SDKs and frameworks send these)."""
    return value is None or value is False or value == 0 or value == {} or value == []


def _refuse(field: str, why: str) -> TranslationError:
    return TranslationError(f"'{field}' {why}")


# Fields refused when set (not to their default): what to tell the client.
_OPENAI_REFUSED = {
    "logprobs": "(log probabilities) is not available from an Anthropic backend: remove it, or use a route "
                "whose backend is OpenAI",
    "top_logprobs": "(log probabilities) is not available from an Anthropic backend: remove it, or use a route "
                    "whose backend is OpenAI",
    "seed": "(deterministic sampling) has no Anthropic equivalent: remove it, or use an OpenAI backend",
    "logit_bias": "has no Anthropic equivalent: remove it, or use an OpenAI backend",
    "presence_penalty": "has no Anthropic equivalent: remove it (or send 0), or use an OpenAI backend",
    "frequency_penalty": "has no Anthropic equivalent: remove it (or send 0), or use an OpenAI backend",
    "functions": "(deprecated function calling) is not translated: send 'tools' instead",
    "function_call": "(deprecated function calling) is not translated: send 'tool_choice' instead",
    "store": "(stored completions) is an OpenAI feature: remove it, or use an OpenAI backend",
    "metadata": "(stored-completion metadata) is an OpenAI feature: remove it, or use an OpenAI backend",
    "audio": "(audio output) is not available from an Anthropic backend",
    "prediction": "(predicted outputs) is not available from an Anthropic backend: remove it",
    "web_search_options": "is not translated to Anthropic's web search tool: remove it, or use an OpenAI backend",
    "verbosity": "has no Anthropic equivalent: remove it, or use an OpenAI backend",
}


def check_openai_fields(body: dict[str, Any]) -> None:
    """Refuse any field of an OpenAI chat request that would be lost on an Anthropic backend."""
    for key, value in body.items():
        if key in OPENAI_TRANSLATED or key in OPENAI_NO_OPS:
            continue
        if key == "modalities" and value in (None, ["text"]):
            continue  # text is what Anthropic answers
        if key == "service_tier" and value in (None, "auto", "default"):
            continue  # the standard tier: what an Anthropic backend serves
        if key in _OPENAI_REFUSED:
            if _default(value):
                continue
            raise _refuse(key, _OPENAI_REFUSED[key])
        raise _refuse(key, "cannot be sent to an Anthropic backend: remove it, or use a route whose backend "
                           "speaks the OpenAI API")


# Anthropic Messages fields that translate.anthropic_to_openai_chat turns into OpenAI ones.
ANTHROPIC_TRANSLATED = frozenset({
    "model", "messages", "max_tokens", "system", "temperature", "top_p", "stream", "stop_sequences",
    "tools", "tool_choice", "metadata", "thinking",
})


def check_anthropic_fields(body: dict[str, Any]) -> None:
    """Refuse any field of an Anthropic request that would be lost on an OpenAI backend."""
    for key, value in body.items():
        if key in ANTHROPIC_TRANSLATED:
            continue
        if key == "service_tier" and value in (None, "auto"):
            continue
        if key == "top_k":
            if value is None:
                continue
            raise _refuse(key, "has no OpenAI equivalent: remove it, or use a route whose backend is Anthropic")
        raise _refuse(key, "cannot be sent to an OpenAI backend: remove it, or use a route whose backend "
                           "speaks the Anthropic API")
    metadata = body.get("metadata")
    if metadata is not None and (not isinstance(metadata, dict) or set(metadata) - {"user_id"}):
        raise _refuse("metadata", "may only hold user_id on an OpenAI backend (sent as 'user')")
    for i, tool in enumerate(body.get("tools") or []):
        if not isinstance(tool, dict) or tool.get("type") not in (None, "custom") or "name" not in tool:
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise _refuse(f"tools[{i}]", f"(type {kind!r}) is an Anthropic server tool, which an OpenAI backend "
                                         "cannot run: use a route whose backend is Anthropic")


# ---------------------------------------------------------------- response_format -> forced tool

def structured_tool(response_format: Any) -> dict[str, Any] | None:
    """OpenAI's `response_format` as the one Anthropic tool the model is forced to call (its input
    is the JSON answer), or None for plain text. json_object has no schema: its tool takes any
    object, which is exactly what JSON mode promises (a valid JSON object, no particular shape)."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"name": "json_object", "description": "Answer with a JSON object.",
                "input_schema": {"type": "object"}}
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema")
        if not isinstance(spec.get("name"), str) or not isinstance(schema, dict):
            raise _refuse("response_format", "json_schema needs a name and a schema object")
        if schema.get("type") != "object":
            raise _refuse("response_format", "json_schema: an Anthropic backend answers a schema whose type is "
                                             "'object' only (wrap the value in an object)")
        return {"name": spec["name"], "description": spec.get("description") or "Answer in this JSON schema.",
                "input_schema": schema}
    raise _refuse("response_format", f"type {kind!r} cannot be sent to an Anthropic backend")


# ---------------------------------------------------------------- reasoning_effort <-> thinking

# reasoning_effort -> Anthropic thinking budget (tokens). Anthropic's minimum budget is 1024.
EFFORT_BUDGET = {"low": 1024, "medium": 4096, "high": 16384, "xhigh": 32768}
MIN_BUDGET = 1024


def thinking_for(effort: Any, max_tokens: int) -> dict[str, Any] | None:
    """Anthropic's `thinking` for OpenAI's `reasoning_effort`, within `max_tokens`: thinking tokens
    are output and count against max_tokens (the cap the reservation is for), so the budget is the
    effort's, at most half the cap (the answer keeps the other half), and never under 1024."""
    if effort is None or effort in ("none", "minimal"):
        return None  # no (or the least) reasoning: Claude without extended thinking
    if effort not in EFFORT_BUDGET:
        raise _refuse("reasoning_effort", f"must be one of none, minimal, {', '.join(EFFORT_BUDGET)}")
    if max_tokens <= MIN_BUDGET:
        raise _refuse("reasoning_effort", f"needs an output cap above {MIN_BUDGET} tokens on an Anthropic backend "
                                          f"(its least thinking budget; thinking counts as output), got {max_tokens}: "
                                          "raise max_completion_tokens or drop reasoning_effort")
    return {"type": "enabled", "budget_tokens": max(MIN_BUDGET, min(EFFORT_BUDGET[effort], max_tokens // 2))}


def effort_for(thinking: Any) -> str | None:
    """OpenAI's `reasoning_effort` for Anthropic's `thinking` (the inverse of thinking_for)."""
    if thinking is None:
        return None
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "disabled":
        return None
    if kind != "enabled" or type(thinking.get("budget_tokens")) is not int:
        raise _refuse("thinking", f"type {kind!r} cannot be sent to an OpenAI backend (only enabled, with "
                                  "budget_tokens, maps to reasoning_effort)")
    budget = thinking["budget_tokens"]
    return "low" if budget < EFFORT_BUDGET["medium"] else "medium" if budget < EFFORT_BUDGET["high"] else "high"
