"""The judge: a small model asked to rate a request's difficulty when the local score is close to a
tier boundary. Pure parts: the question asked (in OpenAI chat form; the proxy translates it for an
Anthropic judge) and reading the verdict. The proxy counts the judge's cost against the route's
budgets and caches verdicts by request key.
"""
from __future__ import annotations

import re
from typing import Any

JUDGE_MAX_TOKENS = 4
QUESTION_CHARS = 4000  # of the request's newest text: enough to judge, bounded cost

JUDGE_SYSTEM = ("You rate how difficult a request to an AI assistant is. Reply with one integer from 0 "
                "(trivial: a greeting, a lookup, a short rewrite) to 100 (needs the strongest model: "
                "hard reasoning, long code, subtle analysis). Reply with the number only.")

_NUMBER = re.compile(r"\d{1,3}")


def _newest_text(body: dict[str, Any]) -> str:
    from .scorer import _prompt_text, _text

    messages = body.get("messages")
    if isinstance(messages, list):
        for m in reversed(messages):
            if isinstance(m, dict) and m.get("role") == "user":
                return _text(m.get("content"))
        return ""
    texts = _prompt_text(body.get("prompt"))
    return texts[-1] if texts else ""


def judge_request(body: dict[str, Any], model: str) -> dict[str, Any]:
    """The OpenAI chat request that asks `model` to rate the request `body`."""
    text = _newest_text(body)
    if len(text) > QUESTION_CHARS:
        text = text[: QUESTION_CHARS // 2] + "\n[...]\n" + text[-QUESTION_CHARS // 2:]
    return {"model": model, "temperature": 0, "max_tokens": JUDGE_MAX_TOKENS,
            "messages": [{"role": "system", "content": JUDGE_SYSTEM},
                         {"role": "user", "content": "Request:\n" + text}]}


def parse_verdict(text: str | None) -> int | None:
    """The rated difficulty 0..100, or None when the answer holds no number."""
    if not text:
        return None
    m = _NUMBER.search(text)
    return min(int(m.group(0)), 100) if m else None


__all__ = ["JUDGE_MAX_TOKENS", "JUDGE_SYSTEM", "judge_request", "parse_verdict"]
