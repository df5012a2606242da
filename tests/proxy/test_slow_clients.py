"""The proxy as a real process against clients that send slowly or not at all (issue 16): a
slowloris head, a trickled body, a connection that never speaks. Deadlines are configured small
(SPENDWARDEN_HEAD_TIMEOUT, SPENDWARDEN_BODY_TIMEOUT) so that each case takes seconds."""
from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from .conftest import backend, route_yaml

HEAD_TIMEOUT, BODY_TIMEOUT = 1.0, 1.5
# Without deadlines aiohttp keeps such a connection for its keep-alive timeout (an hour): wait well
# past the deadline, far short of that.
GIVE_UP = 8.0


@pytest.fixture
def proxy(up, start_proxy):
    return start_proxy(route_yaml("chat", "chat", [backend("oa", up.openai_url)]),
                       env={"SPENDWARDEN_HEAD_TIMEOUT": str(HEAD_TIMEOUT),
                            "SPENDWARDEN_BODY_TIMEOUT": str(BODY_TIMEOUT)})


def _trickle(sock: socket.socket, data: bytes, every: float, until: float) -> bytes:
    """Send `data` a byte at a time; return what the proxy answered once it answers or closes."""
    sock.settimeout(every)
    answer = b""
    for i in range(len(data)):
        if time.monotonic() > until:
            break
        try:
            sock.send(data[i:i + 1])
        except OSError:
            break  # closed by the proxy
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
        if not chunk:
            break
        answer += chunk
        if b"\r\n\r\n" in answer:
            break
    return answer


def _answer(sock: socket.socket, until: float) -> bytes:
    answer = b""
    while time.monotonic() < until:
        sock.settimeout(max(until - time.monotonic(), 0.01))
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, OSError):
            break
        if not chunk:
            break
        answer += chunk
    return answer


def _split(answer: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return lines[0], headers, body


def _normal_request_served(proxy) -> None:
    r = httpx.post(proxy.openai_url + "/chat/completions", timeout=10,
                   json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text


def test_a_slowloris_head_gets_a_408_and_is_closed_at_the_head_deadline(proxy):
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-Slow-%d: %s\r\n" % (i, b"v" * 20) for i in range(200)))
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        answer = _trickle(s, head, 0.05, t0 + GIVE_UP)
        answer += _answer(s, t0 + GIVE_UP)  # then the proxy closes
        took = time.monotonic() - t0
    status, headers, body = _split(answer)
    assert status.startswith("HTTP/1.1 408"), answer[:500]
    assert took < HEAD_TIMEOUT + 2, took
    assert headers["connection"].lower() == "close"
    err = json.loads(body)["error"]
    assert err["code"] == "request_timeout" and f"{HEAD_TIMEOUT:g}s" in err["message"], err
    assert proxy.alive()
    _normal_request_served(proxy)
    assert "Traceback" not in proxy.stderr()


def test_a_connection_that_never_sends_a_head_is_closed_at_the_head_deadline(proxy):
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        answer = _answer(s, t0 + GIVE_UP)
        took = time.monotonic() - t0
    assert answer == b"" and took < HEAD_TIMEOUT + 2, (answer, took)
    _normal_request_served(proxy)


@pytest.mark.parametrize("path,shape", [("/v1/chat/completions", "openai"), ("/v1/messages", "anthropic")])
def test_a_trickled_body_gets_a_408_in_the_api_shape_at_the_body_deadline(proxy, path, shape):
    body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "x" * 4000}]}).encode()
    head = (b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (path.encode(), len(body)))
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.sendall(head)
        answer = _trickle(s, body, 0.05, t0 + GIVE_UP)
        took = time.monotonic() - t0
    status, headers, rest = _split(answer)
    assert status.startswith("HTTP/1.1 408"), answer[:500]
    assert took < BODY_TIMEOUT + 2, took
    assert headers["connection"].lower() == "close"
    got = json.loads(rest[: int(headers["content-length"])])
    msg = got["error"]["message"]
    assert f"{BODY_TIMEOUT:g}s" in msg and "body" in msg
    if shape == "anthropic":
        assert got["type"] == "error" and got["error"]["type"] == "timeout_error"
    else:
        assert got["error"]["code"] == "request_timeout"
    line = proxy.log(1)[-1]
    assert (line["status"], line["outcome"]) == (408, "rejected")
    assert proxy.alive()
    _normal_request_served(proxy)


def _read_response(sock: socket.socket, until: float) -> tuple[str, bytes]:
    data = b""
    sock.settimeout(max(until - time.monotonic(), 0.01))
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    status, headers, body = _split(data)
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return status, body


def test_a_kept_alive_connection_idle_past_the_head_deadline_still_serves_its_next_request(proxy):
    """The head deadline counts from a request's first byte, not from the last answer: an SDK's pooled
    connection may sit idle between calls."""
    body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}).encode()
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        for i in range(2):
            if i:
                time.sleep(HEAD_TIMEOUT * 2.5)
            s.sendall(req)
            status, _ = _read_response(s, time.monotonic() + 5)
            assert status.startswith("HTTP/1.1 200"), status
