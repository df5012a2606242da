"""Savings bench (issue #7): what complexity routing, escalation and the response cache save on the
reference workload, and whether `spendwarden simulate` agrees with what the real proxy meters.

    ~/.cache/spendwarden/venv-dev/bin/python bench/savings_bench.py [--requests 3000] [--seed 7]
        [--proxy-day 1 | --no-proxy]

1. Writes the reference workload (spendwarden/devtools/workload.py) to bench/results/reference.jsonl.
2. Simulates it (offline, in-process: the same code as `spendwarden simulate`) against
   bench/workload/all-strong.yaml (baseline), strong-cached.yaml, routed.yaml and two variants of
   routed.yaml with the large tier from score 25 and 35, and prints the savings table.
3. Unless --no-proxy: sends one day of the workload, one request at a time, through the REAL proxy
   (`spendwarden proxy`, routed.yaml pointed at the mock upstream) and compares the proxy's metered
   cost (the sum of its access log's `cost`), escalations, cache hits and backends with what simulate
   predicts for the same requests. The mock answers as the workload says, through the fault
   injector of spendwarden/devtools/workload_upstream.py: the prompt tokens of the proxy's
   tokenizer, the workload's answer length, and the failure the workload records for the cheap
   model (length, invalid JSON, refusal, HTTP 500); the strong model always answers well.
   One day keeps every cache repeat within routed.yaml's 24 h TTL, which the proxy measures on its
   own clock (the run takes seconds) and simulate on the workload's.

Prints markdown tables; the JSON result goes to bench/results/savings-<time>.json (gitignored).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))

from spendwarden.devtools import workload  # noqa: E402
from spendwarden.devtools.mock_upstream import MockUpstream, free_port  # noqa: E402
from spendwarden.devtools.workload_upstream import FaultInjector, headers_for  # noqa: E402
from spendwarden.simulate import simulate, summarize_all  # noqa: E402
from spendwarden.simulate.candidates import Candidate, load_candidate  # noqa: E402
from spendwarden.simulate.traffic import read_lines, read_traffic  # noqa: E402

WORK = ROOT / "bench" / "workload"
RESULTS = ROOT / "bench" / "results"


def variant(path: Path, name: str, min_score: int) -> Candidate:
    """routed.yaml with the large tier from another score."""
    doc = yaml.safe_load(path.read_text())
    doc["metadata"]["name"] = name
    doc["spec"]["tiers"][1]["minScore"] = min_score
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(doc, f)
    try:
        return load_candidate(f.name)
    finally:
        os.unlink(f.name)


def simulate_file(path: Path, candidates: list[Candidate]) -> dict[str, Any]:
    reqs = read_traffic(str(path))
    return summarize_all(simulate(reqs, candidates, datetime.now(UTC)), None)


def savings_table(summary: dict[str, Any]) -> str:
    rows = ["| candidate | cost (USD) | per request | vs all-strong | escalation rate (causes) | cache hit rate "
            "| answered by |", "|---|---|---|---|---|---|---|"]
    for c in summary["candidates"]:
        vs = "baseline" if c["savingsVsBaseline"] is None else f"**{c['savingsVsBaseline']:.1f}% cheaper**"
        causes = ", ".join(f"{k} {v}" for k, v in c["escalationCauses"].items())
        rows.append(f"| {c['candidate']} | {Decimal(c['cost']):.4f} | {Decimal(c['costPerRequest']):.6f} | {vs} | "
                    f"{c['escalationRate']}% ({c['escalations']}{': ' + causes if causes else ''}) | "
                    f"{c['cacheHitRate']}% ({c['cacheHits']}) | "
                    f"{', '.join(f'{k} {v}' for k, v in c['backends'].items())} |")
    return "\n".join(rows)


# -- the real proxy ------------------------------------------------------------------------------

def through_proxy(lines: list[dict[str, Any]], workdir: Path) -> tuple[list[dict[str, Any]], float]:
    """Send `lines` one by one through a real proxy; returns its access log and the wall time."""
    doc = yaml.safe_load((WORK / "routed.yaml").read_text())
    cheap = {b["model"] for b in doc["spec"]["backends"] if b["name"] == "mini"}
    with MockUpstream() as mock, FaultInjector(mock, cheap) as injector:
        for b in doc["spec"]["backends"]:
            b["url"] = injector.openai_url
        config = workdir / "routed.yaml"
        config.write_text(yaml.safe_dump(doc))
        port, metrics = free_port(), free_port()
        log_path, err_path = workdir / "access.log", workdir / "proxy.err"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "operator")}
        proc = subprocess.Popen([sys.executable, "-m", "spendwarden.cli", "proxy", "--config", str(config),
                                 "--port", str(port), "--metrics-port", str(metrics), "--metrics-host", "127.0.0.1"],
                                stdout=open(log_path, "wb"), stderr=open(err_path, "wb"), env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.time() + 30
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the proxy exited: {err_path.read_text()}")
                try:
                    if httpx.get(url + "/healthz", timeout=0.5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline:
                    raise RuntimeError(f"the proxy did not start: {err_path.read_text()}")
                time.sleep(0.05)
            t0 = time.perf_counter()
            with httpx.Client(base_url=url + "/v1", timeout=30) as client:
                for line in lines:
                    r = client.post("/chat/completions", json=line["body"], headers=headers_for(line))
                    if r.status_code != 200:
                        raise RuntimeError(f"{line['custom_id']}: {r.status_code} {r.text[:300]}")
            wall = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(15)
    log = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
    return log, wall


def metered(log: list[dict[str, Any]]) -> dict[str, Any]:
    served = [x for x in log if x.get("outcome") != "cache_hit"]
    backends: dict[str, int] = {}
    for x in served:
        backends[x["backend"]] = backends.get(x["backend"], 0) + 1
    causes: dict[str, int] = {}
    for x in log:
        if isinstance(x.get("escalated"), dict):
            causes[x["escalated"]["cause"]] = causes.get(x["escalated"]["cause"], 0) + 1
    return {"requests": len(log), "cost": sum((Decimal(x.get("cost", "0")) for x in log), Decimal(0)),
            "escalations": sum(causes.values()), "escalationCauses": dict(sorted(causes.items())),
            "cacheHits": len(log) - len(served), "backends": dict(sorted(backends.items()))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--proxy-day", type=int, default=1, help="Which day of the workload goes through the proxy.")
    p.add_argument("--no-proxy", action="store_true", help="Only simulate.")
    args = p.parse_args()
    RESULTS.mkdir(exist_ok=True)
    lines = workload.make(args.requests, args.seed)
    ref = RESULTS / "reference.jsonl"
    size = workload.write(str(ref), lines)
    print(f"workload: {len(lines)} requests, {size} bytes -> {ref.relative_to(ROOT)}", file=sys.stderr)

    routed = WORK / "routed.yaml"
    candidates = [load_candidate(str(WORK / "all-strong.yaml")), load_candidate(str(WORK / "strong-cached.yaml")),
                  load_candidate(str(routed)), variant(routed, "routed-25", 25), variant(routed, "routed-35", 35)]
    t0 = time.perf_counter()
    summary = simulate_file(ref, candidates)
    sim_time = time.perf_counter() - t0
    print(f"\n## Simulated: {len(lines)} requests, {len(candidates)} candidates ({sim_time:.1f} s)\n")
    print(savings_table(summary))
    result: dict[str, Any] = {"requests": len(lines), "seed": args.seed, "simulated": summary,
                              "simulateSeconds": round(sim_time, 2)}

    if not args.no_proxy:
        day = workload.START + timedelta(days=args.proxy_day - 1)
        start, end = day.strftime("%Y-%m-%d"), (day + timedelta(days=1)).strftime("%Y-%m-%d")
        subset = [x for x in lines if start <= x["body"]["metadata"]["ts"] < end]
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            log, wall = through_proxy(subset, work)
            sub_path = work / "day.jsonl"
            workload.write(str(sub_path), subset)
            predicted = simulate_file(sub_path, [load_candidate(str(routed))])["candidates"][0]
            # The proxy's own access log replayed against the same route: recorded usage in, same cost out.
            replayed = summarize_all(simulate(read_lines((work / "access.log").read_text().splitlines()),
                                              [load_candidate(str(routed))], datetime.now(UTC)),
                                     None)["candidates"][0]
        m = metered(log)
        rows = [("requests", len(subset), m["requests"], replayed["requests"]),
                ("cost (USD)", predicted["cost"], str(m["cost"]), replayed["cost"]),
                ("escalations", f"{predicted['escalations']} {predicted['escalationCauses']}",
                 f"{m['escalations']} {m['escalationCauses']}", f"{replayed['escalations']}"),
                ("cache hits", predicted["cacheHits"], m["cacheHits"], replayed["cacheHits"]),
                ("answered by", predicted["backends"], m["backends"], replayed["backends"])]
        print(f"\n## Day {args.proxy_day} ({start}) through the real proxy: {len(subset)} requests in {wall:.1f} s\n")
        print("| | simulate (workload) | proxy metered (access log) | simulate (proxy's access log) |")
        print("|---|---|---|---|")
        for label, a, b, c in rows:
            print(f"| {label} | {a} | {b} | {c} |")
        diff = Decimal(predicted["cost"]) - m["cost"]
        print(f"\nsimulate - metered = {diff} USD ({float(diff / m['cost'] * 100) if m['cost'] else 0:.4f}%)")
        result["proxy"] = {"day": start, "requests": len(subset), "seconds": round(wall, 2),
                           "simulated": predicted, "metered": {**m, "cost": str(m["cost"])},
                           "replayedAccessLog": replayed, "difference": str(diff)}
    out = RESULTS / f"savings-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"\nresult: {out.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
