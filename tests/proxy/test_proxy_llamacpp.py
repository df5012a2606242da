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
