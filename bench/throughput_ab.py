"""Paired throughput: the bare pass-through and spendwarden, alternately, so that a shared machine's
drift hits both alike. Reuses proxy_bench.py's processes, pinning and wrk script.

    python bench/throughput_ab.py [--rounds 6] [--seconds 5]

Per round and path: wrk c=32 requests/s and the path's CPU time per request; then the median
ratio spendwarden / bare of each. Prints a markdown table; nothing is written.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy_bench as pb


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=5)
    args = ap.parse_args()
    os.sched_setaffinity(0, {int(pb.LOAD_CORE)})
    work = Path(tempfile.mkdtemp(prefix="spendwarden-ab-"))
    port = pb.free_port()
    mock = pb.Proc("mock", ["taskset", "-c", pb.LOAD_CORE, sys.executable, "-m", "spendwarden.cli", "mock-upstream",
                            "--port", str(port), "--record-limit", "1000"], work)
    mock_url = f"http://127.0.0.1:{port}"
    procs: dict[str, tuple[pb.Proc, str]] = {}
    rows: dict[str, list[tuple[float, float]]] = {"bare": [], "spendwarden": []}
    load_before = os.getloadavg()[0]
    try:
        if why := pb.wait_ready(mock, mock_url + "/v1/chat/completions", 20):
            print(why, file=sys.stderr)
            return 1
        for name in rows:
            proc, base, skip = pb.start_path(name, mock_url, work)
            if skip:
                print(f"{name}: {skip}", file=sys.stderr)
                return 1
            procs[name] = (proc, base + "/v1/chat/completions")
            pb.wrk(procs[name][1], 8, 2, work)  # warm-up
        for _ in range(args.rounds):
            for name, (proc, url) in procs.items():
                cpu0 = pb.cpu_seconds(proc.p.pid)
                r = pb.wrk(url, 32, args.seconds, work)
                rows[name].append((r["rps"], (pb.cpu_seconds(proc.p.pid) - cpu0) / max(r["requests"], 1) * 1e6))
    finally:
        for proc, _ in procs.values():
            proc.stop()
        mock.stop()
    print(f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; {args.rounds} rounds x "
          f"{args.seconds:g} s per path, c=32\n")
    print("| round | bare req/s (CPU µs/req) | spendwarden req/s (CPU µs/req) | req/s ratio |")
    print("|---|---|---|---|")
    ratios = []
    for i, ((b_rps, b_cpu), (s_rps, s_cpu)) in enumerate(zip(rows["bare"], rows["spendwarden"]), 1):
        ratios.append(s_rps / b_rps)
        print(f"| {i} | {b_rps:.0f} ({b_cpu:.0f}) | {s_rps:.0f} ({s_cpu:.0f}) | {s_rps / b_rps:.0%} |")
    b_cpu = statistics.median(c for _, c in rows["bare"])
    s_cpu = statistics.median(c for _, c in rows["spendwarden"])
    print(f"| median | ({b_cpu:.0f}) | ({s_cpu:.0f}) | {statistics.median(ratios):.0%} (CPU: {b_cpu / s_cpu:.0%}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
