"""The lease ledger: many proxies, one budget, never jointly over it."""
from __future__ import annotations

import json
from decimal import Decimal

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from spendwarden.ledger.allowance import Allowance, Amount, Limits, least
from spendwarden.ledger.leases import DIMENSIONS, MAX_TOMBSTONES, BudgetLedger, Ceiling, LeaseSettings, Shortfall

LIMITS = Limits(total_tokens=10_000, output_tokens=6_000, cost=Decimal("1.00"))
PRICE_IN, PRICE_OUT = Decimal("0.00002"), Decimal("0.0001")  # per token


def amount(inp: int, out: int) -> Amount:
    return Amount(inp, out, inp * PRICE_IN + out * PRICE_OUT)


class Proxy:
    """A proxy as the ledger sees it: a local Allowance whose limits are its lease's ceiling."""

    def __init__(self, pid: str):
        self.pid = pid
        self.seq = 0
        self.local = Allowance(limits=Ceiling.committed(LIMITS, Amount()).as_limits())
        self.inflight: dict[int, Amount] = {}
        self.alive = True
        self.expires_at = 0.0  # no lease yet: nothing may be admitted
        self.smallest_admitted: Amount | None = None  # least reservation, as the proxy reports it

    def snapshot(self) -> tuple[int, Amount, Amount]:
        self.seq += 1
        return self.seq, self.local.used, self.local.reserved

    def apply(self, ceiling: Ceiling, expires_at: float | None = None) -> None:
        self.local.limits = ceiling.as_limits()
        if expires_at is not None:
            self.expires_at = expires_at


class LedgerMachine(RuleBasedStateMachine):
    @initialize(n=st.integers(min_value=1, max_value=5))
    def setup(self, n):
        self.ledger = BudgetLedger(LIMITS, LeaseSettings(ttl=10, grace=5))
        self.proxies = [Proxy(f"p{i}") for i in range(n)]
        self.now = 0.0
        self.pending: list[tuple[Proxy, tuple]] = []  # reports sent, answer not yet applied
        self.true_usage = Amount()                     # what the upstream really billed
        self.resumed_at: float | None = None            # the last operator restart

    def live(self):
        return [p for p in self.proxies if p.alive]

    @rule(data=st.data(), inp=st.integers(1, 800), out=st.integers(1, 800))
    def request(self, data, inp, out):
        live = self.live()
        if not live:
            return
        p = data.draw(st.sampled_from(live))
        if self.now >= p.expires_at:  # the protocol: no admissions on an expired lease
            return
        rid = p.local.reserve(amount(inp, out))
        if rid is not None:
            p.inflight[rid] = amount(inp, out)
            p.smallest_admitted = least(p.smallest_admitted, amount(inp, min(out, 16)))

    @rule(data=st.data(), frac=st.integers(0, 100))
    def settle(self, data, frac):
        busy = [p for p in self.live() if p.inflight]
        if not busy:
            return
        p = data.draw(st.sampled_from(busy))
        rid = data.draw(st.sampled_from(sorted(p.inflight)))
        held = p.inflight.pop(rid)
        actual = amount(held.input_tokens, held.output_tokens * frac // 100)  # providers bill <= reserved
        p.local.settle(rid, actual)
        self.true_usage = self.true_usage + actual

    @rule(data=st.data(), want_out=st.integers(0, 3000), need_out=st.integers(0, 3000), deliver_now=st.booleans())
    def report(self, data, want_out, need_out, deliver_now):
        live = self.live()
        if not live:
            return
        p = data.draw(st.sampled_from(live))
        seq, used, held = p.snapshot()
        need = amount(0, min(need_out, want_out)) if want_out and need_out else None
        lease = self.ledger.report(p.pid, seq, used, held, amount(0, want_out) if want_out else None, self.now,
                                   need=need, smallest_admitted=p.smallest_admitted)
        if deliver_now:
            p.apply(lease.ceiling, lease.expires_at)
        else:
            self.pending.append((p, (seq, used, held, lease)))

    @precondition(lambda self: self.pending)
    @rule(retry=st.booleans())
    def deliver_late(self, retry):
        # The answer arrives after the proxy kept committing under its old ceiling; maybe the
        # proxy also retried the same report (lost answer): that must change nothing.
        p, (seq, used, held, lease) = self.pending.pop(0)
        acct = self.ledger.proxies.get(p.pid)
        if retry and acct is not None and acct.seq >= seq:
            before = self.ledger.to_state()
            again = self.ledger.report(p.pid, seq, used, held, None, self.now)
            assert again.duplicate and self.ledger.to_state() == before
        if p.alive:
            p.apply(lease.ceiling, lease.expires_at)

    @rule(data=st.data())
    def release(self, data):
        live = self.live()
        if not live:
            return
        p = data.draw(st.sampled_from(live))
        floor = Ceiling.committed(LIMITS, p.local.used + p.local.reserved)
        p.apply(floor)  # lower locally first, then tell the ledger
        seq, used, held = p.snapshot()
        lease = self.ledger.report(p.pid, seq, used, held, None, self.now, release_to=floor)
        p.apply(lease.ceiling, lease.expires_at)

    @rule(data=st.data())
    def kill(self, data):
        live = self.live()
        if len(live) < 2:
            return
        p = data.draw(st.sampled_from(live))
        p.alive = False
        # Its in-flight requests were billed upstream in full, but nobody will report them.
        for held in p.inflight.values():
            self.true_usage = self.true_usage + held
        p.inflight.clear()

    @rule(seconds=st.sampled_from([0.5, 3.0, 20.0]))
    def tick(self, seconds):
        self.now += seconds
        dead = self.ledger.expire(self.now)
        if self.resumed_at is not None and dead:  # silence while no operator listened is no evidence
            assert self.now > self.resumed_at + self.ledger.settings.ttl + self.ledger.settings.grace

    @rule(outage=st.sampled_from([1.0, 60.0]))
    def restart(self, outage):
        # The operator is killed (its state persisted, answers on the way lost) and restores the
        # ledger `outage` seconds later; no proxy could report meanwhile.
        self.pending.clear()
        self.now += outage
        self.ledger = BudgetLedger.from_state(LIMITS, self.ledger.to_state(), self.ledger.settings)
        self.ledger.resume(self.now)
        self.resumed_at = self.now

    @invariant()
    def committed_never_exceeds_the_limit(self):
        assert self.ledger.check_invariant() == []

    @invariant()
    def real_spend_never_exceeds_the_limit(self):
        assert self.true_usage.total_tokens <= LIMITS.total_tokens
        assert self.true_usage.output_tokens <= LIMITS.output_tokens
        assert self.true_usage.cost <= LIMITS.cost

    @invariant()
    def spent_is_level_triggered_and_survives_a_restart(self):
        # A pure function of the persisted state and the limits: a restarted operator finds the same.
        assert BudgetLedger.from_state(LIMITS, self.ledger.to_state()).shortfall() == self.ledger.shortfall()
        short = self.ledger.shortfall()
        if short is not None:  # never early: not even with every lease given back and in-flight settled at 0
            assert short.left <= 0 if short.need is None else short.left < short.need

    @invariant()
    def nothing_reported_is_lost(self):
        # Usage known to the ledger covers what every live proxy reported, plus dead proxies' escrow.
        used = self.ledger.used()
        reported = Amount()
        for p in self.proxies:
            acct = self.ledger.proxies.get(p.pid)
            if acct is not None:
                reported = reported + acct.used
        assert used.total_tokens >= reported.total_tokens and used.cost >= reported.cost


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(max_examples=80, stateful_step_count=50, deadline=None)


def test_dead_proxy_is_charged_its_escrow_and_reconciled_if_it_returns():
    ledger = BudgetLedger(LIMITS, LeaseSettings(ttl=10, grace=5))
    lease = ledger.report("a", 1, Amount(), Amount(), amount(0, 1000), now=0)
    assert lease.granted and lease.ceiling.output >= 1000
    ledger.report("a", 2, amount(100, 200), amount(50, 500), None, now=1)
    assert ledger.expire(now=100) == ["a"]
    charged = ledger.used()
    assert charged.output_tokens >= 700 and charged.total_tokens >= 850  # in flight counted, never nothing
    # A partitioned proxy that comes back: its own cumulative report replaces the charge.
    ledger.report("a", 3, amount(150, 600), Amount(), None, now=101)
    assert ledger.used() == amount(150, 600)


def test_dead_proxies_leave_a_bounded_record_and_their_usage_still_counts():
    """3,000 short-lived proxies (a CronJob's pods) made a 488 KB status: the oldest tombstones are
    folded into `retired` alone, so the state stays small, used() stays exact, and the most recent
    dead can still be reconciled, also after a restart."""
    ledger = BudgetLedger(Limits(total_tokens=10**9), LeaseSettings(ttl=10, grace=5))
    for i in range(3000):
        pid = f"team-a-cron-{i:05d}-7c9f8d6b5-x2x4z"
        ledger.report(pid, 1, Amount(), Amount(), amount(0, 100), now=i * 100)
        ledger.report(pid, 2, amount(10, 5), Amount(), amount(0, 100), now=i * 100 + 1)
        ledger.expire(now=i * 100 + 50)
    charged = ledger.used()
    assert charged == ledger.retired and charged.input_tokens == 3000 * 10  # every one still counts
    assert len(ledger.tombstones) == MAX_TOMBSTONES and "team-a-cron-02999-7c9f8d6b5-x2x4z" in ledger.tombstones
    state = ledger.to_state()
    assert len(json.dumps(state)) < 64 * 1024
    again = BudgetLedger.from_state(ledger.limits, json.loads(json.dumps(state, sort_keys=True)))
    assert list(again.tombstones) == list(ledger.tombstones) and again.used() == charged
    # the newest dead one comes back: its own report replaces its charge
    back = "team-a-cron-02999-7c9f8d6b5-x2x4z"
    before = again.tombstones[back][1]
    again.report(back, 3, amount(10, 5), Amount(), None, now=300_100)
    assert again.used() == charged - before + amount(10, 5)
    # a status written before the bound (3,000 tombstones, no diedAt) is bounded when loaded
    old = {**state, "tombstones": {f"p{i}": {"inputTokens": 1, "outputTokens": 0, "cost": "0"} for i in range(3000)}}
    assert len(BudgetLedger.from_state(ledger.limits, old).tombstones) == MAX_TOMBSTONES


def test_grants_follow_demand_and_leave_room_for_others():
    ledger = BudgetLedger(Limits(total_tokens=100_000), LeaseSettings(ttl=10))
    first = ledger.report("busy", 1, Amount(), Amount(), amount(0, 500), now=0)
    assert 500 <= first.ceiling.total <= 50_000
    idle = ledger.report("idle", 1, Amount(), Amount(), None, now=0)
    assert idle.ceiling.total <= first.ceiling.total
    # The busy proxy burns fast: its next lease is larger.
    second = ledger.report("busy", 2, amount(0, first.ceiling.total), Amount(), None, now=1)
    assert second.ceiling.total - first.ceiling.total > first.ceiling.total - 0
    assert ledger.check_invariant() == []


def test_a_lease_is_topped_up_only_once_half_of_it_is_spent():
    # Each raise waits for a status write before it is answered: a top-up on every report would
    # bound a busy budget's reports by apiserver round trips.
    ledger = BudgetLedger(Limits(total_tokens=1_000_000), LeaseSettings(ttl=10))
    first = ledger.report("a", 1, Amount(), Amount(), None, now=0)
    assert first.granted and first.ceiling.total == 10_000  # min_share: 1% of the limit
    for seq, used in enumerate((1_000, 3_000, 4_900), start=2):
        lease = ledger.report("a", seq, amount(0, used), Amount(), None, now=seq * 100)
        assert not lease.granted and lease.ceiling.total == 10_000
    topped = ledger.report("a", 9, amount(0, 5_100), Amount(), None, now=900)
    assert topped.granted and topped.ceiling.total == 15_100
    # A request that does not fit what is free is answered with a raise at once.
    asked = ledger.report("a", 10, amount(0, 14_000), Amount(), amount(0, 5_000), now=1000)
    assert asked.granted and asked.ceiling.total - 14_000 >= 5_000


def test_near_the_end_the_last_tokens_are_still_grantable():
    ledger = BudgetLedger(Limits(total_tokens=1_000))
    assert ledger.report("a", 1, Amount(), Amount(), amount(0, 990), now=0).ceiling.total == 990
    last = ledger.report("b", 1, Amount(), Amount(), amount(0, 10), now=0)
    assert last.granted and last.ceiling.total == 10
    refused = ledger.report("c", 1, Amount(), Amount(), amount(0, 10), now=0)
    assert refused.ceiling.total == 0 and not refused.granted
    # Once "a" gives back what it did not use, "c" can have it.
    ledger.report("a", 2, amount(0, 500), Amount(), None, now=1, release_to=Ceiling(total=500))
    assert ledger.report("c", 2, Amount(), Amount(), amount(0, 10), now=1).ceiling.total >= 10


def test_state_round_trip():
    ledger = BudgetLedger(LIMITS)
    ledger.report("a", 1, amount(10, 20), amount(1, 2), amount(0, 100), now=0)
    ledger.report("b", 1, Amount(), Amount(), None, now=0)
    ledger.expire(now=1_000)
    again = BudgetLedger.from_state(LIMITS, ledger.to_state())
    assert again.to_state() == ledger.to_state()
    assert all(again.committed(d) == ledger.committed(d) for d in DIMENSIONS)


def test_a_need_is_granted_whole_or_not_at_all_and_given_back_fragments_pool():
    ledger = BudgetLedger(Limits(total_tokens=1_000))
    assert ledger.report("a", 1, Amount(), Amount(), amount(0, 600), now=0).ceiling.total == 600
    assert ledger.report("b", 1, Amount(), Amount(), amount(0, 400), now=0).ceiling.total == 400
    ledger.report("a", 2, amount(0, 500), Amount(), None, now=1)   # "a" has 100 free
    ledger.report("b", 2, amount(0, 350), Amount(), None, now=1)   # "b" has 50 free
    # "c" needs 120: nothing is unassigned, and a part of it would only strand a fragment.
    c = ledger.report("c", 1, Amount(), Amount(), amount(0, 500), now=1, need=amount(0, 120))
    assert not c.granted and c.ceiling.total == 0
    # "a" cannot fit 120 either: it gives its 100 back with its need; still not enough for anyone.
    a = ledger.report("a", 3, amount(0, 500), Amount(), amount(0, 120), now=1, release_to=Ceiling(total=500),
                      need=amount(0, 120))
    assert not a.granted and a.ceiling.total == 500
    assert not ledger.exhausted()  # 150 are left: more than the 120 that is waiting
    # "b" gives back its 50: the pool of 150 now covers one waiting request, whole.
    b = ledger.report("b", 3, amount(0, 350), Amount(), amount(0, 120), now=1, release_to=Ceiling(total=350),
                      need=amount(0, 120))
    assert b.granted and b.ceiling.total >= 350 + 120
    assert ledger.check_invariant() == []


def test_spent_when_what_is_left_cannot_serve_the_smallest_waiting_request():
    ledger = BudgetLedger(Limits(total_tokens=1_000), LeaseSettings(horizon=5))
    ledger.report("a", 1, Amount(), Amount(), amount(0, 1000), now=0)
    ledger.report("a", 2, amount(0, 500), amount(0, 440), None, now=1)
    # A giant request that can never fit does not cut the budget off while a smaller one is waiting
    # that would fit what is left (held by "a"'s request in flight, which may settle lower).
    ledger.report("b", 1, Amount(), Amount(), amount(0, 100), now=2, need=amount(0, 100))
    ledger.report("c", 1, Amount(), Amount(), amount(0, 5000), now=2, need=amount(0, 5000))
    assert not ledger.exhausted() and ledger.exhausted_at is None
    ledger.report("a", 3, amount(0, 940), Amount(), None, now=3)  # settled: 60 left, less than 100
    ledger.report("b", 2, Amount(), Amount(), amount(0, 100), now=3.5, need=amount(0, 100))
    assert ledger.exhausted() and ledger.exhausted_at == 3.5
    again = BudgetLedger.from_state(ledger.limits, ledger.to_state())
    assert again.exhausted() and again.exhausted_at == 3.5  # a restart keeps the cut-off and its start
    # A raised limit lifts it.
    ledger.limits = Limits(total_tokens=2_000)
    ledger.report("b", 3, Amount(), Amount(), None, now=4)
    assert not ledger.exhausted() and ledger.exhausted_at is None and ledger.spent_for is None


def test_used_up_exactly_is_spent_too():
    ledger = BudgetLedger(Limits(total_tokens=1_000))
    ledger.report("a", 1, Amount(), Amount(), amount(0, 1000), now=0)
    ledger.report("a", 2, amount(0, 1000), Amount(), None, now=7)
    assert ledger.exhausted() and ledger.exhausted_at == 7


def test_a_request_larger_than_the_whole_limit_does_not_spend_the_budget():
    ledger = BudgetLedger(Limits(total_tokens=1_000), LeaseSettings(horizon=5))
    ledger.report("a", 1, Amount(), Amount(), amount(0, 5000), now=0, need=amount(4000, 16))
    assert not ledger.exhausted()  # nothing used: it could never have fitted, the budget is not spent
    ledger.report("a", 2, amount(0, 990), Amount(), amount(0, 100), now=1, need=amount(0, 16))
    assert ledger.shortfall() == Shortfall("total", 10, 16)  # a request that fits a fresh budget does spend it


# -- the end of a budget: the smallest request the team makes (leases.py module docstring) ------------

def _spend_to(ledger: BudgetLedger, pid: str, seq: int, used: Amount, now: float, admitted: Amount | None):
    """A proxy that settled `used` and reports its smallest admitted request (None: an older proxy)."""
    return ledger.report(pid, seq, used, Amount(), None, now, smallest_admitted=admitted)


def test_one_huge_prompt_that_cannot_fit_does_not_spend_a_budget_whose_small_requests_still_fit():
    ledger = BudgetLedger(Limits(total_tokens=300_000), LeaseSettings(horizon=5))
    small = amount(500, 16)  # the team's ordinary request, as its least reservation
    ledger.report("a", 1, Amount(), Amount(), amount(0, 300_000), now=0)
    _spend_to(ledger, "a", 2, amount(200_000, 50_000), now=1, admitted=small)
    # 50k left; a 200k prompt cannot fit (and is not larger than the whole limit, so it counts).
    huge = ledger.report("b", 1, Amount(), Amount(), amount(200_000, 4096), now=2, need=amount(200_000, 16))
    assert not huge.granted
    assert not ledger.exhausted() and ledger.shortfall() is None and ledger.exhausted_at is None
    # ...and the small requests are still served: "a" has room for them, and once it gives its free
    # escrow back (idle), "b" is granted one too.
    ledger.report("a", 3, amount(200_000, 50_000), Amount(), None, now=2.5, release_to=Ceiling(total=250_000),
                  smallest_admitted=small)
    assert ledger.report("b", 2, Amount(), Amount(), amount(500, 400), now=3, need=small).granted
    assert not ledger.exhausted()


def test_spent_once_not_even_the_smallest_admitted_request_fits():
    ledger = BudgetLedger(Limits(total_tokens=300_000), LeaseSettings(horizon=5))
    small = amount(500, 16)
    ledger.report("a", 1, Amount(), Amount(), amount(0, 300_000), now=0)
    _spend_to(ledger, "a", 2, amount(250_000, 49_600), now=1, admitted=small)  # 400 left: below 516
    ledger.report("b", 1, Amount(), Amount(), amount(200_000, 4096), now=2, need=amount(200_000, 16))
    assert ledger.exhausted() and ledger.exhausted_at == 2
    # What it says: 400 left, and the smallest request the team makes needs 516 (not the huge one).
    assert ledger.shortfall() == Shortfall("total", 400, 516)


def test_a_team_that_only_sends_huge_requests_is_spent_when_none_fits():
    ledger = BudgetLedger(Limits(total_tokens=1_000_000), LeaseSettings(horizon=5))
    huge = amount(200_000, 16)
    ledger.report("a", 1, Amount(), Amount(), amount(0, 1_000_000), now=0)
    _spend_to(ledger, "a", 2, amount(800_000, 60_000), now=1, admitted=huge)  # 140k left
    ledger.report("a", 3, amount(800_000, 60_000), Amount(), amount(200_000, 4096), now=2, need=huge,
                  smallest_admitted=huge)
    assert ledger.shortfall() == Shortfall("total", 140_000, 200_016)


def test_an_older_proxy_without_smallest_admitted_keeps_the_old_rule():
    # No proxy reports the field: the unmet needs alone decide, as before (the huge prompt spends it).
    ledger = BudgetLedger(Limits(total_tokens=300_000), LeaseSettings(horizon=5))
    ledger.report("a", 1, Amount(), Amount(), amount(0, 300_000), now=0)
    _spend_to(ledger, "a", 2, amount(200_000, 50_000), now=1, admitted=None)
    ledger.report("b", 1, Amount(), Amount(), amount(200_000, 4096), now=2, need=amount(200_000, 16))
    assert ledger.shortfall() == Shortfall("total", 50_000, 200_016)
    assert "smallestAdmitted" not in ledger.to_state()["proxies"]["a"]


def test_smallest_admitted_is_each_reports_window_minimum_and_a_retry_changes_nothing():
    ledger = BudgetLedger(Limits(total_tokens=10_000))
    ledger.report("a", 1, Amount(), Amount(), None, now=0, smallest_admitted=amount(100, 16))
    ledger.report("a", 2, Amount(), Amount(), None, now=1, smallest_admitted=least(amount(100, 16), amount(300, 8)))
    assert ledger.smallest_admitted() == Amount(100, 8, amount(100, 16).cost)  # per dimension
    before = ledger.to_state()
    assert ledger.report("a", 2, Amount(), Amount(), None, now=1, smallest_admitted=amount(1, 1)).duplicate
    assert ledger.to_state() == before
    ledger.report("b", 1, Amount(), Amount(), None, now=1, smallest_admitted=amount(50, 16))
    assert ledger.smallest_admitted() == Amount(50, 8, amount(50, 16).cost)
    # The proxy's window moved on: what it admitted long ago no longer counts (replaced, not lowered).
    ledger.report("b", 2, Amount(), Amount(), None, now=70, smallest_admitted=None)
    ledger.report("a", 3, Amount(), Amount(), None, now=70, smallest_admitted=amount(300, 16))
    assert ledger.smallest_admitted() == amount(300, 16)


def test_a_small_request_made_long_ago_does_not_keep_a_budget_from_being_spent():
    # The demo's bug: the first local request (before the prompt calibration) needed 9 µUSD, every
    # later one 16; with 12 µUSD left the budget was never found spent, refusing 'retry shortly' for ever.
    ledger = BudgetLedger(Limits(cost=Decimal("0.001")), LeaseSettings(horizon=5, admitted_window=10))
    first, later = Amount(27, 16, Decimal("0.000009")), Amount(100, 16, Decimal("0.000016"))
    ledger.report("a", 1, Amount(), Amount(), Amount(0, 0, Decimal("0.001")), now=0, smallest_admitted=first)
    ledger.report("a", 2, Amount(10_000, 0, Decimal("0.000988")), Amount(), later, now=30, need=later,
                  smallest_admitted=later)  # the proxy's window holds only the later requests now
    assert ledger.shortfall() == Shortfall("cost", Decimal("0.000012"), Decimal("0.000016"))
    # A dead proxy's minimum counts for the window from its death, then stops counting.
    ledger = BudgetLedger(Limits(cost=Decimal("0.001")), LeaseSettings(ttl=1, grace=1, horizon=5, admitted_window=10))
    ledger.report("dead", 1, Amount(), Amount(), None, now=0, smallest_admitted=first)
    ledger.report("a", 1, Amount(), Amount(), Amount(0, 0, Decimal("0.0009")), now=0)
    ledger.report("a", 2, Amount(), Amount(), None, now=2)
    assert ledger.expire(now=3) == ["dead"]
    # The dead proxy's escrow (0.00001, 1% of the limit) is charged: 12 µUSD left beside it.
    assert ledger.retired.cost == Decimal("0.00001")
    ledger.report("a", 3, Amount(10_000, 0, Decimal("0.000978")), Amount(), later, now=4, need=later)
    assert not ledger.exhausted()  # the dead proxy's 9 µUSD request still fits what is left
    state = ledger.to_state()
    assert state["retiredAdmittedAt"] == 3
    restored = BudgetLedger.from_state(ledger.limits, state, ledger.settings)
    for lg in (ledger, restored):
        lg.report("a", 4, Amount(10_000, 0, Decimal("0.000978")), Amount(), later, now=20, need=later)
        assert lg.shortfall() == Shortfall("cost", Decimal("0.000012"), Decimal("0.000016"))


def test_the_cost_dimension_uses_the_cheapest_admitted_request():
    # Cost only: 0.01 left. The team's premium requests need more, but it also sends requests to a
    # cheap backend that still fit: not spent. Once the cheap one does not fit either, spent.
    ledger = BudgetLedger(Limits(cost=Decimal("1.00")), LeaseSettings(horizon=5))
    cheap = Amount(500, 16, Decimal("0.005"))
    premium = Amount(500, 16, Decimal("0.05"))
    ledger.report("a", 1, Amount(), Amount(), Amount(0, 0, Decimal("1.00")), now=0)
    ledger.report("a", 2, Amount(1_000_000, 0, Decimal("0.99")), Amount(), None, now=1,
                  smallest_admitted=least(premium, cheap))
    ledger.report("b", 1, Amount(), Amount(), premium, now=2, need=premium)
    assert not ledger.exhausted()
    ledger.report("a", 3, Amount(1_000_000, 0, Decimal("0.996")), Amount(), None, now=3,
                  smallest_admitted=least(premium, cheap))
    ledger.report("b", 2, Amount(), Amount(), premium, now=3, need=premium)
    assert ledger.shortfall() == Shortfall("cost", Decimal("0.004"), Decimal("0.005"))


def test_smallest_admitted_survives_a_restart_and_a_dead_proxy():
    settings = LeaseSettings(ttl=10, grace=5, horizon=5)
    ledger = BudgetLedger(Limits(total_tokens=300_000), settings)
    small = amount(500, 16)
    ledger.report("a", 1, Amount(), Amount(), amount(0, 300_000), now=0, smallest_admitted=small)
    # "a" settled 250k and gave back most of its free escrow (its dead charge stays below the limit).
    ledger.report("a", 2, amount(200_000, 50_000), Amount(), None, now=1, release_to=Ceiling(total=250_000),
                  smallest_admitted=small)
    state = ledger.to_state()
    assert state["proxies"]["a"]["smallestAdmitted"] == {"inputTokens": 500, "outputTokens": 16, "cost": str(small.cost)}
    again = BudgetLedger.from_state(ledger.limits, state, settings)
    assert again.smallest_admitted() == small and again.to_state() == state
    # "a" goes silent and is presumed dead: what it admitted still counts for the period.
    assert again.expire(now=100) == ["a"]
    assert again.smallest_admitted() == small
    restored = BudgetLedger.from_state(again.limits, again.to_state(), settings)
    assert restored.smallest_admitted() == small and restored.to_state() == again.to_state()
    restored.report("b", 1, Amount(), Amount(), amount(200_000, 16), now=101, need=amount(200_000, 16))
    assert not restored.exhausted()  # the huge prompt still cannot cut the team off
