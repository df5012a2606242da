"""Loop detections through the ledger (ledger/loops.py): the proxy's bounded queue, the operator's
parsing and per-route Event aggregation, and the service posting LoopDetected on the covering budgets
(apiserver faked; the real one: tests/integration/test_loop_events.py)."""
from __future__ import annotations

import copy
import math

import pytest

from spendwarden.controller import ledger_service as svc
from spendwarden.ledger.loops import MAX_PER_REPORT, LoopAggregator, LoopQueue, LoopReport, parse_loops
from spendwarden.ledger.store import ReportError, parse_report

KEY = "ab12cd34ef56" + "0" * 52  # a request hash (spend.cache.request_key)


def loop(route="chat", refused=1, request="ab12cd34ef56", pod="pod-1", **kw) -> dict:
    return {"route": route, "model": route, "request": request, "refused": refused, "maxRepeats": 3,
            "windowSeconds": 60, **({"pod": pod} if pod else {}), **kw}


def test_queue_counts_refusals_per_route_and_hash_prefix_and_hands_out_bounded_batches():
    q = LoopQueue(pod="pod-1", max_queued=20)
    for _ in range(5):
        q.add("chat", "chat-model", KEY, 3, 60.0)
    q.add("chat", "chat-model", "ff" * 32, 3, 60.0)
    q.add("code", "code-model", KEY, 2, 30.0)
    assert q.take() == [
        {"route": "chat", "model": "chat-model", "request": "ab12cd34ef56", "refused": 5, "maxRepeats": 3,
         "windowSeconds": 60.0, "pod": "pod-1"},
        {"route": "chat", "model": "chat-model", "request": "ffffffffffff", "refused": 1, "maxRepeats": 3,
         "windowSeconds": 60.0, "pod": "pod-1"},
        {"route": "code", "model": "code-model", "request": "ab12cd34ef56", "refused": 1, "maxRepeats": 2,
         "windowSeconds": 30.0, "pod": "pod-1"}]
    assert q.take() == [] and len(q) == 0
    for i in range(25):  # more distinct loops than it keeps: the rest are dropped, not grown
        q.add("chat", "chat", f"{i:012x}" + "0" * 52, 3, 60.0)
    assert len(q) == 20 and q.dropped == 5
    first = q.take()
    assert len(first) == MAX_PER_REPORT and len(q.take()) == 20 - MAX_PER_REPORT
    assert parse_loops(first)  # what a proxy sends, the operator accepts


def test_parse_accepts_the_optional_field_and_names_the_bad_one():
    assert parse_loops(None) == []
    got = parse_loops([loop(extra="ignored")])
    assert got == [LoopReport("chat", "chat", "ab12cd34ef56", 1, 3, 60.0, "pod-1")]
    assert parse_loops([loop(pod=None)])[0].pod is None
    for bad, where in ((
            {"x": 1}, "loops: must be a list"),
            ([loop()] * (MAX_PER_REPORT + 1), "at most 16"),
            (["x"], "loops[0]: must be an object"),
            ([loop(request="What is the capital of France?")], "loops[0].request"),
            ([loop(request="AB12")], "loops[0].request"),
            ([loop(refused=0)], "loops[0].refused"),
            ([loop(refused=True)], "loops[0].refused"),
            ([loop(windowSeconds=math.nan)], "loops[0].windowSeconds"),
            ([loop(windowSeconds="60")], "loops[0].windowSeconds"),
            ([loop(route="")], "loops[0].route"),
            ([loop(), loop(model=None)], "loops[1].model")):
        with pytest.raises(ValueError, match=__import__("re").escape(where)):
            parse_loops(bad)


def test_parse_report_carries_loops_and_a_bad_one_is_a_report_error():
    base = {"proxyId": "p1", "namespace": "team-a", "seq": 1, "budgets": {}}
    assert parse_report(base).loops == []
    assert parse_report({**base, "loops": [loop(refused=4)]}).loops[0].refused == 4
    with pytest.raises(ReportError, match=r"loops\[0\]\.refused"):
        parse_report({**base, "loops": [loop(refused=-1)]})


def test_aggregator_posts_at_once_then_at_most_one_event_per_route_and_interval_with_the_sum():
    agg = LoopAggregator(interval=60.0)
    agg.add("ns", parse_loops([loop(refused=2)])[0])
    first = agg.due(1000.0)
    assert [(n.namespace, n.route, n.model, n.refused) for n in first] == [("ns", "chat", "chat", 2)]
    assert "2 request(s) refused with 429 loop_detected from pod(s) pod-1" in first[0].message
    assert "hash ab12cd34ef56" in first[0].message and "more than 3 times within 60s" in first[0].message
    # A runaway loop: many reports within the minute, one Event when it is over, with the total.
    for i in range(50):
        agg.add("ns", parse_loops([loop(refused=3, pod=f"pod-{i % 5}", request=f"{i % 4:012x}")])[0])
        assert agg.due(1000.0 + i) == []
    [later] = agg.due(1060.0)
    assert later.refused == 150
    assert later.message.count("pod-") == 3 and "000000000000, 000000000001, 000000000002)" in later.message
    # Another route or namespace has its own interval.
    agg.add("ns", parse_loops([loop(route="code")])[0])
    agg.add("other", parse_loops([loop()])[0])
    assert sorted((n.namespace, n.route) for n in agg.due(1061.0)) == [("ns", "code"), ("other", "chat")]
    # Quiet for a whole interval: forgotten, and the next loop is announced at once.
    assert agg.due(1200.0) == [] and not agg._routes
    agg.add("ns", parse_loops([loop()])[0])
    assert len(agg.due(1201.0)) == 1


def test_aggregator_takes_a_resent_report_once_and_caps_route_labels():
    agg = LoopAggregator()
    assert agg.accept("ns", "p1", 5) and not agg.accept("ns", "p1", 5) and not agg.accept("ns", "p1", 4)
    assert agg.accept("ns", "p1", 6) and agg.accept("ns", "p2", 1)
    labels = {agg.route_label("ns", f"r{i}") for i in range(100)}
    assert len(labels) == 65 and "(other)" in labels and agg.route_label("ns", "r0") == "r0"
    assert agg.route_label("ns2", "r99") == "r99"


# -- the service ------------------------------------------------------------------------------------

def _budget(name: str, routes: list[str]) -> dict:
    return {"apiVersion": "spendwarden.io/v1alpha1", "kind": "TokenBudget",
            "metadata": {"name": name, "namespace": "team-a", "uid": f"u-{name}", "generation": 1},
            "spec": {"window": "24h", "limits": {"tokens": {"total": 100_000}}, "routes": routes}}


async def test_service_posts_loop_detected_on_the_budgets_covering_the_route_once_per_report(monkeypatch):
    objs = {"all": _budget("all", []), "chat": _budget("chat", ["chat"]), "code": _budget("code", ["code"])}
    events: list[tuple[str, str, str]] = []
    monkeypatch.setattr(svc, "_get_budget", lambda ns, name: copy.deepcopy(objs.get(name)))
    monkeypatch.setattr(svc, "_patch_status", lambda *a: None)
    monkeypatch.setattr(svc, "_patch_conditions", lambda *a: True)
    monkeypatch.setattr(svc, "_post_event", lambda entry, reason, message: events.append((entry.name, reason, message)))
    service = svc.LedgerService(svc.LedgerConfig(port=0))
    start = "2000-01-01T00:00:00Z"  # not the open period: the budgets answer an error, loops still count
    body = {"proxyId": "p1", "namespace": "team-a", "seq": 1, "loops": [loop(refused=4)],
            "budgets": {n: {"periodStart": start, "used": {}} for n in objs}}
    before = svc.LOOPS.labels(namespace="team-a", route="chat")._value.get()
    for _ in range(2):  # the same report resent (its answer was lost): counted once
        await service.apply(parse_report(body))
    for task in list(service._events):
        await task
    assert sorted((n, r) for n, r, _ in events) == [("all", "LoopDetected"), ("chat", "LoopDetected")]
    assert "4 request(s) refused" in events[0][2]
    assert svc.LOOPS.labels(namespace="team-a", route="chat")._value.get() - before == 4


async def test_one_namespace_can_neither_fill_the_route_cap_nor_reuse_a_proxy_id_to_silence_another(monkeypatch):
    """Loop state was keyed globally: a namespace sending many routes filled the one cap and other
    namespaces' loops went unannounced; one reporting another's proxyId (visible in its budget's
    status) with a larger seq made that proxy's later loops look like resends."""
    events: list[tuple[str, str]] = []
    objs = {("team-a", "all"): _budget("all", [])}
    monkeypatch.setattr(svc, "_get_budget", lambda ns, name: copy.deepcopy(objs.get((ns, name))))
    monkeypatch.setattr(svc, "_patch_status", lambda *a: None)
    monkeypatch.setattr(svc, "_patch_conditions", lambda *a: True)
    monkeypatch.setattr(svc, "_post_event", lambda entry, reason, message: events.append((entry.namespace, message)))
    service = svc.LedgerService(svc.LedgerConfig(port=0))
    service.loops = LoopAggregator(max_routes=32)

    def body(ns, proxy, seq, routes):
        return parse_report({"proxyId": proxy, "namespace": ns, "seq": seq, "budgets": {"all": {
            "periodStart": "2000-01-01T00:00:00Z", "used": {}}}, "loops": [loop(route=r) for r in routes]})

    for seq in range(1, 11):  # 160 routes from one namespace: it alone hits the cap
        await service.apply(body("evil", "x", seq, [f"r{seq}-{i}" for i in range(MAX_PER_REPORT)]))
    assert sum(1 for ns, _ in service.loops._routes if ns == "evil") == 32
    await service.apply(body("team-a", "p1", 1, ["chat"]))
    await service.apply(body("evil", "p1", 10**9, ["chat"]))  # team-a's proxy id, a huge seq
    for _ in range(2):
        service.loops._routes[("team-a", "chat")].last_event = -math.inf  # the interval has passed
        await service.apply(body("team-a", "p1", 2, ["chat"]))
    for task in list(service._events):
        await task
    assert [ns for ns, _ in events] == ["team-a", "team-a"]  # the first report and seq 2, once
