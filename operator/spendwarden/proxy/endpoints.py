"""The proxy's endpoints that call no completion: health, the model list, count_tokens (answered locally), metrics, and the 404 (501 for the SDKs' APIs it does not meter: unserved.py) in the API's error shape."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from ..routing.apis import MESSAGES
from . import unserved
from .config import (
    ANTHROPIC,
    OPENAI,
    BackendRt,
)
from .counting import TokenCounting
from .errors import ProxyError, error_body
from .reload import ConfigReload

# The aliases' creation time in Anthropic's model objects (RFC 3339; OpenAI's list says created 0).
_EPOCH = "1970-01-01T00:00:00Z"


def anthropic_client(request: web.Request) -> bool:
    """A request from the Anthropic SDK (which sends anthropic-version, and its key as x-api-key) on a
    path both APIs share (/v1/models): it is answered in Anthropic's shape."""
    h = request.headers
    return "anthropic-version" in h or ("x-api-key" in h and "authorization" not in h)


def anthropic_model(alias: str) -> dict[str, Any]:
    return {"type": "model", "id": alias, "display_name": alias, "created_at": _EPOCH}


def anthropic_models_page(aliases: list[str], query: Mapping[str, str]) -> dict[str, Any]:
    """One page of Anthropic's Models API list (limit 1-1000, default 20; after_id / before_id
    cursors), so that the SDK's auto-pagination walks every alias exactly once."""
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        raise ValueError("limit: Input should be a valid integer") from None
    if not 1 <= limit <= 1000:
        raise ValueError("limit: Input should be between 1 and 1000")
    after, before = query.get("after_id"), query.get("before_id")
    if before is not None:
        end = aliases.index(before) if before in aliases else len(aliases)
        chosen = aliases[max(end - limit, 0):end]
        more = end - limit > 0
    else:
        start = aliases.index(after) + 1 if after is not None and after in aliases else 0
        chosen = aliases[start:start + limit]
        more = start + limit < len(aliases)
    return {"data": [anthropic_model(a) for a in chosen], "has_more": more,
            "first_id": chosen[0] if chosen else None, "last_id": chosen[-1] if chosen else None}

log = logging.getLogger("spendwarden.proxy")


class SmallEndpoints(ConfigReload, TokenCounting):
    """Mixed into Proxy: answers that need no backend call."""

    async def metrics_handler(self, request: web.Request) -> web.Response:
        self._budget_gauges()
        return web.Response(body=self.metrics.render(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def models(self, request: web.Request) -> web.Response:
        assert self.compiled is not None
        if anthropic_client(request):
            try:
                page = anthropic_models_page(sorted(self.compiled.routes), request.query)
            except ValueError as exc:
                return web.Response(status=400, content_type="application/json",
                                    body=error_body(ANTHROPIC, 400, str(exc)))
            return web.Response(body=orjson.dumps(page), content_type="application/json")
        return web.Response(body=self.compiled.models_body, content_type="application/json")

    async def model(self, request: web.Request) -> web.Response:
        assert self.compiled is not None
        alias = request.match_info["model"]
        fmt = ANTHROPIC if anthropic_client(request) else OPENAI
        if alias not in self.compiled.routes:
            return web.Response(status=404, content_type="application/json", body=error_body(
                fmt, 404, f"The model '{alias[:256]}' does not exist", code="model_not_found", param="model"))
        doc = anthropic_model(alias) if fmt == ANTHROPIC else \
            {"id": alias, "object": "model", "created": 0, "owned_by": "spendwarden"}
        return web.Response(content_type="application/json", body=orjson.dumps(doc))

    async def count_tokens(self, request: web.Request) -> web.StreamResponse:
        """Anthropic's token counting: forwarded to the alias's Anthropic backend (not metered: it is
        free), or answered with the proxy's own estimate when the alias has no Anthropic backend."""
        def backend_of(body: dict[str, Any]) -> BackendRt | None:
            model = body.get("model")
            if not isinstance(model, str):
                raise ValueError("the body must be a JSON object with a string 'model'")
            assert self.compiled is not None
            route = self.compiled.routes.get(model)
            if route is None:
                raise ProxyError(404, f"The model '{model[:256]}' does not exist")
            return route.default if route.default.fmt == ANTHROPIC else \
                next((b for b in route.backends.values() if b.fmt == ANTHROPIC), None)
        return await self._count(request, ANTHROPIC, MESSAGES, backend_of, "/count_tokens",
                                 lambda est: {"input_tokens": est})

    async def not_found(self, request: web.Request) -> web.Response:
        fmt = ANTHROPIC if request.path.startswith("/v1/messages") or "anthropic-version" in request.headers \
            else OPENAI
        status = 405 if request.path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                                         "/v1/messages", "/v1/models", "/v1/responses") else 404
        name = unserved.endpoint_of(request.path, fmt == ANTHROPIC) if status == 404 else None
        if name is not None:  # known to the SDKs, not metered here: say what it is and what to do
            msg = unserved.message(request.method, request.path, name, "Anthropic" if fmt == ANTHROPIC else "OpenAI")
            return web.Response(status=unserved.STATUS, headers=unserved.HEADERS, content_type="application/json",
                                body=error_body(fmt, unserved.STATUS, msg, code="endpoint_not_metered"))
        msg = f"{request.method} {request.path[:256]} is not served by the spendwarden proxy"
        return web.Response(status=status, body=error_body(fmt, status, msg, code="unknown_url"),
                            content_type="application/json")
