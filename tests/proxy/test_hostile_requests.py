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
