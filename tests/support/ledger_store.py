"""The ledger store's test vocabulary: a fixed clock, a budget CR, report bodies and a send helper."""
from __future__ import annotations

from datetime import UTC, datetime

from spendwarden.ledger.store import (
    parse_report,
)

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


TS = NOW.timestamp()


START, END = "2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z"


SPEC = {"period": {"type": "Monthly"}, "limits": {"tokens": {"total": 100_000}}, "thresholds": [50, 80]}


def budget(spec=SPEC, **status):
    return {"apiVersion": "spendwarden.io/v1alpha1", "kind": "TokenBudget",
            "metadata": {"name": "monthly", "namespace": "team-a", "uid": "u1", "generation": 1},
            "spec": spec, **({"status": status} if status else {})}


def body(seq, used=(0, 0), held=(0, 0), want=None, start=START, proxy="p1", **extra):
    entry = {"periodStart": start, "used": {"inputTokens": used[0], "outputTokens": used[1], "cost": "0"},
             "held": {"inputTokens": held[0], "outputTokens": held[1], "cost": "0"}, **extra}
    if want is not None:
        entry["want"] = {"inputTokens": want[0], "outputTokens": want[1], "cost": "0"}
    return {"proxyId": proxy, "namespace": "team-a", "seq": seq, "budgets": {"monthly": entry}}


def send(store, entry, b, ts=TS, now=NOW):
    rep = parse_report(b)
    return store.report(entry, rep.proxy_id, rep.seq, rep.budgets["monthly"], ts, now)
