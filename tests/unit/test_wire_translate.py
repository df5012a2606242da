"""Translation between the OpenAI and Anthropic wire formats, checked against the SDKs' own types."""
from __future__ import annotations

import json

import anthropic.types as at
import openai.types.chat as ot
import pytest
from pydantic import TypeAdapter

from spendwarden.wire.translate import (
    AnthropicToOpenAIStream,
    OpenAIToAnthropicStream,
    TranslationError,
    anthropic_to_openai_chat,
    anthropic_to_openai_response,
    openai_chat_to_anthropic,
    openai_to_anthropic_response,
)

TOOL = {"type": "function", "function": {"name": "lookup", "description": "find an order",
                                         "parameters": {"type": "object", "properties": {"id": {"type": "string"}}}}}


def test_openai_request_to_anthropic_moves_system_merges_turns_and_maps_tools():
    body = {"model": "chat", "max_completion_tokens": 300, "temperature": 0, "stop": "END", "user": "u1",
            "tools": [TOOL], "tool_choice": "required",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "user", "content": [{"type": "text", "text": "order 7?"},
                                             {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA="}}]},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{\"id\": \"7\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "shipped"},
            ]}
    out = openai_chat_to_anthropic(body, "claude-x")
    assert out["model"] == "claude-x" and out["max_tokens"] == 300 and out["system"] == "be brief"
    assert out["stop_sequences"] == ["END"] and out["metadata"] == {"user_id": "u1"}
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "user"]
    assert out["messages"][0]["content"][2] == {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAA="}}
    assert out["messages"][1]["content"] == [{"type": "tool_use", "id": "call_1", "name": "lookup", "input": {"id": "7"}}]
    assert out["messages"][2]["content"] == [{"type": "tool_result", "tool_use_id": "call_1", "content": "shipped"}]
    assert out["tools"][0]["input_schema"]["properties"]["id"] == {"type": "string"}
    assert out["tool_choice"] == {"type": "any"}


@pytest.mark.parametrize("body,needle", [
    ({"n": 3, "messages": []}, "n > 1"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "part type 'input_audio'"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "role 'wizard'"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{oops"}}]}]},
     "arguments are not JSON"),
])
def test_untranslatable_openai_requests_are_refused_by_name(body, needle):
    with pytest.raises(TranslationError, match=needle.replace("(", r"\(")):
        openai_chat_to_anthropic(body, "m")


def test_anthropic_response_as_openai_validates_with_the_openai_sdk():
    resp = {"id": "msg_abc", "type": "message", "role": "assistant", "model": "claude-x", "stop_reason": "tool_use",
            "content": [{"type": "text", "text": "Let me check."},
                        {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"id": "7"}}],
            "usage": {"input_tokens": 20, "output_tokens": 9, "cache_read_input_tokens": 100}}
    out = ot.ChatCompletion.model_validate(anthropic_to_openai_response(resp, "chat"))
    assert out.model == "chat" and out.choices[0].finish_reason == "tool_calls"
    assert out.choices[0].message.content == "Let me check."
    assert json.loads(out.choices[0].message.tool_calls[0].function.arguments) == {"id": "7"}
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (120, 9, 129)
    assert out.usage.prompt_tokens_details.cached_tokens == 100


def test_anthropic_stream_as_openai_chunks():
    events = [
        {"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 12, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"id\":"}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "\"7\"}"}},
        {"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 5}},
        {"type": "message_stop"},
    ]
    conv = AnthropicToOpenAIStream("chat", include_usage=True)
    chunks = [ot.ChatCompletionChunk.model_validate(c) for e in events for c in conv.feed(e)]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    args = "".join(tc.function.arguments or "" for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or []))
    assert text == "Hello" and json.loads(args) == {"id": "7"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 12 and chunks[-1].usage.completion_tokens == 5
    quiet = AnthropicToOpenAIStream("chat", include_usage=False)
    assert all(c["choices"] for e in events for c in quiet.feed(e))  # no usage chunk unless asked


def test_anthropic_request_to_openai_and_back_validates_with_the_anthropic_sdk():
    body = {"model": "chat", "max_tokens": 64, "system": "terse", "stop_sequences": ["X"], "stream": True,
            "tools": [{"name": "lookup", "input_schema": {"type": "object"}}], "tool_choice": {"type": "tool", "name": "lookup"},
            "messages": [{"role": "user", "content": "order 7?"},
                         {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"id": "7"}}]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "shipped"}]}]}
    out = anthropic_to_openai_chat(body, "gpt-x")
    assert out["messages"][0] == {"role": "system", "content": "terse"}
    assert out["messages"][2]["tool_calls"][0]["function"]["name"] == "lookup"
    assert out["messages"][3] == {"role": "tool", "tool_call_id": "toolu_1", "content": "shipped"}
    assert out["stream_options"] == {"include_usage": True} and out["stop"] == ["X"]
    assert out["tool_choice"] == {"type": "function", "function": {"name": "lookup"}}

    resp = {"id": "chatcmpl-9", "choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": "ok"}}],
            "usage": {"prompt_tokens": 30, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 10}}}
    msg = at.Message.model_validate(openai_to_anthropic_response(resp, "chat"))
    assert msg.stop_reason == "max_tokens" and msg.content[0].text == "ok"
    assert (msg.usage.input_tokens, msg.usage.cache_read_input_tokens, msg.usage.output_tokens) == (20, 10, 4)


def test_openai_stream_as_anthropic_events_validates_with_the_anthropic_sdk():
    chunks = [
        {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"content": "Hi"}}]},
        {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"content": " there"}}]},
        {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"id": "chatcmpl-1", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 2,
                                                     "prompt_tokens_details": {"cached_tokens": 4}}},
    ]
    conv = OpenAIToAnthropicStream("chat")
    events = [e for c in chunks for e in conv.feed(c)] + list(conv.finish())
    adapter = TypeAdapter(at.RawMessageStreamEvent)
    parsed = [adapter.validate_python(e) for e in events]
    assert [p.type for p in parsed] == ["message_start", "content_block_start", "content_block_delta",
                                        "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert "".join(p.delta.text for p in parsed if p.type == "content_block_delta") == "Hi there"
    assert parsed[-2].usage.output_tokens == 2 and parsed[-2].delta.stop_reason == "end_turn"
    assert (parsed[-2].usage.input_tokens, parsed[-2].usage.cache_read_input_tokens) == (7, 4)
