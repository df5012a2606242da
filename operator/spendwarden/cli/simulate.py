"""`spendwarden simulate`: what candidate ModelRoutes would have cost on recorded traffic, offline.

    spendwarden simulate --route cheap-first.yaml --route all-strong.yaml --budget budget.yaml \\
        --traffic access.log [--plot cost.svg] [-o table|json]

Each --route file is one candidate (the first is the baseline the others are compared with). The
traffic is the proxy's JSON access log or batch JSONL (see simulate/traffic.py); the replay uses
the proxy's tokenizer, scorer, escalation checks and cache key (see simulate/replay.py), and
documented assumptions where the log is silent (simulate/outcomes.py). Exit 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime

from ..simulate.outcomes import DEFAULT_OUTPUT_TOKENS, FailureModel


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--route", action="append", required=True, metavar="FILE",
                        help="A candidate: a file of ModelRoute manifests (repeatable; the first is the baseline).")
    parser.add_argument("--budget", metavar="FILE", help="A TokenBudget manifest: when would it run out?")
    parser.add_argument("--traffic", required=True, metavar="FILE",
                        help="The proxy's JSON access log, or OpenAI/Anthropic batch JSONL.")
    parser.add_argument("--prices", metavar="FILE",
                        help="Pinned prices (the operator's spendwarden-prices file) over the catalog, as the "
                             "operator resolves them; default: the routes' pricing, then the genai-prices catalog.")
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table", help="Output format.")
    parser.add_argument("--plot", metavar="FILE", help="Draw cost over time per candidate (.svg, or .png with matplotlib).")
    parser.add_argument("--start", metavar="TIME",
                        help="Time of the first request without one (RFC 3339); default: today 00:00 UTC.")
    parser.add_argument("--per-day", type=int, metavar="N",
                        help="Requests without a time arrive evenly at N a day (default: all of them in one day).")
    parser.add_argument("--output-tokens", type=int, default=DEFAULT_OUTPUT_TOKENS, metavar="N",
                        help=f"Answer length assumed where the log has none (default {DEFAULT_OUTPUT_TOKENS}).")
    parser.add_argument("--seed", type=int, default=0,
                        help="Seed of the failure model for cheap-tier answers the log did not record (default 0).")


def _fail(message: str) -> int:
    print(f"spendwarden simulate: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from ..simulate import simulate, summarize_all
    from ..simulate.budget import currency_problem
    from ..simulate.candidates import CandidateError, load_budget, load_candidates
    from ..simulate.plot import PlotError, plot
    from ..simulate.replay import Settings
    from ..simulate.report import cumulative, table
    from ..simulate.traffic import TrafficError, parse_time, read_traffic
    from .prices import PinsError, pinned_book

    if args.per_day is not None and args.per_day < 1:
        return _fail("--per-day must be at least 1")
    if args.output_tokens < 0:
        return _fail("--output-tokens must not be negative")
    try:
        start = parse_time(args.start, "--start") if args.start else \
            datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        candidates = load_candidates(args.route, pinned_book(args.prices))
        budget = load_budget(args.budget) if args.budget else None
        requests = read_traffic(args.traffic)
    except (CandidateError, TrafficError, PinsError) as exc:
        return _fail(str(exc))
    assert start is not None
    if budget is not None:
        for c in candidates:
            for spec in c.routes.values():
                problem = currency_problem(budget, spec.backends[0].currency)  # resolved: its pricing
                if problem:
                    return _fail(f"{c.path}: {problem}")
    if not requests:
        return _fail(f"{args.traffic}: no requests in the log")
    settings = Settings(output_tokens=args.output_tokens, failures=FailureModel(seed=args.seed))
    runs = simulate(requests, candidates, start, args.per_day, settings)
    summary = summarize_all(runs, budget)
    if args.plot:
        currency = next((c["currency"] for c in summary["candidates"] if c["currency"]), "")
        try:
            plot(args.plot, {r.candidate.name: cumulative(r.results) for r in runs}, currency)
        except PlotError as exc:
            return _fail(str(exc))
        except OSError as exc:
            return _fail(f"cannot write {args.plot}: {exc.strerror or exc}")
    if args.output == "json":
        print(json.dumps(summary, indent=2))
    else:
        sys.stdout.write(table(summary))
    return 0
