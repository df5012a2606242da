"""ServiceAccount tokens (audience spendwarden) checked by TokenReview, answers cached per token hash so
that a busy caller costs no apiserver call per request. Used by the operator's ledger (its
controller/tokens.py binds it to the operator's API client) and by the gateway (proxy/gateway.py),
which authenticates every tenant request with it."""
from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from .expiring import ExpiringMap

AUDIENCE = "spendwarden"
SA_PREFIX = "system:serviceaccount:"
NEGATIVE_REVIEW_TTL = 10.0    # a refused token is refused again without a review for this long
REVIEW_WORKERS = 4            # TokenReview threads, apart from the threads that persist grants
MAX_PENDING_REVIEWS = 64      # distinct unknown tokens under review at once; more: 503 at once
_BEARER = re.compile(r"[A-Za-z0-9._~+/=-]{1,8192}")  # RFC 6750 b64token; a projected JWT is ~1 KiB
MISSING_TOKEN = "a Bearer ServiceAccount token with audience spendwarden is required"
INVALID_TOKEN = "the token is not a valid ServiceAccount token for audience spendwarden"


def bearer_token(header: str) -> str | None:
    """The token of an `Authorization: Bearer` header, None if absent or not a token's syntax."""
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and _BEARER.fullmatch(token) else None


class ReviewBusy(Exception):
    """MAX_PENDING_REVIEWS reviews of unknown tokens are under way: refuse at once (503), not queue."""


class TokenReviewer:
    """ServiceAccount tokens -> (namespace, serviceaccount) through TokenReview, answers cached per
    token hash (tokens themselves are never stored or logged): positive ones for `ttl`, refusals for
    `negative_ttl` in a bounded map, so a token that failed once costs no second review soon.

    Reviews run on a pool of their own (`workers` threads, at most `max_pending` distinct tokens
    under review, concurrent requests with one token share its review): a flood of unknown tokens
    then waits on that pool only, never on the threads that persist grants, and a cached token is
    answered without waiting at all."""

    def __init__(self, api: Callable[[], Any], ttl: float = 60.0, max_entries: int = 10_000,
                 negative_ttl: float = NEGATIVE_REVIEW_TTL, workers: int = REVIEW_WORKERS,
                 max_pending: int = MAX_PENDING_REVIEWS):
        self.api = api  # -> a kubernetes AuthenticationV1Api (called per review: clients are cached)
        self.ttl = min(ttl, 60.0)
        self.max_entries = max_entries
        self.max_pending = max_pending
        self._cache: dict[str, tuple[float, str, str]] = {}
        self._refused: ExpiringMap[str, bool] = ExpiringMap(negative_ttl, max_entries)
        self._pending: dict[str, asyncio.Future] = {}
        self._workers = workers
        self._pool: ThreadPoolExecutor | None = None  # made on first use: most tests never review

    @staticmethod
    def key(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    def cached(self, key: str) -> tuple[str, str] | Literal[False] | None:
        """(namespace, serviceaccount) of a token known good, False for one known bad, None: unknown."""
        hit = self._cache.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1], hit[2]
        return False if self._refused.get(key) else None

    def _review_sync(self, token: str) -> tuple[str, str] | None:
        # A plain dict: the client serialises it; the stubs accept only V1TokenReview.
        review = self.api().create_token_review(
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
             "spec": {"token": token, "audiences": [AUDIENCE]}})
        status = review.status
        # The audience must be confirmed: an answer without audiences comes from an authenticator that
        # ignored them, and then nothing says the token was issued for spendwarden.
        if not status or not status.authenticated or not status.user or AUDIENCE not in (status.audiences or ()):
            return None
        username = status.user.username or ""
        if not username.startswith(SA_PREFIX):
            return None
        ns, _, sa = username[len(SA_PREFIX):].partition(":")
        return (ns, sa) if ns and sa else None

    async def review(self, token: str) -> tuple[str, str] | None:
        key = self.key(token)
        hit = self.cached(key)
        if hit is not None:
            return hit or None
        future = self._pending.get(key)
        if future is None:
            if len(self._pending) >= self.max_pending:
                raise ReviewBusy()
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="spendwarden-tokenreview")
            future = asyncio.get_running_loop().run_in_executor(self._pool, self._review_sync, token)
            self._pending[key] = future
            future.add_done_callback(lambda f: self._settle(key, f))
        return await asyncio.shield(future)  # errors propagate: 503, not 401

    def _settle(self, key: str, future: asyncio.Future) -> None:
        self._pending.pop(key, None)
        if future.cancelled() or future.exception() is not None:
            return  # the apiserver failed, not the token: nothing to remember
        who = future.result()
        if who is None:
            self._refused.put(key, True)
            return
        now = time.monotonic()
        if len(self._cache) >= self.max_entries:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            if len(self._cache) >= self.max_entries:
                self._cache.clear()
        self._cache[key] = (now + self.ttl, who[0], who[1])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
