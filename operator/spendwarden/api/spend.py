"""ModelRoute fields for spending less for the same result (issue #7): complexity tiers, a judge,
escalation, a response cache and a loop breaker. Kept apart from modelroute.py's core routing
fields; ModelRouteSpec embeds them and calls check_spend_references from its validator."""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from ..spend.escalation import Cause
from .common import ApiModel, Duration

NAME_PATTERN = r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$"
# A backend's name where a list refers to one; bounded like Backend.name, for the CEL cost estimate.
BackendRef = Annotated[str, Field(max_length=63)]


class Tier(ApiModel):
    """A class of backends for requests of similar difficulty; tiers are listed cheapest first."""

    name: str = Field(min_length=1, max_length=63, pattern=NAME_PATTERN, description="Name of the tier (metrics, logs), e.g. small.")
    backends: list[BackendRef] = Field(min_length=1, max_length=16,
                                       description="Backends (in spec.backends) serving the tier: the first is used, the "
                                                   "others when it fails (connect error, timeout, 5xx, 429).")
    minScore: int = Field(default=0, ge=0, le=100,
                          description="Requests whose complexity score (0..100, computed locally from prompt length, "
                                      "code, reasoning cues, tools and conversation depth) reaches this use this tier "
                                      "or a higher one. Ascending across tiers. Default 0.")


class Judge(ApiModel):
    """A small model asked to rate a request's difficulty when its score is close to a tier boundary."""

    backend: str = Field(min_length=1, max_length=63, description="Backend (in spec.backends) that rates the request.")
    band: int = Field(default=10, ge=1, le=50,
                      description="Scores within this many points of a tier's minScore are decided by the judge. Default 10.")
    verdictTTL: Duration = Field(default="1h", description="How long a verdict is reused for the same request. Default 1h.")


class Escalation(ApiModel):
    """Retry a request once on the next tier when the answer fails a check (invisible to the client;
    streams only before their first byte, i.e. on upstream errors)."""

    enabled: bool = Field(default=True, description="Escalate failed answers to the next tier. Default true when tiers are set.")
    causes: list[Cause] = Field(default_factory=lambda: list(Cause), max_length=4,
                                description="Checks that escalate: length (cut off at max_tokens), invalid_json "
                                            "(response_format asked for JSON), refusal, upstream_error. Default: all.")


class ResponseCache(ApiModel):
    """Answer repeated deterministic requests (temperature 0, or header x-spendwarden-cache: force) from
    memory; a hit costs nothing and counts as savings."""

    ttl: Duration = Field(default="1h", description="How long an answer is reused. Default 1h.")
    maxEntries: int = Field(default=1000, ge=1, le=1_000_000, description="Most answers kept per proxy. Default 1000.")
    maxBytes: int = Field(default=64 * 1024 * 1024, ge=1024, le=4 * 1024 * 1024 * 1024,
                          description="Most bytes of answers kept per proxy. Default 64 MiB.")


class LoopBreaker(ApiModel):
    """Refuse (429 loop_detected) the same request repeated more than maxRepeats times within window
    from one pod (one proxy)."""

    maxRepeats: int = Field(default=5, ge=1, le=10000, description="Identical requests allowed within the window. Default 5.")
    window: Duration = Field(default="1m", description="The window. Default 1m.")


def known_backend(name: str) -> str:
    """CEL on ModelRouteSpec: the backend name `name` (an expression) is in spec.backends."""
    return f"self.backends.exists(b, b.name == {name})"


_TWO_TIERS = "(has(self.tiers) && size(self.tiers) >= 2)"
# check_spend_references in CEL, for ModelRouteSpec's x-kubernetes-validations (minScore defaults to 0,
# enabled to true, so both are set when CEL runs).
SPEND_RULES = [
    ("!has(self.tiers) || self.tiers.all(t, self.tiers.exists_one(o, o.name == t.name))",
     "tiers: names must be unique"),
    ("!has(self.tiers) || self.tiers.all(t, t.backends.all(n, " + known_backend("n") + "))",
     "each tiers[].backends[] entry must name a backend in spec.backends"),
    ("!has(self.tiers) || (self.tiers.map(t, t.minScore).isSorted() && "
     "self.tiers.all(t, self.tiers.exists_one(o, o.minScore == t.minScore)))",
     "tiers go cheapest first: each tier's minScore must be above the previous tier's"),
    ("!has(self.judge) || " + _TWO_TIERS, "judge: needs at least two tiers to decide between"),
    ("!has(self.judge) || " + known_backend("self.judge.backend"), "judge.backend must name a backend in spec.backends"),
    ("!has(self.escalation) || !self.escalation.enabled || " + _TWO_TIERS,
     "escalation: needs at least two tiers (it retries on the next one); add tiers or set escalation.enabled false"),
]


def check_spend_references(spec: Any, known: set[str]) -> None:
    """Cross-field checks of the issue #7 fields; raises ValueError naming the field."""
    names = [t.name for t in spec.tiers]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"tiers: names must be unique, duplicated: {', '.join(dupes)}")
    for i, tier in enumerate(spec.tiers):
        for j, b in enumerate(tier.backends):
            if b not in known:
                raise ValueError(f"tiers[{i}].backends[{j}] names unknown backend {b!r} (known: {', '.join(sorted(known))})")
        if i and tier.minScore <= spec.tiers[i - 1].minScore:
            raise ValueError(f"tiers[{i}].minScore {tier.minScore} must be above tiers[{i - 1}].minScore "
                             f"{spec.tiers[i - 1].minScore} (tiers go cheapest first)")
    if spec.judge is not None:
        if len(spec.tiers) < 2:
            raise ValueError("judge: needs at least two tiers to decide between")
        if spec.judge.backend not in known:
            raise ValueError(f"judge.backend names unknown backend {spec.judge.backend!r} (known: {', '.join(sorted(known))})")
    if spec.escalation is not None and spec.escalation.enabled and len(spec.tiers) < 2:
        raise ValueError("escalation: needs at least two tiers (it retries on the next one)")


__all__ = ["BackendRef", "Tier", "Judge", "Escalation", "ResponseCache", "LoopBreaker", "check_spend_references", "known_backend",
           "SPEND_RULES"]
