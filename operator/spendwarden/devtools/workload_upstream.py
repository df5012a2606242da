"""Serving the reference workload as it says: the mock upstream behind a tiny fault injector.

The proxy under test talks to the injector, which forwards to the mock upstream. A client sends each
workload request with `headers_for(line)`: the mock reports the prompt tokens of the proxy's own
tokenizer (as a provider bills its own count) and the workload's answer length, and when the
request reaches a cheap model whose answer the workload says fails, the injector first scripts that
failure into the mock: `length` (cut off at max_tokens), `invalid_json` (non-JSON text), `refusal`
(`message.refusal`), `upstream_error` (HTTP 500). Good answers to JSON requests are scripted as JSON
(the mock's own text is not). Requests must go one at a time: a script is consumed by the next
request the mock receives. Used by bench/savings_bench.py and tests/proxy/test_simulate_agrees.py.
"""
from __future__ import annotations

import json
from typing import Any

from .background import BackgroundServer
from .mock_upstream import MockUpstream, free_port

OUTCOME_HEADER = "x-workload-outcome"
FAILURES: dict[str, dict[str, Any]] = {
    "length": {"tokens": 1_000_000},  # capped at max_tokens: finish_reason "length"
    "invalid_json": {"content": "Sure! Here is the data: {name: x"},
    "refusal": {"refusal": "I'm sorry, but I can't help with that."},
    "upstream_error": {"status": 500},
}


def headers_for(line: dict[str, Any]) -> dict[str, str]:
    """The headers that make the mock answer a workload line (OpenAI batch) as the workload says."""
    from ..simulate.replay import prompt_tokens
    from ..simulate.traffic import url_api

    body = line["body"]
    meta = body["metadata"]
    # An url no API serves: "" counts the body's input as None did (embeddings), the workload's lines have none.
    return {"x-mock-prompt-tokens": str(prompt_tokens(url_api(line["url"]) or "", body)),
            "x-mock-tokens": meta["output_tokens"], OUTCOME_HEADER: meta.get("outcome", "ok"),
            "x-spendwarden-tags": f"scenario={meta['scenario']}"}


class FaultInjector:
    """A pass-through to `mock` on a free port that scripts the workload's failures for requests to
    `cheap_models`. Serves from its own thread and loop, like MockUpstream."""

    def __init__(self, mock: MockUpstream, cheap_models: set[str]):
        self.mock, self.cheap_models = mock, cheap_models
        self.port = 0
        self.scripted = 0
        self._server = BackgroundServer("fault-injector")

    @property
    def openai_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        from ..simulate.outcomes import REFUSAL_TOKENS
        from ..spend.escalation import wants_json

        raw = await request.read()
        body = json.loads(raw)
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("host", "content-length", OUTCOME_HEADER)}
        outcome = request.headers.get(OUTCOME_HEADER, "ok")
        if body.get("model") not in self.cheap_models:
            outcome = "ok"
        if (outcome != "ok" or wants_json(body)) and "x-mock-tokens" in headers:
            # x-mock-* headers would override a script: their values move into it.
            answer = int(headers.pop("x-mock-tokens"))
            behaviour: dict[str, Any] = {"prompt_tokens": int(headers.pop("x-mock-prompt-tokens")), "tokens": answer}
            if outcome == "ok":
                behaviour["content"] = '{"answer": "ok"}'
            else:
                behaviour.update(FAILURES[outcome])
                if outcome == "refusal":
                    behaviour["tokens"] = min(REFUSAL_TOKENS, answer)  # billed as simulate assumes
            self.mock.script(behaviour)
            self.scripted += 1
        async with self._session.post(f"{self.mock.url}{request.path}", data=raw, headers=headers) as up:
            return web.Response(status=up.status, body=await up.read(), content_type=up.content_type)

    def start(self) -> FaultInjector:
        async def make_app() -> Any:
            import aiohttp
            from aiohttp import web

            self._session = aiohttp.ClientSession()
            app = web.Application()
            app.router.add_post("/{tail:.*}", self._handle)
            return app

        async def close() -> None:
            await self._session.close()

        self.port = free_port()
        self._server.start(make_app, self.port, close)
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> FaultInjector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
