from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spendwarden.ledger.allowance import Amount, Limits
from spendwarden.ledger.pricing import TokenUsage
from spendwarden.proxy.budgets import BudgetBook
from spendwarden.proxy.config import compile_config, parse_config_text
from spendwarden.proxy.errors import ProxyError
from tests.support.clock import Clock


def config(on_exceeded="CutOff", limits='{tokens: {total: 1000}}', window="24h", extra=""):
    text = f"""
kind: ModelRoute
metadata: {{name: chat}}
spec:
  model: chat
  defaultBackend: big
  backends:
  - {{name: big, provider: OpenAI, url: "http://x/v1", model: big, pricing: {{input: "10", output: "30"}}}}
  - {{name: small, provider: OpenAI, url: "http://x/v1", model: small, pricing: {{input: "0.1", output: "0.2"}}}}
---
kind: TokenBudget
metadata: {{name: b}}
spec:
  window: {window}
  onExceeded: {on_exceeded}
  limits: {limits}
  {extra}
"""
    cfg, _ = parse_config_text(text)
    return compile_config(cfg)



def test_reserve_clamp_refuse_and_retry_after():
    c = config()
    clock = Clock()
    book = BudgetBook(clock=clock)
    book.sync(c.budgets)
    route = c.routes["chat"]
    big = route.backends["big"]
    a1 = book.admit(route, big, 100, 500, 1, route.downgrade)
    assert a1.max_output == 500
    a2 = book.admit(route, big, 100, 500, 1, route.downgrade)
    assert a2.max_output == 300  # clamped: 1000 - 600 reserved - 100 prompt
    with pytest.raises(ProxyError) as e:
        book.admit(route, big, 100, 500, 1, route.downgrade)
    assert e.value.status == 429 and e.value.extra["budget"] == "b"
    assert 1 <= int(e.value.headers["Retry-After"]) <= 86400
    book.settle(a1, big.prices, TokenUsage(90, 10))  # used far less than reserved: room again
    a3 = book.admit(route, big, 100, 500, 1, route.downgrade)
    assert a3.max_output == 400  # 1000 - 100 used - 400 still reserved by a2 - 100 prompt


def test_unknown_usage_charges_whole_reservation_and_release_charges_nothing():
    c = config()
    book = BudgetBook(clock=Clock())
    book.sync(c.budgets)
    route, big = c.routes["chat"], c.routes["chat"].backends["big"]
    a = book.admit(route, big, 100, 200, 1, None)
    book.settle(a, big.prices, None)
    b = book.admit(route, big, 100, 200, 1, None)
    book.release(b)
    st = book.states["b"].allowance
    assert st.used.total_tokens == 300 and st.reserved.total_tokens == 0


def test_downgrade_and_alert_only():
    c = config("Downgrade", '{cost: {amount: "0.01"}}')
    book = BudgetBook(clock=Clock())
    book.sync(c.budgets)
    route = c.routes["chat"]
    big, small = route.backends["big"], route.backends["small"]
    a = book.admit(route, big, 100, 100, 1, route.downgrade)
    assert a.backend is big and not a.downgraded
    # 0.01 at 30/1M output buys ~333 output tokens on big: 1000 does not fit -> small
    a = book.admit(route, big, 100, 1000, 1, route.downgrade)
    assert a.backend is small and a.downgraded
    c = config("AlertOnly", '{tokens: {total: 10}}')
    book = BudgetBook(clock=Clock())
    book.sync(c.budgets)
    a = book.admit(c.routes["chat"], big, 100, 100, 1, None)
    assert a.max_output == 100 and a.over_budget == ["b"]


def test_new_period_resets_usage_and_state_file_roundtrip(tmp_path):
    c = config(window="1h")
    clock = Clock(3600 * 500_000 + 10)
    state = tmp_path / "s.json"
    book = BudgetBook(str(state), clock=clock)
    book.sync(c.budgets)
    route, big = c.routes["chat"], c.routes["chat"].backends["big"]
    a = book.admit(route, big, 10, 10, 1, None)
    book.settle(a, big.prices, TokenUsage(10, 10))
    book.save()
    again = BudgetBook(str(state), clock=clock)
    again.sync(c.budgets)
    assert again.states["b"].allowance.used.total_tokens == 20
    assert again.states["b"].allowance.used.cost == Decimal(10 * 10 + 10 * 30) / 10**6
    clock.t += 3600
    again.roll()
    assert again.states["b"].allowance.used.total_tokens == 0
    # in-flight reservations at shutdown are charged, never dropped
    a = again.admit(route, big, 10, 10, 1, None)
    again.shutdown()
    third = BudgetBook(str(state), clock=clock)
    third.sync(c.budgets)
    assert third.states["b"].allowance.used.total_tokens == 20


TWO_BUDGETS = """
kind: ModelRoute
metadata: {name: chat}
spec:
  model: chat
  defaultBackend: big
  backends:
  - {name: big, provider: OpenAI, url: "http://x/v1", model: big, pricing: {input: "10", output: "30"}}
  - {name: small, provider: OpenAI, url: "http://x/v1", model: small, pricing: {input: "0.1", output: "0.2"}}
---
kind: TokenBudget
metadata: {name: money}
spec: {window: 24h, limits: {cost: {amount: "0.05"}}}
---
kind: TokenBudget
metadata: {name: tokens}
spec: {window: 24h, routes: [chat], limits: {tokens: {total: 4000, output: 2500}}}
"""


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["admit", "settle", "fail"]), st.integers(0, 600), st.integers(1, 900),
                          st.sampled_from(["big", "small"]), st.floats(0, 1)), max_size=50))
def test_two_budgets_never_exceeded_under_any_interleaving(ops):
    cfg, _ = parse_config_text(TWO_BUDGETS)
    c = compile_config(cfg)
    book = BudgetBook(clock=Clock())
    book.sync(c.budgets)
    route = c.routes["chat"]
    open_ = []
    for op, inp, want, name, frac in ops:
        if op == "admit":
            try:
                open_.append((book.admit(route, route.backends[name], inp, want, 1, None), inp))
            except ProxyError as e:
                assert e.status == 429
        elif open_:
            adm, inp = open_.pop(int(frac * len(open_)) % len(open_))
            if op == "settle":  # the provider reports at most what was reserved
                book.settle(adm, adm.backend.prices, TokenUsage(inp, int(adm.max_output * frac)))
            else:
                book.settle(adm, adm.backend.prices, None)
        for st_ in book.states.values():
            a = st_.allowance
            total = a.used + a.reserved
            lim = a.limits
            assert lim.cost is None or total.cost <= lim.cost
            assert lim.total_tokens is None or total.total_tokens <= lim.total_tokens
            assert lim.output_tokens is None or total.output_tokens <= lim.output_tokens


def test_reload_keeps_usage_unless_the_period_changes():
    c = config(limits='{tokens: {total: 1000}}', window="24h")
    book = BudgetBook(clock=Clock())
    book.sync(c.budgets)
    route, big = c.routes["chat"], c.routes["chat"].backends["big"]
    book.settle(book.admit(route, big, 100, 100, 1, None), big.prices, TokenUsage(100, 100))
    # limit raised: usage kept, the new limit applies at once
    c2 = config(limits='{tokens: {total: 5000}}', window="24h")
    book.sync(c2.budgets)
    st = book.states["b"]
    assert st.allowance.used.total_tokens == 200 and st.allowance.limits.total_tokens == 5000
    # a different period (window 1h instead of 24h): usage starts again
    c3 = config(limits='{tokens: {total: 5000}}', window="1h")
    book.sync(c3.budgets)
    assert book.states["b"].allowance.used.total_tokens == 0  # the 1h period starts later than the 24h one
    # a budget removed from the configuration is dropped
    cfg, _ = parse_config_text("kind: ModelRoute\nmetadata: {name: x}\nspec: {model: x, defaultBackend: a, "
                               "backends: [{name: a, provider: OpenAI, url: 'http://x', model: m, "
                               "pricing: {input: '1', output: '1'}}]}\n")
    book.sync(compile_config(cfg).budgets)
    assert book.states == {}


def _leased_book(c, limits):
    """A ledger-mode book whose budget holds a valid lease of `limits` (as the ledger client sets it)."""
    clock = Clock()
    book = BudgetBook(clock=clock)
    book.ledger = True
    book.sync(c.budgets)
    st = book.states["b"]
    st.lease.valid_until, st.lease.ceiling = clock() + 60, limits
    st.allowance.limits = limits
    return book, st


def test_the_smallest_admitted_request_is_its_least_reservation_and_falls_per_dimension():
    c = config(limits='{tokens: {total: 10000}}')
    book, st = _leased_book(c, Limits(total_tokens=10_000))
    route = c.routes["chat"]
    big = route.backends["big"]
    book.admit(route, big, 300, 500, 1, route.downgrade)
    assert st.lease.admitted.value(book.clock()) == Amount.worst_case(big.prices, 300, 16)  # output as a clamp may cut it
    book.admit(route, big, 100, 8, 1, route.downgrade)
    assert st.lease.admitted.value(book.clock()) == Amount.worst_case(big.prices, 100, 8)
    book.admit(route, big, 200, 4, 2, route.downgrade)  # 2 choices of 4: 8 output tokens
    assert st.lease.admitted.value(book.clock()) == Amount.worst_case(big.prices, 100, 8)


def test_the_smallest_admitted_request_counts_for_the_window_then_stops_counting():
    # A small request made once, early, must not keep a budget whose requests now all need more than
    # is left out of the spent state for the rest of the period (ledger/leases.py).
    c = config(limits='{tokens: {total: 10000}}')
    book, st = _leased_book(c, Limits(total_tokens=10_000))
    route = c.routes["chat"]
    big = route.backends["big"]
    st.lease.valid_until = book.clock() + 10_000
    st.lease.admitted.window = 60
    book.admit(route, big, 10, 16, 1, route.downgrade)
    small = Amount.worst_case(big.prices, 10, 16)
    book.clock.t += 35   # two buckets of half a window each: this one is in the next
    book.admit(route, big, 400, 16, 1, route.downgrade)
    assert st.lease.admitted.value(book.clock()) == small
    book.clock.t += 30   # the small one is 65 s old: gone; the larger one (30 s) still counts
    assert st.lease.admitted.value(book.clock()) == Amount.worst_case(big.prices, 400, 16)
    book.clock.t += 60
    assert st.lease.admitted.value(book.clock()) is None


def test_downgraded_and_alert_only_requests_are_not_what_a_budget_covers():
    c = config("Downgrade", '{cost: {amount: "0.01"}}')
    book, st = _leased_book(c, Limits(cost=Decimal("0.01")))
    route = c.routes["chat"]
    big = route.backends["big"]
    assert book.admit(route, big, 100, 1000, 1, route.downgrade).downgraded  # past what the lease covers
    assert st.lease.admitted.value(book.clock()) is None
    assert not book.admit(route, big, 100, 100, 1, route.downgrade).downgraded
    assert st.lease.admitted.value(book.clock()) == Amount.worst_case(big.prices, 100, 16)
    c = config("AlertOnly")
    book, st = _leased_book(c, Limits(total_tokens=1000))
    book.admit(c.routes["chat"], big, 100, 100, 1, None)
    assert st.lease.admitted.value(book.clock()) is None


def test_a_prompt_written_to_the_cache_never_overshoots_a_cost_budget():
    # Anthropic bills a 1-hour cache write at 2x input: the reservation must price the prompt so.
    cfg, _ = parse_config_text("""
kind: ModelRoute
metadata: {name: claude}
spec:
  model: claude
  defaultBackend: sonnet
  backends:
  - {name: sonnet, provider: Anthropic, url: "http://x", model: sonnet, pricing: {input: "3", output: "15"}}
---
kind: TokenBudget
metadata: {name: b}
spec: {window: 24h, onExceeded: CutOff, limits: {cost: {amount: "0.0105"}}}
""")
    c = compile_config(cfg)
    book = BudgetBook(clock=Clock())
    book.sync(c.budgets)
    route = c.routes["claude"]
    sonnet = route.backends["sonnet"]
    a = book.admit(route, sonnet, 1000, 1000, 1, None)
    assert a.max_output == 300  # (0.0105 - 1000 x 6/1M) / (15/1M), not 500 at the plain input price
    book.settle(a, sonnet.prices, TokenUsage(1000, a.max_output, 0, cache_write_tokens=1000, cache_write_1h_tokens=1000))
    used = book.states["b"].allowance.used.cost
    assert used == Decimal("0.0105")  # the whole budget, not a micro-dollar more
