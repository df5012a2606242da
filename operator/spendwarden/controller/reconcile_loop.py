"""When namespaces are reconciled: on watch events, after the start-up listing, at period resets, on
drift of a proxy ConfigMap and when the pinned prices change.

Both kinds are watched with raw event handlers (no per-object handler state, so nothing is
written into users' objects besides status) into an in-memory inventory (controller/inventory.py),
so a namespace render needs no API list call. Any event in a namespace re-renders the whole
namespace: a route's validity can depend on its siblings (duplicate aliases), and the ConfigMap is
one for all of them. Renders run in their own thread pool, one at a time per namespace, and skip
namespaces whose inputs did not change (most events are status writes).
"""
from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from .. import GROUP, VERSION
from ..api import modelroute, tokenbudget
from ..api.common import now_rfc3339
from ..api.proxyconfig import CONFIG_KEY, CONFIGMAP_NAME
from ..ledger.periods import seconds_until_next_reset
from ..prices import pins
from ..render.proxyconfig import LABELS, config_hash
from . import kube
from .inventory import Inventory
from .reconcile import LedgerOwnsFn, NamespaceReconciler
from .settings import ReconcileSettings

log = logging.getLogger(__name__)


def warn(obj: dict[str, Any], reason: str, message: str) -> None:
    try:
        kube.post_warning(kube.involved_object(obj), reason, message)
    except Exception as exc:  # noqa: BLE001 - the condition carries the message too
        log.warning("cannot post a Warning Event: %s", type(exc).__name__)


def _list_namespace(namespace: str) -> tuple[list[dict], list[dict]]:
    return kube.list_custom(modelroute.PLURAL, namespace), kube.list_custom(tokenbudget.PLURAL, namespace)


def _live_config_hashes() -> dict[str, str]:
    selector = ",".join(f"{k}={v}" for k, v in LABELS.items())
    items = kube.read_json(kube.core().list_config_map_for_all_namespaces(
        label_selector=selector, field_selector=f"metadata.name={CONFIGMAP_NAME}", _preload_content=False))["items"]
    return {cm["metadata"]["namespace"]: config_hash((cm.get("data") or {}).get(CONFIG_KEY, "")) for cm in items}


class ReconcileLoop:
    """Runs the reconciles of the namespaces that need one. `serves(namespace)`: the operator's
    --namespace patterns; `ledger_owns(namespace, budget)`: whether the ledger keeps that budget's
    accounts (called from reconcile threads)."""

    def __init__(self, settings: ReconcileSettings, inventory: Inventory, reconciler: NamespaceReconciler,
                 serves: Callable[[str], bool], ledger_owns: LedgerOwnsFn):
        self.settings = settings
        self.inventory = inventory
        self.reconciler = reconciler
        self.serves = serves
        self.ledger_owns = ledger_owns
        self.pins = pins.PinWatcher(settings.prices_file)
        self._pool: ThreadPoolExecutor | None = None
        self._running: set[str] = set()   # namespaces being reconciled now (one run per namespace at a time)
        self._dirty: set[str] = set()     # namespaces with events since their run started (or before the first listing)
        # Period resets. Not a kopf timer: timers make kopf put a finalizer on every TokenBudget, which
        # blocks deleting budgets while the operator is down and writes into users' objects. Instead the
        # event handlers remember each namespace's earliest reset, and one loop re-renders a namespace
        # once that time has passed (its own status write then records the next reset).
        self._resets: dict[str, str] = {}
        self._tasks: dict[str, asyncio.Task] = {}

    # -- events

    def observe(self, event_type: str | None, obj: dict[str, Any]) -> str:
        """A ModelRoute's or TokenBudget's watch event; returns its namespace."""
        namespace = self.inventory.observe(event_type, obj)
        self._dirty.add(namespace)
        if self.inventory.complete(namespace):
            self._start(namespace)
        return namespace

    def observe_budget(self, event_type: str | None, obj: dict[str, Any]) -> None:
        self._remember_reset(self.observe(event_type, obj))

    def _start(self, namespace: str) -> None:
        if namespace not in self._running:
            self._running.add(namespace)
            asyncio.get_running_loop().create_task(self._run(namespace), name=f"reconcile-{namespace}")

    def _snapshot(self, namespace: str) -> Callable[[], tuple[list[dict], list[dict]]]:
        return lambda: self.inventory.in_namespace(namespace)

    async def _run(self, namespace: str) -> None:
        """Reconcile until no event arrived during the last run: any number of events while a run is
        under way cost one more run, not one each."""
        assert self._pool is not None
        loop = asyncio.get_running_loop()
        try:
            while namespace in self._dirty:
                self._dirty.discard(namespace)
                if self.reconciler.up_to_date(namespace, self._snapshot(namespace)):
                    continue
                try:
                    await loop.run_in_executor(self._pool, lambda: self.reconciler.reconcile_namespace(
                        namespace, self._snapshot(namespace), warn, self.settings.ledger_url,
                        self.ledger_owns, only_if_changed=True))
                except Exception:
                    log.exception("reconcile of namespace %s failed; retried by the reset loop", namespace)
                    self._resets[namespace] = self._retry_at()
                    break
        finally:
            self._running.discard(namespace)

    # -- start-up

    def _list_all(self) -> list[tuple[str, str]]:
        """(namespace, uid) of every ModelRoute and TokenBudget in the watched namespaces, as the apiserver
        has them now."""
        api = kube.custom()
        items = [o["metadata"] for plural in (modelroute.PLURAL, tokenbudget.PLURAL)
                 for o in kube.read_json(api.list_cluster_custom_object(GROUP, VERSION, plural, _preload_content=False))["items"]]
        return [(m["namespace"], m["uid"]) for m in items if self.serves(m["namespace"])]

    def _start_complete(self) -> None:
        """Render every namespace with events whose start-up objects have all arrived."""
        for namespace in list(self._dirty):
            if self.inventory.complete(namespace):
                self._start(namespace)

    async def _await_first_listing(self) -> None:
        """Learn what existed at start-up; each namespace is rendered once the watches delivered its part."""
        inventory = self.inventory
        for attempt in range(10):
            try:
                inventory.expect(await asyncio.to_thread(self._list_all))
                break
            except Exception as exc:  # noqa: BLE001
                log.warning("start-up list failed (%s); retrying", type(exc).__name__)
                await asyncio.sleep(min(2 ** attempt, 10))
        else:
            log.error("start-up list kept failing: rendering from what the watches delivered so far")
            inventory.expect([])
        self._start_complete()
        while not inventory.complete():
            await asyncio.sleep(0.1)
            self._start_complete()  # events mark namespaces dirty; this catches ones completed by a recheck
            if inventory.needs_recheck():
                try:
                    inventory.recheck(await asyncio.to_thread(self._list_all))
                except Exception as exc:  # noqa: BLE001
                    log.warning("start-up re-list failed (%s)", type(exc).__name__)
                if pending := inventory.pending():
                    log.warning("the watches have not delivered every object listed at start-up; these namespaces "
                                "wait to be rendered", extra={"namespaces": pending[:20], "count": len(pending)})
        self._start_complete()
        log.info("first listing complete", extra={"namespaces": len(inventory.namespaces())})

    async def start(self) -> None:
        # Reconciles at once: each mostly waits for the apiserver, so more threads than cores pay off.
        self._pool = ThreadPoolExecutor(self.settings.workers, thread_name_prefix="reconcile")
        await asyncio.to_thread(self._reload_prices)  # the pinned prices, before the first render
        self._tasks["first-listing"] = asyncio.create_task(self._await_first_listing())

    async def stop(self) -> None:
        task = self._tasks.pop("first-listing", None)
        if task is not None:
            task.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def start_loops(self) -> None:
        self._tasks["rollover"] = asyncio.create_task(self._rollover_loop())
        self._tasks["prices"] = asyncio.create_task(self._prices_loop())

    def stop_loops(self) -> None:
        for name in ("rollover", "prices"):
            task = self._tasks.pop(name, None)
            if task is not None:
                task.cancel()

    # -- period resets and drift

    def _retry_at(self) -> str:
        return now_rfc3339(datetime.now(UTC) + timedelta(seconds=self.settings.rollover_interval))

    def _remember_reset(self, namespace: str) -> None:
        ends = [b.get("status", {}).get("periodEnd") for b in self.inventory.in_namespace(namespace)[1]]
        ends = [e for e in ends if e]
        if ends:
            self._resets[namespace] = min(ends)
        else:
            self._resets.pop(namespace, None)

    # Drift: a proxy ConfigMap deleted or edited by hand changes none of the CRs, so no event would
    # re-render it. One label-selected list per interval finds those namespaces.
    async def _repair_drift(self) -> None:
        try:
            present = await asyncio.to_thread(_live_config_hashes)
        except Exception as exc:  # noqa: BLE001 - tried again at the next interval
            log.warning("cannot list the proxy ConfigMaps to check for drift: %s", type(exc).__name__)
            return
        for namespace in self.reconciler.drifted(present):
            log.warning("proxy ConfigMap deleted or edited outside spendwarden; rendering it again",
                        extra={"namespace": namespace})
            self._dirty.add(namespace)
            self._start(namespace)

    async def _rollover_loop(self) -> None:
        last_drift_check = asyncio.get_running_loop().time()
        while True:
            # Woken at the earliest period end, so status shows the new period at once.
            await asyncio.sleep(seconds_until_next_reset(self._resets.values(), datetime.now(UTC),
                                                         self.settings.rollover_interval))
            if asyncio.get_running_loop().time() - last_drift_check >= self.settings.drift_interval:
                last_drift_check = asyncio.get_running_loop().time()
                await self._repair_drift()
            now = now_rfc3339()
            for namespace in [ns for ns, end in list(self._resets.items()) if end <= now]:
                self._resets.pop(namespace, None)
                try:
                    await asyncio.to_thread(self.reconciler.reconcile_namespace, namespace,
                                            functools.partial(_list_namespace, namespace), warn, self.settings.ledger_url,
                                            self.ledger_owns)
                except Exception:  # retried at the next tick; never let the loop die
                    log.exception("period reset of namespace %s failed", namespace)
                    self._resets[namespace] = self._retry_at()

    # -- pinned prices: the file the chart mounts from the ConfigMap spendwarden-prices. Polled, since a
    # ConfigMap volume changes without any event; a change re-renders every namespace (reconcile's
    # inputs include the prices' key, so none is skipped as up to date).

    def _reload_prices(self) -> bool:
        changed = self.pins.poll()
        if changed:
            pins.use(self.pins.book)
        return changed

    async def _prices_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.prices_poll_interval)
            try:
                changed = await asyncio.to_thread(self._reload_prices)
            except Exception:  # never let the loop die; the old prices stay in force
                log.exception("cannot reload the pinned prices")
                continue
            if changed:
                log.info("pinned prices changed; rendering every namespace again")
                self._dirty.update(self.inventory.namespaces())
                self._start_complete()
