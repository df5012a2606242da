"""Request rate limits of the shared gateway: one token bucket per namespace and one per
(namespace, ServiceAccount), so one noisy tenant (or one runaway workload of a tenant) cannot take
the pool's capacity from the others. Budgets limit what is spent; these limit how fast it is asked.

Per gateway replica: N replicas admit up to N times the rate in all (the Service spreads clients).
Callers choose the keys (every authenticated ServiceAccount is one), so the map is bounded: a full
bucket is the same as no bucket, so full ones are dropped first, and when that is not enough the
least recently used go (they refill to full meanwhile, which errs towards admitting).
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

MAX_BUCKETS = 10_000


@dataclass(frozen=True)
class Rate:
    per_second: float  # 0: unlimited
    burst: int

    def __post_init__(self) -> None:
        if self.per_second < 0 or not math.isfinite(self.per_second):
            raise ValueError(f"a rate must be a finite number >= 0, not {self.per_second}")
        if self.per_second and self.burst < 1:
            raise ValueError(f"a burst must be at least 1, not {self.burst}")


class TokenBuckets:
    def __init__(self, rate: Rate, clock: Callable[[], float] = time.monotonic, max_buckets: int = MAX_BUCKETS):
        self.rate = rate
        self.clock = clock
        self.max_buckets = max_buckets
        self._buckets: OrderedDict[object, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def __len__(self) -> int:
        return len(self._buckets)

    def _level(self, key: object, now: float) -> float:
        hit = self._buckets.get(key)
        if hit is None:
            return float(self.rate.burst)
        tokens, at = hit
        return min(float(self.rate.burst), tokens + (now - at) * self.rate.per_second)

    def take(self, key: object) -> float:
        """0.0 when a request may pass now (and counts it); otherwise the seconds until one may."""
        if not self.rate.per_second:
            return 0.0
        now = self.clock()
        level = self._level(key, now)
        if level < 1.0:
            return (1.0 - level) / self.rate.per_second
        self._buckets[key] = (level - 1.0, now)
        self._buckets.move_to_end(key)
        if len(self._buckets) > self.max_buckets:
            self._shrink(now)
        return 0.0

    def refund(self, key: object) -> None:
        """Give back a token taken for a request that another limit then refused."""
        hit = self._buckets.get(key)
        if hit is not None:
            self._buckets[key] = (min(float(self.rate.burst), hit[0] + 1.0), hit[1])

    def _shrink(self, now: float) -> None:
        for key in [k for k in self._buckets if self._level(k, now) >= self.rate.burst]:
            del self._buckets[key]
        while len(self._buckets) > self.max_buckets * 3 // 4:
            self._buckets.popitem(last=False)


class TenantLimits:
    """Both limits of one request: the namespace's and its ServiceAccount's."""

    def __init__(self, namespace: Rate, serviceaccount: Rate, clock: Callable[[], float] = time.monotonic,
                 max_buckets: int = MAX_BUCKETS):
        self.namespace = TokenBuckets(namespace, clock, max_buckets)
        self.serviceaccount = TokenBuckets(serviceaccount, clock, max_buckets)

    def admit(self, namespace: str, serviceaccount: str) -> tuple[str, float] | None:
        """None when the request may pass; else (which limit, seconds until it may)."""
        wait = self.serviceaccount.take((namespace, serviceaccount))
        if wait:
            return "serviceaccount", wait
        wait = self.namespace.take(namespace)
        if wait:
            self.serviceaccount.refund((namespace, serviceaccount))
            return "namespace", wait
        return None


__all__ = ["MAX_BUCKETS", "Rate", "TokenBuckets", "TenantLimits"]
