from decimal import Decimal

from hypothesis import given, strategies as st

from spendwarden.ledger.pricing import (Prices, TokenUsage, cost, format_money, output_tokens_affordable,
                                        worst_case_cost)

P = Prices(input=Decimal("0.15"), output=Decimal("0.60"), cached_input=Decimal("0.075"))


def test_cost_exact():
    assert cost(P, TokenUsage(1000, 500)) == Decimal("0.00045")
    assert cost(P, TokenUsage(1_000_000, 1_000_000)) == Decimal("0.75")
    # cached part of the prompt is billed at the cached price
    assert cost(P, TokenUsage(1000, 0, cached_input_tokens=400)) == (600 * Decimal("0.15") + 400 * Decimal("0.075")) / 10**6


def test_from_spec_defaults_cached_to_input():
    p = Prices.from_spec({"input": "3", "output": "15"})
    assert p.cached_input == Decimal(3) and p.currency == "USD"
    assert isinstance(p.input, Decimal)


def test_format_money():
    assert format_money(Decimal("0.000450")) == "0.00045"
    assert format_money(Decimal("0E-10")) == "0"
    assert format_money(Decimal("12")) == "12"
    assert "E" not in format_money(Decimal("1E-12"))


@given(st.integers(0, 10**7), st.decimals(min_value=0, max_value=10**4, places=6, allow_nan=False))
def test_affordable_is_affordable_and_maximal(inp, money):
    n = output_tokens_affordable(P, inp, money)
    assert n is not None
    if n >= 0:
        assert worst_case_cost(P, inp, n) <= money
    else:
        assert worst_case_cost(P, inp, 0) > money
    assert worst_case_cost(P, inp, n + 1) > money


def test_free_output():
    free = Prices(Decimal(0), Decimal(0), Decimal(0))
    assert output_tokens_affordable(free, 10, Decimal(0)) is None
