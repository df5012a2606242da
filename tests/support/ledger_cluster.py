"""The ledger against the real apiserver: a restartable operator process, ServiceAccount tokens, budgets,
and simulated proxies that speak docs/ledger-protocol.md and enforce their ceilings exactly as the proxy does."""
from __future__ import annotations

import asyncio
import random
import time
import uuid
from datetime import datetime

import httpx
from kubernetes import client

from spendwarden.ledger.allowance import Allowance, Amount, Limits
from spendwarden.ledger.leases import Ceiling
from tests.support.operator_process import OperatorProcess, free_port, wait_for

GROUP, VERSION = "spendwarden.io", "v1alpha1"
LIMIT = 100_000


BUDGET = {"period": {"type": "Monthly"}, "limits": {"tokens": {"total": LIMIT}}, "thresholds": [50, 80],
          "failMode": "Closed"}


class Operator:
    """One operator process with fixed ledger/metrics ports, restartable (also after SIGKILL)."""

    def __init__(self, control_plane, log_dir, env: dict[str, str] | None = None, pattern: str = "lg-*"):
        # One operator per namespace pattern: a ledger is served (and written) by one instance only.
        self.pattern = pattern
        self.env = env or {}
        self.kubeconfig = str(control_plane.kubeconfig)
        self.log_dir = log_dir
        self.ledger_port, self.metrics_port = free_port(), free_port()
        self.runs = 0
        self.proc: OperatorProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ledger_port}"

    def start(self, timeout: float | None = None) -> None:
        """`timeout`: for a restart on a loaded machine (OperatorProcess' default otherwise)."""
        self.runs += 1
        self.proc = OperatorProcess(self.kubeconfig, self.log_dir / f"operator-{self.runs}.log", extra_args=[
            "--namespace", self.pattern, "--ledger-port", str(self.ledger_port), "--metrics-port", str(self.metrics_port)], env=self.env)
        if timeout is None:
            self.proc.start()
        else:
            self.proc.start(timeout)
        wait_for(lambda: httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200, timeout=timeout or 20,
                 what="ledger /healthz")

    def tail(self, n: int = 40) -> str:
        return self.proc.tail(n) if self.proc is not None else ""

    def kill(self) -> None:
        assert self.proc is not None and self.proc.proc is not None
        self.proc.proc.kill()  # SIGKILL: no shutdown flush
        self.proc.proc.wait()
        self.proc.log.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # the exposition sorts labels
        prefix = f"{name}{{{want}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(prefix + " "):
                return float(line.split()[-1])
        return 0.0


def sa_token(kube, namespace: str, sa: str = "proxy", audience: str | None = "spendwarden") -> str:
    """A token of ServiceAccount `sa` (made if missing); audience None: the apiserver's default."""
    core = client.CoreV1Api(kube)
    try:
        core.create_namespaced_service_account(namespace, {"metadata": {"name": sa}})
    except client.ApiException as exc:
        if exc.status != 409:
            raise
    spec: dict = {"expirationSeconds": 3600}
    if audience:
        spec["audiences"] = [audience]
    return core.create_namespaced_service_account_token(sa, namespace, {"spec": spec}).status.token


def create_budget(kube, ns: str, name: str = "monthly", spec: dict | None = None) -> dict:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TokenBudget", "metadata": {"name": name}, "spec": spec or BUDGET}
    client.CustomObjectsApi(kube).create_namespaced_custom_object(GROUP, VERSION, ns, "tokenbudgets", body)
    # Generous: under load (2 cores, load average 17) the first reconcile took 13 s, once over 20 s.
    return wait_for(lambda: (lambda o: o if (o.get("status") or {}).get("periodStart") else None)(
        get_budget(kube, ns, name)), timeout=60, what="the reconcile's status")


def create_minute_budget(kube, ns: str, name: str, spec: dict, need: float) -> dict:
    """create_budget for a 1-minute window with at least `need` seconds of it left: when the create
    took long enough to get close to the boundary, the next window's status is returned instead (a
    test that spends in the old window would see its usage reset under it)."""
    obj = create_budget(kube, ns, name, spec)
    start = obj["status"]["periodStart"]
    begins = datetime.fromisoformat(start.replace("Z", "+00:00")).timestamp()
    if time.time() - begins <= 60 - need:
        return obj
    time.sleep(max(0.0, begins + 60.5 - time.time()))
    return wait_for(lambda: (lambda o: o if o["status"]["periodStart"] != start else None)(get_budget(kube, ns, name)),
                    timeout=30, what="the next 1-minute window's status")


def get_budget(kube, ns: str, name: str = "monthly") -> dict:
    return client.CustomObjectsApi(kube).get_namespaced_custom_object(GROUP, VERSION, ns, "tokenbudgets", name)


class SimProxy:
    """A proxy as far as the ledger is concerned: Allowance(limits=ceiling, used, reserved), reports
    serialized with increasing seq, a report with `want` when a request does not fit."""

    def __init__(self, http: httpx.AsyncClient, url: str, token: str, namespace: str, period_start: str, budget="monthly",
                 latency: tuple[float, float] = (0.002, 0.02)):
        self.latency = latency
        self.http, self.url, self.token, self.ns, self.budget = http, url, token, namespace, budget
        self.id = uuid.uuid4().hex
        self.seq = 0
        self.period_start = period_start
        self.allowance = Allowance(limits=Limits(total_tokens=0))
        self.max_ceiling = 0
        self.expires_at = 0.0
        self.lock = asyncio.Lock()
        self.refused = 0
        self.errors = 0
        self.reporting: asyncio.Task | None = None

    def body(self, want: Amount | None = None, release: bool = False) -> dict:
        a = self.allowance
        entry = {"periodStart": self.period_start,
                 "used": {"inputTokens": a.used.input_tokens, "outputTokens": a.used.output_tokens, "cost": str(a.used.cost)},
                 "held": {"inputTokens": a.reserved.input_tokens, "outputTokens": a.reserved.output_tokens, "cost": str(a.reserved.cost)}}
        if want is not None:
            entry["want"] = {"inputTokens": want.input_tokens, "outputTokens": want.output_tokens, "cost": "0"}
        if release:
            committed = a.used + a.reserved
            a.limits = Limits(total_tokens=committed.total_tokens)  # lower the local ceiling first
            entry["releaseTo"] = {"total": committed.total_tokens}
        return {"proxyId": self.id, "namespace": self.ns, "seq": self.seq, "budgets": {self.budget: entry}}

    async def post(self, body: dict) -> httpx.Response:
        return await self.http.post(f"{self.url}/v1/report", json=body, timeout=15,
                                    headers={"Authorization": f"Bearer {self.token}"})

    async def report(self, want: Amount | None = None, release: bool = False) -> bool:
        async with self.lock:
            self.seq += 1
            body = self.body(want, release)
            for _ in range(3):  # retries resend the same body (same seq)
                try:
                    resp = await self.post(body)
                except httpx.HTTPError:
                    self.errors += 1
                    await asyncio.sleep(0.3)
                    continue
                if resp.status_code == 200:
                    entry = resp.json()["budgets"][self.budget]
                    assert "error" not in entry, entry
                    ceiling = Ceiling.from_state(entry["ceiling"])
                    # The operator only raises; take its value unless we released below it meanwhile.
                    if not release:
                        self.allowance.limits = Limits(total_tokens=max(ceiling.total, self.allowance.limits.total_tokens or 0))
                        # (After the final releases, freed headroom may go to whoever reports next.)
                        self.max_ceiling = max(self.max_ceiling, ceiling.total)
                    self.expires_at = entry["expiresAt"]
                    return True
                self.errors += 1
                await asyncio.sleep(0.3)
            return False

    async def request(self, rng: random.Random) -> bool:
        """One LLM request: reserve the worst case, 'call upstream', settle the real usage."""
        inp, max_out = rng.randint(100, 800), rng.randint(50, 500)
        worst = Amount(inp, max_out)
        if time.time() > self.expires_at - 2:  # an expired lease admits nothing (failMode Closed: 503)
            await asyncio.sleep(0.1)
            return True
        rid = self.allowance.reserve(worst)
        if rid is None:
            await self.report(want=worst)
            rid = self.allowance.reserve(worst)
            if rid is None:
                self.refused += 1
                return False
        await asyncio.sleep(rng.uniform(*self.latency))
        self.allowance.settle(rid, Amount(inp, rng.randint(1, max_out)))
        return True

    async def run(self, stop: asyncio.Event, seed: int, workers: int = 4) -> None:
        """Until the workers give up; the proxy keeps reporting (it is alive) until `stop`."""
        async def worker(i: int) -> None:
            rng = random.Random(seed * 100 + i)
            while not stop.is_set() and self.refused < 40:
                if not await self.request(rng):
                    await asyncio.sleep(0.05)

        async def reporter() -> None:
            while not stop.is_set():
                await asyncio.sleep(0.3)
                await self.report()

        tasks = [asyncio.create_task(worker(i)) for i in range(workers)]
        self.reporting = asyncio.create_task(reporter())
        await asyncio.gather(*tasks)

    @property
    def used(self) -> int:
        return self.allowance.used.total_tokens
