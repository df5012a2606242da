"""`spendwarden render -f FILE...`: validate and render manifests offline, as the operator would.

Useful in a policy repo's CI: exit 1 with each object's precise error when anything is invalid.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from ..render.proxyconfig import config_json, load_manifests, render_proxy_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--filename", action="append", required=True,
                        help="YAML file or directory of TokenBudget/ModelRoute manifests (repeatable; - for stdin).")
    parser.add_argument("-n", "--namespace", default="default", help="Namespace for objects that name none.")


def _texts(names: list[str]) -> list[str]:
    texts = []
    for name in names:
        if name == "-":
            texts.append(sys.stdin.read())
            continue
        path = Path(name)
        files = sorted(list(path.rglob("*.yaml")) + list(path.rglob("*.yml"))) if path.is_dir() else [path]
        texts += [f.read_text() for f in files]
    return texts


def run(args: argparse.Namespace) -> int:
    routes, budgets = [], []
    for text in _texts(args.filename):
        r, b = load_manifests(text)
        routes += r
        budgets += b
    by_ns: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for obj in routes:
        by_ns[obj.get("metadata", {}).get("namespace") or args.namespace][0].append(obj)
    for obj in budgets:
        by_ns[obj.get("metadata", {}).get("namespace") or args.namespace][1].append(obj)
    failed = False
    out = {}
    for ns, (rs, bs) in sorted(by_ns.items()):
        result = render_proxy_config(ns, rs, bs)
        for p in result.problems:
            failed = True
            print(f"{ns}/{p.kind}/{p.name}: {p.message}", file=sys.stderr)
        out[ns] = json.loads(config_json(result.config))
    print(json.dumps(out, indent=2))
    return 1 if failed else 0
