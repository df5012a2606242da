"""An aiohttp app served on 127.0.0.1 from a daemon thread with its own event loop, so that sync and
async tests (and benchmarks) can run small servers without blocking their own loop."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

from aiohttp import web


class BackgroundServer:
    def __init__(self, name: str):
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, make_app: Callable[[], Awaitable[web.Application]], port: int,
              on_stop: Callable[[], Awaitable[None]] | None = None) -> None:
        """Serve the app that `make_app` builds (inside the server's loop) on `port`; returns once
        it listens. `on_stop` runs in the loop before the app is cleaned up."""
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            runner = web.AppRunner(loop.run_until_complete(make_app()), access_log=None)
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start())
            ready.set()
            loop.run_forever()
            if on_stop is not None:
                loop.run_until_complete(on_stop())
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, name=self.name, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"{self.name} did not start on port {port}")

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = self._thread = None
