"""Loop detections reported through the ledger (issue #7: "an Event on the budget").

Pure, shared by both sides of the ledger protocol (docs/ledger-protocol.md, `loops`):
- `LoopQueue` (proxy): 429 loop_detected refusals per (route, request-hash prefix) since the last
  report, bounded; `take()` hands the next report at most MAX_PER_REPORT entries;
- `parse_loops` (operator): the optional `loops` field of a report, validated;
- `LoopAggregator` (operator): per (namespace, route) at most one Event per `interval`; refusals in
  between are summed into the next one, so a runaway loop cannot flood the apiserver. Its state is
  keyed and capped per namespace (MAX_ROUTES_PER_NAMESPACE routes, MAX_PROXIES_PER_NAMESPACE proxy
  ids), so one namespace can neither fill a shared cap nor reuse another's proxyId to silence it.

Only hashes travel: never the prompt.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .breakdown import wire_count

MAX_PER_REPORT = 16     # entries in one report; more is a 400
MAX_QUEUED = 64         # distinct (route, request) a proxy remembers between reports; more are dropped
HASH_CHARS = 12         # of the request hash (spend.cache.request_key): enough to tell loops apart
EVENT_INTERVAL = 60.0   # seconds between two LoopDetected Events of one route
MAX_NAME = 253
MAX_SHOWN = 3           # request hashes and pods named in one Event message
MAX_ROUTE_LABELS = 64   # per namespace in the operator's metric; more become OTHER
MAX_ROUTES_PER_NAMESPACE = 256     # routes with refusals not yet announced; more are not announced
MAX_PROXIES_PER_NAMESPACE = 1_000  # last seqs remembered; the least recently seen is forgotten
OTHER = "(other)"


@dataclass(slots=True)
class LoopReport:
    route: str          # ModelRoute name
    model: str          # its alias (spec.model): what TokenBudget.spec.routes names
    request: str        # request-hash prefix
    refused: int        # refusals since the previous report
    max_repeats: int
    window: float       # seconds
    pod: str | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"route": self.route, "model": self.model, "request": self.request,
                               "refused": self.refused, "maxRepeats": self.max_repeats, "windowSeconds": self.window}
        if self.pod:
            out["pod"] = self.pod
        return out


# -- proxy side --------------------------------------------------------------------------------------

class LoopQueue:
    def __init__(self, pod: str | None = None, max_queued: int = MAX_QUEUED):
        self.pod = pod
        self.max_queued = max_queued
        self.dropped = 0
        self._pending: dict[tuple[str, str], LoopReport] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, route: str, model: str, key: str, max_repeats: int, window: float) -> None:
        """One refusal."""
        k = (route, key[:HASH_CHARS])
        got = self._pending.get(k)
        if got is not None:
            got.refused += 1
            got.max_repeats, got.window = max_repeats, window
        elif len(self._pending) < self.max_queued:
            self._pending[k] = LoopReport(route, model, k[1], 1, max_repeats, window, self.pod)
        else:
            self.dropped += 1  # still in the proxy's own metric and access log

    def take(self, limit: int = MAX_PER_REPORT) -> list[dict[str, Any]]:
        """The oldest `limit` entries, removed (the report carrying them is resent until answered)."""
        keys = list(self._pending)[:limit]
        return [self._pending.pop(k).to_wire() for k in keys]


# -- operator side -----------------------------------------------------------------------------------

def _text(value: Any, where: str, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_NAME:
        raise ValueError(f"{where}: must be a non-empty string of at most {MAX_NAME} characters")
    return value


def _count(value: Any, where: str) -> int:
    return wire_count(value, where, minimum=1)


def parse_loops(data: Any, where: str = "loops") -> list[LoopReport]:
    """Validate the optional `loops` field; unknown keys inside an entry are ignored (additive)."""
    if data is None:
        return []
    if not isinstance(data, list):
        raise ValueError(f"{where}: must be a list")
    if len(data) > MAX_PER_REPORT:
        raise ValueError(f"{where}: at most {MAX_PER_REPORT} entries per report")
    out = []
    for i, item in enumerate(data):
        w = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{w}: must be an object")
        request = _text(item.get("request"), f"{w}.request")
        assert request is not None
        if len(request) > 64 or any(c not in "0123456789abcdef" for c in request):
            raise ValueError(f"{w}.request: must be a lowercase hex hash prefix of at most 64 characters")
        window = item.get("windowSeconds")
        if isinstance(window, bool) or not isinstance(window, (int, float)) or not math.isfinite(window) or window <= 0:
            raise ValueError(f"{w}.windowSeconds: must be a positive number")
        out.append(LoopReport(route=_text(item.get("route"), f"{w}.route") or "",
                              model=_text(item.get("model"), f"{w}.model") or "", request=request,
                              refused=_count(item.get("refused"), f"{w}.refused"),
                              max_repeats=_count(item.get("maxRepeats"), f"{w}.maxRepeats"),
                              window=float(window), pod=_text(item.get("pod"), f"{w}.pod", required=False)))
    return out


@dataclass(slots=True)
class LoopNotice:
    """One LoopDetected Event to post on each budget of `namespace` covering `model`."""
    namespace: str
    route: str
    model: str
    refused: int
    message: str


@dataclass(slots=True)
class _Route:
    model: str
    max_repeats: int = 0
    window: float = 0.0
    refused: int = 0                                  # not announced yet
    requests: list[str] = field(default_factory=list)  # the first MAX_SHOWN of them
    pods: list[str] = field(default_factory=list)
    last_event: float = -math.inf


class LoopAggregator:
    def __init__(self, interval: float = EVENT_INTERVAL, max_routes: int = MAX_ROUTES_PER_NAMESPACE,
                 max_proxies: int = MAX_PROXIES_PER_NAMESPACE):
        self.interval = interval
        self.max_routes = max_routes    # per namespace
        self.max_proxies = max_proxies  # per namespace
        self._routes: dict[tuple[str, str], _Route] = {}
        self._route_count: dict[str, int] = {}  # namespace -> its entries in _routes
        # namespace -> proxy id -> last seq whose loops were taken. Per namespace: a proxyId is
        # visible in a budget's status, and another namespace's reports must not advance its seq.
        self._seqs: dict[str, OrderedDict[str, int]] = {}
        self._labels: dict[str, set[str]] = {}

    def accept(self, namespace: str, proxy_id: str, seq: int) -> bool:
        """False for a report already taken in (a retry resends the same seq and loops)."""
        seqs = self._seqs.setdefault(namespace, OrderedDict())
        last = seqs.get(proxy_id)
        if last is not None and seq <= last:
            return False
        seqs[proxy_id] = seq
        seqs.move_to_end(proxy_id)
        if len(seqs) > self.max_proxies:
            seqs.popitem(last=False)
        return True

    def route_label(self, namespace: str, route: str) -> str:
        """The metric's route label, capped per namespace (a proxy could send any name)."""
        seen = self._labels.setdefault(namespace, set())
        if route in seen:
            return route
        if len(seen) >= MAX_ROUTE_LABELS:
            return OTHER
        seen.add(route)
        return route

    def add(self, namespace: str, loop: LoopReport) -> None:
        key = (namespace, loop.route)
        r = self._routes.get(key)
        if r is None:
            count = self._route_count.get(namespace, 0)
            if count >= self.max_routes:
                return  # still counted in the metric; only this namespace goes without Events
            self._route_count[namespace] = count + 1
            r = self._routes[key] = _Route(loop.model)
        r.model, r.max_repeats, r.window = loop.model, loop.max_repeats, loop.window
        r.refused += loop.refused
        if loop.request not in r.requests and len(r.requests) < MAX_SHOWN:
            r.requests.append(loop.request)
        if loop.pod and loop.pod not in r.pods and len(r.pods) < MAX_SHOWN:
            r.pods.append(loop.pod)

    def due(self, now: float) -> list[LoopNotice]:
        """Routes with refusals not announced yet whose last Event is at least `interval` old."""
        out = []
        for key, r in list(self._routes.items()):
            if now - r.last_event < self.interval:
                continue
            if not r.refused:
                del self._routes[key]  # quiet for a whole interval: forget it
                self._route_count[key[0]] -= 1
                if not self._route_count[key[0]]:
                    del self._route_count[key[0]]
                continue
            out.append(LoopNotice(key[0], key[1], r.model, r.refused, _message(key[1], r)))
            r.last_event, r.refused, r.requests, r.pods = now, 0, [], []
        return out


def _message(route: str, r: _Route) -> str:
    pods = f" from pod(s) {', '.join(r.pods)}" if r.pods else ""
    text = (f"route {route} (model {r.model}): {r.refused} request(s) refused with 429 loop_detected{pods}: "
            f"the same request (hash {', '.join(r.requests)}) was sent more than {r.max_repeats} times within "
            f"{r.window:g}s. An agent is probably repeating itself; see spec.loopBreaker of ModelRoute {route}.")
    return text[:1000]


__all__ = ["LoopReport", "LoopQueue", "LoopAggregator", "LoopNotice", "parse_loops", "MAX_PER_REPORT",
           "MAX_QUEUED", "HASH_CHARS", "EVENT_INTERVAL"]
