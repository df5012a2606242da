"""A minimal HTTP/1.1 server for the ledger API (the proxies' POST /v1/report, about once a second each).

Why not aiohttp's web.Application, which the rest of the operator uses: per request it costs about
80 µs of CPU before the handler runs (router, middlewares, request and response objects); this
server costs about 18 µs (bench/README.md, "Ledger HTTP server"), and the report path is what the
ledger's throughput target (issue #4: >= 5,000 reports/s) is made of. Handlers are the same
coroutines as on an aiohttp app (LedgerService.app() serves them there, for tests and embedding):
they take a request with `.headers.get()`, `await .read()` and `await .json()`, and return an
aiohttp `web.Response` or, on the hot path, a `Reply` (cheaper to build).

What it speaks: HTTP/1.1 (and 1.0) requests with a Content-Length body (or none), keep-alive and
pipelining (answers in order), `Connection: close`. What it refuses, each with a JSON error and the
connection closed: a request line or headers over 16 KiB (431), a body over the limit (413),
Transfer-Encoding (411: the proxies send Content-Length), a bare LF line ending (400, at once:
proxies send CRLF), anything unparseable (400), a request not complete `request_timeout` seconds
after its first byte (408: a client trickling bytes must not hold a connection forever). Unknown
paths get 404, known paths with another method 405. A handler that raises answers 500; the server
stays up. Idle keep-alive connections are closed after `idle_timeout`.

Bounds against callers that are not proxies: at most `max_connections` at once (one more is answered
503 and closed at once); a connection's first request has `request_timeout` from the connect, so a
silent one does not hold a slot; at most MAX_QUEUED requests or `max_body` bytes of bodies are read
ahead per connection. With an `admit` hook (LedgerService.admit) each head is judged before its body
is read: refused at once (a missing or malformed token, one known bad: 401, and the connection
closed), TRUSTED (a token known good: bodies up to `max_body`), REVIEW (a token not known yet: a body
over `max_unverified_body` is read only once `verify` has reviewed the token) or PUBLIC (no token
needed: bodies up to `max_unverified_body`, more is a 413).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, cast

from aiohttp import web

log = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024
MAX_QUEUED = 8   # pipelined requests read ahead per connection before reading pauses (proxies send one at a time)
MAX_UNVERIFIED_BODY = 16 * 1024  # a report of a few budgets; a bigger one waits for its token's review
TRUSTED, REVIEW, PUBLIC = "trusted", "review", "public"


class Trusted:
    """TRUSTED, with what the head's check learnt (a token's reviewed identity): the handler reads it
    from `request.principal` instead of parsing and hashing the token a second time."""

    __slots__ = ("principal",)

    def __init__(self, principal: Any):
        self.principal = principal


Admission = str | tuple[int, str] | Trusted   # one of the three (or Trusted), or the refusal (status, message)
_BARE_LF = re.compile(rb"(?<!\r)\n")


class Headers:
    """Case-insensitive lookup, as the handlers use aiohttp's."""

    __slots__ = ("_items",)

    def __init__(self, items: dict[str, str]):
        self._items = items

    def get(self, name: str, default: Any = None) -> Any:
        return self._items.get(name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items


class Request:
    __slots__ = ("method", "path", "headers", "body", "principal")

    def __init__(self, method: str, path: str, headers: Headers, body: bytes, principal: Any = None):
        self.method, self.path, self.headers, self.body = method, path, headers, body
        self.principal = principal  # the admit hook's Trusted.principal; None: the handler checks itself

    async def read(self) -> bytes:
        return self.body

    async def json(self, loads: Callable[[Any], Any] = json.loads) -> Any:
        return loads(self.body)


class Reply:
    """A JSON answer, without the header machinery of a web.Response."""

    __slots__ = ("status", "body")

    def __init__(self, status: int, body: bytes):
        self.status, self.body = status, body


Handler = Callable[[Any], Awaitable["web.StreamResponse | Reply"]]


def aiohttp_handler(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The handler for an aiohttp app: a Reply becomes a web.Response."""
    async def handle(request: web.Request) -> web.StreamResponse:
        answer = await handler(request)
        if isinstance(answer, Reply):
            return web.Response(status=answer.status, body=answer.body, content_type="application/json")
        return answer
    return handle


class _BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _reply(status: int, body: bytes, content_type: str, close: bool,
           extra: list[tuple[str, str]] | None = None) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    head = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in extra or ()]
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def _error(status: int, message: str, close: bool) -> bytes:
    return _reply(status, json.dumps({"error": message}).encode(), "application/json", close)


_SKIP_HEADERS = frozenset(("content-type", "content-length", "transfer-encoding", "connection"))


def _serialize(resp: web.StreamResponse | Reply, close: bool) -> bytes:
    if type(resp) is Reply:
        return _reply(resp.status, resp.body, "application/json", close)
    resp = cast(web.StreamResponse, resp)  # not a Reply: checked by exact type above (the fast path)
    body = getattr(resp, "body", None) or b""
    if not isinstance(body, bytes | bytearray):
        raise TypeError(f"the ledger API answers with bytes bodies, not {type(body).__name__}")
    content_type = resp.headers.get("Content-Type") or "application/octet-stream"
    extra = [(k, v) for k, v in resp.headers.items() if k.lower() not in _SKIP_HEADERS]
    return _reply(resp.status, bytes(body), content_type, close, extra)


class _Connection(asyncio.Protocol):
    def __init__(self, server: LedgerHttpServer):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.queue: deque[Request | bytes] = deque()   # parsed requests, or a final error answer
        self.worker: asyncio.Task | None = None      # one per connection, for its lifetime
        self.wakeup: asyncio.Future | None = None    # set while the worker waits for a request
        self.closing = False      # no more requests are read (an error, Connection: close, or EOF)
        self.paused = False       # reading paused: the queue is full
        self.verifying = False    # reading paused: the head waits for its token's review
        self.reviewed = False     # that review is done: its head is judged for the last time
        self.queued_bytes = 0
        self.last_active = time.monotonic()
        # The deadline's start: the connect, then the first byte of each request; None between requests.
        self.started: float | None = self.last_active

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if len(self.server.connections) >= self.server.max_connections:
            self.server.refused += 1
            self.closing = True
            transport.write(_error(503, "too many connections to the ledger; retry", close=True))  # type: ignore[attr-defined]
            transport.close()
            return
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.closing = True
        self.queue.clear()
        self._wake()  # an idle worker ends

    def eof_received(self) -> bool:
        self.closing = True
        if self.busy:
            return True   # answer what is in flight, then close
        return False      # nothing in flight: let the transport close

    @property
    def busy(self) -> bool:
        """A request is being answered or waits in the queue."""
        return bool(self.queue) or (self.worker is not None and not self.worker.done() and self.wakeup is None)

    def _wake(self) -> None:
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.last_active = now = time.monotonic()
        if not self.buffer and self.started is None:
            self.started = now
        self.buffer += data
        try:
            if self._parse():  # what is left of the chunk began a new request
                self.started = now if self.buffer else None
        except _BadRequest as exc:
            self._fail(exc.status, str(exc))
        self._schedule()
        self._flow(len(self.queue) >= MAX_QUEUED or self.queued_bytes >= self.server.max_body)

    def _flow(self, full: bool = False) -> None:
        """Pause reading while the queue is full or a head waits for its review; resume after."""
        if full:
            self.paused = True  # only the worker, having answered, unpauses
        if self.transport is None or self.closing:
            return
        if self.paused or self.verifying:
            self.transport.pause_reading()
        elif not self.transport.is_reading():
            if self.buffer:
                self.started = time.monotonic()  # time spent paused is ours, not the client's
            self.transport.resume_reading()

    def _schedule(self) -> None:
        if self.queue:
            if self.worker is None:  # a task per connection, not per request (a task costs ~5 µs)
                self.worker = asyncio.get_running_loop().create_task(self._work())
            else:
                self._wake()

    def _fail(self, status: int, message: str) -> None:
        """The last answer on this connection: nothing more is read."""
        self.closing = True
        self.started = None
        self.buffer.clear()
        self.queue.append(_error(status, message, close=True))

    def expire(self, timeout: float) -> None:
        """The request being read took too long (the sweeper's call)."""
        self._fail(408, f"the request was not complete within {timeout:g} s of its first byte")
        self._schedule()

    # -- parsing

    def _parse(self) -> int:
        """Parse the complete requests in the buffer into the queue; how many."""
        buf = self.buffer
        parsed = 0
        # The rest stays in the buffer (reading pauses) until the worker has answered some.
        while not self.closing and len(self.queue) < MAX_QUEUED and self.queued_bytes < self.server.max_body:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if _BARE_LF.search(buf, 0, MAX_HEAD):  # else such a head waits for a CRLF that never comes
                    raise _BadRequest(400, "malformed request: line endings must be CRLF")
                if len(buf) > MAX_HEAD:
                    raise _BadRequest(431, "request line and headers exceed 16 KiB")
                return parsed
            if end > MAX_HEAD:
                raise _BadRequest(431, "request line and headers exceed 16 KiB")
            if _BARE_LF.search(buf, 0, end):
                raise _BadRequest(400, "malformed request: line endings must be CRLF")
            lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                raise _BadRequest(400, "malformed request line")
            method, target, version = parts
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep or not name or name != name.strip():
                    raise _BadRequest(400, "malformed header line")
                headers[name.lower()] = value.strip()
            if "transfer-encoding" in headers:
                raise _BadRequest(411, "send the body with Content-Length (Transfer-Encoding is not supported)")
            length_text = headers.get("content-length", "0")
            if not length_text.isdigit():
                raise _BadRequest(400, "Content-Length: not a number")
            length = int(length_text)
            if length > self.server.max_body:
                raise _BadRequest(413, f"the body exceeds {self.server.max_body} bytes")
            path = target.partition("?")[0]
            head = Headers(headers)
            principal = None
            if self.server.admit is not None:
                admitted = self._admitted(path, head, length)
                if admitted is False:
                    return parsed  # the token is under review; reading resumes after it
                principal = admitted
            if len(buf) < end + 4 + length:
                return parsed
            body = bytes(buf[end + 4:end + 4 + length])
            parsed += 1
            self.queued_bytes += length
            self.reviewed = False
            del buf[:end + 4 + length]
            connection = headers.get("connection", "").lower()
            if connection == "close" or (version == "HTTP/1.0" and connection != "keep-alive"):
                self.closing = True
            self.queue.append(Request(method, path, head, body, principal))
        return parsed

    def _admitted(self, path: str, headers: Headers, length: int) -> Any:
        """Whether the body may be read now: False when a review was started, else the request's
        principal (None if the head's check learnt none); raises the refusal."""
        verdict = self.server.admit(path, headers)  # type: ignore[misc]
        if type(verdict) is Trusted:
            return verdict.principal
        if isinstance(verdict, tuple):
            raise _BadRequest(*verdict)
        if verdict == TRUSTED or length <= self.server.max_unverified_body:
            return None
        if verdict == PUBLIC:
            raise _BadRequest(413, f"the body exceeds {self.server.max_unverified_body} bytes")
        if self.reviewed or self.server.verify is None:  # reviewed, and still not known: not now
            raise _BadRequest(503, "cannot verify the token now; retry")
        self.verifying = True
        self._flow()
        asyncio.get_running_loop().create_task(self._verify(headers))
        return False

    async def _verify(self, headers: Headers) -> None:
        try:
            await self.server.verify(headers)  # type: ignore[misc]
        except Exception:  # noqa: BLE001 - judged again below: unknown still, so a 503
            pass
        self.verifying, self.reviewed = False, True
        if self.closing:
            return
        self.data_received(b"")  # the same head again, now with the verdict cached

    # -- answering (in order)

    async def _work(self) -> None:
        while self.transport is not None and not self.transport.is_closing():
            if not self.queue:
                if self.closing:
                    break
                self.wakeup = asyncio.get_running_loop().create_future()
                await self.wakeup
                self.wakeup = None
                continue
            item = self.queue.popleft()
            if type(item) is Request:
                self.queued_bytes -= len(item.body)
            last = self.closing and not self.queue
            answer = item if isinstance(item, bytes) else await self._answer(item, last)
            if self.transport.is_closing():
                return
            self.transport.write(answer)
            self.last_active = time.monotonic()
            if self.paused and len(self.queue) < MAX_QUEUED // 2 and self.queued_bytes < self.server.max_body:
                self.paused = False
                self.data_received(b"")  # parse what was left in the buffer, then read on
        if self.transport is not None:
            self.transport.close()

    async def _answer(self, request: Request, close: bool) -> bytes:
        methods = self.server.routes.get(request.path)
        if methods is None:
            return _error(404, f"no such endpoint: {request.path[:100]}", close)
        handler = methods.get(request.method)
        if handler is None:
            return _reply(405, json.dumps({"error": f"{request.method[:10]} is not allowed here"}).encode(),
                          "application/json", close, [("Allow", ", ".join(sorted(methods)))])
        try:
            return _serialize(await handler(request), close)
        except Exception:  # one bad request must not take the server down
            log.exception("ledger API handler failed", extra={"path": request.path})
            return _error(500, "internal error; retry", close)


class LedgerHttpServer:
    """Serves `routes` ({path: {method: handler}}) on host:port until stop()."""

    def __init__(self, routes: dict[str, dict[str, Handler]], max_body: int = 1 << 20, idle_timeout: float = 75.0,
                 request_timeout: float = 10.0, max_connections: int = 4096,
                 admit: Callable[[str, Headers], Admission] | None = None,
                 verify: Callable[[Headers], Awaitable[object]] | None = None,
                 max_unverified_body: int = MAX_UNVERIFIED_BODY):
        self.routes = routes
        self.max_body = max_body
        self.max_connections = max_connections
        self.refused = 0  # connections refused at max_connections
        self.admit, self.verify = admit, verify
        self.max_unverified_body = min(max_unverified_body, max_body)
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout  # head and body, from the request's first byte
        self.connections: set[_Connection] = set()
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.Task | None = None

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port, reuse_address=True)
        self._sweeper = loop.create_task(self._sweep())
        return self._server.sockets[0].getsockname()[1]

    async def _sweep(self) -> None:
        """Close keep-alive connections idle for longer than idle_timeout (nothing in flight), and
        answer 408 to requests still being read request_timeout after their first byte."""
        while True:
            await asyncio.sleep(min(self.idle_timeout / 2, self.request_timeout / 2, 5.0))
            now = time.monotonic()
            for conn in list(self.connections):
                if (conn.started is not None and not (conn.paused or conn.verifying or conn.closing)
                        and now - conn.started > self.request_timeout):
                    conn.expire(self.request_timeout)
                elif not conn.busy and now - conn.last_active > self.idle_timeout and conn.transport:
                    conn.transport.close()

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let answers in flight finish (up to `grace` seconds), close the rest."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        workers = [c.worker for c in self.connections if c.busy and c.worker is not None]
        if workers:
            await asyncio.wait(workers, timeout=grace)
        rest = [c.worker for c in self.connections if c.worker is not None]
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        if rest:
            await asyncio.wait(rest, timeout=1.0)  # idle workers end once their connection is lost
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
