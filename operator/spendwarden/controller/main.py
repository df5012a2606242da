"""kopf registration: every handler is a few lines that call reconcile/render.

Both kinds are watched with raw event handlers (no per-object handler state, so nothing is
written into users' objects besides status) and in-memory indexes, so a namespace render needs no
API list call. Any event in a namespace re-renders the whole namespace: a route's validity can
depend on its siblings (duplicate aliases), and the ConfigMap is one for all of them.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any

import kopf

from .. import GROUP, VERSION
from ..api.common import now_rfc3339
from ..api import modelroute, tokenbudget
from . import admission  # noqa: F401  (webhooks; registers handlers only when enabled)
from . import kube, ledger_service, reconcile  # ledger_service: the ledger API and metrics (registers handlers)
from . import scaler  # noqa: F401  (demand-driven replicas of scaled backends; registers handlers)
from .bodies import plain

log = logging.getLogger(__name__)
_pending: set[str] = set()
_pending_lock = threading.Lock()
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
    settings.execution.max_workers = 8


@kopf.index(GROUP, modelroute.PLURAL)
def routes_by_namespace(namespace: str, body: kopf.Body, **_: Any) -> dict[str, Any]:
    return {namespace: plain(body)}


@kopf.index(GROUP, tokenbudget.PLURAL)
def budgets_by_namespace(namespace: str, body: kopf.Body, **_: Any) -> dict[str, Any]:
    return {namespace: plain(body)}


def _warn(obj: dict[str, Any], reason: str, message: str) -> None:
    kopf.warn(obj, reason=reason, message=message)


def _reconcile(namespace: str, routes_index: kopf.Index, budgets_index: kopf.Index) -> None:
    # Coalesce: while a reconcile for this namespace waits for its lock, later events ride on it,
    # because it snapshots the indexes only after taking the lock.
    with _pending_lock:
        if namespace in _pending:
            return
        _pending.add(namespace)

    def snapshot() -> tuple[list[dict], list[dict]]:
        with _pending_lock:
            _pending.discard(namespace)
        return (reconcile.objects_in(routes_index, namespace), reconcile.objects_in(budgets_index, namespace))

    try:
        reconcile.reconcile_namespace(namespace, snapshot, _warn, LEDGER_URL, ledger_service.ledger_owns)
    except Exception:
        with _pending_lock:
            _pending.discard(namespace)
        # kopf does not retry raw event handlers: the reset loop retries the namespace instead.
        _resets[namespace] = now_rfc3339()
        raise


@kopf.on.event(GROUP, modelroute.PLURAL)
def modelroute_event(namespace: str, routes_by_namespace: kopf.Index, budgets_by_namespace: kopf.Index, **_: Any) -> None:
    _reconcile(namespace, routes_by_namespace, budgets_by_namespace)


@kopf.on.event(GROUP, tokenbudget.PLURAL)
def tokenbudget_event(namespace: str, routes_by_namespace: kopf.Index, budgets_by_namespace: kopf.Index, **_: Any) -> None:
    _reconcile(namespace, routes_by_namespace, budgets_by_namespace)
    _remember_reset(namespace, budgets_by_namespace)


# Period resets. Not a kopf timer: timers make kopf put a finalizer on every TokenBudget, which
# blocks deleting budgets while the operator is down and writes into users' objects. Instead the
# event handlers remember each namespace's earliest reset, and one loop re-renders a namespace
# once that time has passed (its own status write then records the next reset).
_resets: dict[str, str] = {}
ROLLOVER_INTERVAL = float(os.environ.get("SPENDWARDEN_ROLLOVER_INTERVAL", "15"))


def _remember_reset(namespace: str, budgets_index: kopf.Index) -> None:
    ends = [b.get("status", {}).get("periodEnd") for b in reconcile.objects_in(budgets_index, namespace)]
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


async def _rollover_loop() -> None:
    while True:
        await asyncio.sleep(ROLLOVER_INTERVAL)
        now = now_rfc3339()
        for namespace in [ns for ns, end in list(_resets.items()) if end <= now]:
            _resets.pop(namespace, None)
            try:
                await asyncio.to_thread(reconcile.reconcile_namespace, namespace,
                                        lambda ns=namespace: _list_namespace(ns), _warn, LEDGER_URL,
                                        ledger_service.ledger_owns)
            except Exception:  # retried at the next tick; never let the loop die
                log.exception("period reset of namespace %s failed", namespace)
                _resets[namespace] = now


@kopf.on.startup()
async def start_rollover(memo: kopf.Memo, **_: Any) -> None:
    memo["rollover"] = asyncio.create_task(_rollover_loop())


@kopf.on.cleanup()
async def stop_rollover(memo: kopf.Memo, **_: Any) -> None:
    task = memo.get("rollover")
    if task is not None:
        task.cancel()
