"""Cluster-wide pinned prices: the platform team's negotiated prices for every namespace.

The Helm chart renders `prices.pinned` into the ConfigMap spendwarden-prices in the operator's
namespace and mounts it as a file; SPENDWARDEN_PRICES_FILE names it. The file is YAML (or JSON):

    pinned:
      - {provider: OpenAI, model: gpt-4.1, input: "1.60", output: "6.40"}
      - {provider: OpenAICompatible, model: llama-3.1-8b-instruct, input: "0", output: "0"}

(a bare list works too). Fields as in a backend's `pricing`; an entry may set only some of them, the
rest come from the catalog. A bad entry is logged, naming it, and ignored; a missing or unreadable
file means no pins. Nothing here raises.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from typing import Any

from pydantic import Field, ValidationError

from ..api.modelroute import Pricing, Provider
from .resolve import PINNED, PRICE_FIELDS, PriceBook, PriceEntry, pin_key

log = logging.getLogger(__name__)
ENV = "SPENDWARDEN_PRICES_FILE"
Pins = dict[tuple[str, str], PriceEntry]


class PinnedPrice(Pricing):
    """One entry of the pinned prices."""

    provider: Provider = Field(description="OpenAI, Anthropic or OpenAICompatible, as in a backend.")
    model: str = Field(min_length=1, max_length=256, description="The backend's model, matched case-insensitively.")


def _describe(i: int, item: Any) -> str:
    if isinstance(item, dict) and item.get("model"):
        return f"pinned[{i}] ({item.get('provider')} {item.get('model')})"
    return f"pinned[{i}]"


def parse_pins(text: str, where: str = "pinned prices") -> tuple[Pins, list[str]]:
    """(pins, warnings); every bad entry is a warning naming it, never an exception."""
    import yaml

    try:
        doc = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        return {}, [f"{where}: not YAML ({type(exc).__name__}); no prices pinned"]
    items = doc.get("pinned") if isinstance(doc, dict) else doc
    if items is None:
        return {}, []
    if not isinstance(items, list):
        return {}, [f"{where}: expected a list under `pinned`; no prices pinned"]
    pins: Pins = {}
    warnings = []
    for i, item in enumerate(items):
        name = _describe(i, item)
        try:
            entry = PinnedPrice.model_validate(item)
        except ValidationError as exc:
            from ..api.validation import explain_validation_error

            warnings.append(f"{where}: {name} ignored: {explain_validation_error(exc).replace('spec', 'entry')}")
            continue
        values = {k: getattr(entry, k) for k in PRICE_FIELDS if getattr(entry, k) is not None}
        if not values:
            warnings.append(f"{where}: {name} ignored: it sets no price")
            continue
        key = pin_key(entry.provider.value, entry.model)
        if key in pins:
            warnings.append(f"{where}: {name} ignored: {entry.provider.value} {entry.model} is already pinned above")
            continue
        pins[key] = PriceEntry(values=values, currency=entry.currency, source=PINNED)
    return pins, warnings


def load_pins(path: str) -> tuple[Pins, list[str]]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        return {}, [f"{path}: cannot read the pinned prices ({exc.strerror or type(exc).__name__}); no prices pinned"]
    return parse_pins(text, path)


def book_for(pins: Pins) -> PriceBook:
    """A PriceBook over `pins` and the catalog; its key changes with either."""
    from . import catalog

    digest = hashlib.sha256(repr(sorted((k, sorted(e.values.items()), e.currency) for k, e in pins.items()))
                            .encode()).hexdigest()[:16]
    return PriceBook(pins=pins, catalog=catalog.cached_lookup(), key=f"{catalog.source()}:{digest}")


class PinWatcher:
    """The pinned-prices file, re-read whenever it changes (a ConfigMap volume swaps a symlink, so
    the file's identity and mtime change together). `poll()` says whether the prices changed."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._stat: tuple | None = None
        self._lock = threading.Lock()
        self.book = book_for({})
        self._digest = self.book.key

    def _identity(self) -> tuple | None:
        try:
            st = os.stat(self.path)  # type: ignore[arg-type]
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def poll(self) -> bool:
        if not self.path:
            return False
        with self._lock:
            ident = self._identity()
            if ident is not None and ident == self._stat:
                return False
            self._stat = ident
            pins, warnings = load_pins(self.path)
            for w in warnings:
                log.warning("%s", w)
            book = book_for(pins)
            if book.key == self._digest:
                return False
            self._digest = book.key
            self.book = book
            log.info("pinned prices loaded", extra={"path": self.path, "pins": len(pins)})
            return True


_current: PriceBook | None = None


def current() -> PriceBook:
    """The process's prices for renders that are given none: the operator's pins and the catalog once
    the operator set them (`use`), else the catalog alone."""
    global _current
    if _current is None:
        _current = book_for({})
    return _current


def use(book: PriceBook) -> None:
    global _current
    _current = book
