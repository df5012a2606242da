"""Response cache: exact-match answers for deterministic requests, bounded by age, count and bytes.

The key is a SHA-256 over the normalised request (API, alias, body with sorted keys, minus fields
that do not change the answer), so neither prompts nor answers ever appear in logs or metrics; the
store keeps the answer bytes in memory only. A hit costs nothing and saves what the original
answer cost (kept with the entry).
"""
from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson

CACHE_HEADER = "x-spendwarden-cache"
# Fields that do not change what the model answers.
IGNORED_FIELDS = frozenset(("user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"))
_FORCE = frozenset(("1", "true", "on", "yes", "force"))
_BYPASS = frozenset(("0", "false", "off", "no", "bypass", "no-store"))


def request_key(api: str, alias: str, body: dict[str, Any]) -> str:
    """Hex SHA-256 of the normalised request. `stream` and `stream_options` stay in the key: a
    streamed and a plain answer are different bytes."""
    norm = {k: v for k, v in body.items() if k not in IGNORED_FIELDS}
    norm["model"] = alias
    try:
        raw = orjson.dumps(norm, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    except TypeError:  # not JSON-serialisable: cannot come from a parsed JSON body
        raw = repr(sorted(norm.items())).encode()
    h = hashlib.sha256(api.encode())
    h.update(b"\0")
    h.update(raw)
    return h.hexdigest()


def cache_mode(header_value: str | None) -> bool | None:
    """The client's cache header: True (cache even if not deterministic), False (bypass), None (unset)."""
    if header_value is None:
        return None
    v = header_value.strip().lower()
    if v in _FORCE:
        return True
    if v in _BYPASS:
        return False
    return None


def is_deterministic(body: dict[str, Any]) -> bool:
    """temperature 0 (explicitly; the providers' default is 1)."""
    t = body.get("temperature")
    return isinstance(t, (int, float)) and not isinstance(t, bool) and t == 0


def cacheable(body: dict[str, Any], header_value: str | None) -> bool:
    mode = cache_mode(header_value)
    return mode if mode is not None else is_deterministic(body)


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    body: bytes              # exactly what the client received (a JSON body or the SSE stream)
    stream: bool
    status: int
    headers: tuple[tuple[str, str], ...]  # a few response headers worth replaying
    cost: Decimal            # what the original answer cost: the saving of every hit
    currency: str
    backend: str
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def size(self) -> int:
        return len(self.body) + 256  # plus a rough per-entry overhead


class ResponseCache:
    """LRU over entries that expire after `ttl` seconds; at most `max_entries` and `max_bytes`."""

    def __init__(self, ttl: float, max_entries: int, max_bytes: int, clock: Callable[[], float] = time.monotonic):
        self.ttl, self.max_entries, self.max_bytes, self.clock = ttl, max_entries, max_bytes, clock
        self._items: OrderedDict[str, tuple[float, CachedAnswer]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> CachedAnswer | None:
        item = self._items.get(key)
        if item is None:
            return None
        expires, answer = item
        if self.clock() >= expires:
            self._drop(key)
            return None
        self._items.move_to_end(key)
        return answer

    def put(self, key: str, answer: CachedAnswer) -> bool:
        """Store; False when the answer alone exceeds max_bytes (or the cache holds nothing)."""
        if answer.size > self.max_bytes or self.max_entries < 1:
            return False
        if key in self._items:
            self._drop(key)
        self._items[key] = (self.clock() + self.ttl, answer)
        self.bytes += answer.size
        while len(self._items) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self._items)))
        return True

    def _drop(self, key: str) -> None:
        _, answer = self._items.pop(key)
        self.bytes -= answer.size

    def purge_expired(self) -> int:
        now = self.clock()
        gone = [k for k, (exp, _) in self._items.items() if now >= exp]
        for k in gone:
            self._drop(k)
        return len(gone)


__all__ = ["CACHE_HEADER", "IGNORED_FIELDS", "request_key", "cache_mode", "is_deterministic", "cacheable",
           "CachedAnswer", "ResponseCache"]
