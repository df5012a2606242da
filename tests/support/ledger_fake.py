"""The apiserver as the ledger service sees it, faked: one TokenBudget, merge-patched, slow writes.
Shared by the ledger service's unit tests and the abuse suite."""
from __future__ import annotations

import copy
import threading
import time

from spendwarden.controller import ledger_service as svc

START = "2026-11-01T00:00:00Z"
OBJ = {"apiVersion": "spendwarden.io/v1alpha1", "kind": "TokenBudget",
       "metadata": {"name": "monthly", "namespace": "team-a", "uid": "u1", "generation": 1},
       "spec": {"period": {"type": "Monthly"}, "limits": {"tokens": {"total": 100_000}}}}


class FakeApi:
    """The apiserver as the service sees it: one object, merge-patched, slow writes."""

    def __init__(self, monkeypatch, delay: float = 0.15):
        self.obj = copy.deepcopy(OBJ)
        self.writes: list[dict] = []
        self.delay = delay
        self.lock = threading.Lock()
        monkeypatch.setattr(svc, "_get_budget", self.get)
        monkeypatch.setattr(svc, "_patch_status", self.patch)
        monkeypatch.setattr(svc, "_patch_conditions", lambda *a: True)
        monkeypatch.setattr(svc, "_post_event", lambda *a: None)

    def get(self, namespace, name):
        return copy.deepcopy(self.obj)

    def patch(self, namespace, name, status):
        time.sleep(self.delay)
        with self.lock:
            self.obj["status"] = _merge(self.obj.get("status") or {}, status)
            self.writes.append(copy.deepcopy(self.obj["status"]))


def _merge(old, patch):
    if not isinstance(patch, dict):
        return patch
    out = dict(old) if isinstance(old, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge(out.get(k), v)
    return out
