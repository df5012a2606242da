"""The ledger service end to end: a real operator process, the real apiserver (TokenReview, status
persistence, Events) and simulated proxies that speak docs/ledger-protocol.md over HTTP and enforce
their ceilings with ledger.allowance.Allowance exactly as the proxy does."""
from __future__ import annotations

import asyncio
import random
import time
import uuid
from datetime import datetime
from decimal import Decimal

import httpx
import pytest
from kubernetes import client

from spendwarden.ledger.allowance import Allowance, Amount, Limits
from spendwarden.ledger.leases import Ceiling

from .operator_process import OperatorProcess, free_port, wait_for

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


@pytest.fixture(scope="module")
def operator(control_plane, tmp_path_factory):
    op = Operator(control_plane, tmp_path_factory.mktemp("ledger"))
    op.start()
    yield op
    op.stop()


@pytest.fixture
def lg_namespace(kube):
    name = f"lg-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(kube)
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


@pytest.fixture
def own_namespace(kube):
    """For tests with their own operator (watching lk-*), away from the module operator's lg-*."""
    name = f"lk-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(kube)
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


def sa_token(kube, namespace: str, sa: str = "proxy") -> str:
    core = client.CoreV1Api(kube)
    try:
        core.create_namespaced_service_account(namespace, {"metadata": {"name": sa}})
    except client.ApiException as exc:
        if exc.status != 409:
            raise
    tr = core.create_namespaced_service_account_token(sa, namespace, {
        "spec": {"audiences": ["spendwarden"], "expirationSeconds": 3600}})
    return tr.status.token


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


async def _run_proxies(operator: Operator, proxies: list[SimProxy], during=None) -> None:
    stop = asyncio.Event()
    runs = [asyncio.create_task(p.run(stop, seed=i)) for i, p in enumerate(proxies)]
    if during is not None:
        await during()
    done, pending = await asyncio.wait(runs, timeout=120)
    stop.set()
    await asyncio.gather(*runs, *(p.reporting for p in proxies if p.reporting is not None))
    for p in proxies:  # idle: release what is not committed, and report the final numbers
        assert await p.report(release=True)


def _assert_exact(kube, ns: str, proxies: list[SimProxy]) -> dict:
    total = sum(p.used for p in proxies)
    obj = wait_for(lambda: (lambda o: o if o["status"].get("used", {}).get("totalTokens") == total else None)(
        get_budget(kube, ns)), timeout=15, what=f"status.used.totalTokens == {total}")
    used = obj["status"]["used"]
    assert used["inputTokens"] == sum(p.allowance.used.input_tokens for p in proxies)
    assert used["outputTokens"] == sum(p.allowance.used.output_tokens for p in proxies)
    assert total <= LIMIT
    # No headroom was ever granted twice: the ceilings proxies were told never add up past the limit.
    assert sum(p.max_ceiling for p in proxies) <= LIMIT, [p.max_ceiling for p in proxies]
    return obj


async def test_three_proxies_share_a_budget_exactly(operator, kube, lg_namespace):
    ns = lg_namespace
    start = create_budget(kube, ns)["status"]["periodStart"]
    token = sa_token(kube, ns)
    async with httpx.AsyncClient() as http:
        proxies = [SimProxy(http, operator.url, token, ns, start) for _ in range(3)]
        await _run_proxies(operator, proxies)
    obj = _assert_exact(kube, ns, proxies)
    assert sum(p.used for p in proxies) > LIMIT * 0.8, [p.used for p in proxies]  # the budget really was used up
    status = obj["status"]
    assert set(status["ledger"]["proxies"]) == {p.id for p in proxies}
    assert status["percentUsed"] == sum(p.used for p in proxies) * 100 // LIMIT
    assert status["state"] in ("Warning", "Exceeded") and status["limitSummary"] == "100k tokens"


async def test_replayed_seq_changes_nothing(operator, kube, lg_namespace):
    ns = lg_namespace
    start = create_budget(kube, ns)["status"]["periodStart"]
    async with httpx.AsyncClient() as http:
        p = SimProxy(http, operator.url, sa_token(kube, ns), ns, start)
        p.allowance.used = Amount(1000, 500)
        assert await p.report(want=Amount(0, 2000))
        body = p.body()  # the same seq again, with different (bogus) numbers
        body["budgets"]["monthly"]["used"] = {"inputTokens": 50_000, "outputTokens": 0, "cost": "0"}
        first = wait_for(lambda: (lambda o: o if o["status"].get("used", {}).get("totalTokens") == 1500 else None)(
            get_budget(kube, ns)), what="the first report persisted")
        resp = await p.post(body)
        assert resp.status_code == 200 and resp.json()["seq"] == p.seq
        assert Ceiling.from_state(resp.json()["budgets"]["monthly"]["ceiling"]).total == p.max_ceiling
    await asyncio.sleep(4.0)  # two flush intervals: a late flush must not let a wrong write pass unseen
    again = get_budget(kube, ns)
    assert again["status"]["used"] == first["status"]["used"]
    assert again["status"]["ledger"]["proxies"][p.id]["seq"] == p.seq


async def test_unauthenticated_and_foreign_reports_are_refused(operator, kube, lg_namespace):
    ns = lg_namespace
    start = create_budget(kube, ns)["status"]["periodStart"]
    other = f"lg-other-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(kube).create_namespace({"metadata": {"name": other}})
    try:
        foreign = sa_token(kube, other)
        before = {r: operator.metric("spendwarden_ledger_rejected_total", reason=r)
                  for r in ("missing_token", "invalid_token", "forbidden_namespace")}
        body = {"proxyId": "x", "namespace": ns, "seq": 1, "budgets": {"monthly": {
            "periodStart": start, "used": {"inputTokens": 5000, "outputTokens": 0, "cost": "0"}}}}
        async with httpx.AsyncClient() as http:
            url = f"{operator.url}/v1/report"
            assert (await http.post(url, json=body)).status_code == 401
            assert (await http.post(url, json=body, headers={"Authorization": "Bearer garbage.token.x"})).status_code == 401
            resp = await http.post(url, json=body, headers={"Authorization": f"Bearer {foreign}"})
            assert resp.status_code == 403 and other in resp.json()["error"]
            # The same token is fine for its own namespace (an unknown budget there is per-budget).
            ok = await http.post(url, json={**body, "namespace": other}, headers={"Authorization": f"Bearer {foreign}"})
            assert ok.status_code == 200 and ok.json()["budgets"]["monthly"]["error"] == "unknown budget"
            bad = await http.post(url, json={**body, "seq": "x"}, headers={"Authorization": f"Bearer {foreign}"})
            assert bad.status_code == 400 and "seq" in bad.json()["error"]
        after = {r: operator.metric("spendwarden_ledger_rejected_total", reason=r) for r in before}
        assert after["missing_token"] == before["missing_token"] + 1
        assert after["invalid_token"] == before["invalid_token"] + 1
        assert after["forbidden_namespace"] == before["forbidden_namespace"] + 1
        assert operator.metric("spendwarden_ledger_reports_total") >= 1
        status = get_budget(kube, ns).get("status") or {}
        assert not status.get("ledger") and (status.get("used") or {}).get("totalTokens", 0) == 0
    finally:
        client.CoreV1Api(kube).delete_namespace(other)


async def test_sigkill_and_restart_lose_nothing_and_grant_nothing_twice(control_plane, kube, own_namespace, tmp_path):
    op = Operator(control_plane, tmp_path, pattern="lk-*")  # its own process: this test kills it
    op.start()
    try:
        ns = own_namespace
        start = create_budget(kube, ns)["status"]["periodStart"]
        token = sa_token(kube, ns)

        async def kill_and_restart() -> None:
            # Mid-run: once the proxies have spent a tenth of the budget on their leases. (A fixed
            # 1.5 s was too short under load: the first grant alone took longer, nothing was spent.)
            deadline = time.monotonic() + 60
            while sum(p.used for p in proxies) < LIMIT * 0.1:
                assert time.monotonic() < deadline, "the proxies did not spend a tenth of the budget in 60 s"
                await asyncio.sleep(0.02)
            used_at_kill.append(sum(p.used for p in proxies))
            await asyncio.to_thread(op.kill)
            await asyncio.sleep(1.0)  # proxies keep going on their leases meanwhile
            await asyncio.to_thread(op.start)

        async with httpx.AsyncClient() as http:
            used_at_kill: list[int] = []
            proxies = [SimProxy(http, op.url, token, ns, start, latency=(0.05, 0.15)) for _ in range(3)]
            await _run_proxies(op, proxies, during=kill_and_restart)
        assert op.runs == 2 and any(p.errors for p in proxies)  # the outage was seen
        assert 0 < used_at_kill[0] < LIMIT * 0.8  # killed mid-run
        obj = _assert_exact(kube, ns, proxies)
        assert sum(p.used for p in proxies) > LIMIT * 0.8
        # Nobody was presumed dead, not even for a while, also when the restart took longer than
        # lease + grace: a proxy that returns is reconciled (retired back to 0) but stays excluded
        # from the breakdown for the period.
        ledger = obj["status"]["ledger"]
        assert ledger["retired"]["inputTokens"] == 0 and not ledger["tombstones"]
        assert not (ledger.get("breakdown") or {}).get("excluded"), ledger["breakdown"]
    finally:
        op.stop()


async def test_graceful_shutdown_persists_what_was_not_written_yet(control_plane, kube, own_namespace, tmp_path):
    # A long flush interval: only grants are written at once; the rest waits for the shutdown flush.
    op = Operator(control_plane, tmp_path, env={"SPENDWARDEN_LEDGER_FLUSH_INTERVAL": "600"}, pattern="lk-*")
    op.start()
    try:
        ns = own_namespace
        start = create_budget(kube, ns)["status"]["periodStart"]
        async with httpx.AsyncClient() as http:
            p = SimProxy(http, op.url, sa_token(kube, ns), ns, start)
            assert await p.report(want=Amount(0, 50_000))  # a grant: persisted before the answer
            granted = p.max_ceiling
            wait_for(lambda: get_budget(kube, ns)["status"].get("ledger"), what="the grant persisted")
            await asyncio.sleep(1.5)  # a slow burn rate: the lease's free part covers the next seconds
            p.allowance.used = Amount(700, 300)
            assert await p.report()  # fits the lease: no grant, answered at once
            assert p.max_ceiling == granted
            status = get_budget(kube, ns)["status"]
            assert status["used"]["totalTokens"] == 0  # not written yet
        await asyncio.to_thread(op.stop)  # SIGTERM: kopf's cleanup runs the shutdown flush
        status = get_budget(kube, ns)["status"]
        assert status["used"]["totalTokens"] == 1000
        assert status["ledger"]["proxies"][p.id]["seq"] == p.seq
    finally:
        op.stop()


async def test_status_state_and_threshold_event(operator, kube, lg_namespace):
    ns = lg_namespace
    start = create_budget(kube, ns)["status"]["periodStart"]
    async with httpx.AsyncClient() as http:
        p = SimProxy(http, operator.url, sa_token(kube, ns), ns, start)
        p.allowance.used = Amount(40_000, 20_000)
        assert await p.report()
    # The conditions are a second write after the usage fields: wait for both.
    obj = wait_for(lambda: (lambda o: o if o["status"].get("state") == "Warning" and any(
        c["type"] == "ForecastExhausted" for c in o["status"].get("conditions") or []) else None)(get_budget(kube, ns)),
                   what="state Warning and the ForecastExhausted condition")
    status = obj["status"]
    assert status["used"] == {"inputTokens": 40_000, "outputTokens": 20_000, "totalTokens": 60_000, "cost": "0"}
    assert status["percentUsed"] == 60 and status["remaining"] == {"tokens": 40_000}
    assert status["usedSummary"] == "60k tokens"
    conds = {c["type"]: c["status"] for c in status["conditions"]}
    # The reconcile's Ready survived the ledger's writes (ForecastExhausted depends on the day of the month).
    assert {"Ready": "True", "Exceeded": "False"}.items() <= conds.items() and "ForecastExhausted" in conds
    events = wait_for(lambda: [e for e in client.CoreV1Api(kube).list_namespaced_event(ns).items
                               if e.reason == "ThresholdCrossed" and e.involved_object.name == "monthly"],
                      what="ThresholdCrossed Event")
    assert len(events) == 1 and "50%" in events[0].message
    assert operator.metric("spendwarden_budget_percent_used", namespace=ns, budget="monthly") == 60
    assert operator.metric("spendwarden_budget_state", namespace=ns, budget="monthly", state="Warning") == 1
    assert operator.metric("spendwarden_budget_state", namespace=ns, budget="monthly", state="Active") == 0
    assert operator.metric("spendwarden_namespace_cut_off", namespace=ns) == 0


PROXY_CONFIG = """
kind: ModelRoute
metadata: {name: a}
spec:
  model: a
  defaultBackend: m
  backends:
  - {name: m, provider: OpenAI, url: "http://x/v1", model: m, pricing: {input: "1", output: "2"}}
---
kind: TokenBudget
metadata: {name: closed}
spec: {window: 24h, failMode: Closed, routes: [a], limits: {tokens: {total: 20000}}}
"""


async def test_the_proxys_own_ledger_client_against_the_operator(operator, kube, lg_namespace, tmp_path, monkeypatch):
    """Interop: proxy/ledger_client.py (HttpTransport, projected-token file) with the real BudgetBook."""
    from spendwarden.ledger.pricing import TokenUsage
    from spendwarden.proxy.budgets import BudgetBook, LeaseShort
    from spendwarden.proxy.config import compile_config, parse_config_text
    from spendwarden.proxy.errors import ProxyError
    from spendwarden.proxy.ledger_client import LedgerClient

    ns = lg_namespace
    create_budget(kube, ns, "closed", {"window": "24h", "failMode": "Closed", "routes": ["a"],
                                       "limits": {"tokens": {"total": 20000}}})
    token_file = tmp_path / "token"
    token_file.write_text(sa_token(kube, ns))
    monkeypatch.setenv("SPENDWARDEN_LEDGER_TOKEN_FILE", str(token_file))
    cfg, _ = parse_config_text(PROXY_CONFIG)
    c = compile_config(cfg)
    route = c.routes["a"]
    proxies = []
    for _ in range(2):
        book = BudgetBook()
        client_ = LedgerClient(book, operator.url, ns, interval=0.3)
        book.sync(c.budgets)
        client_.start()
        proxies.append((book, client_))
    rng = random.Random(3)
    served = refused = 0

    async def one(book, client_) -> None:
        nonlocal served, refused
        try:
            try:
                adm = book.admit(route, route.default, 100, rng.randint(100, 600), 1, route.downgrade, may_wait=True)
            except LeaseShort as short:
                await client_.wait_for_lease(short)
                adm = book.admit(route, route.default, 100, rng.randint(100, 600), 1, route.downgrade)
        except ProxyError as exc:
            assert exc.status in (429, 503)
            refused += 1
            return
        await asyncio.sleep(rng.uniform(0.005, 0.03))
        book.settle(adm, route.default.prices, TokenUsage(100, rng.randint(1, adm.max_output)))
        served += 1

    try:
        for _ in range(6):
            await asyncio.gather(*(one(b, cl) for _ in range(15) for b, cl in proxies))
    finally:
        for _, cl in proxies:
            await cl.close()  # the final report gives back what is not used
    used = sum(b.states["closed"].allowance.used.total_tokens for b, _ in proxies)
    assert served > 10 and refused > 0 and 0 < used <= 20000
    wait_for(lambda: get_budget(kube, ns, "closed")["status"].get("used", {}).get("totalTokens") == used,
             timeout=15, what=f"status.used.totalTokens == {used}")


async def test_period_rollover_keeps_history_and_late_reports(operator, kube, lg_namespace):
    """A 1-minute rolling window: at the reset the ledger starts a new period by itself (no report
    needed), the old totals go to status.history, and a late report still counts in the old period."""
    ns = lg_namespace
    if time.time() % 60 > 45:  # too close to a boundary to see the first period's usage
        await asyncio.sleep(61 - time.time() % 60)
    obj = create_minute_budget(kube, ns, "minute", {"window": "1m", "limits": {"tokens": {"total": 10_000}},
                                                    "thresholds": [50]}, need=15)
    first = obj["status"]["periodStart"]
    async with httpx.AsyncClient() as http:
        p = SimProxy(http, operator.url, sa_token(kube, ns), ns, first, budget="minute")
        p.allowance.used = Amount(4000, 2000)
        assert await p.report()
        wait_for(lambda: get_budget(kube, ns, "minute")["status"].get("state") == "Warning", what="Warning")
        deadline = time.monotonic() + 75
        while True:  # a live proxy: it keeps reporting (a silent one would be charged its escrow)
            status = get_budget(kube, ns, "minute")["status"]
            if status["ledger"]["periodStart"] != first or time.monotonic() > deadline:
                break
            assert await p.report()
            await asyncio.sleep(1)
        assert status["used"]["totalTokens"] == 0 and status["state"] == "Active" and status["percentUsed"] == 0
        assert status["history"][0]["periodStart"] == first and status["history"][0]["used"]["totalTokens"] == 6000
        assert status["ledger"]["previous"]["periodStart"] == first
        # The proxy's last numbers for the old period arrive late: they count there.
        p.allowance.used = Amount(4500, 2000)
        seq_before = p.seq
        resp = await p.post({**p.body(), "seq": seq_before + 1})
        assert resp.status_code == 200
        assert resp.json()["budgets"]["minute"]["periodStart"] == status["ledger"]["periodStart"]
    status = wait_for(lambda: (lambda s: s if s["history"][0]["used"]["totalTokens"] == 6500 else None)(
        get_budget(kube, ns, "minute")["status"]), what="the late report in history")
    assert status["used"]["totalTokens"] == 0
