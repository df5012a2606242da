"""Pricing: tokens x prices per 1M tokens, in exact decimal arithmetic.

Pure: no I/O. Money is `decimal.Decimal`, never a float.

Usage is normalised so that `input_tokens` counts every prompt token the provider billed,
`cached_input_tokens` is the part of it that was read from the provider's prompt cache (billed at
the cached price), `cache_write_tokens` the part of it written to the prompt cache (Anthropic
cache_creation_input_tokens, billed above the input price; `cache_write_1h_tokens` is the part of
those written with the 1-hour TTL) and `output_tokens` counts completion tokens (reasoning tokens
included, as both OpenAI and Anthropic report them inside the completion count; `reasoning_tokens`
is that part, reported on its own but priced as the output it is).
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

PER = Decimal(1_000_000)
ZERO = Decimal(0)
ANTHROPIC = "Anthropic"  # api.modelroute.Provider.ANTHROPIC's value (no import: this module is pure)
# Anthropic bills prompt-cache writes above the input price: 1.25x (5-minute TTL), 2x (1-hour TTL).
ANTHROPIC_CACHE_WRITE = Decimal("1.25")
ANTHROPIC_CACHE_WRITE_1H = Decimal(2)


@dataclass(frozen=True, slots=True)
class Prices:
    """Prices per 1M tokens. The cache-write prices default (None) to the input price."""

    input: Decimal
    output: Decimal
    cached_input: Decimal
    currency: str = "USD"
    cache_write: Decimal = None  # type: ignore[assignment]  # None: the input price
    cache_write_1h: Decimal = None  # type: ignore[assignment]  # None: the input price

    def __post_init__(self) -> None:
        if self.cache_write is None:
            object.__setattr__(self, "cache_write", self.input)
        if self.cache_write_1h is None:
            object.__setattr__(self, "cache_write_1h", self.input)

    @property
    def prompt_ceiling(self) -> Decimal:
        """The highest price a prompt token can be billed at, whatever the cache does with it."""
        return max(self.input, self.cached_input, self.cache_write, self.cache_write_1h)

    @classmethod
    def from_spec(cls, pricing: Any, provider: Any = None) -> Prices:
        """From an api.modelroute.Pricing (or a dict of the same shape) of a backend of `provider`
        (a Provider or its string value): unset cache-write prices take Anthropic's multiples of the
        input price on Anthropic backends, the input price elsewhere."""
        get = pricing.get if isinstance(pricing, dict) else (lambda k, d=None: getattr(pricing, k, d))
        inp = Decimal(str(get("input")))
        anthropic = getattr(provider, "value", provider) == ANTHROPIC

        def price(key: str, anthropic_factor: Decimal) -> Decimal:
            value = get(key)
            if value is not None:
                return Decimal(str(value))
            return inp * anthropic_factor if anthropic else inp

        return cls(input=inp, output=Decimal(str(get("output"))),
                   cached_input=price("cachedInput", Decimal(1)),
                   currency=get("currency", "USD") or "USD",
                   cache_write=price("cacheWrite", ANTHROPIC_CACHE_WRITE),
                   cache_write_1h=price("cacheWrite1h", ANTHROPIC_CACHE_WRITE_1H))


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Tokens of one request, normalised (see module docstring)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    # The part of output_tokens the model spent reasoning (OpenAI's *_tokens_details.reasoning_tokens):
    # billed as output, already in output_tokens; kept apart only to be reported.
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def cost(prices: Prices, usage: TokenUsage) -> Decimal:
    """Exact cost of `usage` at `prices`. The parts of the prompt are clamped into it (cache reads
    first, then writes, the 1-hour ones within the writes), so odd counts never bill a negative part."""
    cached = min(max(usage.cached_input_tokens, 0), usage.input_tokens)
    written = min(max(usage.cache_write_tokens, 0), usage.input_tokens - cached)
    written_1h = min(max(usage.cache_write_1h_tokens, 0), written)
    uncached = usage.input_tokens - cached - written
    return (uncached * prices.input + cached * prices.cached_input + (written - written_1h) * prices.cache_write
            + written_1h * prices.cache_write_1h + usage.output_tokens * prices.output) / PER


def worst_case_cost(prices: Prices, input_tokens: int, max_output_tokens: int) -> Decimal:
    """The most a request can cost: the whole prompt at its dearest price (a cache write can cost more
    than plain input) plus every allowed output token."""
    return (input_tokens * prices.prompt_ceiling + max_output_tokens * prices.output) / PER


def output_tokens_affordable(prices: Prices, input_tokens: int, money: Decimal) -> int | None:
    """How many output tokens `money` pays for after a prompt of `input_tokens` at its dearest price.

    None means unlimited (free output); -1 means that not even the prompt alone is affordable.
    """
    left = money * PER - input_tokens * prices.prompt_ceiling
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
