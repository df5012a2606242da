from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from spendwarden.ledger.allowance import Allowance, Amount, Limits, clamp_output
from spendwarden.ledger.pricing import Prices, TokenUsage, cost

CHEAP = Prices(Decimal("0.15"), Decimal("0.60"), Decimal("0.075"))
DEAR = Prices(Decimal("3"), Decimal("15"), Decimal("0.3"))


def within(a: Allowance) -> bool:
    c, lim = a.used + a.reserved, a.limits
    return ((lim.total_tokens is None or c.total_tokens <= lim.total_tokens)
            and (lim.input_tokens is None or c.input_tokens <= lim.input_tokens)
            and (lim.output_tokens is None or c.output_tokens <= lim.output_tokens)
            and (lim.cost is None or c.cost <= lim.cost))


limits_st = st.builds(
    Limits,
    total_tokens=st.none() | st.integers(1, 5000),
    input_tokens=st.none() | st.integers(1, 5000),
    output_tokens=st.none() | st.integers(1, 5000),
    cost=st.none() | st.decimals(min_value=0, max_value=Decimal("0.01"), places=6),
)

op_st = st.one_of(
    st.tuples(st.just("reserve"), st.integers(0, 800), st.integers(1, 800), st.sampled_from([CHEAP, DEAR])),
    st.tuples(st.just("settle"), st.integers(0, 50), st.floats(0, 1), st.floats(0, 1)),
    st.tuples(st.just("release"), st.integers(0, 50)),
    st.tuples(st.just("settle_reserved"), st.integers(0, 50)),
)


@settings(max_examples=300)
@given(limits_st, st.lists(op_st, max_size=60))
def test_no_interleaving_exceeds_limit(limits, ops):
    a = Allowance(limits)
    open_: dict[int, tuple[Amount, Prices]] = {}
    for op in ops:
        if op[0] == "reserve":
            _, inp, want, prices = op
            cap = a.max_output_tokens(prices, inp)
            if cap is not None and cap < 0:  # not even the prompt fits
                assert a.reserve(Amount.worst_case(prices, inp, 0)) is None
                continue
            out = want if cap is None else min(want, cap)
            amount = Amount.worst_case(prices, inp, out)
            rid = a.reserve(amount)
            assert rid is not None  # what max_output_tokens offers can always be reserved
            if rid is not None:
                open_[rid] = (amount, prices)
        elif open_:
            rid = sorted(open_)[op[1] % len(open_)]
            amount, prices = open_.pop(rid)
            if op[0] == "settle":
                inp = int(amount.input_tokens * op[2])
                out = int(amount.output_tokens * op[3])
                a.settle(rid, Amount(inp, out, cost(prices, TokenUsage(inp, out))))
            elif op[0] == "release":
                a.release(rid)
            else:
                a.settle_reserved(rid)
        assert within(a)
    assert a.open_reservations == len(open_)


@given(limits_st, st.integers(0, 3000), st.sampled_from([CHEAP, DEAR]))
def test_max_output_is_reservable(limits, inp, prices):
    a = Allowance(limits)
    cap = a.max_output_tokens(prices, inp)
    if cap is None:
        assert a.reserve(Amount.worst_case(prices, inp, 10**6)) is not None
    elif cap >= 0:
        assert a.reserve(Amount.worst_case(prices, inp, cap)) is not None
        # and one more would not fit
        b = Allowance(limits)
        assert b.reserve(Amount.worst_case(prices, inp, cap + 1)) is None


def test_reserve_settle_and_remaining():
    a = Allowance(Limits(total_tokens=1000))
    rid = a.reserve(Amount(100, 400))
    assert rid is not None
    assert a.max_output_tokens(CHEAP, 100) == 400
    assert a.reserve(Amount(100, 401)) is None
    a.settle(rid, Amount(90, 10))
    assert a.used == Amount(90, 10) and a.reserved == Amount()
    assert a.remaining().tokens == 900
    assert not a.exhausted()


def test_usage_never_credits_the_budget():
    """A negative part of an actual (a broken upstream's numbers) counts as zero: settling can only add."""
    a = Allowance(Limits(cost=Decimal("5")), used=Amount(10, 10, Decimal("0.01")))
    rid = a.reserve(Amount(100, 100, Decimal("0.1")))
    a.settle(rid, Amount(-10**12, 3, Decimal("-150000")))
    assert a.used == Amount(10, 13, Decimal("0.01")) and a.reserved == Amount()


def test_input_limit_blocks_prompt():
    a = Allowance(Limits(input_tokens=100))
    assert a.max_output_tokens(CHEAP, 101) == -1
    assert clamp_output(0, -1, 16) is None  # an embedding whose prompt does not fit
    assert clamp_output(0, 0, 16) == 0
    assert a.max_output_tokens(CHEAP, 100) is None


def test_forced_reservation_and_shutdown_charge():
    a = Allowance(Limits(total_tokens=10))
    rid = a.reserve(Amount(50, 50), force=True)
    assert rid is not None and a.exhausted() is False
    a.charge_open_reservations()
    assert a.used == Amount(50, 50) and a.exhausted()


def test_state_roundtrip():
    a = Allowance(Limits(cost=Decimal("1")), used=Amount(3, 4, Decimal("0.0001")))
    assert Allowance.amount_from_state(a.used_state()) == a.used


def test_clamp_output():
    assert clamp_output(100, None, 16) == 100
    assert clamp_output(100, 500, 16) == 100
    assert clamp_output(100, 50, 16) == 50
    assert clamp_output(100, 10, 16) is None
    assert clamp_output(8, 7, 16) is None  # below the minimum and below what was asked
    assert clamp_output(8, 8, 16) == 8
    assert clamp_output(100, 0, 16) is None
