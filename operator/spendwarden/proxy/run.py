"""`spendwarden proxy`: run the data plane (sidecar or standalone)."""
from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from .limits import (
    DEFAULT_BODY_MEMORY,
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEAD_TIMEOUT,
    DEFAULT_MAX_ANSWER,
    UNCOUNTED_BODY_BYTES,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="ProxyConfig (JSON/YAML) or a YAML stream of ModelRoute/TokenBudget manifests; "
                             "reloaded when it changes.")
    parser.add_argument("--port", type=int, default=int(os.environ.get("SPENDWARDEN_PROXY_PORT", 8787)))
    parser.add_argument("--host", default=os.environ.get("SPENDWARDEN_PROXY_HOST", "127.0.0.1"))
    parser.add_argument("--metrics-port", type=int, default=int(os.environ.get("SPENDWARDEN_METRICS_PORT", 9464)),
                        help="Prometheus /metrics port (0 disables).")
    parser.add_argument("--metrics-host", default=os.environ.get("SPENDWARDEN_METRICS_HOST", "0.0.0.0"))
    parser.add_argument("--state-file", default=os.environ.get("SPENDWARDEN_STATE_FILE"),
                        help="Where budget usage is kept across restarts (standalone). Default: not persisted.")
    parser.add_argument("--namespace", default=os.environ.get("SPENDWARDEN_NAMESPACE"),
                        help="Namespace for attribution (default: from the configuration).")
    add_limit_arguments(parser)


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """The request limits and logging, the same for a sidecar and the gateway."""
    parser.add_argument("--max-body-bytes", type=int,
                        default=int(os.environ.get("SPENDWARDEN_MAX_BODY_BYTES", 8 * 1024 * 1024)),
                        help="Larger request bodies get 413 (default 8 MiB).")
    parser.add_argument("--head-timeout", type=float,
                        default=float(os.environ.get("SPENDWARDEN_HEAD_TIMEOUT", DEFAULT_HEAD_TIMEOUT)),
                        help="Seconds a client has to send a request head, from the connection's start or "
                             "the request's first byte; later: 408 and the connection is closed (default "
                             f"{DEFAULT_HEAD_TIMEOUT:g}; 0 disables).")
    parser.add_argument("--body-timeout", type=float,
                        default=float(os.environ.get("SPENDWARDEN_BODY_TIMEOUT", DEFAULT_BODY_TIMEOUT)),
                        help="Seconds a client has to send a request body, from the end of its head; later: "
                             f"408 and the connection is closed (default {DEFAULT_BODY_TIMEOUT:g}; 0 disables).")
    parser.add_argument("--max-buffered-bytes", type=int,
                        default=int(os.environ.get("SPENDWARDEN_MAX_BUFFERED_BYTES", DEFAULT_BODY_MEMORY)),
                        help="Request bodies held in memory at once, across connections, not counting the "
                             f"first {UNCOUNTED_BODY_BYTES // 1024} KiB of each; a body beyond it gets 503 and "
                             f"Retry-After (default {DEFAULT_BODY_MEMORY // 2**20} MiB).")
    parser.add_argument("--max-response-bytes", type=int,
                        default=int(os.environ.get("SPENDWARDEN_MAX_RESPONSE_BYTES", DEFAULT_MAX_ANSWER)),
                        help="Largest non-streamed upstream answer (and stream event) read; a larger one gets "
                             "502 and, when the upstream billed it, the request's reservation is charged "
                             f"(default {DEFAULT_MAX_ANSWER // 2**20} MiB).")
    parser.add_argument("--default-max-tokens", type=int,
                        default=int(os.environ.get("SPENDWARDEN_DEFAULT_MAX_TOKENS", 4096)),
                        help="Output cap sent upstream when the client gave none, the route has no "
                             "maxTokens and a budget needs a worst case (default 4096).")
    parser.add_argument("--log-level", default=os.environ.get("SPENDWARDEN_LOG_LEVEL", "INFO"))


async def serve(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .server import Proxy, raise_nofile_limit

    raise_nofile_limit()
    try:
        proxy = Proxy(args.config, namespace=args.namespace, state_file=args.state_file,
                      max_body=args.max_body_bytes, default_max_tokens=args.default_max_tokens,
                      body_timeout=args.body_timeout, body_memory=args.max_buffered_bytes,
                      max_answer=args.max_response_bytes)
    except ConfigError as exc:
        print(f"spendwarden proxy: {exc}", file=sys.stderr)
        return 2
    if not args.state_file and proxy.book.states and not (proxy.compiled and proxy.compiled.source.ledger.url):
        logging.getLogger("spendwarden.proxy").warning(
            "no --state-file: budget usage is kept in memory only and lost on restart")
    return await listen_until_stopped(proxy.app(), proxy.metrics_app(), args, "proxy")


async def listen_until_stopped(app: Any, metrics_app: Any, args: argparse.Namespace, what: str) -> int:
    """Serve `app` on --host/--port and `metrics_app` on the metrics port until SIGTERM/SIGINT."""
    from aiohttp import web

    from .limits import GuardedAppRunner

    runners: list[web.AppRunner] = []
    try:
        runner = GuardedAppRunner(app, head_timeout=args.head_timeout, access_log=None,
                                  handle_signals=False, shutdown_timeout=10)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, args.host, args.port, backlog=2048, reuse_address=True).start()
        if args.metrics_port:
            mrunner = web.AppRunner(metrics_app, access_log=None, handle_signals=False)
            await mrunner.setup()
            runners.append(mrunner)
            await web.TCPSite(mrunner, args.metrics_host, args.metrics_port, reuse_address=True).start()
    except OSError as exc:
        print(f"spendwarden {what}: cannot listen: {exc}", file=sys.stderr)
        for r in reversed(runners):
            await r.cleanup()
        return 1
    # Everything imported and built so far lives as long as the process: keep it out of the cyclic
    # GC's generations, and collect young objects less often (fewer, shorter pauses: better p99).
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
    logging.getLogger(f"spendwarden.{what}").info(
        "listening on http://%s:%d (metrics on :%s)", args.host, args.port, args.metrics_port or "off")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for r in reversed(runners):
        await r.cleanup()
    return 0


class ParserErrorRedactor(logging.Filter):
    """aiohttp logs a request it cannot parse with the offending bytes in the exception's message (the
    header line, `Authorization: Bearer sk-...` included; the request line, query included). Such a
    record keeps only the kind of error: the text of that message up to its first colon or quote."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        from .limits import parser_error_kind

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg, record.args = "refused a malformed request from %s with %s: %s", (
                record.args[0] if isinstance(record.args, tuple) and record.args else "?", exc.code,
                parser_error_kind(exc))
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"  # the client's error, not ours
        return True


def run(args: argparse.Namespace, serve: Callable[[argparse.Namespace], Coroutine[Any, Any, int]] = serve) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.server").addFilter(ParserErrorRedactor())
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(serve(args))
    return uvloop.run(serve(args))
