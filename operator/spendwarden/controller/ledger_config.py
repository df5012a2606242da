"""The ledger service's settings (controller/settings.py reads them with the rest)."""
from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping
from dataclasses import dataclass

from ..ledger.leases import LeaseSettings


@dataclass(frozen=True)
class LedgerConfig:
    port: int = 8081                 # 0: no ledger service
    addr: str = "0.0.0.0"
    insecure: bool = False           # no authentication: standalone experiments only
    metrics_port: int = 9090         # 0: no metrics endpoint
    flush_interval: float = 2.0      # at most one write per dirty budget this often (grants excepted)
    # ... and at most this many such writes a second in all: with many busy budgets each is written
    # less often (200 busy budgets: every 4 s), so the apiserver's (and our own watch's) load is bounded.
    max_writes_per_second: float = 50.0
    review_ttl: float = 60.0         # how long a positive TokenReview answer is trusted
    max_connections: int = 4096      # to the ledger port at once (about one per proxy); more: 503, closed
    request_timeout: float = 10.0    # a request's head and body, from its first byte (then 408)
    commit_timeout: float = 10.0     # a grant not persisted by then is answered 503 (proxy retries)
    lease_ttl: float = LeaseSettings.ttl      # tests shorten these: a killed proxy is charged after ttl + grace
    lease_grace: float = LeaseSettings.grace
    admitted_window: float = LeaseSettings.admitted_window  # the demo shortens it (ledger/leases.py)
    # The operator's --namespace patterns (globs, "!" excludes); empty: all. Budgets elsewhere are not
    # watched, so their spec changes would go unseen: they are answered as unknown.
    namespaces: tuple[str, ...] = ()

    def serves(self, namespace: str) -> bool:
        if not self.namespaces:
            return True
        if any(p.startswith("!") and fnmatch.fnmatchcase(namespace, p[1:]) for p in self.namespaces):
            return False
        included = [p for p in self.namespaces if not p.startswith("!")]
        return not included or any(fnmatch.fnmatchcase(namespace, p) for p in included)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LedgerConfig:
        env = os.environ if env is None else env
        return cls(port=int(env.get("SPENDWARDEN_LEDGER_PORT") or 8081),
                   addr=env.get("SPENDWARDEN_LEDGER_ADDR") or "0.0.0.0",
                   insecure=env.get("SPENDWARDEN_LEDGER_INSECURE", "").lower() in ("1", "true", "yes"),
                   metrics_port=int(env.get("SPENDWARDEN_METRICS_PORT") or 9090),
                   flush_interval=float(env.get("SPENDWARDEN_LEDGER_FLUSH_INTERVAL") or 2.0),
                   max_writes_per_second=float(env.get("SPENDWARDEN_LEDGER_MAX_WRITES_PER_SECOND") or 50.0),
                   request_timeout=float(env.get("SPENDWARDEN_LEDGER_REQUEST_TIMEOUT") or 10.0),
                   max_connections=int(env.get("SPENDWARDEN_LEDGER_MAX_CONNECTIONS") or 4096),
                   lease_ttl=float(env.get("SPENDWARDEN_LEDGER_LEASE_TTL") or LeaseSettings.ttl),
                   lease_grace=float(env.get("SPENDWARDEN_LEDGER_LEASE_GRACE") or LeaseSettings.grace),
                   admitted_window=float(env.get("SPENDWARDEN_LEDGER_ADMITTED_WINDOW")
                                         or LeaseSettings.admitted_window))
