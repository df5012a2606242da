"""Everything the operator is told, read once at start from the command line and the environment.

The command line (controller/run.py's flags, each defaulting to its SPENDWARDEN_* variable) wins
over the environment; every other SPENDWARDEN_* variable the operator reads is read here, and
nothing in controller/ reads os.environ after this (the apiserver's own KUBERNETES_SERVICE_HOST
aside, which cutoff.apiserver_cidrs reads when the cut-off starts). The parts are the settings classes of the
modules that use them, so each stays testable with a plain mapping.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from ..prices import pins
from ..render.cutoff import CutOffSettings
from ..render.gateway import GatewaySettings
from ..render.injection import InjectionSettings
from .alerts import WebhookSettings as AlertSettings
from .ledger_config import LedgerConfig
from .webhooks import WebhookSettings


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    return float(env.get(name) or default)


@dataclass(frozen=True)
class ReconcileSettings:
    workers: int = 16                   # reconciles at once: each mostly waits for the apiserver
    rollover_interval: float = 15.0     # period-reset check, and the retry delay of a failed reconcile
    drift_interval: float = 60.0        # proxy ConfigMaps deleted or edited by hand
    prices_poll_interval: float = 5.0   # the pinned-prices file (a ConfigMap volume changes without events)
    prices_file: str | None = None
    ledger_url: str | None = None       # rendered into the proxies' configuration

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ReconcileSettings:
        return cls(workers=int(env.get("SPENDWARDEN_RECONCILE_WORKERS") or 16),
                   rollover_interval=float(env.get("SPENDWARDEN_ROLLOVER_INTERVAL", "15")),
                   drift_interval=float(env.get("SPENDWARDEN_DRIFT_INTERVAL", "60")),
                   prices_poll_interval=float(env.get("SPENDWARDEN_PRICES_POLL_INTERVAL", "5")),
                   prices_file=env.get(pins.ENV) or None,
                   ledger_url=env.get("SPENDWARDEN_LEDGER_URL") or None)


@dataclass(frozen=True)
class ScalerSettings:
    interval: float = 1.0
    status_interval: float = 30.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ScalerSettings:
        return cls(interval=_float(env, "SPENDWARDEN_SCALE_INTERVAL", 1.0),
                   status_interval=_float(env, "SPENDWARDEN_SCALE_STATUS_INTERVAL", 30.0))


@dataclass(frozen=True)
class CutOffConfig:
    resync: float = 30.0  # cut namespaces are re-applied this often
    # The apiserver's addresses are added at start (they need a DNS lookup): CutOffController.start.
    settings: CutOffSettings = field(default_factory=CutOffSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> CutOffConfig:
        """The operator's own namespace (SPENDWARDEN_POD_NAMESPACE, from the chart) and kube-system are
        never denied; SPENDWARDEN_CUTOFF_CLUSTER_CIDRS (chart value cutOff.clusterCIDRs) is comma-separated."""
        protected = {"kube-system", *filter(None, [env.get("SPENDWARDEN_POD_NAMESPACE")])}
        cidrs = tuple(c.strip() for c in (env.get("SPENDWARDEN_CUTOFF_CLUSTER_CIDRS") or "").split(",") if c.strip())
        return cls(resync=float(env.get("SPENDWARDEN_CUTOFF_RESYNC") or 30),
                   settings=CutOffSettings(protected_namespaces=frozenset(protected), cluster_cidrs=cidrs))


@dataclass(frozen=True)
class LeaderSettings:
    elect: bool = False
    lease_name: str = "spendwarden-operator"
    lease_namespace: str = "default"
    lease_duration: float = 15.0
    identity: str | None = None  # SPENDWARDEN_POD_NAME; None: leader.default_identity makes one


@dataclass(frozen=True)
class OperatorSettings:
    namespaces: tuple[str, ...] = ()    # --namespace patterns; empty: all namespaces
    liveness: str = "http://0.0.0.0:8080/healthz"
    log_format: str = "json"
    verbose: bool = False
    leader: LeaderSettings = field(default_factory=LeaderSettings)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    reconcile: ReconcileSettings = field(default_factory=ReconcileSettings)
    cutoff: CutOffConfig = field(default_factory=CutOffConfig)
    scaler: ScalerSettings = field(default_factory=ScalerSettings)
    webhooks: WebhookSettings = field(default_factory=lambda: WebhookSettings(enabled=False))
    injection: InjectionSettings = field(default_factory=lambda: InjectionSettings.from_env({}))
    gateway: GatewaySettings = field(default_factory=GatewaySettings)  # gateway mode off unless the chart enables it

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: Mapping[str, str] | None = None) -> OperatorSettings:
        env = dict(os.environ if env is None else env)
        if args.webhooks:  # --webhooks: the port from the command line, as SPENDWARDEN_WEBHOOK_PORT would
            env["SPENDWARDEN_WEBHOOK_PORT"] = str(args.webhook_port)
        namespaces = tuple(args.namespace)
        ledger = replace(LedgerConfig.from_env(env), port=args.ledger_port, insecure=args.ledger_insecure,
                         metrics_port=args.metrics_port, namespaces=namespaces)
        return cls(namespaces=namespaces, liveness=args.liveness, log_format=args.log_format, verbose=args.verbose,
                   leader=LeaderSettings(elect=args.leader_elect, lease_name=args.lease_name,
                                         lease_namespace=args.lease_namespace, lease_duration=args.lease_duration,
                                         identity=env.get("SPENDWARDEN_POD_NAME") or None),
                   ledger=ledger, alerts=AlertSettings.from_env(env), reconcile=ReconcileSettings.from_env(env),
                   cutoff=CutOffConfig.from_env(env), scaler=ScalerSettings.from_env(env),
                   webhooks=WebhookSettings.from_env(env), injection=InjectionSettings.from_env(env),
                   gateway=GatewaySettings.from_env(env))
