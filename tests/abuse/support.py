"""What the abuse tests share: hypothesis settings, the error shapes, judging an answer."""
from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from . import kinds

# Reproducible in CI: derandomized (the examples are a function of the test's code), no example
# database, no deadline (2 loaded cores), few examples (the whole suite in a few minutes).
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])


def openai_error(doc: Any) -> bool:
    err = doc.get("error") if isinstance(doc, dict) else None
    return isinstance(err, dict) and isinstance(err.get("message"), str) and bool(err["message"]) \
        and isinstance(err.get("type"), str)


def anthropic_error(doc: Any) -> bool:
    err = doc.get("error") if isinstance(doc, dict) else None
    return isinstance(doc, dict) and doc.get("type") == "error" and isinstance(err, dict) \
        and isinstance(err.get("type"), str) and isinstance(err.get("message"), str) and bool(err["message"])


def ledger_error(doc: Any) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("error"), str) and bool(doc["error"])


SHAPES = {"openai": openai_error, "anthropic": anthropic_error, "ledger": ledger_error}


def judge(surface: str, kind: str, shape: str, status: int, body: bytes, must_refuse: bool,
          upstream_involved: bool = True) -> str:
    """Record and return the outcome of one example (kinds.CLEAR, HANDLED or CRASH):

    CLEAR    a 4xx whose body is the error shape
    HANDLED  a 2xx where refusing is not required, or (upstream involved) a 502/503/504 in the shape
    CRASH    anything else"""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    shaped = SHAPES[shape](doc)
    if 400 <= status < 500 and shaped:
        outcome = kinds.CLEAR
    elif 200 <= status < 300 and not must_refuse:
        outcome = kinds.HANDLED
    elif upstream_involved and status in (502, 503, 504) and shaped:
        outcome = kinds.HANDLED
    else:
        outcome = kinds.CRASH
    kinds.record(surface, kind, outcome)
    return outcome


json_leaf = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False) \
    | st.text(max_size=16)
# Any JSON value, small: the shapes a careless client puts where an object, a number or a string belongs.
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)


def is_json(text: str | bytes) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


class LoopThread:
    """An event loop in a thread of its own, so that sync (hypothesis) tests can drive in-process
    servers over HTTP: `call(coro)` runs a coroutine there and returns its result."""

    def __init__(self, name: str):
        import asyncio
        import threading

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def call(self, coro: Any, timeout: float = 30) -> Any:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
