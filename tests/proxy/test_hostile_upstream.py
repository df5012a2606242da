"""The proxy as a real process against upstreams that answer nonsense (issue 16)."""
from __future__ import annotations

import json
from decimal import Decimal

import anthropic
import httpx
import openai
import pytest

from spendwarden.devtools.mock_upstream import MockUpstream

from .conftest import backend, budget_yaml, route_yaml, stream_of

PRICES = {"openai": (Decimal("0.15"), Decimal("0.60")), "anthropic": (Decimal("3"), Decimal("15"))}
# Usage no answer can have: negative input, negative output, more input than any context window.
NONSENSE = [{"x-mock-prompt-tokens": str(-10**12)}, {"x-mock-completion-tokens": "-5"},
            {"x-mock-prompt-tokens": str(10**15)}]


def _post(proxy, fmt: str, stream: bool, headers: dict[str, str]) -> httpx.Response:
    msgs = [{"role": "user", "content": "a secret prompt"}]
    if fmt == "openai":
        url, body = proxy.openai_url + "/chat/completions", {"model": "chat", "messages": msgs}
    else:
        url, body = proxy.url + "/v1/messages", {"model": "claude", "messages": msgs}
    return httpx.post(url, json={**body, "max_tokens": 50, "stream": stream}, headers=headers, timeout=30)


@pytest.fixture
def guarded(start_proxy, tmp_path):
    with MockUpstream(tokens=10) as up:
        a_in, a_out = PRICES["anthropic"]
        claude = backend("an", up.url, "claude-haiku", provider="Anthropic", price_in=str(a_in),
                         price_out=str(a_out))
        # cache-write prices at the input price: the reservation's prompt price is then the input price
        claude["pricing"].update(cacheWrite=str(a_in), cacheWrite1h=str(a_in))
        cfg = stream_of(route_yaml("chat", "chat", [backend("oa", up.openai_url)]),
                        route_yaml("claude", "claude", [claude]),
                        budget_yaml("b", limits={"tokens": {"total": 10**7}, "cost": {"amount": "5"}}))
        yield up, start_proxy(cfg, state_file=tmp_path / "state.json"), tmp_path / "state.json"


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("fmt", ["openai", "anthropic"])
def test_nonsense_usage_charges_the_reservation_and_never_credits(guarded, fmt, stream):
    up, proxy, state_file = guarded
    for headers in NONSENSE:
        r = _post(proxy, fmt, stream, headers)
        assert r.status_code == 200, r.text
    lines = proxy.log(len(NONSENSE))
    assert [x["usage_source"] for x in lines] == ["reservation"] * len(NONSENSE)
    pin, pout = PRICES[fmt]
    reserved_in = sum(x["est_prompt_tokens"] + x["est_prompt_tokens"] // 10 + 4 for x in lines)
    reserved_out = sum(x["max_output_tokens"] for x in lines)
    assert proxy.alive()
    proxy.stop()
    used = json.loads(state_file.read_text())["budgets"]["b"]
    assert (used["inputTokens"], used["outputTokens"]) == (reserved_in, reserved_out)
    assert Decimal(used["cost"]) == (reserved_in * pin + reserved_out * pout) / 10**6
    err = proxy.stderr()
    assert err.count("usage that cannot be right") == len(NONSENSE)
    assert "secret prompt" not in err


def _chat(client: openai.OpenAI, model: str, stream: bool) -> None:
    r = client.chat.completions.create(model=model, stream=stream, messages=[{"role": "user", "content": "hi"}])
    if stream:
        list(r)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_an_upstream_429_reaches_the_sdks_with_its_body_and_rate_limit_headers(start_proxy, stream):
    """OpenAI answers a 429 as "application/json; charset=utf-8", which the proxy turned into 500
    internal proxy error: the SDKs must see the provider's 429, its message, Retry-After and its
    rate-limit headers, also when the answer is translated between the formats."""
    with MockUpstream(tokens=5) as up:
        proxy = start_proxy(stream_of(
            route_yaml("chat", "chat", [backend("oa", up.openai_url)]),
            route_yaml("claude", "claude", [backend("an", up.url, "claude-haiku", provider="Anthropic")])))
        oa = openai.OpenAI(base_url=proxy.openai_url, api_key="unused", max_retries=0, timeout=30)
        up.script({"status": 429, "retry_after": 7})
        with pytest.raises(openai.RateLimitError) as e:
            _chat(oa, "chat", stream)
        h = e.value.response.headers
        assert (h["retry-after"], h["x-ratelimit-remaining-tokens"], h["x-ratelimit-reset-requests"]) == ("7", "0", "120ms")
        assert e.value.body["code"] == "rate_limit_exceeded" and "mock upstream error 429" in e.value.message
        up.script({"status": 429})
        with pytest.raises(anthropic.RateLimitError) as e:
            an = anthropic.Anthropic(base_url=proxy.url, api_key="unused", max_retries=0, timeout=30)
            kw = {"model": "claude", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
            if stream:
                with an.messages.stream(**kw) as s:
                    list(s.text_stream)
            else:
                an.messages.create(**kw)
        h = e.value.response.headers
        assert h["retry-after"] == "1" and h["anthropic-ratelimit-tokens-remaining"] == "0"
        assert e.value.body["error"]["type"] == "rate_limit_error"
        up.script({"status": 429})  # an OpenAI client on the Anthropic backend: translated, headers kept
        with pytest.raises(openai.RateLimitError) as e:
            _chat(oa, "claude", stream)
        assert e.value.response.headers["anthropic-ratelimit-requests-remaining"] == "0"
        assert "mock upstream error 429" in e.value.message
        lines = proxy.log(3)
        assert [(x["status"], x["outcome"]) for x in lines] == [(429, "upstream_error")] * 3
        assert proxy.alive() and "Traceback" not in proxy.stderr()
