"""The HTTP transport to the operator's ledger service (POST with the pod's projected token), for
the lease reports (ledger_client.py) and the wake requests of scaled backends (backend_load.py)."""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

log = logging.getLogger("spendwarden.proxy.ledger")

TOKEN_FILE_ENV = "SPENDWARDEN_LEDGER_TOKEN_FILE"
REPORT_PATH = "/v1/report"

# A transport posts one body and returns (HTTP status, the JSON object answered or None); raises OSError,
# asyncio.TimeoutError or aiohttp.ClientError when the ledger cannot be reached.
Transport = Callable[[dict[str, Any]], Awaitable[tuple[int, "dict[str, Any] | None"]]]


def read_token() -> str | None:
    """The projected ServiceAccount token, read on every call: the kubelet rotates the file."""
    path = os.environ.get(TOKEN_FILE_ENV)
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError as exc:
        warn_once("token", f"cannot read the ledger token file {path}: {exc.strerror or exc}; "
                           "reporting without a token")
        return None


_warned: dict[str, float] = {}


def warn_once(key: str, message: str, every: float = 60.0, level: int = logging.WARNING) -> None:
    """Log a recurring problem at most once a minute (reports run every second)."""
    now = time.monotonic()
    if now - _warned.get(key, -1e9) >= every:
        _warned[key] = now
        log.log(level, "%s", message)


class HttpTransport:
    """POST {url}{path} (the report by default) with the pod's token as Bearer (never logged)."""

    def __init__(self, url: str, timeout: float = 5.0, path: str = REPORT_PATH):
        self.url = url.rstrip("/") + path
        self.timeout = timeout
        self._session: Any = None

    async def __call__(self, body: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout),
                                                  cookie_jar=aiohttp.DummyCookieJar())
        headers = {"Content-Type": "application/json"}
        token = read_token()
        if token:
            headers["Authorization"] = "Bearer " + token
        async with self._session.post(self.url, data=orjson.dumps(body), headers=headers) as resp:
            raw = await resp.read()
            try:
                answer = orjson.loads(raw)
            except orjson.JSONDecodeError:
                return resp.status, None
            # An error answer too: its "error" says why, for the log.
            return resp.status, answer if isinstance(answer, dict) else None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


__all__ = ["TOKEN_FILE_ENV", "REPORT_PATH", "Transport", "read_token", "warn_once", "HttpTransport"]
