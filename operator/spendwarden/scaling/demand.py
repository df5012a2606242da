"""In-flight demand per backend, from the proxies' ledger reports (docs/ledger-protocol.md, `backends`).

Each proxy reports, per scaled backend ("<ModelRoute name>/<backend name>"), the most requests it
had in flight since its previous report (held wake requests included) and the longest queueing
time. The book keeps each proxy's latest numbers; a proxy silent for `ttl` seconds no longer counts
(a killed pod must not keep replicas up). Proxies are keyed by (namespace, proxyId), at most
MAX_PROXIES_PER_NAMESPACE per namespace: a proxyId is visible in a budget's status, and a report of
another namespace naming it must not replace that proxy's demand.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MAX_BACKENDS_PER_REPORT = 256
MAX_PROXIES_PER_NAMESPACE = 1_000  # fresh proxies counted; a new one past this is not


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
    max_proxies: int = MAX_PROXIES_PER_NAMESPACE
    _proxies: dict[str, dict[str, _ProxyLoad]] = field(default_factory=dict)  # namespace -> proxy id ->

    def record(self, proxy_id: str, namespace: str, backends: dict[str, BackendLoad], now: float) -> None:
        proxies = self._proxies.setdefault(namespace, {})
        if proxy_id in proxies or len(proxies) < self.max_proxies:
            proxies[proxy_id] = _ProxyLoad(namespace, now, backends)

    def forget(self, namespace: str, proxy_id: str) -> None:
        self._proxies.get(namespace, {}).pop(proxy_id, None)

    def prune(self, now: float) -> None:
        for ns, proxies in list(self._proxies.items()):
            for pid in [p for p, load in proxies.items() if now - load.at > self.ttl]:
                del proxies[pid]
            if not proxies:
                del self._proxies[ns]

    def load(self, now: float) -> dict[tuple[str, str], BackendLoad]:
        """(namespace, "<route>/<backend>") -> in-flight summed over fresh proxies, longest queue."""
        out: dict[tuple[str, str], BackendLoad] = {}
        for load in (load for proxies in self._proxies.values() for load in proxies.values()):
            if now - load.at > self.ttl:
                continue
            for key, bl in load.backends.items():
                prev = out.get((load.namespace, key))
                out[(load.namespace, key)] = bl if prev is None else BackendLoad(
                    prev.in_flight + bl.in_flight, max(prev.queue_ms, bl.queue_ms))
        return out
