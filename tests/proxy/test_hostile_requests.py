"""The proxy as a real process against requests a careless or hostile client sends (issue 16)."""
from __future__ import annotations

import httpx
import openai
import pytest

from .conftest import backend, budget_yaml, route_yaml, stream_of


@pytest.fixture
def budgeted(up, start_proxy):
    return start_proxy(stream_of(route_yaml("chat", "chat", [backend("oa", up.openai_url)]),
                                 route_yaml("claude", "claude", [backend("an", up.url, "claude-haiku",
                                                                         provider="Anthropic")]),
                                 budget_yaml("b", limits={"cost": {"amount": "5"}})))


MSGS = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"model": "chat", "messages": MSGS, "n": 10**9}, "n"),
    ("/v1/chat/completions", {"model": "chat", "messages": MSGS, "n": 129}, "n"),
    ("/v1/chat/completions", {"model": "chat", "messages": MSGS, "max_tokens": 10**12}, "max_tokens"),
    ("/v1/chat/completions", {"model": "chat", "messages": MSGS, "max_completion_tokens": 2**63}, "max_completion_tokens"),
    ("/v1/completions", {"model": "chat", "prompt": "x", "n": 10**9}, "n"),
    ("/v1/completions", {"model": "chat", "prompt": ["x"] * 3000}, "prompt"),
    ("/v1/messages", {"model": "claude", "messages": MSGS, "max_tokens": 10**12}, "max_tokens"),
])
def test_absurd_request_sizes_get_a_400_naming_the_field_not_budget_exhausted(up, budgeted, path, body, param):
    r = httpx.post(budgeted.url + path, json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "budget" not in err["message"] and f"'{param}'" in err["message"] and "at most" in err["message"]
    if "messages" not in path:  # OpenAI's shape names the parameter
        assert err["param"] == param
    assert up.requests() == []
    # and the budget is untouched: a sane request is served
    ok = openai.OpenAI(base_url=budgeted.openai_url, api_key="unused", max_retries=0).chat.completions.create(
        model="chat", messages=MSGS, n=2)
    assert len(ok.choices) >= 1


SECRET = "sk-live-0123456789abcdefSECRET"
MALFORMED = [  # each a request aiohttp's own parser refuses, carrying a credential somewhere
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + SECRET.encode()
    + b"\r\nthis is not a header\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nAuthorization Bearer " + SECRET.encode() + b"\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nx-api-key: " + SECRET.encode() + b"\x01\r\n\r\n",
    b"GET /v1/models?key=" + SECRET.encode() + b" HTTP/1.1 garbage\r\n\r\n",
    b"POST /v1/messages HTTP/1.1\r\nAuthorization: Bearer " + SECRET.encode() + b"\r\nContent-Length: -5\r\n\r\n",
]


def _send_raw(port: int, data: bytes) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        return answer


def test_malformed_requests_leave_no_credential_in_the_logs(budgeted):
    """aiohttp's parser logs the line it could not parse ("Invalid header value ... Authorization:
    Bearer sk-..."): whatever a malformed request carries, no credential reaches the proxy's log."""
    for data in MALFORMED:
        _send_raw(budgeted.port, data)
    assert budgeted.alive()
    budgeted.stop()
    logs = budgeted.stderr() + budgeted.log_path.read_text()
    assert SECRET not in logs and SECRET[:16] not in logs, logs[-3000:]
    assert logs.count("refused a malformed request from 127.0.0.1 with 400") == len(MALFORMED), logs[-3000:]


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "metadata": '),
    ("/v1/responses", b'{"model": "chat", "input": "hi", "metadata": '),
])
def test_a_passed_on_field_nested_deeper_than_can_be_written_gets_a_400(up, budgeted, path, body):
    """orjson reads 1024 levels but writes 254: such a body used to end in a 500 when sent upstream."""
    r = httpx.post(budgeted.url + path, content=body + _nested(300) + b"}", timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"], r.text
    assert up.requests() == [] and budgeted.alive()


def test_a_token_count_nested_too_deeply_to_forward_is_estimated(up, budgeted):
    for path, model in (("/v1/messages/count_tokens", "claude"), ("/v1/responses/input_tokens", "chat")):
        body = b'{"model": "' + model.encode() + b'", "messages": [{"role": "user", "content": "hi"}], "x": '
        r = httpx.post(budgeted.url + path, content=body + _nested(300) + b"}", timeout=30,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 200 and isinstance(r.json()["input_tokens"], int), (path, r.text)
