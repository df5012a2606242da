"""Loop breaker: the same normalised request more than `max_repeats` times within `window` seconds.

Keys are request hashes (spend.cache.request_key). Refused repeats count too, so an agent stuck in a
loop stays refused until it pauses for a whole window. Memory is bounded: at most max_repeats + 1
timestamps per key and `max_keys` keys (least recently seen dropped first).
"""
from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

DEFAULT_MAX_KEYS = 20000


class LoopDetector:
    def __init__(self, max_repeats: int, window: float, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = DEFAULT_MAX_KEYS):
        if max_repeats < 1 or window <= 0:
            raise ValueError("max_repeats must be >= 1 and window > 0")
        self.max_repeats, self.window, self.clock, self.max_keys = max_repeats, window, clock, max_keys
        self._seen: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def observe(self, key: str) -> bool:
        """Record one request; True when it makes more than max_repeats within the window (refuse it)."""
        now = self.clock()
        times = self._seen.get(key)
        if times is None:
            times = self._seen[key] = deque(maxlen=self.max_repeats + 1)
            if len(self._seen) > self.max_keys:
                self._seen.popitem(last=False)
        else:
            self._seen.move_to_end(key)
        times.append(now)
        return len(times) > self.max_repeats and now - times[0] < self.window

    def count(self, key: str) -> int:
        """Requests with this key within the window (at most max_repeats + 1)."""
        times = self._seen.get(key)
        if not times:
            return 0
        now = self.clock()
        return sum(1 for t in times if now - t < self.window)


__all__ = ["LoopDetector", "DEFAULT_MAX_KEYS"]
