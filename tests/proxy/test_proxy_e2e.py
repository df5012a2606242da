"""The proxy as a real process between the official SDKs and the mock upstream."""
from __future__ import annotations

from decimal import Decimal

import anthropic
import httpx
import openai
import pytest

from spendwarden.devtools.mock_upstream import MockUpstream

from .conftest import backend, budget_yaml, route_yaml, stream_of

IN, OUT = Decimal("0.15"), Decimal("0.60")
A_IN, A_OUT, A_CACHED = Decimal("3"), Decimal("15"), Decimal("0.30")


def expected_cost(inp: int, out: int, cached: int = 0, pin=IN, pout=OUT, pcached=None) -> Decimal:
    pcached = pin if pcached is None else pcached
    return ((inp - cached) * pin + cached * pcached + out * pout) / Decimal(10**6)


@pytest.fixture
def proxy(up, start_proxy):
    cfg = stream_of(
        route_yaml("chat", "chat", [backend("oa", up.openai_url, "gpt-4o-mini")]),
        route_yaml("claude", "claude", [backend("an", up.url, "claude-haiku", provider="Anthropic",
                                                price_in="3", price_out="15",
                                                pricing={"input": "3", "output": "15", "cachedInput": "0.30"})]),
        route_yaml("emb", "emb", [backend("e", up.openai_url, "text-embedding-3-small", price_in="0.02",
                                          price_out="0")]),
    )
    return start_proxy(cfg)


def oa(proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.openai_url, api_key="unused", max_retries=0, timeout=30)


def an(proxy) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key="unused", max_retries=0, timeout=30)


def last_upstream(up) -> dict:
    return up.requests()[-1]


def test_openai_chat_non_stream_usage_and_cost_exact(up, proxy):
    r = oa(proxy).chat.completions.create(model="chat", messages=[{"role": "user", "content": "hello there"}],
                                          extra_headers={"x-spendwarden-tags": "scenario=ticket,team=x,bad key=1"})
    rec = last_upstream(up)
    assert rec["model"] == "gpt-4o-mini"  # alias rewritten to the backend's model
    assert r.usage.prompt_tokens == rec["usage"]["prompt_tokens"]
    line = proxy.log(1)[-1]
    assert line["outcome"] == "ok" and line["status"] == 200 and line["route"] == "chat" and line["backend"] == "oa"
    assert line["input_tokens"] == r.usage.prompt_tokens and line["output_tokens"] == r.usage.completion_tokens
    assert Decimal(line["cost"]) == expected_cost(r.usage.prompt_tokens, r.usage.completion_tokens)
    assert line["tags"] == {"scenario": "ticket", "team": "x"}
    assert "hello there" not in proxy.log_path.read_text()


def test_openai_stream_usage_chunk_dropped_unless_asked(up, proxy):
    client = oa(proxy)
    chunks = list(client.chat.completions.create(model="chat", stream=True,
                                                 messages=[{"role": "user", "content": "stream please"}]))
    assert chunks and all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    rec = last_upstream(up)
    assert rec["include_usage"] is True
    line = proxy.log(1)[-1]
    assert line["stream"] is True and line["usage_source"] == "upstream"
    assert line["input_tokens"] == rec["usage"]["prompt_tokens"]
    assert line["output_tokens"] == rec["usage"]["completion_tokens"] == 12
    assert line["ttft_ms"] is not None
    # asked for usage: it is delivered
    chunks = list(client.chat.completions.create(model="chat", stream=True, stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": "x"}]))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


def test_anthropic_messages_stream_and_not(up, proxy):
    client = an(proxy)
    m = client.messages.create(model="claude", max_tokens=100, messages=[{"role": "user", "content": "hi"}])
    assert m.usage.output_tokens == 12
    line = proxy.log(1)[-1]
    assert line["input_tokens"] == m.usage.input_tokens
    assert Decimal(line["cost"]) == expected_cost(m.usage.input_tokens, 12, pin=A_IN, pout=A_OUT)
    assert last_upstream(up)["model"] == "claude-haiku"
    up.script({"cached_tokens": 5, "tokens": 7})
    with client.messages.stream(model="claude", max_tokens=100, messages=[{"role": "user", "content": "hey"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text
    line = proxy.log(2)[-1]
    u = final.usage
    total_in = u.input_tokens + (u.cache_read_input_tokens or 0) + (u.cache_creation_input_tokens or 0)
    assert line["input_tokens"] == total_in and line["cached_input_tokens"] == 5 and line["output_tokens"] == 7
    assert Decimal(line["cost"]) == expected_cost(total_in, 7, 5, A_IN, A_OUT, A_CACHED)


def test_anthropic_cache_writes_priced_at_one_and_a_quarter_input(up, proxy):
    """Prompt tokens written to Anthropic's cache cost 1.25x input (no cacheWrite price set: the
    Anthropic default), streamed or not, in the log's cost and in the token metrics."""
    a_write = A_IN * Decimal("1.25")
    client = an(proxy)
    m = client.messages.create(model="claude", max_tokens=100, messages=[{"role": "user", "content": "cache me " * 20}],
                               extra_headers={"x-mock-cache-write-tokens": "40", "x-mock-cached-tokens": "4"})
    assert m.usage.cache_creation_input_tokens == 40
    line = proxy.log(1)[-1]
    total_in = m.usage.input_tokens + 40 + 4
    assert line["input_tokens"] == total_in and line["cache_write_tokens"] == 40
    assert Decimal(line["cost"]) == ((total_in - 44) * A_IN + 4 * A_CACHED + 40 * a_write + 12 * A_OUT) / 10**6
    with client.messages.stream(model="claude", max_tokens=100, messages=[{"role": "user", "content": "again " * 20}],
                                extra_headers={"x-mock-cache-write-tokens": "30"}) as s:
        final = s.get_final_message()
    line = proxy.log(2)[-1]
    total_in = final.usage.input_tokens + 30
    assert line["input_tokens"] == total_in and line["cache_write_tokens"] == 30
    assert Decimal(line["cost"]) == ((total_in - 30) * A_IN + 30 * a_write + 12 * A_OUT) / 10**6
    assert 'gen_ai_token_type="cache_write"' in proxy.metrics()


def test_completions_embeddings_and_models(up, proxy):
    client = oa(proxy)
    c = client.completions.create(model="chat", prompt="Once upon", max_tokens=5)
    assert c.usage.completion_tokens == 5
    e = client.embeddings.create(model="emb", input=["a", "bb"])
    assert len(e.data) == 2
    line = proxy.log(2)[-1]
    assert line["api"] == "embeddings" and Decimal(line["cost"]) == e.usage.prompt_tokens * Decimal("0.02") / 10**6
    assert sorted(m.id for m in client.models.list()) == ["chat", "claude", "emb"]


def test_bad_requests_get_provider_shaped_errors(up, proxy):
    client = oa(proxy)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}],
                                       max_tokens="ten")
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="chat", messages="hello")
    r = httpx.post(proxy.openai_url + "/chat/completions", content=b"{not json", timeout=5)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(proxy.openai_url + "/chat/completions", content=b"x" * (9 * 1024 * 1024), timeout=10)
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(proxy.url + "/v1/messages", content=b"[1,2]", timeout=5)
    assert r.status_code == 400 and r.json()["type"] == "error"
    with pytest.raises(anthropic.NotFoundError):
        an(proxy).messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    # format mismatch: only chat requests are translated between formats; the rest is refused clearly
    with pytest.raises(openai.BadRequestError, match="Anthropic"):
        client.completions.create(model="claude", prompt="x")
    with pytest.raises(openai.BadRequestError, match="translated"):
        client.embeddings.create(model="claude", input="x")
    assert up.requests() == []  # none of these reached the upstream
    assert proxy.alive()
    outcomes = {line["outcome"] for line in proxy.log(9)}
    assert outcomes == {"rejected"}


def test_bad_upstreams(up, start_proxy):
    cfg = stream_of(
        route_yaml("chat", "chat", [backend("a", up.openai_url), backend("b", up.openai_url, "gpt-b")],
                   fallbacks=["b"]),
        route_yaml("solo", "solo", [backend("s", up.openai_url, timeoutSeconds=1)]),
        route_yaml("claude", "claude", [backend("an", up.url, "claude-haiku", provider="Anthropic")]),
    )
    proxy = start_proxy(cfg)
    client = oa(proxy)
    # 500 on the first backend: the fallback answers
    up.script({"status": 500})
    r = client.chat.completions.with_raw_response.create(model="chat", messages=[{"role": "user", "content": "x"}])
    assert r.headers["x-spendwarden-backend"] == "b"
    assert proxy.log(1)[-1]["outcome"] == "fallback"
    # 5xx everywhere: the last provider's answer (test_provider_signals.py has the details)
    up.script({"status": 503}, {"status": 500})
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 500
    # garbage: 502
    up.script({"garbage": True})
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="solo", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 502
    # hang: 504 after the backend's timeout
    up.script({"hang": True})
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="solo", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 504
    # disconnect mid-stream: the SDK raises, the reservation is kept as the charge
    up.script({"disconnect_after": 3, "tokens": 50})
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(model="solo", stream=True, max_tokens=100,
                                                messages=[{"role": "user", "content": "x"}]):
            pass
    line = proxy.log(5)[-1]
    assert line["outcome"] == "upstream_error" and line["status"] == 200
    # Anthropic stream cut mid-way: anthropic SDK raises too
    up.script({"disconnect_after": 3, "tokens": 50})
    with pytest.raises(anthropic.APIError):
        with an(proxy).messages.stream(model="claude", max_tokens=100,
                                       messages=[{"role": "user", "content": "x"}]) as s:
            for _ in s.text_stream:
                pass
    line = proxy.log(6)[-1]
    assert line["usage_source"] == "upstream_input+reserved_output" and line["output_tokens"] == 100
    assert proxy.alive()
    ok = client.chat.completions.create(model="solo", messages=[{"role": "user", "content": "still up?"}])
    assert ok.choices
    m = proxy.metrics()
    for name in ("gen_ai_client_token_usage_bucket", "spendwarden_cost_total", "spendwarden_requests_total",
                 "gen_ai_client_operation_duration_seconds_bucket", "gen_ai_server_time_to_first_token_seconds_bucket",
                 "spendwarden_upstream_failures_total", "spendwarden_proxy_overhead_seconds_bucket"):
        assert name in m, name
    assert 'outcome="fallback"' in m and 'outcome="upstream_error"' in m


def test_client_disconnect_mid_stream_charges_the_reservation(start_proxy, tmp_path):
    with MockUpstream(tokens=40, chunk_delay_ms=50) as up:
        proxy = start_proxy(stream_of(route_yaml("chat", "chat", [backend("oa", up.openai_url)]),
                                      budget_yaml("b", limits={"tokens": {"total": 100000}})),
                            state_file=tmp_path / "state.json")
        body = {"model": "chat", "stream": True, "max_tokens": 40, "messages": [{"role": "user", "content": "x"}]}
        with httpx.Client(timeout=10) as c:
            with c.stream("POST", proxy.openai_url + "/chat/completions", json=body) as r:
                assert r.status_code == 200
                seen = 0
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        seen += 1
                    if seen == 3:
                        break
        line = proxy.log(1, timeout=10)[-1]
        assert line["outcome"] == "client_closed" and line["usage_source"] == "reservation"
        assert proxy.alive()
        proxy.stop()
        import json as _json
        used = _json.loads((tmp_path / "state.json").read_text())["budgets"]["b"]
        assert used["outputTokens"] == 40  # the whole reservation: the provider may bill every token


def test_openai_client_to_anthropic_backend_is_translated(up, proxy):
    client = oa(proxy)
    r = client.chat.completions.create(model="claude", max_tokens=50,
                                       messages=[{"role": "system", "content": "be brief"},
                                                 {"role": "user", "content": "hi"}])
    rec = last_upstream(up)
    assert rec["path"] == "/v1/messages" and rec["model"] == "claude-haiku" and rec["max_tokens"] == 50
    assert r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 12
    line = proxy.log(1)[-1]
    assert Decimal(line["cost"]) == expected_cost(r.usage.prompt_tokens, 12, pin=A_IN, pout=A_OUT)
    chunks = list(client.chat.completions.create(model="claude", stream=True, stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": "stream"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    line = proxy.log(2)[-1]
    assert line["usage_source"] == "upstream" and line["output_tokens"] == 12
    # provider errors come back in OpenAI's shape
    up.script({"status": 400})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="claude", messages=[{"role": "user", "content": "x"}])


def test_anthropic_client_to_openai_backend_is_translated(up, proxy):
    client = an(proxy)
    m = client.messages.create(model="chat", max_tokens=40, system="be brief",
                               messages=[{"role": "user", "content": "hi"}])
    rec = last_upstream(up)
    assert rec["path"] == "/v1/chat/completions" and rec["model"] == "gpt-4o-mini" and rec["max_tokens"] == 40
    assert m.content[0].text and m.stop_reason == "end_turn" and m.usage.output_tokens == 12
    line = proxy.log(1)[-1]
    assert line["translated"] is True and line["input_tokens"] == m.usage.input_tokens
    assert Decimal(line["cost"]) == expected_cost(m.usage.input_tokens, 12)
    with client.messages.stream(model="chat", max_tokens=40, messages=[{"role": "user", "content": "x"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == final.content[0].text and final.usage.output_tokens == 12
    line = proxy.log(2)[-1]
    assert line["usage_source"] == "upstream" and line["output_tokens"] == 12
    assert final.usage.input_tokens == line["input_tokens"]


def test_model_retrieve_and_count_tokens(up, proxy):
    assert oa(proxy).models.retrieve("chat").id == "chat"
    with pytest.raises(openai.NotFoundError):
        oa(proxy).models.retrieve("nope")
    # the alias has no Anthropic backend: the proxy's own estimate answers
    n = an(proxy).messages.count_tokens(model="chat", messages=[{"role": "user", "content": "hello world"}])
    assert n.input_tokens > 2
    with pytest.raises(anthropic.NotFoundError):
        an(proxy).messages.count_tokens(model="nope", messages=[{"role": "user", "content": "x"}])
    # an Anthropic backend without the endpoint (the mock): the estimate again
    assert an(proxy).messages.count_tokens(model="claude", messages=[{"role": "user", "content": "hi"}]).input_tokens
