"""What a slow or hostile client may hold of the proxy: deadlines for the request head and body, and
a bound on the request bodies held in memory at once; and what an upstream answer may: its size.

aiohttp itself only has a keep-alive timer (an hour in 3.14), which does not restart while a head
trickles in, and no deadline at all for a body: a client sending a byte every few seconds held a
connection, and its buffer, indefinitely; 20 partial 8 MiB bodies took a sidecar above its memory
limit; a 20 MiB upstream answer was read whole (issue 16).
"""
from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from ..routing.model import ANTHROPIC, OPENAI
from .errors import ProxyError, error_body

log = logging.getLogger("spendwarden.proxy")

# A head is under 16 KiB (max_field_size) and a local app sends it in one write; 10 s still allows a
# congested network in front of a standalone proxy and closes a slowloris long before it matters.
DEFAULT_HEAD_TIMEOUT = 10.0
# From the end of the head to the end of the body: an 8 MiB body at about 2 Mbit/s; an app on the
# pod's loopback sends it in milliseconds.
DEFAULT_BODY_TIMEOUT = 30.0
# Request bodies held at once, across connections: four bodies of the default 8 MiB limit. A body
# costs about three times its size while it is served (the bytes, the parsed JSON, the payload sent
# upstream): some 100 MB, which with the proxy's own 48-85 MB (bench/README.md) stays under the sidecar's 256Mi.
DEFAULT_BODY_MEMORY = 32 * 1024 * 1024
# The first bytes of every body are not counted: a connection costs about as much in aiohttp's and
# the kernel's buffers anyway, and ordinary chat requests fit in it, so a flood of large bodies that
# fills the pool still lets them through.
UNCOUNTED_BODY_BYTES = 64 * 1024
# A non-streamed upstream answer is read and parsed whole (its usage is in it), which costs about
# twice its size. Chat and messages answers stay below 1 MiB even at 128K output tokens; embeddings
# batches are the large ones: 1,000 inputs of 1,536 dimensions in base64 (the OpenAI SDK's default
# encoding) are about 8 MiB. Larger batches, or float encoding (some 3.5 times larger), need more.
DEFAULT_MAX_ANSWER = 16 * 1024 * 1024


class AnswerTooLarge(Exception):
    pass


async def read_answer(resp: Any, limit: int) -> bytes:
    """An upstream (aiohttp.ClientResponse) answer's body, or AnswerTooLarge once it passes `limit`
    bytes (counted decompressed): the rest is not read."""
    if resp.content_length is not None and resp.content_length > limit:
        raise AnswerTooLarge
    body = bytearray()
    while chunk := await resp.content.readany():
        if len(body) + len(chunk) > limit:
            raise AnswerTooLarge
        body += chunk
    return bytes(body)


def parser_error_kind(exc: HttpProcessingError) -> str:
    """What kind of parse error `exc` is, without the bytes aiohttp quotes in its message (the header
    line, `Authorization: Bearer sk-...` included; the request line, query included): the text of
    that message up to its first colon or quote."""
    kind = re.split(r"[:'\"]", str(exc.message).strip(), maxsplit=1)[0].strip()[:80]
    return kind or type(exc).__name__


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

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse (or whose handler raised) is plain text
        that quotes the offending line: the SDKs cannot read it, and it echoes a credential into
        whatever logs the answer. The same status in the API's error shape instead."""
        super().handle_error(request, status, exc, message)  # logs (redacted: run.ParserErrorRedactor)
        if status < 500 and isinstance(exc, HttpProcessingError):
            text = f"malformed HTTP request ({parser_error_kind(exc)})"
        else:
            text = "internal proxy error" if status >= 500 else f"malformed HTTP request ({status})"
        resp = web.Response(status=status, body=error_body(self._head_fmt, status, text,
                                                           code="malformed_request" if status < 500 else None),
                            content_type="application/json")
        resp.force_close()
        return resp


class _GuardedServer(web.Server):
    head_timeout: float  # set by GuardedAppRunner._make_server

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


class BodyMemory:
    """The bytes of request bodies held in memory, across connections, against one limit."""

    def __init__(self, limit: int = DEFAULT_BODY_MEMORY):
        self.limit = limit
        self.used = 0

    def hold(self) -> BodyHold:
        return BodyHold(self)

    def busy(self) -> ProxyError:
        return ProxyError(503, f"the proxy holds {self.limit / 2**20:g} MiB of request bodies already (its limit "
                               "for all requests at once): retry shortly", code="proxy_busy",
                          headers={"Retry-After": "1"})


class BodyHold:
    """What one request holds of the BodyMemory; release() when the request is done."""

    __slots__ = ("memory", "n")

    def __init__(self, memory: BodyMemory):
        self.memory, self.n = memory, 0

    def grow_to(self, size: int) -> bool:
        want = max(size - UNCOUNTED_BODY_BYTES, 0) - self.n
        if want <= 0:
            return True
        if self.memory.used + want > self.memory.limit:
            return False
        self.memory.used += want
        self.n += want
        return True

    def release(self) -> None:
        self.memory.used -= self.n
        self.n = 0


async def read_body(request: web.Request, max_body: int, timeout: float, hold: BodyHold) -> bytearray:
    """The request body, within `max_body` bytes (413), what `hold`'s BodyMemory has left (503) and
    `timeout` seconds from the end of the head (408; the caller closes the connection: the rest of
    the body is not wanted). The caller releases `hold` once the body is no longer needed."""
    declared = request.content_length
    if declared is not None and declared > max_body:
        raise ProxyError(413, f"request body of {declared} bytes exceeds the limit of {max_body} bytes",
                         code="request_too_large")
    if declared is not None and not hold.grow_to(declared):
        raise hold.memory.busy()  # before reading any of it
    body = bytearray()
    try:
        async with asyncio.timeout(timeout if timeout > 0 else None):
            # By hand, not request.read(): each chunk is counted before it is kept (a chunked body
            # declares no length), and a refused body is dropped at once.
            while chunk := await request.content.readany():
                size = len(body) + len(chunk)
                if size > max_body:
                    raise ProxyError(413, f"request body exceeds the limit of {max_body} bytes",
                                     code="request_too_large")
                if not hold.grow_to(size):
                    raise hold.memory.busy()
                body += chunk
        return body
    except (HttpProcessingError, RequestPayloadError) as exc:  # a body its Content-Encoding does not
        cause = exc if isinstance(exc, HttpProcessingError) else exc.__cause__  # decode, a bad chunk size
        why = parser_error_kind(cause) if isinstance(cause, HttpProcessingError) else "malformed payload"
        # The rest is not wanted (the answer closes the connection): marked read, or aiohttp, draining
        # it after the answer, would meet the error again and log it as unhandled.
        request.content.feed_eof()
        raise ProxyError(400, f"the request body cannot be read ({why})", code="invalid_body") from None
    except TimeoutError:
        raise ProxyError(408, f"the request body did not arrive within {timeout:g}s (the proxy's body "
                              "deadline)", code="request_timeout") from None


__all__ = ["DEFAULT_BODY_MEMORY", "DEFAULT_BODY_TIMEOUT", "DEFAULT_HEAD_TIMEOUT", "DEFAULT_MAX_ANSWER",
           "UNCOUNTED_BODY_BYTES", "AnswerTooLarge", "BodyHold", "BodyMemory", "GuardedAppRunner", "SlowClientGuard",
           "read_answer", "read_body"]
