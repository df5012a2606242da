"""Per-request cost of the issue #7 hot-path cores (complexity score, cache/loop key, loop check).

    ~/.cache/spendwarden/venv-dev/bin/python bench/spend_bench.py [--repeat 2000]

Prints microseconds per call for a small request, a 20-turn ~40 KB conversation and a 1 MB prompt.
Target: the score under 1 ms for any request (it scans at most spend.scorer.SCAN_CHARS of text).
"""
from __future__ import annotations

import argparse
import os
import timeit

from spendwarden.spend import cache, loop, scorer

REQUESTS = {
    "small (84 chars)": {"model": "chat", "temperature": 0, "messages": [
        {"role": "user", "content": "Summarize the following ticket in one line: customer cannot log in since the update."}]},
    "20 turns, 40 KB": {"model": "chat", "messages": [{"role": "system", "content": "You are a helpful assistant. " * 50}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": "Some text about the code x = 1; and reasons why. " * 40}
        for i in range(20)]},
    "1 MB prompt": {"model": "chat", "messages": [{"role": "user", "content": "word " * 200_000}]},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2000)
    n = ap.parse_args().repeat
    detector = loop.LoopDetector(5, 60)
    print(f"load average {os.getloadavg()[0]:.2f}; microseconds per call, {n} calls each")
    print("| request | score | request_key | loop observe |\n|---|---|---|---|")
    for name, body in REQUESTS.items():
        reps = max(n // 10, 20) if len(str(body)) > 100_000 else n
        t_score = timeit.timeit(lambda body=body: scorer.score(body), number=reps) / reps * 1e6
        t_key = timeit.timeit(lambda body=body: cache.request_key("chat/completions", "chat", body), number=reps) / reps * 1e6
        key = cache.request_key("chat/completions", "chat", body)
        t_loop = timeit.timeit(lambda key=key: detector.observe(key), number=reps) / reps * 1e6
        print(f"| {name} | {t_score:.1f} | {t_key:.1f} | {t_loop:.1f} |")


if __name__ == "__main__":
    main()
