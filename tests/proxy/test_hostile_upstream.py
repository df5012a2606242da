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
    assert proxy.alive()
    proxy.stop()
    _assert_charged(lines, fmt, state_file)
    err = proxy.stderr()
    assert err.count("usage that cannot be right") == len(NONSENSE)
    assert "secret prompt" not in err


def _assert_charged(lines: list[dict], fmt: str, state_file) -> None:
    """The budget holds exactly what the requests logged were charged: the usage the upstream reported,
    or, when it is unknown, the reservation (prompt estimate + 10% + 4 at the input price, the output
    cap at the output price). The proxy must have stopped (the state file is then written)."""
    pin, pout = PRICES[fmt]
    want_in = want_out = 0
    want_cost = Decimal(0)
    for x in lines:
        if x["usage_source"] == "reservation":
            n_in, n_out = x["est_prompt_tokens"] + x["est_prompt_tokens"] // 10 + 4, x["max_output_tokens"]
            want_cost += (n_in * pin + n_out * pout) / 10**6
        else:
            n_in, n_out = x["input_tokens"], x["output_tokens"]
            want_cost += Decimal(x["cost"])
        want_in, want_out = want_in + n_in, want_out + n_out
    used = json.loads(state_file.read_text())["budgets"]["b"]
    assert (used["inputTokens"], used["outputTokens"], Decimal(used["cost"])) == (want_in, want_out, want_cost)


MAX_ANSWER = 1024 * 1024
HUGE = 20 * 1024 * 1024


@pytest.fixture
def bounded(start_proxy, tmp_path):
    """As `guarded`, with a 1 MiB bound on the answers the proxy reads whole."""
    with MockUpstream(tokens=10) as up:
        a_in, a_out = PRICES["anthropic"]
        claude = backend("an", up.url, "claude-haiku", provider="Anthropic", price_in=str(a_in), price_out=str(a_out))
        claude["pricing"].update(cacheWrite=str(a_in), cacheWrite1h=str(a_in))
        cfg = stream_of(route_yaml("chat", "chat", [backend("oa", up.openai_url)]),
                        route_yaml("claude", "claude", [claude]),
                        budget_yaml("b", limits={"tokens": {"total": 10**7}, "cost": {"amount": "5"}}))
        yield up, start_proxy(cfg, state_file=tmp_path / "state.json",
                              env={"SPENDWARDEN_MAX_RESPONSE_BYTES": str(MAX_ANSWER)}), tmp_path / "state.json"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("fmt", ["openai", "anthropic"])
def test_a_huge_unary_answer_is_not_read_whole_it_gets_a_502_naming_the_bound_and_charges_the_reservation(
        bounded, fmt, chunked):
    from tests.support.memory import rss_mb

    up, proxy, state_file = bounded
    assert _post(proxy, fmt, False, {}).status_code == 200  # warm: the encoder is loaded
    before = rss_mb(proxy.proc.pid)
    headers = {"x-mock-pad-bytes": str(HUGE), **({"x-mock-chunked": "1"} if chunked else {})}
    r = _post(proxy, fmt, False, headers)
    grown = rss_mb(proxy.proc.pid) - before
    assert r.status_code == 502, r.text[:300]
    msg = r.json()["error"]["message"]
    assert f"more than {MAX_ANSWER} bytes" in msg and "--max-response-bytes" in msg and "reservation" in msg, msg
    assert grown < 12, grown  # read whole, the 20 MiB answer and its parse took some 40 MB
    lines = proxy.log(2)
    assert (lines[-1]["status"], lines[-1]["usage_source"]) == (502, "reservation")
    assert _post(proxy, fmt, False, {}).status_code == 200  # alive, and serving
    lines = proxy.log(3)
    proxy.stop()
    _assert_charged(lines, fmt, state_file)


@pytest.mark.parametrize("fmt", ["openai", "anthropic"])
def test_a_stream_event_larger_than_the_bound_ends_the_stream_with_an_error_and_charges_the_reservation(bounded, fmt):
    up, proxy, state_file = bounded
    r = _post(proxy, fmt, True, {"x-mock-pad-bytes": str(HUGE)})
    assert r.status_code == 200  # the stream had begun
    assert f"more than {MAX_ANSWER} bytes" in r.text and "--max-response-bytes" in r.text, r.text[:300]
    assert "p" * 1000 not in r.text
    lines = proxy.log(1)
    assert lines[-1]["usage_source"] == "reservation"
    assert proxy.alive()
    proxy.stop()
    _assert_charged(lines, fmt, state_file)


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
