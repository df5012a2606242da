"""The proxy as a real process under a flood of large request bodies that never finish (issue 16:
20 partial 8 MiB bodies grew the sidecar from 153 to 333 MB, above its 256Mi limit)."""
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from tests.support.memory import rss_mb

from .conftest import backend, route_yaml

MIB = 1024 * 1024
FLOOD, SENT = 20, 7 * MIB  # connections; bytes each sends of an 8 MiB body before it stalls
BODY_TIMEOUT = 4.0
# The default pool of buffered body bytes (32 MiB) plus what the interpreter, aiohttp's and the
# kernel's buffers and the allocator's slack add; the unbounded proxy grew by more than 140 MB.
RSS_BOUND_MB = 72




def _partial_body(port: int, answers: list[bytes], sent: list[int]) -> None:
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (8 * MIB - 1))
    chunk = b'{"model": "chat", "messages": [{"role": "user", "content": "' + b"x" * (64 * 1024)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(BODY_TIMEOUT + 12)
        s.sendall(head)
        n = 0
        try:
            while n < SENT:
                s.sendall(chunk)
                n += len(chunk)
        except OSError:
            pass
        sent.append(n)
        answer = b""
        try:
            while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < 60:
                got = s.recv(65536)
                if not got:
                    break
                answer += got
        except OSError:
            pass
        answers.append(answer)


def _chat(proxy, content: str = "hi") -> httpx.Response:
    return httpx.post(proxy.openai_url + "/chat/completions", timeout=15,
                      json={"model": "chat", "messages": [{"role": "user", "content": content}]})


@pytest.fixture
def proxy(up, start_proxy):
    return start_proxy(route_yaml("chat", "chat", [backend("oa", up.openai_url)]),
                       env={"SPENDWARDEN_BODY_TIMEOUT": str(BODY_TIMEOUT)})


def test_partial_large_bodies_stay_within_the_buffer_bound_and_ordinary_requests_are_served(proxy):
    assert _chat(proxy).status_code == 200
    pid = proxy.proc.pid
    before = rss_mb(pid)
    answers: list[bytes] = []
    sent: list[int] = []
    threads = [threading.Thread(target=_partial_body, args=(proxy.port, answers, sent), daemon=True)
               for _ in range(FLOOD)]
    for t in threads:
        t.start()
    peak = before
    served_during = None
    deadline = time.monotonic() + BODY_TIMEOUT + 15
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        peak = max(peak, rss_mb(pid))
        if served_during is None and len(sent) == FLOOD:
            # every flooder has sent what it will: ordinary requests still get through
            served_during = _chat(proxy).status_code
        time.sleep(0.05)
    for t in threads:
        t.join(1)
    after = rss_mb(pid)
    print(f"proxy RSS: {before:.0f} MB before, {peak:.0f} MB at the peak of {FLOOD} partial 8 MiB bodies, "
          f"{after:.0f} MB after")
    assert peak - before < RSS_BOUND_MB, (before, peak)
    assert served_during == 200
    statuses = [a.split(b" ", 2)[1] if a.startswith(b"HTTP/1.1 ") else a[:40] for a in answers]
    assert len(statuses) == FLOOD and set(statuses) <= {b"503", b"408"}, statuses
    assert statuses.count(b"503") >= FLOOD - 32 * MIB // SENT - 1, statuses  # those the pool could not hold
    refused = next(a for a in answers if a.startswith(b"HTTP/1.1 503"))
    head, _, body = refused.partition(b"\r\n\r\n")
    err = json.loads(body[: int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])])["error"]
    assert err["code"] == "proxy_busy" and "MiB" in err["message"], err
    assert b"retry-after: 1" in head.lower()
    assert proxy.alive()
    assert _chat(proxy, "y" * MIB).status_code == 200  # the pool is free again for a large body
