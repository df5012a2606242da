"""The pure scaling core with an injected clock: desired replicas, stabilisation, idle-to-zero, wake,
cut-off, shared workloads, replica-hours."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spendwarden.api.modelroute import ModelRouteSpec
from spendwarden.scaling.capacity import ReplicaMeter, calendar_month
from spendwarden.scaling.demand import BackendLoad, BackendsError, DemandBook, parse_backends
from spendwarden.scaling.policy import WAKE_GRACE_SECONDS, Demand, Policy, ScaleState, decide, raw_replicas
from spendwarden.scaling.workloads import SHARED_WITH_ANNOTATION, WorkloadKey, demand, governing, uses_by_workload

P = Policy(min_replicas=1, max_replicas=5, target=4, stabilization=60, idle_to_zero=300)


def test_raw_is_ceil_of_in_flight_over_target_within_bounds():
    assert [raw_replicas(P, n) for n in (0, 1, 4, 5, 8, 9, 100)] == [1, 1, 1, 2, 2, 3, 5]
    zero_min = Policy(0, 3, 2, 60, None)
    assert [raw_replicas(zero_min, n) for n in (0, 1, 2, 3)] == [0, 1, 1, 2]


def test_up_at_once_down_only_after_the_window():
    s = ScaleState.new(0)
    assert decide(s, P, Demand(17), 0).desired == 5        # up at once
    d = decide(s, P, Demand(4), 10)
    assert d.desired == 5
    assert d.reason == "Stabilizing" and d.raw == 1
    assert decide(s, P, Demand(4), 59.9).desired == 5      # still inside the window
    assert decide(s, P, Demand(4), 60.1).desired == 1      # the 17 has left the window
    assert decide(s, P, Demand(4), 61).reason == "Demand"


def test_no_flapping_under_oscillating_load():
    s = ScaleState.new(0)
    seen = [decide(s, P, Demand(20 if t % 2 else 1), t).desired for t in range(0, 50)]
    assert seen == [1] + [5] * 49   # one change up, none down while the load keeps coming back


def test_idle_to_zero_after_the_idle_period_only():
    s = ScaleState.new(0)
    decide(s, P, Demand(3), 0)
    assert decide(s, P, Demand(0), 299).desired == 1
    d = decide(s, P, Demand(0), 300)
    assert (d.desired, d.reason) == (0, "Idle")
    assert decide(s, P, Demand(0), 1000).desired == 0
    assert decide(s, P, Demand(1), 1001).desired == 1      # demand is back


def test_min_zero_with_idle_to_zero_keeps_one_replica_until_the_idle_period_has_passed():
    """minReplicas 0 says "may reach zero": with idleToZeroAfter set only the idle period takes it
    there, not the (much shorter) stabilisation window."""
    policy = Policy(0, 2, 1, 1, 10)
    s = ScaleState.new(0, replicas=1)
    assert decide(s, policy, Demand(1), 0).desired == 1
    assert [decide(s, policy, Demand(0), t).desired for t in (2, 5, 9.9)] == [1, 1, 1]
    assert decide(s, policy, Demand(0), 10).desired == 0
    # Without idleToZeroAfter, minReplicas 0 is the floor after the stabilisation window.
    no_idle = Policy(0, 2, 1, 1, None)
    s = ScaleState.new(0, replicas=1)
    decide(s, no_idle, Demand(1), 0)
    assert decide(s, no_idle, Demand(0), 2).desired == 0


def test_an_operator_finding_a_workload_at_zero_does_not_wake_it():
    policy = Policy(0, 2, 1, 1, 3600)
    s = ScaleState.new(100, replicas=0)
    assert decide(s, policy, Demand(0), 100).desired == 0
    s = ScaleState.new(100, replicas=1)   # one found running is kept for the idle period
    assert decide(s, policy, Demand(0), 100).desired == 1


def test_no_idle_to_zero_without_the_setting():
    s = ScaleState.new(0)
    never = Policy(1, 5, 4, 60, None)
    assert decide(s, never, Demand(0), 10**6).desired == 1


def test_wake_asks_for_one_replica_until_reports_carry_the_request():
    s = ScaleState.new(0)
    assert decide(s, P, Demand(0), 400).desired == 0
    s.wake(401)
    d = decide(s, P, Demand(0), 401)
    assert (d.desired, d.reason) == (1, "Wake")
    assert decide(s, P, Demand(0), 401 + WAKE_GRACE_SECONDS - 1).desired == 1
    # After the grace the woken replica stays for the idle period like any other.
    assert decide(s, P, Demand(0), 401 + WAKE_GRACE_SECONDS + 1).desired == 1
    assert decide(s, P, Demand(0), 401 + 300).desired == 0


def test_cut_off_is_zero_at_once_and_back_after():
    s = ScaleState.new(0)
    decide(s, P, Demand(20), 0)
    d = decide(s, P, Demand(20, cut_off=True), 1)
    assert (d.desired, d.reason) == (0, "CutOff")
    s.wake(2)  # a proxy of the cut-off namespace asking: still zero
    assert decide(s, P, Demand(0, cut_off=True), 2).desired == 0
    # The reset: back to the policy, with a full idle period before idle-to-zero.
    assert decide(s, P, Demand(0), 5000).desired == 1
    assert decide(s, P, Demand(0), 5299).desired == 1
    assert decide(s, P, Demand(0), 5300).desired == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.floats(0.1, 30)), min_size=1, max_size=60),
       st.integers(0, 3), st.integers(1, 6), st.integers(1, 8), st.integers(1, 120))
def test_properties(steps, lo, span, target, window):
    policy = Policy(lo, lo + span, target, float(window), None)
    s = ScaleState.new(0)
    t, history = 0.0, []
    for in_flight, dt in steps:
        t += dt
        d = decide(s, policy, Demand(in_flight), t)
        history.append((t, in_flight, d.desired))
        # Within bounds, never below what the current demand needs (up at once).
        assert policy.min_replicas <= d.desired <= policy.max_replicas
        assert d.desired >= raw_replicas(policy, in_flight)
        # Never above the highest need seen within the window (down once the window has passed).
        assert d.desired == max(raw_replicas(policy, f) for tt, f, _ in history if t - tt < window)


def test_demand_book_sums_fresh_proxies_only():
    book = DemandBook(ttl=5)
    book.record("p1", "a", {"chat/llama": BackendLoad(3, 10)}, now=100)
    book.record("p2", "a", {"chat/llama": BackendLoad(2, 40)}, now=101)
    book.record("p3", "b", {"chat/llama": BackendLoad(7, 0)}, now=101)
    assert book.load(102)[("a", "chat/llama")] == BackendLoad(5, 40)
    assert book.load(105.5) == {("a", "chat/llama"): BackendLoad(2, 40), ("b", "chat/llama"): BackendLoad(7, 0)}
    book.record("p2", "a", {"chat/llama": BackendLoad(0, 0)}, now=106)  # the latest report replaces
    assert book.load(106)[("a", "chat/llama")] == BackendLoad(0, 0)


@pytest.mark.parametrize("body, message", [
    ([], "backends: must be an object"),
    ({"x": 3}, "backends.x: must be an object with inFlight and queueMs"),
    ({"x": {"inFlight": -1}}, "backends.x.inFlight: must be a non-negative integer"),
    ({"x": {"inFlight": 1, "queueMs": 2.5}}, "backends.x.queueMs: must be a non-negative integer"),
    ({"x": {"inFlight": True}}, "backends.x.inFlight: must be a non-negative integer"),
])
def test_parse_backends_names_the_field(body, message):
    with pytest.raises(BackendsError, match=message.replace(".", r"\.")):
        parse_backends(body)


def test_parse_backends():
    assert parse_backends(None) == {}
    assert parse_backends({"chat/llama": {"inFlight": 3, "queueMs": 12}}) == {"chat/llama": BackendLoad(3, 12)}


def _route(model: str, ref: dict, scaling: dict | None = None) -> ModelRouteSpec:
    backend = {"name": "llama", "provider": "OpenAICompatible", "url": "http://llama:8080/v1", "model": "l",
               "pricing": {"input": "0", "output": "0"}, "deploymentRef": ref}
    if scaling:
        backend["scaling"] = scaling
    return ModelRouteSpec.model_validate({"model": model, "backends": [backend], "defaultBackend": "llama"})


def test_shared_workload_scales_on_allowed_uncut_namespaces():
    routes = [("inference", "own", _route("x", {"name": "llama"}, {"maxReplicas": 8, "targetInFlightPerReplica": 2})),
              ("team-a", "chat", _route("chat", {"name": "llama", "namespace": "inference"}, {"maxReplicas": 2})),
              ("team-b", "chat", _route("chat", {"name": "llama", "namespace": "inference"})),
              ("team-c", "chat", _route("chat", {"name": "llama", "namespace": "inference"}))]
    uses = uses_by_workload(routes)
    key = WorkloadKey("Deployment", "inference", "llama")
    assert [u.namespace for u in uses[key]] == ["inference", "team-a", "team-b", "team-c"]
    shared = {SHARED_WITH_ANNOTATION: "team-a, team-b"}
    # The workload's own namespace governs, whatever order.
    assert governing(key, uses[key], shared).scaling.maxReplicas == 8
    load = {("team-a", "chat/llama"): BackendLoad(5, 1), ("team-b", "chat/llama"): BackendLoad(4, 9),
            ("team-c", "chat/llama"): BackendLoad(100, 0)}
    d, queue = demand(key, uses[key], shared, load, is_cut=lambda u: False)
    assert (d, queue) == (Demand(9), 9)                      # team-c is not allowed to drive it
    d, _ = demand(key, uses[key], shared, load, is_cut=lambda u: u.namespace == "team-b")
    assert d == Demand(5)                                    # team-b is cut off: its demand does not count
    d, _ = demand(key, uses[key], shared, load, is_cut=lambda u: u.namespace in {"team-a", "team-b", "inference"})
    assert d == Demand(0, cut_off=True)
    # Without the annotation only the own namespace counts; without own settings, nobody else's apply.
    d, _ = demand(key, uses[key], None, load, is_cut=lambda u: False)
    assert d == Demand(0)
    assert governing(key, uses[key][1:], None) is None
    assert governing(key, uses[key][1:], {SHARED_WITH_ANNOTATION: "*"}).namespace == "team-a"


def test_replica_hours_exact_and_split_at_period_ends():
    t0 = datetime(2026, 1, 31, 23, 0, tzinfo=UTC)
    m = ReplicaMeter.start(t0, calendar_month)
    m.observe(3, t0, calendar_month)
    m.observe(1, t0 + timedelta(minutes=30), calendar_month)      # 3 x 30 min = 1.5 h
    m.observe(2, t0 + timedelta(minutes=90), calendar_month)      # 1 x 60 min across the month end
    st_ = m.status(Decimal("2.40"), "USD")
    assert st_["periodStart"] == "2026-02-01T00:00:00Z"
    assert st_["replicaHours"] == "0.5000" and st_["cost"] == "1.200000"
    assert st_["previous"] == {"periodStart": "2026-01-01T00:00:00Z", "replicaHours": "2.0000", "cost": "4.800000"}
    assert "cost" not in m.status(None, "USD")
