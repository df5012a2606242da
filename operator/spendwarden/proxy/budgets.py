"""Local budget enforcement: one Allowance per TokenBudget, periods, admission and a state file.

Everything here that runs per request is synchronous (no await between checking and reserving),
which is what makes reservations atomic in the single-threaded event loop.

Standalone, the allowance is the whole budget for the current period and usage survives restarts
through the state file (atomic write: temp file + rename; debounced; and at shutdown).

With a ledger (ledger_client.py), each budget carries a LeaseView and the allowance's limits are the
lease ceiling the operator granted this process; used is this process's cumulative usage in the
period (a new process is a new proxy to the ledger, so the state file is neither read nor written).
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..enums import FailMode, OnExceeded
from ..ledger.allowance import Allowance, Amount, Limits, RecentLeast, clamp_output, hard_ceiling
from ..ledger.breakdown import Breakdown
from ..ledger.periods import current_period
from ..ledger.pricing import Prices, TokenUsage, cost
from .config import BackendRt, BudgetRt, RouteRt
from .errors import ProxyError

log = logging.getLogger("spendwarden.proxy")

# A clamped request must still be allowed at least this many output tokens, else it is refused.
MIN_USEFUL_OUTPUT = 16
STATE_VERSION = 1


@dataclass(slots=True, eq=False)
class LeaseView:
    """This process's side of one budget's lease (ledger mode only); written by the ledger client."""

    whole: Limits              # the budget's own limits: what an Open budget enforces on its own
    fail_closed: bool
    valid_until: float = 0.0   # proxy clock: the lease's expiresAt minus the clock margin
    ceiling: Limits | None = None  # None: never granted
    cut_off: bool = False
    exceeded: bool = False     # the operator says the budget is Exceeded (AlertOnly marking)
    down: bool = False         # the last report about this budget went unanswered
    local: bool = False        # Open and expired: enforcing the whole budget on local accounting
    last_admit: float = 0.0
    released_at: float = -1.0  # last_admit when the lease was last released (once per idle spell)
    want: Amount | None = None  # worst cases of requests waiting for a bigger lease (next report)
    need: Amount | None = None  # the smallest of them, clamped to the least useful output
    # The smallest request admitted lately, measured like `need` (the minimum over the window the
    # ledger's answers announce, reported with every report): the ledger finds the budget spent only
    # when not even that fits (ledger/leases.py: recently, not this period, and why).
    admitted: RecentLeast = field(default_factory=RecentLeast)
    previous: tuple[datetime, Amount] | None = None  # a finished period's final usage, not yet reported
    previous_breakdown: Breakdown | None = None  # ...and where it went (route, backend, tag)


@dataclass(slots=True, eq=False)
class BudgetState:
    budget: BudgetRt
    allowance: Allowance
    period_start: datetime
    period_end: datetime
    period_end_ts: float
    lease: LeaseView | None = None  # None: standalone
    # Downgrade's hard ceiling as enforced now against used + reserved (None: no ceiling):
    # standalone the spec's; with a ledger the hard lease (zero until granted).
    hard: Limits | None = None
    # This period's usage per (route, backend, tag), cumulative like allowance.used (reported with it).
    breakdown: Breakdown = field(default_factory=Breakdown)

    def reset_at(self) -> str:
        return self.period_end.strftime("%Y-%m-%dT%H:%M:%SZ")

    def hard_view(self) -> Allowance | None:
        """The allowance as the hard ceiling sees it (same usage and reservations)."""
        if self.hard is None:
            return None
        return Allowance(self.hard, used=self.allowance.used, reserved=self.allowance.reserved)

    def sync_hard(self) -> None:
        whole = hard_ceiling(self.budget.spec)
        if whole is None or self.lease is None or self.lease.local:
            self.hard = whole
        elif self.hard is None or _dims(zero_limits(self.hard)) != _dims(zero_limits(whole)):
            self.hard = zero_limits(whole)  # nothing past the limit before the ledger grants it


class LeaseShort(Exception):
    """A request does not fit the current lease of these budgets (or there is no valid lease yet):
    ask the ledger for `amount` more and admit again (server.py waits a short while)."""

    def __init__(self, states: list[BudgetState], amount: Amount, need: Amount | None = None):
        super().__init__("lease too small")
        # amount: the request's worst case; need: the least that would still admit it (output clamped)
        self.states, self.amount, self.need = states, amount, need if need is not None else amount


@dataclass(slots=True)
class Admission:
    backend: BackendRt
    max_output: int | None  # per choice; None: leave the request's own value alone
    holds: list[tuple[BudgetState, int]] = field(default_factory=list)
    downgraded: bool = False
    over_budget: list[str] = field(default_factory=list)  # AlertOnly budgets this request overruns
    tag: str = ""  # the request's scenario tag, for the breakdown (set by the caller)
    workload: str = ""  # the gateway's authenticated ServiceAccount, for the breakdown
    choices: int = 1  # the output is max_output per choice
    reserved: Amount | None = None  # what the budgets hold for it (None: no budget applies)


class BudgetBook:
    def __init__(self, state_file: str | None = None, clock: Any = time.time):
        self.state_file = state_file
        self.clock = clock
        self.states: dict[str, BudgetState] = {}
        self.dirty = False
        self._saved: dict[str, Any] = {}
        # Ledger mode: budgets get LeaseViews (set by LedgerClient before the first sync).
        self.ledger = False
        if state_file and os.path.exists(state_file):
            try:
                with open(state_file, encoding="utf-8") as f:
                    data = json.load(f)
                if data.get("version") == STATE_VERSION:
                    self._saved = data.get("budgets", {})
            except (OSError, ValueError) as exc:
                log.error("cannot read state file %s: %s; starting from zero usage", state_file, exc)

    # -- configuration ----------------------------------------------------------------------------

    def sync(self, budgets: dict[str, BudgetRt]) -> None:
        """Create/update states for the configured budgets (usage kept when the period is unchanged)."""
        now = datetime.fromtimestamp(self.clock(), UTC)
        states: dict[str, BudgetState] = {}
        for name, b in budgets.items():
            start, end = current_period(b.spec, now)
            limits = Limits.from_spec(b.spec.limits)
            old = self.states.get(name)
            if old is not None:
                old.budget = b
                if self.ledger:
                    _lease_for(old, limits)
                else:
                    old.lease = None
                    old.allowance.limits = limits
                if old.period_start != start:
                    if old.lease is not None:
                        _new_period_lease(old)
                    old.allowance.reset()
                    old.breakdown = Breakdown()
                    self.dirty = True
                old.period_start, old.period_end, old.period_end_ts = start, end, end.timestamp()
                old.sync_hard()
                states[name] = old
                continue
            used = Amount()
            saved = self._saved.get(name)
            if saved and saved.get("periodStart") == _iso(start) and not self.ledger:
                used = Allowance.amount_from_state(saved)
            st = states[name] = BudgetState(b, Allowance(limits, used=used), start, end, end.timestamp())
            if self.ledger:
                _lease_for(st, limits)
            st.sync_hard()
        self.states = states
        self.dirty = True

    def roll(self) -> None:
        """Start new periods for budgets whose period ended."""
        now_ts = self.clock()
        for st in self.states.values():
            if now_ts >= st.period_end_ts:
                self._roll_one(st, now_ts)

    def _roll_one(self, st: BudgetState, now_ts: float) -> None:
        start, end = current_period(st.budget.spec, datetime.fromtimestamp(now_ts, UTC))
        if start != st.period_start:
            log.info("budget %s: new period %s .. %s", st.budget.name, _iso(start), _iso(end))
            if st.lease is not None:
                _new_period_lease(st)
            st.allowance.reset()
            st.breakdown = Breakdown()
        st.period_start, st.period_end, st.period_end_ts = start, end, end.timestamp()
        self.dirty = True

    # -- per request (synchronous) ------------------------------------------------------------------

    def admit(self, route: RouteRt, backend: BackendRt, input_tokens: int, requested_output: int | None,
              choices: int, downgrade_to: BackendRt | None, may_wait: bool = False) -> Admission:
        """Decide and reserve for one upstream attempt. Raises ProxyError(429) when refused.

        `requested_output` is the per-choice output cap that will be sent upstream (never None when
        a budget applies); `downgrade_to` is the compatible backend to use for Downgrade budgets.
        Ledger mode: raises LeaseShort (only when `may_wait`) when the request does not fit a lease
        that the ledger might still raise; ProxyError(503) for a Closed budget whose lease expired.
        """
        states = [self.states[b.name] for b in route.budgets if b.name in self.states]
        if not states:
            return Admission(backend, requested_output, choices=choices)
        now_ts = self.clock()
        for st in states:
            if now_ts >= st.period_end_ts:
                self._roll_one(st, now_ts)
        assert requested_output is not None
        want = requested_output
        if self.ledger:
            self._lease_checks(states, backend, input_tokens, want, choices, downgrade_to, may_wait, now_ts)
        downgraded = False
        # Downgrade budgets: when this request does not fit, move it to the cheap backend.
        for st in states:
            if st.budget.on_exceeded is OnExceeded.DOWNGRADE and downgrade_to is not None \
                    and backend is not downgrade_to:
                cap = st.allowance.max_output_tokens(backend.prices, input_tokens)
                if st.lease is not None and st.lease.exceeded:
                    cap = -1  # the operator says the budget is spent: only the cheap backend is left
                if cap is not None and cap < want * choices:
                    backend, downgraded = downgrade_to, True
                    break
        prices = backend.prices
        # CutOff budgets: clamp the output to what is affordable, or refuse.
        # Downgrade budgets with a hard ceiling: the same, against the ceiling.
        tightest: BudgetState | None = None
        cap_total: int | None = None
        by_hard = False
        for st in states:
            caps = []
            if st.budget.on_exceeded is OnExceeded.CUT_OFF or (
                    st.budget.on_exceeded is OnExceeded.DOWNGRADE and downgrade_to is None):
                caps.append((st.allowance.max_output_tokens(prices, input_tokens), False))
            hard = st.hard_view()
            if hard is not None:
                caps.append((hard.max_output_tokens(prices, input_tokens), True))
            for cap, is_hard in caps:
                if cap is not None and (cap_total is None or cap < cap_total):
                    cap_total, tightest, by_hard = cap, st, is_hard
        out = want
        if cap_total is not None:
            per_choice = cap_total // max(choices, 1)
            clamped = clamp_output(want, per_choice, MIN_USEFUL_OUTPUT)
            if clamped is None:
                assert tightest is not None
                raise budget_exceeded(tightest, now_ts, hard=by_hard)
            out = clamped
        amount = Amount.worst_case(prices, input_tokens, out * choices)
        adm = Admission(backend, out, downgraded=downgraded, choices=choices, reserved=amount)
        for st in states:
            enforced = st.budget.on_exceeded is OnExceeded.CUT_OFF or (
                st.budget.on_exceeded is OnExceeded.DOWNGRADE and downgrade_to is None)
            hard = st.hard_view()
            if hard is not None and not hard.covers(amount):  # cannot happen after the clamp either
                self.release(adm)
                raise budget_exceeded(st, now_ts, hard=True)
            rid = st.allowance.reserve(amount, force=not enforced)
            if rid is None:  # cannot happen after the clamp above; refuse rather than overspend
                self.release(adm)
                raise budget_exceeded(st, now_ts)
            if not enforced and (st.lease.exceeded if st.lease is not None and not st.lease.local
                                 else not st.allowance.covers(Amount())):
                adm.over_budget.append(st.budget.name)
            adm.holds.append((st, rid))
        if self.ledger:
            _note_admitted(states, least_reservation(prices, input_tokens, want, choices), downgraded, now_ts)
        return adm

    def _lease_checks(self, states: list[BudgetState], backend: BackendRt, input_tokens: int, want: int,
                      choices: int, downgrade_to: BackendRt | None, may_wait: bool, now_ts: float) -> None:
        output = want * choices
        short: list[BudgetState] = []
        worst: Amount | None = None
        for st in states:
            lease = st.lease
            if lease is None:
                continue
            lease.last_admit = now_ts
            on = st.budget.on_exceeded
            enforced = on is OnExceeded.CUT_OFF or (on is OnExceeded.DOWNGRADE and downgrade_to is None)
            if lease.cut_off and (enforced or st.hard is not None):
                raise budget_exceeded(st, now_ts, hard=not enforced)
            if now_ts >= lease.valid_until:
                if may_wait and not lease.down:
                    # Expired while the ledger still answers (the first lease is on its way): wait.
                    short.append(st)
                    continue
                if lease.fail_closed:
                    raise ledger_unreachable(st)
                if not lease.local:
                    # failMode Open: carry on alone against the whole budget; usage is reported later.
                    log.warning("budget %s: lease expired and the ledger is unreachable; failMode Open: "
                                "enforcing the whole budget on this proxy's own accounting", st.budget.name)
                    lease.local = True
                    st.allowance.limits = lease.whole
                    st.sync_hard()
                continue
            if may_wait and on is not OnExceeded.ALERT_ONLY:
                if worst is None:
                    worst = Amount.worst_case(backend.prices, input_tokens, output)
                # A Downgrade budget the operator calls Exceeded goes straight to the cheap backend:
                # no round trip for a lease it will not get; only its hard ceiling can still grow.
                past_limit = on is OnExceeded.DOWNGRADE and lease.exceeded
                hard = st.hard_view()
                if (not past_limit and not st.allowance.covers(worst)) or (hard is not None and not hard.covers(worst)):
                    short.append(st)
        if short:
            raise LeaseShort(short, worst if worst is not None else
                             Amount.worst_case(backend.prices, input_tokens, output),
                             least_reservation(backend.prices, input_tokens, want, choices))

    def release(self, adm: Admission) -> None:
        for st, rid in adm.holds:
            st.allowance.release(rid)
        adm.holds = []

    def settle(self, adm: Admission, prices: Prices, usage: TokenUsage | None) -> None:
        """Record real usage; None means unknown: the whole reservation is charged."""
        amount = None if usage is None else Amount(usage.input_tokens, usage.output_tokens, cost(prices, usage))
        for st, rid in adm.holds:
            before = st.allowance.used
            if amount is None:
                st.allowance.settle_reserved(rid)
            else:
                st.allowance.settle(rid, amount)
            # What was charged, whichever way: the breakdown always adds up to `used`.
            st.breakdown.add(adm.backend.route, adm.backend.name, adm.tag, st.allowance.used - before,
                             workload=adm.workload)
        adm.holds = []
        self.dirty = True

    # -- persistence --------------------------------------------------------------------------------

    def state_doc(self) -> dict[str, Any]:
        budgets = dict(self._saved)
        for name, st in self.states.items():
            budgets[name] = {"periodStart": _iso(st.period_start), "periodEnd": _iso(st.period_end),
                             **st.allowance.used_state()}
        return {"version": STATE_VERSION, "budgets": budgets}

    def save(self, fsync: bool = False) -> None:
        if not self.state_file or not self.dirty or self.ledger:
            return
        self.dirty = False
        doc = self.state_doc()
        directory = os.path.dirname(os.path.abspath(self.state_file))
        try:
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".spendwarden-state-")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1, sort_keys=True)
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, self.state_file)
        except OSError as exc:
            self.dirty = True
            log.error("cannot write state file %s: %s", self.state_file, exc)

    def shutdown(self) -> None:
        """Charge reservations whose outcome will never be known, then save."""
        for st in self.states.values():
            if st.allowance.open_reservations:
                st.allowance.charge_open_reservations()
                self.dirty = True
        self.save(fsync=True)


def least_reservation(prices: Prices, input_tokens: int, want: int, choices: int) -> Amount:
    """The least a request may reserve and still be admitted: its prompt and, per choice, the output a
    clamp may not go below (`need` in the ledger protocol)."""
    return Amount.worst_case(prices, input_tokens, min(want, MIN_USEFUL_OUTPUT) * choices)


def _note_admitted(states: list[BudgetState], need: Amount, downgraded: bool, now_ts: float) -> None:
    """Lower the leases' smallest admitted request to `need`. Not for AlertOnly budgets (they never
    refuse), nor for a Downgrade budget's downgraded request (past its limit: not what it covers), nor
    for a request that reserves no tokens at all (it fits any budget, so it proves nothing)."""
    if need.total_tokens == 0:
        return
    for st in states:
        lease, on = st.lease, st.budget.on_exceeded
        if lease is None or on is OnExceeded.ALERT_ONLY or (downgraded and on is OnExceeded.DOWNGRADE):
            continue
        lease.admitted.note(need, now_ts)


def budget_exceeded(st: BudgetState, now_ts: float, hard: bool = False) -> ProxyError:
    lease = st.lease
    spent = lease is None or lease.local or lease.cut_off or (lease.exceeded and not hard)
    if not spent:
        # Ledger mode, the budget is not spent: the rest is escrowed by other proxies' requests in
        # flight, which settle below their worst cases and give back, or too little for this request
        # while smaller ones still fit. Worth retrying soon.
        return ProxyError(
            429, f"TokenBudget {st.budget.name!r} has no room for this request right now: what is left of it "
                 f"is held by requests in flight or too little for this request; retry shortly (the budget "
                 f"resets at {st.reset_at()}).",
            code="budget_exceeded", headers={"Retry-After": "1", "x-should-retry": "true"},
            extra={"budget": st.budget.name, "reset_at": st.reset_at()})
    retry = max(1, math.ceil(st.period_end_ts - now_ts))
    what = ("is past its limit and has reached its hard ceiling (downgrade.hardCeiling)" if hard
            else "is exhausted")
    return ProxyError(
        429, f"TokenBudget {st.budget.name!r} {what} for this period; it resets at {st.reset_at()}.",
        code="budget_exceeded",
        # The SDKs retry 429s (twice, by default) unless told not to: pointless until the period resets.
        headers={"Retry-After": str(retry), "x-should-retry": "true" if retry <= 60 else "false"},
        extra={"budget": st.budget.name, "reset_at": st.reset_at()})


def ledger_unreachable(st: BudgetState) -> ProxyError:
    return ProxyError(
        503, f"TokenBudget {st.budget.name!r} has failMode Closed and the spendwarden ledger (operator) is "
             f"unreachable: this proxy's lease on the budget expired, so requests are refused until the "
             f"ledger answers again.",
        code="ledger_unreachable", headers={"Retry-After": "5"}, extra={"budget": st.budget.name},
        outcome="rejected")


def _lease_for(st: BudgetState, whole: Limits) -> None:
    """Give `st` a LeaseView (or update its budget limits); limits follow the lease, not the budget."""
    fail_closed = st.budget.spec.failMode == FailMode.CLOSED
    lease = st.lease
    if lease is None:
        # Nothing may be committed before the operator grants a lease: a zero ceiling.
        st.lease = lease = LeaseView(whole=whole, fail_closed=fail_closed)
        st.allowance.limits = zero_limits(whole)
        return
    lease.whole, lease.fail_closed = whole, fail_closed
    if lease.local:
        st.allowance.limits = whole
    elif lease.ceiling is not None:
        # Dimensions the budget no longer limits are dropped; newly limited ones wait for a grant.
        st.allowance.limits = Limits(*(None if w is None else (c if c is not None else z) for w, c, z in zip(
            _dims(whole), _dims(lease.ceiling), _dims(zero_limits(whole)))))
        lease.ceiling = st.allowance.limits
    else:
        st.allowance.limits = zero_limits(whole)


def _new_period_lease(st: BudgetState) -> None:
    """A lease belongs to its period: the new one starts with nothing until the ledger grants.
    Called before the allowance is reset: the old period's final usage is reported once more."""
    lease = st.lease
    assert lease is not None
    lease.previous = (st.period_start, st.allowance.used)
    lease.previous_breakdown = st.breakdown
    lease.ceiling, lease.valid_until, lease.local, lease.cut_off, lease.exceeded = None, 0.0, False, False, False
    lease.admitted.clear()
    st.allowance.limits = zero_limits(lease.whole)
    if st.hard is not None:
        st.hard = zero_limits(st.hard)


def zero_limits(whole: Limits) -> Limits:
    return Limits(*(None if v is None else type(v)(0) for v in _dims(whole)))


def _dims(lim: Limits) -> tuple[Any, Any, Any, Any]:
    return lim.total_tokens, lim.input_tokens, lim.output_tokens, lim.cost


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
