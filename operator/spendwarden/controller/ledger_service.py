"""The ledger service: `POST /v1/report` (docs/ledger-protocol.md) and `GET /healthz`, served by the
operator (started by controller/runtime.py), plus the operator's Prometheus metrics endpoint.

Thin: hand-parsed bodies (ledger/store.parse_report), a TokenReview per ServiceAccount token (cached
both ways, on a bounded pool of its own: controller/tokens.py TokenReviewer),
then the pure store (ledger/store.py, over the lease core ledger/leases.py). What this module adds
is I/O: loading a budget's persisted ledger from the apiserver before its first report is applied,
writing it back (status.ledger + the usage fields) at most every FLUSH_INTERVAL per dirty budget
(longer when more budgets are dirty than MAX_WRITES_PER_SECOND allows at that interval) and at shutdown, and the group commit: an answer that raises a ceiling waits until the state containing
that ceiling is persisted, so a restarted operator never grants the same headroom twice.

The store is touched only from the event loop; apiserver calls run in threads.

Budget names come from the proxies, so a name not loaded yet costs a GET: at most
MAX_LOOKUPS_PER_REPORT of them per report (the others are answered "not loaded yet" and looked up by
later reports), MAX_CONCURRENT_LOADS at a time in all, and a name found missing is remembered for
UNKNOWN_TTL seconds in a map of at most MAX_UNKNOWN names (a budget's watch event forgets it at
once). Nothing else is kept per name that does not exist.

Longer than 500 lines: the report path, the loads and the flushes (with the group commit)
share the store, the flush states and the event loop's atomicity (no await between applying a
report and requesting its flush); split apart they would reach into each other's internals. The
token check (controller/tokens.py) and the HTTP server (controller/ledger_http.py) stand alone.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Protocol, cast

import orjson
from aiohttp import web
from prometheus_client import Counter, Gauge

from .. import GROUP, VERSION
from ..api import tokenbudget
from ..expiring import ExpiringMap
from ..ledger.leases import LeaseSettings
from ..ledger.loops import LoopAggregator
from ..ledger.store import FORECAST_CONDITION, BudgetEntry, LedgerStore, ReportError, parse_report, replace_patch
from ..render.gateway import GatewaySettings, ledger_refusal
from ..render.status import LEDGER_FIELDS
from . import kube
from .alerts import WebhookSender
from .alerts import WebhookSettings as AlertSettings
from .bodies import plain
from .cutoff import CutOffController, ReplicaOwnerFn
from .ledger_config import LedgerConfig
from .ledger_http import PUBLIC, REVIEW, TRUSTED, Admission, Headers, LedgerHttpServer, Reply, Trusted, aiohttp_handler
from .settings import CutOffConfig
from .tokens import (  # noqa: F401
    AUDIENCE,
    INVALID_TOKEN,
    MAX_PENDING_REVIEWS,
    MISSING_TOKEN,
    NEGATIVE_REVIEW_TTL,
    REVIEW_WORKERS,
    SA_PREFIX,
    ReviewBusy,
    TokenReviewer,
    bearer_token,
)

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20  # a report names at most MAX_BUDGETS_PER_REPORT budgets: far below this
MAX_LOOKUPS_PER_REPORT = 16   # names of a report not loaded yet that are looked up in the apiserver
MAX_CONCURRENT_LOADS = 4      # budget GETs at a time: flushes keep threads of their own
UNKNOWN_TTL = 10.0            # a missing budget's watch event clears it sooner
MAX_UNKNOWN = 4096
NOT_LOADED = MappingProxyType({"error": "budget not loaded yet (too many new names in one report); the next report loads it"})
AUTHENTICATED = frozenset(("/v1/report", "/v1/wake"))


REPORTS = Counter("spendwarden_ledger_reports_total", "Usage reports accepted from proxies.")
REJECTED = Counter("spendwarden_ledger_rejected_total", "Ledger requests refused, by reason.", ["reason"])
FLUSHES = Counter("spendwarden_ledger_flushes_total", "Ledger state writes to TokenBudget status, by outcome.", ["outcome"])
PERCENT = Gauge("spendwarden_budget_percent_used", "Percent of the tightest limit used.", ["namespace", "budget"])
STATE = Gauge("spendwarden_budget_state", "1 for the budget's current state.", ["namespace", "budget", "state"])
FORECAST = Gauge("spendwarden_budget_forecast_exceeded", "1 if the budget runs out within the period at the current burn rate.",
                 ["namespace", "budget"])
LOOPS = Counter("spendwarden_loops_reported", "Requests proxies refused with 429 loop_detected, as they reported them.",
                ["namespace", "route"])


# namespace -> its labels (None: not known), for the gateway-mode trust decisions.
NamespaceLabelsFn = Callable[[str], Mapping[str, str] | None]


class ScalingPort(Protocol):
    """What the ledger's endpoints need of the scaler (controller/scaler.py ScalingEndpoints)."""

    def report(self, proxy_id: str, namespace: str, raw: Any) -> dict[str, Any] | None:
        """A report's `backends` -> the answer's `backends`; raises ValueError (a 400)."""

    async def wake(self, namespace: str, route: str, backend: str) -> dict[str, Any]:
        """Raises an exception with .status."""


# -- apiserver I/O (in threads) ---------------------------------------------------------------------------

def _get_budget(namespace: str, name: str) -> dict[str, Any] | None:
    return kube.get_custom(tokenbudget.PLURAL, namespace, name)


def _patch_status(namespace: str, name: str, status: dict[str, Any]) -> None:
    kube.custom().patch_namespaced_custom_object_status(GROUP, VERSION, namespace, tokenbudget.PLURAL, name,
                                                        {"status": status})


def _patch_conditions(namespace: str, name: str, seen: list[dict] | None, desired: list[dict]) -> bool:
    """Replace status.conditions only if they are still `seen` (a JSON Patch `test`): the reconcile
    writes the Ready condition into the same list. False when someone changed them meanwhile."""
    ops: list[dict[str, Any]] = ([{"op": "test", "path": "/status/conditions", "value": seen}] if seen else [])
    ops.append({"op": "add", "path": "/status/conditions", "value": desired})
    try:
        kube.custom().patch_namespaced_custom_object_status(GROUP, VERSION, namespace, tokenbudget.PLURAL, name, ops,
                                                            _content_type="application/json-patch+json")
        return True
    except kube.ApiException as exc:
        if exc.status in (409, 422):
            return False
        raise


def _post_event(entry: BudgetEntry, reason: str, message: str) -> None:
    kube.post_budget_event(entry.namespace, entry.name, entry.uid, reason, message, component="ledger")


# -- the service -------------------------------------------------------------------------------------------

@dataclass
class _FlushState:
    last_written: dict[str, Any] = field(default_factory=dict)  # the owned fields as last persisted
    last: float = 0.0                                            # monotonic time of the last attempt
    task: asyncio.Task | None = None
    again: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)   # replaced after each flush


class LedgerService:
    def __init__(self, config: LedgerConfig, store: LedgerStore | None = None, *,
                 alerts: AlertSettings | None = None, scaling: ScalingPort | None = None,
                 cutoff: CutOffConfig | None = None, replica_owner: ReplicaOwnerFn | None = None,
                 gateway: GatewaySettings | None = None, namespace_labels: NamespaceLabelsFn | None = None):
        self.config = config
        # Gateway mode: whose tokens may report for which namespace (render/gateway.py ledger_refusal).
        self.gateway = gateway or GatewaySettings()
        self.namespace_labels: NamespaceLabelsFn = namespace_labels or (lambda _: None)
        self.scaling = scaling
        self.store = store or LedgerStore(LeaseSettings(
            ttl=config.lease_ttl, grace=config.lease_grace, admitted_window=config.admitted_window))
        self.reviewer = TokenReviewer(config.review_ttl)
        self._flush: dict[tuple[str, str], _FlushState] = {}
        self._loading: dict[tuple[str, str], asyncio.Task] = {}  # in flight only: one GET per name
        self._load_slots = asyncio.Semaphore(MAX_CONCURRENT_LOADS)
        self._unknown: ExpiringMap[tuple[str, str], bool] = ExpiringMap(UNKNOWN_TTL, MAX_UNKNOWN)
        self._events_seen = 0  # a budget event during a GET may be its creation: no negative then
        self._server: LedgerHttpServer | None = None
        self._ticker: asyncio.Task | None = None
        self._events: set[asyncio.Task] = set()
        self.loops = LoopAggregator()  # LoopDetected Events: at most one per route a minute
        self.alerts = WebhookSender(alerts or AlertSettings())
        self.port: int | None = None
        self.flush_interval = config.flush_interval  # stretched by the tick when many budgets are dirty
        # NetworkPolicy, label, scale-to-zero of exhausted CutOff budgets; started and stopped with the ledger.
        cutoff = cutoff or CutOffConfig()
        self.cutoff = CutOffController(self, settings=cutoff.settings, resync=cutoff.resync,
                                       replica_owner=replica_owner, gateway=self.gateway)

    # lifecycle

    def routes(self) -> dict[str, dict[str, Any]]:
        return {"/v1/report": {"POST": self.handle_report}, "/v1/wake": {"POST": self.handle_wake},
                "/healthz": {"GET": self.handle_healthz}}

    def app(self) -> web.Application:
        """The same handlers on an aiohttp app (tests, embedding); the operator serves them with
        ledger_http, which costs a quarter of aiohttp's CPU per request."""
        app = web.Application(client_max_size=MAX_BODY)
        for path, methods in self.routes().items():
            for method, handler in methods.items():
                app.router.add_route(method, path, aiohttp_handler(handler))
        return app

    async def start(self) -> None:
        if self.config.insecure:
            log.warning("LEDGER AUTHENTICATION IS OFF (--ledger-insecure): anyone who can reach port %s can "
                        "report usage for any namespace and obtain budget grants. Never use this in a cluster.",
                        self.config.port)
        self._server = LedgerHttpServer(self.routes(), max_body=MAX_BODY, request_timeout=self.config.request_timeout,
                                        max_connections=self.config.max_connections, admit=self.admit,
                                        verify=self.verify)
        self.port = await self._server.start(self.config.addr, self.config.port)
        self._ticker = asyncio.create_task(self._tick_forever(), name="spendwarden-ledger-tick")
        await self.cutoff.start()
        log.info("ledger service listening", extra={"addr": self.config.addr, "port": self.config.port,
                                                    "auth": "none" if self.config.insecure else "TokenReview"})

    async def stop(self) -> None:
        """Stop answering, then persist every dirty budget (the shutdown flush)."""
        if self._server is not None:
            await self._server.stop()
            self._server = None
        if self._ticker is not None:
            self._ticker.cancel()
        await self.cutoff.stop()
        for entry in list(self.store.entries.values()):
            st = self._state(entry)
            if st.task is not None:
                await asyncio.wait([st.task], timeout=5)
            if entry.dirty:
                await self._flush_once(entry)
        await self.alerts.close()
        self.reviewer.close()
        log.info("ledger state persisted at shutdown", extra={"budgets": len(self.store.entries)})

    # HTTP

    async def handle_healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "budgets": len(self.store.entries)})

    def _reject(self, status: int, reason: str, message: str) -> web.Response:
        REJECTED.labels(reason=reason).inc()
        return web.json_response({"error": message}, status=status)

    def admit(self, path: str, headers: Headers) -> Admission:
        """ledger_http's judgement of a head before its body is read: no review here, only the header's
        syntax and a cached verdict (the handler still authenticates every request)."""
        if self.config.insecure:
            return TRUSTED
        if path not in AUTHENTICATED:
            return PUBLIC
        token = bearer_token(headers.get("authorization", ""))
        if token is None:
            REJECTED.labels(reason="missing_token").inc()
            return 401, MISSING_TOKEN
        verdict = self.reviewer.cached(self.reviewer.key(token))
        if verdict is False:
            REJECTED.labels(reason="invalid_token").inc()
            return 401, INVALID_TOKEN
        # The identity rides on the request: the handler need not parse and hash the token again.
        return REVIEW if verdict is None else Trusted(verdict)

    async def verify(self, headers: Headers) -> None:
        """Review a head's token before its large body is read (the verdict is cached either way)."""
        token = bearer_token(headers.get("authorization", ""))
        if token is not None:
            await self.reviewer.review(token)

    async def _authenticate(self, request: web.Request) -> tuple[str, str] | None | web.Response:
        """(namespace, serviceaccount) of the Bearer token; None with --ledger-insecure; or the refusal."""
        if self.config.insecure:
            return None
        principal = getattr(request, "principal", None)  # ledger_http's: admit() found the token known good
        if principal is not None:
            return principal
        token = bearer_token(request.headers.get("Authorization", ""))
        if token is None:
            return self._reject(401, "missing_token", MISSING_TOKEN)
        try:
            who = await self.reviewer.review(token)
        except ReviewBusy:  # a flood of unknown tokens: counted, not logged per request
            return self._reject(503, "review_busy", "too many unknown tokens under review; retry")
        except Exception as exc:  # noqa: BLE001 - the apiserver is unreachable: retryable, not the proxy's fault
            log.warning("TokenReview failed: %s", type(exc).__name__)
            return self._reject(503, "review_failed", "cannot verify the token now; retry")
        if who is None:
            return self._reject(401, "invalid_token", INVALID_TOKEN)
        return who

    def _refused(self, who: tuple[str, str] | None, namespace: str) -> web.Response | None:
        """403 unless the token may speak for `namespace`: its own namespace, or any gateway-mode
        namespace for the gateway's ServiceAccount; a tenant's own token not for a gateway-mode
        namespace whose egress is enforced (render/gateway.py ledger_refusal)."""
        if who is None:  # --ledger-insecure
            return None
        if self.gateway.enabled and self.namespace_labels(namespace) is None:
            # Not delivered by the namespace watch yet (the operator just started): its mode is unknown.
            return self._reject(503, "namespace_unknown", f"namespace {namespace} is not known yet; retry")
        refusal = ledger_refusal(who, namespace, self.namespace_labels, self.gateway)
        return None if refusal is None else self._reject(403, refusal.reason, refusal.message)

    async def handle_report(self, request: web.Request) -> web.Response | Reply:
        who = await self._authenticate(request)
        if isinstance(who, web.Response):
            return who
        try:
            body = orjson.loads(await request.read())  # orjson on the bytes: the report path is the hot one
        except (ValueError, UnicodeDecodeError):
            return self._reject(400, "bad_request", "the body is not JSON")
        try:
            report = parse_report(body)
        except ReportError as exc:
            return self._reject(400, "bad_request", str(exc))
        refused = self._refused(who, report.namespace)
        if refused is not None:
            return refused
        backends = None
        if self.scaling is not None:
            try:  # demand for the scaler (before the usage is applied: a bad report changes nothing)
                backends = self.scaling.report(report.proxy_id, report.namespace, body.get("backends"))
            except ValueError as exc:
                return self._reject(400, "bad_request", str(exc))
        REPORTS.inc()
        try:
            answer = await self.apply(report)
        except TimeoutError:
            return web.json_response({"error": "the ledger could not persist the grant in time; retry the same report"},
                                     status=503)
        except Exception as exc:  # loading a budget failed (apiserver unreachable): retryable
            log.warning("ledger report failed: %s", type(exc).__name__, exc_info=True)
            return web.json_response({"error": "the ledger cannot load the budget now; retry the same report"},
                                     status=503)
        if backends:
            answer["backends"] = backends
        return Reply(200, orjson.dumps(answer))  # not a web.Response: its headers cost more than the answer

    async def handle_wake(self, request: web.Request) -> web.Response:
        """POST /v1/wake {namespace, route, backend}: a proxy holds a request for a backend at zero."""
        who = await self._authenticate(request)
        if isinstance(who, web.Response):
            return who
        try:
            body = await request.json(loads=json.loads)
        except (ValueError, UnicodeDecodeError):
            return self._reject(400, "bad_request", "the body is not JSON")
        fields = {k: body.get(k) if isinstance(body, dict) else None for k in ("namespace", "route", "backend")}
        bad = [k for k, v in fields.items() if not isinstance(v, str) or not v or len(v) > 253]
        if bad:
            return self._reject(400, "bad_request", f"{', '.join(bad)}: required (non-empty strings)")
        refused = self._refused(who, cast(str, fields["namespace"]))
        if refused is not None:
            return refused
        if self.scaling is None:
            return web.json_response({"error": "scaling is not enabled in this operator"}, status=404)
        try:
            namespace, route, backend = (cast(str, fields[k]) for k in ("namespace", "route", "backend"))  # checked above
            answer = await self.scaling.wake(namespace, route, backend)
        except Exception as exc:  # noqa: BLE001 - WakeError carries its status; anything else is retryable
            status = getattr(exc, "status", 503)
            if status == 503:
                log.warning("wake failed: %s", type(exc).__name__)
            return web.json_response({"error": str(exc) if status != 503 else "cannot wake the backend now; retry"},
                                     status=status)
        return web.json_response(answer)

    async def apply(self, report: Any) -> dict[str, Any]:
        """Apply a parsed, authorised report; answers once its grants are persisted."""
        ns = report.namespace
        get = self.store.get  # loaded budgets without a coroutine each: the common case
        entries: dict[str, BudgetEntry | None] = {name: get(ns, name) for name in report.budgets}
        missing = [n for n, e in entries.items() if e is None and self._may_exist(ns, n)]
        skipped = set(missing[MAX_LOOKUPS_PER_REPORT:])
        if missing:  # in parallel: a report naming many new budgets waits for one GET, not for all in series
            looked_up = missing[:MAX_LOOKUPS_PER_REPORT]
            entries.update(zip(looked_up, await asyncio.gather(*(self.entry(ns, n) for n in looked_up))))
        # From here to the last report() call there is no await: the report is applied atomically.
        now_ts, now = time.time(), datetime.now(UTC)
        answers: dict[str, Any] = {}
        waits: list[tuple[BudgetEntry, int]] = []
        for name, rep in report.budgets.items():
            entry = entries[name]
            if entry is None:
                answers[name] = dict(NOT_LOADED) if name in skipped else {"error": "unknown budget"}
                continue
            answers[name], wait = self.store.report(entry, report.proxy_id, report.seq, rep, now_ts, now)
            self.cutoff.observe(entry)  # at once, not after the flush: the cut-off latency
            if wait > entry.persisted:
                waits.append((entry, wait))
        self._take_loops(report)
        for entry in {id(e): e for e, _ in waits}.values():
            self._request_flush(entry, urgent=True)
        for entry, wait in waits:
            await self._wait_persisted(entry, wait)
        return {"seq": report.seq, "budgets": answers}

    # budgets

    def owns(self, namespace: str, name: str) -> bool:
        return self.store.get(namespace, name) is not None

    def _may_exist(self, namespace: str, name: str) -> bool:
        """Whether a name not loaded is worth a GET: served, and not found missing lately."""
        return self.config.serves(namespace) and self._unknown.get((namespace, name)) is None

    async def entry(self, namespace: str, name: str) -> BudgetEntry | None:
        """The budget's entry, loaded with its persisted ledger before it is first used."""
        entry = self.store.get(namespace, name)
        if entry is not None or not self._may_exist(namespace, name):
            return entry
        key = (namespace, name)
        task = self._loading.get(key)
        if task is None:  # concurrent reports naming it share one GET
            task = self._loading[key] = asyncio.ensure_future(self._load(namespace, name))
            task.add_done_callback(lambda _: self._loading.pop(key, None))
        return await asyncio.shield(task)

    async def _load(self, namespace: str, name: str) -> BudgetEntry | None:
        async with self._load_slots:
            entry = self.store.get(namespace, name)
            if entry is not None:
                return entry
            seen = self._events_seen
            obj = await asyncio.to_thread(_get_budget, namespace, name)
            entry = self.store.load(plain(obj), datetime.now(UTC)) if obj is not None else None
            if entry is None or obj is None:  # (no entry without an object)
                if seen == self._events_seen:
                    self._unknown.put((namespace, name), True)
                return None
            status = obj.get("status") or {}
            self._state(entry).last_written = {k: status.get(k) for k in LEDGER_FIELDS}
            log.info("budget ledger loaded", extra={"namespace": namespace, "budget": name,
                                                    "proxies": len(entry.current.ledger.proxies)})
            if entry.dirty:
                self._request_flush(entry, urgent=False)
            self.cutoff.observe(entry)
            return entry

    def observe(self, event_type: str | None, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        ns, name = meta.get("namespace", ""), meta.get("name", "")
        if event_type == "DELETED":
            self.store.forget(ns, name)
            self._flush.pop((ns, name), None)
            self._drop_gauges(ns, name)
            self.cutoff.forget(ns, name)
            return
        self._unknown.pop((ns, name))
        self._events_seen += 1
        if self.store.written_by_another(obj):
            writer = obj["status"]["ledger"]["writer"]
            # Another operator instance wrote this ledger (only one may serve it: the chart runs one
            # replica with strategy Recreate). Writing our copy now would overwrite its grants, so
            # ours is dropped; a later report reloads the persisted state and answers from that.
            log.warning("another operator instance (%s) writes this budget's ledger; dropping this one's copy",
                        writer, extra={"namespace": ns, "budget": name})
            self.store.forget(ns, name)
            self._flush.pop((ns, name), None)
            return
        if self.store.get(ns, name) is None:
            # A budget with a persisted ledger is loaded now (after a restart: from the fresh object,
            # not the event's copy), so its period resets and expiries happen even if no proxy reports.
            if (obj.get("status") or {}).get("ledger") and self.config.serves(ns):
                task = asyncio.create_task(self.entry(ns, name), name=f"ledger-load-{ns}/{name}")
                self._events.add(task)
                task.add_done_callback(self._event_done)
            return
        entry = self.store.observe(obj, datetime.now(UTC))
        if entry is not None:
            self._request_flush(entry, urgent=False)

    # persistence

    def _state(self, entry: BudgetEntry) -> _FlushState:
        return self._flush.setdefault((entry.namespace, entry.name), _FlushState())

    def _request_flush(self, entry: BudgetEntry, urgent: bool) -> None:
        """Start a flush now if urgent (a grant waits) or the budget's interval has passed; grants
        arriving while a flush is under way ride on the next one (group commit)."""
        st = self._state(entry)
        if st.task is not None and not st.task.done():
            st.again = st.again or urgent
            return
        if urgent or time.monotonic() - st.last >= self.flush_interval:
            st.task = asyncio.create_task(self._flush_loop(entry), name=f"ledger-flush-{entry.namespace}/{entry.name}")

    async def _flush_loop(self, entry: BudgetEntry) -> None:
        st = self._state(entry)
        while True:
            st.again = False
            await self._flush_once(entry)
            if not (st.again and entry.dirty) or self.store.get(entry.namespace, entry.name) is not entry:
                break

    async def _flush_once(self, entry: BudgetEntry) -> bool:
        st = self._state(entry)
        st.last = time.monotonic()
        now = datetime.now(UTC)
        version = entry.version
        desired = self.store.status(entry, now)  # built without an await: the state as of `version`
        conditions = desired.pop("conditions")
        patch = replace_patch(st.last_written, desired)
        try:
            await asyncio.to_thread(_patch_status, entry.namespace, entry.name, patch)
        except Exception as exc:  # noqa: BLE001 - retried at the next interval; waiters keep waiting
            status = getattr(exc, "status", None)
            FLUSHES.labels(outcome="error").inc()
            if status == 404:
                log.info("budget deleted; its ledger is dropped", extra={"namespace": entry.namespace, "budget": entry.name})
                self.store.forget(entry.namespace, entry.name)
            else:
                log.warning("ledger state write failed: %s %s", type(exc).__name__, status or "",
                            extra={"namespace": entry.namespace, "budget": entry.name})
            self._wake(st)
            return False
        FLUSHES.labels(outcome="ok").inc()
        st.last_written = desired
        self.store.persisted(entry, version)
        self._wake(st)
        await self._after_flush(entry, conditions, desired.get("forecastExhaustion") is not None)
        return True

    async def _after_flush(self, entry: BudgetEntry, conditions: list[dict], forecast_exceeded: bool) -> None:
        """The Exceeded condition, Events and gauges: all derived from the persisted usage."""
        if _ledger_conditions(conditions) != _ledger_conditions(entry.conditions):
            try:
                if await asyncio.to_thread(_patch_conditions, entry.namespace, entry.name, entry.conditions or None, conditions):
                    entry.conditions = conditions
                else:
                    obj = await asyncio.to_thread(_get_budget, entry.namespace, entry.name)
                    if obj is not None:
                        entry.conditions = list((obj.get("status") or {}).get("conditions") or [])
                        entry.changed()  # try again at the next interval
            except Exception as exc:  # noqa: BLE001
                log.warning("Exceeded/ForecastExhausted condition write failed: %s", type(exc).__name__)
        for reason, message in self.store.events(entry):
            self._spawn_event(entry, reason, message)
            self.alerts.announce(entry, reason, message)
        self._gauges(entry, forecast_exceeded)
        self.cutoff.observe(entry)  # a period reset or a raised limit lifts the cut-off

    def _gauges(self, entry: BudgetEntry, forecast_exceeded: bool) -> None:
        """The metric contract of the chart's PrometheusRule (templates/prometheusrule.yaml)."""
        fraction = entry.fraction()
        _, state = self.store.status_gauges(entry)
        ns, name = entry.namespace, entry.name
        PERCENT.labels(namespace=ns, budget=name).set(float(fraction * 100))
        for s in ("Active", "Warning", "Exceeded"):
            STATE.labels(namespace=ns, budget=name, state=s).set(1 if s == state else 0)
        FORECAST.labels(namespace=ns, budget=name).set(1 if forecast_exceeded or entry.exhausted() else 0)

    @staticmethod
    def _drop_gauges(namespace: str, name: str) -> None:
        for gauge, labels in ((PERCENT, (namespace, name)), (FORECAST, (namespace, name)),
                              *((STATE, (namespace, name, s)) for s in ("Active", "Warning", "Exceeded"))):
            try:
                gauge.remove(*labels)
            except KeyError:
                pass

    def _spawn_event(self, entry: BudgetEntry, reason: str, message: str) -> None:
        task = asyncio.create_task(asyncio.to_thread(_post_event, entry, reason, message))
        self._events.add(task)
        task.add_done_callback(self._event_done)

    # loops (issue #7): Events on the budgets covering a route whose proxies refuse runaway repeats

    def _take_loops(self, report: Any) -> None:
        """Count a report's loop-breaker refusals (once: a retry resends the same seq) and announce them."""
        ns = report.namespace
        if not report.loops or not self.config.serves(ns) or not self.loops.accept(ns, report.proxy_id, report.seq):
            return
        for loop in report.loops:
            LOOPS.labels(namespace=ns, route=self.loops.route_label(ns, loop.route)).inc(loop.refused)
            self.loops.add(ns, loop)
        self._announce_loops()

    def _announce_loops(self) -> None:
        for notice in self.loops.due(time.monotonic()):
            for entry in list(self.store.entries.values()):
                if entry.namespace == notice.namespace and (not entry.spec.routes or notice.model in entry.spec.routes):
                    self._spawn_event(entry, "LoopDetected", notice.message)

    def _event_done(self, task: asyncio.Task) -> None:
        self._events.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background ledger task %s failed: %s", task.get_name(), type(task.exception()).__name__)

    @staticmethod
    def _wake(st: _FlushState) -> None:
        done, st.done = st.done, asyncio.Event()
        done.set()

    async def _wait_persisted(self, entry: BudgetEntry, version: int) -> None:
        deadline = time.monotonic() + self.config.commit_timeout
        while entry.persisted < version:
            if self.store.get(entry.namespace, entry.name) is not entry:
                raise TimeoutError("budget gone")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("not persisted")
            st = self._state(entry)
            self._request_flush(entry, urgent=True)
            done = st.done
            try:
                await asyncio.wait_for(done.wait(), timeout=min(left, 1.0))
            except TimeoutError:
                pass

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            try:
                now_ts, now = time.time(), datetime.now(UTC)
                self.store.tick(now_ts, now)
                self._announce_loops()  # refusals held back by the per-route interval
                dirty = [entry for entry in self.store.entries.values() if entry.dirty]
                self.flush_interval = max(self.config.flush_interval,
                                          len(dirty) / max(self.config.max_writes_per_second, 0.1))
                for entry in dirty:
                    # A grant still waiting (an earlier flush failed) is urgent.
                    urgent = any(pl is not None and pl.raised for pl in (entry.current, entry.previous))
                    self._request_flush(entry, urgent=urgent)
            except Exception:  # the next tick tries again
                log.exception("ledger tick failed")


def _ledger_conditions(conditions: Any) -> Any:
    """The conditions the ledger writes (Exceeded, ForecastExhausted), as far as a rewrite matters."""
    return sorted((c.get("type"), c.get("status"), c.get("reason"), c.get("message")) for c in conditions or []
                  if c.get("type") in ("Exceeded", FORECAST_CONDITION))


# -- metrics endpoint ------------------------------------------------------------------------------------

def start_metrics(port: int) -> Any:
    """The Prometheus endpoint's server (shutdown() stops it), None if the port is taken (logged)."""
    from prometheus_client import start_http_server
    try:
        server, _thread = start_http_server(port)
    except OSError as exc:
        log.error("cannot serve metrics on port %s: %s", port, exc)
        return None
    log.info("metrics served", extra={"port": port})
    return server
