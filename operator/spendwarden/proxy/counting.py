"""Token counting endpoints (Anthropic's /v1/messages/count_tokens, OpenAI's
/v1/responses/input_tokens): free, never metered. The body is read within the proxy's bounds,
forwarded to a backend that counts with the provider's own tokenizer when there is one, else
answered with the proxy's estimate (the one its reservations use)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from .config import BackendRt
from .errors import ProxyError, error_body, refusal
from .estimate import PromptEstimate
from .limits import AnswerTooLarge, read_answer, read_body
from .upstream import UpstreamCalls, media_type

# From a checked body: the backend that counts (None: the estimate), or a ProxyError (unknown alias).
BackendOf = Callable[[dict[str, Any]], BackendRt | None]


class TokenCounting(UpstreamCalls, PromptEstimate):
    """Mixed into Proxy."""

    async def _count(self, request: web.Request, fmt: str, api: str, backend_of: BackendOf,
                     path: str, answer: Callable[[int], dict[str, Any]]) -> web.StreamResponse:
        """`path` is appended to the backend's URL for `api`; `answer` shapes the estimate."""
        assert self.session is not None
        hold = self.bodies.hold()
        try:
            try:
                body = orjson.loads(await read_body(request, self.max_body, self.body_timeout, hold))
                if not isinstance(body, dict):
                    raise ValueError("the body must be a JSON object")
                backend = backend_of(body)
            except ValueError as exc:
                return web.Response(status=400, content_type="application/json",
                                    body=error_body(fmt, 400, f"invalid request: {exc}"))
            except ProxyError as exc:
                return refusal(fmt, exc)
            payload = None
            if backend is not None and not backend.missing_credentials:
                try:
                    payload = orjson.dumps({**body, "model": backend.model})
                except orjson.JSONEncodeError:  # nested deeper than orjson writes (254 levels): the estimate
                    payload = None
            if backend is not None and payload is not None:
                url = backend.url(api).with_path(backend.url(api).path + path)
                try:
                    async with self.session.post(url, data=payload,
                                                 headers=self._headers(request, backend, False),
                                                 timeout=self._timeout(backend, False)) as resp:
                        data = await read_answer(resp, self.max_answer)
                        if resp.status in (200, 400):  # else (no such endpoint, 5xx, ...): the estimate
                            return web.Response(status=resp.status, body=data,
                                                content_type=media_type(resp.headers.get("Content-Type", "")))
                except (TimeoutError, aiohttp.ClientError, OSError, AnswerTooLarge):
                    pass  # fall back to the estimate
            try:
                est = await self._estimate(api, body)
            except Exception:  # noqa: BLE001 - malformed content: count what can be counted
                est = 0
            return web.Response(content_type="application/json", body=orjson.dumps(answer(est)))
        finally:
            hold.release()
