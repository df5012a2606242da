"""Rule matching: the backend a request goes to, by its headers, prompt estimate and tools."""
from __future__ import annotations

from typing import Any

from .model import BackendRt, RouteRt

TAG_HEADER = "x-spendwarden-tags"


def select_backend(route: RouteRt, headers: Any, est: int | None, tools: bool) -> tuple[BackendRt, str]:
    """The first rule that matches (its backend and name), else the route's default ("default")."""
    for rule in route.rules:
        if rule.tools is not None and rule.tools != tools:
            continue
        if rule.min_tokens is not None and (est is None or est < rule.min_tokens):
            continue
        if rule.max_tokens is not None and (est is None or est > rule.max_tokens):
            continue
        ok = True
        for name, value in rule.headers:
            got = headers.get(name)
            if got is None or (value is not None and got != value):
                ok = False
                break
        if ok:
            return rule.backend, rule.name
    return route.default, "default"


__all__ = ["TAG_HEADER", "select_backend"]
