"""Cut-off latency: from the moment the ledger finds a CutOff budget spent to the first refusal as
exhausted (429 budget_exceeded, Retry-After = the period's end) on EVERY proxy.

    ~/.cache/spendwarden/venv-dev/bin/python bench/cutoff_latency.py [--runs 5]

The set-up of tests/integration/test_ledger_exactness.py, repeated: a local control plane (etcd +
kube-apiserver, started here), the operator process with its ledger service (TokenReview auth), the
mock upstream, 8 proxy processes configured from the operator's ConfigMap, and per run a fresh
TokenBudget of 1,000,000 tokens spent by 8 x 64 concurrent clients (mostly streaming). The moment
the budget is spent is `status.ledger.exhaustedAt` (the operator's clock); a proxy's refusal time is
when the client received it (same machine, same clock). Prints every proxy's latency per run and
p50/p99 over all proxies and runs (nearest rank).
"""
from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO)]

from tests.integration.test_ledger_exactness import (  # noqa: E402
    LIMIT,
    N_PROXIES,
    STREAMS,
    build_rig,
    cutoff_latencies,
    drive,
    get_budget,
    wait_for,
)

from spendwarden.localcluster.controlplane import ControlPlane, ensure_binaries  # noqa: E402


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="budgets spent one after the other (default 5)")
    args = parser.parse_args()
    load_before = os.getloadavg()
    cp = ControlPlane(crds=[REPO / "crds"], binaries=ensure_binaries())
    cp.start()
    kube = cp.api_client()
    samples: list[float] = []
    try:
        with tempfile.TemporaryDirectory(prefix="spendwarden-cutoff-") as tmp, \
                build_rig(cp, kube, Path(tmp), runs=args.runs) as rig:
            for n in range(1, args.runs + 1):
                t0 = time.monotonic()
                res = asyncio.run(drive(rig, n))
                wait_for(lambda n=n: get_budget(kube, rig.namespace, f"b{n}")["status"]["ledger"].get("exhaustedAt"),
                         timeout=10, what=f"b{n} spent")
                lat = cutoff_latencies(rig, kube, f"b{n}", res)
                samples += lat
                print(f"run {n}: {res.ok} requests served in {time.monotonic() - t0:.1f} s; cut-off latency per proxy (s): "
                      + " ".join(f"{x:.3f}" for x in lat), flush=True)
                if len(lat) < N_PROXIES:
                    print(f"  only {len(lat)} of {N_PROXIES} proxies refused as exhausted", flush=True)
    finally:
        kube.close()
        cp.stop()
    print(f"\n{N_PROXIES} proxies x {STREAMS} clients, budget {LIMIT:,} tokens, {args.runs} runs, "
          f"{len(samples)} samples; load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    if samples:
        print(f"cut-off latency: p50 {percentile(samples, 50) * 1000:.0f} ms, p99 {percentile(samples, 99) * 1000:.0f} ms, "
              f"max {max(samples) * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
