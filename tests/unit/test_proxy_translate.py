"""The proxy's adapter over spendwarden.wire.translate (whose conversions have their own tests)."""
import orjson
import pytest

from spendwarden.proxy.errors import ProxyError
from spendwarden.proxy.translate import (
    ChatStreamTranslator,
    StreamTranslator,
    chat_to_messages,
    error_to_anthropic,
    error_to_openai,
    messages_to_chat,
)


def test_admitted_output_cap_and_stream_flags_win():
    body = {"model": "chat", "max_tokens": 5000, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    out = chat_to_messages(body, "claude", 100, stream=True)
    assert out["model"] == "claude" and out["max_tokens"] == 100 and out["stream"] is True
    assert "stream" not in chat_to_messages({**body, "stream": False}, "claude", 100, stream=False)
    a = {"model": "a", "max_tokens": 9000, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    out = messages_to_chat(a, "gpt", 64, True, openai_native=True)
    assert out["max_completion_tokens"] == 64 and "max_tokens" not in out
    assert out["stream_options"] == {"include_usage": True}
    out = messages_to_chat(a, "llama", 64, False, openai_native=False)
    assert out["max_tokens"] == 64 and "stream" not in out and "stream_options" not in out


def test_untranslatable_is_a_400_naming_it():
    with pytest.raises(ProxyError) as e:
        chat_to_messages({"model": "m", "n": 2, "messages": [{"role": "user", "content": "x"}]}, "c", 5, False)
    assert e.value.status == 400 and "n > 1" in e.value.message


def test_error_bodies_change_shape():
    err = orjson.loads(error_to_openai(b'{"type":"error","error":{"type":"invalid_request_error","message":"m"}}'))
    assert err["error"]["message"] == "m" and err["error"]["type"] == "invalid_request_error"
    err = orjson.loads(error_to_anthropic(b'{"error":{"message":"m","type":"invalid_request_error"}}'))
    assert err == {"type": "error", "error": {"type": "invalid_request_error", "message": "m"}}
    assert error_to_openai(b"not json") == b"not json"


def test_relayed_error_types_are_the_clients_for_the_providers_status():
    overloaded = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    assert orjson.loads(error_to_openai(overloaded, 529)) == {"error": {
        "message": "Overloaded", "type": "server_error", "param": None, "code": "overloaded_error"}}
    limited = b'{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}'
    assert orjson.loads(error_to_openai(limited, 429))["error"]["code"] == "rate_limit_exceeded"
    server = b'{"error":{"message":"m","type":"server_error","param":null,"code":null}}'
    assert orjson.loads(error_to_anthropic(server, 500)) == {"type": "error", "error": {"type": "api_error", "message": "m"}}
    assert orjson.loads(error_to_anthropic(server, 503))["error"]["type"] == "overloaded_error"
    assert orjson.loads(error_to_anthropic(server, 418))["error"]["type"] == "server_error"  # no mapping: kept
    assert error_to_anthropic(b"<html>502 Bad Gateway</html>", 502) == b"<html>502 Bad Gateway</html>"


def test_streams_become_sse_bytes():
    t = StreamTranslator("alias", include_usage=False)
    out = t.event({"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 3}}})
    out += t.event({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}})
    out += t.event({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}})
    out += t.event({"type": "message_stop"})
    assert all(x.startswith(b"data: ") and x.endswith(b"\n\n") for x in out)
    assert out[-1] == b"data: [DONE]\n\n"
    assert orjson.loads(out[1][6:])["choices"][0]["delta"] == {"content": "Hi"}
    err = StreamTranslator("a", False).event({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}})
    assert orjson.loads(err[0][6:])["error"]["message"] == "busy"

    r = ChatStreamTranslator("alias")
    out = r.event({"id": "c", "choices": [{"index": 0, "delta": {"content": "Hi"}}]})
    out += r.event({"id": "c", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}})
    out += r.done()
    kinds = [x.split(b"\n")[0] for x in out]
    assert kinds == [b"event: message_start", b"event: content_block_start", b"event: content_block_delta",
                     b"event: content_block_stop", b"event: message_delta", b"event: message_stop"]
    delta = orjson.loads(out[-2].split(b"data: ")[1])
    assert delta["usage"]["output_tokens"] == 4


# ---------------------------------------------------------------- issue #17: no field dropped silently

def test_every_unknown_openai_field_is_refused_by_name():
    from spendwarden.wire.fields import TranslationError, check_openai_fields
    check_openai_fields({"model": "m", "messages": [], "stream_options": {"include_usage": True},
                         "modalities": ["text"], "service_tier": "auto", "logprobs": False})
    for body in ({"some_new_field": 1}, {"service_tier": "flex"}, {"modalities": ["audio"]}, {"store": True}):
        with pytest.raises(TranslationError, match=f"'{next(iter(body))}'"):
            check_openai_fields(body)


def test_every_unknown_anthropic_field_is_refused_by_name():
    from spendwarden.wire.fields import TranslationError, check_anthropic_fields
    check_anthropic_fields({"model": "m", "messages": [], "metadata": {"user_id": "u"}, "service_tier": "auto"})
    for body in ({"container": "c"}, {"mcp_servers": []}, {"metadata": {"other": 1}}):
        with pytest.raises(TranslationError, match=f"'{next(iter(body))}'"):
            check_anthropic_fields(body)


def test_reasoning_effort_and_thinking_budget_map_both_ways():
    from spendwarden.wire.fields import effort_for, thinking_for
    assert thinking_for("low", 8000) == {"type": "enabled", "budget_tokens": 1024}
    assert thinking_for("medium", 8000) == {"type": "enabled", "budget_tokens": 4000}  # half the cap at most
    assert thinking_for("high", 100_000) == {"type": "enabled", "budget_tokens": 16384}
    assert thinking_for("minimal", 8000) is None and thinking_for(None, 10) is None
    for effort in ("low", "medium", "high"):
        assert effort_for(thinking_for(effort, 100_000)) == effort
    assert effort_for({"type": "disabled"}) is None


def test_structured_output_translation_both_shapes():
    from spendwarden.wire import translate as wt
    req = wt.openai_chat_to_anthropic({"messages": [{"role": "user", "content": "x"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "W", "schema": {"type": "object"}, "strict": True}}}, "c")
    assert req["tools"][0]["name"] == "W" and req["tool_choice"] == {"type": "tool", "name": "W"}
    doc = {"id": "msg_1", "content": [{"type": "tool_use", "id": "t", "name": "W", "input": {"a": 1}}],
           "stop_reason": "tool_use", "usage": {"input_tokens": 1, "output_tokens": 2}}
    out = wt.anthropic_to_openai_response(doc, "alias", structured=True)
    assert out["choices"][0]["message"] == {"role": "assistant", "content": '{"a": 1}'}
    assert out["choices"][0]["finish_reason"] == "stop"
    with pytest.raises(wt.TranslationError, match="'response_format'"):
        wt.openai_chat_to_anthropic({"messages": [], "response_format": {"type": "json_schema", "json_schema": {
            "name": "W", "schema": {"type": "object"}}}, "tools": [{"type": "function", "function": {"name": "f"}}]}, "c")
