"""The API surfaces the proxy serves, and the output-cap rule that both the proxy and the
simulator apply to a request."""
from __future__ import annotations

from typing import Any

# API kinds (the path after /v1/)
CHAT = "chat/completions"
COMPLETIONS = "completions"
EMBEDDINGS = "embeddings"
MESSAGES = "messages"
RESPONSES = "responses"  # OpenAI's Responses API (proxy/responses.py)

OPERATION = {CHAT: "chat", COMPLETIONS: "text_completion", EMBEDDINGS: "embeddings", MESSAGES: "chat",
             RESPONSES: "chat"}

# Where a client asks for its output cap, first match wins (chat: the new field, then the legacy one).
OUTPUT_CAP_FIELDS: dict[str, tuple[str, ...]] = {
    CHAT: ("max_completion_tokens", "max_tokens"), COMPLETIONS: ("max_tokens",), MESSAGES: ("max_tokens",),
    EMBEDDINGS: (), RESPONSES: ("max_output_tokens",),  # reasoning tokens count within it
}


def client_output_cap(api: str, body: dict[str, Any]) -> int | None:
    """The output cap the client asked for (a positive integer), or None. The proxy checks the
    fields first (proxy.wire.check_request); this reads a body that may not have been checked."""
    for key in OUTPUT_CAP_FIELDS.get(api, ()):
        value = body.get(key)
        if type(value) is int and value > 0:
            return value
    return None


def capped_output(client_cap: int | None, route_cap: int | None) -> int | None:
    """The output cap after the route's limits.maxTokens: the smaller of the two."""
    if route_cap is None:
        return client_cap
    return route_cap if client_cap is None else min(client_cap, route_cap)


__all__ = ["CHAT", "COMPLETIONS", "EMBEDDINGS", "MESSAGES", "RESPONSES", "OPERATION", "OUTPUT_CAP_FIELDS",
           "client_output_cap", "capped_output"]
