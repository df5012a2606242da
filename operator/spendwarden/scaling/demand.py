"""In-flight demand per backend, from the proxies' ledger reports (docs/ledger-protocol.md, `backends`).

Each proxy reports, per scaled backend ("<ModelRoute name>/<backend name>"), the most requests it
had in flight since its previous report (held wake requests included) and the longest queueing
time. The book keeps each proxy's latest numbers; a proxy silent for `ttl` seconds no longer counts
(a killed pod must not keep replicas up).
"""
from __future__ import annotations

from dataclasses import dataclass, field

MAX_BACKENDS_PER_REPORT = 256


class BackendsError(ValueError):
    """A malformed `backends` object: the message is the 400 answer."""


@dataclass(frozen=True, slots=True)
class BackendLoad:
    in_flight: int
    queue_ms: int


def parse_backends(data: object) -> dict[str, BackendLoad]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BackendsError("backends: must be an object of \"<route>/<backend>\" -> {inFlight, queueMs}")
    if len(data) > MAX_BACKENDS_PER_REPORT:
        raise BackendsError(f"backends: at most {MAX_BACKENDS_PER_REPORT} per report")
    out: dict[str, BackendLoad] = {}
    for key, entry in data.items():
        where = f"backends.{str(key)[:128]}"
        if not isinstance(key, str) or not key or len(key) > 128:
            raise BackendsError(f"{where}: keys must be non-empty strings \"<route>/<backend>\"")
        if not isinstance(entry, dict):
            raise BackendsError(f"{where}: must be an object with inFlight and queueMs")
        values = []
        for name in ("inFlight", "queueMs"):
            v = entry.get(name, 0)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v > 10**9:
                raise BackendsError(f"{where}.{name}: must be a non-negative integer")
            values.append(v)
        out[key] = BackendLoad(*values)
    return out


@dataclass(slots=True)
class _ProxyLoad:
    namespace: str
    at: float
    backends: dict[str, BackendLoad]


@dataclass
class DemandBook:
    ttl: float = 5.0
    _proxies: dict[str, _ProxyLoad] = field(default_factory=dict)

    def record(self, proxy_id: str, namespace: str, backends: dict[str, BackendLoad], now: float) -> None:
        self._proxies[proxy_id] = _ProxyLoad(namespace, now, backends)

    def forget(self, proxy_id: str) -> None:
        self._proxies.pop(proxy_id, None)

    def prune(self, now: float) -> None:
        for pid in [p for p, load in self._proxies.items() if now - load.at > self.ttl]:
            del self._proxies[pid]

    def load(self, now: float) -> dict[tuple[str, str], BackendLoad]:
        """(namespace, "<route>/<backend>") -> in-flight summed over fresh proxies, longest queue."""
        out: dict[tuple[str, str], BackendLoad] = {}
        for load in self._proxies.values():
            if now - load.at > self.ttl:
                continue
            for key, bl in load.backends.items():
                prev = out.get((load.namespace, key))
                out[(load.namespace, key)] = bl if prev is None else BackendLoad(
                    prev.in_flight + bl.in_flight, max(prev.queue_ms, bl.queue_ms))
        return out
