"""Every ModelRoute and TokenBudget the watches delivered, by namespace, and whether the watches have
delivered everything that existed at start-up.

This replaces kopf.index: kopf makes every object's first event wait until all objects of all
indexed kinds are listed, and that wait wakes every waiting object on each change (quadratic: with
4,000 objects nothing was reconciled for minutes). Here events only record; a namespace is rendered
once `complete` says the first listing has been seen, so a restarted operator never renders a
namespace from half of its objects (a ConfigMap without its routes would reach the proxies).

`complete`: the start-up list's object uids, each crossed off when its event (or a deletion) arrives;
objects deleted between that list and the watch's own never arrive, so after `relist_after` seconds
the remainder is checked against a fresh list. Kept per namespace: a namespace is rendered once its
own objects have arrived, so one whose objects the watches never deliver (a namespace kopf stopped
watching while it terminates) holds back only itself, never the others.
Thread-safe: events arrive on the event loop, snapshots are taken in reconcile threads.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any


class Inventory:
    def __init__(self, relist_after: float = 20.0, clock: Callable[[], float] = time.monotonic):
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._expected: dict[str, str] | None = None  # uid -> namespace; None: the start-up list is not known yet
        self._pending: Counter[str] = Counter()       # namespace -> how many of its expected uids are still out
        self._seen: set[str] = set()             # uids delivered before the start-up list was known
        self._since = clock()
        self.relist_after = relist_after
        self.clock = clock

    # -- events

    def observe(self, event_type: str | None, obj: dict[str, Any]) -> str:
        """Record one watch event; returns the object's namespace."""
        meta = obj["metadata"]
        ns, key, uid = meta["namespace"], (obj["kind"], meta["name"]), meta.get("uid")
        with self._lock:
            if event_type == "DELETED":
                objects = self._objects.get(ns)
                if objects is not None and objects.get(key, {}).get("metadata", {}).get("uid") == uid:
                    del objects[key]
                    if not objects:
                        del self._objects[ns]
            else:
                self._objects.setdefault(ns, {})[key] = obj
            self._cross_off(uid)
        return ns

    def in_namespace(self, namespace: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(routes, budgets) as of now."""
        with self._lock:
            objects = list(self._objects.get(namespace, {}).values())
        return ([o for o in objects if o["kind"] == "ModelRoute"], [o for o in objects if o["kind"] == "TokenBudget"])

    def namespaces(self) -> list[str]:
        with self._lock:
            return list(self._objects)

    # -- completeness of the first listing

    def expect(self, objects: Iterable[tuple[str, str]]) -> None:
        """The (namespace, uid) of every object that existed at start-up (a list made before the
        watches started)."""
        with self._lock:
            self._expected = {uid: ns for ns, uid in objects if uid not in self._seen}
            self._pending = Counter(self._expected.values())
            self._seen.clear()
            self._since = self.clock()

    def recheck(self, existing: Iterable[tuple[str, str]]) -> None:
        """A fresh list of (namespace, uid): expected objects that no longer exist will never arrive."""
        with self._lock:
            if self._expected is not None:
                still = {uid for _, uid in existing}
                self._expected = {uid: ns for uid, ns in self._expected.items() if uid in still}
                self._pending = Counter(self._expected.values())
            self._since = self.clock()

    def complete(self, namespace: str | None = None) -> bool:
        """Whether the start-up listing has been delivered: in `namespace`, or everywhere."""
        with self._lock:
            if self._expected is None:
                return False
            return not self._expected if namespace is None else not self._pending.get(namespace)

    def pending(self) -> list[str]:
        """The namespaces still waiting for objects of the start-up list, sorted."""
        with self._lock:
            return sorted(ns for ns, n in self._pending.items() if n)

    def needs_recheck(self) -> bool:
        with self._lock:
            return self._expected is not None and bool(self._expected) and self.clock() - self._since >= self.relist_after

    def _cross_off(self, uid: str | None) -> None:
        if uid is None:
            return
        if self._expected is None:
            self._seen.add(uid)
        else:
            ns = self._expected.pop(uid, None)
            if ns is not None:
                self._pending[ns] -= 1

    def if_complete(self) -> Inventory | None:
        """This inventory for the admission webhooks (`in_namespace`); None (unknown) until the first
        listing is complete, as a sibling check against a partial view could let a duplicate through."""
        return self if self.complete() else None
