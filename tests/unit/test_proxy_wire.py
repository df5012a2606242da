import pytest

from spendwarden.ledger.pricing import TokenUsage
from spendwarden.proxy.errors import ProxyError
from spendwarden.proxy.wire import (
    MAX_REPORTED_TOKENS,
    BadUsage,
    anthropic_stream_usage,
    anthropic_usage,
    check_request,
    event_data,
    openai_usage,
    split_events,
)
from spendwarden.routing.apis import CHAT, COMPLETIONS, EMBEDDINGS, MESSAGES


def test_check_chat_ok():
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "n": 2,
            "stream": True, "tools": [{}]}
    assert check_request(CHAT, body) == ("chat", True, 10, 2, True)
    body = {"model": "chat", "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}],
            "max_completion_tokens": 5, "max_tokens": 50}
    assert check_request(CHAT, body)[2] == 5


@pytest.mark.parametrize("api,body,needle", [
    (CHAT, [], "JSON object"),
    (CHAT, {"messages": []}, "'model' is required"),
    (CHAT, {"model": 3, "messages": []}, "'model' must be"),
    (CHAT, {"model": "m" * 300, "messages": []}, "at most 256"),
    (CHAT, {"model": "m"}, "'messages' is required"),
    (CHAT, {"model": "m", "messages": "hi"}, "'messages' must be an array"),
    (CHAT, {"model": "m", "messages": []}, "at least one"),
    (CHAT, {"model": "m", "messages": ["hi"]}, "messages[0]"),
    (CHAT, {"model": "m", "messages": [{"content": "x"}]}, "role"),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": 5}]}, "content"),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}, "max_tokens"),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": True}, "max_tokens"),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "at least 1"),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": {}}, "tools"),
    (COMPLETIONS, {"model": "m", "prompt": 5}, "prompt"),
    (EMBEDDINGS, {"model": "m", "input": []}, "input"),
    (MESSAGES, {"model": "m", "messages": [{"role": "user"}], "max_tokens": 5}, "content"),
    (MESSAGES, {"model": "m", "messages": [{"role": "user", "content": "x"}], "system": 5}, "system"),
    # sizes no request can need: said as such, not as an exhausted budget (issue 16)
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 10**9}, "'n' must be at most 128"),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**8 + 1},
     "'max_tokens' must be at most 100000000"),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 2**63},
     "'max_completion_tokens' must be at most"),
    (COMPLETIONS, {"model": "m", "prompt": "x", "n": 129}, "'n' must be at most 128"),
    (COMPLETIONS, {"model": "m", "prompt": [[1]] * 2049}, "'prompt' holds 2049 prompts; at most 2048"),
    (MESSAGES, {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**12}, "at most"),
])
def test_check_refuses_with_clear_400(api, body, needle):
    with pytest.raises(ProxyError) as e:
        check_request(api, body)
    assert e.value.status == 400 and needle in e.value.message


def test_completions_choices_count_prompts():
    assert check_request(COMPLETIONS, {"model": "m", "prompt": ["a", "b"], "n": 2})[3] == 4
    assert check_request(COMPLETIONS, {"model": "m", "prompt": ["a"] * 2048, "n": 128, "max_tokens": 10**8})[2:4] \
        == (10**8, 2048 * 128)
    assert check_request(COMPLETIONS, {"model": "m", "prompt": [1, 2, 3]})[3] == 1


def test_openai_usage():
    assert openai_usage({"prompt_tokens": 10, "completion_tokens": 5,
                         "prompt_tokens_details": {"cached_tokens": 4}}) == TokenUsage(10, 5, 4)
    assert openai_usage({"prompt_tokens": 7, "total_tokens": 7}) == TokenUsage(7, 0, 0)  # embeddings
    assert openai_usage(None) is None and openai_usage({"completion_tokens": 3}) is None
    assert openai_usage({"prompt_tokens": 7, "prompt_tokens_details": None}) == TokenUsage(7, 0, 0)


NONSENSE = [-1, -10**12, MAX_REPORTED_TOKENS + 1, 10**40, 1.5, 10.0, "10", True, [], {}]


@pytest.mark.parametrize("bad", NONSENSE, ids=repr)
def test_nonsense_usage_is_bad_usage(bad):
    """A negative, absurdly large or non-integer count in any field, in either format: BadUsage (the
    request is then charged its reservation), naming the field."""
    fine_oa = {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 4}}
    for key in ("prompt_tokens", "completion_tokens"):
        got = openai_usage({**fine_oa, key: bad})
        assert isinstance(got, BadUsage) and key in got.reason
    assert isinstance(openai_usage({**fine_oa, "prompt_tokens_details": {"cached_tokens": bad}}), BadUsage)
    fine_an = {"input_tokens": 10, "cache_read_input_tokens": 3, "cache_creation_input_tokens": 2, "output_tokens": 1}
    for key in fine_an:
        got = anthropic_usage({**fine_an, key: bad})
        assert isinstance(got, BadUsage) and key in got.reason
        # in a stream: a nonsense message_delta, and anything after a nonsense message_start
        start = anthropic_stream_usage({"type": "message_start", "message": {"usage": fine_an}}, None)
        assert isinstance(anthropic_stream_usage({"type": "message_delta", "usage": {key: bad}}, start), BadUsage)
        broken = anthropic_stream_usage({"type": "message_start", "message": {"usage": {**fine_an, key: bad}}}, None)
        assert isinstance(broken, BadUsage)
        assert anthropic_stream_usage({"type": "message_delta", "usage": {"output_tokens": 5}}, broken) is broken
    assert isinstance(anthropic_usage({**fine_an, "cache_creation": {"ephemeral_1h_input_tokens": bad}}), BadUsage)
    assert openai_usage({"prompt_tokens": MAX_REPORTED_TOKENS}) == TokenUsage(MAX_REPORTED_TOKENS, 0)


def test_anthropic_usage_adds_cache_reads_and_writes_to_input():
    start = anthropic_usage({"input_tokens": 10, "cache_read_input_tokens": 30, "cache_creation_input_tokens": 5,
                             "output_tokens": 1})
    assert start == TokenUsage(45, 1, 30, 5)
    assert anthropic_usage({"output_tokens": 20}, start) == TokenUsage(45, 20, 30, 5)
    # newer APIs repeat the input side in message_delta; what it leaves out (or sends as null) keeps
    # message_start's value, what it sends supersedes it
    assert anthropic_usage({"input_tokens": 10, "cache_read_input_tokens": 30, "output_tokens": 20}, start) \
        == TokenUsage(45, 20, 30, 5)
    assert anthropic_usage({"input_tokens": 10, "cache_creation_input_tokens": None, "output_tokens": 20}, start) \
        == TokenUsage(45, 20, 30, 5)
    assert anthropic_usage({"input_tokens": 12, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0,
                            "output_tokens": 20}, start) == TokenUsage(12, 20)
    assert anthropic_usage({"cache_read_input_tokens": 40, "output_tokens": 20}, start) == TokenUsage(55, 20, 40, 5)
    assert anthropic_usage(None, start) == start


def test_anthropic_usage_cache_writes_and_their_1h_part():
    u = {"input_tokens": 10, "cache_read_input_tokens": 30, "cache_creation_input_tokens": 500, "output_tokens": 7,
         "cache_creation": {"ephemeral_5m_input_tokens": 200, "ephemeral_1h_input_tokens": 300}}
    assert anthropic_usage(u) == TokenUsage(540, 7, 30, cache_write_tokens=500, cache_write_1h_tokens=300)
    # older APIs: no cache_creation detail, every write is a 5-minute one
    assert anthropic_usage({"input_tokens": 10, "cache_creation_input_tokens": 500, "output_tokens": 7}) \
        == TokenUsage(510, 7, 0, 500, 0)
    # non-int values cannot be believed (see test_nonsense_usage_is_bad_usage)
    assert isinstance(anthropic_usage({"input_tokens": 10, "cache_creation_input_tokens": "500", "output_tokens": 7,
                                       "cache_creation": {"ephemeral_1h_input_tokens": 1.5}}), BadUsage)
    assert isinstance(anthropic_usage({"input_tokens": 10, "cache_creation_input_tokens": 500, "output_tokens": 7,
                                       "cache_creation": {"ephemeral_1h_input_tokens": "300"}}), BadUsage)


def test_anthropic_stream_keeps_the_cache_writes_of_message_start():
    start = anthropic_usage({"input_tokens": 10, "cache_creation_input_tokens": 500, "output_tokens": 1,
                             "cache_creation": {"ephemeral_5m_input_tokens": 200, "ephemeral_1h_input_tokens": 300}})
    final = anthropic_usage({"output_tokens": 42}, start)
    assert final == TokenUsage(510, 42, 0, 500, 300)
    # a message_delta repeating the input side without the 1h detail keeps message_start's split
    assert anthropic_usage({"input_tokens": 10, "cache_creation_input_tokens": 500, "output_tokens": 42}, start) \
        == TokenUsage(510, 42, 0, 500, 300)


def test_split_events_keeps_incomplete_tail():
    buf = bytearray(b"data: {\"a\":1}\n\ndata: [DONE]\n\ndata: {\"b\"")
    evs = split_events(buf)
    assert evs == [b"data: {\"a\":1}\n\n", b"data: [DONE]\n\n"]
    assert bytes(buf) == b"data: {\"b\""
    buf += b":2}\r\n\r\n"
    assert split_events(buf) == [b"data: {\"b\":2}\n\n"] and not buf
    assert event_data(b"event: message_delta\ndata: {\"x\":1}\n\n") == b"{\"x\":1}"
    assert event_data(b": comment\n\n") is None


def test_check_responses():
    from spendwarden.routing.apis import RESPONSES

    body = {"model": "m", "input": [{"role": "user", "content": "hi"}], "max_output_tokens": 64, "stream": True}
    assert check_request(RESPONSES, body) == ("m", True, 64, 1, False)
    assert check_request(RESPONSES, {"model": "m", "previous_response_id": "resp_1"})[2] is None
    for bad_body, needle in (({"model": "m"}, "'input' is required"), ({"model": "m", "input": 3}, "'input' must be"),
                             ({"model": "m", "input": ["x"]}, "'input[0]' must be an object"),
                             ({"model": "m", "input": "x", "instructions": []}, "'instructions' must be"),
                             ({"model": "m", "input": "x", "max_output_tokens": 0}, "'max_output_tokens' must be")):
        with pytest.raises(ProxyError) as e:
            check_request(RESPONSES, bad_body)
        assert needle in e.value.message and e.value.status == 400


def test_responses_usage_and_reasoning_tokens_in_both_openai_shapes():
    u = {"input_tokens": 100, "input_tokens_details": {"cached_tokens": 40}, "output_tokens": 30,
         "output_tokens_details": {"reasoning_tokens": 20}, "total_tokens": 130}
    assert openai_usage(u) == TokenUsage(100, 30, 40, reasoning_tokens=20)
    chat = {"prompt_tokens": 10, "completion_tokens": 5, "completion_tokens_details": {"reasoning_tokens": 3}}
    assert openai_usage(chat) == TokenUsage(10, 5, 0, reasoning_tokens=3)
    assert isinstance(openai_usage({**u, "output_tokens_details": {"reasoning_tokens": -1}}), BadUsage)
    assert openai_usage({"input_tokens": None}) is None


def test_a_responses_stream_ends_with_its_terminal_event_and_its_usage():
    from spendwarden.proxy.responses import terminal_usage

    usage = b'{"input_tokens":7,"output_tokens":3,"output_tokens_details":{"reasoning_tokens":2}}'
    for kind in (b"response.completed", b"response.incomplete", b"response.failed"):
        ev = b"event: " + kind + b'\ndata: {"type":"' + kind + b'","response":{"usage":' + usage + b"}}\n\n"
        assert terminal_usage(ev) == (TokenUsage(7, 3, reasoning_tokens=2),)
        assert terminal_usage(ev.split(b"\n", 1)[1]) == (TokenUsage(7, 3, reasoning_tokens=2),)  # no event: line
    failed = b'event: response.failed\ndata: {"type":"response.failed","response":{"usage":null}}\n\n'
    assert terminal_usage(failed) == (None,)  # the end, usage unknown: the reservation is charged
    delta = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"response.completed"}\n\n'
    assert terminal_usage(delta) is None
