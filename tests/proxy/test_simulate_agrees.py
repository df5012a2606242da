"""`spendwarden simulate` predicts what the real proxy meters: a slice of the reference workload
through the proxy process (tiers, escalation on scripted cheap-model failures, the cache) against the
mock upstream, compared with simulate on the same requests and on the proxy's own access log."""
from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import httpx
import yaml

from spendwarden.cli import main
from spendwarden.devtools import workload
from spendwarden.devtools.mock_upstream import MockUpstream
from spendwarden.devtools.workload_upstream import FaultInjector, headers_for

ROUTED = Path(__file__).resolve().parents[2] / "bench" / "workload" / "routed.yaml"


def pick(lines: list[dict], per_outcome: int = 3) -> list[dict]:
    """A slice with every failure kind (on easy and hard requests) and FAQ repeats, in time order."""
    chosen: list[dict] = []
    seen: dict[tuple[str, str], int] = {}
    for x in lines:
        meta = x["body"]["metadata"]
        kind = (meta["outcome"], meta["scenario"]) if meta["outcome"] != "ok" else ("ok", meta["scenario"])
        if seen.get(kind, 0) < (per_outcome if meta["scenario"] != "faq" else 12):
            seen[kind] = seen.get(kind, 0) + 1
            chosen.append(x)
    return chosen


def simulate_json(capsys, traffic: Path) -> dict:
    assert main(["simulate", "--route", str(ROUTED), "--traffic", str(traffic), "-o", "json"]) == 0
    return json.loads(capsys.readouterr().out)["candidates"][0]


def test_simulate_predicts_the_proxys_metered_cost(start_proxy, tmp_path: Path, capsys):
    # One day: the cache's 24 h TTL runs on the proxy's clock (seconds here) and on the workload's
    # in simulate, so they agree only while every repeat is within a day.
    lines = pick(workload.make(1000, days=1))
    outcomes = {x["body"]["metadata"]["outcome"] for x in lines}
    assert outcomes == {"ok", "length", "invalid_json", "refusal", "upstream_error"}
    doc = yaml.safe_load(ROUTED.read_text())
    cheap = {b["model"] for b in doc["spec"]["backends"] if b["name"] == "mini"}
    with MockUpstream() as mock, FaultInjector(mock, cheap) as injector:
        for b in doc["spec"]["backends"]:
            b["url"] = injector.openai_url
        proxy = start_proxy(yaml.safe_dump(doc))
        with httpx.Client(base_url=proxy.openai_url, timeout=30) as client:
            for line in lines:
                r = client.post("/chat/completions", json=line["body"], headers=headers_for(line))
                assert r.status_code == 200, r.text
        log = proxy.log(len(lines))
    assert injector.scripted > 0
    metered = sum((Decimal(x.get("cost", "0")) for x in log), Decimal(0))
    escalated = [x for x in log if "escalated" in x]
    hits = [x for x in log if x["outcome"] == "cache_hit"]
    assert escalated and hits and len(log) == len(lines)

    batch = tmp_path / "slice.jsonl"
    workload.write(str(batch), lines)
    predicted = simulate_json(capsys, batch)
    assert Decimal(predicted["cost"]) == metered
    assert predicted["escalations"] == len(escalated)
    assert predicted["escalationCauses"] == dict(sorted(
        {c: sum(1 for x in escalated if x["escalated"]["cause"] == c) for c in
         {x["escalated"]["cause"] for x in escalated}}.items()))
    assert predicted["cacheHits"] == len(hits)
    assert predicted["backends"] == {b: sum(1 for x in log if x["outcome"] != "cache_hit" and x["backend"] == b)
                                     for b in predicted["backends"]}
    # The proxy's access log, replayed: recorded usage, tiers, escalations and hits give the same cost.
    replayed = simulate_json(capsys, proxy.log_path)
    assert Decimal(replayed["cost"]) == metered and replayed["cacheHits"] == len(hits)
    assert replayed["escalations"] == len(escalated)
