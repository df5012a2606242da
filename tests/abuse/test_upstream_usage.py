"""Upstream answers with usage that is negative, huge, missing, of the wrong type or inconsistent,
through the real proxy (the mock upstream's x-mock-usage-json replaces an answer's usage verbatim):
the client gets the answer, the budget is charged the reservation whenever the usage cannot be
believed, nothing is ever credited, and the proxy stays up without a traceback."""
from __future__ import annotations

import json
from decimal import Decimal

import httpx
import pytest

from . import kinds

MSGS = [{"role": "user", "content": "hi"}]
ENDPOINTS = {  # name -> (path, body, the usage object's token fields)
    "chat": ("/v1/chat/completions", {"model": "chat", "messages": MSGS, "max_tokens": 20},
             ("prompt_tokens", "completion_tokens")),
    "completions": ("/v1/completions", {"model": "chat", "prompt": "hi", "max_tokens": 20},
                    ("prompt_tokens", "completion_tokens")),
    "embeddings": ("/v1/embeddings", {"model": "chat", "input": "hi"}, ("prompt_tokens", "total_tokens")),
    "messages": ("/v1/messages", {"model": "claude", "messages": MSGS, "max_tokens": 20},
                 ("input_tokens", "output_tokens")),
}


def _cases(fields: tuple[str, str]) -> dict[str, tuple[object, bool]]:
    """kind -> (the usage JSON, must it be charged as the reservation?). Embeddings have no output:
    the proxy reads no second count there (their total_tokens is not charged)."""
    a, b = fields
    out_read = b != "total_tokens"
    return {
        "negative-input": ({a: -10**12, b: 5}, True),
        "negative-output": ({a: 5, b: -1}, out_read),
        "huge-input": ({a: 10**15, b: 5}, True),
        "huge-output": ({a: 5, b: 2**63}, out_read),
        "float-count": ({a: 5.5, b: 5}, True),
        "string-count": ({a: "12", b: 5}, True),
        "bool-count": ({a: True, b: 5}, True),
        "usage-absent": ("absent", True),
        "usage-null": (None, True),
        "usage-a-number": (-3, True),
        "usage-a-list": ([1, 2], True),
        "usage-empty-object": ({}, True),
        # believable counts that do not add up: believed (clamped), never a credit
        "total-not-the-sum": ({a: 5, b: 5, "total_tokens": 1}, False),
        "cached-above-the-prompt": ({a: 5, b: 5, "prompt_tokens_details": {"cached_tokens": 10**6},
                                     "cache_read_input_tokens": 10**6}, False),
        "unknown-fields": ({a: 5, b: 5, "reasoning_tokens": -10**9, "extra": {"x": -1}}, False),
    }


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
def test_usage_that_cannot_be_right_charges_the_reservation_and_never_credits(proxy, endpoint):
    path, body, fields = ENDPOINTS[endpoint]
    for kind, (usage, reservation) in _cases(fields).items():
        before = len(proxy.log())
        header = usage if usage == "absent" else json.dumps(usage)
        r = httpx.post(proxy.url + path, json=body, headers={"x-mock-usage-json": header}, timeout=30)
        line = proxy.log(before + 1)[-1]
        ok = r.status_code == 200 and Decimal(line.get("cost") or "0") >= 0 and \
            (line["usage_source"] == "reservation") == reservation and \
            all((line.get(k) or 0) >= 0 for k in ("input_tokens", "output_tokens"))
        kinds.record("upstream", f"{endpoint}:{kind}", kinds.HANDLED if ok else kinds.CRASH)
        assert ok, (endpoint, kind, r.status_code, r.text[:200], line)
    assert proxy.alive()


def test_zz_the_budget_holds_no_credit_and_the_proxy_logged_no_traceback(proxy):
    proxy.stop()
    used = json.loads(proxy.state_file.read_text())["budgets"]["b"]
    assert used["inputTokens"] >= 0 and used["outputTokens"] >= 0 and Decimal(used["cost"]) > 0, used
    err = proxy.stderr()
    assert "Traceback" not in err and err.count("usage that cannot be right") >= 4 * 5, err[-2000:]
