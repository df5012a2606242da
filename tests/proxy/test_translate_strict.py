"""Translation never drops a field silently (issue #17), through the official SDKs, a real proxy
process and the mock upstream."""
from __future__ import annotations

import json
from decimal import Decimal

import anthropic
import openai
import pytest
from pydantic import BaseModel

from .conftest import backend, route_yaml, stream_of

A_IN, A_OUT = Decimal("3"), Decimal("15")
MSG = [{"role": "user", "content": "answer in JSON"}]


class Weather(BaseModel):
    city: str
    degrees: int
    sunny: bool


@pytest.fixture
def proxy(up, start_proxy):
    return start_proxy(stream_of(
        route_yaml("chat", "chat", [backend("oa", up.openai_url, "gpt-4o-mini")]),
        route_yaml("claude", "claude", [backend("an", up.url, "claude-haiku", provider="Anthropic",
                                                price_in="3", price_out="15")]),
    ))


def oa(proxy, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.openai_url, api_key="unused", max_retries=retries, timeout=30)


def an(proxy, retries: int = 0) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key="unused", max_retries=retries, timeout=30)


def test_json_schema_is_a_forced_tool_whose_input_is_the_answer(up, proxy):
    client = oa(proxy)
    r = client.chat.completions.parse(model="claude", messages=MSG, response_format=Weather)
    rec = up.requests()[-1]
    assert rec["tool_choice"] == {"type": "tool", "name": "Weather"}
    assert r.choices[0].message.parsed == Weather(city="mock", degrees=1, sunny=True)
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert r.usage.completion_tokens == rec["usage"]["completion_tokens"]
    with client.chat.completions.stream(model="claude", messages=MSG, response_format=Weather) as s:
        final = s.get_final_completion()
    assert final.choices[0].message.parsed == Weather(city="mock", degrees=1, sunny=True)
    assert final.choices[0].finish_reason == "stop"
    line = proxy.log(2)[-1]
    assert line["usage_source"] == "upstream" and line["output_tokens"] == up.requests()[-1]["usage"]["completion_tokens"]
    # JSON mode: a forced tool taking any object (what json_object promises: valid JSON, no shape)
    r = client.chat.completions.create(model="claude", messages=MSG, response_format={"type": "json_object"})
    assert json.loads(r.choices[0].message.content) == {}
    assert up.requests()[-1]["tool_choice"] == {"type": "tool", "name": "json_object"}


def test_reasoning_effort_is_thinking_within_max_tokens_billed_as_output(up, proxy):
    client = oa(proxy)
    r = client.chat.completions.create(model="claude", messages=MSG, reasoning_effort="medium",
                                       max_completion_tokens=3000)
    rec = up.requests()[-1]
    assert rec["max_tokens"] == 3000 and rec["thinking"] == {"type": "enabled", "budget_tokens": 1500}
    assert r.choices[0].message.content and r.usage.completion_tokens == 12 + 8  # answer + thinking
    assert r.usage.completion_tokens == rec["usage"]["completion_tokens"]
    line = proxy.log(1)[-1]
    assert line["output_tokens"] == 20
    assert Decimal(line["cost"]) == (r.usage.prompt_tokens * A_IN + 20 * A_OUT) / Decimal(10**6)
    chunks = list(client.chat.completions.create(model="claude", messages=MSG, reasoning_effort="high", stream=True,
                                                 max_completion_tokens=3000, stream_options={"include_usage": True}))
    assert up.requests()[-1]["thinking"] == {"type": "enabled", "budget_tokens": 1500}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) and chunks[-1].usage.completion_tokens == 20
    with pytest.raises(openai.BadRequestError, match="reasoning_effort"):  # no room for the least budget
        client.chat.completions.create(model="claude", messages=MSG, reasoning_effort="low", max_completion_tokens=500)
    # Anthropic's thinking on an OpenAI backend: the inverse mapping
    an(proxy).messages.create(model="chat", max_tokens=9000, messages=MSG,
                              thinking={"type": "enabled", "budget_tokens": 5000})
    assert up.requests()[-1]["reasoning_effort"] == "medium" and "thinking" not in up.requests()[-1]["fields"]


@pytest.mark.parametrize("field,value", [
    ("logprobs", True), ("top_logprobs", 2), ("seed", 7), ("logit_bias", {"50256": -100}),
    ("presence_penalty", 0.5), ("frequency_penalty", 0.5), ("n", 2), ("prediction", {"type": "content", "content": "x"}),
    ("temperature", 1.5),
])
def test_openai_fields_without_an_anthropic_equivalent_are_refused_by_name(up, proxy, field, value):
    before = len(up.requests())
    with pytest.raises(openai.BadRequestError, match=f"'{field}'") as e:
        oa(proxy).chat.completions.create(model="claude", messages=MSG, **{field: value})
    assert e.value.body["param"] == field
    assert len(up.requests()) == before  # nothing reached the upstream


def test_default_values_are_no_ops_and_pass(up, proxy):
    oa(proxy).chat.completions.create(model="claude", messages=MSG, logprobs=False, presence_penalty=0,
                                      frequency_penalty=0, logit_bias={}, n=1, parallel_tool_calls=False)
    assert up.requests()[-1]["path"] == "/v1/messages"


@pytest.mark.parametrize("kwargs,field", [
    ({"top_k": 5}, "top_k"),
    ({"thinking": {"type": "adaptive"}}, "thinking"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
])
def test_anthropic_fields_without_an_openai_equivalent_are_refused_by_name(up, proxy, kwargs, field):
    before = len(up.requests())
    with pytest.raises(anthropic.BadRequestError, match=f"'{field}'".replace("[", r"\[")):
        an(proxy).messages.create(model="chat", max_tokens=50, messages=MSG, extra_body=kwargs)
    assert len(up.requests()) == before


def test_thinking_budget_follows_a_clamped_cap_so_the_budget_holds(start_proxy):
    from spendwarden.devtools.mock_upstream import MockUpstream

    from .conftest import budget_yaml
    with MockUpstream(tokens=100, reasoning_tokens=5000) as up:  # it thinks all it may
        proxy = start_proxy(stream_of(
            route_yaml("claude", "claude", [backend("an", up.url, "claude-haiku", provider="Anthropic")]),
            budget_yaml("tok", limits={"tokens": {"total": 3000}})))
        r = oa(proxy).chat.completions.create(model="claude", messages=MSG, reasoning_effort="high",
                                              max_completion_tokens=8000)
        rec = up.requests()[-1]
        assert rec["max_tokens"] < 3000  # clamped to what the budget has left
        assert rec["thinking"]["budget_tokens"] == rec["max_tokens"] // 2  # within the clamped cap
        assert r.usage.completion_tokens == rec["usage"]["completion_tokens"] <= rec["max_tokens"]
        assert r.usage.total_tokens <= 3000
