"""One request's state as it moves through the proxy's stages (server.py pipeline, upstream.py,
relay.py, access_log.py), and the failure that sends it on to the next backend."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..ledger.pricing import TokenUsage
from ..routing.apis import CHAT
from .config import (
    BackendRt,
)


class AttemptFailed(Exception):
    """An upstream attempt failed before anything reached the client."""

    def __init__(self, status: int, reason: str, body: bytes | None = None, content_type: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(reason)
        self.status, self.reason, self.body, self.content_type = status, reason, body, content_type
        self.headers = headers or {}


@dataclass(slots=True)
class RequestState:
    api: str
    fmt: str
    t0: float
    alias: str | None = None
    route: str | None = None
    backend: BackendRt | None = None
    status: int = 0
    outcome: str = "ok"
    stream: bool = False
    usage: TokenUsage | None = None
    usage_known: bool = True
    cost: Any = None
    ttft: float | None = None
    upstream_time: float = 0.0
    attempts: int = 0
    est: int | None = None
    max_output: int | None = None
    downgraded: bool = False
    over_budget: list[str] = field(default_factory=list)
    budgets: list[str] = field(default_factory=list)
    tags: dict[str, str] | None = None
    error: str | None = None
    translating: bool = False
    structured: bool = False  # translated to Anthropic: response_format is a forced tool, its input the answer
    upstream_api: str = CHAT
    partial: bool = False  # usage = the provider's input numbers + the reserved output
    output_seen: bool = False  # usage unknown, no output cap: the output is the stream events relayed
    billed_failure: BackendRt | None = None  # the last attempt failed after its provider answered (billed)
    earlier: list[dict[str, Any]] = field(default_factory=list)  # such attempts followed by a fallback
    sp: Any = None  # spend.SpendReq when the route has tiers, a cache or a loop breaker
    load_key: str | None = None  # the scaled backend this request counts as in flight to
    serviceaccount: str | None = None  # the gateway's authenticated caller (attribution)
    prompt_bound: int | None = None  # previous_response_id: the prompt reserved for (responses.py)
    raw: bytes | bytearray = b""  # the request body (read once; an escalation parses it again)


def usage_source(ctx: RequestState) -> str | None:
    """Where the recorded usage comes from, as the access log names it (None: nothing recorded)."""
    if ctx.partial:
        return "upstream_input+reserved_output"
    if not ctx.usage_known:
        return "reserved_input+seen_output" if ctx.output_seen else "reservation"
    return "upstream" if ctx.usage is not None else None
