"""`spendwarden report [-n NS | -A] [--period current|previous|all] [-o table|json|csv]`: cost and
tokens per namespace, budget, route, backend and tag, read from TokenBudget status."""
from __future__ import annotations

import argparse
import json

from ..render.report import PERIODS, report_rows, table, to_csv
from .status import add_scope_arguments, list_budgets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_scope_arguments(parser, outputs=["table", "json", "csv"])
    parser.add_argument("--period", choices=PERIODS, default="current",
                        help="The current period, the last finished one, or every period kept (current + history).")


def run(args: argparse.Namespace) -> int:
    items = list_budgets(args, "report")
    if isinstance(items, int):
        return items
    rows = report_rows(items, args.period)
    if args.output == "json":
        print(json.dumps(rows, indent=2))
    elif args.output == "csv":
        print(to_csv(rows), end="")
    else:
        print(table(rows, show_namespace=args.all_namespaces))
    return 0
