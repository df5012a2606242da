"""Provider signals reach the client as the provider meant them (issue #17): an upstream 5xx or
Anthropic's 529 after the last fallback keeps its status, type, message, Retry-After and request id
in the client's format; the proxy's own failures to reach an upstream stay 502/504; the Anthropic
SDK's models.list gets Anthropic's list shape."""
from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from spendwarden.devtools.mock_upstream import MockUpstream, free_port

from .conftest import backend, route_yaml, stream_of

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture
def proxy(up, start_proxy):
    return start_proxy(stream_of(
        route_yaml("chat", "chat", [backend("oa", up.openai_url)]),
        route_yaml("claude", "claude", [backend("an", up.url, "claude-haiku", provider="Anthropic")]),
        route_yaml("twice", "twice", [backend("a", up.openai_url), backend("b", up.openai_url, "gpt-b")],
                   fallbacks=["b"]),
        route_yaml("gone", "gone", [backend("g", f"http://127.0.0.1:{free_port()}/v1")])))


def oa(proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.openai_url, api_key="unused", max_retries=0, timeout=30)


def an(proxy) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key="unused", max_retries=0, timeout=30)


def _chat(proxy, model: str, stream: bool) -> None:
    r = oa(proxy).chat.completions.create(model=model, stream=stream, messages=MSG)
    if stream:
        list(r)


def _message(proxy, model: str, stream: bool) -> None:
    kw = {"model": model, "max_tokens": 10, "messages": MSG}
    if stream:
        with an(proxy).messages.stream(**kw) as s:
            list(s.text_stream)
    else:
        an(proxy).messages.create(**kw)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_an_upstream_5xx_without_fallback_keeps_its_status_type_message_and_headers(up, proxy, stream):
    up.script({"status": 500, "retry_after": 4})
    with pytest.raises(openai.InternalServerError) as e:
        _chat(proxy, "chat", stream)
    assert e.value.status_code == 500 and e.value.body["type"] == "server_error"
    assert "mock upstream error 500" in e.value.message
    h = e.value.response.headers
    assert (h["retry-after"], h["x-request-id"], h["x-spendwarden-backend"]) == ("4", "req_mock500", "oa")
    # Anthropic's 529 overloaded_error: the SDK's OverloadedError, not a 502 InternalServerError
    up.script({"status": 529, "retry_after": 9})
    with pytest.raises(anthropic.OverloadedError) as ae:
        _message(proxy, "claude", stream)
    assert ae.value.status_code == 529 and ae.value.body["error"]["type"] == "overloaded_error"
    assert ae.value.response.headers["retry-after"] == "9"
    assert ae.value.response.headers["request-id"] == "req_mock529"
    lines = proxy.log(2)
    assert [(x["status"], x["outcome"]) for x in lines] == [(500, "upstream_error"), (529, "upstream_error")]
    assert proxy.alive() and "Traceback" not in proxy.stderr()


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_a_translated_upstream_error_keeps_its_status_in_the_clients_format(up, proxy, stream):
    # An OpenAI client on the Anthropic backend: OpenAI's shape, the same status, Anthropic's type as code
    up.script({"status": 529, "retry_after": 2})
    with pytest.raises(openai.InternalServerError) as e:
        _chat(proxy, "claude", stream)
    assert e.value.status_code == 529 and e.value.response.headers["retry-after"] == "2"
    assert e.value.body["type"] == "server_error" and e.value.body["code"] == "overloaded_error"
    assert "mock upstream error 529" in e.value.message
    # An Anthropic client on an OpenAI backend: Anthropic's shape and type for the status
    up.script({"status": 503})
    with pytest.raises(anthropic.APIStatusError) as ae:
        _message(proxy, "chat", stream)
    assert ae.value.status_code == 503 and ae.value.body == {
        "type": "error", "error": {"type": "overloaded_error", "message": "mock upstream error 503"}}
    up.script({"status": 500})
    with pytest.raises(anthropic.InternalServerError) as ae:
        _message(proxy, "chat", stream)
    assert ae.value.status_code == 500 and ae.value.body["error"]["type"] == "api_error"
    assert ae.value.response.headers["x-request-id"] == "req_mock500"


def test_after_every_fallback_the_last_providers_answer_is_relayed(up, proxy):
    up.script({"status": 503}, {"status": 500})
    with pytest.raises(openai.InternalServerError) as e:
        _chat(proxy, "twice", False)
    assert e.value.status_code == 500 and e.value.response.headers["x-spendwarden-backend"] == "b"
    assert [r["status"] for r in up.requests()] == [503, 500]
    assert proxy.log(1)[-1]["attempts"] == 2


def test_an_unreachable_upstream_is_the_proxys_own_502_naming_the_failure(up, proxy):
    with pytest.raises(openai.APIStatusError) as e:
        _chat(proxy, "gone", False)
    assert e.value.status_code == 502 and e.value.body["code"] == "bad_gateway"
    assert "connection failed" in e.value.message and "'gone'" in e.value.message
    with pytest.raises(anthropic.APIStatusError) as ae:
        _message(proxy, "gone", True)
    assert ae.value.status_code == 502 and "connection failed" in ae.value.message


def test_models_list_through_the_anthropic_sdk_gets_anthropics_shape(proxy):
    client = an(proxy)
    page = client.models.list()
    assert [m.id for m in page.data] == ["chat", "claude", "gone", "twice"]
    assert page.data[0].type == "model" and page.data[0].display_name == "chat" and page.data[0].created_at
    assert [m.id for m in client.models.list(limit=3)] == ["chat", "claude", "gone", "twice"]  # auto-paginates
    raw = httpx.get(proxy.url + "/v1/models", params={"limit": 2, "after_id": "chat"},
                    headers={"x-api-key": "k"}, timeout=5).json()
    assert raw == {"data": [{"type": "model", "id": a, "display_name": a, "created_at": "1970-01-01T00:00:00Z"}
                            for a in ("claude", "gone")], "has_more": True, "first_id": "claude", "last_id": "gone"}
    assert client.models.retrieve("claude").display_name == "claude"
    with pytest.raises(anthropic.NotFoundError) as e:
        client.models.retrieve("nope")
    assert e.value.body["error"]["type"] == "not_found_error"
    # the OpenAI SDK still gets OpenAI's
    assert sorted(m.id for m in oa(proxy).models.list()) == ["chat", "claude", "gone", "twice"]
    assert oa(proxy).models.retrieve("chat").owned_by == "spendwarden"


def test_the_mock_sends_the_providers_error_shapes():
    with MockUpstream() as up:
        r = httpx.post(up.openai_url + "/chat/completions", json={"model": "m", "messages": MSG},
                       headers={"x-mock-status": "429"}, timeout=5)
        assert r.headers["content-type"] == "application/json; charset=utf-8" and r.headers["retry-after"] == "1"
        assert r.headers["x-ratelimit-remaining-requests"] == "0" and r.json()["error"]["code"] == "rate_limit_exceeded"
        r = httpx.post(up.url + "/v1/messages", json={"model": "m", "max_tokens": 5, "messages": MSG},
                       headers={"x-mock-status": "529"}, timeout=5)
        assert r.status_code == 529 and r.json() == {
            "type": "error", "error": {"type": "overloaded_error", "message": "mock upstream error 529"}}


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_anthropic_beta_headers_reach_an_anthropic_backend(up, proxy, stream):
    # The SDK's beta namespace sends the betas as one anthropic-beta header (and ?beta=true):
    # features such as interleaved thinking are switched on by it, so it must arrive unchanged.
    betas = ["interleaved-thinking-2025-05-14", "context-management-2025-06-27"]
    kw = {"model": "claude", "max_tokens": 10, "messages": MSG, "betas": betas}
    if stream:
        with an(proxy).beta.messages.stream(**kw) as s:
            text = "".join(s.text_stream)
    else:
        text = "".join(b.text for b in an(proxy).beta.messages.create(**kw).content if b.type == "text")
    assert text
    seen = up.requests()[-1]
    assert seen["path"] == "/v1/messages" and seen["api"] == "anthropic"
    assert seen["headers"]["anthropic-beta"] == ",".join(betas)
