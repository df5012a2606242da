"""The proxy's side of the budget ledger (docs/ledger-protocol.md): reports and leases.

With `ledger.url` in the config, every budget's local Allowance is enforced against this process's
LEASE instead of the whole budget: limits = the ceiling the operator granted, used = this process's
cumulative usage in the period, reserved = its requests in flight. The request path stays
synchronous (budgets.py); this module only moves numbers between the allowances and the operator:

- one report (all budgets) about every second from a background task (every `reportInterval` the
  operator asks for: a budget in its last percent), and at once when a request does not fit its
  lease (`want` = the worst cases of the requests waiting, `need` = the smallest of them with its
  output clamped; the report also gives back this process's free escrow, which the request could
  not use, so fragments of a nearly spent budget are pooled where one request fits); a waiting
  request is admitted again as soon as that report is answered (server.py waits at most `wait` s);
- every report carries `smallestAdmitted`, the least reservation of the smallest request admitted
  in the last `admittedWindow` seconds (the answers say how many): the ledger finds a budget spent
  only when not even that fits what is left, so one huge request that cannot fit does not cut off a
  team whose ordinary requests still do;
- a report is resent unchanged (same seq) until it is answered: usage is cumulative, so a retry or a
  lost answer can never count twice;
- idle budgets give back what they do not use: the local ceiling is lowered FIRST, then reported
  (`releaseTo`), so the operator never re-grants headroom this process might still commit;
- `cutOff` is applied when it is read, and lifted the same way;
- a lease is spent until its expiresAt minus a clock margin; after that, with the ledger
  unreachable, failMode decides (budgets.py): Closed refuses with 503, Open enforces the whole
  budget on local accounting, and the cumulative numbers are reported when the ledger is back.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ..ledger.allowance import Amount, Limits, least
from ..ledger.leases import Ceiling
from ..ledger.loops import LoopQueue
from .backend_load import BackendLoads
from .budgets import BudgetBook, BudgetState, LeaseShort, _dims, zero_limits
from .ledger_http import TOKEN_FILE_ENV, HttpTransport, Transport, warn_once
from .metrics import Metrics

log = logging.getLogger("spendwarden.proxy.ledger")

def _amount(a: Amount) -> dict[str, Any]:
    return {"inputTokens": a.input_tokens, "outputTokens": a.output_tokens, "cost": str(a.cost)}


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _same_period(value: Any, st: BudgetState) -> bool:
    if value is None:
        return True
    try:
        start = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return False
    return start == st.period_start


def _lowered(ceiling: Limits, floor: Ceiling) -> Limits:
    """`ceiling` lowered to `floor` in every dimension both have."""
    return Limits(*(None if c is None else (min(c, f) if f is not None else c)
                    for c, f in zip(_dims(ceiling), _dims(floor.as_limits()))))


def _committed_ceiling(whole: Limits, a: Amount) -> Ceiling:
    return Ceiling(total=None if whole.total_tokens is None else a.total_tokens,
                   input=None if whole.input_tokens is None else a.input_tokens,
                   output=None if whole.output_tokens is None else a.output_tokens,
                   cost=None if whole.cost is None else a.cost)


class LedgerClient:
    def __init__(self, book: BudgetBook, url: str, namespace: str, metrics: Metrics | None = None,
                 transport: Transport | None = None, clock: Callable[[], float] = time.time,
                 interval: float = 1.0, wait: float = 2.0, margin: float = 2.0, idle_release: float = 5.0,
                 min_gap: float = 0.02):
        self.book = book
        self.url = url
        self.namespace = namespace
        self.metrics = metrics
        self.transport: Transport = transport or HttpTransport(url)
        self.clock = clock
        self.interval = interval      # regular reports
        self.wait = wait              # the longest a request waits for a bigger lease
        self.margin = margin          # clock margin subtracted from the operator's expiresAt
        self.idle_release = idle_release
        self.min_gap = min_gap        # between reports, so requests that do not fit cannot flood the ledger
        self.proxy_id = uuid.uuid4().hex  # a restarted process is a new proxy to the ledger
        self.seq = 0
        self.answered_seq = 0         # the last seq whose report was answered
        self.reports = 0
        self.failures = 0
        self.hinted_interval: float | None = None  # the operator's reportInterval, if it asks for one
        self._kick: asyncio.Event | None = None
        self._waiters: list[tuple[int, asyncio.Future]] = []
        self._task: asyncio.Task | None = None
        self.backends: BackendLoads | None = None  # scaled backends' load, for the operator's scaler
        self.loops = LoopQueue(pod=socket.gethostname())  # loop-breaker refusals for the next report
        book.ledger = True

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._kick = asyncio.Event()
            self._kick.set()  # the first report at once: requests wait for their first lease
            self._task = asyncio.create_task(self._run(), name="ledger-reports")

    async def close(self, final: bool = True, timeout: float = 2.0) -> None:
        """Stop reporting; with `final`, report once more (the last usage, and give everything back)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if final and self.book.states:
            # Cumulative numbers: a newer seq supersedes whatever was in flight.
            body = self.build(release_all=True)
            try:
                answered = await asyncio.wait_for(self._deliver(body, retry=False), timeout)
            except TimeoutError:
                answered = False
            if not answered:
                log.warning("ledger: the final report was not answered; the operator settles this proxy's "
                            "escrow when its lease runs out")
        close = getattr(self.transport, "close", None)
        if close is not None:
            await close()

    # -- the report loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._kick is not None
        while True:
            try:
                try:
                    await asyncio.wait_for(self._kick.wait(), min(self.interval, self.hinted_interval or self.interval))
                except TimeoutError:
                    pass
                self._kick.clear()
                body = self.build()
                await self._deliver(body, retry=True)
                await asyncio.sleep(self.min_gap)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the reporter die
                log.exception("ledger: report loop failed")
                await asyncio.sleep(self.interval)

    async def _deliver(self, body: dict[str, Any], retry: bool) -> bool:
        """Send `body` until it is answered (same seq on every retry)."""
        delay = 0.1
        while True:
            t0 = time.perf_counter()
            reason: str | None = None
            try:
                status, answer = await self.transport(body)
            except TimeoutError:
                reason = "timeout"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - aiohttp.ClientError, OSError, ...
                reason = "unreachable"
                warn_once("unreachable", f"ledger {self.url} unreachable: {type(exc).__name__}: {exc}")
            else:
                if status == 200 and answer is not None and isinstance(answer.get("budgets"), dict):
                    if self.metrics is not None:
                        self.metrics.ledger_report_seconds.observe(time.perf_counter() - t0)
                    self.apply(body, answer)
                    return True
                if status in (401, 403):
                    reason = "unauthorized" if status == 401 else "forbidden"
                    warn_once("auth", f"ledger {self.url} refused this proxy's token with HTTP {status} "
                                       f"({reason}); check the ServiceAccount token mounted at "
                                       f"${TOKEN_FILE_ENV} (audience spendwarden) and the namespace; "
                                       "treating the ledger as unreachable", level=logging.ERROR)
                elif status == 400 and body.pop("loops", None) is not None:
                    # An operator that refuses the optional loops field must not stop the budgets.
                    warn_once("loops", f"ledger {self.url} refused a report with loop detections (HTTP 400); "
                                        "sent again without them")
                    continue
                else:
                    reason = f"http_{status // 100}xx" if status != 200 else "bad_answer"
                    warn_once("status", f"ledger {self.url} answered HTTP {status} to a report")
            self.failures += 1
            if self.metrics is not None:
                self.metrics.ledger_report_failures.labels(reason).inc()
            self._unanswered()
            if not retry:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.interval)

    # -- building a report --------------------------------------------------------------------------

    def build(self, release_all: bool = False) -> dict[str, Any]:
        """The next report: cumulative usage, holds, wants and releases of every budget.

        Releases lower the local ceiling here, before the report leaves (never after)."""
        now = self.clock()
        self.seq += 1
        budgets: dict[str, Any] = {}
        for name, st in self.book.states.items():
            lease = st.lease
            if lease is None:
                continue
            a = st.allowance
            if lease.previous is not None:
                # The period ended since the last report: its final numbers first (the operator counts
                # them there and answers with the new period's lease); the new period's in the next one.
                start, used = lease.previous
                lease.previous = None
                entry: dict[str, Any] = {"periodStart": _iso(start), "used": _amount(used),
                                         "held": _amount(Amount())}
                if lease.previous_breakdown is not None and lease.previous_breakdown.rows:
                    entry["breakdown"] = lease.previous_breakdown.to_wire()
                lease.previous_breakdown = None
                if lease.want is not None:
                    entry["want"] = _amount(lease.want)
                    if lease.need is not None:
                        entry["need"] = _amount(lease.need)
                    lease.want = lease.need = None
                budgets[name] = entry
                if self._kick is not None:
                    self._kick.set()
                continue
            entry = {"periodStart": _iso(st.period_start), "used": _amount(a.used), "held": _amount(a.reserved)}
            smallest = lease.admitted.value(now)
            if smallest is not None:
                # Sent every time (the minimum over the recent window, not a delta): a retry changes
                # nothing and a restarted operator cannot miss it.
                entry["smallestAdmitted"] = _amount(smallest)
            if st.breakdown.rows:
                entry["breakdown"] = st.breakdown.to_wire()
            if lease.want is not None:
                entry["want"] = _amount(lease.want)
                if lease.need is not None:
                    entry["need"] = _amount(lease.need)
                lease.want = lease.need = None
                if lease.ceiling is not None and not lease.local:
                    # What is free here did not fit the request: pooled, it may fit one elsewhere (the
                    # operator grants it straight back if it can cover the request).
                    release = self._release(st)
                    if release is not None:
                        entry["releaseTo"] = release
            elif lease.ceiling is not None and not lease.local and (release_all or (
                    now - lease.last_admit >= self.idle_release and lease.released_at != lease.last_admit)):
                release = self._release(st)
                if release is not None:
                    entry["releaseTo"] = release
                hard_release = self._release_hard(st)
                if hard_release is not None:
                    entry["hardReleaseTo"] = hard_release
            budgets[name] = entry
        body = {"proxyId": self.proxy_id, "namespace": self.namespace, "seq": self.seq, "budgets": budgets}
        if self.backends is not None and self.backends.keys:
            body["backends"] = self.backends.report()
        loops = self.loops.take()
        if loops:
            body["loops"] = loops
        return body

    def _release(self, st: BudgetState) -> dict[str, Any] | None:
        lease = st.lease
        assert lease is not None and lease.ceiling is not None
        lease.released_at = lease.last_admit
        a = st.allowance
        new = _lowered(lease.ceiling, _committed_ceiling(lease.whole, a.used + a.reserved))
        if new == lease.ceiling:
            return None
        st.allowance.limits = lease.ceiling = new  # lowered locally first
        return Ceiling(*_dims(new)).to_state()

    @staticmethod
    def _release_hard(st: BudgetState) -> dict[str, Any] | None:
        """The same for a Downgrade budget's hard-ceiling lease."""
        if st.hard is None:
            return None
        a = st.allowance
        new = _lowered(st.hard, _committed_ceiling(st.hard, a.used + a.reserved))
        if new == st.hard:
            return None
        st.hard = new  # lowered locally first
        return Ceiling(*_dims(new)).to_state()

    # -- answers ------------------------------------------------------------------------------------

    def apply(self, body: dict[str, Any], answer: dict[str, Any]) -> None:
        self.reports += 1
        self.answered_seq = max(self.answered_seq, int(body["seq"]))
        if self.backends is not None:
            self.backends.apply(answer.get("backends"))
        hints = [e.get("reportInterval") for e in answer["budgets"].values() if isinstance(e, dict)]
        valid = [float(h) for h in hints if isinstance(h, (int, float)) and not isinstance(h, bool) and h > 0]
        hinted = max(min(valid), self.min_gap) if valid else None
        if hinted is not None and (self.hinted_interval is None or hinted < self.hinted_interval) \
                and self._kick is not None:
            self._kick.set()  # the loop may be sleeping out the longer interval: start the short one now
        self.hinted_interval = hinted
        for name, entry in answer["budgets"].items():
            st = self.book.states.get(name)
            if st is None or st.lease is None or not isinstance(entry, dict):
                continue
            lease = st.lease
            if "error" in entry:
                # The operator does not know this budget (yet): no lease, as if unreachable for it.
                warn_once(f"err:{name}", f"ledger: budget {name!r}: {entry['error']}")
                lease.down = True
                continue
            if not _same_period(entry.get("periodStart"), st):
                continue  # a lease for another period (a clock at a boundary): wait for ours
            try:
                ceiling = Ceiling.from_state(entry.get("ceiling") or {}).as_limits()
                expires = float(entry["expiresAt"])
                hard = Ceiling.from_state(entry["hardCeiling"]).as_limits() if entry.get("hardCeiling") else None
            except (KeyError, TypeError, ValueError, ArithmeticError):
                warn_once(f"bad:{name}", f"ledger: malformed lease for budget {name!r}: {entry!r}"[:300])
                lease.down = True
                continue
            if lease.local:
                log.info("budget %s: the ledger answers again; back on leases", name)
            lease.ceiling = ceiling
            lease.local = False
            st.allowance.limits = ceiling
            if st.hard is not None:
                # Nothing past the limit that this answer does not grant (also back from local mode).
                st.hard = hard if hard is not None else zero_limits(st.hard)
            lease.valid_until = expires - self.margin
            cut = bool(entry.get("cutOff"))
            if cut != lease.cut_off:
                log.info("budget %s: cut off by the operator" if cut else "budget %s: cut-off lifted", name)
            lease.cut_off = cut
            lease.exceeded = entry.get("state") == "Exceeded"
            window = entry.get("admittedWindow")
            if isinstance(window, (int, float)) and not isinstance(window, bool) and 0 < window <= 86_400:
                lease.admitted.window = float(window)
            lease.down = False
        self._wake(self.answered_seq)

    def _unanswered(self) -> None:
        for st in self.book.states.values():
            if st.lease is not None:
                st.lease.down = True
        # Waiting requests decide now (spend what is left of the lease, or failMode) instead of
        # sitting out their whole wait on a ledger that does not answer.
        self._wake(None)

    def _wake(self, seq: int | None) -> None:
        keep = []
        for need, fut in self._waiters:
            if seq is None or seq >= need:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((need, fut))
        self._waiters = keep

    # -- requests that do not fit -------------------------------------------------------------------

    async def wait_for_lease(self, short: LeaseShort) -> None:
        """Ask for `short.amount` on top of the current commitments and wait (at most `wait`) for the
        answer to the report that carries the request."""
        for st in short.states:
            lease = st.lease
            if lease is not None:
                lease.want = short.amount if lease.want is None else lease.want + short.amount
                lease.need = least(lease.need, short.need)
        # The next report built carries the want; the one in flight (if any) does not.
        need = self.seq + 1
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((need, fut))
        if self._kick is not None:
            self._kick.set()
        try:
            await asyncio.wait_for(fut, self.wait)
            result = "answered"
        except TimeoutError:
            result = "timeout"
        if self.metrics is not None:
            self.metrics.ledger_waits.labels(result).inc()

    # -- metrics ------------------------------------------------------------------------------------

    def gauges(self, namespace: str) -> None:
        m = self.metrics
        if m is None:
            return
        now = self.clock()
        for name, st in self.book.states.items():
            lease = st.lease
            if lease is None:
                continue
            if lease.ceiling is not None:
                for dim, value in zip(("total", "input", "output", "cost"), _dims(lease.ceiling)):
                    if value is not None:
                        m.ledger_lease_ceiling.labels(namespace, name, dim).set(float(value))
            m.ledger_lease_expiry.labels(namespace, name).set(lease.valid_until + self.margin)
            m.ledger_fail_mode.labels(namespace, name).set(1 if now >= lease.valid_until and lease.down else 0)
