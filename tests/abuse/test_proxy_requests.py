"""Hypothesis-generated bad requests against one real proxy process, on its seven endpoints: random
JSON shapes, wrong types, huge, negative, fractional and NaN numbers, unknown fields, missing
fields, bad headers and content types, invalid UTF-8, truncated bodies. Each answer must be a 4xx in
the API's error shape (or a 2xx where the input is odd but acceptable, or an upstream-caused
502/503/504 in the proxy's shape); the process must stay alive and its RSS within RSS_GROWTH_MB."""
from __future__ import annotations

import json
import re
import socket
from typing import Any

import httpx
from hypothesis import given
from hypothesis import strategies as st

from tests.support.memory import rss_mb

from . import kinds
from .support import FUZZ, is_json, json_value, judge

MSGS = [{"role": "user", "content": "hi"}]
# What the abuse may add to the RSS the proxy had after its first request: a leak of a few KB per
# example would pass it only over many thousand examples; measured growth is about 20 MB.
RSS_GROWTH_MB = 40
# endpoint -> (path, error shape, a valid body)
ENDPOINTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "chat": ("/v1/chat/completions", "openai", {"model": "chat", "messages": MSGS, "max_tokens": 5}),
    "completions": ("/v1/completions", "openai", {"model": "chat", "prompt": "hi", "max_tokens": 5}),
    "embeddings": ("/v1/embeddings", "openai", {"model": "chat", "input": "hi"}),
    "messages": ("/v1/messages", "anthropic", {"model": "claude", "messages": MSGS, "max_tokens": 5}),
    "count_tokens": ("/v1/messages/count_tokens", "anthropic", {"model": "claude", "messages": MSGS}),
    "responses": ("/v1/responses", "openai", {"model": "chat", "input": MSGS, "max_output_tokens": 5}),
    "input_tokens": ("/v1/responses/input_tokens", "openai", {"model": "chat", "input": "hi"}),
}
# What the proxy checks itself, per endpoint: field -> (accepts this value?, required?). A value it
# does not accept must be refused; count_tokens and input_tokens check only `model` (they estimate what
# they can; input_tokens without a model too).
_str = lambda v: isinstance(v, str) and 0 < len(v) <= 256  # noqa: E731
_int = lambda lo, hi: (lambda v: type(v) is int and lo <= v <= hi)  # noqa: E731
_msgs = lambda v: isinstance(v, list) and bool(v) and all(  # noqa: E731
    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), (str, list))
    for m in v)
_bool = lambda v: type(v) is bool  # noqa: E731
_obj = lambda v: isinstance(v, dict)  # noqa: E731
_list = lambda v: isinstance(v, list)  # noqa: E731
_str_or_list = lambda v: isinstance(v, (str, list))  # noqa: E731
CAP = _int(1, 10**8)
_text = lambda v: isinstance(v, str)  # noqa: E731
_input = lambda v: isinstance(v, str) or (isinstance(v, list) and all(  # noqa: E731
    isinstance(i, dict) and (i.get("content") is None or isinstance(i["content"], (str, list))) for i in v))
CHECKED: dict[str, dict[str, tuple[Any, bool]]] = {
    "chat": {"model": (_str, True), "messages": (_msgs, True), "max_tokens": (CAP, False),
             "max_completion_tokens": (CAP, False), "n": (_int(1, 128), False), "stream": (_bool, False),
             "stream_options": (_obj, False), "tools": (_list, False)},
    "completions": {"model": (_str, True), "prompt": (_str_or_list, True), "max_tokens": (CAP, False),
                    "n": (_int(1, 128), False), "stream": (_bool, False), "stream_options": (_obj, False)},
    "embeddings": {"model": (_str, True), "input": (lambda v: isinstance(v, str) or (_list(v) and bool(v)), True)},
    "messages": {"model": (_str, True), "messages": (_msgs, True), "max_tokens": (CAP, True),
                 "system": (_str_or_list, False), "stream": (_bool, False), "tools": (_list, False)},
    "count_tokens": {"model": (_str, True)},
    "responses": {"model": (_str, True), "input": (_input, True), "max_output_tokens": (CAP, False),
                  "instructions": (_text, False), "previous_response_id": (_text, False), "stream": (_bool, False),
                  "tools": (_list, False)},
    "input_tokens": {"model": (_text, False)},
}
INT_FIELDS = ("max_tokens", "max_completion_tokens", "n", "max_output_tokens")



def _dumps(body: Any) -> bytes:
    return json.dumps(body).encode()


@st.composite
def field_case(draw: st.DrawFn, endpoint: str) -> tuple[str, bytes, bool]:
    """(kind, body, must the proxy refuse it?) with one field wrong: a wrong type, a number out of
    range, fractional, or missing."""
    valid = ENDPOINTS[endpoint][2]
    field = draw(st.sampled_from(sorted(CHECKED[endpoint])))
    accepts, required = CHECKED[endpoint][field]
    how = draw(st.sampled_from(["wrong-type", "missing", "huge", "negative", "fraction", "nan"]
                               if field in INT_FIELDS else ["wrong-type", "missing"]))
    body = dict(valid)
    if how == "missing":
        body.pop(field, None)
        return f"missing:{field}", _dumps(body), required
    if how == "wrong-type":
        body[field] = draw(json_value.filter(lambda v: v is not None and not accepts(v)))
        return f"wrong-type:{field}", _dumps(body), True
    if how == "huge":
        body[field] = draw(st.sampled_from([10**8 + 1, 2**31, 2**63 - 1, 10**15]) | st.integers(10**9, 10**18))
        return f"huge:{field}", _dumps(body), True
    if how == "negative":
        body[field] = draw(st.integers(-2**63, 0))
        return f"negative:{field}", _dumps(body), True
    if how == "fraction":
        body[field] = draw(st.floats(0.01, 1e300).filter(lambda f: f != int(f)))
        return f"fraction:{field}", _dumps(body), True
    token = draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))
    body[field] = "@@"
    return f"nan:{field}", _dumps(body).replace(b'"@@"', token.encode()), True


@st.composite
def body_case(draw: st.DrawFn, endpoint: str) -> tuple[str, bytes, bool]:
    """A body wrong as a whole."""
    valid = _dumps(ENDPOINTS[endpoint][2])
    how = draw(st.sampled_from(["not-json", "invalid-utf8", "truncated", "json-not-object", "empty",
                                "deep-nesting", "random-object", "unknown-model", "unknown-fields",
                                "duplicate-keys", "utf16-bom"]))
    if how == "not-json":
        text = draw(st.text(min_size=1, max_size=60).filter(lambda t: not is_json(t)))
        return how, text.encode("utf-8", "surrogatepass"), True
    if how == "invalid-utf8":
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"]))
        return how, valid.replace(b'"hi"', b'"h' + bad + b'i"'), True
    if how == "truncated":
        cut = draw(st.integers(1, len(valid) - 1))
        return how, valid[:cut], True
    if how == "json-not-object":
        return how, _dumps(draw(json_value.filter(lambda v: not isinstance(v, dict)))), True
    if how == "empty":
        return how, b"", True
    if how == "deep-nesting":
        depth = draw(st.sampled_from([600, 2000, 100_000]))
        # orjson parses up to 1024 levels; count_tokens then estimates what it can count (nothing)
        return how, b'{"model": "chat", "messages": ' + b"[" * depth + b"]" * depth + b"}", \
            endpoint not in ("count_tokens", "input_tokens") or depth > 1024
    if how == "random-object":
        # input_tokens needs no field (it estimates an object without model or input as a few tokens)
        return how, _dumps(draw(st.dictionaries(st.text(max_size=10), json_value, max_size=6))), \
            endpoint != "input_tokens"
    if how == "unknown-model":
        body = {**ENDPOINTS[endpoint][2], "model": draw(st.text(min_size=1, max_size=40).filter(
            lambda m: m not in ("chat", "claude")))}
        return how, _dumps(body).replace(b"\\ud8", b"\\u00"), True
    if how == "unknown-fields":
        extra = draw(st.dictionaries(st.text(min_size=1, max_size=10).filter(
            lambda k: k not in CHECKED[endpoint] and k not in ENDPOINTS[endpoint][2]), json_value, min_size=1, max_size=5))
        return how, _dumps({**ENDPOINTS[endpoint][2], **extra}), False
    if how == "duplicate-keys":
        return how, valid[:-1] + b', "model": 12345}', True
    return how, "\ufeff".encode("utf-16") + valid.decode().encode("utf-16-le"), True



HEADER_CASES = {  # kind -> headers sent with a valid body; none of them is reason to refuse it
    "content-type:text-plain": {"Content-Type": "text/plain"},
    "content-type:form": {"Content-Type": "application/x-www-form-urlencoded"},
    "content-type:multipart": {"Content-Type": "multipart/form-data; boundary=xyz"},
    "content-type:garbage": {"Content-Type": ";;;==;"},
    "content-type:json-bad-charset": {"Content-Type": "application/json; charset=klingon"},
    "authorization:not-bearer": {"Authorization": "Basic Zm9vOmJhcg=="},
    "authorization:empty-bearer": {"Authorization": "Bearer "},
    "authorization:8KiB": {"Authorization": "Bearer " + "k" * 8000},
    "x-api-key:latin1": {"x-api-key": "kl\xe9\xff"},
    "anthropic-version:garbage": {"anthropic-version": "\x7f" * 3 + "not-a-date"},
    "accept:garbage": {"Accept": "*/*;q=nonsense"},
    "content-encoding:gzip-not-gzip": {"Content-Encoding": "gzip"},
    "content-encoding:unknown": {"Content-Encoding": "klingon"},
    "many-headers": {f"X-Junk-{i}": "v" for i in range(90)},
}
# Content-Encoding gzip over plain bytes cannot be decoded: that one must be refused.
HEADER_MUST_REFUSE = {"content-encoding:gzip-not-gzip"}

endpoint = st.sampled_from(sorted(ENDPOINTS))


def _send(proxy, endpoint: str, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    path = ENDPOINTS[endpoint][0]
    h = {"Content-Type": "application/json", **(headers or {})}
    return httpx.post(proxy.url + path, content=body, headers=h, timeout=30)


def _check(proxy, surface_kind: str, endpoint: str, r: httpx.Response, must_refuse: bool) -> None:
    outcome = judge("proxy", f"{endpoint}:{surface_kind}", ENDPOINTS[endpoint][1], r.status_code, r.content, must_refuse)
    assert outcome != kinds.CRASH, (surface_kind, endpoint, r.status_code, r.text[:300])


@FUZZ
@given(data=st.data(), endpoint=endpoint)
def test_one_wrong_field_gets_a_4xx_naming_it(proxy, data, endpoint):
    kind, body, must_refuse = data.draw(field_case(endpoint))
    r = _send(proxy, endpoint, body)
    _check(proxy, kind, endpoint, r, must_refuse)
    if r.status_code == 400 and ENDPOINTS[endpoint][1] == "openai" and kind.split(":")[0] != "nan":
        field = kind.split(":", 1)[1]
        if field != "max_completion_tokens" or "max_completion_tokens" in body.decode(errors="replace"):
            assert field in r.json()["error"]["message"], (kind, r.text)


@FUZZ
@given(data=st.data(), endpoint=endpoint)
def test_a_body_wrong_as_a_whole_gets_a_4xx_in_the_apis_shape(proxy, data, endpoint):
    kind, body, must_refuse = data.draw(body_case(endpoint))
    _check(proxy, kind, endpoint, _send(proxy, endpoint, body), must_refuse)


@FUZZ
@given(endpoint=endpoint, kind=st.sampled_from(sorted(HEADER_CASES)))
def test_odd_headers_get_an_answer_in_the_apis_shape(proxy, endpoint, kind):
    """Sent on a socket: httpx refuses to send some of these (a DEL in a value, a trailing space)."""
    body = json.dumps(ENDPOINTS[endpoint][2]).encode()
    head = {"Host": "x", "Content-Type": "application/json", **HEADER_CASES[kind], "Content-Length": str(len(body)),
            "Connection": "close"}
    data = (f"POST {ENDPOINTS[endpoint][0]} HTTP/1.1\r\n".encode()
            + b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in head.items()) + b"\r\n" + body)
    status, answer = _status_and_body(_raw(proxy.port, data))
    outcome = judge("proxy", f"{endpoint}:{kind}", ENDPOINTS[endpoint][1], status, answer, kind in HEADER_MUST_REFUSE)
    assert outcome != kinds.CRASH, (kind, endpoint, status, answer[:300])


def _status_and_body(answer: bytes) -> tuple[int, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.") else 0
    if b"transfer-encoding: chunked" in head.lower():
        out, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if not n:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        body = out
    return status, body


RAW_CASES = {  # kind -> (request bytes, the status wanted); sent on a socket, as no client library would
    "wrong-method": (b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    "unknown-path": (b"POST /v1/chat/completion HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", 404),
    "content-length-not-a-number": (b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
    "content-length-twice": (b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
                             400),
    "chunked-bad-size": (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
                         400),
    "header-line-17KiB": (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 17000 + b"\r\n\r\n", 431),
    "nul-in-header": (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400),
    "unknown-http-version": (b"POST /v1/messages HTTP/7.3\r\nHost: x\r\n\r\n", 400),
}


def _raw(port: int, data: bytes) -> bytes:
    """Send `data`, return the first answer (read until its length is complete or the proxy closes).
    The connection is not half-closed: aiohttp takes that for a client gone and answers nothing."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
                head, sep, body = answer.partition(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length: *(\d+)", head) if sep else None
                if (length and len(body) >= int(length[1])) or (sep and body.endswith(b"0\r\n\r\n")):
                    break
        except OSError:
            pass
        return answer


def test_requests_no_client_library_would_send_get_a_4xx_in_the_apis_shape(proxy):
    for kind, (data, want) in RAW_CASES.items():
        status, body = _status_and_body(_raw(proxy.port, data))
        shape = "anthropic" if b" /v1/messages" in data[:24] else "openai"
        outcome = judge("proxy", f"raw:{kind}", shape, status, body, must_refuse=True, upstream_involved=False)
        assert outcome == kinds.CLEAR, (kind, status, body[:300])
        if want in (404, 405):
            assert status == want and "not served" in json.loads(body)["error"]["message"], (kind, body[:300])


def test_zz_after_all_the_abuse_the_proxy_is_alive_serving_and_within_its_memory_bound(proxy):
    """Runs last in the module (name order within a file is definition order; this one is defined
    last): the process is alive, serves an ordinary request, logged no traceback, and its RSS is
    at most RSS_GROWTH_MB above what it was after its first request (about 75 MB; about 95 after)."""
    r = httpx.post(proxy.openai_url + "/chat/completions", json={"model": "chat", "messages": MSGS}, timeout=30)
    assert r.status_code == 200, r.text
    assert proxy.alive()
    rss = rss_mb(proxy.proc.pid)
    print(f"proxy RSS: {proxy.rss_at_start:.0f} MB at the start, {rss:.0f} MB after the request abuse")
    assert rss - proxy.rss_at_start < RSS_GROWTH_MB, (proxy.rss_at_start, rss)
    assert "Traceback" not in proxy.stderr(), proxy.stderr()[-3000:]

