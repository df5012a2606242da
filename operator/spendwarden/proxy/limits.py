"""What a slow or hostile client may hold of the proxy: deadlines for the request head and body.

aiohttp itself only has a keep-alive timer (an hour in 3.14), which does not restart while a head
trickles in, and no deadline at all for a body: a client sending a byte every few seconds held a
connection, and its buffer, indefinitely (issue 16).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from .config import ANTHROPIC, OPENAI
from .errors import ProxyError, error_body

log = logging.getLogger("spendwarden.proxy")

# A head is under 16 KiB (max_field_size) and a local app sends it in one write; 10 s still allows a
# congested network in front of a standalone proxy and closes a slowloris long before it matters.
DEFAULT_HEAD_TIMEOUT = 10.0
# From the end of the head to the end of the body: an 8 MiB body at about 2 Mbit/s; an app on the
# pod's loopback sends it in milliseconds.
DEFAULT_BODY_TIMEOUT = 30.0


class SlowClientGuard(RequestHandler):
    """aiohttp's connection handler with a head deadline: from the connection's start, and from the
    first byte of each later request on a kept-alive connection, until the head is parsed. When it
    passes, a connection that sent part of a head gets a 408; one that sent nothing is closed."""

    __slots__ = ("_head_timeout", "_head_timer", "_head_started", "_head_fmt")

    def __init__(self, *args: Any, head_timeout: float = DEFAULT_HEAD_TIMEOUT, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._head_timeout = head_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started = False
        self._head_fmt = OPENAI

    def _awaiting_head(self) -> bool:
        # start() waits on _waiter exactly while no request is parsed and none is being handled (not
        # while it discards the rest of an unread body); before its first step there is no _waiter.
        if self._messages:
            return False
        return self._request_count == 0 or (self._waiter is not None and not self._waiter.done())

    def _arm(self) -> None:
        if self._head_timeout > 0 and self._head_timer is None:
            self._head_timer = self._loop.call_later(self._head_timeout, self._head_late)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data and self._awaiting_head():
            if not self._head_started:
                self._head_started = True
                # Only to answer in the API's error shape; the request line is not kept.
                self._head_fmt = ANTHROPIC if data[:24].find(b" /v1/messages") >= 0 else OPENAI
            self._arm()
        super().data_received(data)
        if self._messages:  # a head was parsed (or refused with a 400): its deadline is met
            self._disarm()
            self._head_started = False

    def _head_late(self) -> None:
        self._head_timer = None
        if not self._awaiting_head() or self.transport is None:
            return  # a request is being handled; the next one's first byte arms the deadline again
        peer = self.transport.get_extra_info("peername")
        peer = peer[0] if isinstance(peer, tuple) else "?"
        if self._head_started:
            log.warning("closed a connection from %s: no complete request head within %gs (408)", peer,
                        self._head_timeout)
            body = error_body(self._head_fmt, 408, f"the request head did not arrive within "
                                                   f"{self._head_timeout:g}s (the proxy's head deadline)",
                              code="request_timeout")
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        self.force_close()  # the transport sends what is buffered, then closes


class _GuardedServer(web.Server):
    def __call__(self) -> RequestHandler:
        return SlowClientGuard(self, loop=self._loop, head_timeout=self.head_timeout, **self._kwargs)


class GuardedAppRunner(web.AppRunner):
    """web.AppRunner whose connections have the head deadline (SlowClientGuard)."""

    def __init__(self, app: web.Application, *, head_timeout: float = DEFAULT_HEAD_TIMEOUT, **kwargs: Any):
        super().__init__(app, **kwargs)
        self._head_timeout = head_timeout

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # Application builds a plain web.Server; only its protocol factory differs.
        server.__class__ = _GuardedServer
        server.head_timeout = self._head_timeout  # type: ignore[attr-defined]
        return server


async def read_body(request: web.Request, max_body: int, timeout: float) -> bytes:
    """The request body, within `max_body` bytes (413) and `timeout` seconds from the end of the
    head (408; the caller closes the connection: the rest of the body is not wanted)."""
    if request.content_length is not None and request.content_length > max_body:
        raise ProxyError(413, f"request body of {request.content_length} bytes exceeds the limit of "
                              f"{max_body} bytes", code="request_too_large")
    try:
        async with asyncio.timeout(timeout if timeout > 0 else None):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ProxyError(413, f"request body exceeds the limit of {max_body} bytes",
                         code="request_too_large") from None
    except TimeoutError:
        raise ProxyError(408, f"the request body did not arrive within {timeout:g}s (the proxy's body "
                              "deadline)", code="request_timeout") from None


__all__ = ["DEFAULT_BODY_TIMEOUT", "DEFAULT_HEAD_TIMEOUT", "GuardedAppRunner", "SlowClientGuard", "read_body"]
