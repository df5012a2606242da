"""Per-backend load of this proxy for the operator's scaler, and what the operator says back.

For every scaled backend (deploymentRef + scaling; key "<ModelRoute name>/<backend name>") the
ledger report carries `backends[key] = {inFlight, queueMs}`: the MOST requests this process had in
flight since its previous report (a burst between two reports still counts) and the longest a
request waited for a replica. Held wake requests count as in flight. The answer's
`backends[key].availableReplicas` tells the proxy a backend is at zero: its next request asks the
operator to wake it (POST /v1/wake), then holds or falls back (server.py).
"""
from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

from .ledger_http import HttpTransport, warn_once

WAKE_PATH = "/v1/wake"


class BackendLoads:
    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.in_flight: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.queue_ms: dict[str, int] = {}
        self.state: dict[str, dict[str, Any]] = {}   # key -> the operator's last answer

    def set_keys(self, keys: set[str]) -> None:
        """The scaled backends of the current configuration (reported even while idle: 0 is news too)."""
        self.keys = set(keys)
        for table in (self.peak, self.queue_ms, self.state):
            for k in [k for k in table if k not in self.keys]:
                del table[k]

    def begin(self, key: str) -> None:
        n = self.in_flight.get(key, 0) + 1
        self.in_flight[key] = n
        if n > self.peak.get(key, 0):
            self.peak[key] = n

    def end(self, key: str) -> None:
        n = self.in_flight.get(key, 0) - 1
        if n > 0:
            self.in_flight[key] = n
        else:
            self.in_flight.pop(key, None)

    def queued(self, key: str, seconds: float) -> None:
        ms = int(seconds * 1000)
        if ms > self.queue_ms.get(key, 0):
            self.queue_ms[key] = ms

    def report(self) -> dict[str, Any]:
        """The report's `backends`; starts the next interval's peaks from what is in flight now."""
        out = {k: {"inFlight": max(self.peak.get(k, 0), self.in_flight.get(k, 0)), "queueMs": self.queue_ms.get(k, 0)}
               for k in sorted(self.keys)}
        self.peak = {k: v for k, v in self.in_flight.items() if k in self.keys}
        self.queue_ms = {}
        return out

    def apply(self, answer: Any) -> None:
        if not isinstance(answer, dict):
            return
        for key, entry in answer.items():
            if key in self.keys and isinstance(entry, dict):
                self.state[key] = entry

    def assume_at_zero(self, key: str) -> None:
        """A connection was refused: treat it as at zero until the operator's next answer says otherwise."""
        if key in self.keys and not (self.state.get(key) or {}).get("conflict"):
            self.state[key] = {**self.state.get(key, {}), "availableReplicas": 0}

    def at_zero(self, key: str) -> bool:
        """Known to have no available replica (unknown: assume it serves, as without an operator)."""
        entry = self.state.get(key)
        if entry is None or entry.get("conflict"):
            return False  # another autoscaler owns it: its business
        available = entry.get("availableReplicas")
        return isinstance(available, int) and available <= 0


class Waker:
    """POST {ledger url}/v1/wake with the pod's token; returns the operator's answer or None."""

    def __init__(self, url: str, timeout: float = 5.0):
        self.transport = HttpTransport(url, timeout, path=WAKE_PATH)

    async def __call__(self, namespace: str, route: str, backend: str) -> dict[str, Any] | None:
        try:
            status, answer = await self.transport({"namespace": namespace, "route": route, "backend": backend})
        except Exception as exc:  # noqa: BLE001 - unreachable: the caller keeps holding or falls back
            warn_once("wake", f"wake of {route}/{backend} failed: {type(exc).__name__}")
            return None
        if status == 200 and answer is not None:
            return answer
        why = str((answer or {}).get("error", ""))[:200]
        warn_once("wake", f"wake of {route}/{backend} answered HTTP {status}: {why}")
        return None

    async def close(self) -> None:
        await self.transport.close()


async def accepts_connections(base_url: str, timeout: float = 1.0) -> bool:
    """Whether the backend's address takes a TCP connection now. A replica the operator reports
    available is not yet reachable through its Service: the EndpointSlice and the node's Service
    rules follow its readiness by up to a second or so, and a request sent into that gap fails."""
    u = urlsplit(base_url)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(u.hostname, port), timeout)
    except (TimeoutError, OSError):
        return False
    writer.close()
    return True
