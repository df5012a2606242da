"""The operator's composition root: builds every part from the settings and hands each what it needs.

One Runtime per operator process, passed to kopf as the operator's memo (controller/handlers.py
reads it from `memo.runtime`). The parts that serve (the ledger, the scaler) exist only while
started, as before: until then the reconcile sees no ledger and the ledger's endpoints no scaler.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from ..ledger.store import BudgetEntry
from .admission import AdmissionWebhooks
from .gateway import GatewayController, ModeNotes
from .inventory import Inventory
from .ledger_service import LedgerService, start_metrics
from .reconcile import NamespaceReconciler
from .reconcile_loop import ReconcileLoop
from .scaler import Scaler, ScalingEndpoints
from .settings import OperatorSettings

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, settings: OperatorSettings):
        self.settings = settings
        self.inventory = Inventory()
        # Gateway mode (chart gateway.enabled): the shared gateway's configuration, credentials and
        # the tenants' egress; None when the chart did not enable it.
        self.gateway = (GatewayController(settings.gateway, self.inventory, serves=settings.ledger.serves,
                                          excluded=settings.injection.excluded_namespaces)
                        if settings.gateway.enabled else None)
        self.mode_notes = ModeNotes(settings.gateway)  # without it: why a namespace labelled gateway is not
        self.reconciler = NamespaceReconciler(rendered=self.gateway.rendered if self.gateway is not None else None)
        self.loop = ReconcileLoop(settings.reconcile, self.inventory, self.reconciler,
                                  serves=settings.ledger.serves, ledger_owns=self.ledger_owns)
        self.admission = (AdmissionWebhooks(settings.webhooks, settings.injection, self.inventory, settings.gateway)
                          if settings.webhooks.enabled else None)
        self.ledger: LedgerService | None = None   # while it serves
        self.scaler: Scaler | None = None          # while it runs
        self._metrics: Any = None

    # -- what the parts ask of each other

    def ledger_owns(self, namespace: str, name: str) -> bool:
        """For the reconcile (in a thread): whether the ledger keeps this budget's accounts."""
        ledger = self.ledger
        return ledger is not None and ledger.owns(namespace, name)

    def namespace_labels(self, namespace: str) -> Mapping[str, str] | None:
        """For the ledger's gateway-mode trust: a namespace's labels, as the namespace watch has them."""
        return self.gateway.labels_of(namespace) if self.gateway is not None else None

    async def start_gateway(self) -> None:
        if self.gateway is not None:
            await self.gateway.start()

    async def stop_gateway(self) -> None:
        if self.gateway is not None:
            await self.gateway.stop()

    def budgets(self) -> Iterable[BudgetEntry]:
        """The ledger's budget entries, for the scaler."""
        ledger = self.ledger
        return ledger.store.entries.values() if ledger is not None else ()

    def scaler_owns(self, namespace: str, kind: str, name: str) -> bool:
        """For the cut-off: whether the scaler owns the workload's replica count."""
        scaler = self.scaler
        return scaler is not None and scaler.owns(namespace, kind, name)

    # -- lifecycle (kopf's startup and cleanup handlers, in this order)

    async def start_ledger(self) -> None:
        config = self.settings.ledger
        if config.metrics_port:
            self._metrics = start_metrics(config.metrics_port)
        if not config.port:
            log.info("ledger service off (--ledger-port 0)")
            return
        service = LedgerService(config, alerts=self.settings.alerts, scaling=ScalingEndpoints(lambda: self.scaler),
                                cutoff=self.settings.cutoff, replica_owner=self.scaler_owns,
                                gateway=self.settings.gateway, namespace_labels=self.namespace_labels)
        try:
            await service.start()
        except OSError as exc:
            # Not fatal: the reconcile still works, and proxies follow their budget's failMode.
            log.error("cannot serve the ledger on %s:%s: %s", config.addr, config.port, exc)
            return
        self.ledger = service

    async def stop_ledger(self) -> None:
        service, self.ledger = self.ledger, None
        if service is not None:
            await service.stop()
        server, self._metrics = self._metrics, None
        if server is not None:
            server.shutdown()

    def start_scaler(self) -> None:
        scaler = Scaler(interval=self.settings.scaler.interval, status_interval=self.settings.scaler.status_interval,
                        budgets=self.budgets)
        scaler.start()
        self.scaler = scaler

    async def stop_scaler(self) -> None:
        scaler, self.scaler = self.scaler, None
        if scaler is not None:
            await scaler.stop()

    # -- events the parts share

    def route_event(self, namespace: str) -> None:
        """A route of a cut namespace changed: its backends decide what the cut-off denies."""
        ledger = self.ledger
        if ledger is not None and namespace in ledger.cutoff.cut:
            ledger.cutoff.notify(namespace)
