"""The operator's side of the budget ledger: leases that let many proxies share one budget exactly.

Pure and synchronous (no I/O, no clock: `now` is passed in), so the arithmetic is property-tested.

Model. For each proxy p the ledger keeps what p reported and what p was granted, all cumulative
within the period:
  used_p     usage p has settled (cumulative, as p reports it: a retried report cannot count twice),
  held_p     p's reservations in flight at its last report,
  ceiling_p  the most p may ever commit (used + held) in this period.
A proxy admits a request only while used + held + worst_case <= ceiling (its local Allowance with
limits = ceiling). The operator only ever RAISES a ceiling (a grant); only the proxy lowers it (a
release: it lowers its local ceiling first, then reports it), so a grant never races a proxy that
is committing against the old value.

Invariant, per limited dimension (total, input, output tokens; cost):
  retired + sum over p of max(ceiling_p, used_p) <= limit
where `retired` is what proxies that are gone consumed. It holds by construction: a grant is capped
by the headroom left under the limit. Only a provider billing more than was reserved (used_p above
ceiling_p) can exceed it, and that is real spend, so it is recorded, never hidden.

Leases expire: a proxy must stop admitting new requests at its lease's expiry unless renewed. A
proxy silent for longer than expiry + grace is presumed dead: its whole escrow (the ceiling) is
charged as used, because requests it had in flight may have been billed upstream. If it reports
again after all (a partition), the charge is reconciled against its real cumulative usage.

The end of a budget. A proxy that cannot fit a request asks with `want` (what its waiting requests
would like) and `need` (the smallest of them, clamped to the least useful output), and gives back its
own free escrow in the same report. A `need` is granted whole or not at all: a partial grant would
only strand a fragment no request fits, while fragments given back collect in the pool until one
fits. A budget is SPENT (exhausted: CutOff refuses everything) when it is used up in a limited
dimension, or when what is left of it (limit - used, so even with every lease given back and every
request in flight settled at nothing) cannot cover the smallest request the team makes: in some
limited dimension it is below the per-dimension minimum of
  - the smallest need any proxy could not get in the last `horizon` seconds (at least one is
    required: without a request refused for lack of budget nothing proves the budget spent), and
  - the smallest request the proxies ADMITTED recently, measured like `need` (its least possible
    reservation: prompt, least useful output, their cost), which each proxy reports as the minimum
    over its last `admitted_window` seconds (`smallest_admitted`; older proxies send a cumulative
    minimum, or none, and then the unmet needs alone decide). Recently, not this period: a small
    request made once, early, would otherwise keep a budget whose every request now needs more than
    is left out of the spent state for the rest of the period, refusing everything with 'retry
    shortly' and never telling anyone it is spent (seen in the demo, where the local backend's
    prompt calibration made later requests need twice what the first one did).
So one huge prompt that cannot fit what is left does not cut off a team whose ordinary requests
still fit; a team whose every request is huge is spent once none fits. A need larger than the whole
limit never fits however much is left: it proves nothing and is left out. The minima are taken per
dimension (tokens from one request, cost from another, a zero-price backend's requests needing no
money), so they never overstate what the team needs: spent comes late rather than falsely.

Longer than 500 lines: the lease model above, its invariants and the one class that keeps them are
read together; split, each invariant would be argued in two files.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from .allowance import Amount, Limits, least

DIMENSIONS = ("total", "input", "output", "cost")
# A tombstone lets a proxy presumed dead by mistake (a partition) be reconciled when it reports again.
# Unbounded, every short-lived pod of a period left one in status: ~10,000 CronJob pods in a month
# exceed etcd's 1.5 MiB request limit, and then no status write (so no grant) succeeds. Past the bound
# the oldest go; their charge stays in `retired` (their usage still counts), and such a proxy, should
# it still come back, counts as a new one: its usage until then counts twice (more, never less).
MAX_TOMBSTONES = 256


def _dim(amount: Amount, dim: str) -> Any:
    if dim == "total":
        return amount.total_tokens
    if dim == "input":
        return amount.input_tokens
    if dim == "output":
        return amount.output_tokens
    return amount.cost


_LIMIT_FIELD = {"total": "total_tokens", "input": "input_tokens", "output": "output_tokens", "cost": "cost"}


def _limit(limits: Limits, dim: str) -> Any:
    return getattr(limits, _LIMIT_FIELD[dim])  # called ~17 times a report: no dict built per call


@dataclass(slots=True)
class Ceiling:
    """A per-dimension ceiling; None where the budget has no limit of that kind."""

    total: int | None = None
    input: int | None = None
    output: int | None = None
    cost: Decimal | None = None

    def get(self, dim: str) -> Any:
        return getattr(self, dim)

    def as_limits(self) -> Limits:
        return Limits(total_tokens=self.total, input_tokens=self.input, output_tokens=self.output, cost=self.cost)

    def to_state(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for dim in DIMENSIONS:
            value = self.get(dim)
            if value is not None:
                out[dim] = str(value) if dim == "cost" else value
        return out

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> Ceiling:
        return cls(total=data.get("total"), input=data.get("input"), output=data.get("output"),
                   cost=Decimal(str(data["cost"])) if data.get("cost") is not None else None)

    @classmethod
    def committed(cls, limits: Limits, amount: Amount) -> Ceiling:
        """The ceiling that covers exactly `amount` in every limited dimension."""
        return cls(**{dim: (_dim(amount, dim) if _limit(limits, dim) is not None else None) for dim in DIMENSIONS})


@dataclass(slots=True)
class ProxyAccount:
    used: Amount = field(default_factory=Amount)
    held: Amount = field(default_factory=Amount)
    ceiling: Ceiling = field(default_factory=Ceiling)
    seq: int = 0
    expires_at: float = 0.0
    # Recent spend rate in the budget's tightest dimension per second: sizes the next lease.
    rate: float = 0.0
    last_report_at: float | None = None
    # The smallest request p admitted this period (its least possible reservation; None: none
    # reported, e.g. an older proxy). The module docstring's end of a budget.
    smallest_admitted: Amount | None = None


@dataclass(slots=True)
class Lease:
    """The answer to a report: the proxy's new ceiling and its expiry."""

    ceiling: Ceiling
    expires_at: float
    granted: bool        # the ceiling was raised by this report
    duplicate: bool      # the report was a retry of one already applied


@dataclass(frozen=True, slots=True)
class Shortfall:
    """Why a budget is spent: in `dim` what is left (limit - used) is `left`, below `need`, the
    smallest request the team makes (the smaller of the smallest one that could not be granted and
    the smallest one admitted this period; None: the limit itself is reached)."""

    dim: str
    left: Any
    need: Any = None


@dataclass
class LeaseSettings:
    ttl: float = 10.0                  # a lease's lifetime; proxies renew about every second
    grace: float = 20.0                # silence beyond expiry before a proxy is presumed dead
    horizon: float = 5.0               # a lease should cover this many seconds of the proxy's recent spend
    min_share: Decimal = Decimal("0.01")  # the smallest slice worth granting: 1% of the limit...
    max_share: Decimal = Decimal("0.5")   # ...and never more than half of what is left to one proxy at once
    # How far back an admitted request still shows what the team makes (module docstring: The end of
    # a budget); proxies are told it in every answer and report their minimum over it.
    admitted_window: float = 60.0


class BudgetLedger:
    """One budget's ledger for one period."""

    def __init__(self, limits: Limits, settings: LeaseSettings | None = None):
        self.limits = limits
        self.settings = settings or LeaseSettings()
        self.proxies: dict[str, ProxyAccount] = {}
        self.retired = Amount()
        # Dead proxies' charges, kept for the period so a proxy that was only partitioned can be
        # reconciled when it reports again (proxy id -> (when it was presumed dead, what was charged
        # for it)), oldest first, at most MAX_TOMBSTONES.
        self.tombstones: dict[str, tuple[float, Amount]] = {}
        # The smallest request admitted recently by proxies presumed dead (their accounts are gone),
        # and when the last of them died: it counts for admitted_window from then.
        self.retired_admitted: Amount | None = None
        self.retired_admitted_at: float = 0.0
        # When the budget was last found spent (unix time; None while it is not): when CutOff began.
        self.exhausted_at: float | None = None
        # Needs that could not be granted, per proxy: (when, need). With the smallest admitted request
        # the smallest recent one decides whether what is left can still serve anything; `spent_for`
        # is the least request that proved it could not.
        self.unmet: dict[str, tuple[float, Amount]] = {}
        self.spent_for: Amount | None = None
        # When this operator instance restored the ledger (None: it started it). Not persisted.
        self.resumed_at: float | None = None

    # -- queries ---------------------------------------------------------------------------------

    def used(self) -> Amount:
        total = self.retired
        for acct in self.proxies.values():
            total = total + acct.used
        return total

    def smallest_admitted(self, now: float | None = None) -> Amount | None:
        """The per-dimension minimum of the requests admitted recently (None: none reported).
        `now`: leave out dead proxies' minimum once it is older than the window (None: keep it)."""
        smallest = self.retired_admitted
        if now is not None and now - self.retired_admitted_at > self.settings.admitted_window:
            smallest = None
        for acct in self.proxies.values():
            if acct.smallest_admitted is not None:
                smallest = least(smallest, acct.smallest_admitted)
        return smallest

    def committed(self, dim: str, exclude: str | None = None) -> Any:
        """retired + sum of max(ceiling, used) in one dimension."""
        total = _dim(self.retired, dim)
        for pid, acct in self.proxies.items():
            if pid == exclude:
                continue
            ceiling = acct.ceiling.get(dim)
            used = _dim(acct.used, dim)
            total += max(ceiling, used) if ceiling is not None else used
        return total

    def headroom(self, dim: str) -> Any:
        limit = _limit(self.limits, dim)
        if limit is None:
            return None
        return max(limit - self.committed(dim), 0)

    def exhausted(self, used: Amount | None = None) -> bool:
        """`used`: this ledger's used() if the caller has it already (it sums every proxy's account)."""
        return self.shortfall(used) is not None

    def shortfall(self, used: Amount | None = None) -> Shortfall | None:
        """Why the budget is spent (module docstring: The end of a budget), or None while it is not."""
        if used is None:
            used = self.used()
        for d in DIMENSIONS:
            limit = _limit(self.limits, d)
            if limit is not None and _dim(used, d) >= limit:
                return Shortfall(d, limit - _dim(used, d))
        if self.spent_for is None:
            return None
        dim = _short_of(self.limits, used, self.spent_for)
        if dim is None:
            return None
        return Shortfall(dim, _limit(self.limits, dim) - _dim(used, dim), _dim(self.spent_for, dim))

    def check_invariant(self) -> list[str]:
        """Dimensions where committed exceeds the limit (only possible when providers over-bill)."""
        return [d for d in DIMENSIONS if _limit(self.limits, d) is not None and self.committed(d) > _limit(self.limits, d)]

    # -- the report ------------------------------------------------------------------------------

    def report(self, proxy_id: str, seq: int, used: Amount, held: Amount, want: Amount | None, now: float,
               release_to: Ceiling | None = None, need: Amount | None = None,
               smallest_admitted: Amount | None = None) -> Lease:
        """Apply one proxy report and answer with its lease.

        used: the proxy's cumulative settled usage this period; held: its reservations in flight;
        want: what it would like to be able to commit on top of used + held (None: size it for me);
        release_to: the proxy has lowered its own ceiling to this and gives the rest back;
        need: the smallest waiting request (granted whole or not at all);
        smallest_admitted: the proxy's smallest admitted request this period (cumulative minimum).
        """
        acct = self.proxies.get(proxy_id)
        if acct is None:
            _, charged = self.tombstones.pop(proxy_id, (None, None))
            if charged is not None:
                # A presumed-dead proxy is back: its escrow moves from `retired` back to its account
                # (committed stays the same), and its own cumulative report is the truth from now on.
                self.retired = self.retired - charged
            acct = ProxyAccount(ceiling=Ceiling.committed(self.limits, charged or Amount()))
            self.proxies[proxy_id] = acct
        if seq <= acct.seq:
            return Lease(acct.ceiling, acct.expires_at, granted=False, duplicate=True)

        elapsed = now - acct.last_report_at if acct.last_report_at is not None else 0.0
        spent = _tightest_fraction(self.limits, used - acct.used)
        if elapsed > 0:
            # Exponentially weighted, so one burst does not size leases for a minute.
            acct.rate = 0.5 * acct.rate + 0.5 * (spent / elapsed)
        acct.seq = seq
        acct.used = _max_amount(acct.used, used)  # cumulative: never moves backwards
        acct.held = held
        acct.last_report_at = now
        # The proxy's minimum over its recent window (an older proxy's cumulative one): replaced, not
        # lowered, so a request admitted long ago stops counting (None: nothing admitted lately).
        acct.smallest_admitted = smallest_admitted
        if release_to is not None:
            acct.ceiling = _floor_ceiling(release_to, Ceiling.committed(self.limits, acct.used + acct.held))

        if need is not None and not self._fits(proxy_id, acct, need):
            # Nothing granted: the pool keeps what was given back until a waiting request fits it.
            acct.ceiling = self._kept(acct)
            granted = False
            self.unmet[proxy_id] = (now, need)
            self._check_spent(now)
        else:
            self.unmet.pop(proxy_id, None)
            granted = self._grant(proxy_id, acct, need if want is None and need is not None else want)
        acct.expires_at = now + self.settings.ttl
        self.note_exhaustion(now)
        return Lease(acct.ceiling, acct.expires_at, granted=granted, duplicate=False)

    def _room(self, proxy_id: str, acct: ProxyAccount, dim: str, limit: Any) -> tuple[Any, Any, Any, Any]:
        """(current ceiling, base, free escrow, unassigned headroom) of one proxy in one dimension."""
        current = acct.ceiling.get(dim) or 0
        floor = _dim(acct.used + acct.held, dim)
        base = max(current, floor)  # in-flight reservations stay covered whatever happens
        return current, base, max(current - floor, 0), max(limit - self.committed(dim, exclude=proxy_id) - base, 0)

    def _fits(self, proxy_id: str, acct: ProxyAccount, need: Amount) -> bool:
        """Whether this proxy's free escrow plus the unassigned headroom covers `need` everywhere."""
        for dim in DIMENSIONS:
            limit = _limit(self.limits, dim)
            if limit is not None:
                _, _, free, headroom = self._room(proxy_id, acct, dim, limit)
                if free + headroom < _dim(need, dim):
                    return False
        return True

    def _kept(self, acct: ProxyAccount) -> Ceiling:
        """The ceiling unchanged, except raised to cover what the proxy has committed (never lowered)."""
        committed_now = acct.used + acct.held
        return Ceiling(**{dim: (max(acct.ceiling.get(dim) or 0, _dim(committed_now, dim))
                                if _limit(self.limits, dim) is not None else None) for dim in DIMENSIONS})

    def _check_spent(self, now: float) -> None:
        # A request larger than the whole limit never fits, however much is left: it proves nothing.
        recent = [n for t, n in self.unmet.values()
                  if t >= now - self.settings.horizon and _short_of(self.limits, Amount(), n) is None]
        if not recent:
            return
        smallest = least(self.smallest_admitted(now), recent[0])
        for unmet in recent[1:]:
            smallest = least(smallest, unmet)
        if _short_of(self.limits, self.used(), smallest) is not None:
            self.spent_for = smallest

    def _grant(self, proxy_id: str, acct: ProxyAccount, want: Amount | None) -> bool:
        raised = False
        new = Ceiling()
        for dim in DIMENSIONS:
            limit = _limit(self.limits, dim)
            if limit is None:
                continue
            current, base, free, headroom = self._room(proxy_id, acct, dim, limit)
            target = self._target(dim, limit, acct, want, headroom + free)
            if free >= _dim(want, dim) if want is not None else free * 2 >= target:
                # Still half a slice free (or what was asked for): no top-up. Every raise must be
                # persisted before it is answered, so topping up on each report would make every
                # report wait for an apiserver write.
                extra = 0
            else:
                extra = min(max(target - free, 0), headroom)
            if dim != "cost":
                extra = int(extra)
            value = base + extra
            setattr(new, dim, value)
            raised = raised or value > current
        acct.ceiling = new
        return raised

    def _target(self, dim: str, limit: Any, acct: ProxyAccount, want: Amount | None, available: Any) -> Any:
        """How much free escrow this proxy should hold in `dim`."""
        s = self.settings
        fraction = Decimal(str(acct.rate * s.horizon))
        target = limit * min(max(fraction, s.min_share), Decimal(1)) if dim == "cost" else \
            int(limit * min(max(fraction, s.min_share), Decimal(1)))
        if want is not None:
            target = max(target, _dim(want, dim))
        # Near the end of a budget a slice would strand it in idle pods: cap by a share of what is
        # left, but never below what the proxy asked for (its next request must stay possible).
        cap = available * s.max_share if dim == "cost" else int(available * s.max_share)
        wanted = _dim(want, dim) if want is not None else 0
        return min(target, max(cap, wanted))

    def note_exhaustion(self, now: float) -> bool:
        """Record when the budget became spent (or forget it: a raised limit). True if it is spent."""
        spent = self.exhausted()
        if not spent:
            self.exhausted_at = self.spent_for = None
        elif self.exhausted_at is None:
            self.exhausted_at = now
        return spent

    # -- time ------------------------------------------------------------------------------------

    def resume(self, now: float) -> None:
        """A (re)started operator restored this ledger at `now`. While no operator listened, no
        proxy could report, so silence before now proves nothing: every restored account gets a
        full lease and the grace from now before it can be presumed dead (its escrow stays
        reserved until then, so the invariant is untouched)."""
        self.resumed_at = now

    def _death_deadline(self, acct: ProxyAccount) -> float:
        heard_until = acct.expires_at
        if self.resumed_at is not None:
            heard_until = max(heard_until, self.resumed_at + self.settings.ttl)
        return heard_until + self.settings.grace

    def expire(self, now: float) -> list[str]:
        """Presume silent proxies dead; charge their whole escrow. Returns their ids."""
        dead = [pid for pid, a in self.proxies.items() if now > self._death_deadline(a)]
        for pid in dead:
            acct = self.proxies.pop(pid)
            self.unmet.pop(pid, None)
            if acct.smallest_admitted is not None:
                fresh = now - self.retired_admitted_at <= self.settings.admitted_window
                self.retired_admitted = least(self.retired_admitted if fresh else None, acct.smallest_admitted)
                self.retired_admitted_at = now
            charge = _escrow_as_amount(self.limits, acct)
            self.retired = self.retired + charge
            self.tombstones[pid] = (now, charge)
        if dead:
            self._bound_tombstones()
            self.note_exhaustion(now)
        return dead

    def _bound_tombstones(self) -> None:
        """Forget the oldest tombstones past MAX_TOMBSTONES (their charge stays in `retired`)."""
        for pid in list(self.tombstones)[:max(len(self.tombstones) - MAX_TOMBSTONES, 0)]:
            del self.tombstones[pid]

    # -- persistence -----------------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        out = {
            "retired": _amount_state(self.retired),
            "proxies": {pid: _account_state(a) for pid, a in sorted(self.proxies.items())},
            "tombstones": {pid: {**_amount_state(c), "diedAt": at} for pid, (at, c) in sorted(self.tombstones.items())},
            "exhaustedAt": self.exhausted_at,
            "spentFor": _amount_state(self.spent_for) if self.spent_for is not None else None,
        }
        if self.retired_admitted is not None:
            out["retiredSmallestAdmitted"] = _amount_state(self.retired_admitted)
            out["retiredAdmittedAt"] = self.retired_admitted_at
        return out

    @classmethod
    def from_state(cls, limits: Limits, data: dict[str, Any], settings: LeaseSettings | None = None) -> BudgetLedger:
        ledger = cls(limits, settings)
        ledger.retired = _amount_from(data.get("retired") or {})
        for pid, a in (data.get("proxies") or {}).items():
            ledger.proxies[pid] = ProxyAccount(used=_amount_from(a.get("used") or {}), held=_amount_from(a.get("held") or {}),
                                               ceiling=Ceiling.from_state(a.get("ceiling") or {}), seq=int(a.get("seq", 0)),
                                               expires_at=float(a.get("expiresAt", 0.0)),
                                               smallest_admitted=_optional_amount(a.get("smallestAdmitted")))
        # Oldest first (status keeps no key order); records written before diedAt existed count as oldest.
        stones = sorted(((float(c.get("diedAt") or 0.0), pid, _amount_from(c))
                         for pid, c in (data.get("tombstones") or {}).items()), key=lambda t: (t[0], t[1]))
        ledger.tombstones = {pid: (at, charge) for at, pid, charge in stones}
        ledger._bound_tombstones()
        at = data.get("exhaustedAt")
        ledger.exhausted_at = float(at) if at is not None else None
        ledger.spent_for = _optional_amount(data.get("spentFor"))
        ledger.retired_admitted = _optional_amount(data.get("retiredSmallestAdmitted"))
        ledger.retired_admitted_at = float(data.get("retiredAdmittedAt") or 0.0)
        return ledger


def _short_of(limits: Limits, used: Amount, need: Amount) -> str | None:
    """The first limited dimension `need` asks for where what is left (limit - used) is below it."""
    for dim in DIMENSIONS:
        limit, wanted = _limit(limits, dim), _dim(need, dim)
        if limit is not None and wanted > 0 and limit - _dim(used, dim) < wanted:
            return dim
    return None


def _tightest_fraction(limits: Limits, delta: Amount) -> float:
    fractions = [float(_dim(delta, d) / _limit(limits, d)) for d in DIMENSIONS if _limit(limits, d)]
    return max(fractions, default=0.0)


def _max_amount(a: Amount, b: Amount) -> Amount:
    return Amount(max(a.input_tokens, b.input_tokens), max(a.output_tokens, b.output_tokens), max(a.cost, b.cost))


def _floor_ceiling(requested: Ceiling, floor: Ceiling) -> Ceiling:
    """A release never goes below what the proxy has already committed."""
    out = Ceiling()
    for dim in DIMENSIONS:
        r, f = requested.get(dim), floor.get(dim)
        setattr(out, dim, None if f is None else max(r if r is not None else f, f))
    return out


def _escrow_as_amount(limits: Limits, acct: ProxyAccount) -> Amount:
    """What a dead proxy is charged: in every dimension at least its usage and at most its escrow
    (max(ceiling, used), exactly what `committed` already counted, so the invariant is kept)."""
    c, u = acct.ceiling, acct.used
    inp = max(u.input_tokens, c.input) if c.input is not None else u.input_tokens
    out = max(u.output_tokens, c.output) if c.output is not None else u.output_tokens
    if c.total is not None:
        cap = max(c.total, u.total_tokens)
        # The unknown rest of the escrow counts as output, then input, within their own ceilings.
        if inp + out < cap:
            out += min(cap - (inp + out), max((c.output if c.output is not None else cap) - out, 0))
        if inp + out < cap:
            inp += min(cap - (inp + out), max((c.input if c.input is not None else cap) - inp, 0))
        excess = inp + out - cap
        if excess > 0:  # separate input/output ceilings can add up to more than the total one
            cut = min(excess, out - u.output_tokens)
            out -= cut
            inp -= excess - cut
    cost = max(u.cost, c.cost) if c.cost is not None else u.cost
    return Amount(inp, out, cost)


def _amount_state(a: Amount) -> dict[str, Any]:
    return {"inputTokens": a.input_tokens, "outputTokens": a.output_tokens, "cost": str(a.cost)}


def _amount_from(data: dict[str, Any]) -> Amount:
    return Amount(int(data.get("inputTokens", 0)), int(data.get("outputTokens", 0)), Decimal(str(data.get("cost", "0"))))


def _optional_amount(data: dict[str, Any] | None) -> Amount | None:
    return _amount_from(data) if data else None


def _account_state(a: ProxyAccount) -> dict[str, Any]:
    out = {"used": _amount_state(a.used), "held": _amount_state(a.held), "ceiling": a.ceiling.to_state(),
           "seq": a.seq, "expiresAt": a.expires_at}
    if a.smallest_admitted is not None:
        out["smallestAdmitted"] = _amount_state(a.smallest_admitted)
    return out
