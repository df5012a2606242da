"""`spendwarden operator`: run the control plane."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os


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
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")


def run(args: argparse.Namespace) -> int:
    import kopf

    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    kopf.configure(verbose=args.verbose,
                   log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.PLAIN)
    if args.webhooks:  # controller/admission.py reads its settings from the environment
        os.environ["SPENDWARDEN_WEBHOOK_PORT"] = str(args.webhook_port)
    from . import ledger_service, main  # noqa: F401  (registers the handlers)

    ledger_service.CONFIG = ledger_service.LedgerConfig.from_env()
    ledger_service.CONFIG.port = args.ledger_port
    ledger_service.CONFIG.insecure = args.ledger_insecure
    ledger_service.CONFIG.metrics_port = args.metrics_port
    ledger_service.CONFIG.namespaces = tuple(args.namespace)

    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    asyncio.run(kopf.operator(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=True,
        liveness_endpoint=args.liveness,
    ))
    return 0
