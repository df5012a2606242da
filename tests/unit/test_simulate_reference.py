"""`spendwarden simulate` on the reference workload with the bench's candidates: every key figure is
derived here from the workload itself (the tokenizer, the prices, the metadata), not written down."""
from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from spendwarden.cli import main
from spendwarden.devtools import workload
from spendwarden.ledger.pricing import Prices, TokenUsage, cost
from spendwarden.simulate.replay import prompt_tokens
from spendwarden.simulate.traffic import parse_time
from spendwarden.spend import cache, scorer

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "workload"
STRONG = Prices.from_spec({"input": "2.50", "output": "10.00"})
MIN_LARGE = 30  # bench/workload/routed.yaml


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[list[dict], dict]:
    lines = workload.make()
    path = tmp_path_factory.mktemp("ref") / "reference.jsonl"
    workload.write(str(path), lines)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["simulate", "--route", str(BENCH / "all-strong.yaml"), "--route", str(BENCH / "strong-cached.yaml"),
                   "--route", str(BENCH / "routed.yaml"), "--budget", str(BENCH / "budget.yaml"),
                   "--traffic", str(path), "-o", "json"])
    assert rc == 0
    return lines, json.loads(out.getvalue())


def _cache_hits(lines: list[dict], ttl: timedelta) -> list[bool]:
    """Which requests a TTL cache without eviction answers: deterministic repeats within the TTL of
    the answer stored when the request last missed."""
    stored: dict[str, datetime] = {}
    hits = []
    for x in lines:
        body = x["body"]
        t = parse_time(body["metadata"]["ts"], "")
        key = cache.request_key("chat/completions", "chat", body) if cache.cacheable(body, None) else None
        hit = key is not None and key in stored and t - stored[key] < ttl
        if key is not None and not hit:
            stored[key] = t
        hits.append(hit)
    return hits


def test_structure_and_figures_follow_from_the_workload(reference):
    lines, out = reference
    strong, cached, routed = out["candidates"]
    assert [c["candidate"] for c in out["candidates"]] == ["all-strong", "strong-cached", "routed"]
    n = len(lines)
    for c in out["candidates"]:
        assert c["requests"] == n and c["unrouted"] == 0
        assert sum(Decimal(s["cost"]) for s in c["scenarios"].values()) == Decimal(c["cost"])
        assert sum(Decimal(d) for d in c["days"].values()) == Decimal(c["cost"])
        assert set(c["scenarios"]) == set(workload.SCENARIOS)
    # Everything on the strong backend: the tokenizer's prompt and the workload's answer lengths.
    expected = sum((cost(STRONG, TokenUsage(prompt_tokens("chat/completions", x["body"]),
                                            int(x["body"]["metadata"]["output_tokens"]))) for x in lines), Decimal(0))
    assert Decimal(strong["cost"]) == expected
    assert strong["escalations"] == strong["cacheHits"] == 0
    # The cache answers deterministic repeats within its 24 h.
    hits = _cache_hits(lines, timedelta(hours=24))
    assert cached["cacheHits"] == routed["cacheHits"] == sum(hits) > 0
    # Escalations: requests the small tier answers (score below the large tier's minimum, not from the
    # cache) whose cheap answer the workload says fails; every such cause is one the proxy checks for.
    small = [x for x, hit in zip(lines, hits) if not hit and scorer.score(x["body"]) < MIN_LARGE]
    failing = Counter(x["body"]["metadata"]["outcome"] for x in small if x["body"]["metadata"]["outcome"] != "ok")
    assert routed["escalations"] == sum(failing.values()) and routed["escalationCauses"] == dict(sorted(failing.items()))
    assert routed["escalationRate"] == round(100 * routed["escalations"] / (n - sum(hits)), 2)
    assert routed["backends"]["mini"] == len(small) - routed["escalations"]
    # The target: routing + cache (with escalation) at least 60% cheaper than all-strong.
    assert routed["savingsVsBaseline"] >= 60
    assert routed["savingsVsBaseline"] == float(round((1 - Decimal(routed["cost"]) / expected) * 100, 2))
    # The daily budget: all-strong spends more than the limit every day, routed never does.
    limit = Decimal("1.50")
    for c in (strong, routed):
        for p in c["budget"]["periods"]:
            assert (p["exhaustedAt"] is not None) == (Decimal(p["cost"]) >= limit)
    assert strong["budget"]["runsOutAt"] is not None
