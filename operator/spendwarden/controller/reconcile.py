"""Namespace reconciliation: the namespace's CRs -> one ConfigMap and every CR's status.

Decisions are pure (render/); this module only sequences the I/O. Per-namespace locks make the
last reconcile see the newest state, whichever handler triggered it.
"""
from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from ..api import modelroute, tokenbudget
from ..api.proxyconfig import CONFIGMAP_NAME, ProxyConfig
from ..prices import pins
from ..prices.resolve import PriceBook
from ..render.proxyconfig import CONFIG_HASH, configmap_manifest, render_proxy_config, validate_spec
from ..render.status import invalid_status, modelroute_status, reconcile_fields, status_differs, tokenbudget_status
from . import kube

log = logging.getLogger(__name__)

# (object, message) -> None; posts a Warning Event. Injected by the kopf layer.
WarnFn = Callable[[dict[str, Any], str, str], None]


# (namespace, budget name) -> whether the in-process ledger keeps that budget's accounts.
LedgerOwnsFn = Callable[[str, str], bool]

# (namespace, its rendered configuration or None when it has no CRs) -> None; called in the reconcile thread.
RenderedFn = Callable[[str, ProxyConfig | None], None]


def inputs_key(objects: Iterable[dict[str, Any]]) -> tuple:
    """What a namespace's render and statuses depend on: every object's identity, spec generation
    and deletion, and a budget's usage while the reconcile derives its percentages from it (not once
    the ledger keeps its accounts). Our own status writes and the ledger's flushes leave it unchanged."""
    def usage(o: dict[str, Any]) -> str:
        status = o.get("status") or {}
        used = status.get("used") or {}
        if o["kind"] != tokenbudget.KIND or status.get("ledger") or not any(v not in (0, "0") for v in used.values()):
            return ""  # the zeros the reconcile itself writes are no news
        return repr(used)
    return tuple(sorted((o["kind"], o["metadata"]["name"], o["metadata"].get("uid"), o["metadata"].get("generation"),
                         o["metadata"].get("deletionTimestamp") or "", usage(o)) for o in objects))


def _key(routes: list[dict], budgets: list[dict], prices: PriceBook) -> tuple:
    # The prices count as an input: new pinned prices re-render every namespace.
    return inputs_key(routes + budgets) + (prices.key,)


class NamespaceReconciler:
    """Renders and applies namespaces, remembering what each one's last complete reconcile saw and
    applied (one per operator: controller/runtime.py makes it)."""

    def __init__(self, rendered: RenderedFn | None = None) -> None:
        # Told each namespace's newest configuration (None: it has no CRs left): the gateway's copy.
        self.rendered = rendered
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._done: dict[str, tuple] = {}  # namespace -> inputs_key of its last complete reconcile
        self._hashes: dict[str, str] = {}  # namespace -> config hash of the ConfigMap its last reconcile applied

    def up_to_date(self, namespace: str, snapshot: Callable[[], tuple[list[dict], list[dict]]],
                   prices: PriceBook | None = None) -> bool:
        """Whether the last complete reconcile had these inputs: lets the event path skip a ledger
        flush's echo without a trip to the reconcile threads (hundreds a second under ledger load)."""
        routes, budgets = snapshot()
        return self._done.get(namespace) == _key(routes, budgets, prices or pins.current())

    def reconcile_namespace(self, namespace: str, snapshot: Callable[[], tuple[list[dict], list[dict]]],
                            warn: WarnFn, ledger_url: str | None = None,
                            ledger_owns: LedgerOwnsFn | None = None, only_if_changed: bool = False,
                            prices: PriceBook | None = None) -> dict[str, Any]:
        """Render and apply one namespace. `snapshot` returns (routes, budgets) as of now.

        only_if_changed: skip it when the inputs are those of this process's last complete reconcile of
        the namespace (the event path: most events are status writes, and each would otherwise cost an
        apiserver read and a render). Period resets pass False: they change status with the same inputs.
        prices: pins and catalog for unset prices; default: the process's (prices/pins.py current).
        """
        prices = prices or pins.current()
        with self._locks[namespace]:
            routes, budgets = snapshot()
            key = _key(routes, budgets, prices)
            if only_if_changed and self._done.get(namespace) == key:
                return {"configmap": "skipped", "problems": []}
            self._done.pop(namespace, None)  # set again only once this reconcile completed
            live_routes = [r for r in routes if not r["metadata"].get("deletionTimestamp")]
            live_budgets = [b for b in budgets if not b["metadata"].get("deletionTimestamp")]
            result = render_proxy_config(namespace, live_routes, live_budgets, ledger_url, prices)
            if live_routes or live_budgets:
                manifest = configmap_manifest(result.config, live_routes + live_budgets)
                outcome = kube.apply_configmap(manifest)
                self._hashes[namespace] = manifest["metadata"]["annotations"][CONFIG_HASH]  # of the data applied
            else:
                self._hashes.pop(namespace, None)
                # Garbage collection removes it too; deleting now makes proxies stop at once.
                kube.delete_configmap(namespace, CONFIGMAP_NAME)
                outcome = "deleted"
            if self.rendered is not None:
                self.rendered(namespace, result.config if live_routes or live_budgets else None)
            now = datetime.now(UTC)
            for obj in live_routes + live_budgets:
                _update_status(obj, result.problem_for(obj["kind"], obj["metadata"]["name"]), now, warn, ledger_owns,
                               result.prices.get(obj["metadata"]["name"]) if obj["kind"] == modelroute.KIND else None)
            if live_routes or live_budgets:
                self._done[namespace] = key
            log.info("namespace reconciled", extra={"namespace": namespace, "configmap": outcome,
                                                    "routes": len(result.config.routes), "budgets": len(result.config.budgets),
                                                    "problems": len(result.problems)})
            return {"configmap": outcome, "problems": [p.message for p in result.problems]}

    def drifted(self, present: dict[str, str]) -> list[str]:
        """Namespaces whose ConfigMap is gone or was changed by someone else since we applied it, given
        `present`: namespace -> render.proxyconfig.config_hash of the live ConfigMap's data. They are forgotten, so their
        next reconcile applies again even though their CRs did not change."""
        out = [ns for ns, want in list(self._hashes.items()) if present.get(ns) != want]
        for ns in out:
            self._done.pop(ns, None)
            self._hashes.pop(ns, None)
        return out


def _update_status(obj: dict[str, Any], problem: Any, now: datetime, warn: WarnFn,
                   ledger_owns: LedgerOwnsFn | None = None, prices: list[dict[str, Any]] | None = None) -> None:
    kind, name, ns = obj["kind"], obj["metadata"]["name"], obj["metadata"]["namespace"]
    plural = modelroute.PLURAL if kind == modelroute.KIND else tokenbudget.PLURAL
    # The ledger owns the usage fields once it keeps the budget's accounts: its persisted state in
    # status.ledger says so across restarts, `ledger_owns` before its first write lands.
    owned = kind == tokenbudget.KIND and (bool((obj.get("status") or {}).get("ledger"))
                                          or (ledger_owns is not None and ledger_owns(ns, name)))
    if problem is not None:
        desired = invalid_status(obj, problem.message, now, problem.reason)
        if kind == tokenbudget.KIND:
            desired = reconcile_fields(desired, owned)
        previous = _ready_message(obj.get("status"))
        if previous != problem.message:
            warn(obj, problem.reason, problem.message)
    else:
        spec, _ = validate_spec(kind, obj["spec"])
        desired = (modelroute_status(obj, spec, now, prices) if kind == modelroute.KIND
                   else tokenbudget_status(obj, spec, now, ledger_owned=owned))
    if status_differs(obj.get("status"), desired):
        kube.patch_status(plural, ns, name, desired)


def _ready_message(status: dict[str, Any] | None) -> str | None:
    for cond in (status or {}).get("conditions", []):
        if cond.get("type") == "Ready" and cond.get("status") == "False":
            return cond.get("message")
    return None
