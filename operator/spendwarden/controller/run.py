"""`spendwarden operator`: run the control plane."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .health import HealthServer
    from .settings import OperatorSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--namespace", action="append", default=[],
                        help="Watch only this namespace (repeatable; globs allowed). Default: all namespaces.")
    parser.add_argument("--liveness", default="http://0.0.0.0:8080/healthz",
                        help="Liveness endpoint URL (host, port and path to serve). Default %(default)s.")
    parser.add_argument("--log-format", choices=["json", "plain"], default=os.environ.get("SPENDWARDEN_LOG_FORMAT", "json"),
                        help="Log format (env SPENDWARDEN_LOG_FORMAT). Default json.")
    parser.add_argument("--webhooks", action="store_true", default=bool(os.environ.get("SPENDWARDEN_WEBHOOK_PORT")),
                        help="Serve the admission webhooks (validation, sidecar injection). On when SPENDWARDEN_WEBHOOK_PORT is set.")
    parser.add_argument("--webhook-port", type=int, default=int(os.environ.get("SPENDWARDEN_WEBHOOK_PORT") or 9443),
                        help="HTTPS port of the admission webhooks (env SPENDWARDEN_WEBHOOK_PORT). Default %(default)s.")
    parser.add_argument("--ledger-port", type=int, default=int(os.environ.get("SPENDWARDEN_LEDGER_PORT") or 8081),
                        help="Port of the ledger API the proxies report to (env SPENDWARDEN_LEDGER_PORT); 0 = off. Default %(default)s.")
    parser.add_argument("--ledger-insecure", action="store_true",
                        default=os.environ.get("SPENDWARDEN_LEDGER_INSECURE", "").lower() in ("1", "true", "yes"),
                        help="Accept ledger reports WITHOUT authentication. Standalone experiments only, never in a cluster.")
    parser.add_argument("--metrics-port", type=int, default=int(os.environ.get("SPENDWARDEN_METRICS_PORT") or 9090),
                        help="Port of the Prometheus metrics (env SPENDWARDEN_METRICS_PORT); 0 = off. Default %(default)s.")
    parser.add_argument("--leader-elect", action=argparse.BooleanOptionalAction,
                        default=os.environ.get("SPENDWARDEN_LEADER_ELECT", "").lower() in ("1", "true", "yes"),
                        help="Serve only while holding a coordination.k8s.io Lease, so several replicas can run: "
                             "standbys wait (not ready) and take over when the leader's lease expires. "
                             "Env SPENDWARDEN_LEADER_ELECT. Default off (one local process needs no lease).")
    parser.add_argument("--lease-name", default=os.environ.get("SPENDWARDEN_LEASE_NAME") or "spendwarden-operator",
                        help="Name of the leader Lease (env SPENDWARDEN_LEASE_NAME); operators watching different "
                             "namespaces need different names. Default %(default)s.")
    parser.add_argument("--lease-namespace",
                        default=os.environ.get("SPENDWARDEN_LEASE_NAMESPACE") or os.environ.get("SPENDWARDEN_POD_NAMESPACE") or "default",
                        help="Namespace of the leader Lease (env SPENDWARDEN_LEASE_NAMESPACE, else the pod's "
                             "SPENDWARDEN_POD_NAMESPACE). Default %(default)s.")
    parser.add_argument("--lease-duration", type=float, default=float(os.environ.get("SPENDWARDEN_LEASE_DURATION") or 15),
                        help="Seconds a standby waits, after the lease last changed, before taking over; the leader "
                             "renews every duration*2/15 s and stops serving after duration*2/3 s without a renewal. "
                             "Default %(default)s.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")


def run(args: argparse.Namespace) -> int:
    import kopf

    from .settings import OperatorSettings

    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    settings = OperatorSettings.from_args(args)
    kopf.configure(verbose=settings.verbose,
                   log_format=kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.PLAIN)
    from . import kopf_namespaces

    kopf_namespaces.install()
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    if not settings.verbose:
        # kopf logs each handled event at INFO ("Handler ... succeeded"): three lines per event,
        # tens of thousands on a big cluster. Failures are WARNING/ERROR and still logged.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    asyncio.run(_serve(settings))
    return 0


async def _serve(settings: OperatorSettings) -> None:
    """Probes first; with --leader-elect, wait as a standby until the Lease is ours; then kopf (the
    reconcile, the ledger, the webhooks) runs only while this process leads."""
    import kopf

    from . import handlers
    from .health import HealthServer, Phase
    from .leader import ElectionConfig, LeaderElector, default_identity
    from .runtime import Runtime

    runtime = Runtime(settings)
    registry = kopf.OperatorRegistry()
    handlers.register(registry, runtime)
    health = HealthServer(settings.liveness)
    elector: LeaderElector | None = None
    leader = settings.leader
    if leader.elect:
        elector = LeaderElector(ElectionConfig.for_duration(leader.lease_name, leader.lease_namespace,
                                                            default_identity(leader.identity),
                                                            leader.lease_duration))
    else:
        health.phase = Phase.STARTING
    await health.start()
    try:
        if elector is not None:
            await asyncio.to_thread(elector.acquire)
            health.phase = Phase.STARTING
            elector.start_renewing(on_lost=_fence)
        ready = asyncio.Event()
        started = asyncio.create_task(_mark_serving(ready, health))
        try:
            await kopf.operator(clusterwide=not settings.namespaces, namespaces=list(settings.namespaces),
                                standalone=True, ready_flag=ready, registry=registry, memo=kopf.Memo(runtime=runtime))
        finally:
            started.cancel()
    finally:
        if elector is not None:
            # After kopf's cleanup (the ledger's shutdown flush): the next leader reads what we wrote
            # and need not wait out the lease duration.
            await asyncio.to_thread(elector.release)
        await health.stop()


async def _mark_serving(ready: asyncio.Event, health: HealthServer) -> None:
    from .health import Phase

    await ready.wait()
    health.phase = Phase.SERVING


def _fence(reason: str) -> None:
    """The Lease is lost: another replica may be serving already. Stop at once, without the shutdown
    flush (it could overwrite the new leader's ledger; usage reports are cumulative, so the next
    report to the new leader carries whatever was not persisted). Kubernetes restarts us as a standby."""
    log = logging.getLogger(__name__)
    log.critical("lost the leader lease (%s): exiting so that only one replica serves", reason)
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(3)
