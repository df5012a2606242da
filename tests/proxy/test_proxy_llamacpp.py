"""The proxy in front of a real OpenAI-compatible server (llama.cpp on a tiny model): real
tokenization, real usage numbers, real SSE framing."""
from __future__ import annotations

from decimal import Decimal

import openai
import pytest

from .conftest import backend, budget_yaml, route_yaml, stream_of

pytestmark = pytest.mark.llamacpp


def test_usage_and_cost_match_llamacpp(llama_server, start_proxy):
    proxy = start_proxy(stream_of(
        route_yaml("local", "local", [backend("llama", llama_server.openai_url, llama_server.model,
                                              provider="OpenAICompatible", price_in="1", price_out="2")]),
        budget_yaml("b", limits={"tokens": {"total": 100000}})))
    client = openai.OpenAI(base_url=proxy.openai_url, api_key="x", max_retries=0, timeout=60)
    r = client.chat.completions.create(model="local", max_tokens=8, messages=[{"role": "user", "content": "hello"}])
    line = proxy.log(1)[-1]
    assert line["input_tokens"] == r.usage.prompt_tokens and line["output_tokens"] == r.usage.completion_tokens
    assert Decimal(line["cost"]) == (r.usage.prompt_tokens * 1 + r.usage.completion_tokens * 2) / Decimal(10**6)
    chunks = list(client.chat.completions.create(model="local", max_tokens=8, stream=True,
                                                 messages=[{"role": "user", "content": "hello"}]))
    assert chunks and all(c.usage is None for c in chunks)
    line = proxy.log(2)[-1]
    assert line["usage_source"] == "upstream" and 0 < line["output_tokens"] <= 8


def test_both_sdks_stream_and_not_record_llamacpps_own_numbers(llama_server, start_proxy):
    """The Anthropic SDK too (translated to llama.cpp's OpenAI API), streaming and not: what the
    proxy records is exactly what the server reported, request by request."""
    import anthropic

    proxy = start_proxy(stream_of(
        route_yaml("local", "local", [backend("llama", llama_server.openai_url, llama_server.model,
                                              provider="OpenAICompatible", price_in="3", price_out="5")]),
        budget_yaml("b", limits={"tokens": {"total": 100000}})))
    oa = openai.OpenAI(base_url=proxy.openai_url, api_key="x", max_retries=0, timeout=60)
    chunks = list(oa.chat.completions.create(model="local", max_tokens=6, stream=True,
                                             stream_options={"include_usage": True},
                                             messages=[{"role": "user", "content": "count to three"}]))
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    line = proxy.log(1)[-1]
    assert (line["input_tokens"], line["output_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)
    assert Decimal(line["cost"]) == (usage.prompt_tokens * 3 + usage.completion_tokens * 5) / Decimal(10**6)

    an = anthropic.Anthropic(base_url=proxy.url, api_key="x", max_retries=0, timeout=60)
    msg = an.messages.create(model="local", max_tokens=6, system="be terse",
                             messages=[{"role": "user", "content": "hello there"}])
    assert msg.usage.input_tokens > 0 and 0 < msg.usage.output_tokens <= 6
    line = proxy.log(2)[-1]
    # Anthropic's input_tokens exclude cached prompt tokens (llama.cpp reuses its prompt cache);
    # the access log counts the whole prompt and the cached part separately.
    cached = msg.usage.cache_read_input_tokens or 0
    assert (line["input_tokens"], line.get("cached_input_tokens", 0), line["output_tokens"]) == \
        (msg.usage.input_tokens + cached, cached, msg.usage.output_tokens)

    with an.messages.stream(model="local", max_tokens=6, messages=[{"role": "user", "content": "hi"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert isinstance(text, str) and final.usage.output_tokens <= 6
    line = proxy.log(3)[-1]
    cached = final.usage.cache_read_input_tokens or 0
    assert (line["input_tokens"], line.get("cached_input_tokens", 0), line["output_tokens"]) == \
        (final.usage.input_tokens + cached, cached, final.usage.output_tokens)
    assert line["usage_source"] == "upstream"
