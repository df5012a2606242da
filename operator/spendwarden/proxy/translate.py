"""Chat requests across wire formats, both ways.

OpenAI Chat Completions client -> Anthropic Messages backend: system/developer messages, text and
image parts, assistant tool calls, tool results, tools and tool_choice, stop sequences,
temperature/top_p, streaming (text and tool-call deltas, finish reasons, the usage chunk when the
client asked for it), errors. Not covered: n > 1 (400), logprobs, response_format, audio.

Anthropic Messages client -> OpenAI/OpenAI-compatible backend: system, text and image blocks,
tool_use/tool_result, tools and tool_choice, stop sequences, streaming (message_start ..
message_stop with text and input_json deltas; usage arrives in the final message_delta, since
OpenAI reports it only at the end), errors. Thinking blocks are dropped.

/v1/completions and /v1/embeddings have no Anthropic counterpart and are refused with a 400.
"""
from __future__ import annotations

import time
from typing import Any

import orjson

from .wire import bad

_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
           "pause_turn": "stop", "refusal": "content_filter"}


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    out: list[dict[str, Any]] = []
    for part in content or ():
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text":
            out.append({"type": "text", "text": part.get("text", "")})
        elif kind == "image_url":
            url = (part.get("image_url") or {}).get("url", "") if isinstance(part.get("image_url"), dict) \
                else str(part.get("image_url") or "")
            if url.startswith("data:") and ";base64," in url:
                media, data = url[5:].split(";base64,", 1)
                out.append({"type": "image", "source": {"type": "base64", "media_type": media, "data": data}})
            else:
                out.append({"type": "image", "source": {"type": "url", "url": url}})
        else:
            raise bad(f"content part type {kind!r} cannot be translated for an Anthropic backend",
                      "messages", "unsupported_content")
    return out


def chat_to_messages(body: dict[str, Any], model: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    """An OpenAI chat request as an Anthropic Messages request."""
    if (body.get("n") or 1) != 1:
        raise bad("n > 1 is not supported by Anthropic backends", "n", "unsupported_parameter")
    system: list[str] = []
    msgs: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if msgs and msgs[-1]["role"] == role:  # Anthropic wants alternating roles
            msgs[-1]["content"].extend(blocks)
        else:
            msgs.append({"role": role, "content": blocks})

    for m in body["messages"]:
        role = m.get("role")
        if role in ("system", "developer"):
            system.append(_text_of(m.get("content")))
        elif role == "user":
            add("user", _parts(m.get("content")))
        elif role == "assistant":
            blocks = _parts(m.get("content"))
            for call in m.get("tool_calls") or ():
                fn = call.get("function") or {}
                try:
                    args = orjson.loads(fn.get("arguments") or "{}")
                except orjson.JSONDecodeError:
                    raise bad("tool call arguments must be JSON to reach an Anthropic backend",
                              "messages", "invalid_tool_arguments") from None
                blocks.append({"type": "tool_use", "id": call.get("id", ""), "name": fn.get("name", ""),
                               "input": args})
            add("assistant", blocks)
        elif role == "tool":
            add("user", [{"type": "tool_result", "tool_use_id": m.get("tool_call_id", ""),
                          "content": _text_of(m.get("content"))}])
        else:
            raise bad(f"message role {role!r} cannot be translated for an Anthropic backend", "messages",
                      "unsupported_role")
    out: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "messages": msgs}
    if system:
        out["system"] = "\n\n".join(s for s in system if s)
    if stream:
        out["stream"] = True
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    tools = body.get("tools")
    if tools:
        out["tools"] = [{"name": t["function"]["name"], "description": t["function"].get("description", ""),
                         "input_schema": t["function"].get("parameters") or {"type": "object", "properties": {}}}
                        for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)]
        choice = body.get("tool_choice")
        if choice == "required":
            out["tool_choice"] = {"type": "any"}
        elif choice == "none":
            out["tool_choice"] = {"type": "none"}
        elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
            out["tool_choice"] = {"type": "tool", "name": choice["function"].get("name", "")}
        if body.get("parallel_tool_calls") is False:
            out.setdefault("tool_choice", {"type": "auto"})["disable_parallel_tool_use"] = True
    user = body.get("user")
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user}
    return out


def _usage(u: Any) -> dict[str, Any] | None:
    if not isinstance(u, dict):
        return None
    read = u.get("cache_read_input_tokens") or 0
    prompt = (u.get("input_tokens") or 0) + read + (u.get("cache_creation_input_tokens") or 0)
    out = u.get("output_tokens") or 0
    return {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out,
            "prompt_tokens_details": {"cached_tokens": read}}


def message_to_chat(doc: dict[str, Any], alias: str) -> dict[str, Any]:
    """An Anthropic Messages response as an OpenAI chat completion."""
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in doc.get("content") or ():
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            text.append(block.get("text", ""))
        elif block.get("type") == "tool_use":
            calls.append({"id": block.get("id", ""), "type": "function",
                          "function": {"name": block.get("name", ""),
                                       "arguments": orjson.dumps(block.get("input") or {}).decode()}})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text or not calls else None}
    if calls:
        message["tool_calls"] = calls
    out = {"id": "chatcmpl-" + str(doc.get("id", "")), "object": "chat.completion", "created": int(time.time()),
           "model": doc.get("model", alias),
           "choices": [{"index": 0, "message": message, "logprobs": None,
                        "finish_reason": _FINISH.get(doc.get("stop_reason") or "", "stop")}]}
    usage = _usage(doc.get("usage"))
    if usage is not None:
        out["usage"] = usage
    return out


def error_to_openai(raw: bytes) -> bytes:
    """An Anthropic error body in OpenAI's shape (unchanged if it is not one)."""
    try:
        doc = orjson.loads(raw)
        err = doc["error"]
        return orjson.dumps({"error": {"message": err.get("message", ""), "type": err.get("type", "api_error"),
                                       "param": None, "code": err.get("type")}})
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return raw


class StreamTranslator:
    """Anthropic stream events in, OpenAI chat.completion.chunk events out."""

    def __init__(self, alias: str, include_usage: bool):
        self.alias = alias
        self.include_usage = include_usage
        self.id = "chatcmpl-"
        self.model = alias
        self.created = int(time.time())
        self.tool_index: dict[int, int] = {}  # Anthropic block index -> OpenAI tool_calls index
        self.usage: dict[str, Any] = {}

    def _chunk(self, delta: dict[str, Any] | None, finish: str | None = None, usage: Any = None) -> bytes:
        doc: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                               "model": self.model,
                               "choices": [] if delta is None else
                               [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if usage is not None:
            doc["usage"] = usage
        return b"data: " + orjson.dumps(doc) + b"\n\n"

    def event(self, obj: dict[str, Any]) -> list[bytes]:
        kind = obj.get("type")
        if kind == "message_start":
            msg = obj.get("message") or {}
            self.id = "chatcmpl-" + str(msg.get("id", ""))
            self.model = msg.get("model", self.alias)
            self.usage.update(msg.get("usage") or {})
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            block = obj.get("content_block") or {}
            if block.get("type") == "tool_use":
                i = self.tool_index[obj.get("index", 0)] = len(self.tool_index)
                return [self._chunk({"tool_calls": [{"index": i, "id": block.get("id", ""), "type": "function",
                                                     "function": {"name": block.get("name", ""), "arguments": ""}}]})]
            return []
        if kind == "content_block_delta":
            delta = obj.get("delta") or {}
            if delta.get("type") == "text_delta":
                return [self._chunk({"content": delta.get("text", "")})]
            if delta.get("type") == "input_json_delta":
                i = self.tool_index.get(obj.get("index", 0), 0)
                return [self._chunk({"tool_calls": [{"index": i, "function": {
                    "arguments": delta.get("partial_json", "")}}]})]
            return []
        if kind == "message_delta":
            self.usage.update({k: v for k, v in (obj.get("usage") or {}).items() if v is not None})
            reason = (obj.get("delta") or {}).get("stop_reason")
            return [self._chunk({}, _FINISH.get(reason or "", "stop"))]
        if kind == "message_stop":
            out = []
            if self.include_usage:
                out.append(self._chunk(None, usage=_usage(self.usage)))
            out.append(b"data: [DONE]\n\n")
            return out
        if kind == "error":
            err = obj.get("error") or {}
            return [b"data: " + orjson.dumps({"error": {"message": err.get("message", ""),
                                                        "type": err.get("type", "api_error"),
                                                        "param": None, "code": err.get("type")}}) + b"\n\n"]
        return []  # ping, content_block_stop, unknown


# -- Anthropic Messages client -> OpenAI chat backend ---------------------------------------------

_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
         "content_filter": "refusal"}


def _anthropic_parts(content: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(OpenAI content parts, tool calls, tool result messages) of one Anthropic message."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}], [], []
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for block in content or ():
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": block.get("text", "")})
        elif kind == "image":
            src = block.get("source") or {}
            url = src.get("url") if src.get("type") == "url" else \
                f"data:{src.get('media_type', 'image/png')};base64,{src.get('data', '')}"
            parts.append({"type": "image_url", "image_url": {"url": url}})
        elif kind == "tool_use":
            calls.append({"id": block.get("id", ""), "type": "function",
                          "function": {"name": block.get("name", ""),
                                       "arguments": orjson.dumps(block.get("input") or {}).decode()}})
        elif kind == "tool_result":
            results.append({"role": "tool", "tool_call_id": block.get("tool_use_id", ""),
                            "content": _text_of(block.get("content"))})
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise bad(f"content block type {kind!r} cannot be translated for an OpenAI backend",
                      "messages", "unsupported_content")
    return parts, calls, results


def messages_to_chat(body: dict[str, Any], model: str, max_tokens: int, stream: bool,
                     openai_native: bool) -> dict[str, Any]:
    """An Anthropic Messages request as an OpenAI chat request."""
    msgs: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        msgs.append({"role": "system", "content": _text_of(system)})
    for m in body["messages"]:
        parts, calls, results = _anthropic_parts(m.get("content"))
        msgs.extend(results)  # tool results answer the previous assistant turn
        if m.get("role") == "assistant":
            text = "".join(p.get("text", "") for p in parts if p["type"] == "text")
            msg: dict[str, Any] = {"role": "assistant", "content": text or None}
            if calls:
                msg["tool_calls"] = calls
            if text or calls:
                msgs.append(msg)
        elif parts:
            only_text = all(p["type"] == "text" for p in parts)
            msgs.append({"role": "user", "content": "".join(p["text"] for p in parts) if only_text else parts})
    out: dict[str, Any] = {"model": model, "messages": msgs,
                           ("max_completion_tokens" if openai_native else "max_tokens"): max_tokens}
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("stop_sequences"):
        out["stop"] = list(body["stop_sequences"])
    tools = body.get("tools")
    if tools:
        out["tools"] = [{"type": "function", "function": {"name": t.get("name", ""),
                                                          "description": t.get("description", ""),
                                                          "parameters": t.get("input_schema") or {"type": "object"}}}
                        for t in tools if isinstance(t, dict) and "input_schema" in t]
        choice = body.get("tool_choice")
        if isinstance(choice, dict):
            kind = choice.get("type")
            if kind == "any":
                out["tool_choice"] = "required"
            elif kind == "none":
                out["tool_choice"] = "none"
            elif kind == "tool":
                out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name", "")}}
            if choice.get("disable_parallel_tool_use"):
                out["parallel_tool_calls"] = False
    meta = body.get("metadata")
    if isinstance(meta, dict) and isinstance(meta.get("user_id"), str):
        out["user"] = meta["user_id"]
    return out


def _anthropic_usage(u: Any) -> dict[str, Any]:
    if not isinstance(u, dict):
        return {"input_tokens": 0, "output_tokens": 0}
    cached = 0
    details = u.get("prompt_tokens_details")
    if isinstance(details, dict):
        cached = details.get("cached_tokens") or 0
    return {"input_tokens": (u.get("prompt_tokens") or 0) - cached, "output_tokens": u.get("completion_tokens") or 0,
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def chat_to_message(doc: dict[str, Any], alias: str) -> dict[str, Any]:
    """An OpenAI chat completion as an Anthropic Messages response."""
    choice = (doc.get("choices") or [{}])[0]
    msg = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if msg.get("content"):
        content.append({"type": "text", "text": msg["content"]})
    for call in msg.get("tool_calls") or ():
        fn = call.get("function") or {}
        try:
            args = orjson.loads(fn.get("arguments") or "{}")
        except orjson.JSONDecodeError:
            args = {"_raw": fn.get("arguments")}
        content.append({"type": "tool_use", "id": call.get("id", ""), "name": fn.get("name", ""), "input": args})
    return {"id": "msg_" + str(doc.get("id", "")), "type": "message", "role": "assistant",
            "model": doc.get("model", alias), "content": content,
            "stop_reason": _STOP.get(choice.get("finish_reason") or "", "end_turn"), "stop_sequence": None,
            "usage": _anthropic_usage(doc.get("usage"))}


def error_to_anthropic(raw: bytes) -> bytes:
    """An OpenAI error body in Anthropic's shape (unchanged if it is not one)."""
    try:
        err = orjson.loads(raw)["error"]
        return orjson.dumps({"type": "error", "error": {"type": err.get("type") or "api_error",
                                                        "message": err.get("message", "")}})
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return raw


class ChatStreamTranslator:
    """OpenAI chat.completion.chunk events in, Anthropic message stream events out."""

    def __init__(self, alias: str):
        self.alias = alias
        self.started = False
        self.block: int = -1  # index of the open content block, -1: none
        self.block_kind: str | None = None
        self.tools: dict[int, int] = {}  # OpenAI tool_calls index -> Anthropic block index
        self.stop_reason = "end_turn"
        self.usage: dict[str, Any] = {"input_tokens": 0, "output_tokens": 0}

    @staticmethod
    def _ev(kind: str, doc: dict[str, Any]) -> bytes:
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **doc}) + b"\n\n"

    def _start(self, obj: dict[str, Any]) -> list[bytes]:
        if self.started:
            return []
        self.started = True
        return [self._ev("message_start", {"message": {
            "id": "msg_" + str(obj.get("id", "")), "type": "message", "role": "assistant",
            "model": obj.get("model", self.alias), "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0}}})]

    def _close(self) -> list[bytes]:
        if self.block < 0 or self.block_kind is None:
            return []
        self.block_kind = None
        return [self._ev("content_block_stop", {"index": self.block})]

    def event(self, obj: dict[str, Any]) -> list[bytes]:
        out = self._start(obj)
        if isinstance(obj.get("usage"), dict):
            self.usage = _anthropic_usage(obj["usage"])
        if "error" in obj and isinstance(obj["error"], dict):
            out.append(self._ev("error", {"error": {"type": obj["error"].get("type") or "api_error",
                                                    "message": obj["error"].get("message", "")}}))
            return out
        for choice in obj.get("choices") or ():
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                if self.block_kind != "text":
                    out += self._close()
                    self.block += 1
                    self.block_kind = "text"
                    out.append(self._ev("content_block_start", {"index": self.block,
                                                                "content_block": {"type": "text", "text": ""}}))
                out.append(self._ev("content_block_delta", {"index": self.block,
                                                            "delta": {"type": "text_delta", "text": text}}))
            for call in delta.get("tool_calls") or ():
                i = call.get("index", 0)
                fn = call.get("function") or {}
                if i not in self.tools:
                    out += self._close()
                    self.block += 1
                    self.block_kind = "tool_use"
                    self.tools[i] = self.block
                    out.append(self._ev("content_block_start", {"index": self.block, "content_block": {
                        "type": "tool_use", "id": call.get("id", ""), "name": fn.get("name", ""), "input": {}}}))
                if fn.get("arguments"):
                    out.append(self._ev("content_block_delta", {"index": self.tools[i], "delta": {
                        "type": "input_json_delta", "partial_json": fn["arguments"]}}))
            if choice.get("finish_reason"):
                self.stop_reason = _STOP.get(choice["finish_reason"], "end_turn")
        return out

    def done(self) -> list[bytes]:
        out = self._start({}) + self._close()
        out.append(self._ev("message_delta", {"delta": {"stop_reason": self.stop_reason, "stop_sequence": None},
                                              "usage": self.usage}))
        out.append(self._ev("message_stop", {}))
        return out
