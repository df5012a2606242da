"""Leader election on a coordination.k8s.io/v1 Lease: only one operator replica serves at a time.

The rules are client-go's (k8s.io/client-go/tools/leaderelection), so they behave the way cluster
operators expect:
- Every write is a replace carrying the resourceVersion that was read (optimistic concurrency): of
  two candidates racing for the same Lease, the apiserver lets exactly one win (409 for the other).
- A Lease held by another identity is taken over only after this candidate has watched it NOT change
  for leaseDurationSeconds, measured on this process's own monotonic clock. The renewTime written
  by the holder is never compared with our wall clock, so clock skew between nodes cannot shorten
  the wait.
- The holder renews every `retry_period`; if it cannot renew for `renew_deadline` (shorter than the
  lease duration) it must stop serving at once (fencing): `LeaderElector.renew_forever` then calls
  `on_lost`, and the operator exits non-zero so Kubernetes restarts it as a standby.
- A holder that shuts down cleanly releases the Lease (empty holder), so a standby takes over within
  one retry period instead of a whole lease duration.

`decide` is the pure core; `LeaderElector` adds the apiserver I/O. Renewal runs in its own thread
with its own API client, so a busy event loop or a saturated connection pool cannot delay it.
"""
from __future__ import annotations

import enum
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from . import kube

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseRecord:
    """The fields of a Lease that decide who may hold it."""
    holder: str            # "" when released
    duration: float        # leaseDurationSeconds
    renew_time: str        # as written by the holder; only compared for change, never as a time
    transitions: int
    resource_version: str


@dataclass(frozen=True)
class Observation:
    """A candidate's memory: which record it saw, and when (its own monotonic clock) it first saw it."""
    record: LeaseRecord
    seen_at: float


class Action(enum.Enum):
    CREATE = "create"      # no Lease yet: create it holding it
    RENEW = "renew"        # ours: write a fresh renewTime
    ACQUIRE = "acquire"    # released, or expired on our clock: take it (transitions + 1)
    WAIT = "wait"          # held by a live leader


def _same(a: LeaseRecord, b: LeaseRecord) -> bool:
    return (a.holder, a.renew_time, a.transitions, a.resource_version) == (b.holder, b.renew_time, b.transitions, b.resource_version)


def decide(current: LeaseRecord | None, me: str, observed: Observation | None, now: float) -> tuple[Action, Observation | None]:
    """What to do with the Lease as just read, and the observation to keep for the next round."""
    if current is None:
        return Action.CREATE, None
    if observed is None or not _same(observed.record, current):
        observed = Observation(current, now)  # it changed: the holder is alive, restart the clock
    if current.holder == me:
        return Action.RENEW, observed
    if not current.holder:
        return Action.ACQUIRE, observed
    if now - observed.seen_at >= current.duration:
        return Action.ACQUIRE, observed
    return Action.WAIT, observed


def lease_body(name: str, namespace: str, me: str, duration: float, now: datetime, previous: LeaseRecord | None,
               acquire_time: str | None = None, release: bool = False) -> dict[str, Any]:
    """The Lease to write: a renewal keeps acquireTime, a takeover counts a transition."""
    stamp = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    taking_over = previous is None or previous.holder != me
    spec = {
        "holderIdentity": "" if release else me,
        "leaseDurationSeconds": max(1, round(duration)),
        "acquireTime": stamp if taking_over or not acquire_time else acquire_time,
        "renewTime": stamp,
        "leaseTransitions": (previous.transitions if previous else 0) + (1 if previous and taking_over else 0),
    }
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if previous is not None:
        metadata["resourceVersion"] = previous.resource_version
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata, "spec": spec}


def default_identity(pod_name: str | None = None) -> str:
    """The pod name in a cluster (SPENDWARDEN_POD_NAME: a restarted container resumes its own Lease at
    once); elsewhere host, pid and a random part, so two local processes never share an identity."""
    return pod_name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class ElectionConfig:
    name: str = "spendwarden-operator"
    namespace: str = "default"
    identity: str = ""
    lease_duration: float = 15.0   # client-go's defaults: 15 s / 10 s / 2 s
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    @classmethod
    def for_duration(cls, name: str, namespace: str, identity: str, lease_duration: float) -> ElectionConfig:
        """Deadline and retry period in client-go's proportions of the lease duration."""
        return cls(name=name, namespace=namespace, identity=identity, lease_duration=lease_duration,
                   renew_deadline=lease_duration * 2 / 3, retry_period=max(0.2, lease_duration * 2 / 15))


def _record(lease: Any) -> LeaseRecord:
    spec = lease.spec
    renew = spec.renew_time
    return LeaseRecord(holder=spec.holder_identity or "", duration=float(spec.lease_duration_seconds or 15),
                       renew_time=renew.isoformat() if hasattr(renew, "isoformat") else str(renew or ""),
                       transitions=int(spec.lease_transitions or 0), resource_version=lease.metadata.resource_version)


class LeaderElector:
    """Acquire (blocking), renew (in a thread) and release one Lease."""

    def __init__(self, config: ElectionConfig, api_client: Any = None, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self._api_client = api_client
        self._observed: Observation | None = None
        self._held: LeaseRecord | None = None          # our last successful write
        self._acquire_time: str | None = None
        self.last_renewed = 0.0                         # monotonic time of our last successful write
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- apiserver I/O

    def _api(self) -> Any:
        if self._api_client is None:
            self._api_client = kube.separate_client()  # its own connection pool: renewals never queue behind reconciles
        return kube.client.CoordinationV1Api(self._api_client)

    def _timeout(self) -> float:
        return max(1.0, self.config.retry_period)

    def _read(self) -> LeaseRecord | None:
        lease = kube.or_none(lambda: self._api().read_namespaced_lease(self.config.name, self.config.namespace,
                                                                        _request_timeout=self._timeout()))
        if lease is None:
            return None
        record = _record(lease)
        if lease.spec.acquire_time is not None and record.holder == self.config.identity:
            self._acquire_time = lease.spec.acquire_time.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return record

    def _write(self, previous: LeaseRecord | None, release: bool = False) -> LeaseRecord | None:
        """Create or replace; None when another candidate wrote first (409) or created it meanwhile."""
        c = self.config
        body = lease_body(c.name, c.namespace, c.identity, c.lease_duration, datetime.now(UTC), previous,
                          self._acquire_time, release)
        api = self._api()
        try:
            if previous is None:
                lease = api.create_namespaced_lease(c.namespace, body, _request_timeout=self._timeout())
            else:
                lease = api.replace_namespaced_lease(c.name, c.namespace, body, _request_timeout=self._timeout())
        except kube.ApiException as exc:
            if exc.status == 409:
                return None
            raise
        self._acquire_time = body["spec"]["acquireTime"]
        return _record(lease)

    # -- one round

    def try_acquire_or_renew(self) -> bool:
        """One read-decide-write round; True when we hold the Lease afterwards."""
        now = self.clock()
        current = self._read()
        action, self._observed = decide(current, self.config.identity, self._observed, now)
        if action is Action.WAIT:
            return False
        written = self._write(current)
        if written is None:
            return False
        if action is not Action.RENEW:
            log.info("leader lease acquired", extra={"lease": f"{self.config.namespace}/{self.config.name}",
                                                     "identity": self.config.identity,
                                                     "previous": current.holder if current else None})
        self._held = written
        self._observed = Observation(written, now)
        self.last_renewed = now
        return True

    def acquire(self) -> None:
        """Block until this process holds the Lease (or stop() is called: then raises InterruptedError)."""
        waiting_logged = False
        while not self._stop.is_set():
            try:
                if self.try_acquire_or_renew():
                    return
                if not waiting_logged and self._observed is not None:
                    log.info("standby: another replica holds the leader lease",
                             extra={"lease": f"{self.config.namespace}/{self.config.name}",
                                    "holder": self._observed.record.holder, "identity": self.config.identity})
                    waiting_logged = True
            except Exception as exc:  # noqa: BLE001 - apiserver unreachable: keep trying, stay standby
                log.warning("leader lease check failed: %s %s", type(exc).__name__, getattr(exc, "status", "") or "")
            self._stop.wait(self.config.retry_period)
        raise InterruptedError("stopped before acquiring the leader lease")

    def renew_forever(self, on_lost: Callable[[str], None]) -> None:
        """Renew every retry period until stop(); calls on_lost(reason) once the Lease is lost or
        could not be renewed for renew_deadline."""
        c = self.config
        while not self._stop.wait(c.retry_period):
            try:
                if self.try_acquire_or_renew():
                    continue
                holder = self._observed.record.holder if self._observed else "?"
                if holder and holder != c.identity:
                    on_lost(f"the leader lease is now held by {holder}")
                    return
            except Exception as exc:  # noqa: BLE001 - retried until the deadline
                log.warning("leader lease renewal failed: %s %s", type(exc).__name__, getattr(exc, "status", "") or "")
            if self.clock() - self.last_renewed >= c.renew_deadline:
                on_lost(f"the leader lease could not be renewed for {c.renew_deadline:.1f}s")
                return

    def start_renewing(self, on_lost: Callable[[str], None]) -> None:
        self._thread = threading.Thread(target=self.renew_forever, args=(on_lost,), name="spendwarden-leader-renew",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._timeout() + 1)

    def release(self) -> None:
        """Give the Lease up (after the ledger's shutdown flush), so a standby need not wait it out."""
        self.stop()
        if self._held is None:
            return
        try:
            current = self._read()
            if current is not None and current.holder == self.config.identity:
                self._write(current, release=True)
                log.info("leader lease released", extra={"lease": f"{self.config.namespace}/{self.config.name}"})
        except Exception as exc:  # noqa: BLE001 - it then expires on its own
            log.warning("leader lease release failed: %s", type(exc).__name__)
        self._held = None
