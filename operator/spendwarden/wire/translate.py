"""OpenAI Chat Completions <-> Anthropic Messages: requests, responses and stream events.

Only what both APIs can express is translated; anything else is refused with TranslationError
(the proxy answers 400 naming it) rather than silently dropped: wire/fields.py lists the fields,
and spendwarden.proxy.translate's docstring tabulates what each becomes.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from .fields import (  # TranslationError: callers catch it as translate.TranslationError
    TranslationError,
    check_anthropic_fields,
    check_openai_fields,
    effort_for,
    structured_tool,
    thinking_for,
)

_FINISH_FROM_ANTHROPIC = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                          "tool_use": "tool_calls", "pause_turn": "stop", "refusal": "content_filter"}
_STOP_FROM_OPENAI = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                     "function_call": "tool_use", "content_filter": "refusal"}


# ---------------------------------------------------------------- OpenAI request -> Anthropic request

def _text_of(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise TranslationError(f"{where}: only text parts can be translated here")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise TranslationError(f"{where}: content must be a string or a list of parts")


def _openai_parts_to_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise TranslationError(f"{where}: content must be a string or a list of parts")
    blocks: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            blocks.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind == "image_url":
            url = (part.get("image_url") or {}).get("url", "")
            if url.startswith("data:") and ";base64," in url:
                media, data = url[5:].split(";base64,", 1)
                blocks.append({"type": "image", "source": {"type": "base64", "media_type": media, "data": data}})
            else:
                blocks.append({"type": "image", "source": {"type": "url", "url": url}})
        else:
            raise TranslationError(f"{where}[{i}]: part type {kind!r} cannot be sent to an Anthropic backend")
    return blocks


def openai_chat_to_anthropic(body: dict[str, Any], model: str) -> dict[str, Any]:
    """An OpenAI chat.completions request as an Anthropic messages request for `model`."""
    check_openai_fields(body)
    if body.get("n", 1) not in (1, None):
        raise TranslationError("'n': n > 1 (several choices) cannot be sent to an Anthropic backend: send n requests")
    temperature = body.get("temperature")
    if isinstance(temperature, (int, float)) and temperature > 1:
        raise TranslationError(f"'temperature' {temperature} is above 1, Anthropic's maximum (OpenAI's scale "
                               "goes to 2): send at most 1")
    forced = structured_tool(body.get("response_format"))
    if forced is not None and body.get("tools"):
        raise TranslationError("'response_format' together with 'tools' cannot be sent to an Anthropic backend "
                               "(the format becomes a tool the model must call): send one or the other")
    system: list[str] = []
    messages: list[dict[str, Any]] = []

    def append(role: str, blocks: list[dict[str, Any]]) -> None:
        # Anthropic wants alternating roles; consecutive turns of one role merge into one.
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": role, "content": blocks})

    for i, msg in enumerate(body.get("messages") or []):
        where = f"messages[{i}]"
        role = msg.get("role")
        if role in ("system", "developer"):
            system.append(_text_of(msg.get("content"), where))
        elif role == "user":
            append("user", _openai_parts_to_blocks(msg.get("content"), where + ".content"))
        elif role == "assistant":
            blocks = _openai_parts_to_blocks(msg.get("content"), where + ".content")
            for call in msg.get("tool_calls") or []:
                fn = call.get("function") or {}
                try:
                    arguments = json.loads(fn.get("arguments") or "{}")
                except json.JSONDecodeError as exc:
                    raise TranslationError(f"{where}.tool_calls: arguments are not JSON") from exc
                blocks.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"), "input": arguments})
            append("assistant", blocks)
        elif role == "tool":
            append("user", [{"type": "tool_result", "tool_use_id": msg.get("tool_call_id"),
                             "content": _text_of(msg.get("content"), where + ".content")}])
        else:
            raise TranslationError(f"{where}.role {role!r} cannot be sent to an Anthropic backend")

    out: dict[str, Any] = {"model": model, "messages": messages,
                           "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens") or 4096}
    if system:
        out["system"] = "\n\n".join(s for s in system if s)
    for key in ("temperature", "top_p", "stream"):
        if body.get(key) is not None:
            out[key] = body[key]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    end_user = body.get("safety_identifier") or body.get("user")
    if end_user:
        out["metadata"] = {"user_id": str(end_user)}
    thinking = thinking_for(body.get("reasoning_effort"), out["max_tokens"])
    if thinking is not None:
        out["thinking"] = thinking
    if forced is not None:  # structured output: the answer is the input of the one tool it must call
        if thinking is not None:  # Anthropic refuses a forced tool with thinking enabled
            raise TranslationError("'reasoning_effort' with 'response_format' cannot be sent to an Anthropic "
                                   "backend (a forced tool excludes thinking): drop one of them")
        out["tools"] = [forced]
        out["tool_choice"] = {"type": "tool", "name": forced["name"]}
        return out
    if body.get("tools"):
        out["tools"] = [{"name": t["function"]["name"], "description": t["function"].get("description", ""),
                         "input_schema": t["function"].get("parameters") or {"type": "object", "properties": {}}}
                        for t in body["tools"] if t.get("type") == "function"]
    choice = body.get("tool_choice")
    if choice is not None and body.get("tools"):
        if choice == "auto":
            out["tool_choice"] = {"type": "auto"}
        elif choice == "required":
            out["tool_choice"] = {"type": "any"}
        elif choice == "none":
            out["tool_choice"] = {"type": "none"}
        elif isinstance(choice, dict) and choice.get("type") == "function":
            out["tool_choice"] = {"type": "tool", "name": choice["function"]["name"]}
    if body.get("parallel_tool_calls") is False and out.get("tools"):
        out["tool_choice"] = dict(out.get("tool_choice") or {"type": "auto"}, disable_parallel_tool_use=True)
    return out


# ---------------------------------------------------------------- Anthropic response -> OpenAI response

def anthropic_usage_to_openai(usage: dict[str, Any]) -> dict[str, Any]:
    cached = int(usage.get("cache_read_input_tokens") or 0)
    prompt = int(usage.get("input_tokens") or 0) + cached + int(usage.get("cache_creation_input_tokens") or 0)
    completion = int(usage.get("output_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def anthropic_to_openai_response(resp: dict[str, Any], alias: str, structured: bool = False) -> dict[str, Any]:
    """`structured`: the request's response_format became a forced tool, whose input is the answer."""
    text, calls = [], []
    for block in resp.get("content") or []:
        if block.get("type") == "text":
            text.append(block.get("text", ""))
        elif block.get("type") == "tool_use" and structured:
            text.append(json.dumps(block.get("input") or {}))
        elif block.get("type") == "tool_use":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"), "arguments": json.dumps(block.get("input") or {})}})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text or not calls else None}
    if calls:
        message["tool_calls"] = calls
    stop = resp.get("stop_reason") or ""
    if structured and stop == "tool_use":
        stop = "end_turn"  # the forced tool's call is the answer, complete
    return {"id": "chatcmpl-" + str(resp.get("id", "")).removeprefix("msg_"), "object": "chat.completion",
            "created": int(time.time()), "model": alias,
            "choices": [{"index": 0, "message": message,
                         "finish_reason": _FINISH_FROM_ANTHROPIC.get(stop, "stop")}],
            "usage": anthropic_usage_to_openai(resp.get("usage") or {})}


class AnthropicToOpenAIStream:
    """Feeds Anthropic stream events, yields OpenAI chat.completion.chunk objects."""

    def __init__(self, alias: str, include_usage: bool, structured: bool = False):
        self.alias = alias
        self.include_usage = include_usage
        self.structured = structured  # the forced tool's input_json_delta is the answer's content
        self.id = "chatcmpl-stream"
        self.created = int(time.time())
        self.usage: dict[str, Any] = {}
        self._tool_index: dict[int, int] = {}
        self.finish_reason: str | None = None

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.alias,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    def feed(self, event: dict[str, Any]) -> Iterator[dict[str, Any]]:
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message") or {}
            self.id = "chatcmpl-" + str(message.get("id", "")).removeprefix("msg_")
            self.usage.update(message.get("usage") or {})
            yield self._chunk({"role": "assistant", "content": ""})
        elif kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use" and not self.structured:
                index = self._tool_index.setdefault(event.get("index", 0), len(self._tool_index))
                yield self._chunk({"tool_calls": [{"index": index, "id": block.get("id"), "type": "function",
                                                   "function": {"name": block.get("name"), "arguments": ""}}]})
        elif kind == "content_block_delta":
            delta = event.get("delta") or {}
            if delta.get("type") == "text_delta":
                yield self._chunk({"content": delta.get("text", "")})
            elif delta.get("type") == "input_json_delta" and self.structured:
                yield self._chunk({"content": delta.get("partial_json", "")})
            elif delta.get("type") == "input_json_delta":
                index = self._tool_index.get(event.get("index", 0), 0)
                yield self._chunk({"tool_calls": [{"index": index, "function": {"arguments": delta.get("partial_json", "")}}]})
        elif kind == "message_delta":
            self.usage.update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})
            stop = (event.get("delta") or {}).get("stop_reason") or ""
            if self.structured and stop == "tool_use":
                stop = "end_turn"
            self.finish_reason = _FINISH_FROM_ANTHROPIC.get(stop, "stop")
            yield self._chunk({}, self.finish_reason)
        elif kind == "message_stop" and self.include_usage:
            yield {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.alias,
                   "choices": [], "usage": anthropic_usage_to_openai(self.usage)}


# ---------------------------------------------------------------- Anthropic request -> OpenAI request

def _blocks_of(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return content
    raise TranslationError(f"{where}: content must be a string or a list of blocks")


def anthropic_to_openai_chat(body: dict[str, Any], model: str) -> dict[str, Any]:
    """An Anthropic messages request as an OpenAI chat.completions request for `model`."""
    check_anthropic_fields(body)
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        messages.append({"role": "system", "content": _text_of(system, "system") if not isinstance(system, str) else system})
    for i, msg in enumerate(body.get("messages") or []):
        where = f"messages[{i}]"
        role = msg.get("role")
        if role not in ("user", "assistant"):
            raise TranslationError(f"{where}.role must be user or assistant")
        parts, calls = [], []
        for j, block in enumerate(_blocks_of(msg.get("content"), where + ".content")):
            kind = block.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": block.get("text", "")})
            elif kind == "image" and role == "user":
                src = block.get("source") or {}
                url = src.get("url") if src.get("type") == "url" else f"data:{src.get('media_type')};base64,{src.get('data')}"
                parts.append({"type": "image_url", "image_url": {"url": url}})
            elif kind == "tool_use" and role == "assistant":
                calls.append({"id": block.get("id"), "type": "function",
                              "function": {"name": block.get("name"), "arguments": json.dumps(block.get("input") or {})}})
            elif kind == "tool_result" and role == "user":
                result = block.get("content")
                text = result if isinstance(result, str) else _text_of(result or [], f"{where}.content[{j}].content")
                messages.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text})
            else:
                raise TranslationError(f"{where}.content[{j}]: block type {kind!r} cannot be sent to an OpenAI backend")
        if parts or calls:
            only_text = all(p["type"] == "text" for p in parts)
            content: Any = "".join(p["text"] for p in parts) if only_text else parts
            out_msg: dict[str, Any] = {"role": role, "content": content if parts else None}
            if calls:
                out_msg["tool_calls"] = calls
            messages.append(out_msg)
    out: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": body.get("max_tokens") or 4096}
    for key in ("temperature", "top_p", "stream"):
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("stop_sequences"):
        out["stop"] = list(body["stop_sequences"])
    if body.get("stream"):
        out["stream_options"] = {"include_usage": True}
    if body.get("tools"):
        out["tools"] = [{"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                                          "parameters": t.get("input_schema") or {}}} for t in body["tools"]]
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and body.get("tools"):
        tool_choices: dict[Any, str] = {"auto": "auto", "any": "required", "none": "none"}
        out["tool_choice"] = tool_choices.get(choice.get("type"), "auto")
        if choice.get("type") == "tool":
            out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
        if choice.get("disable_parallel_tool_use") is True:
            out["parallel_tool_calls"] = False
    user = (body.get("metadata") or {}).get("user_id")
    if user:
        out["user"] = str(user)
    effort = effort_for(body.get("thinking"))
    if effort is not None:
        out["reasoning_effort"] = effort
    return out


def openai_usage_to_anthropic(usage: dict[str, Any]) -> dict[str, Any]:
    cached = int(((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0)
    return {"input_tokens": int(usage.get("prompt_tokens") or 0) - cached,
            "output_tokens": int(usage.get("completion_tokens") or 0),
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def openai_to_anthropic_response(resp: dict[str, Any], alias: str) -> dict[str, Any]:
    choice = (resp.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or {}
        try:
            arguments = json.loads(fn.get("arguments") or "{}")
        except json.JSONDecodeError:
            arguments = {"_raw": fn.get("arguments")}
        content.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"), "input": arguments})
    return {"id": "msg_" + str(resp.get("id", "")).removeprefix("chatcmpl-"), "type": "message", "role": "assistant",
            "model": alias, "content": content,
            "stop_reason": _STOP_FROM_OPENAI.get(choice.get("finish_reason") or "", "end_turn"), "stop_sequence": None,
            "usage": openai_usage_to_anthropic(resp.get("usage") or {})}


class OpenAIToAnthropicStream:
    """Feeds OpenAI chat.completion.chunk objects, yields Anthropic stream events."""

    def __init__(self, alias: str):
        self.alias = alias
        self.started = False
        self.block_open: str | None = None
        self.block_index = -1
        self.stop_reason: str | None = None
        self.usage: dict[str, Any] = {}
        self._tool_blocks: dict[int, int] = {}

    def _start(self, chunk_id: str) -> Iterator[dict[str, Any]]:
        if not self.started:
            self.started = True
            yield {"type": "message_start", "message": {
                "id": "msg_" + chunk_id.removeprefix("chatcmpl-"), "type": "message", "role": "assistant",
                "model": self.alias, "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0}}}

    def _open(self, kind: str, block: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield from self._close()
        self.block_index += 1
        self.block_open = kind
        yield {"type": "content_block_start", "index": self.block_index, "content_block": block}

    def _close(self) -> Iterator[dict[str, Any]]:
        if self.block_open is not None:
            yield {"type": "content_block_stop", "index": self.block_index}
            self.block_open = None

    def feed(self, chunk: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield from self._start(str(chunk.get("id", "")))
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                if self.block_open != "text":
                    yield from self._open("text", {"type": "text", "text": ""})
                yield {"type": "content_block_delta", "index": self.block_index,
                       "delta": {"type": "text_delta", "text": delta["content"]}}
            for call in delta.get("tool_calls") or []:
                fn = call.get("function") or {}
                if call.get("id"):
                    yield from self._open("tool", {"type": "tool_use", "id": call["id"], "name": fn.get("name"), "input": {}})
                if fn.get("arguments"):
                    yield {"type": "content_block_delta", "index": self.block_index,
                           "delta": {"type": "input_json_delta", "partial_json": fn["arguments"]}}
            if choice.get("finish_reason"):
                self.stop_reason = _STOP_FROM_OPENAI.get(choice["finish_reason"], "end_turn")

    def finish(self) -> Iterator[dict[str, Any]]:
        """Call once the OpenAI stream ended ([DONE]); usage comes from its final chunk."""
        yield from self._start("")
        yield from self._close()
        usage = openai_usage_to_anthropic(self.usage)
        yield {"type": "message_delta", "delta": {"stop_reason": self.stop_reason or "end_turn", "stop_sequence": None},
               "usage": {"output_tokens": usage["output_tokens"], "input_tokens": usage["input_tokens"],
                         "cache_read_input_tokens": usage["cache_read_input_tokens"]}}
        yield {"type": "message_stop"}
