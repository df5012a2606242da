"""The mock upstream's OpenAI Responses API (mock_upstream.py serves it), imitating what OpenAI
documents:

    POST   /v1/responses                  a response object, or with stream: true the events
                                          response.created, response.in_progress, (a reasoning model:
                                          response.output_item.added/.done of a reasoning item),
                                          response.output_item.added, response.content_part.added,
                                          response.output_text.delta..., response.output_text.done,
                                          response.content_part.done, response.output_item.done and
                                          response.completed (response.incomplete when
                                          max_output_tokens was hit), each as `event:` + `data:`
    GET    /v1/responses/{id}             the stored response (404 unknown)
    DELETE /v1/responses/{id}             {"id", "object": "response", "deleted": true}
    GET    /v1/responses/{id}/input_items the request's input items, as a list page
    POST   /v1/responses/{id}/cancel      the response, status "cancelled"
    POST   /v1/responses/input_tokens     {"object": "response.input_tokens", "input_tokens": n}

Usage: input_tokens as mock_upstream's chat count, with `instructions` one more message and a
string `input` one user message; a previous_response_id adds what that response was billed for
(its input and output tokens: the provider bills the earlier conversation as prompt again).
output_tokens = reasoning + visible tokens, bounded by max_output_tokens (behaviour
`reasoning_tokens`), reported with input_tokens_details.cached_tokens and
output_tokens_details.reasoning_tokens. Behaviours (status, latency, disconnect_after, garbage,
prompt/completion/cached tokens) apply as to chat.
"""
from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from .mock_text import _JSON, _dumps, _text, _with_usage, _word_piece, chat_prompt_tokens


def _messages(inp: Any) -> list[dict[str, Any]]:
    """The input as chat-like messages, for the documented count."""
    if isinstance(inp, str):
        return [{"role": "user", "content": inp}]
    out = []
    for item in inp if isinstance(inp, list) else ():
        if isinstance(item, dict):
            content = item.get("content", item.get("output", item.get("arguments")))
            out.append({"role": item.get("role", "user"), "content": content})
    return out


def _items(inp: Any, rid: str) -> list[dict[str, Any]]:
    """The input items as GET .../input_items lists them (with ids)."""
    out = []
    for i, m in enumerate(_messages(inp)):
        content = m["content"]
        parts = [{"type": "input_text", "text": content}] if isinstance(content, str) else (content or [])
        out.append({"id": f"msg_in{rid}_{i}", "type": "message", "role": m["role"], "status": "completed",
                    "content": parts})
    return out


def _event(kind: str, seq: int, **fields: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + _dumps({"type": kind, "sequence_number": seq, **fields}) + b"\n\n"


class ResponsesMock:
    """The handlers; `h` is mock_upstream's _Handlers (its behaviours, records, billing and stream
    writer), which this module cannot import: mock_upstream serves these routes."""

    def __init__(self, h: Any):
        self.h = h

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/responses", self.create), web.post("/v1/responses/input_tokens", self.input_tokens),
                web.get("/v1/responses/{id}", self.retrieve), web.delete("/v1/responses/{id}", self.delete),
                web.get("/v1/responses/{id}/input_items", self.input_items),
                web.post("/v1/responses/{id}/cancel", self.cancel)]

    def prompt(self, req: dict[str, Any]) -> int:
        p = chat_prompt_tokens(_messages(req.get("input")), req.get("instructions"))
        prev = self.h.s.stored.get(req.get("previous_response_id") or "")
        if prev is not None:
            u = prev["response"]["usage"]
            p += u["input_tokens"] + u["output_tokens"]
        return p

    async def create(self, request: web.Request) -> web.StreamResponse:
        h = self.h
        if isinstance(opened := await h.opening(request, "openai"), web.StreamResponse):
            return opened
        req, b = opened
        model = req.get("model")
        prev = req.get("previous_response_id")
        if prev is not None and prev not in h.s.stored:
            h.record(request, "openai", req, b, 400, None, True)
            return web.Response(status=400, content_type=_JSON, body=_dumps({"error": {
                "message": f"Previous response with id '{prev}' not found.", "type": "invalid_request_error",
                "param": "previous_response_id", "code": "previous_response_not_found"}}))
        p, n, c, hit, reasoning = h.reasoning_counts(b, req.get("max_output_tokens"), self.prompt(req))
        cached = min(b.cached_tokens or 0, p)
        usage = {"input_tokens": p, "input_tokens_details": {"cached_tokens": cached}, "output_tokens": c,
                 "output_tokens_details": {"reasoning_tokens": reasoning}, "total_tokens": p + c}
        rec = {"prompt_tokens": p, "completion_tokens": c, "cached_tokens": cached, "reasoning_tokens": reasoning}
        if not b.garbage:
            h.bill(rec)
        h.s.rid += 1
        rid = f"resp_mock{h.s.rid}"
        text = b.content if b.content is not None else _text(n)
        reasoning_item: dict[str, Any] = {"id": f"rs_mock{h.s.rid}", "type": "reasoning", "summary": []}
        message: dict[str, Any] = {"id": f"msg_mock{h.s.rid}", "type": "message", "status": "incomplete" if hit else "completed",
                   "role": "assistant", "content": [{"type": "output_text", "text": text, "annotations": []}]}
        final = {"id": rid, "object": "response", "created_at": int(time.time()),
                 "status": "incomplete" if hit else "completed", "error": None,
                 "incomplete_details": {"reason": "max_output_tokens"} if hit else None,
                 "instructions": req.get("instructions"), "max_output_tokens": req.get("max_output_tokens"),
                 "model": model, "output": ([reasoning_item] if reasoning else []) + [message],
                 "parallel_tool_calls": True, "previous_response_id": prev, "temperature": 1.0, "top_p": 1.0,
                 "tool_choice": "auto", "tools": req.get("tools") or [], "truncation": "disabled",
                 "text": {"format": {"type": "text"}}, "store": True, "metadata": {}, "usage": usage}
        if not b.garbage:
            h.s.stored[rid] = {"response": final, "input_items": _items(req.get("input"), str(h.s.rid))}
        if not req.get("stream"):
            if b.garbage:
                h.record(request, "openai", req, b, 200, None, True)
                return web.Response(body=b"<html>upstream exploded</html>", content_type=_JSON)
            body = _dumps(_with_usage(dict(final), b))
            if b.disconnect_after is not None:
                h.record(request, "openai", req, b, 200, None, False)
                return await h.disconnect_midway(request, body)
            h.record(request, "openai", req, b, 200, rec, True)
            return await h.answer(request, body, b)
        if b.garbage:
            return await h._stream(request, "openai", req, b, [b"event: response.created\ndata: {not json\n\n"], None)
        pieces = [text] if b.content is not None else [_word_piece(i) for i in range(n)]
        return await h._stream(request, "openai", req, b,
                               self.events(final, pieces, reasoning_item if reasoning else None), rec)

    @staticmethod
    def events(final: dict[str, Any], pieces: list[str], reasoning_item: dict[str, Any] | None) -> list[bytes]:
        start = {**final, "status": "in_progress", "output": [], "usage": None, "incomplete_details": None}
        msg = final["output"][-1]
        seq = iter(range(10**9))
        ev = [_event("response.created", next(seq), response=start),
              _event("response.in_progress", next(seq), response=start)]
        index = 0
        if reasoning_item is not None:
            ev.append(_event("response.output_item.added", next(seq), output_index=0, item=reasoning_item))
            ev.append(_event("response.output_item.done", next(seq), output_index=0, item=reasoning_item))
            index = 1
        ids = {"item_id": msg["id"], "output_index": index}
        ev.append(_event("response.output_item.added", next(seq), output_index=index,
                         item={**msg, "status": "in_progress", "content": []}))
        ev.append(_event("response.content_part.added", next(seq), **ids, content_index=0,
                         part={"type": "output_text", "text": "", "annotations": []}))
        text = "".join(pieces)
        for piece in pieces:
            ev.append(_event("response.output_text.delta", next(seq), **ids, content_index=0, delta=piece, logprobs=[]))
        ev.append(_event("response.output_text.done", next(seq), **ids, content_index=0, text=text, logprobs=[]))
        ev.append(_event("response.content_part.done", next(seq), **ids, content_index=0, part=msg["content"][0]))
        ev.append(_event("response.output_item.done", next(seq), output_index=index, item=msg))
        ev.append(_event("response." + ("incomplete" if final["status"] == "incomplete" else "completed"),
                         next(seq), response=final))
        return ev

    def _stored(self, request: web.Request) -> dict[str, Any] | web.Response:
        got = self.h.s.stored.get(request.match_info["id"])
        if got is None:
            return web.Response(status=404, content_type=_JSON, body=_dumps({"error": {
                "message": f"Response with id '{request.match_info['id']}' not found.",
                "type": "invalid_request_error", "param": None, "code": None}}))
        return got

    async def retrieve(self, request: web.Request) -> web.Response:
        got = self._stored(request)
        return got if isinstance(got, web.Response) else web.Response(body=_dumps(got["response"]), content_type=_JSON)

    async def delete(self, request: web.Request) -> web.Response:
        got = self._stored(request)
        if isinstance(got, web.Response):
            return got
        del self.h.s.stored[request.match_info["id"]]
        return web.Response(content_type=_JSON, body=_dumps(
            {"id": request.match_info["id"], "object": "response", "deleted": True}))

    async def input_items(self, request: web.Request) -> web.Response:
        got = self._stored(request)
        if isinstance(got, web.Response):
            return got
        items = got["input_items"]
        return web.Response(content_type=_JSON, body=_dumps({
            "object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": False}))

    async def cancel(self, request: web.Request) -> web.Response:
        got = self._stored(request)
        if isinstance(got, web.Response):
            return got
        got["response"] = {**got["response"], "status": "cancelled"}
        return web.Response(body=_dumps(got["response"]), content_type=_JSON)

    async def input_tokens(self, request: web.Request) -> web.Response:
        req = await self.h.parse(request)
        if isinstance(req, web.Response):
            return req
        return web.Response(content_type=_JSON, body=_dumps(
            {"object": "response.input_tokens", "input_tokens": self.prompt(req)}))
