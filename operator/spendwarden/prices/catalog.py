"""List prices from the genai-prices catalog (Pydantic's maintained price data), offline.

Only the data bundled with the installed package is read: genai-prices fetches newer data from
GitHub only when its UpdatePrices is started, which nothing here does, and the snapshot used is built
from the bundled `genai_prices.data` itself, so no process-wide custom snapshot can replace it.
genai-prices is imported on the first lookup, never at import time (it costs ~0.4 s and ~20 MB), and
only in the operator and the CLI: the proxies receive resolved prices.

Mapped fields: input_mtok, output_mtok, cache_read_mtok (cachedInput), cache_write_mtok (cacheWrite,
5-minute TTL) and cache_write_1h_mtok (cacheWrite1h). Tiered (long-context) prices give their base
price, with a note naming the tiers: the proxies bill one price per field. Batch and service-tier
variants are not used (the proxies send synchronous default-tier requests).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from importlib.metadata import version as _version
from typing import Any

from ..ledger.pricing import format_money
from .resolve import PriceEntry

PROVIDERS = {"OpenAI": "openai", "Anthropic": "anthropic"}  # api.modelroute.Provider value -> genai-prices id
KEYS = {"input": ("input_mtok",), "output": ("output_mtok",), "cachedInput": ("cache_read_mtok",),
        "cacheWrite": ("cache_write_mtok", "cache_write_5m_mtok"), "cacheWrite1h": ("cache_write_1h_mtok",)}
CURRENCY = "USD"


@functools.cache
def version() -> str:
    return _version("genai-prices")


def source() -> str:
    return f"catalog:genai-prices/{version()}"


@functools.cache
def _snapshot() -> Any:
    from genai_prices.data import providers
    from genai_prices.data_snapshot import DataSnapshot

    return DataSnapshot(providers=providers, from_auto_update=False)


def _model(provider: str, model: str) -> Any:
    pid = PROVIDERS.get(provider)
    if pid is None:
        return None
    try:
        return _snapshot().find_provider_model(model, None, pid, None)[1]
    except LookupError:
        return None


def _entry(info: Any, at: datetime) -> PriceEntry | None:
    from genai_prices.types import TieredPrices

    prices = info.get_prices(at)
    values: dict[str, str] = {}
    tiers: dict[int, list[str]] = {}
    for name, keys in KEYS.items():
        price = next((p for p in (getattr(prices, k, None) for k in keys) if p is not None), None)
        if price is None:
            continue
        if isinstance(price, TieredPrices):
            for tier in price.tiers:
                tiers.setdefault(tier.start, []).append(f"{name} {format_money(Decimal(tier.price))}")
            price = price.base
        values[name] = format_money(Decimal(price))
    if "input" not in values or "output" not in values:
        return None  # not a token-priced model (images, audio by the hour, ...)
    note = "; ".join(f"the catalog prices prompts above {start} tokens higher ({', '.join(parts)}): not "
                     f"applied, the proxies bill the base prices" for start, parts in sorted(tiers.items())) or None
    return PriceEntry(values=values, currency=CURRENCY, source=source(), note=note)


def lookup(provider: str, model: str, at: datetime | None = None) -> PriceEntry | None:
    """The catalog's prices for `model` of `provider` (an api.modelroute.Provider value) in force at
    `at` (default now), or None: an OpenAICompatible backend, a model the catalog does not know, or
    one it does not price per token."""
    info = _model(provider, model)
    if info is None:
        return None
    return _entry(info, at or datetime.now(UTC))


def _time_invariant(info: Any) -> bool:
    """Whether the model's prices are the same at every time: no conditional (dated or time-of-day)
    prices. Price variants apply only with a request's context, which lookups never pass."""
    from genai_prices.types import ModelPrice

    return isinstance(info.prices, ModelPrice)


def cached_lookup(max_entries: int = 4096) -> Callable[[str, str], PriceEntry | None]:
    """`lookup` at the current time, remembered per (provider, model) where the answer cannot change
    with the time. One per PriceBook, so per pins revision: the operator renders every namespace
    with it, and a catalog lookup costs about as much as the rest of a render."""
    memo: dict[tuple[str, str], PriceEntry | None] = {}

    def lookup_now(provider: str, model: str) -> PriceEntry | None:
        key = (provider, model)
        try:
            return memo[key]
        except KeyError:
            pass
        info = _model(provider, model)
        entry = None if info is None else _entry(info, datetime.now(UTC))
        if info is None or _time_invariant(info):
            if len(memo) >= max_entries:  # model names come from users' routes: bounded
                memo.clear()
            memo[key] = entry
        return entry

    return lookup_now


def models(provider: str) -> list[str]:
    """The ids of the catalog's models of `provider`, sorted."""
    pid = PROVIDERS.get(provider)
    found = next((p for p in _snapshot().providers if p.id == pid), None)
    return sorted(m.id for m in found.models) if found is not None else []
