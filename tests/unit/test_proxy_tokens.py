import os

from spendwarden.routing import tokens as tok


def test_seeded_cache_is_what_tiktoken_expects(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    path = tok.seed_tiktoken_cache("cl100k_base")
    assert os.path.getsize(path) > 1_000_000
    import tiktoken.load

    # tiktoken reads it from the cache (and checks its sha256) instead of downloading
    ranks = tiktoken.load.load_tiktoken_bpe(
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        expected_hash=tok._SHA256["cl100k_base"])
    assert len(ranks) > 100_000


def test_estimates_count_text_tools_and_framing():
    enc = tok.load_encoder()
    body = {"messages": [{"role": "system", "content": "You are terse."},
                         {"role": "user", "content": [{"type": "text", "text": "hello world"},
                                                      {"type": "image_url", "image_url": {"url": "x"}}]}],
            "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]}
    texts, fixed = tok.openai_chat_texts(body)
    n = tok.estimate(enc, texts, fixed)
    assert fixed == tok.PER_REQUEST + 2 * tok.PER_MESSAGE + tok.PER_IMAGE
    assert n > fixed + 5
    a_texts, a_fixed = tok.anthropic_texts({"system": "You are terse.", "messages": [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "42"}]}]})
    assert "42" in a_texts and tok.estimate(enc, a_texts, a_fixed) > a_fixed
    assert tok.openai_prompt_texts([[1, 2, 3], [4]]) == ([], 4)


def test_long_texts_are_cached_and_the_cache_is_bounded():
    enc = tok.load_encoder()
    long = "the spend report " * 100
    first = tok.estimate(enc, [long], 0)
    assert tok._cache.get(long) == first
    assert tok.estimate(enc, [long], 0) == first
    assert tok._cache_chars <= tok._CACHE_MAX_CHARS


def test_a_responses_request_counts_instructions_input_items_tools_and_format():
    body = {"instructions": "be brief", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "what is in"},
                                     {"type": "input_image", "image_url": "data:..."}]},
        {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": '{"q": "x"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "forty-two"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "thought"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "answer"}]}],
        "tools": [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}],
        "text": {"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}}}}
    texts, fixed = tok.request_texts("responses", body)
    for needle in ("be brief", "what is in", "lookup", '{"q": "x"}', "forty-two", "thought", "answer", "json_schema"):
        assert any(needle in t for t in texts), needle
    assert fixed == tok.PER_REQUEST + 6 * tok.PER_MESSAGE + tok.PER_IMAGE
    assert tok.request_texts("responses", {"input": "hi"}) == (["hi"], tok.PER_REQUEST + tok.PER_MESSAGE)
