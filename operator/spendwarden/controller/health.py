"""The operator's probe endpoints, served for the whole life of the process (also while it waits as a
standby, when kopf is not running yet):

- liveness (the --liveness URL's path, e.g. /healthz): 200 while the event loop runs, as a standby
  too; 503 only while kopf's startup handlers run (kopf's own endpoint did not answer then either).
- readiness (/readyz on the same port): 200 only once this replica leads and kopf has started, so
  the ledger and webhook Services route to the leader alone.
"""
from __future__ import annotations

import enum
import urllib.parse

from aiohttp import web

READY_PATH = "/readyz"


class Phase(enum.Enum):
    STANDBY = "standby"      # waiting for the leader Lease
    STARTING = "starting"    # leading; kopf's startup handlers run
    SERVING = "serving"      # leading and serving


class HealthServer:
    def __init__(self, url: str):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http":
            raise ValueError(f"--liveness must be an http:// URL, got {url!r}")
        self.host = parts.hostname or "localhost"
        self.port = parts.port or 80
        self.path = parts.path or "/"
        self.phase = Phase.STANDBY
        self._runner: web.AppRunner | None = None

    async def live(self, request: web.Request) -> web.Response:
        ok = self.phase is not Phase.STARTING
        return web.json_response({"phase": self.phase.value}, status=200 if ok else 503)

    async def ready(self, request: web.Request) -> web.Response:
        ok = self.phase is Phase.SERVING
        return web.json_response({"phase": self.phase.value}, status=200 if ok else 503)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(self.path, self.live)
        if self.path != READY_PATH:
            app.router.add_get(READY_PATH, self.ready)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
