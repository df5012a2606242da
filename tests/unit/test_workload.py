"""The reference workload generator: deterministic, the documented mix, consistent metadata."""
from __future__ import annotations

import json
from collections import Counter

from spendwarden.devtools import workload


def test_workload_is_deterministic_and_mixed(tmp_path):
    a, b = workload.make(400, seed=3), workload.make(400, seed=3)
    assert a == b and a != workload.make(400, seed=4)
    lines = workload.make(3000)
    mix = Counter(x["body"]["metadata"]["scenario"] for x in lines)
    for name, (share, *_rest) in workload.SCENARIOS.items():
        assert abs(mix[name] / 3000 - share) < 0.025, name
    times = [x["body"]["metadata"]["ts"] for x in lines]
    assert times == sorted(times) and times[0] >= "2026-01-05" and times[-1] < "2026-01-08"
    for x in lines:
        body, meta = x["body"], x["body"]["metadata"]
        assert x["url"] == "/v1/chat/completions" and body["model"] == workload.ALIAS
        assert all(isinstance(v, str) for v in meta.values())  # OpenAI metadata holds strings
        assert int(meta["output_tokens"]) <= body["max_tokens"]
        assert meta["outcome"] == "ok" or meta["outcome"] in workload.SCENARIOS[meta["scenario"]][4]
    path = tmp_path / "w.jsonl"
    size = workload.write(str(path), lines[:10])
    assert path.stat().st_size == size and [json.loads(s) for s in path.read_text().splitlines()] == lines[:10]
