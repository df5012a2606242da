"""The registry of kinds of bad input the abuse suite (and the older hostile tests) throw at each
surface, and what each got. The abuse conftest prints it at the end of a run.

A kind is one way of being wrong ("invalid-utf8", "wrong-type:max_tokens", ...) on one surface
("proxy", "ledger", "webhooks", "upstream"). Each example sent is recorded with its outcome:

    clear     a 4xx with an error body in the surface's own shape, naming what is wrong
    handled   no error, correctly (the input was odd but acceptable: an unknown field passed on,
              nonsense usage charged as the reservation, a 502/503/504 in the proxy's error shape)
    crash     anything else: a 5xx of our own, a body that is not the error shape, a dead process

Recording happens before the test's assertions, so a failing test still shows as a crash here.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

CLEAR, HANDLED, CRASH = "clear", "handled", "crash"


@dataclass
class Tally:
    examples: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: defaultdict(int))


# surface -> kind -> Tally
REGISTRY: dict[str, dict[str, Tally]] = defaultdict(lambda: defaultdict(Tally))


def record(surface: str, kind: str, outcome: str) -> None:
    assert outcome in (CLEAR, HANDLED, CRASH), outcome
    t = REGISTRY[surface][kind]
    t.examples += 1
    t.outcomes[outcome] += 1


def summary_lines() -> list[str]:
    """One line per surface and a total: kinds, how many kinds always got a clear 4xx, how many were
    (also) handled without an error, examples sent, crashes."""
    lines = []
    total_kinds = total_clear = total_crash = total_examples = 0
    for surface in sorted(REGISTRY):
        kinds = REGISTRY[surface]
        clear = sum(1 for t in kinds.values() if t.outcomes[CLEAR] == t.examples)
        handled = sum(1 for t in kinds.values() if t.outcomes[HANDLED] and not t.outcomes[CRASH])
        crashes = sum(t.outcomes[CRASH] for t in kinds.values())
        examples = sum(t.examples for t in kinds.values())
        lines.append(f"{surface:9} {len(kinds):4} kinds  {clear:4} always a clear 4xx  {handled:4} (also) handled "
                     f"without an error  {examples:6} examples  {crashes} crashes")
        total_kinds += len(kinds)
        total_clear += clear
        total_crash += crashes
        total_examples += examples
    lines.append(f"{'all':9} {total_kinds:4} kinds  {total_clear:4} always a clear 4xx  {'':38}{total_examples:6} "
                 f"examples  {total_crash} crashes")
    crashed = [f"{s}/{k}" for s in sorted(REGISTRY) for k, t in sorted(REGISTRY[s].items()) if t.outcomes[CRASH]]
    if crashed:
        lines.append("crashed: " + ", ".join(crashed))
    return lines


# The hostile tests written before this suite, counted when they pass (as a crash when they fail):
# "file::test" -> (surface, kind, outcome). A parametrized test is one kind per parameter set (its id
# is appended to the kind), except where its cases are one kind sent several ways.
_P, _U = "tests/proxy/", "tests/unit/"
EARLIER_TESTS: dict[str, tuple[str, str, str]] = {
    _P + "test_hostile_requests.py::test_absurd_request_sizes_get_a_400_naming_the_field_not_budget_exhausted":
        ("proxy", "absurd-size", CLEAR),
    _P + "test_hostile_requests.py::test_malformed_requests_leave_no_credential_in_the_logs":
        ("proxy", "malformed-head-carrying-a-credential", CLEAR),
    _P + "test_hostile_upstream.py::test_nonsense_usage_charges_the_reservation_and_never_credits":
        ("upstream", "nonsense-usage", HANDLED),
    _P + "test_hostile_upstream.py::test_a_huge_unary_answer_is_not_read_whole_it_gets_a_502_naming_the_bound_and_"
         "charges_the_reservation": ("upstream", "huge-answer", HANDLED),
    _P + "test_hostile_upstream.py::test_a_stream_event_larger_than_the_bound_ends_the_stream_with_an_error_and_"
         "charges_the_reservation": ("upstream", "huge-stream-event", HANDLED),
    _P + "test_hostile_upstream.py::test_an_upstream_429_reaches_the_sdks_with_its_body_and_rate_limit_headers":
        ("upstream", "429-with-charset", HANDLED),
    _P + "test_slow_clients.py::test_a_slowloris_head_gets_a_408_and_is_closed_at_the_head_deadline":
        ("proxy", "slowloris-head", CLEAR),
    _P + "test_slow_clients.py::test_a_connection_that_never_sends_a_head_is_closed_at_the_head_deadline":
        ("proxy", "silent-connection", HANDLED),
    _P + "test_slow_clients.py::test_a_trickled_body_gets_a_408_in_the_api_shape_at_the_body_deadline":
        ("proxy", "trickled-body", CLEAR),
    _P + "test_body_flood.py::test_partial_large_bodies_stay_within_the_buffer_bound_and_ordinary_requests_are_served":
        ("proxy", "flood-of-partial-8MiB-bodies", HANDLED),
    _U + "test_ledger_http.py::test_bad_requests_get_a_clear_json_error_and_the_server_stays_up":
        ("ledger", "malformed-http", CLEAR),
    _U + "test_ledger_http.py::test_a_request_trickled_byte_by_byte_gets_408_at_its_deadline":
        ("ledger", "trickled", CLEAR),
    _U + "test_ledger_http.py::test_bare_lf_line_endings_are_refused_at_once": ("ledger", "bare-lf", CLEAR),
    _U + "test_ledger_service.py::test_http_answers_400_to_amounts_the_ledger_cannot_hold":
        ("ledger", "money-exponent-overflow", CLEAR),
    _U + "test_ledger_service.py::test_unknown_budget_names_cost_a_bounded_number_of_gets_and_no_lasting_state":
        ("ledger", "unknown-budget-names-flood", HANDLED),
    _U + "test_ledger_service.py::test_a_flood_of_unknown_tokens_neither_starves_known_callers_nor_is_reviewed_twice":
        ("ledger", "unknown-token-flood", HANDLED),
    _U + "test_ledger_service.py::test_a_large_body_is_read_only_for_a_token_known_good_or_reviewed_first":
        ("ledger", "large-unauthenticated-body", CLEAR),
    _U + "test_ledger_service.py::test_connections_are_bounded_and_a_silent_one_holds_its_slot_only_briefly":
        ("ledger", "connection-flood", HANDLED),
    _U + "test_ledger_service.py::test_pipelined_requests_read_ahead_are_bounded": ("ledger", "pipeline-flood", HANDLED),
}
# Cases of one parametrized test that are one kind sent several ways (not counted apart).
_ONE_KIND = {"malformed-head-carrying-a-credential"}


def earlier_kind(nodeid: str) -> tuple[str, str, str] | None:
    """The (surface, kind, outcome if passed) of an earlier hostile test's node id, None for others."""
    base, _, param = nodeid.partition("[")
    hit = EARLIER_TESTS.get(base)
    if hit is None or "/boom" in param:  # /boom: a handler that raises, not bad input
        return None
    surface, kind, outcome = hit
    if param and kind not in _ONE_KIND:
        kind = f"{kind}[{param.rstrip(']')}"
    return surface, kind, outcome
