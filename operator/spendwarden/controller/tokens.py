"""The ledger's authentication: spendwarden/tokenreview.py's TokenReviewer on the operator's own API
client."""
from __future__ import annotations

from ..tokenreview import (
    AUDIENCE,
    INVALID_TOKEN,
    MAX_PENDING_REVIEWS,
    MISSING_TOKEN,
    NEGATIVE_REVIEW_TTL,
    REVIEW_WORKERS,
    SA_PREFIX,
    ReviewBusy,
    bearer_token,
)
from ..tokenreview import TokenReviewer as _Reviewer
from . import kube


class TokenReviewer(_Reviewer):
    def __init__(self, ttl: float = 60.0, **kwargs: object):
        super().__init__(lambda: kube.authentication(), ttl, **kwargs)  # type: ignore[arg-type]  # kwargs are the base's


__all__ = ["AUDIENCE", "INVALID_TOKEN", "MAX_PENDING_REVIEWS", "MISSING_TOKEN", "NEGATIVE_REVIEW_TTL",
           "REVIEW_WORKERS", "SA_PREFIX", "ReviewBusy", "TokenReviewer", "bearer_token"]
