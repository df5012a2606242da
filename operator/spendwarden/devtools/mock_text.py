"""The mock upstream's text and counts, shared by its OpenAI/Anthropic handlers (mock_upstream.py)
and its Responses API (mock_responses.py): JSON, the lorem-ipsum answer pieces, the documented
deterministic prompt-token counts, and a body's usage replaced as a behaviour says."""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

_JSON = "application/json"
_loads: Callable[[bytes], Any]
try:  # orjson is several times faster; the mock is the benchmarks' baseline
    import orjson

    _loads = orjson.loads

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)
except ImportError:  # pragma: no cover - exercised only without orjson
    _loads = json.loads

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()


DEFAULT_TOKENS = 16
PER_MESSAGE_OVERHEAD = 4
REPLY_PRIMING = 2
_WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do",
          "eiusmod", "tempor", "incididunt", "ut", "labore", "et")


def _text_chars(content: Any) -> int:
    """Characters of text in an OpenAI/Anthropic message content (string or list of parts)."""
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        n = 0
        for part in content:
            if isinstance(part, str):
                n += len(part)
            elif isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    n += len(text)
                elif "content" in part:  # Anthropic tool_result blocks nest content
                    n += _text_chars(part["content"])
        return n
    return 0


def chat_prompt_tokens(messages: list[Any], system: Any = None) -> int:
    """The documented deterministic prompt-token count for chat/messages requests."""
    total = REPLY_PRIMING
    if system:
        total += math.ceil(_text_chars(system) / 4) + PER_MESSAGE_OVERHEAD
    for m in messages or ():
        if isinstance(m, dict):
            total += math.ceil(_text_chars(m.get("content")) / 4) + PER_MESSAGE_OVERHEAD
    return total


def text_tokens(value: Any) -> int:
    """ceil(chars/4) of a prompt/input: a string, a list of strings, or token-id list(s)."""
    if isinstance(value, str):
        return math.ceil(len(value) / 4)
    if isinstance(value, list):
        if value and all(isinstance(x, int) for x in value):
            return len(value)
        return sum(text_tokens(x) for x in value)
    return 0


def _word_piece(i: int) -> str:
    return (" " if i else "") + _WORDS[i % len(_WORDS)]


# Output text per token count, built once per count.
_TEXT_CACHE: dict[int, str] = {}


def _text(n: int) -> str:
    t = _TEXT_CACHE.get(n)
    if t is None:
        t = _TEXT_CACHE[n] = "".join(_word_piece(i) for i in range(n))
    return t


_PIECES_JSON = [_dumps(_word_piece(i)) for i in range(len(_WORDS) * 2)]


def _piece_json(i: int) -> bytes:
    # Pieces repeat with period len(_WORDS) after the first one (which has no leading space).
    return _PIECES_JSON[i] if i < len(_PIECES_JSON) else _PIECES_JSON[len(_WORDS) + i % len(_WORDS)]


def _with_usage(doc: dict[str, Any], b: Any) -> dict[str, Any]:
    """A non-streamed answer with its usage replaced as behaviour `usage_json` says."""
    if b.usage_json is None:
        return doc
    if b.usage_json == "absent":
        doc.pop("usage", None)
    else:
        doc["usage"] = json.loads(b.usage_json)
    return doc
