"""`spendwarden gateway`: run the shared gateway (proxy/gateway.py), in its Deployment or by hand."""
from __future__ import annotations

import argparse
import os
import sys

from .run import add_limit_arguments, listen_until_stopped
from .run import run as run_process


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config-dir", required=True,
                        help="One rendered configuration per tenant namespace, <namespace>.json (the operator's "
                             "ConfigMap spendwarden-gateway-config); re-read as it changes.")
    parser.add_argument("--secrets-dir", required=True,
                        help="The tenants' API keys, <namespace>_<secret>_<key> (the operator's Secret "
                             "spendwarden-gateway-credentials).")
    parser.add_argument("--port", type=int, default=int(os.environ.get("SPENDWARDEN_PROXY_PORT", 8787)))
    parser.add_argument("--host", default=os.environ.get("SPENDWARDEN_PROXY_HOST", "0.0.0.0"))
    parser.add_argument("--metrics-port", type=int, default=int(os.environ.get("SPENDWARDEN_METRICS_PORT", 9464)),
                        help="Prometheus /metrics and /healthz port (0 disables).")
    parser.add_argument("--metrics-host", default=os.environ.get("SPENDWARDEN_METRICS_HOST", "0.0.0.0"))
    parser.add_argument("--kubeconfig", default=os.environ.get("SPENDWARDEN_GATEWAY_KUBECONFIG"),
                        help="For TokenReview; default: the Pod's own ServiceAccount (in-cluster).")
    parser.add_argument("--review-ttl", type=float, default=_env_float("SPENDWARDEN_GATEWAY_REVIEW_TTL", 30),
                        help="Seconds a reviewed token is trusted without another TokenReview (at most 60).")
    for scope, rate, burst in (("namespace", 50, 100), ("serviceaccount", 20, 40)):
        env = f"SPENDWARDEN_GATEWAY_{scope.upper()}"
        parser.add_argument(f"--{scope}-rate", type=float, default=_env_float(f"{env}_RATE", rate),
                            help=f"Requests per second per {scope} and gateway replica (0: no limit).")
        parser.add_argument(f"--{scope}-burst", type=int, default=int(_env_float(f"{env}_BURST", burst)),
                            help=f"Requests a {scope} may send at once above its rate.")
    add_limit_arguments(parser)


async def serve(args: argparse.Namespace) -> int:
    from ..tokenreview import TokenReviewer
    from .gateway import Gateway, kube_authentication
    from .ratelimit import Rate, TenantLimits
    from .server import raise_nofile_limit

    raise_nofile_limit()
    try:
        limits = TenantLimits(Rate(args.namespace_rate, args.namespace_burst),
                              Rate(args.serviceaccount_rate, args.serviceaccount_burst))
    except ValueError as exc:
        print(f"spendwarden gateway: {exc}", file=sys.stderr)
        return 2
    if not os.path.isdir(args.config_dir):
        print(f"spendwarden gateway: --config-dir {args.config_dir} is not a directory", file=sys.stderr)
        return 2
    api = kube_authentication(args.kubeconfig)
    try:
        # Now, not at the first request: the client's import is large, and done before the process
        # freezes what it has built (run.py), it stays out of the garbage collector's way; and a
        # gateway that cannot reach the apiserver's configuration says so at start.
        api()
    except Exception as exc:  # noqa: BLE001 - any configuration error: the reason, and exit
        print(f"spendwarden gateway: no apiserver configuration for TokenReview ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return 2
    gateway = Gateway(args.config_dir, args.secrets_dir, TokenReviewer(api, ttl=args.review_ttl), limits,
                      proxy_options={"max_body": args.max_body_bytes, "default_max_tokens": args.default_max_tokens,
                                     "body_timeout": args.body_timeout, "max_answer": args.max_response_bytes,
                                     "body_memory": args.max_buffered_bytes})
    return await listen_until_stopped(gateway.app(args.max_body_bytes), gateway.metrics_app(), args, "gateway")


def run(args: argparse.Namespace) -> int:
    return run_process(args, serve)
