"""Error responses in each provider's own shape, so that the official SDKs raise their usual
exceptions (openai.BadRequestError, anthropic.RateLimitError, ...)."""
from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from ..routing.model import ANTHROPIC

# status -> (OpenAI type, Anthropic type)
_TYPES = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("invalid_request_error", "authentication_error"),
    403: ("invalid_request_error", "permission_error"),
    404: ("invalid_request_error", "not_found_error"),
    405: ("invalid_request_error", "invalid_request_error"),
    408: ("invalid_request_error", "timeout_error"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("budget_exceeded", "budget_exceeded"),
    500: ("server_error", "api_error"),
    501: ("not_implemented", "api_error"),
    502: ("upstream_error", "api_error"),
    503: ("server_error", "overloaded_error"),
    504: ("timeout", "timeout_error"),
    529: ("server_error", "overloaded_error"),
}

# A provider's error status -> Anthropic's error type, for an OpenAI backend's error relayed to an
# Anthropic client (the SDKs pick their exception by status; the type is what callers log and match).
_ANTHROPIC_UPSTREAM_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
    503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error",
}


def anthropic_error_type(status: int, fallback: str | None = None) -> str:
    """Anthropic's error type for a provider's status (`fallback`, else api_error, when it has none)."""
    return _ANTHROPIC_UPSTREAM_TYPES.get(status) or fallback or "api_error"


def openai_error_type(status: int) -> str:
    """OpenAI's error type for a provider's status: it names rate limits "requests" (or "tokens")."""
    return "requests" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"


def provider_error(raw: bytes) -> tuple[str | None, str] | None:
    """(type, message) of an error body in either provider's shape (OpenAI's {"error": {...}},
    Anthropic's {"type": "error", "error": {...}}); None when it is neither (an HTML page of a load
    balancer, an empty body)."""
    try:
        err = orjson.loads(raw)["error"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    if not isinstance(err, dict) or not isinstance(err.get("message", ""), str):
        return None
    etype = err.get("type")
    return (etype if isinstance(etype, str) else None), err.get("message", "")


class ProxyError(Exception):
    """A request that ends with an error response of our own making."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None,
                 outcome: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}
        self.extra = extra or {}
        self.outcome = outcome or ("rejected" if status < 500 else "upstream_error")


def error_body(fmt: str, status: int, message: str, code: str | None = None, param: str | None = None,
               extra: dict[str, Any] | None = None) -> bytes:
    oa_type, an_type = _TYPES.get(status, ("api_error", "api_error"))
    if fmt == ANTHROPIC:
        err: dict[str, Any] = {"type": an_type, "message": message}
        if extra:
            err.update(extra)
        return orjson.dumps({"type": "error", "error": err})
    err = {"message": message, "type": oa_type, "param": param, "code": code or oa_type}
    if extra:
        err.update(extra)
    return orjson.dumps({"error": err})


def stream_error_event(fmt: str, status: int, message: str) -> bytes:
    """An SSE event that makes the SDKs raise mid-stream (the HTTP status is already 200)."""
    body = error_body(fmt, status, message)
    if fmt == ANTHROPIC:
        return b"event: error\ndata: " + body + b"\n\n"
    return b"data: " + body + b"\n\n"


def refusal(fmt: str, exc: ProxyError) -> web.Response:
    """The answer to a request the proxy refuses, in the client's API format."""
    resp = web.Response(status=exc.status, headers=exc.headers, content_type="application/json",
                        body=error_body(fmt, exc.status, exc.message, exc.code, exc.param, exc.extra))
    if exc.status == 408 or exc.code == "invalid_body":
        # a client too slow to send its body does not keep the connection; nor one whose body
        # cannot be decoded (the rest of it is not read: aiohttp would fail again draining it)
        resp.force_close()
    return resp
