from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from spendwarden.ledger.pricing import Prices, TokenUsage, cost, format_money, output_tokens_affordable, worst_case_cost

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


# Anthropic-like prices: writes at 1.25x (5-minute TTL) and 2x (1-hour TTL) the input price.
A = Prices(input=Decimal("3"), output=Decimal("15"), cached_input=Decimal("0.30"), cache_write=Decimal("3.75"),
           cache_write_1h=Decimal("6"))


def test_cost_prices_cache_writes_above_input():
    # 1000 prompt tokens: 100 read, 600 written (200 of them for 1 hour), 300 plain; 50 output
    u = TokenUsage(1000, 50, 100, cache_write_tokens=600, cache_write_1h_tokens=200)
    assert cost(A, u) == Decimal("0.00438")  # (300*3 + 100*0.30 + 400*3.75 + 200*6 + 50*15) / 1M
    assert cost(A, TokenUsage(1000, 0, 0, 1000)) == Decimal("0.00375")
    assert isinstance(cost(A, u), Decimal)


def test_cost_clamps_odd_cache_counts():
    # writes beyond what the reads left of the prompt, 1h writes beyond the writes, negatives: never
    # a negative part, never more tokens billed than the prompt had
    assert cost(A, TokenUsage(100, 0, 60, 80, 500)) == (60 * Decimal("0.30") + 40 * Decimal(6)) / 10**6
    assert cost(A, TokenUsage(100, 0, 0, -5, -5)) == 100 * Decimal(3) / 10**6
    assert cost(A, TokenUsage(100, 0, 0, 10, -1)) == (90 * Decimal(3) + 10 * Decimal("3.75")) / 10**6


def test_cache_write_prices_default_per_provider():
    anthropic = Prices.from_spec({"input": "3", "output": "15"}, "Anthropic")
    assert (anthropic.cache_write, anthropic.cache_write_1h) == (Decimal("3.75"), Decimal(6))
    assert anthropic.cached_input == Decimal(3)
    for provider in ("OpenAI", "OpenAICompatible", None):
        p = Prices.from_spec({"input": "3", "output": "15"}, provider)
        assert (p.cache_write, p.cache_write_1h) == (Decimal(3), Decimal(3)), provider
    explicit = Prices.from_spec({"input": "3", "output": "15", "cacheWrite": "3.5", "cacheWrite1h": "0"}, "Anthropic")
    assert (explicit.cache_write, explicit.cache_write_1h) == (Decimal("3.5"), Decimal(0))
    assert Prices(Decimal(1), Decimal(2), Decimal(1)).cache_write == Decimal(1)  # constructed without: the input price


def test_cache_write_defaults_from_the_api_model_and_provider_enum():
    from spendwarden.api.modelroute import Pricing, Provider

    p = Prices.from_spec(Pricing(input="0.80", output="4"), Provider.ANTHROPIC)
    assert (p.cache_write, p.cache_write_1h) == (Decimal("1.00"), Decimal("1.60"))
    p = Prices.from_spec(Pricing(input="0.80", output="4", cacheWrite="1", cacheWrite1h="1.7"), Provider.ANTHROPIC)
    assert (p.cache_write, p.cache_write_1h) == (Decimal(1), Decimal("1.7"))
    assert Prices.from_spec(Pricing(input="0.80", output="4"), Provider.OPENAI).cache_write == Decimal("0.80")


def test_worst_case_prices_the_prompt_at_its_dearest():
    assert worst_case_cost(A, 1000, 100) == (1000 * Decimal(6) + 100 * Decimal(15)) / 10**6
    assert output_tokens_affordable(A, 1000, Decimal("0.0075")) == 100
    assert output_tokens_affordable(A, 1000, Decimal("0.005999")) == -1
    # a worst case always covers the real bill, whatever the cache does with the prompt
    for split in ((1000, 0, 0, 0), (1000, 0, 1000, 0), (1000, 0, 1000, 1000), (1000, 0, 500, 250)):
        assert cost(A, TokenUsage(*split[:1], 100, *split[1:])) <= worst_case_cost(A, 1000, 100)
    assert cost(A, TokenUsage(1000, 100, 0, 1000, 1000)) == worst_case_cost(A, 1000, 100)


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
