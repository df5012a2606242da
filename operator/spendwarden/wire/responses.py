"""OpenAI Responses API -> Anthropic Messages, for the case both express alike: text in
(`instructions` and `input` as a string or as messages of text parts), text out, no tools, no
server-side state. Requests, responses and stream events.

Anything else (tools, previous_response_id, conversation, prompt templates, reasoning, structured
output formats, background, include, non-text parts, other input items) raises TranslationError
naming the field: the proxy then answers 400 (or, when an OpenAI backend of the route can serve it,
sends it there) rather than dropping it. A translated response is not stored anywhere: its id
cannot be retrieved or continued.
"""
from __future__ import annotations

from typing import Any

from .translate import TranslationError

# Fields with no effect on what a stateless text answer is, or that Anthropic cannot honour and a
# client does not depend on: not translated, not refused. `store` is among them: nothing is stored.
_IGNORED = frozenset(("model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream",
                      "stream_options", "metadata", "user", "store", "truncation", "parallel_tool_calls",
                      "service_tier", "safety_identifier", "prompt_cache_key"))
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise TranslationError(f"{where}: content must be a string or a list of text parts")
    parts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text") \
                or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise TranslationError(f"{where}[{i}]: only text parts are translated to Anthropic, not {kind!r}")
        parts.append(part["text"])
    return "".join(parts)


def untranslatable(body: dict[str, Any]) -> str | None:
    """Why `body` cannot go to an Anthropic backend (naming the field), or None."""
    try:
        responses_to_anthropic(body, "", 1, False)
    except TranslationError as exc:
        return str(exc)
    return None


def responses_to_anthropic(body: dict[str, Any], model: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    for key, value in body.items():
        if key in _IGNORED or value is None:
            continue
        if key == "tool_choice" and value in ("auto", "none") and not body.get("tools"):
            continue
        if key == "tools" and value == []:
            continue
        if key == "text" and isinstance(value, dict) and set(value) <= {"format", "verbosity"} \
                and value.get("format") in (None, {"type": "text"}) and value.get("verbosity") in (None, "medium"):
            continue
        raise TranslationError(f"'{key}' is not translated to an Anthropic backend")
    system: list[str] = []
    if isinstance(body.get("instructions"), str):
        system.append(body["instructions"])
    messages: list[dict[str, Any]] = []
    inp = body.get("input")
    items = [{"role": "user", "content": inp}] if isinstance(inp, str) else inp if isinstance(inp, list) else []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            kind = item.get("type") if isinstance(item, dict) else type(item).__name__
            raise TranslationError(f"input[{i}]: only messages are translated to Anthropic, not {kind!r}")
        role = _ROLES.get(item.get("role", ""))
        if role is None:
            raise TranslationError(f"input[{i}].role: {item.get('role')!r} is not translated")
        text = _text(item.get("content"), f"input[{i}].content")
        if role == "system":
            system.append(text)
        else:
            messages.append({"role": role, "content": text})
    if not messages:
        raise TranslationError("'input' has no user or assistant message to send")
    out: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens}
    if system:
        out["system"] = "\n\n".join(system)
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    if stream:
        out["stream"] = True
    return out


def _usage(u: Any) -> dict[str, Any]:
    """Anthropic usage in the Responses API's shape (its input_tokens exclude cache reads and writes)."""
    u = u if isinstance(u, dict) else {}

    def n(key: str) -> int:
        v = u.get(key)
        return v if type(v) is int else 0

    inp = n("input_tokens") + n("cache_read_input_tokens") + n("cache_creation_input_tokens")
    return {"input_tokens": inp, "input_tokens_details": {"cached_tokens": n("cache_read_input_tokens")},
            "output_tokens": n("output_tokens"), "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": inp + n("output_tokens")}


def _response(rid: str, alias: str, req: dict[str, Any], created: int, text: str | None, stop: str | None,
              usage: dict[str, Any] | None) -> dict[str, Any]:
    """A response object; `text` None: still in progress (no output yet)."""
    incomplete = stop == "max_tokens"
    status = "in_progress" if text is None else "incomplete" if incomplete else "completed"
    output = [] if text is None else [_message(rid, text, "incomplete" if incomplete else "completed")]
    return {"id": "resp_" + rid, "object": "response", "created_at": created, "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete and text is not None else None,
            "instructions": req.get("instructions"), "max_output_tokens": req.get("max_output_tokens"),
            "model": alias, "output": output, "parallel_tool_calls": True, "previous_response_id": None,
            "temperature": req.get("temperature"), "top_p": req.get("top_p"), "tool_choice": "auto", "tools": [],
            "truncation": "disabled", "text": {"format": {"type": "text"}}, "store": False,
            "metadata": req.get("metadata") or {}, "usage": usage}


def _message(rid: str, text: str, status: str) -> dict[str, Any]:
    return {"id": "msg_" + rid, "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def anthropic_to_response(doc: dict[str, Any], alias: str, req: dict[str, Any], created: int) -> dict[str, Any]:
    """A non-streamed Anthropic message as a Responses API response object."""
    text = "".join(b.get("text", "") for b in doc.get("content") or () if isinstance(b, dict) and b.get("type") == "text")
    return _response(str(doc.get("id", "")), alias, req, created, text, doc.get("stop_reason"), _usage(doc.get("usage")))


class AnthropicToResponsesStream:
    """Anthropic stream events (parsed) in, the Responses API's events out (each with its
    sequence_number): response.created, .in_progress, output_item.added, content_part.added,
    output_text.delta..., output_text.done, content_part.done, output_item.done, then
    response.completed (response.incomplete when max_output_tokens was hit)."""

    def __init__(self, alias: str, req: dict[str, Any], created: int):
        self.alias, self.req, self.created = alias, req, created
        self.rid, self.seq = "", 0
        self.text: list[str] = []
        self.stop: str | None = None
        self.usage: dict[str, Any] = {}

    def _ev(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **fields}

    def feed(self, obj: dict[str, Any]) -> list[dict[str, Any]]:
        kind = obj.get("type")
        ids = {"item_id": "msg_" + self.rid, "output_index": 0}
        if kind == "message_start":
            msg = obj.get("message") or {}
            self.rid = str(msg.get("id", ""))
            self.usage = dict(msg.get("usage") or {})
            start = _response(self.rid, self.alias, self.req, self.created, None, None, None)
            return [self._ev("response.created", response=start), self._ev("response.in_progress", response=start),
                    self._ev("response.output_item.added", output_index=0,
                             item={**_message(self.rid, "", "in_progress"), "content": []}),
                    self._ev("response.content_part.added", item_id="msg_" + self.rid, output_index=0,
                             content_index=0, part={"type": "output_text", "text": "", "annotations": []})]
        if kind == "content_block_delta":
            delta = obj.get("delta") or {}
            if delta.get("type") != "text_delta":
                return []
            self.text.append(str(delta.get("text", "")))
            return [self._ev("response.output_text.delta", **ids, content_index=0, delta=delta.get("text", ""),
                             logprobs=[])]
        if kind == "message_delta":
            self.stop = (obj.get("delta") or {}).get("stop_reason")
            self.usage.update({k: v for k, v in (obj.get("usage") or {}).items() if v is not None})
            return []
        if kind == "message_stop":
            text = "".join(self.text)
            final = _response(self.rid, self.alias, self.req, self.created, text, self.stop, _usage(self.usage))
            part = final["output"][0]["content"][0]
            return [self._ev("response.output_text.done", **ids, content_index=0, text=text, logprobs=[]),
                    self._ev("response.content_part.done", **ids, content_index=0, part=part),
                    self._ev("response.output_item.done", output_index=0, item=final["output"][0]),
                    self._ev("response." + ("incomplete" if final["status"] == "incomplete" else "completed"),
                             response=final)]
        return []


__all__ = ["untranslatable", "responses_to_anthropic", "anthropic_to_response", "AnthropicToResponsesStream"]
