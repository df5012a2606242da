"""Valid ModelRoute and TokenBudget specs, and a way to change one field: the base of validation tests."""
from __future__ import annotations

import copy

GOOD_ROUTE = {
    "model": "chat",
    "backends": [
        {"name": "small", "provider": "OpenAI", "url": "https://api.openai.com/v1", "model": "gpt-4o-mini",
         "pricing": {"input": "0.15", "output": "0.60"}},
        {"name": "big", "provider": "Anthropic", "url": "https://api.anthropic.com", "model": "claude-sonnet-4",
         "pricing": {"input": "3", "output": "15", "cachedInput": "0.30"}},
    ],
    "rules": [{"match": {"minPromptTokens": 2000}, "backend": "big"}],
    "defaultBackend": "small",
    "fallbacks": ["big"],
}


GOOD_BUDGET = {"period": {"type": "Monthly", "timeZone": "Europe/Berlin"},
               "limits": {"tokens": {"total": 1_000_000}, "cost": {"amount": "250.00"}}}


def with_change(base: dict, path: str, value: object) -> dict:
    spec = copy.deepcopy(base)
    target = spec
    *parents, last = path.split(".")
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    if value is DELETE:
        del target[int(last) if last.isdigit() else last]
    else:
        target[int(last) if last.isdigit() else last] = value
    return spec


DELETE = object()
