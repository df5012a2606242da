"""The proxy as a real process against upstreams that answer nonsense (issue 16)."""
from __future__ import annotations

import json
from decimal import Decimal

import httpx
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
