"""A stand-in for the operator's ledger: docs/ledger-protocol.md answered by the REAL pure core
(BudgetLedger from ledger/leases.py), in-process (LedgerStub.answer) or over HTTP from a thread
(LedgerServer, no auth), so the proxy's client is tested without Kubernetes."""
from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from aiohttp import web

from spendwarden.api.tokenbudget import TokenBudgetSpec
from spendwarden.devtools.background import BackgroundServer
from spendwarden.devtools.mock_upstream import free_port
from spendwarden.ledger.allowance import Amount, Limits
from spendwarden.ledger.leases import BudgetLedger, Ceiling, LeaseSettings
from spendwarden.ledger.periods import current_period


def _amount(d: dict[str, Any] | None) -> Amount | None:
    return None if d is None else _given(d)


def _given(d: dict[str, Any]) -> Amount:
    return Amount(int(d.get("inputTokens", 0)), int(d.get("outputTokens", 0)), Decimal(str(d.get("cost", "0"))))


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class LedgerStub:
    def __init__(self, budgets: dict[str, TokenBudgetSpec], settings: LeaseSettings | None = None,
                 clock: Any = time.time):
        self.specs = dict(budgets)
        self.settings = settings or LeaseSettings()
        self.clock = clock
        # One ledger per budget and period (periodStart -> ledger); `ledgers` is the current period's.
        self.periods: dict[str, dict[str, BudgetLedger]] = {name: {} for name in self.specs}
        self.cut_off: set[str] = set()
        self.bodies: list[dict[str, Any]] = []
        self.lock = threading.Lock()  # the HTTP server's thread and the test's thread both read it

    def _ledger(self, name: str, start: str) -> BudgetLedger:
        led = self.periods[name].get(start)
        if led is None:
            led = self.periods[name][start] = BudgetLedger(Limits.from_spec(self.specs[name].limits), self.settings)
        return led

    @property
    def ledgers(self) -> dict[str, BudgetLedger]:
        now = datetime.fromtimestamp(self.clock(), UTC)
        return {name: self._ledger(name, _iso(current_period(spec, now)[0])) for name, spec in self.specs.items()}

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.bodies.append(body)
            now = self.clock()
            out: dict[str, Any] = {}
            pid, seq = body["proxyId"], int(body["seq"])
            for name, e in body["budgets"].items():
                spec = self.specs.get(name)
                if spec is None:
                    out[name] = {"error": "unknown budget"}
                    continue
                start, end = current_period(spec, datetime.fromtimestamp(now, UTC))
                ledger = self._ledger(name, _iso(start))
                ledger.expire(now)
                release = Ceiling.from_state(e["releaseTo"]) if e.get("releaseTo") else None
                if e["periodStart"] == _iso(start):
                    lease = ledger.report(pid, seq, _given(e["used"]), _given(e["held"]), _amount(e.get("want")),
                                          now, release_to=release, need=_amount(e.get("need")),
                                          smallest_admitted=_amount(e.get("smallestAdmitted")))
                    ceiling, expires = lease.ceiling, lease.expires_at
                elif e["periodStart"] in self.periods[name]:
                    # Late numbers for a finished period count there; the lease is the current period's.
                    self.periods[name][e["periodStart"]].report(pid, seq, _given(e["used"]), _given(e["held"]),
                                                                Amount(), now)
                    acct = ledger.proxies.get(pid)
                    if acct is None:
                        lease = ledger.report(pid, seq, Amount(), Amount(), _amount(e.get("want")), now)
                        ceiling, expires = lease.ceiling, lease.expires_at
                    else:
                        ceiling, expires = acct.ceiling, acct.expires_at
                else:
                    out[name] = {"error": f"period {e['periodStart']} is not open"}
                    continue
                out[name] = {"ceiling": ceiling.to_state(), "expiresAt": expires,
                             "periodStart": _iso(start), "periodEnd": _iso(end),
                             "state": "Exceeded" if ledger.exhausted() else "Active",
                             "onExceeded": spec.onExceeded, "failMode": spec.failMode,
                             "cutOff": name in self.cut_off}
            return {"seq": body["seq"], "budgets": out}

    def used(self, name: str, period: str | None = None) -> Amount:
        with self.lock:
            return (self.periods[name][period] if period else self.ledgers[name]).used()

    def committed(self, name: str, dim: str) -> Any:
        with self.lock:
            return self.ledgers[name].committed(dim)


class LedgerServer:
    """LedgerStub over HTTP (POST /v1/report) from a background thread; stop() and start() again
    keep the ledger's state and the port (an operator that was unreachable for a while)."""

    def __init__(self, stub: LedgerStub):
        self.stub = stub
        self.port = free_port()
        self.status: int | None = None  # answer every report with this status instead (e.g. 401)
        self.auth: list[str | None] = []
        self._server = BackgroundServer("ledger-stub")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _report(self, request: web.Request) -> web.Response:
        self.auth.append(request.headers.get("Authorization"))
        if self.status is not None:
            return web.json_response({"error": "refused"}, status=self.status)
        body = await request.json()
        return web.json_response(self.stub.answer(body))

    def start(self) -> LedgerServer:
        async def make_app() -> web.Application:
            app = web.Application()
            app.router.add_post("/v1/report", self._report)
            return app

        self._server.start(make_app, self.port)
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> LedgerServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
