"""A bounded map whose entries expire: the ledger's negative caches (budgets that do not exist,
tokens a TokenReview refused), which callers choose the keys of and so must never grow unbounded.

Every entry lives `ttl` seconds from its last put, so insertion order is expiry order: the oldest
entries are the first to go, expired or not, once `max_entries` is reached.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class ExpiringMap(Generic[K, V]):
    def __init__(self, ttl: float, max_entries: int):
        self.ttl = ttl
        self.max_entries = max_entries
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K, now: float | None = None) -> V | None:
        hit = self._items.get(key)
        if hit is None:
            return None
        if hit[0] <= (time.monotonic() if now is None else now):
            del self._items[key]
            return None
        return hit[1]

    def put(self, key: K, value: V, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._items.pop(key, None)
        while self._items:  # expired first (they are at the front), then the oldest if still full
            first = next(iter(self._items.values()))
            if first[0] > now and len(self._items) < self.max_entries:
                break
            self._items.popitem(last=False)
        self._items[key] = (now + self.ttl, value)

    def pop(self, key: K) -> None:
        self._items.pop(key, None)
