"""Operator scale benchmark: N namespaces, each with a TokenBudget and a ModelRoute, on the real local
control plane (etcd + kube-apiserver + kube-controller-manager, spendwarden.localcluster), and the
real `spendwarden operator` process.

Measures (see bench/README.md):
  1. reconcile: the objects exist before the operator starts (a cold start or restart over a full
     cluster); time from the process start until every namespace has its rendered ConfigMap and
     every TokenBudget and ModelRoute reports Ready=True for its current generation.
  2. operator RSS: peak over the whole run, and steady (idle, after the reconcile and after load).
  3. ledger throughput: real HTTP POST /v1/report from several client processes (each connection
     is one proxy: one report in flight, strictly increasing seq, growing cumulative usage, like a
     busy proxy). Row 1 with authentication on: real projected ServiceAccount tokens (audience
     spendwarden) for a subset of namespaces, each checked once by TokenReview and then cached by
     the operator. Row 2 restarts the operator with --ledger-insecure (no authentication).

Not a test: nothing here is asserted; the numbers go to bench/README.md with the command.
  ~/.cache/spendwarden/venv-dev/bin/python bench/scale_bench.py [--namespaces 2000] [--duration 15]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "operator"))

GROUP, VERSION = "spendwarden.io", "v1alpha1"
PREFIX = "sb-"
OPERATOR_CORE, LOAD_CORE = "1", "0"

BUDGET = {"period": {"type": "Monthly"}, "limits": {"tokens": {"total": 10**12}}, "thresholds": [80],
          "onExceeded": "AlertOnly", "failMode": "Open"}
ROUTE = {"model": "chat", "defaultBackend": "mini", "backends": [{
    "name": "mini", "provider": "OpenAI", "url": "https://api.openai.com/v1", "model": "gpt-4o-mini",
    "pricing": {"input": "0.15", "output": "0.60"}, "credentials": {"secretRef": {"name": "openai", "key": "apiKey"}}}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ns_name(i: int) -> str:
    return f"{PREFIX}{i:05d}"


# -- cluster set-up ----------------------------------------------------------------------------------

def create_objects(cp: Any, n: int, threads: int = 12) -> float:
    from kubernetes import client

    api = cp.api_client()
    api.configuration.connection_pool_maxsize = threads
    api.rest_client.pool_manager.connection_pool_kw["maxsize"] = threads
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)

    def one(i: int) -> None:
        ns = ns_name(i)
        core.create_namespace({"metadata": {"name": ns}})
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, "tokenbudgets", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "TokenBudget", "metadata": {"name": "monthly"}, "spec": BUDGET})
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, "modelroutes", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelRoute", "metadata": {"name": "chat"}, "spec": ROUTE})

    t = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(n)))
    return time.monotonic() - t


def tokens_for(cp: Any, count: int, threads: int = 8) -> dict[str, str]:
    """A projected ServiceAccount token (audience spendwarden) for each of the first `count` namespaces."""
    from kubernetes import client

    core = client.CoreV1Api(cp.api_client())

    def one(i: int) -> tuple[str, str]:
        ns = ns_name(i)
        core.create_namespaced_service_account(ns, {"metadata": {"name": "proxy"}})
        tr = core.create_namespaced_service_account_token("proxy", ns, {
            "spec": {"audiences": ["spendwarden"], "expirationSeconds": 3600}})
        return ns, tr.status.token

    with ThreadPoolExecutor(threads) as pool:
        return dict(pool.map(one, range(count)))


def wait_quiet(cp: Any, n: int, timeout: float = 300) -> float:
    """kube-controller-manager creates a ServiceAccount and token Secret per namespace; let it finish
    so that its work does not count against the operator."""
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        items = list_items(cp, "/api/v1/secrets?fieldSelector=type%3Dkubernetes.io%2Fservice-account-token")
        if sum(1 for s in items if s["metadata"]["namespace"].startswith(PREFIX)) >= n:
            break
        time.sleep(2)
    return time.monotonic() - t


def list_items(cp: Any, path: str) -> list[dict]:
    for _ in range(5):  # a loaded apiserver may take a while to list thousands of objects
        try:
            status, body = cp._rest.request("GET", path, timeout=60)
            if status == 200:
                return body["items"]
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"cannot list {path}")


def ready_counts(cp: Any) -> dict[str, int]:
    def ready(o: dict) -> bool:
        st = o.get("status") or {}
        return (st.get("observedGeneration") == o["metadata"].get("generation")
                and any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or []))

    out = {"configmaps": sum(1 for o in list_items(cp, "/api/v1/configmaps?labelSelector=app.kubernetes.io%2Fmanaged-by%3Dspendwarden")
                             if o["metadata"]["namespace"].startswith(PREFIX))}
    for key, path in (("tokenbudgets", f"/apis/{GROUP}/{VERSION}/tokenbudgets"),
                      ("modelroutes", f"/apis/{GROUP}/{VERSION}/modelroutes")):
        out[key] = sum(1 for o in list_items(cp, path) if o["metadata"]["namespace"].startswith(PREFIX) and ready(o))
    return out


# -- the operator process ----------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)


class RssSampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, float]] = []
        self.stop_flag = threading.Event()

    def rss_mb(self) -> float:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def run(self) -> None:
        while not self.stop_flag.wait(self.interval):
            self.samples.append((time.monotonic(), self.rss_mb()))

    def peak(self) -> float:
        return max((r for _, r in self.samples), default=0.0)

    def steady(self, seconds: float = 5) -> float:
        """Median RSS over the last `seconds` (the process idle)."""
        now = time.monotonic()
        recent = sorted(r for t, r in self.samples if now - t <= seconds) or [self.rss_mb()]
        return recent[len(recent) // 2]


class Operator:
    def __init__(self, cp: Any, work: Path, pin: bool, insecure: bool, extra_env: dict[str, str]):
        self.health, self.ledger, self.metrics = free_port(), free_port(), free_port()
        # Cluster-wide, as the chart runs it by default. (With --namespace globs kopf opens two watch
        # streams per matching namespace: 4,000 here, which took minutes and over 500 MB.)
        cmd = [sys.executable, "-m", "spendwarden.cli", "operator",
               "--liveness", f"http://127.0.0.1:{self.health}/healthz", "--ledger-port", str(self.ledger),
               "--metrics-port", str(self.metrics), "--log-format", "plain"]
        if insecure:
            cmd.append("--ledger-insecure")
        if pin:
            cmd = ["taskset", "-c", OPERATOR_CORE, *cmd]
        env = {**cp.env(), "PYTHONPATH": str(ROOT / "operator"), **extra_env}
        self.log_path = work / f"operator-{'insecure' if insecure else 'auth'}.log"
        self.log = open(self.log_path, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.rss = RssSampler(self.proc.pid)
        self.rss.start()

    def wait_url(self, url: str, timeout: float = 60) -> float:
        import httpx
        while time.monotonic() - self.started < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"operator exited {self.proc.returncode}; log {self.log_path}")
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return time.monotonic() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"{url} not answering after {timeout}s; log {self.log_path}")

    def stop(self) -> None:
        self.rss.stop_flag.set()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# -- ledger load ---------------------------------------------------------------------------------------

def _client_process(port: int, targets: list[tuple[str, str]], period_start: str, warmup: float, duration: float,
                    out: Any) -> None:
    """One load process: one connection per target (namespace, token), reports back to back."""
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    out.put(asyncio.run(_client_main(port, targets, period_start, warmup, duration)))


async def _client_main(port: int, targets: list[tuple[str, str]], period_start: str, warmup: float,
                       duration: float) -> dict[str, Any]:
    t_start = time.monotonic()
    t_measure, t_end = t_start + warmup, t_start + warmup + duration
    counts: dict[str, int] = {}
    latencies: list[float] = []

    async def proxy(ns: str, token: str) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        pid, seq, used = uuid.uuid4().hex, 0, 0
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        while time.monotonic() < t_end:
            seq += 1
            used += 37
            body = (f'{{"proxyId":"{pid}","namespace":"{ns}","seq":{seq},"budgets":{{"monthly":{{'
                    f'"periodStart":"{period_start}","used":{{"inputTokens":{used},"outputTokens":{used // 3},'
                    '"cost":"0"},"held":{"inputTokens":0,"outputTokens":0,"cost":"0"}}}}').encode()
            head = (f"POST /v1/report HTTP/1.1\r\nHost: ledger\r\n{auth}Content-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode()
            t = time.monotonic()
            writer.write(head + body)
            status_line = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            done = time.monotonic()
            if t >= t_measure and done <= t_end:
                code = status_line.split(b" ", 2)[1].decode() if status_line else "eof"
                counts[code] = counts.get(code, 0) + 1
                latencies.append(done - t)
            if not status_line:
                return
        writer.close()

    errors = [e for e in await asyncio.gather(*(proxy(ns, tok) for ns, tok in targets), return_exceptions=True) if e]
    if errors:
        counts["client_error:" + type(errors[0]).__name__ + ":" + str(errors[0])[:80]] = len(errors)
    latencies.sort()
    return {"counts": counts, "latencies": latencies[:: max(1, len(latencies) // 2000)]}


def ledger_load(port: int, targets: list[tuple[str, str]], period_start: str, processes: int, warmup: float,
                duration: float, pin: bool) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    chunks = [targets[i::processes] for i in range(processes)]
    procs = [ctx.Process(target=_client_process, args=(port, c, period_start, warmup, duration, out)) for c in chunks]
    for p in procs:
        p.start()
        if pin:
            subprocess.run(["taskset", "-p", "-c", LOAD_CORE, str(p.pid)], check=False, capture_output=True)
    results = [out.get(timeout=warmup + duration + 120) for _ in procs]
    for p in procs:
        p.join(30)
    counts: dict[str, int] = {}
    lat: list[float] = []
    for r in results:
        for k, v in r["counts"].items():
            counts[k] = counts.get(k, 0) + v
        lat += r["latencies"]
    lat.sort()
    ok = counts.get("200", 0)

    def pct(q: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 2) if lat else None
    return {"reports_per_s": round(ok / duration), "ok": ok, "statuses": counts, "p50_ms": pct(0.5),
            "p99_ms": pct(0.99), "connections": len(targets), "processes": processes, "seconds": duration}


# -- main ----------------------------------------------------------------------------------------------

def git_state() -> dict[str, Any]:
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True).stdout.strip()
    return {"head": git("rev-parse", "--short", "HEAD"),
            "operator_dirty": bool(git("status", "--porcelain", "--", "operator/spendwarden"))}


def phase_operator(cp: Any, args: argparse.Namespace, work: Path, insecure: bool, n: int,
                   tokens: dict[str, str], env: dict[str, str]) -> dict[str, Any]:
    op = Operator(cp, work, args.pin, insecure, env)
    result: dict[str, Any] = {"auth": "none (--ledger-insecure)" if insecure else "TokenReview"}
    try:
        result["live_s"] = round(op.wait_url(f"http://127.0.0.1:{op.health}/healthz"), 2)
        counts: dict[str, int] = {}
        while time.monotonic() - op.started < args.reconcile_timeout:
            counts = ready_counts(cp)
            if min(counts.values()) >= n:
                break
            if op.proc.poll() is not None:
                raise SystemExit(f"operator exited; log {op.log_path}")
            time.sleep(1)
        result["reconciled_s"] = round(time.monotonic() - op.started, 2)
        result["reconciled"] = counts
        # After a restart the apiserver already shows everything Ready: the operator's own log says
        # when it has gone through every namespace (one "namespace reconciled" line each).
        while op.log_path.read_bytes().count(b"namespace reconciled") < n and time.monotonic() - op.started < args.reconcile_timeout:
            time.sleep(0.5)
        result["reconciled_per_log_s"] = round(time.monotonic() - op.started, 2)
        result["operator_cpu_s_at_reconciled"] = cpu_seconds(op.proc.pid)
        result["rss_peak_reconcile_mb"] = round(op.rss.peak(), 1)
        time.sleep(args.settle)
        result["rss_steady_after_reconcile_mb"] = round(op.rss.steady(), 1)
        _, budget = cp.request("GET", f"/apis/{GROUP}/{VERSION}/namespaces/{ns_name(0)}/tokenbudgets/monthly")
        period_start = budget["status"]["periodStart"]
        if insecure:
            targets = [(ns_name(i % n), "") for i in range(args.connections)]
        else:
            names = sorted(tokens)
            targets = [(names[i % len(names)], tokens[names[i % len(names)]]) for i in range(args.connections)]
        spy = None
        if args.py_spy:  # a profile of the operator under the ledger load (py-spy raw format)
            spy = subprocess.Popen([args.py_spy, "record", "-d", str(int(args.warmup + args.duration)), "-p",
                                    str(op.proc.pid), "-f", "raw", "-o", str(work / f"profile-{result['auth'][:4]}.txt")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cpu_before, t_before = cpu_seconds(op.proc.pid), time.monotonic()
        result["ledger"] = ledger_load(op.ledger, targets, period_start, args.clients, args.warmup, args.duration, args.pin)
        cpu_used, wall = cpu_seconds(op.proc.pid) - cpu_before, time.monotonic() - t_before
        # Reports answered during the whole load (warm-up included), estimated from the measured rate.
        answered = result["ledger"]["reports_per_s"] * (args.warmup + args.duration)
        result["ledger"]["operator_cpu_share"] = round(cpu_used / wall, 2)
        result["ledger"]["cpu_us_per_report"] = round(cpu_used / answered * 1e6) if answered else None
        result["ledger"]["budgets_reported"] = len({ns for ns, _ in targets})
        if spy is not None:
            spy.wait(60)
        result["rss_peak_mb"] = round(op.rss.peak(), 1)
        time.sleep(args.settle)
        result["rss_steady_after_load_mb"] = round(op.rss.steady(), 1)
    finally:
        op.stop()
    result["log"] = str(op.log_path)
    return result


def table(res: dict[str, Any]) -> str:
    n = res["namespaces"]
    lines = ["| run | reconcile all (from process start) | RSS peak / steady MB | ledger reports/s (p50 / p99 ms) |",
             "|---|---|---|---|"]
    for r in res["runs"]:
        led = r.get("ledger", {})
        lines.append(f"| {r['auth']}, {led.get('budgets_reported')} budgets, {led.get('connections')} conns "
                     f"| {n} ns in {r['reconciled_s']} s by the apiserver, {r['reconciled_per_log_s']} s by the log "
                     f"(live at {r['live_s']} s; operator CPU {r['operator_cpu_s_at_reconciled']} s) "
                     f"| {r.get('rss_peak_mb')} / {r.get('rss_steady_after_load_mb')} "
                     f"(after reconcile {r['rss_steady_after_reconcile_mb']}) "
                     f"| {led.get('reports_per_s')} ({led.get('p50_ms')} / {led.get('p99_ms')}); operator had "
                     f"{led.get('operator_cpu_share')} of a core, {led.get('cpu_us_per_report')} µs CPU per report |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--namespaces", type=int, default=2000)
    ap.add_argument("--token-namespaces", type=int, default=200, help="namespaces whose proxies report with real tokens")
    ap.add_argument("--connections", type=int, default=200, help="concurrent proxies (connections) reporting")
    ap.add_argument("--clients", type=int, default=3, help="load processes")
    ap.add_argument("--warmup", type=float, default=5)
    ap.add_argument("--duration", type=float, default=15)
    ap.add_argument("--settle", type=float, default=8, help="idle seconds before a steady RSS sample")
    ap.add_argument("--reconcile-timeout", type=float, default=600)
    ap.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin operator / load to cores 1 / 0")
    ap.add_argument("--skip-insecure", action="store_true", help="only the authenticated row")
    ap.add_argument("--py-spy", help="path of py-spy: profile the operator during the ledger load")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for the operator (experiments)")
    args = ap.parse_args()
    if args.pin and (os.cpu_count() or 1) < 2:
        args.pin = False

    from spendwarden.localcluster.controlplane import ControlPlane

    work = Path(tempfile.mkdtemp(prefix="spendwarden-scale-"))
    env = dict(kv.split("=", 1) for kv in args.env)
    res: dict[str, Any] = {"namespaces": args.namespaces, "git": git_state(), "python": platform.python_version(),
                           "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(), "work": str(work),
                           "operator_env": env, "args": vars(args)}
    t = time.monotonic()
    with ControlPlane(crds=[ROOT / "crds"]) as cp:
        res["control_plane_s"] = round(time.monotonic() - t, 1)
        if args.pin:  # etcd, apiserver and controller-manager share the load's core: core 1 is the operator's
            for proc in cp._procs:
                if proc.popen is not None:
                    subprocess.run(["taskset", "-a", "-p", "-c", LOAD_CORE, str(proc.popen.pid)], check=False,
                                   capture_output=True)
        print(f"control plane up in {res['control_plane_s']} s; creating {args.namespaces} namespaces", flush=True)
        res["create_s"] = round(create_objects(cp, args.namespaces), 1)
        tokens = tokens_for(cp, min(args.token_namespaces, args.namespaces))
        res["controller_manager_settle_s"] = round(wait_quiet(cp, args.namespaces), 1)
        print(f"created in {res['create_s']} s (+{res['controller_manager_settle_s']} s for the controller-manager)",
              flush=True)
        res["runs"] = []
        for insecure in ([False] if args.skip_insecure else [False, True]):
            run = phase_operator(cp, args, work, insecure, args.namespaces, tokens, env)
            print(json.dumps(run), flush=True)
            res["runs"].append(run)
    res["loadavg_after"] = os.getloadavg()
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    path = results / f"scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(res, indent=2))
    print(table(res))
    print(f"\nfull result: {path}; git {res['git']}; load {res['loadavg_before']} -> {res['loadavg_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
