"""The ledger API's HTTP server (controller/ledger_http.py) on a real socket on 127.0.0.1."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from aiohttp import web

from spendwarden.controller.ledger_http import LedgerHttpServer, Reply


async def echo(request) -> web.Response:
    body = await request.json()
    return web.json_response({"got": body, "auth": request.headers.get("authorization")})


async def slow(request) -> web.Response:
    await asyncio.sleep(float((await request.read()) or 0))
    return web.Response(body=await request.read(), content_type="application/json")


async def boom(request) -> web.Response:
    raise RuntimeError("a bug")


async def reply(request) -> Reply:
    return Reply(201, b'{"fast": true}')


ROUTES = {"/echo": {"POST": echo}, "/reply": {"POST": reply}, "/slow": {"POST": slow}, "/boom": {"GET": boom},
          "/health": {"GET": lambda r: asyncio.sleep(0, web.json_response({"ok": True}))}}


@pytest.fixture
async def server():
    srv = LedgerHttpServer(ROUTES, max_body=1000, idle_timeout=0.6)
    port = await srv.start("127.0.0.1", 0)
    yield srv, port
    await srv.stop()


async def raw(port: int, data: bytes, until_close: bool = True, read: int = 65536) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    out = await asyncio.wait_for(reader.read(-1) if until_close else reader.read(read), 5)
    writer.close()
    return out


def post(path: str, body: bytes, *headers: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: x", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def test_keep_alive_requests_are_answered_on_one_connection(server):
    _, port = server
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        for i in range(3):
            r = await http.post("/echo?x=1", json={"n": i}, headers={"Authorization": "Bearer t"})
            assert r.status_code == 200 and r.json() == {"got": {"n": i}, "auth": "Bearer t"}
            assert r.headers["content-type"].startswith("application/json")
        assert (await http.get("/health")).json() == {"ok": True}
        r = await http.post("/reply", content=b"")
        assert (r.status_code, r.json(), r.headers["content-type"]) == (201, {"fast": True}, "application/json")
        assert len(server[0].connections) == 1


async def test_pipelined_requests_are_answered_in_order(server):
    _, port = server
    # The first takes longest: answers must still come in request order.
    data = post("/slow", b"0.3") + post("/slow", b"0") + post("/echo", b'{"n": 3}', "Connection: close")
    out = await raw(port, data)
    assert out.count(b"HTTP/1.1 200 OK") == 3
    assert out.index(b"\r\n\r\n0.3") < out.index(b"\r\n\r\n0HTTP") < out.index(b'{"got"')
    assert out.endswith(b'"auth": null}') and b"Connection: close" in out


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /nowhere HTTP/1.1\r\n\r\n", 404),
    (b"GET /echo HTTP/1.1\r\n\r\n", 405),
    (b"NONSENSE\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nbad header\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nContent-Length: 5000\r\n\r\n", 413),
    (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411),
    (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", 431),
    (b"GET /boom HTTP/1.1\r\nConnection: close\r\n\r\n", 500),
])
async def test_bad_requests_get_a_clear_json_error_and_the_server_stays_up(server, request_bytes, status):
    _, port = server
    out = await raw(port, request_bytes, until_close=status not in (404, 405), read=4096)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), head
    assert json.loads(body)["error"]
    if status == 405:
        assert b"Allow: POST" in head
    async with httpx.AsyncClient() as http:  # still serving
        assert (await http.post(f"http://127.0.0.1:{port}/echo", json=1)).json()["got"] == 1


async def test_a_handler_error_answers_500_and_keeps_the_connection(server):
    _, port = server
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        r = await http.get("/boom")
        assert r.status_code == 500 and r.json() == {"error": "internal error; retry"}
        assert (await http.post("/echo", json=2)).json()["got"] == 2


async def test_http_1_0_closes_and_idle_connections_are_closed(server):
    srv, port = server
    out = await raw(port, b"GET /health HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 OK") and b'{"ok": true}' in out
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /health HTTP/1.1\r\n\r\n")
    assert (await reader.read(4096)).startswith(b"HTTP/1.1 200")
    assert await asyncio.wait_for(reader.read(), 5) == b"", "an idle keep-alive connection is closed"
    writer.close()


async def test_stop_lets_an_answer_in_flight_finish(server):
    srv, port = server
    async with httpx.AsyncClient() as http:
        pending = asyncio.create_task(http.post(f"http://127.0.0.1:{port}/slow", content=b"0.3"))
        await asyncio.sleep(0.1)
        await srv.stop()
        assert (await pending).status_code == 200
        with pytest.raises(httpx.ConnectError):
            await http.post(f"http://127.0.0.1:{port}/echo", json=1)


async def _trickle(port: int, first: bytes, data: bytes, every: float, within: float) -> tuple[bytes, float]:
    """Send `first`, then `data` a byte at a time; what the server answered and when it closed (or `within`)."""
    began = asyncio.get_running_loop().time()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(first)
    out = b""
    try:
        for i in range(10**6):
            if i < len(data) and not out:  # once answered, only read
                writer.write(data[i:i + 1])
            try:
                chunk = await asyncio.wait_for(reader.read(4096), every)
            except TimeoutError:
                chunk = None
            if chunk == b"":
                break
            out += chunk or b""
            if asyncio.get_running_loop().time() - began > within:
                break
    finally:
        writer.close()
    return out, asyncio.get_running_loop().time() - began


@pytest.mark.parametrize("first, data", [(b"", post("/echo", b'{"n": 1}')),                  # a slow head
                                         (post("/echo", b"x" * 400)[:-400], b"x" * 400)],    # a slow body
                         ids=["head", "body"])
async def test_a_request_trickled_byte_by_byte_gets_408_at_its_deadline(first, data):
    """The idle timer restarted at every byte: one byte every few seconds kept a connection (and its
    buffer) forever. A request now has request_timeout from its first byte, however it trickles."""
    srv = LedgerHttpServer(ROUTES, max_body=1000, idle_timeout=1.0, request_timeout=0.6)
    port = await srv.start("127.0.0.1", 0)
    try:
        out, took = await _trickle(port, first, data, every=0.15, within=4.0)
        assert out.startswith(b"HTTP/1.1 408 ") and b"within 0.6 s of its first byte" in out, out
        assert took < 3.0
        async with httpx.AsyncClient() as http:  # others still served
            assert (await http.post(f"http://127.0.0.1:{port}/echo", json=1)).json()["got"] == 1
    finally:
        await srv.stop()


@pytest.mark.parametrize("data", [b"GET /health HTTP/1.1\n\n", b"GET /health HTTP/1.1\nHost: x\n",
                                  b"GET /health HTTP/1.1\r\nHost: x\n\r\n"])
async def test_bare_lf_line_endings_are_refused_at_once(server, data):
    """A head ending in bare LFs waited for a CRLF CRLF that never came, unanswered until the idle
    timeout closed it: now a 400 at once."""
    _, port = server
    began = asyncio.get_running_loop().time()
    out = await raw(port, data)
    assert out.startswith(b"HTTP/1.1 400 ") and b"line endings must be CRLF" in out, out
    assert asyncio.get_running_loop().time() - began < 0.5  # before the fixture's 0.6 s idle timeout
