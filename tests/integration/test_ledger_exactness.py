"""Issue 4's exactness tests on the real control plane: the operator process (ledger service with
TokenReview), 8 real proxy processes configured from the ConfigMap the operator renders, real
ServiceAccount tokens (TokenRequest, audience spendwarden), the mock upstream as the provider, and a
TokenBudget of 1,000,000 tokens (onExceeded CutOff) spent by 8 x 64 concurrent clients, most of them
streaming (OpenAI chat), some not, some in the Anthropic format (natively and translated).

What the upstream billed is the truth: the mock bills a request's usage the moment it starts
answering (as a provider does, whether or not the client reads it all), deterministically from the
request's text (devtools/mock_upstream.py). Each run checks the final TokenBudget status against it.
Runs use one budget each (b1, b2, b3) in one namespace served by one set of proxies: run 1 plain
(with forged reports), run 2 with the operator SIGKILLed and restarted, run 3 with one proxy
SIGKILLed mid-stream (last: that proxy stays dead)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import random
import statistics
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from kubernetes import client

from spendwarden.devtools.mock_upstream import MockUpstream
from spendwarden.proxy.budgets import MIN_USEFUL_OUTPUT
from tests.support.ledger_cluster import GROUP, VERSION, Operator, get_budget, sa_token
from tests.support.operator_process import wait_for

from ..proxy.conftest import ProxyProcess

LIMIT = 1_000_000
N_PROXIES = 8
STREAMS = 64
OUTPUT = 48           # tokens the mock generates per answer (below max_tokens: finish "stop")
MAX_TOKENS = 64
# Lease timing for these tests: a killed proxy is presumed dead ttl + grace after its last report
# (LeaseSettings' defaults, 10 + 20 s, would make the test wait half a minute).
LEASE_TTL, LEASE_GRACE = 10.0, 3.0  # the default TTL: a loaded machine can delay reports by seconds
CUTOFF_TEST_BOUND = 5.0  # issue 4 asks p99 <= 1 s: bench/cutoff_latency.py; this only proves every proxy gets it
_WORDS = ("alpha", "beta", "gamma", "delta", "omega", "ticket", "refund", "order")


def prompt(seed: int) -> str:
    """About 640 billed prompt tokens (the mock's chars/4) that the proxy's tokenizer estimates
    generously (~920), as real reservations are: a reservation below the bill could overshoot."""
    rng = random.Random(seed)
    return " ".join(f"{rng.choice(_WORDS)} {rng.randint(1000, 9999)}" for _ in range(230))


def route(name: str, backend: dict) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelRoute", "metadata": {"name": name},
            "spec": {"model": name, "defaultBackend": backend["name"], "backends": [backend]}}


def budget(name: str, routes: list[str]) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TokenBudget", "metadata": {"name": name},
            "spec": {"period": {"type": "Monthly"}, "limits": {"tokens": {"total": LIMIT}}, "routes": routes,
                     "onExceeded": "CutOff", "failMode": "Closed", "thresholds": [80]}}


@dataclass
class Rig:
    operator: Operator
    upstream: MockUpstream
    namespace: str
    proxies: list[ProxyProcess]
    config: dict


@contextlib.contextmanager
def build_rig(control_plane, kube, work, runs: int = 3) -> Iterator[Rig]:
    """An operator (own namespace pattern lx-*), the mock upstream, one namespace with `runs`
    budgets b1..bN (each over an OpenAI route rN and an Anthropic route cN), and 8 proxies configured
    from the ConfigMap the operator renders."""
    ns = f"lx-{uuid.uuid4().hex[:8]}"
    core, custom = client.CoreV1Api(kube), client.CustomObjectsApi(kube)
    core.create_namespace({"metadata": {"name": ns}})
    op = Operator(control_plane, work, pattern="lx-*")
    op.env = {"SPENDWARDEN_LEDGER_URL": op.url, "SPENDWARDEN_LEDGER_LEASE_TTL": str(LEASE_TTL),
              "SPENDWARDEN_LEDGER_LEASE_GRACE": str(LEASE_GRACE)}
    upstream = MockUpstream(tokens=OUTPUT, record_limit=100).start()
    proxies: list[ProxyProcess] = []
    try:
        op.start()
        openai_be = {"name": "oa", "provider": "OpenAI", "url": upstream.openai_url, "model": "gpt-4o-mini",
                     "pricing": {"input": "0.15", "output": "0.60"}}
        anthropic_be = {"name": "an", "provider": "Anthropic", "url": upstream.url, "model": "claude-haiku-4-5",
                        "pricing": {"input": "1", "output": "5"}}
        for n in range(1, runs + 1):
            for obj, plural in ((route(f"r{n}", openai_be), "modelroutes"), (route(f"c{n}", anthropic_be), "modelroutes"),
                                (budget(f"b{n}", [f"r{n}", f"c{n}"]), "tokenbudgets")):
                custom.create_namespaced_custom_object(GROUP, VERSION, ns, plural, obj)

        def rendered() -> dict | None:
            cm = core.read_namespaced_config_map("spendwarden-proxy", ns)
            cfg = json.loads(cm.data["config.json"])
            return cfg if len(cfg.get("budgets") or []) == runs and len(cfg.get("routes") or []) == 2 * runs else None

        cfg = wait_for(rendered, timeout=30, what=f"the operator's proxy ConfigMap with {runs} budgets")
        assert cfg["ledger"]["url"] == op.url
        (work / "config.json").write_text(json.dumps(cfg))
        token = work / "token"
        token.write_text(sa_token(kube, ns))
        for i in range(N_PROXIES):
            d = work / f"p{i}"
            d.mkdir()
            proxies.append(ProxyProcess(work / "config.json", d, env={"SPENDWARDEN_LEDGER_TOKEN_FILE": str(token)}))
        _start_all(proxies)
        yield Rig(op, upstream, ns, proxies, cfg)
    finally:
        for p in proxies:
            p.stop()
        op.stop()
        upstream.stop()
        core.delete_namespace(ns)


@pytest.fixture(scope="module")
def rig(control_plane, kube, tmp_path_factory):
    with build_rig(control_plane, kube, tmp_path_factory.mktemp("exactness")) as r:
        yield r


def _start_all(proxies: list[ProxyProcess]) -> None:
    """Start the processes at once (each imports for about a second), then wait for all."""
    import threading
    errors: list[BaseException] = []

    def one(p: ProxyProcess) -> None:
        try:
            p.start(timeout=120)  # eight at once on two shared cores
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(p,)) for p in proxies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


@dataclass
class RunResult:
    ok: int = 0
    retried: int = 0            # 429 "retry shortly": the rest of the budget was held by requests in flight
    unreachable: int = 0        # 503 ledger_unreachable
    unreachable_at: list[float] = field(default_factory=list)  # when (time.time()) each was answered
    errors: list[str] = field(default_factory=list)
    first_cutoff: dict[int, float] = field(default_factory=dict)  # proxy index -> time of its first exhausted 429
    kinds: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0        # from the first request to the last proxy's cut-off


async def _one(http: httpx.AsyncClient, base: str, kind: str, n: int, seed: int,
               extra: dict[str, str] | None = None) -> httpx.Response:
    text = prompt(seed)
    if kind.startswith("anthropic"):
        model = f"c{n}" if kind == "anthropic" else f"r{n}"  # native, or translated to the OpenAI backend
        body = {"model": model, "max_tokens": MAX_TOKENS, "stream": True,
                "messages": [{"role": "user", "content": text}]}
        path, headers = "/v1/messages", {"anthropic-version": "2023-06-01", "x-api-key": "unused"}
    else:
        body = {"model": f"r{n}", "max_tokens": MAX_TOKENS, "stream": kind == "stream",
                "messages": [{"role": "user", "content": text}]}
        path, headers = "/v1/chat/completions", {"Authorization": "Bearer unused"}
    headers.update(extra or {})
    async with http.stream("POST", base + path, json=body, headers=headers) as resp:
        raw = await resp.aread()
    if resp.status_code == 200:
        if body["stream"]:
            assert raw.rstrip().endswith(b"[DONE]" if path.endswith("completions") else b'{"type":"message_stop"}'), raw[-200:]
        else:
            # Fewer near the end of a lease: the proxy clamps max_tokens to what is left, never below 16.
            assert MIN_USEFUL_OUTPUT <= json.loads(raw)["usage"]["completion_tokens"] <= OUTPUT, raw[-200:]
    return resp


def _kind(worker: int) -> str:
    return {5: "anthropic-translated", 6: "anthropic", 7: "unary"}.get(worker % 8, "stream")


async def drive(rig: Rig, n: int, during=None, deadline: float = 90.0, extra: dict[str, str] | None = None) -> RunResult:
    """8 x 64 concurrent clients on budget b{n} until every proxy refuses as exhausted."""
    res = RunResult()
    stop_at = time.monotonic() + deadline
    limits = httpx.Limits(max_connections=STREAMS * 2, max_keepalive_connections=STREAMS)
    https = [httpx.AsyncClient(timeout=60, limits=limits) for _ in rig.proxies]

    async def worker(pi: int, w: int) -> None:
        p, http, kind = rig.proxies[pi], https[pi], _kind(w)
        k = 0
        while time.monotonic() < stop_at and pi not in res.first_cutoff:
            k += 1
            try:
                resp = await _one(http, p.url, kind, n, seed=(n * 1000 + pi) * 100_000 + w * 1000 + k, extra=extra)
            except httpx.HTTPError as exc:  # a killed proxy
                if not p.proc or p.proc.poll() is not None:
                    return
                res.errors.append(f"p{pi}: {type(exc).__name__}")
                await asyncio.sleep(0.05)
                continue
            if resp.status_code == 200:
                res.ok += 1
                res.kinds[kind] = res.kinds.get(kind, 0) + 1
            elif resp.status_code == 429:
                err = resp.json()["error"]
                assert err["type"] == "budget_exceeded" or err.get("code") == "budget_exceeded", err
                retry = int(resp.headers["retry-after"])
                if retry > 1:  # exhausted: Retry-After is the period's end
                    res.first_cutoff.setdefault(pi, time.time())
                    return
                res.retried += 1
                await asyncio.sleep(0.02)
            elif resp.status_code == 503 and b"ledger (operator) is unreachable" in resp.content:
                res.unreachable += 1  # failMode Closed while the operator is down and the lease ran out
                res.unreachable_at.append(time.time())
                await asyncio.sleep(0.05)
            else:
                res.errors.append(f"p{pi}: HTTP {resp.status_code} {resp.text[:200]}")
                await asyncio.sleep(0.05)

    side = None
    try:
        tasks = [asyncio.create_task(worker(pi, w)) for pi in range(len(rig.proxies)) for w in range(STREAMS)]
        if during is not None:
            side = asyncio.create_task(during(res))
        await asyncio.gather(*tasks)
        if side is not None:
            if not side.done():
                side.cancel()
            try:
                await side  # its assertions count
            except asyncio.CancelledError:
                pass
    finally:
        for h in https:
            await h.aclose()
    res.seconds = time.monotonic() - (stop_at - deadline)
    return res


def _used(kube, ns: str, name: str) -> dict:
    return (get_budget(kube, ns, name).get("status") or {}).get("used") or {}


def billed_since(rig: Rig, before: dict) -> dict:
    """What the upstream billed since `before` (its totals then), as status.used's fields."""
    t = rig.upstream.totals()
    return {"inputTokens": t["billed_prompt_tokens"] - before["billed_prompt_tokens"],
            "outputTokens": t["billed_completion_tokens"] - before["billed_completion_tokens"]}


def settle_and_compare(rig: Rig, kube, name: str, billed_before: dict, timeout: float = 20.0) -> tuple[dict, dict]:
    """Wait until the proxies' final reports are persisted; returns (status.used, what was billed)."""
    time.sleep(0.5)  # the last streams' usage settles in the proxies
    want = billed_since(rig, billed_before)
    try:
        wait_for(lambda: {k: _used(kube, rig.namespace, name).get(k) for k in want} == want, timeout=timeout,
                 what=f"{name}: status.used == billed {want}")
    except AssertionError:
        pass  # the assertions below say what differs
    return _used(kube, rig.namespace, name), billed_since(rig, billed_before)


def cutoff_latencies(rig: Rig, kube, name: str, res: RunResult) -> list[float]:
    """Per proxy: from the moment the ledger found the budget spent to the proxy's first refusal
    as exhausted (429 budget_exceeded, Retry-After = the period's end). Empty if never spent.
    The ledger answers "spent" before its next status write (up to the flush interval later), so
    once a proxy was cut off the status is given that long to show when."""
    def exhausted_at() -> float | None:
        return get_budget(kube, rig.namespace, name)["status"]["ledger"].get("exhaustedAt")

    spent = (wait_for(exhausted_at, timeout=15, what=f"{name}: status.ledger.exhaustedAt")
             if res.first_cutoff else exhausted_at())
    return [res.first_cutoff[pi] - spent for pi in sorted(res.first_cutoff)] if spent else []


def report(label: str, used: dict, billed: dict, res: RunResult, lat: list[float]) -> None:
    total = used.get("totalTokens", 0)
    print(f"\n[{label}] limit {LIMIT}  ledger used {total} (in {used.get('inputTokens')}, out {used.get('outputTokens')})"
          f"  upstream billed {billed['inputTokens'] + billed['outputTokens']} (in {billed['inputTokens']}, "
          f"out {billed['outputTokens']})  overshoot {max(total - LIMIT, 0)}  ledger - billed "
          f"{total - billed['inputTokens'] - billed['outputTokens']}  requests ok {res.ok} {res.kinds} "
          f"retried {res.retried} unreachable {res.unreachable} errors {len(res.errors)}  in {res.seconds:.1f} s")
    if lat:
        print(f"[{label}] cut-off latency per proxy (s): " + " ".join(f"{x:.3f}" for x in lat)
              + f"  max {max(lat):.3f}  median {statistics.median(lat):.3f}")


def _token(kube, namespace: str, audience: str = "spendwarden") -> str:
    return sa_token(kube, namespace, audience=audience)


def forger(rig: Rig, kube, name: str):
    """Forged reports while the run goes on: no token, another namespace's token, a token for another
    audience, and a real proxy's id with a replayed seq and inflated usage. None may change anything
    (the run's final used == billed proves it); the refusals are checked here."""
    other = f"lx-forger-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(kube).create_namespace({"metadata": {"name": other}})
    foreign, wrong_audience, own = _token(kube, other), _token(kube, rig.namespace, "not-spendwarden"), \
        _token(kube, rig.namespace)
    seen: dict[str, int] = {}

    async def forge(res: RunResult) -> None:
        url = rig.operator.url + "/v1/report"
        async with httpx.AsyncClient(timeout=10) as http:
            try:
                while True:
                    await asyncio.sleep(0.5)
                    ledger = (await asyncio.to_thread(get_budget, kube, rig.namespace, name)).get("status", {}).get("ledger") or {}
                    proxies = ledger.get("proxies") or {}
                    if not proxies:
                        continue
                    pid, acct = sorted(proxies.items())[0]
                    big = {"inputTokens": 400_000, "outputTokens": 100_000, "cost": "0"}
                    body = {"proxyId": pid, "namespace": rig.namespace, "seq": acct["seq"], "budgets": {
                        name: {"periodStart": ledger["periodStart"], "used": big, "want": big}}}
                    for token, status in ((None, 401), (foreign, 403), (wrong_audience, 401)):
                        headers = {"Authorization": f"Bearer {token}"} if token else {}
                        resp = await http.post(url, json=body, headers=headers)
                        assert resp.status_code == status, (status, resp.text)
                        seen[str(status)] = seen.get(str(status), 0) + 1
                    # A replay of a seq already applied, with a valid token: answered, changes nothing.
                    resp = await http.post(url, json=body, headers={"Authorization": f"Bearer {own}"})
                    assert resp.status_code == 200, resp.text
                    seen["replayed"] = seen.get("replayed", 0) + 1
            finally:
                await asyncio.to_thread(client.CoreV1Api(kube).delete_namespace, other)

    return forge, seen


def test_exact_under_8x64_concurrent_streams_and_forged_reports(rig, kube):
    """8 proxies x 64 concurrent clients spend b1 until every proxy refuses it as exhausted. The
    TokenBudget's final used is <= the limit (overshoot 0) and equals what the upstream billed, input
    and output separately; forged reports meanwhile are refused or ignored."""
    before = rig.upstream.totals()
    forge, seen = forger(rig, kube, "b1")
    res = asyncio.run(drive(rig, 1, during=forge))
    used, billed = settle_and_compare(rig, kube, "b1", before)
    lat = cutoff_latencies(rig, kube, "b1", res)
    report("run 1", used, billed, res, lat)
    print(f"[run 1] forged reports sent: {seen}")
    assert not res.errors, res.errors[:10]
    assert used["totalTokens"] <= LIMIT  # overshoot 0
    assert {k: used[k] for k in billed} == billed  # nothing lost, nothing counted twice
    assert used["totalTokens"] > LIMIT * 0.99  # the budget was spent, not stranded in leases
    assert all(res.kinds.get(k) for k in ("stream", "unary", "anthropic", "anthropic-translated")), res.kinds
    assert all(seen.get(k) for k in ("401", "403", "replayed")), seen
    # Generous: CI runs everything on 2 shared cores; bench/cutoff_latency.py measures the real figure.
    assert len(lat) == N_PROXIES and max(lat) <= CUTOFF_TEST_BOUND, lat


# Runs 2 and 3 wait out an operator restart or a dead proxy's lease: on a loaded machine a restart
# alone took 28 s, so their deadlines are generous (they end as soon as every proxy is cut off).
OUTAGE_DEADLINE = 300.0
RESTART_TIMEOUT = 120.0
RECOVERY_BOUND = 30.0  # after the restart, until every proxy's lease is renewed


def _ledger(kube, ns: str, name: str) -> dict:
    return (get_budget(kube, ns, name).get("status") or {}).get("ledger") or {}


def _in_flight(ledger: dict) -> int:
    """Tokens the proxies still held in flight at their last persisted reports."""
    return sum((a.get("held") or {}).get("inputTokens", 0) + (a.get("held") or {}).get("outputTokens", 0)
               for a in (ledger.get("proxies") or {}).values())


def test_exact_across_an_operator_sigkill_and_restart(rig, kube):
    """As above on b2, with the operator SIGKILLed (no shutdown flush) at about a third of the budget
    and restarted: the ledger resumes from TokenBudget status, the proxies' retried cumulative reports
    lose nothing and count nothing twice. The operator stays down until the proxies' leases have run
    out: they answer 503 ledger_unreachable (failMode Closed, the designed answer), counted apart
    from errors, and only between the kill and shortly after the restart. Even when the outage
    outlasts ttl + grace (a slow restart under load), the restarted operator charges none of them:
    they were silent only because nobody listened, their grace counts from its load."""
    before = rig.upstream.totals()
    killed: list[float] = []
    back: list[float] = []

    async def kill_and_restart(res: RunResult) -> None:
        while rig.upstream.totals()["billed_prompt_tokens"] - before["billed_prompt_tokens"] < LIMIT * 0.3:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(rig.operator.kill)
        killed.append(time.time())
        # The proxies spend their leases meanwhile; no proxy may go on past its lease's expiry.
        give_up = time.monotonic() + LEASE_TTL + 60
        while not res.unreachable:
            assert time.monotonic() < give_up, "the proxies kept admitting requests past their leases' expiry"
            await asyncio.sleep(0.05)
        await asyncio.to_thread(rig.operator.start, RESTART_TIMEOUT)
        back.append(time.time())

    res = asyncio.run(drive(rig, 2, during=kill_and_restart, deadline=OUTAGE_DEADLINE))
    wait_for(lambda: _in_flight(_ledger(kube, rig.namespace, "b2")) == 0, timeout=60,
             what="b2: every proxy's final report (nothing held in flight)")
    used, billed = settle_and_compare(rig, kube, "b2", before, timeout=60)
    lat = cutoff_latencies(rig, kube, "b2", res)
    report("run 2", used, billed, res, lat)
    print(f"[run 2] operator down {back[0] - killed[0]:.1f} s; 503 ledger_unreachable answers {res.unreachable}"
          + (f" from +{res.unreachable_at[0] - killed[0]:.1f} s to +{res.unreachable_at[-1] - killed[0]:.1f} s"
             f" after the kill" if res.unreachable_at else ""))
    assert killed and back and rig.operator.runs >= 2
    ledger = _ledger(kube, rig.namespace, "b2")
    # Nobody was presumed dead: no charge left, and none reconciled either (a proxy that returns
    # after a charge stays excluded from the breakdown for the period).
    assert not ledger.get("tombstones") and not (ledger.get("breakdown") or {}).get("excluded"), ledger.get("breakdown")
    assert not res.errors, res.errors[:10]
    # 503 only while the ledger could not answer: after the kill, and until each proxy's next report
    # after the restart is answered (reports retry every second; generous for a loaded machine,
    # where the first answers wait for TokenReviews and status writes: the last 503 came 0.7-3.2 s after it at load 15-18).
    assert all(killed[0] <= t <= back[0] + RECOVERY_BOUND for t in res.unreachable_at), \
        (killed, back, res.unreachable_at[-5:])
    assert used["totalTokens"] <= LIMIT  # overshoot 0
    assert {k: used[k] for k in billed} == billed  # nothing lost, nothing counted twice
    assert used["totalTokens"] > LIMIT * 0.99
    assert len(lat) == N_PROXIES


def test_a_proxy_killed_mid_stream_is_charged_its_escrow(rig, kube):
    """As above on b3, with one proxy SIGKILLed while its streams are in flight (each stream takes
    ~0.1 s here). The upstream billed those streams, but the dead proxy never reports them: a safe
    ledger charges the dead proxy's whole escrow (its ceiling, which covers everything it settled or had
    in flight) once its lease has expired and the grace has passed (ttl + grace after its last report).
    So the ledger may count MORE than was billed (the unused part of that escrow), never less, and
    never more than the limit: upstream billed <= used <= limit. The rest of the budget is still
    spent by the live proxies, which are all cut off in the end."""
    before = rig.upstream.totals()
    victim = rig.proxies[-1]
    # The ledger knows proxies by the random id each process reports with: the victim's is the one
    # that disappears from the ledger's accounts.
    ids = set(wait_for(lambda: len(_ledger(kube, rig.namespace, "b3").get("proxies") or {}) == N_PROXIES
                       and _ledger(kube, rig.namespace, "b3")["proxies"], timeout=30, what="b3: every proxy's account"))
    assert not _ledger(kube, rig.namespace, "b3").get("tombstones")

    killed: list[float] = []

    async def kill_one(res: RunResult) -> None:
        while rig.upstream.totals()["billed_prompt_tokens"] - before["billed_prompt_tokens"] < LIMIT * 0.3:
            await asyncio.sleep(0.05)
        victim.proc.kill()
        killed.append(time.time())
        await asyncio.to_thread(victim.proc.wait)

    # The victim stays dead: this test runs last in the module.
    res = asyncio.run(drive(rig, 3, during=kill_one, extra={"x-mock-chunk-delay-ms": "2"}, deadline=OUTAGE_DEADLINE))
    victim_ids = wait_for(lambda: _ledger(kube, rig.namespace, "b3").get("tombstones"),
                          timeout=LEASE_TTL + LEASE_GRACE + 30, what="the dead proxy charged its escrow")
    wait_for(lambda: _in_flight(_ledger(kube, rig.namespace, "b3")) == 0, timeout=60,
             what="b3: the live proxies' final reports (nothing held in flight)")
    used, billed = _used(kube, rig.namespace, "b3"), billed_since(rig, before)
    lat = cutoff_latencies(rig, kube, "b3", res)
    report("run 3", used, billed, res, lat)
    total_billed = billed["inputTokens"] + billed["outputTokens"]
    spent_at = _ledger(kube, rig.namespace, "b3").get("exhaustedAt")
    print(f"[run 3] ledger used - upstream billed = {used['totalTokens'] - total_billed} "
          f"(the dead proxy's unused escrow; charged for {sorted(victim_ids)})"
          + (f"; budget spent {spent_at - killed[0]:.1f} s after the kill (lease {LEASE_TTL:g} s + grace "
             f"{LEASE_GRACE:g} s)" if spent_at and killed else ""))
    assert killed
    assert set(victim_ids) == ids - set(_ledger(kube, rig.namespace, "b3").get("proxies") or {}), victim_ids
    assert len(victim_ids) == 1
    assert not res.errors, res.errors[:10]
    assert total_billed <= used["totalTokens"] <= LIMIT  # nothing billed goes uncounted; overshoot 0
    assert len(lat) == N_PROXIES - 1  # every live proxy cut off: the budget was spent, not stranded
