"""The mock's Anthropic answers that are not plain text: a forced tool's tool_use block (with
input_json_delta stream events) and extended thinking's thinking block (thinking_delta, then
signature_delta), as Anthropic documents them. The thinking tokens are output: they are counted
in usage.output_tokens, within max_tokens (mock_upstream.messages bills them so)."""
from __future__ import annotations

import json
from typing import Any

# Thinking tokens a thinking request reasons when the behaviour does not say (`reasoning_tokens`).
DEFAULT_THINKING = 8
_SIGNATURE = "bW9jay1zaWduYXR1cmU="


def thinking_budget(req: dict[str, Any]) -> int | None:
    """The request's thinking budget, None when extended thinking is not enabled."""
    t = req.get("thinking")
    if isinstance(t, dict) and t.get("type") == "enabled" and isinstance(t.get("budget_tokens"), int):
        return int(t["budget_tokens"])
    return None


def forced_tool(req: dict[str, Any]) -> dict[str, Any] | None:
    """The tool the request forces the model to call (tool_choice {type: tool, name}), if any."""
    choice = req.get("tool_choice")
    if not isinstance(choice, dict) or choice.get("type") != "tool":
        return None
    return next((t for t in req.get("tools") or [] if isinstance(t, dict) and t.get("name") == choice.get("name")),
                None)


def instance(schema: Any) -> Any:
    """A small value that satisfies a JSON schema (the forced tool's input)."""
    if not isinstance(schema, dict):
        return None
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        return {k: instance(v) for k, v in props.items()}
    values: dict[Any, Any] = {"string": "mock", "integer": 1, "number": 1.5, "boolean": True, "array": [], "null": None}
    return values.get(kind, "mock")


def blocks(req: dict[str, Any], text: str, thinking: int) -> list[dict[str, Any]]:
    """The answer's content blocks: thinking first (when enabled), then the forced tool's call or text."""
    out: list[dict[str, Any]] = []
    if thinking_budget(req) is not None:
        out.append({"type": "thinking", "thinking": "mock " * thinking, "signature": _SIGNATURE})
    tool = forced_tool(req)
    if tool is not None:
        out.append({"type": "tool_use", "id": "toolu_mock1", "name": tool["name"],
                    "input": instance(tool.get("input_schema"))})
    else:
        out.append({"type": "text", "text": text})
    return out


def stream_events(content: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """content_block_start / _delta / _stop events for each block, as (event name, data)."""
    events: list[tuple[str, dict[str, Any]]] = []
    for i, block in enumerate(content):
        kind = block["type"]
        if kind == "thinking":
            start: dict[str, Any] = {"type": "thinking", "thinking": ""}
            deltas = [{"type": "thinking_delta", "thinking": w + " "} for w in block["thinking"].split()]
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
        elif kind == "tool_use":
            start = dict(block, input={})
            raw = json.dumps(block["input"])
            deltas = [{"type": "input_json_delta", "partial_json": raw[j:j + 8]} for j in range(0, len(raw), 8)]
        else:
            start = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": block["text"]}]
        events.append(("content_block_start", {"type": "content_block_start", "index": i, "content_block": start}))
        events += [("content_block_delta", {"type": "content_block_delta", "index": i, "delta": d}) for d in deltas]
        events.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
    return events
