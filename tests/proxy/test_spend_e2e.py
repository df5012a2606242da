"""Issue #7 end to end, through the real proxy process against the mock upstream with scripted
failures: complexity tiers, the judge, escalation (unary and streamed), the response cache and the
loop breaker; budgets stay exact throughout."""
from __future__ import annotations

from decimal import Decimal

import anthropic
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from spendwarden.devtools.mock_upstream import MockUpstream

from .conftest import backend, budget_yaml, route_yaml, stream_of

SMALL_IN, SMALL_OUT, LARGE_IN, LARGE_OUT = Decimal("0.15"), Decimal("0.60"), Decimal("3"), Decimal("15")
EASY = [{"role": "user", "content": "hi there"}]
HARD = [{"role": "user", "content": "Prove that this algorithm is correct, analyze its time complexity step by step "
                                    "and explain why the edge cases hold:\n```python\ndef f(xs):\n    return sorted(xs)\n```"
                                    + " context" * 400}]


def tiered_route(up, **spec) -> str:
    return route_yaml("chat", "chat", [
        backend("small", up.openai_url, "mock-small"),
        backend("large", up.openai_url, "mock-large", price_in="3", price_out="15"),
        backend("judge", up.openai_url, "mock-judge", price_in="0.10", price_out="0.40"),
    ], default="small", tiers=[{"name": "small", "backends": ["small"]},
                               {"name": "large", "backends": ["large"], "minScore": 40}], **spec)


def samples(proxy, name: str) -> list[tuple[dict, float]]:
    out = []
    for fam in text_string_to_metric_families(proxy.metrics()):
        out += [(s.labels, s.value) for s in fam.samples if s.name == name]
    return out


def total(proxy, name: str, **labels) -> float:
    return sum(v for lab, v in samples(proxy, name) if all(lab.get(k) == w for k, w in labels.items()))


def chat(proxy, messages, headers=None, **body) -> httpx.Response:
    return httpx.post(proxy.openai_url + "/chat/completions", json={"model": "chat", "messages": messages, **body},
                      headers=headers or {}, timeout=30)


def cost_of(rec, pin, pout) -> Decimal:
    return (rec["usage"]["prompt_tokens"] * pin + rec["usage"]["completion_tokens"] * pout) / Decimal(10**6)


def test_tiers_pick_the_backend_by_complexity(start_proxy):
    with MockUpstream(tokens=8) as up:
        proxy = start_proxy(tiered_route(up))
        assert chat(proxy, EASY).status_code == 200
        assert chat(proxy, HARD).status_code == 200
        assert [r["model"] for r in up.requests()] == ["mock-small", "mock-large"]
        easy, hard = proxy.log(2)
        assert easy["tier"] == "small" and easy["backend"] == "small" and easy["complexity_score"] < 40
        assert hard["tier"] == "large" and hard["backend"] == "large" and hard["complexity_score"] >= 40
        assert "Prove that" not in proxy.log_path.read_text()
        assert total(proxy, "spendwarden_tier_selections_total", tier="small", source="score") == 1
        assert total(proxy, "spendwarden_tier_selections_total", tier="large", source="score") == 1
        # A matching rule still wins over the tiers.
        proxy.stop()
        proxy = start_proxy(tiered_route(up, rules=[{"match": {"headers": [{"name": "x-vip"}]}, "backend": "large"}]),
                            name="rules.yaml")
        assert chat(proxy, EASY, headers={"x-vip": "1"}).status_code == 200
        assert up.requests()[-1]["model"] == "mock-large" and "tier" not in proxy.log(3)[-1]  # the log file is shared with the first proxy (2 lines)


def test_escalation_on_length_retries_on_the_next_tier_and_budgets_stay_exact(start_proxy):
    behaviours = {"mock-small": {"tokens": 50}, "mock-large": {"tokens": 5}}
    with MockUpstream(model_behaviours=behaviours) as up:
        proxy = start_proxy(stream_of(tiered_route(up), budget_yaml("b", limits={"cost": {"amount": "10"}})))
        r = chat(proxy, EASY, max_tokens=10)
        assert r.status_code == 200
        body = r.json()
        assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == 5
        first, second = up.requests()
        assert (first["model"], second["model"]) == ("mock-small", "mock-large")
        line = proxy.log(1)[-1]
        assert line["outcome"] == "escalated" and line["tier"] == "large" and line["backend"] == "large"
        assert line["escalated"]["cause"] == "length" and line["escalated"]["from"] == "small"
        spent = cost_of(first, SMALL_IN, SMALL_OUT) + cost_of(second, LARGE_IN, LARGE_OUT)
        assert Decimal(line["cost"]) == spent
        assert Decimal(line["escalated"]["first_cost"]) == cost_of(first, SMALL_IN, SMALL_OUT)
        # The line's tokens are the second pass's; with the first pass's the budget's (issue #17).
        assert line["escalated"]["first_input_tokens"] + line["input_tokens"] == \
            total(proxy, "spendwarden_budget_used_tokens", budget="b", gen_ai_token_type="input")
        assert line["escalated"]["first_output_tokens"] + line["output_tokens"] == \
            total(proxy, "spendwarden_budget_used_tokens", budget="b", gen_ai_token_type="output")
        # Both attempts were charged, nothing is left reserved, and the cost metric is the whole spend.
        assert total(proxy, "spendwarden_budget_used_cost", budget="b") == pytest.approx(float(spent))
        assert total(proxy, "spendwarden_budget_open_reservations", budget="b") == 0
        assert total(proxy, "spendwarden_budget_used_tokens", budget="b", gen_ai_token_type="input") == \
            first["usage"]["prompt_tokens"] + second["usage"]["prompt_tokens"]
        assert total(proxy, "spendwarden_cost_total") == pytest.approx(float(spent))
        assert total(proxy, "spendwarden_escalations_total", cause="length", from_tier="small", to_tier="large") == 1
        assert total(proxy, "spendwarden_requests_total", outcome="escalated") == 1


def test_escalation_on_refusal_invalid_json_and_upstream_error(start_proxy):
    with MockUpstream(tokens=8) as up:
        proxy = start_proxy(tiered_route(up))
        up.script({"refusal": "I can't help with that."}, {})
        r = chat(proxy, EASY)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["refusal"] is None
        up.script({}, {"content": '{"answer": 42}'})
        r = chat(proxy, EASY, response_format={"type": "json_object"})
        assert r.json()["choices"][0]["message"]["content"] == '{"answer": 42}'
        up.script({"status": 503}, {})
        r = openai.OpenAI(base_url=proxy.openai_url, api_key="x", max_retries=0).chat.completions.create(
            model="chat", messages=EASY)
        assert r.choices[0].message.content
        # A stream whose first tier fails before its first byte is escalated too, invisibly.
        up.script({"status": 500}, {})
        chunks = list(openai.OpenAI(base_url=proxy.openai_url, api_key="x", max_retries=0).chat.completions.create(
            model="chat", messages=EASY, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert [r["model"] for r in up.requests()] == ["mock-small", "mock-large"] * 4
        causes = [x["escalated"]["cause"] for x in proxy.log(4)]
        assert causes == ["refusal", "invalid_json", "upstream_error", "upstream_error"]
        for cause, n in (("refusal", 1), ("invalid_json", 1), ("upstream_error", 2)):
            assert total(proxy, "spendwarden_escalations_total", cause=cause) == n


def test_no_escalation_once_a_stream_started_nor_when_disabled(start_proxy):
    behaviours = {"mock-small": {"tokens": 50}}
    with MockUpstream(model_behaviours=behaviours) as up:
        proxy = start_proxy(tiered_route(up))
        with httpx.stream("POST", proxy.openai_url + "/chat/completions", timeout=30,
                          json={"model": "chat", "messages": EASY, "max_tokens": 10, "stream": True}) as r:
            text = r.read().decode()
        assert '"finish_reason":"length"' in text and len(up.requests()) == 1
        assert proxy.log(1)[-1]["outcome"] == "ok" and "escalated" not in proxy.log(1)[-1]
        proxy.stop()
        proxy = start_proxy(tiered_route(up, escalation={"enabled": False}), name="off.yaml")
        assert chat(proxy, EASY, max_tokens=10).json()["choices"][0]["finish_reason"] == "length"
        assert len(up.requests()) == 2
        proxy.stop()
        proxy = start_proxy(tiered_route(up, escalation={"causes": ["refusal"]}), name="some.yaml")
        assert chat(proxy, EASY, max_tokens=10).json()["choices"][0]["finish_reason"] == "length"
        assert len(up.requests()) == 3


def test_judge_decides_near_the_boundary_its_cost_counted_and_its_verdict_cached(start_proxy):
    with MockUpstream(tokens=8, model_behaviours={"mock-judge": {"content": "85"}}) as up:
        proxy = start_proxy(stream_of(tiered_route(up, judge={"backend": "judge", "band": 45}),
                                      budget_yaml("b", limits={"cost": {"amount": "10"}})))
        for _ in range(2):
            assert chat(proxy, EASY).status_code == 200
        models = [r["model"] for r in up.requests()]
        assert models == ["mock-judge", "mock-large", "mock-large"]  # second time: the cached verdict
        judge_rec = up.requests()[0]
        assert judge_rec["max_tokens"] == 4
        lines = proxy.log(2)
        assert lines[0]["judge_score"] == 85 and lines[0]["tier"] == "large" and lines[0]["complexity_score"] < 40
        spent = cost_of(judge_rec, Decimal("0.10"), Decimal("0.40")) + sum(
            (cost_of(r, LARGE_IN, LARGE_OUT) for r in up.requests()[1:]), Decimal(0))
        assert total(proxy, "spendwarden_budget_used_cost", budget="b") == pytest.approx(float(spent))
        assert total(proxy, "spendwarden_judge_calls_total", result="ok") == 1
        assert total(proxy, "spendwarden_judge_calls_total", result="cached") == 1
        assert total(proxy, "spendwarden_tier_selections_total", source="judge") == 2
        # A judge that fails leaves the decision to the local score.
        up.script({"status": 500})
        assert chat(proxy, [{"role": "user", "content": "hello again"}]).status_code == 200
        assert up.requests()[-1]["model"] == "mock-small"
        assert total(proxy, "spendwarden_judge_calls_total", result="failed") == 1


def test_cache_answers_repeats_for_free_streamed_and_not(start_proxy):
    with MockUpstream(tokens=8) as up:
        proxy = start_proxy(stream_of(
            route_yaml("chat", "chat", [backend("oa", up.openai_url)], cache={"ttl": "10m"}),
            budget_yaml("b", limits={"cost": {"amount": "10"}})))
        first = chat(proxy, EASY, temperature=0)
        second = chat(proxy, EASY, temperature=0)
        assert second.status_code == 200 and second.content == first.content
        assert second.headers["x-spendwarden-cache"] == "hit" and len(up.requests()) == 1
        cost = cost_of(up.requests()[0], SMALL_IN, SMALL_OUT)
        miss, hit = proxy.log(2)
        assert miss["cache"] == "stored" and Decimal(miss["cost"]) == cost
        assert hit["cache"] == "hit" and hit["outcome"] == "cache_hit" and Decimal(hit["saved"]) == cost
        assert "cost" not in hit
        assert total(proxy, "spendwarden_budget_used_cost", budget="b") == pytest.approx(float(cost))
        assert total(proxy, "spendwarden_cache_savings_total") == pytest.approx(float(cost))
        assert total(proxy, "spendwarden_cache_lookups_total", result="hit") == 1

        def stream() -> bytes:
            with httpx.stream("POST", proxy.openai_url + "/chat/completions", timeout=30, json={
                    "model": "chat", "messages": EASY, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}) as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                return r.read()
        s1, s2 = stream(), stream()
        assert s1 == s2 and s1.rstrip().endswith(b"data: [DONE]") and b'"usage":{' in s1
        assert len(up.requests()) == 2  # one upstream call for the two streams
        with openai.OpenAI(base_url=proxy.openai_url, api_key="x", max_retries=0) as client:
            chunks = list(client.chat.completions.create(model="chat", messages=EASY, temperature=0, stream=True,
                                                         stream_options={"include_usage": True}))
        assert chunks[-1].usage is not None and len(up.requests()) == 2
        # Not deterministic: not cached, unless the client asks; and the client can bypass.
        chat(proxy, EASY, temperature=0.7), chat(proxy, EASY, temperature=0.7)
        assert len(up.requests()) == 4
        for _ in range(2):
            chat(proxy, EASY, headers={"x-spendwarden-cache": "force"}, temperature=0.7)
        assert len(up.requests()) == 5
        chat(proxy, EASY, headers={"x-spendwarden-cache": "bypass"}, temperature=0)
        assert len(up.requests()) == 6
        assert "hi there" not in proxy.log_path.read_text()


def test_loop_breaker_refuses_runaway_repeats(start_proxy):
    with MockUpstream(tokens=4) as up:
        proxy = start_proxy(route_yaml("chat", "chat", [backend("oa", up.openai_url)],
                                       loopBreaker={"maxRepeats": 3, "window": "1m"}))
        for _ in range(3):
            assert chat(proxy, EASY).status_code == 200
        client = openai.OpenAI(base_url=proxy.openai_url, api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(model="chat", messages=EASY)
        assert err.value.code == "loop_detected" and err.value.body["type"] == "loop_detected"
        assert "more than 3 times within 60s" in err.value.message and "spec.loopBreaker" in err.value.message
        assert err.value.response.headers["retry-after"] == "60"
        assert len(up.requests()) == 3
        assert chat(proxy, [{"role": "user", "content": "something else"}]).status_code == 200
        line = proxy.log(5)[3]
        assert line["outcome"] == "loop_detected" and line["status"] == 429
        assert total(proxy, "spendwarden_loops_detected_total", route="chat") == 1
        assert total(proxy, "spendwarden_requests_total", outcome="loop_detected") == 1
        assert "hi there" not in proxy.stderr() + proxy.log_path.read_text()


def test_anthropic_messages_escalate_on_refusal_and_hit_the_cache(start_proxy):
    with MockUpstream(tokens=6) as up:
        proxy = start_proxy(route_yaml("claude", "claude", [
            backend("haiku", up.url, "claude-haiku-4-5", provider="Anthropic"),
            backend("sonnet", up.url, "claude-sonnet", provider="Anthropic", price_in="3", price_out="15"),
        ], tiers=[{"name": "small", "backends": ["haiku"]}, {"name": "large", "backends": ["sonnet"], "minScore": 40}],
            cache={}))
        client = anthropic.Anthropic(base_url=proxy.url, api_key="x", max_retries=0)
        up.script({"refusal": "I cannot help with that."}, {})
        msg = client.messages.create(model="claude", max_tokens=50, extra_body={"temperature": 0},
                                     messages=[{"role": "user", "content": "hi"}])
        assert msg.stop_reason == "end_turn" and msg.content[0].text
        again = client.messages.create(model="claude", max_tokens=50, extra_body={"temperature": 0},
                                       messages=[{"role": "user", "content": "hi"}])
        assert again.content[0].text == msg.content[0].text
        assert [r["model"] for r in up.requests()] == ["claude-haiku-4-5", "claude-sonnet"]
        first, hit = proxy.log(2)
        assert first["escalated"]["cause"] == "refusal" and first["outcome"] == "escalated"
        assert first["cache"] == "stored" and hit["cache"] == "hit" and Decimal(hit["saved"]) == Decimal(first["cost"])
