"""What the proxy's stage mixins (reload.py, upstream.py, relay.py, access_log.py) share: the
attributes Proxy.__init__ (server.py) sets, declared once here so each stage is type-checked
against them."""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import IO, Any

import aiohttp

from ..routing import tokens as tok
from .backend_load import BackendLoads, Waker
from .budgets import BudgetBook
from .calibration import PromptCalibration
from .config import Compiled
from .ledger_client import LedgerClient
from .limits import BodyMemory
from .metrics import Metrics


class ProxyState:
    config_path: str
    namespace_arg: str | None
    max_answer: int
    max_body: int
    body_timeout: float
    bodies: BodyMemory
    default_max_tokens: int
    poll_interval: float
    secret_reader: Callable[[str, str], str | None]  # a backend's API key by (Secret, key)
    book: BudgetBook
    metrics: Metrics
    compiled: Compiled | None
    session: aiohttp.ClientSession | None
    ledger: LedgerClient | None
    loads: BackendLoads
    calibration: PromptCalibration
    waker: Waker | None
    _fingerprint: str | None
    _fingerprint_file: str | None = None
    _timeouts: dict[tuple[float, bool], aiohttp.ClientTimeout]
    _encoder_future: asyncio.Future[tok.Encoder] | None
    _out: IO[bytes]
    shared: Any  # server.Shared in a gateway, None in a sidecar
    _tasks: list[asyncio.Task]
    _started: bool
    _flush_scheduled: bool = False
