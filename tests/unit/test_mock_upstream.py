"""The mock upstream, driven by the official SDKs: usage it reports, behaviours, what it records."""
from __future__ import annotations

import json
import math
import urllib.request

import anthropic
import httpx
import openai
import pytest

from spendwarden.devtools.mock_upstream import MockUpstream, chat_prompt_tokens

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is a budget?"}]
# Documented rule: sum(ceil(chars/4) + 4) + 2.
EXPECTED_PROMPT = (math.ceil(len("You are terse.") / 4) + 4) + (math.ceil(len("What is a budget?") / 4) + 4) + 2


@pytest.fixture(scope="module")
def up():
    with MockUpstream() as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh(up):
    up.reset()


@pytest.fixture
def oai(up):
    return openai.OpenAI(base_url=up.openai_url, api_key="sk-test-not-recorded", max_retries=0, timeout=10)


@pytest.fixture
def ant(up):
    return anthropic.Anthropic(base_url=up.url, api_key="sk-ant-not-recorded", max_retries=0, timeout=10)


def test_prompt_token_rule():
    assert chat_prompt_tokens(MESSAGES) == EXPECTED_PROMPT
    # Content parts count their text; Anthropic system counts as one more message.
    parts = [{"role": "user", "content": [{"type": "text", "text": "abcdefgh"}, {"type": "image_url", "image_url": {}}]}]
    assert chat_prompt_tokens(parts) == 2 + 4 + 2
    assert chat_prompt_tokens([{"role": "user", "content": "abcd"}], system="abcde") == (1 + 4) + (2 + 4) + 2


def test_openai_chat_non_stream_usage(up, oai):
    r = oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert r.usage.prompt_tokens == EXPECTED_PROMPT
    assert r.usage.completion_tokens == 16  # default
    assert r.usage.total_tokens == EXPECTED_PROMPT + 16
    assert r.choices[0].finish_reason == "stop"
    assert len(r.choices[0].message.content.split()) == 16  # one word per token
    assert r.model == "gpt-4o-mini"

    r = oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_completion_tokens=5)
    assert r.usage.completion_tokens == 5
    assert r.choices[0].finish_reason == "length"
    assert up.totals() == {"requests": 2, "responses_with_usage": 2, "prompt_tokens": 2 * EXPECTED_PROMPT,
                           "completion_tokens": 21, "total_tokens": 2 * EXPECTED_PROMPT + 21, "cached_tokens": 0,
                           "cache_write_tokens": 0,
                           "billed_requests": 2, "billed_prompt_tokens": 2 * EXPECTED_PROMPT,
                           "billed_completion_tokens": 21}


def test_openai_chat_stream_with_and_without_usage(up, oai):
    chunks = list(oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=7, stream=True,
                                              stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 7
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    last = chunks[-1]
    assert last.choices == [] and last.usage.prompt_tokens == EXPECTED_PROMPT and last.usage.completion_tokens == 7
    assert all(c.usage is None for c in chunks[:-1])

    chunks = list(oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=7, stream=True))
    assert all(c.usage is None for c in chunks)
    recs = up.requests()
    assert [r["include_usage"] for r in recs] == [True, False]
    # Only usage actually delivered to the client counts.
    assert recs[1]["usage"] is None and recs[1]["completed"] is True
    assert up.totals()["completion_tokens"] == 7


def test_openai_completions_and_embeddings(up, oai):
    r = oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="abcdefghi", max_tokens=3)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (3, 3)
    chunks = list(oai.completions.create(model="m", prompt="abcd", max_tokens=4, stream=True,
                                         stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 4
    e = oai.embeddings.create(model="text-embedding-3-small", input=["abcd", "abcdefgh"])  # SDK asks for base64
    assert len(e.data) == 2 and len(e.data[0].embedding) == 16
    assert e.usage.prompt_tokens == 3
    assert [m.id for m in oai.models.list()][:2] == ["gpt-4o-mini", "gpt-4o"]


def test_cached_tokens_and_explicit_usage(up, oai, ant):
    r = oai.chat.completions.create(model="m", messages=MESSAGES, extra_headers={
        "x-mock-cached-tokens": "4", "x-mock-prompt-tokens": "1000", "x-mock-completion-tokens": "250"})
    assert r.usage.prompt_tokens == 1000 and r.usage.completion_tokens == 250
    assert r.usage.prompt_tokens_details.cached_tokens == 4
    m = ant.messages.create(model="claude-haiku-4-5", max_tokens=50, messages=MESSAGES[1:],
                            extra_headers={"x-mock-cached-tokens": "3"})
    # Anthropic semantics: input_tokens excludes the cached (read) tokens.
    prompt = chat_prompt_tokens(MESSAGES[1:])
    assert m.usage.input_tokens == prompt - 3 and m.usage.cache_read_input_tokens == 3
    t = up.totals()
    assert t["prompt_tokens"] == 1000 + prompt and t["cached_tokens"] == 7 and t["completion_tokens"] == 250 + 16


def test_anthropic_cache_writes(up, ant):
    prompt = chat_prompt_tokens(MESSAGES[1:])
    m = ant.messages.create(model="claude-haiku-4-5", max_tokens=50, messages=MESSAGES[1:],
                            extra_headers={"x-mock-cached-tokens": "3", "x-mock-cache-write-tokens": "5"})
    # Anthropic semantics: input_tokens excludes the cache reads and writes, reported beside it
    assert (m.usage.input_tokens, m.usage.cache_read_input_tokens, m.usage.cache_creation_input_tokens) == \
        (prompt - 8, 3, 5)
    assert (m.usage.cache_creation.ephemeral_5m_input_tokens, m.usage.cache_creation.ephemeral_1h_input_tokens) == (5, 0)
    with ant.messages.stream(model="claude-haiku-4-5", max_tokens=50, messages=MESSAGES[1:],
                             extra_headers={"x-mock-cache-write-tokens": str(prompt + 100)}) as s:
        final = s.get_final_message()
    assert (final.usage.input_tokens, final.usage.cache_creation_input_tokens) == (0, prompt)  # capped at the prompt
    assert [r["usage"]["cache_write_tokens"] for r in up.requests()] == [5, prompt]
    t = up.totals()
    assert t["prompt_tokens"] == 2 * prompt and t["cached_tokens"] == 3 and t["cache_write_tokens"] == 5 + prompt


def test_anthropic_non_stream(up, ant):
    m = ant.messages.create(model="claude-haiku-4-5", max_tokens=6, system="Be brief.",
                            messages=[{"role": "user", "content": "hello"}])
    assert m.usage.input_tokens == chat_prompt_tokens([{"role": "user", "content": "hello"}], system="Be brief.")
    assert m.usage.output_tokens == 6 and m.stop_reason == "max_tokens"
    assert len(m.content[0].text.split()) == 6
    with pytest.raises(anthropic.BadRequestError):  # max_tokens is required upstream, so here too
        ant.messages.create(model="claude-haiku-4-5", max_tokens=0, messages=[{"role": "user", "content": "x"}])


def test_anthropic_stream_event_sequence(up, ant):
    with ant.messages.stream(model="claude-haiku-4-5", max_tokens=100, messages=MESSAGES[1:],
                             extra_headers={"x-mock-tokens": "5"}) as stream:
        types = [e.type for e in stream]
        final = stream.get_final_message()
    # The SDK adds derived "text" events; the wire sequence is what matters.
    wire = [t for t in types if t != "text"]
    assert wire[0] == "message_start" and wire[1] == "content_block_start"
    assert wire.count("content_block_delta") == 5
    assert wire[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert final.usage.output_tokens == 5 and final.stop_reason == "end_turn"
    assert final.usage.input_tokens == chat_prompt_tokens(MESSAGES[1:])
    rec = up.requests()[-1]
    assert rec["api"] == "anthropic" and rec["stream"] and rec["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("status,exc", [(500, openai.InternalServerError), (503, openai.InternalServerError),
                                        (429, openai.RateLimitError)])
def test_openai_errors(up, oai, status, exc):
    up.script({"status": status, "retry_after": 7})
    with pytest.raises(exc) as info:
        oai.chat.completions.create(model="m", messages=MESSAGES)
    assert info.value.status_code == status
    assert info.value.response.headers["retry-after"] == "7"
    assert info.value.body["type"] in ("server_error", "requests")
    # The script was consumed: the next request succeeds.
    assert oai.chat.completions.create(model="m", messages=MESSAGES).usage.completion_tokens == 16
    assert [r["status"] for r in up.requests()] == [status, 200]


@pytest.mark.parametrize("status,etype", [(429, "rate_limit_error"), (503, "overloaded_error"), (500, "api_error")])
def test_anthropic_errors(up, ant, status, etype):
    with pytest.raises(anthropic.APIStatusError) as info:
        ant.messages.create(model="claude-haiku-4-5", max_tokens=5, messages=MESSAGES[1:],
                            extra_headers={"x-mock-status": str(status)})
    assert info.value.status_code == status
    assert info.value.body["error"]["type"] == etype


def test_disconnect_mid_stream(up, oai, ant):
    with pytest.raises(openai.APIConnectionError):
        for _ in oai.chat.completions.create(model="m", messages=MESSAGES, stream=True,
                                             stream_options={"include_usage": True},
                                             extra_headers={"x-mock-disconnect-after": "3"}):
            pass
    # The anthropic SDK lets its HTTP library's protocol error through rather than wrapping it.
    with pytest.raises(Exception, match="incomplete|Connection error") as info:
        with ant.messages.stream(model="claude-haiku-4-5", max_tokens=50, messages=MESSAGES[1:],
                                 extra_headers={"x-mock-disconnect-after": "4"}) as stream:
            for _ in stream:
                pass
    assert "ProtocolError" in type(info.value).__name__ or isinstance(info.value, anthropic.APIConnectionError)
    with pytest.raises(openai.APIConnectionError):  # non-stream: half a body, then close
        oai.chat.completions.create(model="m", messages=MESSAGES, extra_headers={"x-mock-disconnect-after": "0"})
    recs = up.requests()
    assert [r["completed"] for r in recs] == [False, False, False]
    assert all(r["usage"] is None for r in recs)
    t = up.totals()
    assert t["responses_with_usage"] == 0
    # ...but a provider bills what it generated, whether or not the client read it.
    assert t["billed_requests"] == 3 and t["billed_prompt_tokens"] == 2 * EXPECTED_PROMPT + (
        math.ceil(len(MESSAGES[1]["content"]) / 4) + 4 + 2)
    assert t["billed_completion_tokens"] == 16 + 16 + 16


def test_garbage_and_hang(up, oai):
    r = httpx.post(up.openai_url + "/chat/completions", json={"model": "m", "messages": MESSAGES},
                   headers={"x-mock-garbage": "1"}, timeout=5)
    assert r.status_code == 200
    with pytest.raises(ValueError):
        r.json()
    with pytest.raises(ValueError):  # the SDK cannot parse it either
        oai.chat.completions.create(model="m", messages=MESSAGES, extra_headers={"x-mock-garbage": "1"})
    r = httpx.post(up.openai_url + "/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": True},
                   headers={"x-mock-garbage": "1"}, timeout=5)
    data = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert data and all(not _is_json(d) for d in data)
    with pytest.raises(openai.APITimeoutError):
        oai.with_options(timeout=0.5).chat.completions.create(model="m", messages=MESSAGES,
                                                              extra_headers={"x-mock-hang": "1"})


def _is_json(text):
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def test_latency_and_chunk_delay(up):
    import time

    with httpx.Client(base_url=up.openai_url, timeout=10) as c:
        t0 = time.monotonic()
        with c.stream("POST", "/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": True, "max_tokens": 4},
                      headers={"x-mock-latency-ms": "200", "x-mock-chunk-delay-ms": "50"}) as r:
            first = None
            events = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events += 1
                    first = first or time.monotonic() - t0
        total = time.monotonic() - t0
    assert first >= 0.2
    # role chunk + 4 tokens + finish chunk + [DONE] = 7 events, 6 gaps of 50 ms
    assert events == 7 and total >= 0.2 + 6 * 0.05


def test_script_and_records_over_http(up, oai):
    """The control endpoints, as a test in another process (or the demo) would use them."""
    def call(method, path, body=None):
        req = urllib.request.Request(up.url + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())

    assert call("POST", "/_mock/script", [{"tokens": 2}, {"status": 503}]) == {"queued": 2}
    assert oai.chat.completions.create(model="a", messages=MESSAGES).usage.completion_tokens == 2
    with pytest.raises(openai.InternalServerError):
        oai.chat.completions.create(model="b", messages=MESSAGES)
    data = call("GET", "/_mock/requests")
    assert [(r["model"], r["status"]) for r in data["requests"]] == [("a", 200), ("b", 503)]
    assert data["totals"]["completion_tokens"] == 2
    # Credentials never land in the records.
    for r in data["requests"]:
        assert "authorization" not in r["headers"]
        assert "sk-test-not-recorded" not in json.dumps(r)
    assert call("POST", "/_mock/reset") == {"ok": True}
    assert call("GET", "/_mock/requests")["requests"] == []
    with pytest.raises(urllib.error.HTTPError):
        call("POST", "/_mock/script", [{"no_such_field": 1}])


def test_model_behaviours():
    with MockUpstream(tokens=3, model_behaviours={"slow": {"tokens": 9}}) as server:
        c = openai.OpenAI(base_url=server.openai_url, api_key="x", max_retries=0)
        assert c.chat.completions.create(model="fast", messages=MESSAGES).usage.completion_tokens == 3
        assert c.chat.completions.create(model="slow", messages=MESSAGES).usage.completion_tokens == 9
        # Headers win over the model's behaviour.
        r = c.chat.completions.create(model="slow", messages=MESSAGES, extra_headers={"x-mock-tokens": "1"})
        assert r.usage.completion_tokens == 1


async def test_usable_from_async_tests():
    async with MockUpstream() as server:
        c = openai.AsyncOpenAI(base_url=server.openai_url, api_key="x", max_retries=0)
        r = await c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2)
        assert r.usage.completion_tokens == 2
        await c.close()


def test_bad_mock_header_is_a_400(up):
    r = httpx.post(up.openai_url + "/chat/completions", json={"model": "m", "messages": MESSAGES},
                   headers={"x-mock-tokens": "many"}, timeout=5)
    assert r.status_code == 400 and "x-mock" in r.text
