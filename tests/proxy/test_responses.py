"""OpenAI's Responses API through a real proxy process, with the official openai SDK, against the
mock upstream (devtools/mock_responses.py): metered like chat, streamed event by event, reasoning
tokens priced as output and reported on their own, budgets reserved for (previous_response_id
included), the free endpoints forwarded, Anthropic aliases refused."""
from __future__ import annotations

import re
from decimal import Decimal

import httpx
import openai
import pytest

from spendwarden.devtools.mock_upstream import MockUpstream

from .conftest import backend, budget_yaml, route_yaml, stream_of
from .test_accounting import assert_log_metrics_and_budget_agree, total

PIN, POUT, PCACHED = Decimal("0.15"), Decimal("0.60"), Decimal("0.075")
PRICING = {"input": str(PIN), "output": str(POUT), "cachedInput": str(PCACHED)}
# The mock's reasoning model: 20 reasoning tokens before its answer.
REASONING = {"o-mini": {"reasoning_tokens": 20}}
DOCUMENTED_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added"] + ["response.output_text.delta"] * 12 + [
    "response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]


def expected_cost(inp: int, out: int, cached: int = 0) -> Decimal:
    return ((inp - cached) * PIN + cached * PCACHED + out * POUT) / Decimal(10**6)


def client(proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.openai_url, api_key="unused", max_retries=0, timeout=30)


def routes(up, *docs: str, **spec) -> str:
    return stream_of(
        route_yaml("gpt", "gpt", [backend("oa", up.openai_url, "gpt-4o-mini", pricing=PRICING)], **spec),
        route_yaml("reasoner", "reasoner", [backend("o", up.openai_url, "o-mini", pricing=PRICING)], **spec),
        *docs)


def budgeted_and_free(up) -> str:
    """Route gpt under a budget, route free under none, on the same OpenAI account."""
    return stream_of(route_yaml("gpt", "gpt", [backend("oa", up.openai_url, pricing=PRICING)]),
                     route_yaml("free", "free", [backend("f", up.openai_url, pricing=PRICING)]),
                     budget_yaml("tok", limits={"tokens": {"total": 100000}}, routes=["gpt"]))


@pytest.fixture
def up():
    with MockUpstream(tokens=12, model_behaviours=REASONING) as u:
        yield u


def test_non_streamed_response_billed_as_the_provider_reported_with_cached_and_reasoning_tokens(up, start_proxy):
    proxy = start_proxy(routes(up))
    up.script({"cached_tokens": 8})
    r = client(proxy).responses.create(model="reasoner", instructions="you are terse",
                                       input=[{"role": "user", "content": [
                                           {"type": "input_text", "text": "a secret question " * 5}]}])
    rec = up.requests()[-1]
    assert rec["path"] == "/v1/responses" and rec["model"] == "o-mini"  # the alias rewritten
    assert rec["max_tokens"] is None  # no budget: no cap added
    u = r.usage
    assert (u.output_tokens, u.output_tokens_details.reasoning_tokens, u.input_tokens_details.cached_tokens) == \
        (32, 20, 8)
    assert r.output_text
    line = proxy.log(1)[-1]
    assert (line["api"], line["route"], line["backend"], line["status"], line["outcome"]) == \
        ("responses", "reasoner", "o", 200, "ok")
    assert (line["input_tokens"], line["output_tokens"], line["cached_input_tokens"], line["reasoning_tokens"]) == \
        (u.input_tokens, 32, 8, 20)
    assert line["usage_source"] == "upstream"
    assert Decimal(line["cost"]) == expected_cost(u.input_tokens, 32, 8)  # reasoning priced as output
    assert "secret question" not in proxy.log_path.read_text() and "terse" not in proxy.log_path.read_text()


def test_streamed_response_relays_the_documented_events_and_settles_response_completed(up, start_proxy):
    proxy = start_proxy(routes(up))
    events = list(client(proxy).responses.create(model="gpt", input="stream please", stream=True))
    assert [e.type for e in events] == DOCUMENTED_EVENTS
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == events[-4].text
    usage = events[-1].response.usage
    line = proxy.log(1)[-1]
    assert line["stream"] is True and line["usage_source"] == "upstream" and line["ttft_ms"] is not None
    assert (line["input_tokens"], line["output_tokens"]) == (usage.input_tokens, usage.output_tokens) == \
        (up.requests()[-1]["usage"]["prompt_tokens"], 12)
    assert Decimal(line["cost"]) == expected_cost(usage.input_tokens, 12)
    # raw SSE: event: lines reach the client as the provider sent them
    with httpx.Client(timeout=10) as c:
        raw = c.post(proxy.openai_url + "/responses", json={"model": "gpt", "input": "x", "stream": True}).text
    assert raw.startswith("event: response.created\ndata: {") and "event: response.completed\n" in raw


def test_a_reasoning_stream_stopped_by_max_output_tokens_ends_incomplete_and_is_billed(up, start_proxy):
    proxy = start_proxy(routes(up))
    events = list(client(proxy).responses.create(model="reasoner", input="think", stream=True, max_output_tokens=25))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.usage.output_tokens == 25  # reasoning (20) and answer within the cap
    line = proxy.log(1)[-1]
    assert (line["output_tokens"], line["reasoning_tokens"], line["max_output_tokens"]) == (25, 20, 25)
    assert line["usage_source"] == "upstream"


def test_chat_reasoning_tokens_are_logged_on_their_own_and_priced_as_output(up, start_proxy):
    proxy = start_proxy(routes(up))
    r = client(proxy).chat.completions.create(model="reasoner", messages=[{"role": "user", "content": "hm"}],
                                              max_completion_tokens=100)
    assert r.usage.completion_tokens_details.reasoning_tokens == 20
    line = proxy.log(1)[-1]
    assert (line["output_tokens"], line["reasoning_tokens"]) == (32, 20)
    assert Decimal(line["cost"]) == expected_cost(r.usage.prompt_tokens, 32)
    # The metrics count the reasoning on its own too (a part of output, as in the access log).
    sums = {m.group(1): float(m.group(2)) for m in re.finditer(
        r'gen_ai_client_token_usage_sum\{[^}]*gen_ai_token_type="(\w+)"[^}]*\} (\S+)', proxy.metrics())}
    assert (sums["output"], sums["reasoning"]) == (32, 20)


def test_budget_sends_the_default_cap_clamps_near_the_end_then_refuses(up, start_proxy):
    proxy = start_proxy(routes(up, budget_yaml("tok", limits={"tokens": {"total": 6000}})))
    oa = client(proxy)
    r1 = oa.responses.create(model="gpt", input="a")
    assert up.requests()[-1]["max_tokens"] == 4096  # no max_output_tokens: the default cap, sent upstream
    assert r1.usage.output_tokens == 12
    up.script({"tokens": 9000})
    r2 = oa.responses.create(model="gpt", input="b", max_output_tokens=8000)
    clamped = up.requests()[-1]["max_tokens"]
    assert clamped < 8000 and r2.usage.output_tokens == clamped  # clamped to what the budget has left
    assert r1.usage.total_tokens + r2.usage.total_tokens <= 6000
    with pytest.raises(openai.RateLimitError) as e:
        oa.responses.create(model="gpt", input="c", max_output_tokens=100)
    assert e.value.body["type"] == "budget_exceeded" and e.value.body["budget"] == "tok"
    lines = proxy.log(3)
    assert lines[-1]["outcome"] == "rejected"
    inp, out = sum(x.get("input_tokens", 0) for x in lines), sum(x.get("output_tokens", 0) for x in lines)
    assert total(proxy, "spendwarden_budget_used_tokens", gen_ai_token_type="input") == inp
    assert total(proxy, "spendwarden_budget_used_tokens", gen_ai_token_type="output") == out


@pytest.mark.parametrize("budget", [True, False], ids=["budget", "no-budget"])
def test_broken_and_aborted_response_streams_are_charged_alike_in_log_metrics_and_budget(up, start_proxy, budget):
    docs = [budget_yaml("b", limits={"tokens": {"total": 10_000_000}})] if budget else []
    proxy = start_proxy(routes(up, *docs))
    oa = client(proxy)
    oa.responses.create(model="reasoner", input="one")
    list(oa.responses.create(model="reasoner", input="two", stream=True))
    up.script({"disconnect_after": 5, "tokens": 30})  # dropped by the upstream before response.completed
    with pytest.raises(openai.APIError):
        list(oa.responses.create(model="gpt", input="three", stream=True, max_output_tokens=40))
    up.script({"disconnect_after": 1})  # a non-streamed body broken midway
    with pytest.raises(openai.APIError):
        oa.responses.create(model="gpt", input="four", max_output_tokens=20)
    lines = proxy.log(4, timeout=10)
    assert [x["usage_source"] for x in lines] == ["upstream", "upstream", "reservation", "reservation"]
    for x in lines[2:]:
        est = x["est_prompt_tokens"]
        assert x["input_tokens"] == est + est // 10 + 4 and x["output_tokens"] == x["max_output_tokens"]
    assert_log_metrics_and_budget_agree(proxy, lines, budget)


def test_previous_response_id_reserves_the_context_window_and_bills_what_the_provider_reports(up, start_proxy):
    bounded = backend("oa", up.openai_url, "gpt-4o-mini", pricing=PRICING, maxContextTokens=20000)
    proxy = start_proxy(stream_of(route_yaml("gpt", "gpt", [bounded]),
                                  budget_yaml("tok", limits={"tokens": {"total": 30000}})))
    oa = client(proxy)
    first = oa.responses.create(model="gpt", input="remember the number seven", max_output_tokens=50)
    second = oa.responses.create(model="gpt", input="which number?", previous_response_id=first.id,
                                 max_output_tokens=50)
    # the provider billed the earlier conversation as prompt again
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    line = proxy.log(2)[-1]
    assert line["reserved_prompt_tokens"] == 20000
    assert (line["input_tokens"], line["usage_source"]) == (second.usage.input_tokens, "upstream")
    assert Decimal(line["cost"]) == expected_cost(second.usage.input_tokens, second.usage.output_tokens)
    # what is left of the budget (under 20000 + 50 once ~10000 more are spent) cannot hold the bound
    up.script({"tokens": 10000})
    oa.responses.create(model="gpt", input="long", max_output_tokens=10000)
    with pytest.raises(openai.RateLimitError):
        oa.responses.create(model="gpt", input="again?", previous_response_id=second.id, max_output_tokens=50)
    # ... while a request whose whole prompt is in its body still fits
    assert oa.responses.create(model="gpt", input="fine", max_output_tokens=50).status == "completed"


def test_previous_response_id_without_a_bound_is_refused_under_a_budget_and_served_without(up, start_proxy):
    proxy = start_proxy(budgeted_and_free(up))
    oa = client(proxy)
    first = oa.responses.create(model="free", input="hello")
    with pytest.raises(openai.BadRequestError) as e:
        oa.responses.create(model="gpt", input="more", previous_response_id=first.id)
    assert e.value.code == "unbounded_prompt" and "maxContextTokens" in e.value.message
    assert oa.responses.create(model="free", input="more", previous_response_id=first.id).status == "completed"


def claude_route(up) -> str:
    return route_yaml("claude", "claude", [backend("an", up.url, "claude-haiku", provider="Anthropic", pricing={
        "input": "3", "output": "15", "cachedInput": "0.30"})])


def test_a_text_only_request_is_translated_for_an_anthropic_backend_and_billed_its_usage(up, start_proxy):
    proxy = start_proxy(claude_route(up))
    oa = client(proxy)
    up.script({"cached_tokens": 4})
    r = oa.responses.create(model="claude", instructions="be brief", max_output_tokens=100,
                            input=[{"role": "user", "content": [{"type": "input_text", "text": "hello there"}]}])
    sent = up.requests()[-1]
    assert (sent["path"], sent["model"], sent["max_tokens"]) == ("/v1/messages", "claude-haiku", 100)
    assert r.status == "completed" and r.output_text == "lorem ipsum dolor sit amet consectetur adipiscing elit sed " \
        "do eiusmod tempor"
    assert (r.usage.input_tokens, r.usage.input_tokens_details.cached_tokens, r.usage.output_tokens) == \
        (sent["usage"]["prompt_tokens"], 4, 12)
    line = proxy.log(1)[-1]
    assert line["translated"] is True and line["usage_source"] == "upstream"
    assert (line["input_tokens"], line["cached_input_tokens"], line["output_tokens"]) == (r.usage.input_tokens, 4, 12)
    expected = ((r.usage.input_tokens - 4) * Decimal(3) + 4 * Decimal("0.30") + 12 * Decimal(15)) / Decimal(10**6)
    assert Decimal(line["cost"]) == expected
    events = list(oa.responses.create(model="claude", input="stream it", stream=True, max_output_tokens=5))
    assert [e.type for e in events] == DOCUMENTED_EVENTS[:4] + ["response.output_text.delta"] * 5 + \
        DOCUMENTED_EVENTS[-4:-1] + ["response.incomplete"]
    assert events[-1].response.usage.output_tokens == 5 and events[-1].response.incomplete_details.reason == \
        "max_output_tokens"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == events[-1].response.output_text
    line = proxy.log(2)[-1]
    assert (line["output_tokens"], line["usage_source"], line["stream"]) == (5, "upstream", True)


def test_what_cannot_be_translated_for_an_anthropic_backend_is_refused_naming_it(up, start_proxy):
    proxy = start_proxy(claude_route(up))
    oa = client(proxy)
    for kwargs, needle in (({"tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]},
                            "'tools'"),
                           ({"reasoning": {"effort": "high"}}, "'reasoning'"),
                           ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
                            "input_image")):
        with pytest.raises(openai.BadRequestError) as e:
            oa.responses.create(model="claude", **{"input": "hi", **kwargs})
        assert "only by OpenAI backends" in e.value.message and needle in e.value.message
        assert "/v1/chat/completions or /v1/messages" in e.value.message and e.value.code == "format_mismatch"
    with pytest.raises(openai.BadRequestError) as e:
        oa.responses.create(model="claude", input="more", previous_response_id="resp_x")
    assert "previous_response_id" in e.value.message
    assert up.requests() == []


def test_stored_responses_are_forwarded_unmetered_to_the_only_openai_account(up, start_proxy):
    proxy = start_proxy(routes(up, budget_yaml("tok", limits={"tokens": {"total": 100000}})))
    oa = client(proxy)
    r = oa.responses.create(model="gpt", input=[{"role": "user", "content": "keep me"}])
    assert oa.responses.retrieve(r.id).id == r.id
    items = list(oa.responses.input_items.list(r.id))
    assert [i.content[0].text for i in items] == ["keep me"]
    assert oa.responses.cancel(r.id).status == "cancelled"
    oa.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        oa.responses.retrieve(r.id)
    assert len(proxy.log(1)) == 1  # only the create is metered and logged
    assert total(proxy, "spendwarden_budget_used_tokens", gen_ai_token_type="input") == r.usage.input_tokens


def test_stored_responses_with_several_accounts_need_the_model_query_parameter(up, start_proxy):
    with MockUpstream(tokens=3) as other:
        proxy = start_proxy(stream_of(route_yaml("gpt", "gpt", [backend("oa", up.openai_url)]),
                                      route_yaml("other", "other", [backend("ob", other.openai_url)])))
        oa = client(proxy)
        r = oa.responses.create(model="other", input="hello")
        with pytest.raises(openai.BadRequestError) as e:
            oa.responses.retrieve(r.id)
        assert "model=<the alias that created it>" in e.value.message
        got = oa.responses.retrieve(r.id, extra_query={"model": "other"})
        assert got.id == r.id and other.requests()[-1]["path"] == "/v1/responses"
        with pytest.raises(openai.BadRequestError):
            oa.responses.retrieve("../../models", extra_query={"model": "other"})


def test_input_tokens_forwarded_to_openai_else_the_proxys_estimate(up, start_proxy):
    proxy = start_proxy(stream_of(
        route_yaml("gpt", "gpt", [backend("oa", up.openai_url)]),
        route_yaml("local", "local", [backend("l", up.openai_url, provider="OpenAICompatible")])))
    oa = client(proxy)
    forwarded = oa.responses.input_tokens.count(model="gpt", input="count these words please")
    assert forwarded.input_tokens == 2 + 4 + 6  # the mock's documented count: it answered
    estimated = oa.responses.input_tokens.count(model="local", input="count these words please")
    assert estimated.object == "response.input_tokens" and 4 <= estimated.input_tokens <= 20
    assert [r["path"] for r in up.requests()] == []  # neither is a metered call


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_a_reasoning_model_is_reserved_for_reasoning_included_and_clamped_near_the_end(up, start_proxy, api):
    proxy = start_proxy(routes(up, budget_yaml("tok", limits={"tokens": {"total": 5000}})))
    oa = client(proxy)

    def ask(text: str, cap: int | None = None):
        if api == "chat":
            extra = {"max_completion_tokens": cap} if cap else {}
            r = oa.chat.completions.create(model="reasoner", messages=[{"role": "user", "content": text}],
                                           reasoning_effort="high", **extra)
            return r.usage.completion_tokens, r.usage.completion_tokens_details.reasoning_tokens
        extra = {"max_output_tokens": cap} if cap else {}
        r = oa.responses.create(model="reasoner", input=text, reasoning={"effort": "high"}, **extra)
        return r.usage.output_tokens, r.usage.output_tokens_details.reasoning_tokens

    assert ask("a") == (32, 20)
    sent = up.requests()[-1]
    # the default cap, in the field a reasoning model takes (OpenAI refuses max_tokens for them)
    assert (sent["max_tokens"], sent["cap_field"]) == (4096, "max_completion_tokens" if api == "chat" else
                                                       "max_output_tokens")
    up.script({"tokens": 9000})
    out, reasoning = ask("b", 8000)
    clamped = up.requests()[-1]["max_tokens"]
    assert clamped < 8000 and out == clamped and reasoning == 20  # the clamp bounds reasoning + answer
    lines = proxy.log(2)
    assert [x["reasoning_tokens"] for x in lines] == [20, 20]
    assert sum(x["input_tokens"] + x["output_tokens"] for x in lines) <= 5000
    assert total(proxy, "spendwarden_budget_used_tokens", gen_ai_token_type="output") == 32 + clamped


def test_a_streamed_chat_reasoning_model_reports_reasoning_tokens(up, start_proxy):
    proxy = start_proxy(routes(up))
    chunks = list(client(proxy).chat.completions.create(model="reasoner", stream=True,
                                                        messages=[{"role": "user", "content": "hm"}]))
    assert chunks and all(c.usage is None for c in chunks)
    line = proxy.log(1)[-1]
    assert (line["output_tokens"], line["reasoning_tokens"], line["usage_source"]) == (32, 20, "upstream")


def test_an_openai_default_falls_back_to_an_anthropic_backend_only_for_what_translates(up, start_proxy):
    proxy = start_proxy(route_yaml("mixed", "mixed", [
        backend("oa", up.openai_url, pricing=PRICING),
        backend("an", up.url, "claude-haiku", provider="Anthropic", price_in="3", price_out="15")], fallbacks=["an"]))
    oa = client(proxy)
    up.script({"status": 503})
    r = oa.responses.with_raw_response.create(model="mixed", input="hi")
    assert r.headers["x-spendwarden-backend"] == "an" and r.parse().status == "completed"
    up.script({"status": 503})  # a tool call cannot go to the Anthropic fallback: the provider's 503 is relayed
    with pytest.raises(openai.InternalServerError):
        oa.responses.create(model="mixed", input="hi", tools=[{"type": "function", "name": "f", "parameters": {}}])
    assert [x["path"] for x in up.requests()] == ["/v1/responses", "/v1/messages", "/v1/responses"]


def test_built_in_tools_billed_per_call_are_refused_under_a_budget_function_tools_served(up, start_proxy):
    proxy = start_proxy(budgeted_and_free(up))
    oa = client(proxy)
    fn = {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}
    with pytest.raises(openai.BadRequestError) as e:
        oa.responses.create(model="gpt", input="search", tools=[fn, {"type": "web_search_preview"}])
    assert e.value.code == "unpriced_tool" and "tools[1]" in e.value.message and "web_search_preview" in e.value.message
    assert up.requests() == []
    assert oa.responses.create(model="gpt", input="look it up", tools=[fn]).status == "completed"
    assert oa.responses.create(model="free", input="search", tools=[{"type": "web_search"}]).status == "completed"
