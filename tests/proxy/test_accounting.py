"""Every call is accounted, not only the ones that complete (issue #17): on a mixed run with streams
dropped by the upstream, cut short and aborted by the client, and non-streamed bodies broken
midway, the access log, the metrics and the budget gauges agree call for call, with a budget and
without one. What a broken call is charged is named in usage_source."""
from __future__ import annotations

from decimal import Decimal

import anthropic
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from spendwarden.devtools.mock_upstream import MockUpstream

from .conftest import backend, budget_yaml, route_yaml, stream_of

MSG = [{"role": "user", "content": "tell me a story about budgets"}]


def total(proxy, name: str, **labels) -> float:
    return sum(s.value for fam in text_string_to_metric_families(proxy.metrics()) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _raises(fn) -> None:
    with pytest.raises((openai.APIError, anthropic.APIError)):
        fn()


def assert_log_metrics_and_budget_agree(proxy, lines: list[dict], budget: bool) -> None:
    """The access log's tokens and cost are the metrics' and (with a budget) what the budget was charged."""
    inp, out = sum(x["input_tokens"] for x in lines), sum(x["output_tokens"] for x in lines)
    spent = sum(Decimal(x["cost"]) for x in lines)
    assert total(proxy, "gen_ai_client_token_usage_sum", gen_ai_token_type="input") == inp
    assert total(proxy, "gen_ai_client_token_usage_sum", gen_ai_token_type="output") == out
    assert total(proxy, "spendwarden_cost_total") == pytest.approx(float(spent), rel=1e-9)
    if budget:
        assert total(proxy, "spendwarden_budget_used_tokens", gen_ai_token_type="input") == inp
        assert total(proxy, "spendwarden_budget_used_tokens", gen_ai_token_type="output") == out
        assert total(proxy, "spendwarden_budget_used_cost") == pytest.approx(float(spent), rel=1e-9)
    assert proxy.alive() and "Traceback" not in proxy.stderr()


def mixed_run(proxy, up) -> list[str]:
    """One call of each kind; returns the usage_source each should be logged with, in order.

    A client sees a broken stream end before the proxy has logged it, so each call waits for its
    line: otherwise the next call's line can come first."""
    logged = 0

    def logged_one() -> None:
        nonlocal logged
        logged += 1
        assert len(proxy.log(logged, timeout=10)) == logged, f"call {logged} was never logged"

    oa = openai.OpenAI(base_url=proxy.openai_url, api_key="unused", max_retries=0, timeout=30)
    an = anthropic.Anthropic(base_url=proxy.url, api_key="unused", max_retries=0, timeout=30)
    oa.chat.completions.create(model="chat", messages=MSG)
    logged_one()
    list(oa.chat.completions.create(model="chat", messages=MSG, stream=True))
    logged_one()
    # an OpenAI stream the upstream drops after three events: capped, then uncapped
    up.script({"disconnect_after": 3, "tokens": 30}, {"disconnect_after": 3, "tokens": 30})
    _raises(lambda: list(oa.chat.completions.create(model="chat", messages=MSG, stream=True, max_tokens=40)))
    logged_one()
    _raises(lambda: list(oa.chat.completions.create(model="chat", messages=MSG, stream=True)))
    logged_one()
    # the client goes away after three events
    up.script({"tokens": 60, "chunk_delay_ms": 20})
    body = {"model": "chat", "stream": True, "max_tokens": 50, "messages": MSG}
    with httpx.Client(timeout=10) as c, c.stream("POST", proxy.openai_url + "/chat/completions", json=body) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 5:
                break
    logged_one()  # logged once the proxy's next write fails
    # a non-streamed body broken midway
    up.script({"disconnect_after": 1})
    _raises(lambda: oa.chat.completions.create(model="chat", messages=MSG, max_tokens=20))
    logged_one()
    # the stream ends after its usage chunk, before [DONE]: the provider's final numbers
    up.script({"disconnect_after": 8, "tokens": 5})
    _raises(lambda: list(oa.chat.completions.create(model="chat", messages=MSG, stream=True, max_tokens=10,
                                                    stream_options={"include_usage": True})))
    logged_one()
    # Anthropic: a stream broken after message_start, natively and translated; a unary body broken
    up.script({"disconnect_after": 4, "tokens": 30}, {"disconnect_after": 4, "tokens": 30}, {"disconnect_after": 1})

    def an_stream() -> None:
        with an.messages.stream(model="claude", max_tokens=50, messages=MSG) as s:
            list(s.text_stream)
    _raises(an_stream)
    logged_one()
    _raises(lambda: list(oa.chat.completions.create(model="claude", messages=MSG, stream=True, max_tokens=50)))
    logged_one()
    _raises(lambda: an.messages.create(model="claude", max_tokens=50, messages=MSG))
    logged_one()
    return ["upstream", "upstream", "reservation", "uncapped", "reservation", "reservation", "upstream",
            "upstream_input+reserved_output", "upstream_input+reserved_output", "reservation"]


def _config(up, budget: bool) -> str:
    docs = [route_yaml("chat", "chat", [backend("oa", up.openai_url)]),
            route_yaml("claude", "claude", [backend("an", up.url, "claude-haiku", provider="Anthropic",
                                                    price_in="3", price_out="15")])]
    if budget:
        docs.append(budget_yaml("b", limits={"tokens": {"total": 10_000_000}}))
    return stream_of(*docs)


@pytest.mark.parametrize("budget", [True, False], ids=["budget", "no-budget"])
def test_log_metrics_and_budget_agree_call_for_call_on_broken_and_aborted_calls(start_proxy, budget):
    with MockUpstream(tokens=12) as up:
        proxy = start_proxy(_config(up, budget))
        sources = mixed_run(proxy, up)
        lines = proxy.log(len(sources), timeout=10)
        assert len(lines) == len(sources)
        uncapped = "reservation" if budget else "reserved_input+seen_output"  # a budget caps at 4096
        assert [x.get("usage_source") for x in lines] == [uncapped if s == "uncapped" else s for s in sources]
        for x in lines:  # every call has its tokens and cost
            assert x["input_tokens"] > 0 and x["output_tokens"] > 0 and Decimal(x["cost"]) > 0, x
        for x in lines:
            if x["usage_source"] == "reservation":  # what was reserved for it (or would have been)
                est = x["est_prompt_tokens"]
                assert x["input_tokens"] == est + est // 10 + 4
                assert x["output_tokens"] == x["max_output_tokens"], x
        assert lines[3]["output_tokens"] == (4096 if budget else 3)  # uncapped: the events relayed
        assert lines[6]["output_tokens"] == 5  # the usage chunk arrived
        for x in lines[7:9]:
            assert x["output_tokens"] == 50
        assert_log_metrics_and_budget_agree(proxy, lines, budget)


def test_a_billed_attempt_before_a_fallback_is_in_the_log_and_the_metrics_as_the_budget_charged_it(start_proxy):
    with MockUpstream(tokens=12) as up:
        proxy = start_proxy(stream_of(
            route_yaml("chat", "chat", [backend("a", up.openai_url), backend("b", up.openai_url, "gpt-b")],
                       fallbacks=["b"]),
            budget_yaml("b", limits={"tokens": {"total": 10_000_000}})))
        up.script({"disconnect_after": 1}, {})  # a's body breaks midway (billed), b answers
        oa = openai.OpenAI(base_url=proxy.openai_url, api_key="unused", max_retries=0, timeout=30)
        r = oa.chat.completions.with_raw_response.create(model="chat", messages=MSG, max_tokens=30)
        assert r.headers["x-spendwarden-backend"] == "b"
        line = proxy.log(1)[-1]
        assert (line["backend"], line["usage_source"], line["outcome"]) == ("b", "upstream", "fallback")
        [first] = line["earlier_attempts"]
        assert (first["backend"], first["usage_source"], first["output_tokens"]) == ("a", "reservation", 30)
        inp, out = line["input_tokens"] + first["input_tokens"], line["output_tokens"] + first["output_tokens"]
        spent = Decimal(line["cost"]) + Decimal(first["cost"])
        for name, value in (("gen_ai_client_token_usage_sum", inp), ("spendwarden_budget_used_tokens", inp)):
            assert total(proxy, name, gen_ai_token_type="input") == value
        for name, value in (("gen_ai_client_token_usage_sum", out), ("spendwarden_budget_used_tokens", out)):
            assert total(proxy, name, gen_ai_token_type="output") == value
        assert total(proxy, "spendwarden_cost_total") == pytest.approx(float(spent), rel=1e-9)
        assert total(proxy, "spendwarden_budget_used_cost") == pytest.approx(float(spent), rel=1e-9)
