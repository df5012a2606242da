"""kopf registration: every handler is a few lines that call reconcile/render.

Both kinds are watched with raw event handlers (no per-object handler state, so nothing is
written into users' objects besides status) and in-memory indexes, so a namespace render needs no
API list call. Any event in a namespace re-renders the whole namespace: a route's validity can
depend on its siblings (duplicate aliases), and the ConfigMap is one for all of them.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any

import kopf

from .. import GROUP
from ..api import modelroute, tokenbudget
from . import admission  # noqa: F401  (webhooks; registers handlers only when enabled)
from . import reconcile
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
        reconcile.reconcile_namespace(namespace, snapshot, _warn, LEDGER_URL)
    except Exception:
        with _pending_lock:
            _pending.discard(namespace)
        raise


@kopf.on.event(GROUP, modelroute.PLURAL)
def modelroute_event(namespace: str, routes_by_namespace: kopf.Index, budgets_by_namespace: kopf.Index, **_: Any) -> None:
    _reconcile(namespace, routes_by_namespace, budgets_by_namespace)


@kopf.on.event(GROUP, tokenbudget.PLURAL)
def tokenbudget_event(namespace: str, routes_by_namespace: kopf.Index, budgets_by_namespace: kopf.Index, **_: Any) -> None:
    _reconcile(namespace, routes_by_namespace, budgets_by_namespace)


@kopf.timer(GROUP, tokenbudget.PLURAL, interval=30, initial_delay=30)
def budget_period_tick(namespace: str, routes_by_namespace: kopf.Index, budgets_by_namespace: kopf.Index, **_: Any) -> None:
    """Moves status to the next period at the reset; a no-op write-wise otherwise."""
    _reconcile(namespace, routes_by_namespace, budgets_by_namespace)
