"""`spendwarden crds`: write crds/*.yaml (and the Helm chart's copy) from the models."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..api.crdgen import all_crds, render_yaml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", action="append", default=None,
                        help="Directory to write into (repeatable). Default: crds/ (and charts/spendwarden/crds/ if present).")
    parser.add_argument("--check", action="store_true", help="Do not write; exit 1 if any file is stale.")
    parser.add_argument("--no-cel", action="store_true",
                        help="Leave out the CEL validation rules (x-kubernetes-validations), for Kubernetes before "
                             "1.23, which refuses them; needs --out (crds/ keeps the rules).")


def default_dirs() -> list[Path]:
    root = Path.cwd()
    dirs = [root / "crds"]
    chart = root / "charts" / "spendwarden" / "crds"
    if chart.parent.is_dir():
        dirs.append(chart)
    return dirs


def run(args: argparse.Namespace) -> int:
    if args.no_cel and not args.out:
        print("--no-cel needs --out: crds/ and the chart's copy keep the CEL rules", file=sys.stderr)
        return 2
    dirs = [Path(d) for d in args.out] if args.out else default_dirs()
    stale = []
    for directory in dirs:
        for filename, manifest in all_crds(cel=not args.no_cel).items():
            path = directory / filename
            text = render_yaml(manifest)
            if args.check:
                if not path.exists() or path.read_text() != text:
                    stale.append(str(path))
                continue
            directory.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print("stale (run `spendwarden crds`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0
