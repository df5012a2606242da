"""kopf registration: every handler is a few lines that call reconcile/render.

Both kinds are watched with raw event handlers (no per-object handler state, so nothing is
written into users' objects besides status) into an in-memory inventory (controller/inventory.py),
so a namespace render needs no API list call. Any event in a namespace re-renders the whole
namespace: a route's validity can depend on its siblings (duplicate aliases), and the ConfigMap is
one for all of them. Renders run in their own thread pool, one at a time per namespace, and skip
namespaces whose inputs did not change (most events are status writes).
"""
from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Any

import kopf

from .. import GROUP, VERSION
from ..api.common import now_rfc3339
from ..api import modelroute, tokenbudget
from ..api.proxyconfig import CONFIG_KEY, CONFIGMAP_NAME
from ..ledger.periods import seconds_until_next_reset
from ..prices import pins
from ..render.proxyconfig import LABELS, config_hash
from . import admission  # noqa: F401  (webhooks; registers handlers only when enabled)
from . import inventory, kube, ledger_service, reconcile  # ledger_service: the ledger API and metrics (registers handlers)
from . import scaler  # noqa: F401  (demand-driven replicas of scaled backends; registers handlers)
from .bodies import plain

log = logging.getLogger(__name__)
LEDGER_URL = os.environ.get("SPENDWARDEN_LEDGER_URL") or None


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP, key="last-handled-configuration")
    # Explicit watch timeouts: idle watches through load balancers otherwise freeze silently (kopf#1120).
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 310
    settings.watching.connect_timeout = 30
    settings.watching.reconnect_backoff = 1.0
    settings.networking.request_timeout = 60
    settings.posting.level = logging.WARNING  # only our Warning Events, not kopf's chatter
    settings.execution.max_workers = 8  # kopf's own sync handlers; reconciles have their own pool


_inventory = inventory.INVENTORY
_pool: ThreadPoolExecutor | None = None
# Reconciles at once: each mostly waits for the apiserver, so more threads than cores pay off.
RECONCILE_WORKERS = int(os.environ.get("SPENDWARDEN_RECONCILE_WORKERS") or 16)
_running: set[str] = set()   # namespaces being reconciled now (one run per namespace at a time)
_dirty: set[str] = set()     # namespaces with events since their run started (or before the first listing)


def _warn(obj: dict[str, Any], reason: str, message: str) -> None:
    try:
        kube.post_warning(kube.involved_object(obj), reason, message)
    except Exception as exc:  # noqa: BLE001 - the condition carries the message too
        log.warning("cannot post a Warning Event: %s", type(exc).__name__)


def _observe(event_type: str | None, body: kopf.Body) -> str:
    namespace = _inventory.observe(event_type, plain(body))
    _dirty.add(namespace)
    if _inventory.complete(namespace):
        _start(namespace)
    return namespace


def _start(namespace: str) -> None:
    if namespace not in _running:
        _running.add(namespace)
        asyncio.get_running_loop().create_task(_run(namespace), name=f"reconcile-{namespace}")


async def _run(namespace: str) -> None:
    """Reconcile until no event arrived during the last run: any number of events while a run is
    under way cost one more run, not one each."""
    assert _pool is not None
    loop = asyncio.get_running_loop()
    try:
        while namespace in _dirty:
            _dirty.discard(namespace)
            if reconcile.up_to_date(namespace, lambda: _inventory.in_namespace(namespace)):
                continue
            try:
                await loop.run_in_executor(_pool, lambda: reconcile.reconcile_namespace(
                    namespace, lambda: _inventory.in_namespace(namespace), _warn, LEDGER_URL,
                    ledger_service.ledger_owns, only_if_changed=True))
            except Exception:
                log.exception("reconcile of namespace %s failed; retried by the reset loop", namespace)
                _resets[namespace] = _retry_at()
                break
    finally:
        _running.discard(namespace)


@kopf.on.event(GROUP, modelroute.PLURAL)
async def modelroute_event(event: dict[str, Any], body: kopf.Body, **_: Any) -> None:
    _observe(event.get("type"), body)


@kopf.on.event(GROUP, tokenbudget.PLURAL)
async def tokenbudget_event(event: dict[str, Any], body: kopf.Body, **_: Any) -> None:
    _remember_reset(_observe(event.get("type"), body))


def _list_all() -> list[tuple[str, str]]:
    """(namespace, uid) of every ModelRoute and TokenBudget in the watched namespaces, as the apiserver
    has them now."""
    from kubernetes import client

    api = client.CustomObjectsApi(kube.api_client())
    items = [o["metadata"] for plural in (modelroute.PLURAL, tokenbudget.PLURAL)
             for o in kube.read_json(api.list_cluster_custom_object(GROUP, VERSION, plural, _preload_content=False))["items"]]
    return [(m["namespace"], m["uid"]) for m in items if ledger_service.CONFIG.serves(m["namespace"])]


def _start_complete() -> None:
    """Render every namespace with events whose start-up objects have all arrived."""
    for namespace in list(_dirty):
        if _inventory.complete(namespace):
            _start(namespace)


async def _await_first_listing() -> None:
    """Learn what existed at start-up; each namespace is rendered once the watches delivered its part."""
    for attempt in range(10):
        try:
            _inventory.expect(await asyncio.to_thread(_list_all))
            break
        except Exception as exc:  # noqa: BLE001
            log.warning("start-up list failed (%s); retrying", type(exc).__name__)
            await asyncio.sleep(min(2 ** attempt, 10))
    else:
        log.error("start-up list kept failing: rendering from what the watches delivered so far")
        _inventory.expect([])
    _start_complete()
    while not _inventory.complete():
        await asyncio.sleep(0.1)
        _start_complete()  # events mark namespaces dirty; this catches ones completed by a recheck
        if _inventory.needs_recheck():
            try:
                _inventory.recheck(await asyncio.to_thread(_list_all))
            except Exception as exc:  # noqa: BLE001
                log.warning("start-up re-list failed (%s)", type(exc).__name__)
            if pending := _inventory.pending():
                log.warning("the watches have not delivered every object listed at start-up; these namespaces "
                            "wait to be rendered", extra={"namespaces": pending[:20], "count": len(pending)})
    _start_complete()
    log.info("first listing complete", extra={"namespaces": len(_inventory.namespaces())})


@kopf.on.startup()
async def start_reconciler(memo: kopf.Memo, **_: Any) -> None:
    global _pool
    _pool = ThreadPoolExecutor(RECONCILE_WORKERS, thread_name_prefix="reconcile")
    await asyncio.to_thread(_reload_prices)  # the pinned prices, before the first render
    memo["first-listing"] = asyncio.create_task(_await_first_listing())


@kopf.on.cleanup()
async def stop_reconciler(memo: kopf.Memo, **_: Any) -> None:
    task = memo.get("first-listing")
    if task is not None:
        task.cancel()
    if _pool is not None:
        _pool.shutdown(wait=False, cancel_futures=True)


# Period resets. Not a kopf timer: timers make kopf put a finalizer on every TokenBudget, which
# blocks deleting budgets while the operator is down and writes into users' objects. Instead the
# event handlers remember each namespace's earliest reset, and one loop re-renders a namespace
# once that time has passed (its own status write then records the next reset).
_resets: dict[str, str] = {}
ROLLOVER_INTERVAL = float(os.environ.get("SPENDWARDEN_ROLLOVER_INTERVAL", "15"))


def _retry_at() -> str:
    return now_rfc3339(datetime.now(timezone.utc) + timedelta(seconds=ROLLOVER_INTERVAL))


def _remember_reset(namespace: str) -> None:
    ends = [b.get("status", {}).get("periodEnd") for b in _inventory.in_namespace(namespace)[1]]
    ends = [e for e in ends if e]
    if ends:
        _resets[namespace] = min(ends)
    else:
        _resets.pop(namespace, None)


def _list_namespace(namespace: str) -> tuple[list[dict], list[dict]]:
    from kubernetes import client

    api = client.CustomObjectsApi(kube.api_client())
    return tuple(api.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)["items"]  # type: ignore[return-value]
                 for plural in (modelroute.PLURAL, tokenbudget.PLURAL))


# Drift: a proxy ConfigMap deleted or edited by hand changes none of the CRs, so no event would
# re-render it. One label-selected list per interval finds those namespaces.
DRIFT_INTERVAL = float(os.environ.get("SPENDWARDEN_DRIFT_INTERVAL", "60"))


def _live_config_hashes() -> dict[str, str]:
    from kubernetes import client

    selector = ",".join(f"{k}={v}" for k, v in LABELS.items())
    items = kube.read_json(client.CoreV1Api(kube.api_client()).list_config_map_for_all_namespaces(
        label_selector=selector, field_selector=f"metadata.name={CONFIGMAP_NAME}", _preload_content=False))["items"]
    return {cm["metadata"]["namespace"]: config_hash((cm.get("data") or {}).get(CONFIG_KEY, "")) for cm in items}


async def _repair_drift() -> None:
    try:
        present = await asyncio.to_thread(_live_config_hashes)
    except Exception as exc:  # noqa: BLE001 - tried again at the next interval
        log.warning("cannot list the proxy ConfigMaps to check for drift: %s", type(exc).__name__)
        return
    for namespace in reconcile.drifted(present):
        log.warning("proxy ConfigMap deleted or edited outside spendwarden; rendering it again",
                    extra={"namespace": namespace})
        _dirty.add(namespace)
        _start(namespace)


async def _rollover_loop() -> None:
    last_drift_check = asyncio.get_running_loop().time()
    while True:
        # Woken at the earliest period end, so status shows the new period at once.
        await asyncio.sleep(seconds_until_next_reset(_resets.values(), datetime.now(timezone.utc), ROLLOVER_INTERVAL))
        if asyncio.get_running_loop().time() - last_drift_check >= DRIFT_INTERVAL:
            last_drift_check = asyncio.get_running_loop().time()
            await _repair_drift()
        now = now_rfc3339()
        for namespace in [ns for ns, end in list(_resets.items()) if end <= now]:
            _resets.pop(namespace, None)
            try:
                await asyncio.to_thread(reconcile.reconcile_namespace, namespace,
                                        lambda ns=namespace: _list_namespace(ns), _warn, LEDGER_URL,
                                        ledger_service.ledger_owns)
            except Exception:  # retried at the next tick; never let the loop die
                log.exception("period reset of namespace %s failed", namespace)
                _resets[namespace] = _retry_at()


# Pinned prices: the file the chart mounts from the ConfigMap spendwarden-prices. Polled, since a
# ConfigMap volume changes without any event; a change re-renders every namespace (reconcile's
# inputs include the prices' key, so none is skipped as up to date).
PRICES_POLL_INTERVAL = float(os.environ.get("SPENDWARDEN_PRICES_POLL_INTERVAL", "5"))
_pins = pins.PinWatcher(os.environ.get(pins.ENV) or None)


def _reload_prices() -> bool:
    changed = _pins.poll()
    if changed:
        pins.use(_pins.book)
    return changed


async def _prices_loop() -> None:
    while True:
        await asyncio.sleep(PRICES_POLL_INTERVAL)
        try:
            changed = await asyncio.to_thread(_reload_prices)
        except Exception:  # noqa: BLE001 - never let the loop die; the old prices stay in force
            log.exception("cannot reload the pinned prices")
            continue
        if changed:
            log.info("pinned prices changed; rendering every namespace again")
            _dirty.update(_inventory.namespaces())
            _start_complete()


@kopf.on.startup()
async def start_loops(memo: kopf.Memo, **_: Any) -> None:
    memo["rollover"] = asyncio.create_task(_rollover_loop())
    memo["prices"] = asyncio.create_task(_prices_loop())


@kopf.on.cleanup()
async def stop_loops(memo: kopf.Memo, **_: Any) -> None:
    for name in ("rollover", "prices"):
        task = memo.get(name)
        if task is not None:
            task.cancel()
