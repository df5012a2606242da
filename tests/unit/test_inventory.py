"""The reconcile's inventory (controller/inventory.py): what the watches delivered, and when the
first listing is complete enough to render from."""
from __future__ import annotations

from spendwarden.controller.inventory import Inventory


def obj(kind, name, ns="team-a", uid=None):
    return {"kind": kind, "metadata": {"name": name, "namespace": ns, "uid": uid or f"{ns}/{kind}/{name}"}}


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_events_fill_and_empty_namespaces():
    inv = Inventory()
    inv.observe(None, obj("ModelRoute", "chat"))
    inv.observe(None, obj("TokenBudget", "monthly"))
    inv.observe("MODIFIED", {**obj("TokenBudget", "monthly"), "status": {"state": "Warning"}})
    routes, budgets = inv.in_namespace("team-a")
    assert [r["metadata"]["name"] for r in routes] == ["chat"] and budgets[0]["status"] == {"state": "Warning"}
    inv.observe("DELETED", obj("ModelRoute", "chat"))
    inv.observe("DELETED", obj("TokenBudget", "monthly"))
    assert inv.in_namespace("team-a") == ([], []) and inv.namespaces() == []


def test_a_late_deletion_of_a_replaced_object_keeps_the_new_one():
    inv = Inventory()
    inv.observe(None, obj("ModelRoute", "chat", uid="new"))
    inv.observe("DELETED", obj("ModelRoute", "chat", uid="old"))
    assert inv.in_namespace("team-a")[0][0]["metadata"]["uid"] == "new"


def test_complete_once_everything_listed_at_start_up_was_delivered():
    inv = Inventory()
    inv.observe(None, obj("ModelRoute", "early"))  # the watch may deliver before the list returns
    assert not inv.complete()  # nothing known yet: never render from a partial view
    inv.expect([("team-a", "team-a/ModelRoute/early"), ("team-a", "team-a/TokenBudget/monthly"),
                ("team-b", "team-b/ModelRoute/chat")])
    assert not inv.complete()
    inv.observe(None, obj("TokenBudget", "monthly"))
    inv.observe("DELETED", obj("ModelRoute", "chat", ns="team-b"))
    assert inv.complete()


def test_objects_deleted_before_the_watch_listed_them_are_rechecked():
    clock = Clock()
    inv = Inventory(relist_after=20, clock=clock)
    inv.expect([("team-a", "a"), ("team-b", "gone")])
    inv.observe(None, obj("ModelRoute", "chat", uid="a"))
    assert not inv.complete() and not inv.needs_recheck()
    clock.now = 20
    assert inv.needs_recheck()
    inv.recheck([("team-a", "a"), ("team-c", "created-later")])
    assert inv.complete() and not inv.needs_recheck()


def test_each_namespace_is_complete_once_its_own_objects_arrived():
    """One namespace whose objects never arrive holds back only itself."""
    clock = Clock()
    inv = Inventory(relist_after=20, clock=clock)
    assert not inv.complete("team-a")  # the start-up list is not known yet
    inv.expect([("team-a", "a1"), ("team-a", "a2"), ("stuck", "s1")])
    assert not inv.complete("team-a") and not inv.complete("stuck")
    assert inv.complete("team-new")  # nothing of it existed at start-up
    inv.observe(None, obj("ModelRoute", "chat", uid="a1"))
    assert not inv.complete("team-a")
    inv.observe(None, obj("TokenBudget", "monthly", uid="a2"))
    assert inv.complete("team-a") and not inv.complete()
    assert inv.pending() == ["stuck"]
    clock.now = 20
    inv.recheck([("stuck", "s1")])  # it still exists: still waited for
    assert not inv.complete("stuck") and inv.pending() == ["stuck"]
    inv.recheck([])
    assert inv.complete("stuck") and inv.complete() and inv.pending() == []
