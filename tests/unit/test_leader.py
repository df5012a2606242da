"""Leader election's pure rules (controller/leader.py): who may take a Lease, and when."""
from __future__ import annotations

from datetime import UTC, datetime

from spendwarden.controller.leader import Action, ElectionConfig, LeaseRecord, Observation, decide, lease_body

ME, OTHER = "op-b", "op-a"


def record(holder=OTHER, renew="t1", rv="10", duration=15.0, transitions=0) -> LeaseRecord:
    return LeaseRecord(holder=holder, duration=duration, renew_time=renew, transitions=transitions, resource_version=rv)


def test_no_lease_is_created():
    assert decide(None, ME, None, now=0.0) == (Action.CREATE, None)


def test_our_own_lease_is_renewed_at_once_also_after_a_restart():
    # A container restarted in the same pod (same identity) resumes without waiting out the lease.
    action, observed = decide(record(holder=ME), ME, None, now=5.0)
    assert action is Action.RENEW and observed.seen_at == 5.0


def test_a_released_lease_is_taken_at_once():
    assert decide(record(holder=""), ME, None, now=0.0)[0] is Action.ACQUIRE


def test_a_held_lease_is_taken_only_after_it_stood_still_for_its_duration_on_our_clock():
    lease = record()
    action, observed = decide(lease, ME, None, now=100.0)
    assert action is Action.WAIT and observed == Observation(lease, 100.0)
    assert decide(lease, ME, observed, now=114.9)[0] is Action.WAIT
    action, _ = decide(lease, ME, observed, now=115.0)
    assert action is Action.ACQUIRE


def test_a_renewal_restarts_the_wait_whatever_the_renew_time_says():
    # The holder's renewTime is compared for change, never against our wall clock (clock skew).
    _, observed = decide(record(renew="2000-01-01T00:00:00Z", rv="10"), ME, None, now=100.0)
    renewed = record(renew="2000-01-01T00:00:02Z", rv="11")
    action, observed = decide(renewed, ME, observed, now=114.0)
    assert action is Action.WAIT and observed.seen_at == 114.0
    assert decide(renewed, ME, observed, now=128.0)[0] is Action.WAIT
    assert decide(renewed, ME, observed, now=129.0)[0] is Action.ACQUIRE


def test_the_wait_uses_the_lease_own_duration():
    lease = record(duration=4.0)
    _, observed = decide(lease, ME, None, now=0.0)
    assert decide(lease, ME, observed, now=3.9)[0] is Action.WAIT
    assert decide(lease, ME, observed, now=4.0)[0] is Action.ACQUIRE


def test_body_of_a_takeover_counts_a_transition_and_carries_the_resource_version():
    now = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    body = lease_body("lease", "ns", ME, 15, now, record(transitions=3, rv="42"))
    assert body["metadata"] == {"name": "lease", "namespace": "ns", "resourceVersion": "42"}
    assert body["spec"] == {"holderIdentity": ME, "leaseDurationSeconds": 15, "acquireTime": "2026-01-02T03:04:05.678901Z",
                            "renewTime": "2026-01-02T03:04:05.678901Z", "leaseTransitions": 4}


def test_body_of_a_renewal_keeps_acquire_time_and_transitions():
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    body = lease_body("lease", "ns", ME, 15, now, record(holder=ME, transitions=3), acquire_time="2026-01-01T00:00:00.000000Z")
    assert body["spec"]["acquireTime"] == "2026-01-01T00:00:00.000000Z"
    assert body["spec"]["renewTime"] == "2026-01-02T03:04:05.000000Z"
    assert body["spec"]["leaseTransitions"] == 3


def test_body_of_a_new_lease_and_of_a_release():
    now = datetime(2026, 1, 2, tzinfo=UTC)
    created = lease_body("lease", "ns", ME, 15, now, None)
    assert "resourceVersion" not in created["metadata"] and created["spec"]["leaseTransitions"] == 0
    released = lease_body("lease", "ns", ME, 15, now, record(holder=ME, transitions=2), release=True)
    assert released["spec"]["holderIdentity"] == "" and released["spec"]["leaseTransitions"] == 2


def test_renew_deadline_and_retry_period_keep_client_go_proportions():
    c = ElectionConfig.for_duration("l", "ns", ME, 15)
    assert (c.lease_duration, c.renew_deadline, c.retry_period) == (15, 10, 2)
    short = ElectionConfig.for_duration("l", "ns", ME, 3)
    assert short.renew_deadline < short.lease_duration and short.retry_period < short.renew_deadline
