"""Where a budget's money went: usage per (route, backend, tag, workload) within one period, bounded.

Pure, shared by both sides of the ledger protocol (docs/ledger-protocol.md, `breakdown`):
- a proxy keeps one `Breakdown` per budget and period, fed from each settlement, and reports it
  cumulatively with the budget's `used` (so a retried or lost report never counts twice);
- the operator keeps each live proxy's last reported breakdown, folds the breakdowns of proxies
  that are gone into `retired`, and writes the merged, capped rows into TokenBudget status (and
  into history for finished periods), which `spendwarden report` reads.

`tag` is the value of the request's `scenario` tag (header x-spendwarden-tags: scenario=ticket),
"" when it has none. Rows are bounded: past MAX_ROWS distinct keys, usage lands in one OTHER row,
so an app sending a new tag value per request cannot grow a report or a status object.
`workload` is the calling ServiceAccount when the gateway served the request (it authenticated it),
"" from a sidecar (whose callers are whatever runs in its Pod).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from .allowance import Amount
from .pricing import format_money

TAG_KEY = "scenario"
OTHER = "(other)"
MAX_ROWS = 32          # per budget and period: in a proxy's report, and in status
HISTORY_ROWS = 16      # per finished period kept in status.history
FIELDS = ("route", "backend", "tag", "workload")

Key = tuple[str, str, str, str]


@dataclass(slots=True)
class Row:
    input_tokens: int = 0
    output_tokens: int = 0
    cost: Decimal = Decimal(0)
    requests: int = 0

    def add(self, other: Row) -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cost += other.cost
        self.requests += other.requests

    def amount(self) -> Amount:
        return Amount(self.input_tokens, self.output_tokens, self.cost)


OTHER_KEY: Key = (OTHER, OTHER, OTHER, OTHER)


class Breakdown:
    """Rows keyed by (route, backend, tag, workload), at most `max_rows` of them (OTHER included)."""

    __slots__ = ("rows", "max_rows")

    def __init__(self, max_rows: int = MAX_ROWS):
        self.rows: dict[Key, Row] = {}
        self.max_rows = max_rows

    def add(self, route: str, backend: str, tag: str | None, amount: Amount, requests: int = 1,
            workload: str | None = None) -> None:
        key: Key = (route, backend, tag or "", workload or "")
        row = self.rows.get(key)
        if row is None:
            if len(self.rows) >= self.max_rows - 1 and key != OTHER_KEY:
                key = OTHER_KEY  # one slot stays free for the overflow row
                row = self.rows.get(key)
            if row is None:
                row = self.rows[key] = Row()
        row.add(Row(amount.input_tokens, amount.output_tokens, amount.cost, requests))

    def total(self) -> Amount:
        total = Amount()
        for row in self.rows.values():
            total = total + row.amount()
        return total

    def merge(self, other: Breakdown) -> None:
        for key, row in other.rows.items():
            self.rows.setdefault(key, Row()).add(row)

    def capped(self, max_rows: int) -> Breakdown:
        """The `max_rows - 1` most expensive rows and everything else summed into OTHER."""
        out = Breakdown(max_rows)
        ordered = sorted(self.rows.items(), key=lambda kv: (-kv[1].cost, -(kv[1].input_tokens + kv[1].output_tokens), kv[0]))
        if len(ordered) <= max_rows:
            out.rows = {k: _copy(r) for k, r in ordered}
            return out
        keep = [(k, r) for k, r in ordered if k != OTHER_KEY][:max_rows - 1]
        out.rows = {k: _copy(r) for k, r in keep}
        rest = Row()
        for k, r in ordered:
            if k not in out.rows:
                rest.add(r)
        out.rows[OTHER_KEY] = rest
        return out

    def to_wire(self) -> list[dict[str, Any]]:
        """The rows as in reports and status, most expensive first."""
        ordered = sorted(self.rows.items(), key=lambda kv: (-kv[1].cost, kv[0]))
        # No "tag" key for untagged rows: the 1.20 apiserver turns "" in a status patch into null.
        return [{"route": k[0], "backend": k[1], **({"tag": k[2]} if k[2] else {}),
                 **({"workload": k[3]} if k[3] else {}), "inputTokens": r.input_tokens,
                 "outputTokens": r.output_tokens, "cost": format_money(r.cost), "requests": r.requests}
                for k, r in ordered]

    @classmethod
    def from_wire(cls, data: Any, where: str = "breakdown", max_rows: int = MAX_ROWS) -> Breakdown:
        """Parse rows; ValueError naming the offending field for anything malformed."""
        if not isinstance(data, list):
            raise ValueError(f"{where}: must be a list of rows")
        if len(data) > max_rows:
            raise ValueError(f"{where}: at most {max_rows} rows")
        out = cls(max_rows)
        for i, item in enumerate(data):
            at = f"{where}[{i}]"
            if not isinstance(item, dict):
                raise ValueError(f"{at}: must be an object")
            key = tuple(_text(item.get(f, ""), f"{at}.{f}") for f in FIELDS)
            row = Row(wire_count(item.get("inputTokens", 0), f"{at}.inputTokens"),
                      wire_count(item.get("outputTokens", 0), f"{at}.outputTokens"),
                      parse_money(item.get("cost", "0"), f"{at}.cost"),
                      wire_count(item.get("requests", 0), f"{at}.requests"))
            out.rows.setdefault(key, Row()).add(row)  # type: ignore[arg-type]
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Breakdown) and self.rows == other.rows

    def __repr__(self) -> str:
        return f"Breakdown({self.to_wire()!r})"


def merged(parts: Iterable[Breakdown], max_rows: int = MAX_ROWS) -> Breakdown:
    out = Breakdown(max_rows=1 << 30)
    for part in parts:
        out.merge(part)
    return out.capped(max_rows)


def tag_of(tags: dict[str, str] | None) -> str:
    return (tags or {}).get(TAG_KEY, "")


def _copy(row: Row) -> Row:
    return Row(row.input_tokens, row.output_tokens, row.cost, row.requests)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or len(value) > 128:
        raise ValueError(f"{where}: must be a string of at most 128 characters")
    return value


# Token and request counts from the wire: far above any real period's (a quadrillion), so that the
# ledger's sums over thousands of proxies stay within int64, what the apiserver stores. A count of
# 2**63 made the answer unserialisable (500) and the status unwritable.
MAX_WIRE_COUNT = 10**15


def wire_count(value: Any, where: str, minimum: int = 0) -> int:
    """A count from a report: an integer (not a bool) from `minimum` to MAX_WIRE_COUNT."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_WIRE_COUNT:
        what = "a non-negative integer" if minimum == 0 else f"an integer of at least {minimum}"
        raise ValueError(f"{where}: must be {what} and at most {MAX_WIRE_COUNT}")
    return value



# Amounts from the wire (proxies' str(Decimal), exponents included) are bounded so that the ledger can
# add them without decimal.Overflow and write them to status in a few characters: below 10**18 (sums
# of amounts specs can write, which have at most 15 integer digits) and at most 40 decimal places.
MAX_MONEY = Decimal(10) ** 18
MONEY_PLACES = 40
_MONEY_TEXT = 64  # characters: more is not an amount within the bounds (and is not parsed at all)


_MONEY_SYNTAX = re.compile(r"-?[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?")


def parse_money(value: Any, where: str) -> Decimal:
    """A bounded non-negative decimal from a JSON string (or integer); ValueError naming `where`."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{where}: must be a decimal string such as \"0.0123\"")
    bounds = f"{where}: must be a non-negative decimal below 1e18 with at most {MONEY_PLACES} decimal places"
    if isinstance(value, int):
        if not 0 <= value < MAX_MONEY:  # checked first: str() of a huge int is slow (or refused)
            raise ValueError(bounds)
        return Decimal(value)
    if len(value) > _MONEY_TEXT:
        raise ValueError(f"{where}: {len(value)} characters; amounts have at most {_MONEY_TEXT}")
    # Decimal() also takes spaces, underscores and any script's digits (" 1", "1_000", "١"): what a
    # proxy writes (str(Decimal)) is ASCII digits, a point and an exponent only.
    if not _MONEY_SYNTAX.fullmatch(value):
        raise ValueError(f"{where}: {value[:40]!r} is not a decimal number")
    try:
        out = Decimal(value)
    except InvalidOperation:
        raise ValueError(f"{where}: {value[:40]!r} is not a decimal number") from None
    exponent = out.as_tuple().exponent  # an int once finite ('n', 'N', 'F' for NaN, sNaN, infinity)
    if not out.is_finite() or out < 0 or out >= MAX_MONEY or not isinstance(exponent, int) or exponent < -MONEY_PLACES:
        raise ValueError(bounds)
    return out


MAX_EXCLUDED = 1000


class PeriodBreakdown:
    """The operator's side for one budget and period: each live proxy's last cumulative breakdown
    (a retry or a lost answer can never count twice), and what proxies that are gone reported.

    A proxy presumed dead (the ledger charged its escrow) is folded into `retired`. Should it
    report again after all, its later breakdowns are ignored (`excluded`): they are cumulative and
    would count its earlier rows a second time. Its usage still counts in the budget's `used`; the
    report shows it as unattributed. So the rows never add up to more than `used`."""

    def __init__(self) -> None:
        self.proxies: dict[str, Breakdown] = {}
        self.retired = Breakdown()
        self.excluded: list[str] = []

    def report(self, proxy_id: str, rows: Breakdown | None, returning: bool = False) -> None:
        if returning and proxy_id not in self.excluded:
            self.excluded = (self.excluded + [proxy_id])[-MAX_EXCLUDED:]
        if rows is None or proxy_id in self.excluded:
            return
        self.proxies[proxy_id] = rows

    def retire(self, proxy_ids: Iterable[str]) -> None:
        gone = [p for p in proxy_ids if p in self.proxies]
        for pid in gone:
            self.retired.merge(self.proxies.pop(pid))
            self.excluded = (self.excluded + [pid])[-MAX_EXCLUDED:]
        if gone:
            self.retired = self.retired.capped(MAX_ROWS)

    def merged(self, max_rows: int = MAX_ROWS) -> Breakdown:
        return merged([self.retired, *self.proxies.values()], max_rows)

    def __bool__(self) -> bool:
        return bool(self.proxies or self.retired.rows or self.excluded)

    def to_state(self) -> dict[str, Any]:
        return {"proxies": {pid: b.to_wire() for pid, b in sorted(self.proxies.items())},
                "retired": self.retired.to_wire(), "excluded": list(self.excluded)}

    @classmethod
    def from_state(cls, data: Any) -> PeriodBreakdown:
        out = cls()
        if not isinstance(data, dict):
            return out
        try:
            out.proxies = {str(pid): Breakdown.from_wire(rows) for pid, rows in (data.get("proxies") or {}).items()}
            out.retired = Breakdown.from_wire(data.get("retired") or [])
            out.excluded = [str(p) for p in data.get("excluded") or []][-MAX_EXCLUDED:]
        except ValueError:
            return cls()  # a damaged breakdown is only a report: never let it block the ledger
        return out
