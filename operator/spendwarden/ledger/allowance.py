"""Allowance: what one budget may still spend in its current period, with reservations.

Pure and synchronous: no I/O, no clocks, no awaits. A request reserves its worst case before it is
forwarded and settles its real usage afterwards; `reserve` refuses (unless forced) whenever
used + reserved + the new reservation would exceed any limit. In a single-threaded event loop,
calling `max_output_tokens`/`reserve` without an await in between makes check-and-reserve atomic,
so concurrent requests never jointly exceed the allowance.

Invariant (property-tested): as long as every settlement is at most what was reserved, used +
reserved never exceeds any limit. A settlement above the reservation (the provider billed more
than the estimate) is recorded anyway, because the provider's numbers are what it bills.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from .pricing import ZERO, Prices, output_tokens_affordable, worst_case_cost


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-period limits; None means no limit of that kind."""

    total_tokens: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost: Decimal | None = None

    @classmethod
    def from_spec(cls, limits: Any) -> Limits:
        """From an api.tokenbudget.Limits."""
        tokens, money = limits.tokens, limits.cost
        return cls(total_tokens=tokens.total if tokens else None,
                   input_tokens=tokens.input if tokens else None,
                   output_tokens=tokens.output if tokens else None,
                   cost=Decimal(money.amount) if money else None)


def hard_ceiling(spec: Any) -> Limits | None:
    """onExceeded Downgrade's hard ceiling (a TokenBudgetSpec's downgrade.hardCeiling) as Limits."""
    hard = spec.downgrade.hardCeiling if spec.downgrade is not None else None
    if hard is None:
        return None
    return Limits(total_tokens=hard.tokens, cost=Decimal(hard.cost) if hard.cost is not None else None)


class Amount:
    """Tokens and money, used or reserved. Immutable by convention (a plain slotted class: it is
    created several times per request, and frozen dataclasses are several times slower to build)."""

    __slots__ = ("input_tokens", "output_tokens", "cost")

    def __init__(self, input_tokens: int = 0, output_tokens: int = 0, cost: Decimal = ZERO):
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.cost = cost

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Amount) -> Amount:
        return Amount(self.input_tokens + other.input_tokens, self.output_tokens + other.output_tokens,
                      self.cost + other.cost)

    def __sub__(self, other: Amount) -> Amount:
        return Amount(self.input_tokens - other.input_tokens, self.output_tokens - other.output_tokens,
                      self.cost - other.cost)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Amount) and (self.input_tokens, self.output_tokens, self.cost) == \
            (other.input_tokens, other.output_tokens, other.cost)

    def __hash__(self) -> int:
        return hash((self.input_tokens, self.output_tokens, self.cost))

    def __repr__(self) -> str:
        return f"Amount({self.input_tokens}, {self.output_tokens}, {self.cost})"

    def at_least_zero(self) -> Amount:
        """This amount with every negative part raised to zero."""
        if self.input_tokens >= 0 and self.output_tokens >= 0 and self.cost >= 0:
            return self
        return Amount(max(self.input_tokens, 0), max(self.output_tokens, 0), max(self.cost, ZERO))

    @classmethod
    def worst_case(cls, prices: Prices, input_tokens: int, max_output_tokens: int) -> Amount:
        return cls(input_tokens, max_output_tokens, worst_case_cost(prices, input_tokens, max_output_tokens))


def least(a: Amount | None, b: Amount) -> Amount:
    """The per-dimension minimum of two amounts (`a` None: `b`): a lower bound on both requests."""
    if a is None:
        return b
    return Amount(min(a.input_tokens, b.input_tokens), min(a.output_tokens, b.output_tokens), min(a.cost, b.cost))


class RecentLeast:
    """The per-dimension minimum (`least`) of the amounts noted in the last `window` seconds, or a
    little less (at least half of it: two buckets of half a window each), in constant memory."""

    __slots__ = ("window", "current", "previous", "since")

    def __init__(self, window: float = 60.0):
        self.window = window
        self.current: Amount | None = None   # noted since `since`
        self.previous: Amount | None = None  # noted in the half window before it
        self.since = 0.0

    def _rotate(self, now: float) -> None:
        half = self.window / 2
        steps = int((now - self.since) // half) if half > 0 else 2
        if steps >= 1:
            self.previous = self.current if steps == 1 else None
            self.current = None
            self.since = self.since + steps * half if half > 0 else now

    def note(self, amount: Amount, now: float) -> None:
        self._rotate(now)
        self.current = least(self.current, amount)

    def value(self, now: float) -> Amount | None:
        self._rotate(now)
        if self.previous is None:
            return self.current
        return self.previous if self.current is None else least(self.previous, self.current)

    def clear(self) -> None:
        self.current = self.previous = None


@dataclass(slots=True)
class Remaining:
    """What is left; None where there is no limit of that kind."""

    tokens: int | None
    cost: Decimal | None
    fraction: float  # 0..1 of the tightest limit left (1.0 without limits); for metrics only


@dataclass(slots=True)
class Allowance:
    """One budget's allowance for its current period."""

    limits: Limits
    used: Amount = field(default_factory=Amount)
    reserved: Amount = field(default_factory=Amount)
    _open: dict[int, Amount] = field(default_factory=dict)
    _next_id: int = 1

    # -- queries ---------------------------------------------------------------------------------

    def _committed(self) -> Amount:
        return self.used + self.reserved

    def covers(self, amount: Amount) -> bool:
        """Whether `amount` fits on top of what is used and reserved."""
        c = self._committed() + amount
        lim = self.limits
        return not (
            (lim.total_tokens is not None and c.total_tokens > lim.total_tokens)
            or (lim.input_tokens is not None and c.input_tokens > lim.input_tokens)
            or (lim.output_tokens is not None and c.output_tokens > lim.output_tokens)
            or (lim.cost is not None and c.cost > lim.cost)
        )

    def max_output_tokens(self, prices: Prices, input_tokens: int) -> int | None:
        """The most output tokens a request with this prompt can still reserve.

        None: no limit applies. -1: not even the prompt alone fits.
        """
        c = self._committed()
        lim = self.limits
        best: int | None = None

        def tighter(n: int) -> None:
            nonlocal best
            best = n if best is None else min(best, n)

        if lim.input_tokens is not None and c.input_tokens + input_tokens > lim.input_tokens:
            return -1
        if lim.total_tokens is not None:
            tighter(lim.total_tokens - c.total_tokens - input_tokens)
        if lim.output_tokens is not None:
            tighter(lim.output_tokens - c.output_tokens)
        if lim.cost is not None:
            n = output_tokens_affordable(prices, input_tokens, lim.cost - c.cost)
            if n is not None:
                tighter(n)
        if best is None:
            return None
        return max(best, -1)

    def exhausted(self) -> bool:
        """True when the used amount (reservations aside) has reached a limit."""
        u, lim = self.used, self.limits
        return ((lim.total_tokens is not None and u.total_tokens >= lim.total_tokens)
                or (lim.input_tokens is not None and u.input_tokens >= lim.input_tokens)
                or (lim.output_tokens is not None and u.output_tokens >= lim.output_tokens)
                or (lim.cost is not None and u.cost >= lim.cost))

    def remaining(self) -> Remaining:
        """What is left of the used amount (reservations not subtracted)."""
        u, lim = self.used, self.limits
        token_left: list[int] = []
        fractions: list[float] = []
        for limit, value in ((lim.total_tokens, u.total_tokens), (lim.input_tokens, u.input_tokens),
                             (lim.output_tokens, u.output_tokens)):
            if limit is not None:
                token_left.append(max(limit - value, 0))
                fractions.append(max(limit - value, 0) / limit)
        cost_left = None
        if lim.cost is not None:
            cost_left = max(lim.cost - u.cost, ZERO)
            fractions.append(float(cost_left / lim.cost) if lim.cost > 0 else 0.0)
        return Remaining(tokens=min(token_left) if token_left else None, cost=cost_left,
                         fraction=min(fractions) if fractions else 1.0)

    @property
    def open_reservations(self) -> int:
        return len(self._open)

    # -- changes ---------------------------------------------------------------------------------

    def reserve(self, amount: Amount, force: bool = False) -> int | None:
        """Reserve `amount`; returns a reservation id, or None when it does not fit (unless forced)."""
        if not force and not self.covers(amount):
            return None
        rid = self._next_id
        self._next_id += 1
        self._open[rid] = amount
        self.reserved = self.reserved + amount
        return rid

    def settle(self, rid: int, actual: Amount) -> None:
        """Close reservation `rid` and record what was really used."""
        held = self._open.pop(rid, None)
        if held is not None:
            self.reserved = self.reserved - held
        # Usage only ever adds: a negative part (a broken upstream's numbers) must not credit the budget.
        self.used = self.used + actual.at_least_zero()

    def settle_reserved(self, rid: int) -> None:
        """Close `rid` charging the whole reservation (usage unknown: never charge nothing)."""
        held = self._open.get(rid)
        self.settle(rid, held if held is not None else Amount())

    def release(self, rid: int) -> None:
        """Drop reservation `rid` without usage (the request was never sent upstream)."""
        held = self._open.pop(rid, None)
        if held is not None:
            self.reserved = self.reserved - held

    def reset(self, used: Amount | None = None) -> None:
        """Start a new period; open reservations stay open and settle into the new period."""
        self.used = used or Amount()

    def charge_open_reservations(self) -> None:
        """Turn every open reservation into usage (shutdown: their outcome will never be known)."""
        for rid in list(self._open):
            self.settle_reserved(rid)

    # -- state ------------------------------------------------------------------------------------

    def used_state(self) -> dict[str, Any]:
        u = self.used
        return {"inputTokens": u.input_tokens, "outputTokens": u.output_tokens, "cost": str(u.cost)}

    @staticmethod
    def amount_from_state(data: dict[str, Any]) -> Amount:
        return Amount(int(data.get("inputTokens", 0)), int(data.get("outputTokens", 0)),
                      Decimal(str(data.get("cost", "0"))))


def clamp_output(requested: int, affordable: int | None, useful_minimum: int) -> int | None:
    """The output cap to send: `requested`, or less when that is all that is affordable.

    Returns None when what is affordable is below a useful minimum (refuse the request).
    """
    if affordable is None:
        return requested
    if affordable < 0:  # not even the prompt fits
        return None
    if affordable >= requested:
        return requested
    if affordable > 0 and affordable >= min(useful_minimum, requested):
        return affordable
    return None
