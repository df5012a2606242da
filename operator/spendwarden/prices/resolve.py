"""Resolving a backend's prices: route pricing > pinned price > catalog, field by field.

Pure: the catalog is a lookup function handed in (prices/catalog.py's), so importing this module
imports no genai-prices.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..api.modelroute import Backend, ModelRouteSpec, Pricing, Provider
from ..ledger.pricing import Prices, format_money

PRICE_FIELDS = ("input", "output", "cachedInput", "cacheWrite", "cacheWrite1h")
REQUIRED = ("input", "output")
ROUTE = "route"
PINNED = "pinned"
DEFAULT = "default"  # derived by the proxy from the input price (ledger/pricing.py Prices.from_spec)
UNKNOWN_PRICES = "UnknownPrices"  # the Ready=False reason of a route with a backend nobody prices


@dataclass(frozen=True)
class PriceEntry:
    """Prices per 1M tokens for one provider model from a pin or the catalog: decimal strings for the
    fields it knows (a subset of PRICE_FIELDS)."""

    values: Mapping[str, str]
    currency: str = "USD"
    source: str = PINNED
    note: str | None = None


Lookup = Callable[[str, str], PriceEntry | None]  # (provider value, model) -> entry


def pin_key(provider: str, model: str) -> tuple[str, str]:
    return provider, model.lower()


@dataclass(frozen=True)
class PriceBook:
    """What prices a render may use besides the routes' own: pins by (provider, model), and the catalog
    (None: none). `key` changes whenever the prices do, so that a
    reconcile with new prices is never mistaken for one already done."""

    pins: Mapping[tuple[str, str], PriceEntry] = field(default_factory=dict)
    catalog: Lookup | None = None
    key: str = ""

    def layers(self, provider: str, model: str) -> list[PriceEntry]:
        out = []
        pin = self.pins.get(pin_key(provider, model))
        if pin is not None:
            out.append(pin)
        entry = self.catalog(provider, model) if self.catalog is not None else None
        if entry is not None:
            out.append(entry)
        return out



@dataclass(frozen=True)
class Resolved:
    pricing: Pricing  # what the proxy configuration carries (unset cache prices: the proxy's defaults)
    sources: dict[str, str]  # price field -> its source, for the fields `pricing` sets
    note: str | None = None


def route_layer(pricing: Pricing | None) -> list[PriceEntry]:
    if pricing is None:
        return []
    values = {k: getattr(pricing, k) for k in PRICE_FIELDS if getattr(pricing, k) is not None}
    return [PriceEntry(values=values, currency=pricing.currency, source=ROUTE)]


def merge(layers: list[PriceEntry]) -> tuple[dict[str, str], dict[str, str], str, list[str]]:
    """(values, sources, currency, skipped): each field from the first layer that has it. Layers in
    another currency than the first are skipped: a route's EUR output next to the catalog's USD input
    would add up two currencies."""
    values: dict[str, str] = {}
    sources: dict[str, str] = {}
    currency = layers[0].currency if layers else "USD"
    skipped = []
    for layer in layers:
        if layer.currency != currency:
            skipped.append(f"{layer.source} ({layer.currency})")
            continue
        for k in PRICE_FIELDS:
            if k not in values and k in layer.values:
                values[k] = layer.values[k]
                sources[k] = layer.source
    return values, sources, currency, skipped


def resolve_backend(backend: Backend, book: PriceBook, where: str = "backend") -> Resolved | str:
    """The backend's prices, or why it has none (a message naming the backend and how to fix it)."""
    layers = route_layer(backend.pricing) + book.layers(backend.provider.value, backend.model)
    values, sources, currency, skipped = merge(layers)
    missing = [k for k in REQUIRED if k not in values]
    if missing:
        if book.catalog is None:
            known = "no catalog in use"
        elif backend.provider is Provider.OPENAI_COMPATIBLE:
            known = "the catalog has no OpenAICompatible models"
        else:
            known = "not in the genai-prices catalog"
        extra = f"; not used, being in another currency: {', '.join(skipped)}" if skipped else ""
        return (f"{where} ({backend.name}): no {' or '.join(missing)} price for {backend.provider.value} model "
                f"{backend.model!r} ({known}{extra}); set {where}.pricing or pin the model's prices in the "
                f"operator's spendwarden-prices ConfigMap")
    notes = [layer.note for layer in layers if layer.note and any(s == layer.source for s in sources.values())]
    return Resolved(pricing=Pricing(currency=currency, **values), sources=sources, note="; ".join(notes) or None)


def effective(resolved: Resolved, provider: Provider) -> dict[str, Any]:
    """What a backend is charged, every field spelled out (the proxy's defaults too), with sources:
    ModelRoute status.backends[].pricing and `spendwarden prices`."""
    prices = Prices.from_spec(resolved.pricing, provider)
    numbers = {"input": prices.input, "output": prices.output, "cachedInput": prices.cached_input,
               "cacheWrite": prices.cache_write, "cacheWrite1h": prices.cache_write_1h}
    sources = {k: resolved.sources.get(k, DEFAULT) for k in PRICE_FIELDS}
    # In order of precedence: route, then pinned, then the catalog.
    distinct = sorted(dict.fromkeys(s for s in sources.values() if s != DEFAULT), key=lambda s: (s != ROUTE, s != PINNED))
    out: dict[str, Any] = {k: format_money(v) for k, v in numbers.items()}
    out.update(currency=prices.currency, source="+".join(distinct), sources=sources)
    if resolved.note:
        out["note"] = resolved.note
    return out


def resolve_route(spec: ModelRouteSpec, book: PriceBook) -> tuple[ModelRouteSpec, list[dict[str, Any]]] | str:
    """(the spec with every backend's pricing resolved, the effective prices per backend), or why
    some backend cannot be priced. The route is all or nothing: rules, fallbacks and tiers name
    backends, so leaving one out would break them."""
    backends, resolved, shown, errors = [], [], [], []
    for i, b in enumerate(spec.backends):
        r = resolve_backend(b, book, f"spec.backends[{i}]")
        if isinstance(r, str):
            errors.append(r)
            continue
        backends.append(b.model_copy(update={"pricing": r.pricing}))
        resolved.append(r)
        shown.append(effective(r, b.provider))
    if errors:
        return "; ".join(errors)
    currencies = sorted({r.pricing.currency for r in resolved})
    if len(currencies) > 1:
        named = ", ".join(f"{b.name} {r.pricing.currency} ({s['source']})"
                          for b, r, s in zip(backends, resolved, shown))
        return f"spec.backends: all backends must price in one currency once resolved, got {named}"
    return spec.model_copy(update={"backends": backends}), shown
