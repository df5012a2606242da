"""`spendwarden prices`: what a backend would be charged, per 1M tokens, and where the prices come from.

    spendwarden prices                         every catalog model of OpenAI and Anthropic (and pins)
    spendwarden prices gpt-4.1 [--provider OpenAI] [--prices pinned.yaml] [-o json]

The prices are resolved as the operator resolves a backend without `pricing`: the pinned prices
(--prices: the file the operator reads, SPENDWARDEN_PRICES_FILE) over the genai-prices catalog,
field by field; cache prices the catalog leaves out are the proxy's defaults. Exit 1 when MODEL has
no prices, 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

PROVIDER_NAMES = ("OpenAI", "Anthropic", "OpenAICompatible")
COLUMNS = (("PROVIDER", "provider"), ("MODEL", "model"), ("INPUT", "input"), ("OUTPUT", "output"),
           ("CACHED-INPUT", "cachedInput"), ("CACHE-WRITE", "cacheWrite"), ("CACHE-WRITE-1H", "cacheWrite1h"),
           ("CURRENCY", "currency"), ("SOURCE", "source"))


class PinsError(Exception):
    pass


def pinned_book(path: str | None) -> Any:
    """The PriceBook of the pins in `path` over the catalog (the catalog alone without a path).
    Bad entries are warned about on stderr and left out, as the operator does."""
    from ..prices import pins

    if path is None:
        return pins.current()
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise PinsError(f"cannot read {path}: {exc.strerror or exc}") from None
    found, warnings = pins.parse_pins(text, path)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    return pins.book_for(found)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", metavar="MODEL", help="A backend's model, e.g. gpt-4.1; default: every one known.")
    parser.add_argument("--provider", choices=PROVIDER_NAMES, help="Only this provider (a backend's provider field).")
    parser.add_argument("--prices", metavar="FILE", help="Pinned prices, as in the operator's spendwarden-prices ConfigMap.")
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table", help="Output format.")


def price_rows(model: str | None, provider: str | None, book: Any) -> list[dict[str, Any]]:
    """One row per (provider, model) with prices: `model` under each provider (or `provider`), or
    every catalog and pinned model."""
    from ..api.modelroute import Backend
    from ..prices import catalog
    from ..prices.resolve import effective, resolve_backend

    providers = [provider] if provider else list(PROVIDER_NAMES)
    if model is not None:
        wanted = [(p, model) for p in providers]
    else:
        wanted = [(p, m) for p in providers for m in catalog.models(p)]
        wanted += sorted((p, m) for p, m in book.pins if p in providers and (p, m) not in wanted)
    rows = []
    for p, m in wanted:
        backend = Backend.model_validate({"name": "b", "provider": p, "url": "http://prices.invalid", "model": m})
        resolved = resolve_backend(backend, book)
        if not isinstance(resolved, str):
            rows.append({"provider": p, "model": m, **effective(resolved, backend.provider)})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    cells = [[h for h, _ in COLUMNS]] + [[str(r[k]) for _, k in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    notes = [f"{r['provider']} {r['model']}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def run(args: argparse.Namespace) -> int:
    try:
        book = pinned_book(args.prices)
    except PinsError as exc:
        print(f"spendwarden prices: {exc}", file=sys.stderr)
        return 2
    rows = price_rows(args.model, args.provider, book)
    if not rows and args.model is not None:
        where = args.provider or "OpenAI, Anthropic or OpenAICompatible"
        print(f"spendwarden prices: no prices for {args.model!r} ({where}): not in the genai-prices catalog and "
              f"not pinned; a backend serving it needs spec.backends[].pricing", file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps(rows, indent=2))
    else:
        sys.stdout.write(table(rows))
    return 0
