"""Hypothesis-generated bad reports against the real ledger: LedgerService on its own HTTP server
(ledger_http) on 127.0.0.1, in a thread of its own, with only the apiserver faked (as the unit tests
do) and TokenReviews answered by a stub. Each answer must be a 400/401/403/413 with an error that says
what is wrong (or a 200 where the report is odd but acceptable), never a 5xx; the server stays up,
the ledger's invariant holds, and what it would write into the budget's status stays bounded."""
from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendwarden.controller import ledger_service as svc
from spendwarden.ledger.leases import _dim
from tests.support.ledger_fake import FakeApi

from . import kinds
from .support import FUZZ, LoopThread, is_json, json_value, judge

GOOD = "Bearer good-token"  # reviewed as team-a's proxy
INT64 = 2**63 - 1


class Ledger:
    """The service's event loop in a thread, so that sync hypothesis tests can call it over HTTP."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.api = FakeApi(monkeypatch, delay=0)
        self.api.obj["spec"]["limits"] = {"tokens": {"total": 100_000}, "cost": {"amount": "5"}}
        self.service = svc.LedgerService(svc.LedgerConfig(port=0, addr="127.0.0.1"))
        monkeypatch.setattr(self.service.reviewer, "_review_sync",
                            lambda token: ("team-a", "proxy") if token == "good-token" else None)

        async def no_cutoff() -> None:
            return None

        monkeypatch.setattr(self.service.cutoff, "start", no_cutoff)
        self.thread = LoopThread("ledger")
        self.call = self.thread.call

    def start(self) -> Ledger:
        self.call(self.service.start())
        self.url = f"http://127.0.0.1:{self.service.port}"
        return self

    def stop(self) -> None:
        self.call(self.service.stop())
        self.thread.close()

    def post(self, body: bytes, auth: str | None = GOOD, path: str = "/v1/report") -> httpx.Response:
        headers = {"Content-Type": "application/json", **({"Authorization": auth} if auth is not None else {})}
        return httpx.post(self.url + path, content=body, headers=headers, timeout=30)

    def broken_invariants(self) -> list[str]:
        async def check() -> list[str]:  # on the service's loop: no report is half applied meanwhile
            out = []
            for (ns, name), entry in self.service.store.entries.items():
                for ledger in (entry.current.ledger, entry.current.hard):
                    if ledger is None:
                        continue
                    # Past the limit only by what proxies report used (providers over-billing, or
                    # the report that says so): never by headroom granted.
                    used = ledger.used()
                    out += [f"{ns}/{name}: {d}" for d in ledger.check_invariant()
                            if ledger.committed(d) > _dim(used, d)]
            return out
        return self.call(check())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def ledger() -> Iterator[Ledger]:
    with pytest.MonkeyPatch.context() as mp:
        led = Ledger(mp).start()
        yield led
        led.stop()


def period_start() -> str:
    from tests.unit.test_ledger_service import current_start
    return current_start()


_seq = iter(range(10**12, 2 * 10**12))  # fresh, and of one length: the strategies stay deterministic


def valid_report(**changes: Any) -> dict[str, Any]:
    """A report a proxy would send (each with a fresh seq, so that none is stale)."""
    body: dict[str, Any] = {"proxyId": "fuzz-proxy", "namespace": "team-a", "seq": next(_seq), "budgets": {
        "monthly": {"periodStart": period_start(), "used": {"inputTokens": 0, "outputTokens": 0, "cost": "0"},
                    "want": {"inputTokens": 0, "outputTokens": 10, "cost": "0.0001"}}}}
    body.update(changes)
    return body



# Where a value is put (a path into the report) -> what it must be. The ledger checks each of these.
B = ("budgets", "monthly")
TOKEN_FIELDS = [B + (part, f) for part in ("used", "want", "held", "need") for f in ("inputTokens", "outputTokens")]
MONEY_FIELDS = [B + (part, "cost") for part in ("used", "want", "held", "need")]
OBJECT_FIELDS = [("budgets",), B, B + ("used",), B + ("want",), B + ("releaseTo",), B + ("smallestAdmitted",)]
NAME_FIELDS = [("proxyId",), ("namespace",)]


def _put(body: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    body = copy.deepcopy(body)
    d = body
    for p in path[:-1]:
        d = d.setdefault(p, {})
    d[path[-1]] = value
    return body


def _where(path: tuple[str, ...]) -> str:
    return ".".join(path)


@st.composite
def bad_value(draw: st.DrawFn) -> tuple[str, dict[str, Any], str]:
    """(kind, report, the field the error must name) with one value wrong."""
    how = draw(st.sampled_from(["negative-tokens", "huge-tokens", "fractional-tokens", "bool-tokens", "string-tokens",
                                "huge-money", "negative-money", "not-money", "wrong-type-object",
                                "bad-name", "bad-seq"]))
    if how.endswith("-tokens"):
        path = draw(st.sampled_from(TOKEN_FIELDS))
        value = {"negative-tokens": st.integers(-2**63, -1), "huge-tokens": st.integers(INT64 + 1, 2**64 - 1),
                 "fractional-tokens": st.floats(0.5, 1e18), "bool-tokens": st.booleans(),
                 "string-tokens": st.text(max_size=8)}[how]
        return f"{how}:{path[-2]}", _put(valid_report(), path, draw(value)), _where(path)
    if how.endswith("money"):
        path = draw(st.sampled_from(MONEY_FIELDS))
        value = {"huge-money": st.sampled_from(["1e999999", "1e9999999", "9" * 5000, "1E+400", "123456789012345678901234"])
                 | st.integers(30, 10**7).map(lambda e: f"1e{e}"),
                 "negative-money": st.sampled_from(["-1", "-0.0001", "-1e-9", "-1e400"]),
                 "not-money": st.sampled_from(["NaN", "Infinity", "-inf", "sNaN", "1,5", "0x10", "1e-99999999", " 1",
                                               "", "1_000"]) | st.text(max_size=8).filter(_not_decimal)}[how]
        return f"{how}:{path[-2]}", _put(valid_report(), path, draw(value)), _where(path)
    if how == "wrong-type-object":
        path = draw(st.sampled_from(OBJECT_FIELDS))
        value = draw(json_value.filter(lambda v: not isinstance(v, dict) and v is not None))
        return f"{how}:{_where(path)}", _put(valid_report(), path, value), _where(path)
    if how == "bad-name":
        path = draw(st.sampled_from(NAME_FIELDS))
        value = draw(st.sampled_from(["", "x" * 129, "p" * 5000]) | json_value.filter(lambda v: not isinstance(v, str)))
        return f"{how}:{path[0]}", _put(valid_report(), path, value), path[0]
    value = draw(st.integers(-2**63, -1) | st.just(True) | st.floats(0.5, 10) | st.text(max_size=5) | st.none())
    return "bad-seq", valid_report(seq=value), "seq"


def _not_decimal(t: str) -> bool:
    from decimal import Decimal, InvalidOperation
    try:
        Decimal(t)
    except (InvalidOperation, ValueError):
        return True
    return False


@FUZZ
@given(case=bad_value())
def test_one_wrong_value_gets_a_400_naming_the_field(ledger, case):
    kind, body, where = case
    r = ledger.post(json.dumps(body).encode())
    outcome = judge("ledger", kind, "ledger", r.status_code, r.content, must_refuse=True, upstream_involved=False)
    assert outcome == kinds.CLEAR and r.status_code == 400, (kind, r.status_code, r.text[:300])
    assert where.split(".")[0] in r.json()["error"], (kind, where, r.text[:300])
    assert ledger.broken_invariants() == []


@st.composite
def bad_whole(draw: st.DrawFn) -> tuple[str, bytes, str | None, int]:
    """(kind, body, Authorization, the status wanted): reports wrong as a whole, too big, not ours."""
    how = draw(st.sampled_from(["not-json", "invalid-utf8", "truncated", "json-not-object", "empty", "deep-nesting",
                                "too-many-budgets", "too-many-loops", "loops-wrong-shape", "unknown-amount-field",
                                "unknown-ceiling-field", "no-token", "token-not-bearer", "token-unknown",
                                "other-namespace", "body-over-1MiB", "missing-used", "missing-periodStart",
                                "random-object"]))
    ok = json.dumps(valid_report()).encode()
    if how == "not-json":
        return how, draw(st.binary(min_size=1, max_size=40).filter(lambda b: not is_json(b))), GOOD, 400
    if how == "invalid-utf8":
        return how, ok.replace(b'"fuzz-proxy"', b'"fuzz-\xff\xfeproxy"'), GOOD, 400
    if how == "truncated":
        return how, ok[:draw(st.integers(1, len(ok) - 1))], GOOD, 400
    if how == "json-not-object":
        return how, json.dumps(draw(json_value.filter(lambda v: not isinstance(v, dict)))).encode(), GOOD, 400
    if how == "empty":
        return how, b"", GOOD, 400
    if how == "deep-nesting":
        depth = draw(st.sampled_from([600, 5000, 200_000]))
        return how, b'{"budgets": ' + b"[" * depth + b"]" * depth + b"}", GOOD, 400
    if how == "too-many-budgets":
        n = draw(st.integers(65, 3000))
        entry = valid_report()["budgets"]["monthly"]
        return how, json.dumps(valid_report(budgets={f"b{i}": entry for i in range(n)})).encode(), GOOD, 400
    if how == "too-many-loops":
        n = draw(st.integers(1001, 5000))
        loop = {"route": "chat", "model": "m", "request": "ab", "refused": 1, "maxRepeats": 3, "windowSeconds": 60}
        return how, json.dumps(valid_report(loops=[loop] * n)).encode(), GOOD, 400
    if how == "loops-wrong-shape":
        loop = draw(st.fixed_dictionaries({"route": json_value, "request": st.sampled_from(["XYZ", "g" * 65, 5, None]),
                                           "windowSeconds": st.sampled_from([0, -1, "60", True, None])}))
        return how, json.dumps(valid_report(loops=[loop])).encode(), GOOD, 400
    if how == "unknown-amount-field":
        return how, json.dumps(_put(valid_report(), B + ("used", draw(st.text(min_size=1, max_size=8).filter(
            lambda k: k not in ("inputTokens", "outputTokens", "totalTokens", "cost")))), 1)).encode(), GOOD, 400
    if how == "unknown-ceiling-field":
        return how, json.dumps(_put(valid_report(), B + ("releaseTo",), {"bogus": 1})).encode(), GOOD, 400
    if how == "no-token":
        return how, ok, None, 401
    if how == "token-not-bearer":
        return how, ok, draw(st.sampled_from(["Basic Zm9v", "Bearer", "Bearer a b", "bearer", "Token x"])), 401
    if how == "token-unknown":
        return how, ok, "Bearer " + draw(st.text("abcdefXYZ0123456789-_.", min_size=1, max_size=40)), 401
    if how == "other-namespace":
        return how, json.dumps(valid_report(namespace="team-b")).encode(), GOOD, 403
    if how == "body-over-1MiB":
        return how, json.dumps(valid_report(pad="x" * (1 << 20))).encode(), GOOD, 413
    if how == "missing-used":
        body = valid_report()
        del body["budgets"]["monthly"]["used"]
        return how, json.dumps(body).encode(), GOOD, 400
    if how == "missing-periodStart":
        body = valid_report()
        del body["budgets"]["monthly"]["periodStart"]
        return how, json.dumps(body).encode(), GOOD, 400
    return how, json.dumps(draw(st.dictionaries(st.text(max_size=8), json_value, max_size=5))).encode(), GOOD, 400



@FUZZ
@given(case=bad_whole())
def test_a_report_wrong_as_a_whole_gets_a_clear_4xx(ledger, case):
    kind, body, auth, want = case
    r = ledger.post(body, auth)
    outcome = judge("ledger", kind, "ledger", r.status_code, r.content, must_refuse=True, upstream_involved=False)
    assert outcome == kinds.CLEAR and r.status_code == want, (kind, r.status_code, want, r.text[:300])
    assert ledger.broken_invariants() == []


ODD_BUT_FINE = {  # kind -> a report that is odd but a proxy may send it: answered 200, nothing breaks
    "unknown-budget": lambda: valid_report(budgets={"no-such-budget": valid_report()["budgets"]["monthly"]}),
    "stale-period": lambda: _put(valid_report(), B + ("periodStart",), "2001-01-01T00:00:00Z"),
    "period-not-a-time": lambda: _put(valid_report(), B + ("periodStart",), "yesterday"),
    "money-as-a-json-number": lambda: _put(valid_report(), B + ("used", "cost"), 0.25),
    "unknown-top-level-field": lambda: valid_report(extra={"x": [1, 2]}),
    "backends-wrong-shape": lambda: valid_report(backends="not-a-list"),
    "want-everything": lambda: _put(valid_report(), B + ("want",), {"inputTokens": INT64, "outputTokens": INT64,
                                                                     "cost": "1e30"}),
    "proxy-id-odd-characters": lambda: valid_report(proxyId="../../etc/passwd\u0000\u202e"),
    "many-proxy-ids": None,  # below: 300 ids, one report each
}


def test_odd_reports_are_answered_and_leave_the_ledger_sound(ledger):
    for kind, make in ODD_BUT_FINE.items():
        if make is None:
            continue
        r = ledger.post(json.dumps(make()).encode())
        outcome = judge("ledger", kind, "ledger", r.status_code, r.content, must_refuse=False, upstream_involved=False)
        assert outcome != kinds.CRASH and r.status_code in (200, 400), (kind, r.status_code, r.text[:300])
        assert ledger.broken_invariants() == [], kind
    # a stale seq (lower than the last one of the same proxy): answered, and it changes nothing
    first = valid_report(proxyId="seq-proxy")
    assert ledger.post(json.dumps(first).encode()).status_code == 200
    r = ledger.post(json.dumps({**first, "seq": first["seq"] - 1}).encode())
    judge("ledger", "stale-seq", "ledger", r.status_code, r.content, must_refuse=False, upstream_involved=False)
    assert r.status_code in (200, 400, 409), r.text
    began = time.monotonic()
    for i in range(300):
        r = ledger.post(json.dumps(valid_report(proxyId=f"short-lived-{i}")).encode())
        assert r.status_code == 200, r.text
    judge("ledger", "many-proxy-ids", "ledger", 200, b"{}", must_refuse=False, upstream_involved=False)
    assert time.monotonic() - began < 60
    assert ledger.broken_invariants() == []


def test_zz_after_all_the_abuse_the_ledger_is_up_and_its_status_is_bounded(ledger):
    """Runs last in the module: healthz answers, a good report gets a grant, and every status write
    was of a bounded size, with every integer an int64 (what the apiserver stores)."""
    assert httpx.get(ledger.url + "/healthz", timeout=10).status_code == 200
    r = ledger.post(json.dumps(valid_report(proxyId="after")).encode())
    assert r.status_code == 200 and "total" in r.json()["budgets"]["monthly"]["ceiling"], r.text
    # Last, as it spends the budget: a proxy reporting more used than the limit (a provider that
    # over-bills) is believed, and no headroom is granted past the limit afterwards.
    over = _put(valid_report(proxyId="over"), B + ("used",), {"inputTokens": 10**7, "outputTokens": 0, "cost": "100"})
    r = ledger.post(json.dumps(over).encode())
    judge("ledger", "used-past-the-limit", "ledger", r.status_code, r.content, must_refuse=False,
          upstream_involved=False)
    assert r.status_code == 200 and r.json()["budgets"]["monthly"]["state"] == "Exceeded", r.text
    r = ledger.post(json.dumps(valid_report(proxyId="late")).encode())
    assert r.status_code == 200 and r.json()["budgets"]["monthly"]["ceiling"]["total"] == 0, r.text
    ledger.call(ledger.service._flush_once(ledger.service.store.get("team-a", "monthly")))
    writes = ledger.api.writes
    assert writes, "nothing was persisted"
    assert max(len(json.dumps(w)) for w in writes) < 256 * 1024
    assert all(_ints_fit(w) for w in writes), [w for w in writes if not _ints_fit(w)][:1]


def _ints_fit(doc: Any) -> bool:
    if isinstance(doc, bool):
        return True
    if isinstance(doc, int):
        return -INT64 - 1 <= doc <= INT64
    if isinstance(doc, dict):
        return all(_ints_fit(v) for v in doc.values())
    if isinstance(doc, list):
        return all(_ints_fit(v) for v in doc)
    return True
