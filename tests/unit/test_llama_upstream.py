"""The real llama.cpp upstream (xllamacpp on the tiny GGUF), driven by the openai SDK directly."""
from __future__ import annotations

import json
import urllib.request

import openai
import pytest

from spendwarden.devtools.tiny_gguf import vocabulary

pytestmark = pytest.mark.llamacpp

MESSAGES = [{"role": "user", "content": "hello, the budget is"}]


@pytest.fixture
def client(llama_server):
    return openai.OpenAI(base_url=llama_server.openai_url, api_key="not-needed", max_retries=0, timeout=30)


def _tokenize(llama_server, text: str) -> list[int]:
    req = urllib.request.Request(llama_server.url + "/tokenize", data=json.dumps({"content": text}).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())["tokens"]


def test_tokenizer_is_real(llama_server):
    # Byte fallback plus a few merged pieces: fewer tokens than bytes, and stable.
    tokens = _tokenize(llama_server, " hello the")
    assert 0 < len(tokens) < len(" hello the")
    assert tokens == _tokenize(llama_server, " hello the")
    # SentencePiece prefixes a space ("▁"); then the two UTF-8 bytes of "é" fall back to byte tokens.
    vocab, _, _ = vocabulary()
    assert _tokenize(llama_server, "é") == [vocab.index("▁"), vocab.index("<0xC3>"), vocab.index("<0xA9>")]


def test_chat_non_stream_usage(llama_server, client):
    r = client.chat.completions.create(model=llama_server.model, messages=MESSAGES, max_tokens=8, temperature=0)
    u = r.usage
    assert u.prompt_tokens > len(_tokenize(llama_server, MESSAGES[0]["content"]))  # plus the chat template
    assert 0 < u.completion_tokens <= 8
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert r.choices[0].finish_reason in ("length", "stop")
    # Same prompt, same prompt-token count: usage is deterministic where it must be.
    again = client.chat.completions.create(model=llama_server.model, messages=MESSAGES, max_tokens=3)
    assert again.usage.prompt_tokens == u.prompt_tokens and again.usage.completion_tokens <= 3


def test_chat_stream_usage_with_include_usage(llama_server, client):
    chunks = list(client.chat.completions.create(model=llama_server.model, messages=MESSAGES, max_tokens=6,
                                                 stream=True, stream_options={"include_usage": True}))
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and chunks[-1].usage is usage[0] and chunks[-1].choices == []
    assert usage[0].prompt_tokens > 0 and 0 < usage[0].completion_tokens <= 6
    # One content delta per generated token (byte tokens may decode to empty or partial text).
    deltas = [c for c in chunks if c.choices and c.choices[0].finish_reason is None]
    assert len(deltas) >= 1


def test_completions_usage(llama_server, client):
    prompt = "the budget is"
    r = client.completions.create(model=llama_server.model, prompt=prompt, max_tokens=4)
    assert r.usage.prompt_tokens == len(_tokenize(llama_server, prompt)) + 1  # + BOS
    assert 0 < r.usage.completion_tokens <= 4
