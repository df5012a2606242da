"""What makes the event path re-render a namespace (controller/reconcile.inputs_key)."""
from __future__ import annotations

import copy

from spendwarden.controller.reconcile import inputs_key


def obj(kind="TokenBudget", name="monthly", generation=1, **status):
    return {"kind": kind, "metadata": {"name": name, "namespace": "team-a", "uid": f"uid-{name}", "generation": generation},
            "spec": {"x": generation}, "status": status}


def test_status_writes_do_not_change_the_inputs_but_specs_deletions_and_membership_do():
    budget, route = obj(), obj("ModelRoute", "chat")
    key = inputs_key([budget, route])
    assert inputs_key([route, budget]) == key  # order of the index does not matter
    assert inputs_key([obj(state="Warning", percentUsed=0), route]) == key  # our own writes
    # Usage written by someone else than the in-process ledger: the percentages follow it.
    assert inputs_key([obj(used={"totalTokens": 600}), route]) != key
    owned = obj(used={"totalTokens": 600}, ledger={"proxies": {}})
    assert inputs_key([owned, route]) == inputs_key([obj(used={"totalTokens": 900}, ledger={"proxies": {}}), route])
    assert inputs_key([obj(generation=2), route]) != key
    deleting = copy.deepcopy(budget)
    deleting["metadata"]["deletionTimestamp"] = "2026-11-22T00:00:00Z"
    assert inputs_key([deleting, route]) != key
    assert inputs_key([route]) != key
    recreated = copy.deepcopy(budget)
    recreated["metadata"]["uid"] = "another"  # deleted and created again: new owner reference
    assert inputs_key([recreated, route]) != key
