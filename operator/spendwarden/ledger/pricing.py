"""Pricing: tokens x prices per 1M tokens, in exact decimal arithmetic.

Pure: no I/O. Money is `decimal.Decimal`, never a float.

Usage is normalised so that `input_tokens` counts every prompt token the provider billed,
`cached_input_tokens` is the part of it that was read from the provider's prompt cache (billed at
the cached price) and `output_tokens` counts completion tokens (reasoning tokens included, as both
OpenAI and Anthropic report them inside the completion count).
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

PER = Decimal(1_000_000)
ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class Prices:
    """Prices per 1M tokens."""

    input: Decimal
    output: Decimal
    cached_input: Decimal
    currency: str = "USD"

    @classmethod
    def from_spec(cls, pricing: Any) -> "Prices":
        """From an api.modelroute.Pricing (or a dict of the same shape)."""
        get = pricing.get if isinstance(pricing, dict) else (lambda k, d=None: getattr(pricing, k, d))
        inp = Decimal(str(get("input")))
        cached = get("cachedInput")
        return cls(input=inp, output=Decimal(str(get("output"))),
                   cached_input=inp if cached is None else Decimal(str(cached)),
                   currency=get("currency", "USD") or "USD")


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Tokens of one request, normalised (see module docstring)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def cost(prices: Prices, usage: TokenUsage) -> Decimal:
    """Exact cost of `usage` at `prices`."""
    cached = min(max(usage.cached_input_tokens, 0), usage.input_tokens)
    uncached = usage.input_tokens - cached
    return (uncached * prices.input + cached * prices.cached_input + usage.output_tokens * prices.output) / PER


def worst_case_cost(prices: Prices, input_tokens: int, max_output_tokens: int) -> Decimal:
    """The most a request can cost: the whole prompt uncached plus every allowed output token."""
    return (input_tokens * prices.input + max_output_tokens * prices.output) / PER


def output_tokens_affordable(prices: Prices, input_tokens: int, money: Decimal) -> int | None:
    """How many output tokens `money` pays for after an uncached prompt of `input_tokens`.

    None means unlimited (free output); -1 means that not even the prompt alone is affordable.
    """
    left = money * PER - input_tokens * prices.input
    if left < 0:
        return -1
    if prices.output <= 0:
        return None
    return int(left // prices.output)


def format_money(amount: Decimal) -> str:
    """A plain decimal string (no exponent), trailing zeros trimmed: what the API's Money holds."""
    text = format(amount, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"
