"""Complexity scorer: how hard does a request look, from the request alone (no network, no model).

A request's features (prompt length, code, reasoning cues, tools, conversation depth) add up to a
score from 0 (trivial) to 100 (as hard as it gets); a route's tiers each start at a minimum score
and the request goes to the highest tier it reaches. The weights are deliberately simple and
documented so that a policy author can predict the tier of a request:

    length     up to 35: log-scaled estimated prompt tokens (chars / 4); 64 tokens ~ 5, 1k ~ 20, 8k+ = 35
    code       20 when the conversation's recent text holds code (fences, definitions, statements)
    reasoning  8 per distinct reasoning cue ("prove", "step by step", "trade-offs", ...), at most 24
    tools      11 when the request declares tools (agents calling tools need the stronger model more)
    depth      2 per earlier turn of the conversation, at most 10

Cost: one pass summing text lengths and substring checks over at most SCAN_CHARS of the newest text
(both ends of the newest messages), so a 1 MB prompt scores about as fast as a 4 KB one.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SCAN_CHARS = 4096  # text searched for code and cues: both ends of the newest messages

LENGTH_MAX, CODE_POINTS, CUE_POINTS, CUE_MAX, TOOLS_POINTS, TURN_POINTS, DEPTH_MAX = 35, 20, 8, 24, 11, 2, 10
_LENGTH_FULL_TOKENS = 8192

# Cue words are looked up in the sample's set of words, phrases and code markers found with plain
# `in` (C speed); one regex with these alternations took ~2 ms on 16 KB.
CUE_WORDS = frozenset((
    "prove", "proof", "derive", "derivation", "theorem", "lemma", "analyze", "analyse", "analysis", "tradeoff",
    "tradeoffs", "compare", "contrast", "optimize", "optimise", "debug", "refactor", "architecture", "algorithm",
    "complexity", "evaluate", "critique", "calculate", "estimate", "strategy", "implement", "constraint",
    "constraints"))
CUE_PHRASES = ("step by step", "step-by-step", "think carefully", "reason about", "explain why", "why does",
               "trade-off", "edge case", "root cause", "design a", "design the", "plan a", "plan the", "multi-step")
REASONING_CUES = tuple(sorted(CUE_WORDS)) + CUE_PHRASES
_PUNCTUATION = str.maketrans({c: " " for c in "!\"#$%&'()*+,./:;<=>?@[\\]^_`{|}~\n\t\r"})
CODE_MARKERS = (
    "```", "\ndef ", "\nclass ", " def ", "\nimport ", "#include", "function(", "=>", ";\n", " select * ",
    "traceback (most recent call last)", "{\n", "};", "</", "public static", "\nfn ", "\nfunc ")


@dataclass(frozen=True, slots=True)
class Features:
    prompt_chars: int  # all text of the request (system, messages, prompt)
    code: bool
    reasoning_cues: int  # distinct cues found
    tools: int  # tools (or functions) declared
    turns: int  # messages before the last one

    @property
    def est_tokens(self) -> int:
        return (self.prompt_chars + 3) // 4


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                t = part.get("text")
                if isinstance(t, str):
                    parts.append(t)
                elif "content" in part:  # Anthropic tool_result blocks nest content
                    parts.append(_text(part["content"]))
        return "\n".join(parts)
    return ""


def _prompt_text(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def features(body: dict[str, Any]) -> Features:
    """Features of an OpenAI chat/completions or Anthropic messages request body."""
    texts: list[str] = []
    turns = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        system = body.get("system")  # Anthropic
        if system:
            texts.append(_text(system))
        for m in messages:
            if isinstance(m, dict):
                texts.append(_text(m.get("content")))
                if m.get("tool_calls"):
                    texts.append(str(m["tool_calls"]))
        turns = max(len([m for m in messages if isinstance(m, dict) and m.get("role") != "system"]) - 1, 0)
    else:
        texts = _prompt_text(body.get("prompt"))
    total = sum(len(t) for t in texts)
    # The newest text decides: system prompt (first) plus the tail of the conversation.
    scan: list[str] = []
    budget = SCAN_CHARS
    for t in reversed(texts):
        if budget <= 0:
            break
        # Instructions tend to open a message and questions to close it: keep both ends.
        scan.append(t if len(t) <= budget else t[: budget // 2] + "\n" + t[-(budget // 2):])
        budget -= len(t)
    sample = " " + "\n".join(scan).lower()
    tools = body.get("tools") or body.get("functions")
    return Features(prompt_chars=total, code=any(m in sample for m in CODE_MARKERS),
                    reasoning_cues=_cues(sample),
                    tools=len(tools) if isinstance(tools, list) else 0, turns=turns)


def _cues(sample: str) -> int:
    words = set(sample.translate(_PUNCTUATION).split())
    return len(CUE_WORDS & words) + sum(1 for p in CUE_PHRASES if p in sample)


def score_features(f: Features) -> int:
    """0..100; see the module docstring for the weights."""
    length = LENGTH_MAX * min(1.0, math.log2(1 + f.est_tokens / 64) / math.log2(1 + _LENGTH_FULL_TOKENS / 64))
    total = length + (CODE_POINTS if f.code else 0) + min(CUE_POINTS * f.reasoning_cues, CUE_MAX) \
        + (TOOLS_POINTS if f.tools else 0) + min(TURN_POINTS * f.turns, DEPTH_MAX)
    return max(0, min(100, round(total)))


def score(body: dict[str, Any]) -> int:
    """The complexity score of a request body, 0..100."""
    return score_features(features(body))


def pick_tier(score_: int, min_scores: Sequence[int]) -> int:
    """Index of the highest tier whose minimum score the request reaches (tiers cheapest first;
    the first tier's minimum is 0 in practice, and index 0 is returned when none is reached)."""
    chosen = 0
    for i, minimum in enumerate(min_scores):
        if score_ >= minimum:
            chosen = i
    return chosen


def near_threshold(score_: int, min_scores: Sequence[int], band: int) -> bool:
    """Whether the score lies within `band` points of a tier boundary (where a judge may decide)."""
    return any(abs(score_ - m) <= band for m in min_scores[1:])


__all__ = ["CUE_WORDS", "CUE_PHRASES", "REASONING_CUES", "CODE_MARKERS", "Features", "features", "score_features",
           "score", "pick_tier", "near_threshold", "SCAN_CHARS"]
