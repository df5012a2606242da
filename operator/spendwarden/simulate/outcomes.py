"""What the simulator assumes where a log is silent: answer lengths and whether a cheaper tier fails.

Output tokens, in order of preference:
    1. recorded: the access log's `output_tokens`, or a batch body's `metadata.output_tokens`;
    2. otherwise DEFAULT_OUTPUT_TOKENS (256, about a typical chat answer; `--output-tokens N`
       changes it), never above the request's cap (max_tokens / max_completion_tokens and the
       route's limits.maxTokens). Embeddings have none.

Whether an answer on a tier below the route's top tier fails an escalation check, in order:
    1. recorded: a batch body's `metadata.outcome` ("ok" or a cause: length, invalid_json, refusal,
       upstream_error) says what every tier below the top does with the request; an access-log line
       says what the tier it escalated from did (`escalation` cause) and that the tier that answered
       succeeded;
    2. otherwise a deterministic model: the answer fails with probability
           FAIL_BASE + FAIL_SLOPE * position of the score within the tier's band
       (0 at the tier's minimum score, 1 at the next tier's minimum), i.e. 4% for a request the
       scorer finds clearly easy up to 24% for one just below the next tier. The draw is a hash of
       (seed, request id, the tier's upstream model), so every candidate sees the same fate for the
       same request on the same model, and a re-run gives the same figures. The cause is drawn the
       same way among those that can happen to the request: length (if the answer is capped),
       invalid_json (if response_format asks for JSON), refusal, upstream_error.
The top tier never fails (there is nothing to escalate to). Causes are the proxy's own
(spend.escalation.Cause); whether a cause escalates is decided by the proxy's own checks on a
synthetic answer of that kind (see replay.py).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

DEFAULT_OUTPUT_TOKENS = 256
FAIL_BASE = 0.04
FAIL_SLOPE = 0.20
REFUSAL_TOKENS = 24  # a refusal is a sentence
OK = "ok"
CAUSES = ("length", "invalid_json", "refusal", "upstream_error")


def expected_output_tokens(recorded: int | None, cap: int | None, default: int = DEFAULT_OUTPUT_TOKENS,
                           embeddings: bool = False) -> int:
    if embeddings:
        return 0
    n = recorded if recorded is not None else default
    return min(n, cap) if cap is not None else n


def _unit(*parts: object) -> float:
    """A uniform number in [0, 1) from the parts (stable across runs and machines)."""
    digest = hashlib.sha256("\0".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


@dataclass(frozen=True, slots=True)
class FailureModel:
    seed: int = 0
    base: float = FAIL_BASE
    slope: float = FAIL_SLOPE

    def probability(self, score: int | None, band: tuple[int, int] | None) -> float:
        if score is None or band is None or band[1] <= band[0]:
            return self.base
        pos = min(max((score - band[0]) / (band[1] - band[0]), 0.0), 1.0)
        return self.base + self.slope * pos

    def outcome(self, request_id: str, model: str, score: int | None, band: tuple[int, int] | None,
                capped: bool, wants_json: bool) -> str:
        """OK or the cause of a failed answer on a tier below the top."""
        if _unit("fail", self.seed, request_id, model) >= self.probability(score, band):
            return OK
        possible = [c for c in CAUSES if (c != "length" or capped) and (c != "invalid_json" or wants_json)]
        return possible[int(_unit("cause", self.seed, request_id, model) * len(possible))]
