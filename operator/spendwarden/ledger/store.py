"""The operator's budget ledgers: one `BudgetLedger` per (namespace, budget, period), the protocol's
report semantics (docs/ledger-protocol.md) and the mapping to and from TokenBudget status.

Pure: no I/O and no clock (`now` is passed in), so controller/ledger_service.py stays a thin HTTP
and persistence shell and all of this is unit-tested.

Persistence contract. `status.ledger` holds the current period's `BudgetLedger.to_state()` plus its
periodStart/periodEnd, and the previous period's under `previous` (late reports still land there
until the next reset). Every change bumps the entry's `version`; a flush records the version it
wrote. A report that RAISED a ceiling may only be answered once `persisted >= raised_at`: the
ceilings a restarted operator reads back then include every ceiling any proxy was ever told.

Longer than 500 lines: report semantics and the status mapping share BudgetEntry's version and
raised_at invariants. The status mapping (to_status/from_status) is the part that could move out.
"""
from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from ..api.common import now_rfc3339, set_condition
from ..api.tokenbudget import BudgetState, TokenBudgetSpec
from ..api.validation import validate_spec
from .allowance import Amount, Limits, hard_ceiling
from .breakdown import (
    HISTORY_ROWS,
    MAX_WIRE_COUNT,
    Breakdown,
    PeriodBreakdown,
    parse_money,
    wire_count,
)
from .forecast import BurnRate, projected_exhaustion, time_constant
from .leases import BudgetLedger, Ceiling, LeaseSettings, ProxyAccount
from .loops import LoopReport, parse_loops
from .periods import current_period
from .pricing import ZERO, format_money
from .usage import budget_state, usage_status

HISTORY_MAX = 12
MAX_ID = 128
MAX_BUDGETS_PER_REPORT = 64
# Proxies report every TAIL_REPORT_INTERVAL seconds (instead of about every second) once a budget is
# TAIL_FRACTION used, so that a cut-off reaches all of them well within a second.
TAIL_FRACTION = Decimal("0.95")
TAIL_REPORT_INTERVAL = 0.25


class ReportError(ValueError):
    """A malformed report: the message is the 400 answer."""


# -- parsing -----------------------------------------------------------------------------------------

@dataclass(slots=True)
class BudgetReport:
    period_start: str
    used: Amount
    held: Amount
    want: Amount | None = None
    release_to: Ceiling | None = None
    breakdown: Breakdown | None = None  # optional (proxies before it simply send none)
    hard_release_to: Ceiling | None = None  # the same for the hard-ceiling lease (Downgrade)
    need: Amount | None = None
    # Optional (older proxies send none): the smallest request this proxy admitted recently, as
    # its least possible reservation: the minimum over the window the answers announce
    # (`admittedWindow`; older proxies: a cumulative minimum; leases.py, the end of a budget).
    smallest_admitted: Amount | None = None


@dataclass(slots=True)
class Report:
    proxy_id: str
    namespace: str
    seq: int
    budgets: dict[str, BudgetReport]
    loops: list[LoopReport] = field(default_factory=list)  # optional: loop-breaker refusals (ledger/loops.py)


def _int(value: Any, where: str) -> int:
    # bool is an int in Python; a JSON true is not a token count.
    try:
        return wire_count(value, where)
    except ValueError as exc:
        raise ReportError(str(exc)) from None


def _money(value: Any, where: str) -> Decimal:
    try:
        return parse_money(value, where)
    except ValueError as exc:
        raise ReportError(str(exc)) from None


_AMOUNT_FIELDS = frozenset(("inputTokens", "outputTokens", "totalTokens", "cost"))


def _amount(data: Any, where: str) -> Amount:
    # Twice per report: the common case (plain non-negative ints, cost "0") builds no strings.
    if not isinstance(data, dict):
        raise ReportError(f"{where}: must be an object with inputTokens, outputTokens, cost")
    if not data.keys() <= _AMOUNT_FIELDS:
        raise ReportError(f"{where}: unknown field(s) {sorted(set(data) - _AMOUNT_FIELDS)[:5]}")
    inp, out, cost = data.get("inputTokens", 0), data.get("outputTokens", 0), data.get("cost", "0")
    if type(inp) is not int or not 0 <= inp <= MAX_WIRE_COUNT:  # type(): a JSON true is a bool, not a count
        _int(inp, f"{where}.inputTokens")
    if type(out) is not int or not 0 <= out <= MAX_WIRE_COUNT:
        _int(out, f"{where}.outputTokens")
    return Amount(inp, out, ZERO if cost == "0" else _money(cost, f"{where}.cost"))


def _ceiling(data: Any, where: str) -> Ceiling:
    if not isinstance(data, dict):
        raise ReportError(f"{where}: must be an object with total, input, output, cost")
    unknown = set(data) - {"total", "input", "output", "cost"}
    if unknown:
        raise ReportError(f"{where}: unknown field(s) {sorted(unknown)[:5]}")
    return Ceiling(total=_int(data["total"], f"{where}.total") if data.get("total") is not None else None,
                   input=_int(data["input"], f"{where}.input") if data.get("input") is not None else None,
                   output=_int(data["output"], f"{where}.output") if data.get("output") is not None else None,
                   cost=_money(data["cost"], f"{where}.cost") if data.get("cost") is not None else None)


def _breakdown(data: Any, where: str) -> Breakdown | None:
    if data is None:
        return None
    try:
        return Breakdown.from_wire(data, where)
    except ValueError as exc:
        raise ReportError(str(exc)) from None


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID:
        raise ReportError(f"{where}: must be a non-empty string of at most {MAX_ID} characters")
    return value


def parse_report(body: Any) -> Report:
    """Validate a POST /v1/report body by hand, with messages that name the offending field."""
    if not isinstance(body, dict):
        raise ReportError("body: must be a JSON object")
    budgets = body.get("budgets")
    if not isinstance(budgets, dict):
        raise ReportError("budgets: must be an object of budget name -> report")
    if len(budgets) > MAX_BUDGETS_PER_REPORT:
        raise ReportError(f"budgets: at most {MAX_BUDGETS_PER_REPORT} per report")
    parsed: dict[str, BudgetReport] = {}
    for name, entry in budgets.items():
        where = f"budgets.{str(name)[:64]}"
        _name(name, where)
        if not isinstance(entry, dict):
            raise ReportError(f"{where}: must be an object")
        start = entry.get("periodStart")
        if not isinstance(start, str) or not start:
            raise ReportError(f"{where}.periodStart: required (RFC 3339, the period the numbers belong to)")
        if "used" not in entry:
            raise ReportError(f"{where}.used: required (cumulative usage this period)")
        parsed[name] = BudgetReport(
            period_start=start,
            used=_amount(entry["used"], f"{where}.used"),
            held=_amount(entry.get("held") or {}, f"{where}.held"),
            want=_amount(entry["want"], f"{where}.want") if entry.get("want") is not None else None,
            need=_amount(entry["need"], f"{where}.need") if entry.get("need") is not None else None,
            smallest_admitted=(_amount(entry["smallestAdmitted"], f"{where}.smallestAdmitted")
                               if entry.get("smallestAdmitted") is not None else None),
            release_to=_ceiling(entry["releaseTo"], f"{where}.releaseTo") if entry.get("releaseTo") is not None else None,
            breakdown=_breakdown(entry.get("breakdown"), f"{where}.breakdown"),
            hard_release_to=(_ceiling(entry["hardReleaseTo"], f"{where}.hardReleaseTo")
                             if entry.get("hardReleaseTo") is not None else None))
    try:
        loops = parse_loops(body.get("loops"))
    except ValueError as exc:
        raise ReportError(str(exc)) from None
    return Report(proxy_id=_name(body.get("proxyId"), "proxyId"), namespace=_name(body.get("namespace"), "namespace"),
                  seq=_int(body.get("seq"), "seq"), budgets=parsed, loops=loops)


# -- state ---------------------------------------------------------------------------------------------

def amount_fraction(spec: TokenBudgetSpec, used: Amount) -> Decimal:
    """render.status.usage_fraction's fraction, from an Amount: the report path's version, without
    the status dict and the cost's round trip through a string."""
    fractions: list[Decimal] = []
    t = spec.limits.tokens
    if t is not None:
        for limit, value in ((t.total, used.total_tokens), (t.input, used.input_tokens), (t.output, used.output_tokens)):
            if limit is not None:
                fractions.append(Decimal(value) / limit)
    cost = spec.limits.cost
    if cost is not None:
        cost_limit = Decimal(cost.amount)
        fractions.append(used.cost / cost_limit if cost_limit > 0 else Decimal(1))
    return max(fractions)


def usage_dict(amount: Amount) -> dict[str, Any]:
    """An Amount as the status' Usage fields."""
    return {"inputTokens": amount.input_tokens, "outputTokens": amount.output_tokens,
            # "f": never an exponent ("4E-7"), which the CRD's Money pattern refuses.
            "totalTokens": amount.total_tokens, "cost": format(amount.cost, "f")}


@dataclass
class PeriodLedger:
    start: str
    end: str
    ledger: BudgetLedger
    # proxy id -> the entry version at which its ceiling was last raised (not yet known persisted)
    raised: dict[str, int] = field(default_factory=dict)
    # Where the usage went, per (route, backend, tag): reports only, never enforcement.
    usage: PeriodBreakdown = field(default_factory=PeriodBreakdown)
    # onExceeded Downgrade with downgrade.hardCeiling: a second lease ledger over the same reports,
    # whose limits are the ceiling (downgraded requests spend past `ledger`'s limits, never past these).
    hard: BudgetLedger | None = None

    def to_state(self) -> dict[str, Any]:
        out = {"periodStart": self.start, "periodEnd": self.end, **self.ledger.to_state()}
        if self.hard is not None:
            out["hard"] = self.hard.to_state()
        if self.usage:
            out["breakdown"] = self.usage.to_state()
        return out

    @classmethod
    def from_state(cls, limits: Limits, data: dict[str, Any], settings: LeaseSettings | None,
                   hard: Limits | None = None) -> PeriodLedger:
        return cls(str(data["periodStart"]), str(data.get("periodEnd") or ""),
                   BudgetLedger.from_state(limits, data, settings),
                   usage=PeriodBreakdown.from_state(data.get("breakdown")),
                   hard=BudgetLedger.from_state(hard, data.get("hard") or {}, settings) if hard is not None else None)

    def set_hard(self, hard: Limits | None, settings: LeaseSettings) -> None:
        """Follow a spec change of downgrade.hardCeiling."""
        if hard is None:
            self.hard = None
        elif self.hard is None:
            # Added mid-period: it starts from what every proxy has committed so far (their next
            # cumulative reports continue from there), so nothing already spent is granted again.
            self.hard = BudgetLedger(hard, settings)
            self.hard.retired = self.ledger.retired
            self.hard.resumed_at = self.ledger.resumed_at  # the same proxies, heard from since then
            for pid, acct in self.ledger.proxies.items():
                self.hard.proxies[pid] = ProxyAccount(
                    used=acct.used, held=acct.held, ceiling=Ceiling.committed(hard, acct.used + acct.held),
                    seq=acct.seq, expires_at=acct.expires_at)
        else:
            self.hard.limits = hard

    def total(self) -> dict[str, Any]:
        out: dict[str, Any] = {"periodStart": self.start, "periodEnd": self.end, "used": usage_dict(self.ledger.used())}
        rows = self.usage.merged(HISTORY_ROWS).to_wire()
        if rows:
            out["breakdown"] = rows
        return out


@dataclass
class BudgetEntry:
    namespace: str
    name: str
    spec: TokenBudgetSpec
    current: PeriodLedger
    previous: PeriodLedger | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    generation: int | None = None
    conditions: list[dict[str, Any]] = field(default_factory=list)  # as last seen on the object
    uid: str | None = None
    loaded_writer: str | None = None  # status.ledger.writer when this entry was loaded
    version: int = 0
    persisted: int = 0
    announced: int = 0            # highest threshold already announced this period
    exceeded_announced: bool = False
    burn: BurnRate | None = None  # the current period's recent burn rate (forecast.py)
    forecast_at: str | None = None  # projected exhaustion as of the last status() (RFC 3339)
    forecast_named: float | None = None  # the projected time the ForecastExhausted message names
    forecast_announced: bool = False

    @property
    def limits(self) -> Limits:
        return Limits.from_spec(self.spec.limits)

    @property
    def hard_limits(self) -> Limits | None:
        return hard_ceiling(self.spec)

    @property
    def dirty(self) -> bool:
        return self.version > self.persisted

    def changed(self) -> int:
        self.version += 1
        return self.version

    def fraction(self, used: Amount | None = None) -> Decimal:
        """The tightest limit's used fraction; `used`: the current ledger's used(), if at hand."""
        return amount_fraction(self.spec, self.current.ledger.used() if used is None else used)

    def exhausted(self) -> bool:
        return self.current.ledger.exhausted()

    def state(self) -> tuple[int, BudgetState]:
        """(percent used, state): Exceeded whenever the ledger finds the budget spent, also short of its limit."""
        return budget_state(self.spec, self.fraction(), self.exhausted())

    def short_of(self) -> str | None:
        """Why the budget is spent below its limit, in words (None: it is not, or the limit is reached)."""
        short = self.current.ledger.shortfall()
        if short is None or short.need is None:
            return None
        unit = {"total": "tokens", "input": "input tokens", "output": "output tokens"}.get(short.dim)
        left, need = short.left, short.need
        if unit is None:
            unit = self.spec.limits.cost.currency if self.spec.limits.cost is not None else ""
            left, need = format_money(left), format_money(need)
        return f"{left} {unit} left, less than the team's smallest request needs ({need} {unit})"


def _periods(spec: TokenBudgetSpec, now: datetime) -> tuple[str, str]:
    start, end = current_period(spec, now)
    return now_rfc3339(start), now_rfc3339(end)


class LedgerStore:
    """Every budget's ledgers, keyed by (namespace, name)."""

    def __init__(self, settings: LeaseSettings | None = None, writer: str | None = None):
        self.settings = settings or LeaseSettings()
        # Identifies this operator instance in status.ledger.writer, so an instance can tell that
        # another one has written a ledger since it loaded it.
        self.writer = writer or uuid.uuid4().hex[:12]
        self.entries: dict[tuple[str, str], BudgetEntry] = {}
        self._period_cache: dict[int, tuple[Any, int, tuple[str, str]]] = {}

    def _periods_at(self, entry: BudgetEntry, now: datetime) -> tuple[str, str]:
        """_periods, computed once per budget spec and second: every report rolls, and the time-zone
        arithmetic was a tenth of the report path."""
        second = int(now.timestamp())
        hit = self._period_cache.get(id(entry))
        if hit is not None and hit[0] is entry.spec and hit[1] == second:
            return hit[2]
        periods = _periods(entry.spec, now)
        self._period_cache[id(entry)] = (entry.spec, second, periods)
        return periods

    def get(self, namespace: str, name: str) -> BudgetEntry | None:
        return self.entries.get((namespace, name))

    def _period(self, limits: Limits, hard: Limits | None, start: str, end: str) -> PeriodLedger:
        return PeriodLedger(start, end, BudgetLedger(limits, self.settings),
                            hard=BudgetLedger(hard, self.settings) if hard is not None else None)

    def written_by_another(self, obj: dict[str, Any]) -> bool:
        """Whether another operator instance wrote this budget's ledger after we loaded it."""
        meta = obj.get("metadata") or {}
        entry = self.get(meta.get("namespace", ""), meta.get("name", ""))
        writer = ((obj.get("status") or {}).get("ledger") or {}).get("writer")
        return entry is not None and bool(writer) and writer not in (self.writer, entry.loaded_writer)

    def forget(self, namespace: str, name: str) -> None:
        entry = self.entries.pop((namespace, name), None)
        if entry is not None:
            self._period_cache.pop(id(entry), None)

    # -- loading and watching ------------------------------------------------------------------------

    def load(self, obj: dict[str, Any], now: datetime) -> BudgetEntry | None:
        """Build a budget's entry from its object, restoring the persisted ledgers from status.ledger.
        None for a budget whose spec is invalid (the proxies do not enforce it either)."""
        spec, problem = validate_spec("TokenBudget", obj.get("spec"))
        if problem is not None:
            return None
        meta, status = obj.get("metadata") or {}, obj.get("status") or {}
        limits = Limits.from_spec(spec.limits)
        start, end = _periods(spec, now)
        saved = status.get("ledger") or {}
        hard = hard_ceiling(spec)
        current, previous = self._period(limits, hard, start, end), None
        history = [dict(h) for h in status.get("history") or []][:HISTORY_MAX]
        stored = [PeriodLedger.from_state(limits, s, self.settings, hard)
                  for s in (saved, saved.get("previous") or {}) if s.get("periodStart")]
        for pl in stored:
            if pl.start == start:
                current = pl
                current.end = current.end or end
            elif pl.start < start and (previous is None or pl.start > previous.start):
                previous = pl
        # The restored proxies could not report while no operator listened: their grace starts now.
        # (Only the open period presumes proxies dead: see tick.)
        for ledger in (current.ledger, current.hard):
            if ledger is not None:
                ledger.resume(now.timestamp())
        entry = BudgetEntry(meta.get("namespace", ""), meta.get("name", ""), spec, current, previous, history,
                            generation=meta.get("generation"), uid=meta.get("uid"), loaded_writer=saved.get("writer"),
                            conditions=list(status.get("conditions") or []))
        if previous is not None:
            _record_history(entry, previous)
        if status.get("periodStart") == start or saved.get("periodStart") == start:
            # What was already announced before a restart is not announced again.
            entry.announced = max([t for t in spec.thresholds if t <= int(status.get("percentUsed") or 0)], default=0)
            entry.exceeded_announced = status.get("state") == BudgetState.EXCEEDED.value
            entry.forecast_announced = (_condition(status.get("conditions"), FORECAST_CONDITION) or ("",))[0] == "True"
        if saved.get("periodStart") == start and saved.get("burn"):
            entry.burn = BurnRate.from_state(saved["burn"], _ts(start))
        self.entries[(entry.namespace, entry.name)] = entry
        if saved.get("periodStart") != current.start or previous is not None and not saved.get("previous"):
            entry.changed()  # the stored state is not what this entry would write: write it
        return entry

    def observe(self, obj: dict[str, Any], now: datetime) -> BudgetEntry | None:
        """A watch event for a budget: take in spec changes and what others wrote. Returns the entry
        if it must be written again (e.g. the reconcile put back a stale copy of a field we own)."""
        meta = obj.get("metadata") or {}
        entry = self.get(meta.get("namespace", ""), meta.get("name", ""))
        if entry is None:
            return None
        spec, problem = validate_spec("TokenBudget", obj.get("spec"))
        status = obj.get("status") or {}
        entry.conditions = list(status.get("conditions") or [])
        entry.generation = meta.get("generation")
        needs_write = False
        if problem is None and spec != entry.spec:
            old_limits = entry.limits
            entry.spec = spec
            if entry.limits != old_limits:
                for pl in (entry.current, entry.previous):
                    if pl is not None:
                        pl.ledger.limits = entry.limits
                entry.current.ledger.note_exhaustion(now.timestamp())  # a raise lifts it: status says so now
            for pl in (entry.current, entry.previous):
                if pl is not None:
                    pl.set_hard(entry.hard_limits, self.settings)
            self.roll(entry, now)
            needs_write = True
        if entry.dirty:
            return entry
        # Self-healing: if the object's ledger-owned fields are not what we wrote last, write again.
        desired = self.status(entry, now)
        for key in ("used", "state", "percentUsed"):
            if status.get(key) != desired.get(key):
                needs_write = True
        for type_ in ("Exceeded", FORECAST_CONDITION):
            if _condition(status.get("conditions"), type_) != _condition(desired["conditions"], type_):
                needs_write = True
        if needs_write:
            entry.changed()
            return entry
        return None

    # -- time ------------------------------------------------------------------------------------------

    def roll(self, entry: BudgetEntry, now: datetime) -> bool:
        """Start a new period if `now` is past the current one; the old one stays as `previous`
        (for late reports) until the next reset, its totals in history."""
        start, end = self._periods_at(entry, now)
        if start <= entry.current.start:
            return False
        entry.previous = entry.current
        entry.current = self._period(entry.limits, entry.hard_limits, start, end)
        _record_history(entry, entry.previous)
        entry.announced, entry.exceeded_announced = 0, False
        entry.burn, entry.forecast_at, entry.forecast_named, entry.forecast_announced = None, None, None, False
        entry.changed()
        return True

    def tick(self, now_ts: float, now: datetime) -> list[BudgetEntry]:
        """Period rollover and presumed-dead proxies, for every budget; returns the changed ones."""
        changed = []
        for entry in self.entries.values():
            rolled = self.roll(entry, now)
            # Only the open period expires proxies: a finished one keeps what was reported (its
            # history must not charge escrow of proxies that simply moved on to the new period).
            dead = entry.current.ledger.expire(now_ts)
            if entry.current.hard is not None:
                dead = sorted(set(dead) | set(entry.current.hard.expire(now_ts)))
            if dead:
                entry.current.usage.retire(dead)
                entry.changed()
            if rolled or dead:
                changed.append(entry)
        return changed

    # -- the report --------------------------------------------------------------------------------------

    def report(self, entry: BudgetEntry, proxy_id: str, seq: int, rep: BudgetReport, now_ts: float,
               now: datetime) -> tuple[dict[str, Any], int]:
        """Apply one budget's part of a report. Returns (the answer, the version that must be
        persisted before it may be sent: 0 when nothing needs to wait)."""
        self.roll(entry, now)
        cur = entry.current
        if rep.period_start == cur.start:
            returning = proxy_id in cur.ledger.tombstones
            lease = cur.ledger.report(proxy_id, seq, rep.used, rep.held, rep.want, now_ts, rep.release_to, rep.need,
                                      rep.smallest_admitted)
            hard = cur.hard.report(proxy_id, seq, rep.used, rep.held, rep.want, now_ts, rep.hard_release_to) \
                if cur.hard is not None else None
            if not lease.duplicate:
                cur.usage.report(proxy_id, rep.breakdown, returning)
                version = entry.changed()
                if lease.granted or hard is not None and hard.granted:
                    cur.raised[proxy_id] = version
                _observe_burn(entry, now_ts)
        elif entry.previous is not None and rep.period_start == entry.previous.start:
            # Late numbers for the period that just ended count there; the lease is the current one's.
            prev = entry.previous
            old = prev.ledger.proxies.get(proxy_id)
            if old is None or seq > old.seq:
                returning = proxy_id in prev.ledger.tombstones
                prev.ledger.report(proxy_id, seq, rep.used, rep.held, Amount(), now_ts)
                prev.usage.report(proxy_id, rep.breakdown, returning)
                # Nothing more can be committed in a finished period: no escrow stays behind (the
                # proxy's in-flight requests settle into the new period).
                prev_acct = prev.ledger.proxies[proxy_id]
                prev_acct.ceiling = Ceiling.committed(entry.limits, prev_acct.used)
                if prev.hard is not None:
                    prev.hard.report(proxy_id, seq, rep.used, rep.held, Amount(), now_ts)
                    prev_hard_acct = prev.hard.proxies[proxy_id]
                    prev_hard_acct.ceiling = Ceiling.committed(prev.hard.limits, prev_hard_acct.used)
                _record_history(entry, prev)
                entry.changed()
            acct = cur.ledger.proxies.get(proxy_id)
            if acct is not None:
                lease_ceiling, expires = acct.ceiling, acct.expires_at
            else:
                lease = cur.ledger.report(proxy_id, seq, Amount(), Amount(), rep.want, now_ts, need=rep.need)
                hard = cur.hard.report(proxy_id, seq, Amount(), Amount(), rep.want, now_ts) if cur.hard is not None else None
                version = entry.changed()
                if lease.granted or hard is not None and hard.granted:
                    cur.raised[proxy_id] = version
                lease_ceiling, expires = lease.ceiling, lease.expires_at
            hard_acct = cur.hard.proxies.get(proxy_id) if cur.hard is not None else None
            return self._committed(entry, self._answer(entry, lease_ceiling, expires,
                                                       hard_acct.ceiling if hard_acct is not None else None), proxy_id)
        else:
            answer = self._answer(entry, None, None)
            answer["error"] = (f"period {rep.period_start[:40]} is not open; the current period starts "
                               f"{cur.start}")
            return answer, 0
        return self._committed(entry, self._answer(entry, lease.ceiling, lease.expires_at,
                                                   hard.ceiling if hard is not None else None), proxy_id)

    @staticmethod
    def _committed(entry: BudgetEntry, answer: dict[str, Any], proxy_id: str) -> tuple[dict[str, Any], int]:
        """(answer, the version to persist before sending it). A cut-off answer goes at once: the
        proxy admits nothing on a cut-off budget, so a ceiling in it that a crash might forget can
        never be spent (lifting the cut-off takes a later answer, which carries the ceiling again)."""
        if entry.spec.onExceeded.value == "CutOff" and answer["state"] == BudgetState.EXCEEDED.value:  # = exhausted
            return answer, 0
        return answer, entry.current.raised.get(proxy_id, 0)

    def _answer(self, entry: BudgetEntry, ceiling: Ceiling | None, expires_at: float | None,
                hard: Ceiling | None = None) -> dict[str, Any]:
        spec = entry.spec
        used = entry.current.ledger.used()  # once: it sums every proxy's account
        fraction, exhausted = entry.fraction(used), entry.current.ledger.exhausted(used)
        _, state = budget_state(spec, fraction, exhausted)
        out: dict[str, Any] = {}
        if ceiling is not None:
            out["ceiling"] = ceiling.to_state()
            out["expiresAt"] = expires_at
        if hard is not None:
            out["hardCeiling"] = hard.to_state()
        cur = entry.current
        out.update({"periodStart": cur.start, "periodEnd": cur.end, "state": state.value,
                    "onExceeded": spec.onExceeded.value, "failMode": spec.failMode.value,
                    "admittedWindow": self.settings.admitted_window,
                    "cutOff": (spec.onExceeded.value == "CutOff" and exhausted)
                    or (cur.hard is not None and cur.hard.exhausted())})  # Downgrade past its hard ceiling
        if not out["cutOff"] and fraction >= TAIL_FRACTION:
            # The last few percent: every proxy must hear of the cut-off within a second of it.
            out["reportInterval"] = TAIL_REPORT_INTERVAL
        return out

    def persisted(self, entry: BudgetEntry, version: int) -> None:
        """A flush that wrote the state as of `version` succeeded."""
        entry.persisted = max(entry.persisted, version)
        for pl in (entry.current, entry.previous):
            if pl is not None:
                pl.raised = {p: v for p, v in pl.raised.items() if v > version}

    # -- status ----------------------------------------------------------------------------------------

    def status(self, entry: BudgetEntry, now: datetime) -> dict[str, Any]:
        """The ledger-owned status fields (render/status.LEDGER_FIELDS) and the conditions with
        Exceeded set, computed with the same function the reconcile uses."""
        used = usage_dict(entry.current.ledger.used())
        out = usage_status(entry.spec, used, entry.conditions, entry.current.end, entry.generation, now,
                           short_of=entry.short_of())
        ledger = {**entry.current.to_state(), "writer": self.writer}
        if entry.previous is not None:
            ledger["previous"] = entry.previous.to_state()
        if entry.burn is not None:
            ledger["burn"] = entry.burn.to_state()
        entry.forecast_at = _forecast(entry, now)
        out.update({"ledger": ledger, "history": entry.history[:HISTORY_MAX], "forecastExhaustion": entry.forecast_at,
                    "breakdown": entry.current.usage.merged().to_wire()})
        out["conditions"] = _forecast_condition(entry, out["conditions"], now)
        return out

    def events(self, entry: BudgetEntry) -> list[tuple[str, str]]:
        """(reason, message) for thresholds crossed since the last call; each crossing once. A raised
        limit that takes the budget back below a threshold (or out of Exceeded) re-arms it: crossing
        it again in the same period is news again."""
        percent, state = entry.state()
        out = []
        crossed = max([t for t in entry.spec.thresholds if percent >= t], default=0)
        entry.announced = min(entry.announced, crossed)
        if state != BudgetState.EXCEEDED:
            entry.exceeded_announced = False
        if crossed > entry.announced:
            entry.announced = crossed
            out.append(("ThresholdCrossed", f"{percent}% of budget {entry.name} used (threshold {crossed}%) "
                                            f"in the period ending {entry.current.end}"))
        if state == BudgetState.EXCEEDED and not entry.exceeded_announced:
            entry.exceeded_announced = True
            why = entry.short_of()
            out.append(("BudgetExceeded", f"budget {entry.name} exhausted ({percent}%{': ' + why if why else ''}); "
                                          f"onExceeded={entry.spec.onExceeded.value} until {entry.current.end}"))
        if entry.forecast_at is not None and not entry.forecast_announced:
            entry.forecast_announced = True
            out.append(("ForecastExhaustion", f"budget {entry.name} ({percent}% used) runs out around "
                                              f"{entry.forecast_at} at the recent burn rate, before the period "
                                              f"ends at {entry.current.end}"))
        return out


    def status_gauges(self, entry: BudgetEntry) -> tuple[int, str]:
        percent, state = entry.state()
        return percent, state.value


def _record_history(entry: BudgetEntry, pl: PeriodLedger) -> None:
    """Put (or refresh: late reports) a finished period's totals in history, newest first."""
    total = pl.total()
    rest = [h for h in entry.history if h.get("periodStart") != pl.start]
    entry.history = sorted(rest + [total], key=lambda h: h.get("periodStart", ""), reverse=True)[:HISTORY_MAX]


def _condition(conditions: Any, type_: str) -> Any:
    for cond in conditions or []:
        if cond.get("type") == type_:
            return (cond.get("status"), cond.get("reason"))
    return None


FORECAST_CONDITION = "ForecastExhausted"


@functools.lru_cache(maxsize=256)  # period bounds: a few distinct strings, parsed on every report
def _ts(rfc3339: str) -> float:
    return datetime.strptime(rfc3339, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def _observe_burn(entry: BudgetEntry, now_ts: float) -> None:
    """Offer the recent burn rate a sample (it takes one at most every tau/8)."""
    cur = entry.current
    start, end = _ts(cur.start), _ts(cur.end)
    if entry.burn is None:
        entry.burn = BurnRate.at_period_start(start)
    tau = time_constant(start, end)
    if now_ts - entry.burn.at >= tau / 8:
        entry.burn.observe(now_ts, float(entry.fraction()), tau)


def _forecast(entry: BudgetEntry, now: datetime) -> str | None:
    """When the budget runs out at the recent burn rate, if within the period."""
    cur = entry.current
    if entry.exhausted():
        return None  # already, possibly short of the limit, where a projection to 100% means nothing
    start, end = _ts(cur.start), _ts(cur.end)
    at = projected_exhaustion(entry.burn or BurnRate.at_period_start(start), float(entry.fraction()),
                              now.timestamp(), start, end)
    return now_rfc3339(datetime.fromtimestamp(at, UTC)) if at is not None else None


def _forecast_condition(entry: BudgetEntry, conditions: list[dict], now: datetime) -> list[dict]:
    """ForecastExhausted: True while the recent burn rate exhausts the budget before the period ends.
    The message names the projected time, but moves it only when the projection moved by more than
    a tenth of the time left to it (or a minute): a wobbling rate does not rewrite the condition at
    every flush (status.forecastExhaustion has the exact, current projection)."""
    end = entry.current.end
    if entry.forecast_at is not None:
        at, now_ts = _ts(entry.forecast_at), now.timestamp()
        named = entry.forecast_named
        if named is None or abs(at - named) > max(60.0, (at - now_ts) / 10):
            entry.forecast_named = named = at
        around = now_rfc3339(datetime.fromtimestamp(named, UTC))
        return set_condition(conditions, FORECAST_CONDITION, "True", "BurnRate",
                             f"at the recent burn rate the budget runs out around {around}, before the period ends "
                             f"at {end}", entry.generation, now)
    entry.forecast_named = None
    if entry.exhausted():
        return set_condition(conditions, FORECAST_CONDITION, "False", "Exhausted",
                             f"the budget is already exhausted until {end}", entry.generation, now)
    return set_condition(conditions, FORECAST_CONDITION, "False", "WithinPeriod",
                         f"at the recent burn rate the budget lasts until the period ends at {end}", entry.generation, now)


def replace_patch(old: Any, new: Any) -> Any:
    """A JSON merge patch that turns `old` into exactly `new`: merge patches merge objects, so keys
    that disappeared (an expired proxy) must be sent as null to be removed."""
    if not isinstance(new, dict):
        return new
    out = {k: (replace_patch(old.get(k), v) if isinstance(old, dict) else v) for k, v in new.items()}
    if isinstance(old, dict):
        out.update({k: None for k in old if k not in new})
    return out
