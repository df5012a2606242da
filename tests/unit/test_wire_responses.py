"""OpenAI Responses -> Anthropic Messages for text-only requests (spendwarden.wire.responses)."""
from __future__ import annotations

import pytest

from spendwarden.wire.responses import (
    AnthropicToResponsesStream,
    anthropic_to_response,
    responses_to_anthropic,
    untranslatable,
)
from spendwarden.wire.translate import TranslationError


def test_text_input_becomes_messages_and_instructions_the_system_prompt():
    body = {"model": "a", "instructions": "be brief", "temperature": 0.2, "store": True, "metadata": {"k": "v"},
            "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
            "input": [{"role": "developer", "content": "no jokes"},
                      {"role": "user", "content": [{"type": "input_text", "text": "hi "}, {"type": "input_text", "text": "there"}]},
                      {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hello"}]},
                      {"role": "user", "content": "and?"}]}
    assert responses_to_anthropic(body, "claude", 64, True) == {
        "model": "claude", "max_tokens": 64, "stream": True, "temperature": 0.2, "system": "be brief\n\nno jokes",
        "messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"},
                     {"role": "user", "content": "and?"}]}
    assert responses_to_anthropic({"input": "x"}, "c", 5, False) == {
        "model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}


@pytest.mark.parametrize("body,needle", [
    ({"input": "x", "tools": [{"type": "web_search"}]}, "'tools'"),
    ({"input": "x", "previous_response_id": "resp_1"}, "'previous_response_id'"),
    ({"input": "x", "reasoning": {"effort": "low"}}, "'reasoning'"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n", "schema": {}}}}, "'text'"),
    ({"input": "x", "background": True}, "'background'"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, "function_call_output"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input_file"),
    ({"input": [{"role": "system", "content": "only a system prompt"}]}, "no user or assistant message"),
])
def test_the_rest_is_refused_naming_it(body, needle):
    with pytest.raises(TranslationError) as e:
        responses_to_anthropic(body, "c", 5, False)
    assert needle in str(e.value)
    assert needle in (untranslatable(body) or "")


def test_a_message_becomes_a_response_with_the_usage_in_openai_shape():
    doc = {"id": "msg_1", "content": [{"type": "text", "text": "hi"}], "stop_reason": "max_tokens",
           "usage": {"input_tokens": 10, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 2,
                     "output_tokens": 7}}
    r = anthropic_to_response(doc, "alias", {"max_output_tokens": 7}, 123)
    assert (r["id"], r["model"], r["status"], r["incomplete_details"]) == \
        ("resp_msg_1", "alias", "incomplete", {"reason": "max_output_tokens"})
    assert r["output"][0]["content"][0] == {"type": "output_text", "text": "hi", "annotations": []}
    assert r["usage"] == {"input_tokens": 17, "input_tokens_details": {"cached_tokens": 5}, "output_tokens": 7,
                          "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 24}


def test_stream_events_in_the_documented_order_with_sequence_numbers():
    t = AnthropicToResponsesStream("alias", {}, 1)
    events = []
    for obj in ({"type": "message_start", "message": {"id": "m", "usage": {"input_tokens": 3, "output_tokens": 1}}},
                {"type": "content_block_start", "index": 0}, {"type": "ping"},
                {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "a"}},
                {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "b"}},
                {"type": "content_block_stop"}, {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                                 "usage": {"output_tokens": 2}},
                {"type": "message_stop"}):
        events += t.feed(obj)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(10))
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == "ab" and final["usage"]["output_tokens"] == 2
    assert final["usage"]["input_tokens"] == 3 and final["status"] == "completed"
