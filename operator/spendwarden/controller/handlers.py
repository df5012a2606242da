"""Every kopf registration of the operator, on a registry of its own (`register`), each a few lines
that hand the event to a part of the Runtime (controller/runtime.py) found in kopf's memo.

Startup handlers run in the order registered here: the admission webhooks' server, the ledger (and
metrics), the scaler, kopf's own settings, the reconcile and its loops; cleanup handlers likewise.
Several handlers per kind, not one: kopf runs (and logs the failure of) each on its own.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, cast

import kopf

from .. import GROUP
from ..api import modelroute, tokenbudget
from .admission import AdmissionWebhooks
from .bodies import plain
from .runtime import Runtime


def _runtime(memo: Any) -> Runtime:
    return memo.runtime


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


# -- the ledger and the metrics endpoint

async def start_ledger(memo: kopf.Memo, **_: Any) -> None:
    await _runtime(memo).start_ledger()


async def stop_ledger(memo: kopf.Memo, **_: Any) -> None:
    await _runtime(memo).stop_ledger()


async def ledger_observe(event: Mapping[str, Any], body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    service = _runtime(memo).ledger
    if service is not None:
        service.observe(event.get("type"), plain(body))


async def cut_off_routes(namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    _runtime(memo).route_event(cast(str, namespace))  # ModelRoutes are namespaced: kopf always names one


# -- gateway mode

async def start_gateway(memo: kopf.Memo, **_: Any) -> None:
    await _runtime(memo).start_gateway()


async def stop_gateway(memo: kopf.Memo, **_: Any) -> None:
    await _runtime(memo).stop_gateway()


# -- the scaler

async def start_scaler(memo: kopf.Memo, **_: Any) -> None:
    _runtime(memo).start_scaler()


async def stop_scaler(memo: kopf.Memo, **_: Any) -> None:
    await _runtime(memo).stop_scaler()


async def scaler_observe(event: Mapping[str, Any], body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    scaler = _runtime(memo).scaler
    if scaler is not None:
        scaler.observe_route(event.get("type"), plain(body))


# -- the reconcile

async def start_reconciler(memo: kopf.Memo, **_: Any) -> None:
    await _runtime(memo).loop.start()


async def stop_reconciler(memo: kopf.Memo, **_: Any) -> None:
    await _runtime(memo).loop.stop()


async def start_loops(memo: kopf.Memo, **_: Any) -> None:
    _runtime(memo).loop.start_loops()


async def stop_loops(memo: kopf.Memo, **_: Any) -> None:
    _runtime(memo).loop.stop_loops()


async def modelroute_event(event: Mapping[str, Any], body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _runtime(memo).loop.observe(event.get("type"), plain(body))


async def tokenbudget_event(event: Mapping[str, Any], body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _runtime(memo).loop.observe_budget(event.get("type"), plain(body))


def register_admission(registry: kopf.OperatorRegistry, webhooks: AdmissionWebhooks) -> None:
    """The webhooks' handlers; only when enabled (kopf refuses admission handlers without a server)."""
    config = webhooks.settings
    on = kopf.on
    on.startup(id="spendwarden-admission", registry=registry)(webhooks.configure)
    on.cleanup(id="spendwarden-admission", registry=registry)(webhooks.stop)
    on.event("v1", "namespaces", id="namespace-labels", registry=registry)(webhooks.remember_namespace_labels)
    ignore = config.validation_failure_policy == "Ignore"
    on.validate(GROUP, modelroute.PLURAL, id="validate-modelroute", registry=registry,
                operations=["CREATE", "UPDATE"], ignore_failures=ignore)(webhooks.validate_modelroute)
    on.validate(GROUP, tokenbudget.PLURAL, id="validate-tokenbudget", registry=registry,
                operations=["CREATE", "UPDATE"], ignore_failures=ignore)(webhooks.validate_tokenbudget)
    on.mutate("v1", "pods", id="inject-proxy", operations=["CREATE"], registry=registry,
              ignore_failures=config.pod_failure_policy == "Ignore")(webhooks.inject_proxy)


def register(registry: kopf.OperatorRegistry, runtime: Runtime) -> None:
    # A registry of our own has none of the default one's fallback logins: the kubernetes client's
    # configuration (kubeconfig or in-cluster), as kopf's default registry would use.
    kopf.on.login(id="login_via_client", registry=registry, errors=kopf.ErrorsMode.IGNORED)(kopf.login_via_client)
    if runtime.admission is not None:
        register_admission(registry, runtime.admission)
    on = kopf.on
    if runtime.gateway is not None:
        # Gateway mode: the namespaces' labels say which are tenants of the gateway.
        on.event("v1", "namespaces", id="gateway-namespaces", registry=registry)(runtime.gateway.observe_namespace)
        on.startup(id="spendwarden-gateway", registry=registry)(start_gateway)
        on.cleanup(id="spendwarden-gateway", registry=registry)(stop_gateway)
    else:
        # ... and without the gateway, a namespace labelled gateway is told why it is served as sidecar.
        on.event("v1", "namespaces", id="gateway-mode-notes", registry=registry)(runtime.mode_notes.observe_namespace)
    on.event(GROUP, modelroute.PLURAL, id="cut-off-routes", registry=registry)(cut_off_routes)
    on.startup(id="spendwarden-ledger", registry=registry)(start_ledger)
    on.cleanup(id="spendwarden-ledger", registry=registry)(stop_ledger)
    on.event(GROUP, tokenbudget.PLURAL, id="ledger-observe", registry=registry)(ledger_observe)
    on.startup(id="spendwarden-scaler", registry=registry)(start_scaler)
    on.cleanup(id="spendwarden-scaler", registry=registry)(stop_scaler)
    on.event(GROUP, modelroute.PLURAL, id="scaler-observe", registry=registry)(scaler_observe)
    on.startup(registry=registry)(configure)
    on.event(GROUP, modelroute.PLURAL, registry=registry)(modelroute_event)
    on.event(GROUP, tokenbudget.PLURAL, registry=registry)(tokenbudget_event)
    on.startup(registry=registry)(start_reconciler)
    on.cleanup(registry=registry)(stop_reconciler)
    on.startup(registry=registry)(start_loops)
    on.cleanup(registry=registry)(stop_loops)
