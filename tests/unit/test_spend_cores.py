"""The pure cores of issue #7: complexity scorer, escalation checks, response cache, loop breaker, judge."""
from __future__ import annotations

import time
from decimal import Decimal

import pytest

from spendwarden.spend import cache, escalation, judge, loop, scorer
from spendwarden.spend.escalation import Cause


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def chat(*contents: str, **extra) -> dict:
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(contents)]
    return {"model": "chat", "messages": msgs, **extra}


# -- scorer ------------------------------------------------------------------------------------------

def test_trivial_request_scores_low_and_hard_one_high():
    easy = scorer.score(chat("hi, what's the capital of France?"))
    hard = scorer.score(chat("Prove that the algorithm below is correct, analyze its time complexity step by step "
                             "and explain why the edge cases hold:\n```python\ndef f(x):\n    return x\n```\n"
                             + "context " * 2000))
    assert easy <= 10
    assert hard >= 70
    assert 0 <= easy < hard <= 100


def test_each_feature_adds_its_documented_points():
    base = chat("please rewrite this sentence")
    b = scorer.score(base)
    assert scorer.score({**base, "tools": [{"type": "function", "function": {"name": "f"}}]}) == b + scorer.TOOLS_POINTS
    assert scorer.features(chat("x = 1;\nfoo()")).code
    assert scorer.score(chat("please rewrite this sentence; prove it")) > b
    f = scorer.features(chat("a", "b", "c", "d", "e"))
    assert f.turns == 4
    deep = scorer.score(chat("a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l"))
    assert deep - scorer.score(chat("a")) <= scorer.DEPTH_MAX + 2  # depth capped (+ length rounding)
    cues = chat("prove derive analyze compare optimize debug refactor evaluate critique")
    assert scorer.features(cues).reasoning_cues == 9
    assert scorer.score(cues) <= scorer.CUE_MAX + 10


def test_anthropic_system_and_completion_prompts_are_read():
    body = {"model": "m", "system": "You write code.", "max_tokens": 10,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "def f(): pass"}]}]}
    f = scorer.features(body)
    assert f.code and f.prompt_chars == len("You write code.") + len("def f(): pass")
    assert scorer.features({"model": "m", "prompt": ["abc", "de"]}).prompt_chars == 5
    assert scorer.features({"model": "m"}).prompt_chars == 0


def test_pick_tier_and_band():
    assert scorer.pick_tier(10, [0, 40]) == 0
    assert scorer.pick_tier(40, [0, 40]) == 1
    assert scorer.pick_tier(99, [0, 40, 70]) == 2
    assert scorer.near_threshold(35, [0, 40], 5) and not scorer.near_threshold(34, [0, 40], 5)
    assert not scorer.near_threshold(2, [0, 40], 5)  # the first tier's 0 is no boundary


def test_scorer_is_fast_even_on_huge_prompts():
    huge = chat("word " * 200_000, "and more code x = 1; " * 5000, "explain why " * 1000)
    scorer.score(huge)
    t0 = time.perf_counter()
    for _ in range(20):
        scorer.score(huge)
    per_call = (time.perf_counter() - t0) / 20
    assert per_call < 0.01  # generous bound for a busy machine; bench figure is well under 1 ms


# -- escalation --------------------------------------------------------------------------------------

def oa_resp(content="ok", finish="stop", refusal=None, tool_calls=None):
    msg = {"role": "assistant", "content": content, "refusal": refusal}
    if tool_calls:
        msg["tool_calls"] = tool_calls
    return {"choices": [{"index": 0, "message": msg, "finish_reason": finish}]}


def test_escalation_causes_openai():
    req = chat("hi")
    jreq = {**req, "response_format": {"type": "json_object"}}
    assert escalation.check_response("chat/completions", req, oa_resp()) is None
    assert escalation.check_response("chat/completions", req, oa_resp(finish="length")) is Cause.LENGTH
    assert escalation.check_response("chat/completions", req, oa_resp(content=None, refusal="no")) is Cause.REFUSAL
    assert escalation.check_response("chat/completions", req, oa_resp("I'm sorry, but I can't help with that.")) \
        is Cause.REFUSAL
    assert escalation.check_response("chat/completions", req, oa_resp("Sorry for the delay, here it is")) is None
    assert escalation.check_response("chat/completions", jreq, oa_resp("lorem ipsum")) is Cause.INVALID_JSON
    assert escalation.check_response("chat/completions", jreq, oa_resp('```json\n{"a": 1}\n```')) is Cause.INVALID_JSON
    assert escalation.check_response("chat/completions", jreq, oa_resp(' {"a": 1} ')) is None
    assert escalation.check_response("chat/completions", jreq, oa_resp(None, tool_calls=[{"id": "x"}])) is None
    assert escalation.check_response("completions", req, {"choices": [{"text": "x", "finish_reason": "length"}]}) \
        is Cause.LENGTH
    assert escalation.check_response("embeddings", req, {"data": []}) is None
    assert escalation.check_response("chat/completions", req, "garbage") is None


def test_escalation_causes_anthropic_and_statuses():
    req = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5}

    def msg(stop, text="fine"):
        return {"content": [{"type": "text", "text": text}], "stop_reason": stop}
    assert escalation.check_response("messages", req, msg("end_turn")) is None
    assert escalation.check_response("messages", req, msg("max_tokens")) is Cause.LENGTH
    assert escalation.check_response("messages", req, msg("refusal")) is Cause.REFUSAL
    assert escalation.check_response("messages", req, msg("end_turn", "I cannot help with that request.")) \
        is Cause.REFUSAL
    assert escalation.upstream_status_cause(503) is Cause.UPSTREAM_ERROR
    assert escalation.upstream_status_cause(429) is Cause.UPSTREAM_ERROR
    assert escalation.upstream_status_cause(400) is Cause.UPSTREAM_ERROR
    assert escalation.upstream_status_cause(401) is None and escalation.upstream_status_cause(404) is None


# -- cache -------------------------------------------------------------------------------------------

def answer(n: int = 10, cost: str = "0.001") -> cache.CachedAnswer:
    return cache.CachedAnswer(body=b"x" * n, stream=False, status=200, headers=(), cost=Decimal(cost),
                              currency="USD", backend="b")


def test_request_key_normalises():
    a = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "user": "u1"}
    b = {"temperature": 0, "messages": [{"content": "hi", "role": "user"}], "model": "other", "user": "u2"}
    k = cache.request_key("chat/completions", "chat", a)
    assert k == cache.request_key("chat/completions", "chat", b)  # key order, user, model alias
    assert len(k) == 64 and "hi" not in k
    assert k != cache.request_key("messages", "chat", a)
    assert k != cache.request_key("chat/completions", "chat2", a)
    assert k != cache.request_key("chat/completions", "chat", {**a, "stream": True})
    assert k != cache.request_key("chat/completions", "chat", {**a, "temperature": 0.5})


def test_cacheable():
    assert cache.cacheable({"temperature": 0}, None)
    assert not cache.cacheable({}, None) and not cache.cacheable({"temperature": 0.2}, None)
    assert cache.cacheable({}, "force") and cache.cacheable({"temperature": 1}, "true")
    assert not cache.cacheable({"temperature": 0}, "bypass")
    assert cache.cacheable({"temperature": 0}, "whatever")
    assert not cache.cacheable({"temperature": False}, None)


def test_cache_ttl_lru_and_bounds():
    clock = Clock()
    c = cache.ResponseCache(ttl=60, max_entries=2, max_bytes=10_000, clock=clock)
    assert c.put("a", answer()) and c.put("b", answer())
    assert c.get("a") is not None  # a is now the most recent
    c.put("c", answer())
    assert c.get("b") is None and c.get("a") is not None and len(c) == 2
    clock.t += 61
    assert c.get("a") is None and c.purge_expired() == 1 and len(c) == 0 and c.bytes == 0
    small = cache.ResponseCache(ttl=60, max_entries=100, max_bytes=1000, clock=clock)
    assert not small.put("huge", answer(5000))
    for i in range(5):
        small.put(str(i), answer(200))
    assert small.bytes <= 1000 and len(small) == 2 and small.get("4") is not None
    small.put("4", answer(100))  # replace keeps the byte count right
    assert small.bytes == sum(a.size for a in (small.get("3"), small.get("4")))


# -- loop breaker ------------------------------------------------------------------------------------

def test_loop_detector_window():
    clock = Clock()
    d = loop.LoopDetector(max_repeats=3, window=10, clock=clock)
    assert [d.observe("k") for _ in range(3)] == [False, False, False]
    assert d.observe("k") is True  # the 4th within 10 s
    assert d.observe("other") is False
    clock.t += 10.5
    assert d.observe("k") is False and d.count("k") == 1
    for _ in range(3):
        clock.t += 4  # spread over 12 s: never more than 3 within 10 s
        assert d.observe("spread") is False
    with pytest.raises(ValueError):
        loop.LoopDetector(0, 10)


def test_loop_detector_bounded_keys():
    d = loop.LoopDetector(2, 60, clock=Clock(), max_keys=100)
    for i in range(1000):
        d.observe(str(i))
    assert len(d) == 100


# -- judge -------------------------------------------------------------------------------------------

def test_judge_request_and_verdict():
    body = chat("first", "answer", "x" * 10000)
    req = judge.judge_request(body, "mini")
    assert req["model"] == "mini" and req["temperature"] == 0 and req["max_tokens"] == judge.JUDGE_MAX_TOKENS
    assert len(req["messages"][1]["content"]) < judge.QUESTION_CHARS + 50
    assert judge.parse_verdict("73") == 73 and judge.parse_verdict("Difficulty: 250") == 100
    assert judge.parse_verdict("hard") is None and judge.parse_verdict(None) is None
