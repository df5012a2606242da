import orjson
import pytest

from spendwarden.proxy.errors import ProxyError
from spendwarden.proxy.translate import (ChatStreamTranslator, StreamTranslator, chat_to_message, chat_to_messages,
                                         error_to_anthropic, error_to_openai, message_to_chat, messages_to_chat)


def test_request_translation_with_tools():
    body = {"model": "chat", "temperature": 0.2, "stop": "END", "tool_choice": "required",
            "messages": [{"role": "system", "content": "sys"},
                         {"role": "user", "content": [{"type": "text", "text": "look"},
                                                      {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}}]},
                         {"role": "assistant", "content": None,
                          "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
                         {"role": "tool", "tool_call_id": "c1", "content": "42"},
                         {"role": "user", "content": "thanks"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}
    out = chat_to_messages(body, "claude-x", 100, True)
    assert out["model"] == "claude-x" and out["max_tokens"] == 100 and out["stream"] is True
    assert out["system"] == "sys" and out["stop_sequences"] == ["END"] and out["tool_choice"] == {"type": "any"}
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "user"]
    assert out["messages"][0]["content"][1]["source"] == {"type": "base64", "media_type": "image/png", "data": "AAA"}
    assert out["messages"][1]["content"][0] == {"type": "tool_use", "id": "c1", "name": "f", "input": {"a": 1}}
    # tool result and the next user message merge into one user turn (roles must alternate)
    assert [b["type"] for b in out["messages"][2]["content"]] == ["tool_result", "text"]
    assert out["tools"][0]["input_schema"] == {"type": "object"}
    with pytest.raises(ProxyError):
        chat_to_messages({**body, "n": 2}, "m", 1, False)


def test_response_translation():
    doc = {"id": "msg_1", "model": "claude-x", "stop_reason": "tool_use",
           "content": [{"type": "text", "text": "ok"}, {"type": "tool_use", "id": "t", "name": "f", "input": {"x": 1}}],
           "usage": {"input_tokens": 10, "cache_read_input_tokens": 5, "output_tokens": 3}}
    out = message_to_chat(doc, "alias")
    ch = out["choices"][0]
    assert ch["finish_reason"] == "tool_calls" and ch["message"]["content"] == "ok"
    assert orjson.loads(ch["message"]["tool_calls"][0]["function"]["arguments"]) == {"x": 1}
    assert out["usage"] == {"prompt_tokens": 15, "completion_tokens": 3, "total_tokens": 18,
                            "prompt_tokens_details": {"cached_tokens": 5}}
    err = orjson.loads(error_to_openai(b'{"type":"error","error":{"type":"invalid_request_error","message":"m"}}'))
    assert err["error"]["message"] == "m"


def test_stream_translation():
    t = StreamTranslator("alias", include_usage=True)
    evs = [{"type": "message_start", "message": {"id": "m", "model": "c", "usage": {"input_tokens": 4, "output_tokens": 1}}},
           {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
           {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
           {"type": "ping"},
           {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "t", "name": "f"}},
           {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{}"}},
           {"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 9}},
           {"type": "message_stop"}]
    out = [x for e in evs for x in t.event(e)]
    assert out[-1] == b"data: [DONE]\n\n"
    chunks = [orjson.loads(x[6:]) for x in out[:-1]]
    assert chunks[1]["choices"][0]["delta"] == {"content": "Hi"}
    assert chunks[2]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "f"
    assert chunks[4]["choices"][0]["finish_reason"] == "length"
    assert chunks[5]["choices"] == [] and chunks[5]["usage"]["completion_tokens"] == 9


def test_reverse_request_and_response():
    body = {"model": "a", "max_tokens": 5, "system": [{"type": "text", "text": "sys"}], "stop_sequences": ["X"],
            "tools": [{"name": "f", "input_schema": {"type": "object"}}], "tool_choice": {"type": "any"},
            "messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": [{"type": "text", "text": "calling"},
                                                           {"type": "tool_use", "id": "t1", "name": "f", "input": {"q": 1}}]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "r"},
                                                      {"type": "text", "text": "and?"}]}]}
    out = messages_to_chat(body, "gpt", 5, True, openai_native=True)
    assert out["max_completion_tokens"] == 5 and out["stream_options"] == {"include_usage": True}
    assert [m["role"] for m in out["messages"]] == ["system", "user", "assistant", "tool", "user"]
    assert out["messages"][2]["tool_calls"][0]["function"]["arguments"] == '{"q":1}'
    assert out["tool_choice"] == "required" and out["stop"] == ["X"]
    assert messages_to_chat(body, "m", 5, False, openai_native=False)["max_tokens"] == 5
    doc = {"id": "c", "model": "gpt", "choices": [{"finish_reason": "length", "message": {"content": "hey"}}],
           "usage": {"prompt_tokens": 10, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 4}}}
    msg = chat_to_message(doc, "a")
    assert msg["stop_reason"] == "max_tokens" and msg["content"] == [{"type": "text", "text": "hey"}]
    assert msg["usage"] == {"input_tokens": 6, "output_tokens": 2, "cache_read_input_tokens": 4,
                            "cache_creation_input_tokens": 0}
    err = orjson.loads(error_to_anthropic(b'{"error":{"message":"m","type":"invalid_request_error"}}'))
    assert err == {"type": "error", "error": {"type": "invalid_request_error", "message": "m"}}


def test_reverse_stream():
    t = ChatStreamTranslator("a")
    out = []
    out += t.event({"id": "c", "model": "gpt", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    out += t.event({"id": "c", "choices": [{"index": 0, "delta": {"content": "Hi"}}]})
    out += t.event({"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "t", "function": {"name": "f", "arguments": "{\"a\""}}]}}]})
    out += t.event({"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": ":1}"}}]}, "finish_reason": "tool_calls"}]})
    out += t.event({"id": "c", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}})
    out += t.done()
    kinds = [x.split(b"\n")[0][7:].decode() for x in out]
    assert kinds == ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                     "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
                     "message_delta", "message_stop"]
    delta = orjson.loads(out[-2].split(b"data: ")[1])
    assert delta["delta"]["stop_reason"] == "tool_use" and delta["usage"]["output_tokens"] == 4
