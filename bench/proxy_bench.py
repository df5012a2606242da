"""Proxy overhead benchmark: one machine, one run, one mock upstream, several paths to it.

    ~/.cache/spendwarden/venv-dev/bin/python bench/proxy_bench.py [--duration 10] [--only direct,bare,...]

Paths measured (each a column of the result):
    direct       wrk -> mock upstream (the ceiling of the environment)
    bare         wrk -> bench/bare_passthrough.py (aiohttp, parses JSON both ways) -> mock
    spendwarden  wrk -> `spendwarden proxy --config FILE` (routes + a budget) -> mock; skipped with a
                 message if the command is missing or does not come up
    gateway      wrk -> `spendwarden gateway` (the same tenant config, as the operator writes it, and
                 every request authenticated: a ServiceAccount token of a local control plane,
                 TokenReview answers cached 30 s as in production; rate limits off) -> mock
    litellm      wrk -> LiteLLM proxy (separate venv, created on demand; offline cost map, one worker,
                 no database) -> mock

Pinning (2 cores): the proxy under test gets core 1 alone; the load generator (wrk, or this script's
asyncio client for streams) and the mock upstream share core 0. The mock is far faster than any
proxy, so the proxy's core is the bottleneck. For the direct column the same mock process is moved
to core 1 (taskset -p), so that it is measured on the core a proxy would get.

The numbers are only comparable within one run: other work on the machine shifts them all. The load
average before and after is recorded, and a warning printed when the machine was not idle.

Measures, per path: latency p50/p99 at c=1 and at about half of the path's max rate; max requests/s
at c=32 and the path's CPU time per request during that run; time to first token on streams (c=1);
how many of N concurrent slow streams complete; RSS idle and under load (for spendwarden also the
working set of its own memory cgroup, where the machine lets one be created, as the kubelet reports
a container's); for spendwarden, the start-up time from process start to /healthz. Writes
bench/results/proxy-<time>.json and prints a markdown table. Everything listens on 127.0.0.1 and every
loop is bounded.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LITELLM_VENV = Path.home() / ".cache" / "spendwarden" / "venv-litellm"
PROXY_CORE, LOAD_CORE = "1", "0"

CHAT_MODEL = "bench-chat"      # plain non-stream requests: 16 output tokens
STREAM_MODEL = "bench-stream"  # TTFT: 8 tokens, 5 ms apart
SLOW_MODEL = "bench-slow"      # held streams: 10 tokens, 500 ms apart (about 5 s per stream)
MODEL_BEHAVIOURS = {
    STREAM_MODEL: {"tokens": 8, "chunk_delay_ms": 5},
    SLOW_MODEL: {"tokens": 10, "chunk_delay_ms": 500},
}
PROMPT = "Summarise the quarterly spend report for the platform team in three sentences."
# A per-run throwaway key: LiteLLM refuses to start without a strong master key, and every path gets
# the same Authorization header so that the request bytes are identical.
BEARER = "sk-bench-" + secrets.token_hex(16)  # the gateway path replaces it with a ServiceAccount token
CONTROL_PLANES: list[Any] = []  # started for the gateway path, stopped at the end
BODY = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16}

WRK_LUA = """
wrk.method = "POST"
wrk.body = [[%(body)s]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(bearer)s"
%(delay)s
done = function(summary, latency, requests)
  io.write(string.format(
    "WRKJSON {\\"requests\\":%%d,\\"duration_us\\":%%d,\\"connect_errors\\":%%d,\\"read_errors\\":%%d," ..
    "\\"write_errors\\":%%d,\\"status_errors\\":%%d,\\"timeouts\\":%%d,\\"p50_us\\":%%d,\\"p90_us\\":%%d," ..
    "\\"p99_us\\":%%d,\\"mean_us\\":%%.1f,\\"max_us\\":%%d}\\n",
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, latency.max))
end
"""


# -- processes ----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and all its descendants (LiteLLM/uvicorn may fork), in MB."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, IndexError, ValueError):
                continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return round(total / 1024, 1)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (its threads included), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class MemCgroup:
    """A fresh memory cgroup (v2, else v1) for one process, so that its memory is also read as the
    kubelet reads a container's: working set = usage (memory.current) - inactive file pages. None
    of it when the machine has no writable memory controller."""

    def __init__(self, name: str):
        self.path: Path | None = None
        self.v2 = False
        for root, v2 in ((Path("/sys/fs/cgroup"), True), (Path("/sys/fs/cgroup/unified"), True),
                         (Path("/sys/fs/cgroup/memory"), False)):
            try:
                if v2 and "memory" not in (root / "cgroup.controllers").read_text().split():
                    continue
                if not v2 and not (root / "memory.usage_in_bytes").exists():
                    continue
                path = root / f"{name}-{os.getpid()}"
                path.mkdir(exist_ok=True)
                self.path, self.v2 = path, v2
                return
            except OSError:
                continue

    def wrap(self, cmd: list[str]) -> list[str]:
        """`cmd`, started inside the cgroup (so that all its memory is charged there)."""
        if self.path is None:
            return cmd
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.path), *cmd]

    def working_set_mb(self) -> float | None:
        if self.path is None:
            return None
        try:
            usage = int((self.path / ("memory.current" if self.v2 else "memory.usage_in_bytes")).read_text())
            stat = dict(line.split() for line in (self.path / "memory.stat").read_text().splitlines())
            inactive = int(stat.get("inactive_file" if self.v2 else "total_inactive_file", 0))
        except (OSError, ValueError):
            return None
        return round(max(usage - inactive, 0) / 2**20, 1)

    def remove(self) -> None:
        if self.path is not None:
            for _ in range(50):  # the killed process leaves the cgroup a moment later
                try:
                    self.path.rmdir()
                    return
                except OSError:
                    time.sleep(0.1)


class Proc:
    """A child process in its own process group, logged to a file, stopped by group."""

    def __init__(self, name: str, cmd: list[str], workdir: Path, env: dict[str, str] | None = None,
                 cgroup: MemCgroup | None = None):
        self.name = name
        self.cgroup = cgroup
        if cgroup is not None:
            cmd = cgroup.wrap(cmd)
        self.log = workdir / f"{name}.log"
        with open(self.log, "wb") as log:
            self.p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=env or dict(os.environ), start_new_session=True)

    def alive(self) -> bool:
        return self.p.poll() is None

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(5)
            except ProcessLookupError:
                pass
        if self.cgroup is not None:
            self.cgroup.remove()


def post_json(url: str, body: dict[str, Any], timeout: float = 5) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json", "authorization": f"Bearer {BEARER}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, None


def wait_ready(proc: Proc, url: str, timeout: float) -> str | None:
    """None when `url` answers a chat completion with usage; else why not."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            return f"{proc.name} exited with {proc.p.returncode}:\n{proc.tail()}"
        try:
            status, data = post_json(url, BODY, timeout=5)
            if status == 200 and isinstance(data, dict) and data.get("usage"):
                return None
            last = f"HTTP {status}"
        except (OSError, ValueError) as exc:
            last = str(exc)
        time.sleep(0.25)
    return f"{proc.name} not ready after {timeout:.0f}s ({last}):\n{proc.tail()}"


# -- the paths ------------------------------------------------------------------------------------

def spendwarden_config(mock: str, path: Path) -> Path:
    """A ProxyConfig: one route per bench model to the mock, and a (never exhausted) budget."""
    def route(alias: str) -> dict[str, Any]:
        return {"name": alias, "spec": {
            "model": alias, "defaultBackend": "mock",
            "backends": [{"name": "mock", "provider": "OpenAICompatible", "url": mock + "/v1", "model": alias,
                          "pricing": {"input": "0.15", "output": "0.60"}}]}}

    cfg = {"schemaVersion": 1, "namespace": "bench",
           "routes": [route(m) for m in sorted((CHAT_MODEL, STREAM_MODEL, SLOW_MODEL))],
           "budgets": [{"name": "bench", "spec": {"window": "24h", "onExceeded": "CutOff",
                                                  "limits": {"tokens": {"total": 10**15}, "cost": {"amount": "1000000000"}}}}]}
    path.write_text(json.dumps(cfg, indent=2))
    return path


def ensure_litellm() -> Path | None:
    exe = LITELLM_VENV / "bin" / "litellm"
    if exe.exists():
        return exe
    print(f"creating {LITELLM_VENV} with litellm[proxy] (one-off, a few minutes)...", flush=True)
    try:
        subprocess.run([_base_python(), "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)
    except (subprocess.CalledProcessError, OSError) as exc:
        print(f"could not install LiteLLM: {exc}", flush=True)
        return None
    return exe if exe.exists() else None


def _base_python() -> str:
    # The venv's base interpreter, so the LiteLLM venv does not inherit the dev venv's packages.
    return str(Path(sys.base_prefix) / "bin" / "python3")


def litellm_config(mock: str, path: Path) -> Path:
    lines = ["model_list:"]
    for m in (CHAT_MODEL, STREAM_MODEL, SLOW_MODEL):
        lines += [f"  - model_name: {m}", "    litellm_params:", f"      model: openai/{m}",
                  f"      api_base: {mock}/v1", "      api_key: sk-bench-not-a-secret"]
    lines += ["litellm_settings:", "  drop_params: true", "  telemetry: false", "  turn_off_message_logging: true"]
    path.write_text("\n".join(lines) + "\n")
    return path


def gateway_token(work: Path) -> tuple[Any, str] | str:
    """(control plane, kubeconfig) with a ServiceAccount token of namespace `bench` as BEARER, or why not.
    The control plane (etcd + kube-apiserver) inherits this script's load core: it is asked once per
    token and review TTL, not per request."""
    global BEARER
    try:
        from kubernetes import client

        from spendwarden.localcluster.controlplane import ControlPlane
        cp = ControlPlane(controller_manager=False, node=False)
        cp.start()
    except Exception as exc:  # noqa: BLE001 - the binaries are missing or it did not start: skip the path
        return f"no local control plane for TokenReview ({type(exc).__name__}: {exc}); run scripts/setup.sh"
    api = cp.api_client()
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": "bench"}})
    core.create_namespaced_service_account("bench", {"metadata": {"name": "app"}})
    BEARER = core.create_namespaced_service_account_token("app", "bench", {"spec": {
        "audiences": ["spendwarden"], "expirationSeconds": 3600}}).status.token
    return cp, str(cp.kubeconfig)


def start_path(name: str, mock: str, work: Path) -> tuple[Proc | None, str | None, str | None]:
    """(process, base URL, skip reason) for one path."""
    port = free_port()
    pin = ["taskset", "-c", PROXY_CORE]
    if name == "bare":
        proc = Proc(name, pin + [sys.executable, str(HERE / "bare_passthrough.py"), str(port), mock], work)
        timeout = 20
    elif name == "spendwarden":
        cfg = spendwarden_config(mock, work / "spendwarden-config.json")
        proc = Proc(name, pin + [sys.executable, "-m", "spendwarden.cli", "proxy", "--config", str(cfg),
                                 "--port", str(port), "--metrics-port", str(free_port())], work,
                    cgroup=MemCgroup("spendwarden-bench"))
        timeout = 30
    elif name == "gateway":
        got = gateway_token(work)
        if isinstance(got, str):
            return None, None, got
        CONTROL_PLANES.append(got[0])
        tenants = work / "gateway-tenants"
        tenants.mkdir(exist_ok=True)
        spendwarden_config(mock, tenants / "bench.json")
        (work / "gateway-secrets").mkdir(exist_ok=True)
        proc = Proc(name, pin + [sys.executable, "-m", "spendwarden.cli", "gateway", "--config-dir", str(tenants),
                                 "--secrets-dir", str(work / "gateway-secrets"), "--kubeconfig", got[1],
                                 "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(free_port()),
                                 "--namespace-rate", "0", "--serviceaccount-rate", "0"], work)
        timeout = 30
    elif name == "litellm":
        exe = ensure_litellm()
        if exe is None:
            return None, None, "LiteLLM could not be installed"
        cfg = litellm_config(mock, work / "litellm-config.yaml")
        # Offline cost map, no telemetry, and no database (in-memory state, as in a no-DB deployment).
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        env |= {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False",
                "NO_DOCS": "True", "LITELLM_MASTER_KEY": BEARER}
        proc = Proc(name, pin + [str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port),
                                 "--num_workers", "1"], work, env)
        timeout = 180
    else:
        raise ValueError(name)
    base = f"http://127.0.0.1:{port}"
    why = wait_ready(proc, base + "/v1/chat/completions", timeout)
    if why is not None:
        proc.stop()
        return None, None, why
    return proc, base, None


def startup_seconds(mock: str, work: Path, runs: int) -> dict[str, Any]:
    """The sidecar's start-up: process start (Popen, on its pinned core) to GET /healthz = 200,
    polled every 5 ms; `runs` starts, one at a time. Native sidecars hold the app until then."""
    samples = []
    cfg = spendwarden_config(mock, work / "spendwarden-config.json")
    for i in range(runs):
        port = free_port()
        t0 = time.perf_counter()
        proc = Proc(f"startup-{i}", ["taskset", "-c", PROXY_CORE, sys.executable, "-m", "spendwarden.cli", "proxy",
                                     "--config", str(cfg), "--port", str(port), "--metrics-port", str(free_port())], work)
        try:
            while time.perf_counter() - t0 < 30 and proc.alive():
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                        if r.status == 200:
                            samples.append(time.perf_counter() - t0)
                            break
                except (OSError, ValueError):
                    pass
                time.sleep(0.005)
        finally:
            proc.stop()
    samples.sort()
    return {"runs": runs, "ready": len(samples), "p50_s": round(statistics.median(samples), 3) if samples else None,
            "max_s": round(samples[-1], 3) if samples else None}


# -- load -----------------------------------------------------------------------------------------

def wrk(url: str, conns: int, seconds: float, work: Path, delay_ms: float | None = None) -> dict[str, Any]:
    script = work / f"wrk-{conns}-{delay_ms}.lua"
    delay = f"delay = function() return {delay_ms:.3f} end" if delay_ms else ""
    script.write_text(WRK_LUA % {"body": json.dumps(BODY), "delay": delay, "bearer": BEARER})
    cmd = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
           "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    m = re.search(r"WRKJSON (\{.*\})", out)
    if not m:
        raise RuntimeError(f"wrk produced no result:\n{out}")
    r = json.loads(m.group(1))
    r["rps"] = round(r["requests"] / (r["duration_us"] / 1e6), 1)
    r["errors"] = sum(r[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts"))
    return r


def _server_pid(proc: Proc) -> int:
    """The serving process: the child of the cgroup wrapper's exec is the same pid; LiteLLM's
    uvicorn may fork one worker, which is then the one to read."""
    kids = [int(d) for d in os.listdir("/proc") if d.isdigit() and _ppid(int(d)) == proc.p.pid]
    return kids[0] if len(kids) == 1 and cpu_seconds(kids[0]) > cpu_seconds(proc.p.pid) else proc.p.pid


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def ms(us: float) -> float:
    return round(us / 1000, 3)


async def ttft(base: str, n: int) -> dict[str, Any]:
    """Time to the first content token of a stream, c=1, n requests (after 5 warm-up ones)."""
    import aiohttp

    body = {"model": STREAM_MODEL, "messages": BODY["messages"], "max_tokens": 8, "stream": True,
            "stream_options": {"include_usage": True}}
    samples, usage_ok = [], 0
    async with aiohttp.ClientSession(headers={"authorization": f"Bearer {BEARER}"}) as s:
        for i in range(n + 5):
            t0 = time.perf_counter()
            first = None
            got_usage = False
            async with s.post(base + "/v1/chat/completions", json=body, timeout=aiohttp.ClientTimeout(total=30)) as r:
                async for line in r.content:
                    if first is None and line.startswith(b"data: ") and b'"content":"' in line and b'"content":""' not in line:
                        first = time.perf_counter() - t0
                    if b'"usage":{' in line:
                        got_usage = True
            if i >= 5 and first is not None:
                samples.append(first * 1000)
                usage_ok += got_usage
    samples.sort()
    return {"n": len(samples), "p50_ms": round(statistics.median(samples), 3) if samples else None,
            "p99_ms": round(samples[min(len(samples) - 1, int(len(samples) * 0.99))], 3) if samples else None,
            "usage_in_stream": usage_ok}


async def held_streams(base: str, n: int, proc: Proc | None) -> dict[str, Any]:
    """Open n slow streams (~5 s each) at once; count those that end with [DONE]; peak RSS meanwhile."""
    import aiohttp

    body = {"model": SLOW_MODEL, "messages": BODY["messages"], "max_tokens": 10, "stream": True,
            "stream_options": {"include_usage": True}}
    peak = 0.0

    async def one(s: aiohttp.ClientSession) -> bool:
        try:
            async with s.post(base + "/v1/chat/completions", json=body) as r:
                if r.status != 200:
                    return False
                done = False
                async for line in r.content:
                    done = done or line.startswith(b"data: [DONE]")
                return done
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def sample() -> None:
        nonlocal peak
        while proc is not None:
            peak = max(peak, tree_rss_mb(proc.p.pid))
            await asyncio.sleep(0.5)

    conn = aiohttp.TCPConnector(limit=0)
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60),
                                     headers={"authorization": f"Bearer {BEARER}"}) as s:
        sampler = asyncio.create_task(sample())
        results = await asyncio.gather(*(one(s) for _ in range(n)))
        sampler.cancel()
    return {"opened": n, "completed": sum(results), "seconds": round(time.perf_counter() - t0, 2),
            "peak_rss_mb": peak if proc is not None else None}


def measure(name: str, base: str, proc: Proc | None, args: argparse.Namespace, work: Path,
            direct: dict[str, Any] | None) -> dict[str, Any]:
    url = base + "/v1/chat/completions"
    res: dict[str, Any] = {}
    wrk(url, 8, 2, work)  # warm-up (imports, pools, JIT-less but cache-warm)
    res["rss_idle_mb"] = tree_rss_mb(proc.p.pid) if proc else None
    cg = proc.cgroup if proc else None
    if cg is not None:
        res["cgroup_working_set_idle_mb"] = cg.working_set_mb()
    res["c1"] = wrk(url, 1, args.duration, work)
    print(f"  {name}: c=1 p50 {ms(res['c1']['p50_us'])} ms, p99 {ms(res['c1']['p99_us'])} ms", flush=True)

    # Max rate at c=32, sampling the proxy's RSS while it runs.
    box: dict[str, Any] = {}

    def run32() -> None:
        box["r"] = wrk(url, args.connections, args.duration, work)

    import threading

    # The path's own CPU per answered request: unlike requests/s, it hardly moves with what else
    # runs on the machine (the process was served its CPU time, however slowly).
    cpu_pid = _server_pid(proc) if proc else None
    cpu0 = cpu_seconds(cpu_pid) if cpu_pid else None
    t = threading.Thread(target=run32)
    t.start()
    peak = 0.0
    cg_peak = None
    while t.is_alive():
        if proc:
            peak = max(peak, tree_rss_mb(proc.p.pid))
        if cg is not None and (ws := cg.working_set_mb()) is not None:
            cg_peak = max(cg_peak or 0.0, ws)
        t.join(0.5)
    res["cmax"] = box["r"]
    if cpu0 is not None and res["cmax"]["requests"]:
        res["cmax"]["cpu_us_per_request"] = round((cpu_seconds(cpu_pid) - cpu0) / res["cmax"]["requests"] * 1e6, 1)
    res["rss_load_mb"] = peak if proc else None
    if cg is not None:
        res["cgroup_working_set_load_mb"] = cg_peak
    print(f"  {name}: c={args.connections} {res['cmax']['rps']} req/s, p50 {ms(res['cmax']['p50_us'])} ms", flush=True)

    # About half the max rate: connections that each pause between requests so that together they
    # offer half of it. One connection per 100 req/s keeps each pause near 10 ms, well above the
    # millisecond granularity of wrk's delay(); the achieved rate is reported, not assumed.
    target = res["cmax"]["rps"] / 2
    conns = max(2, min(128, math.ceil(target / 100)))
    pause = max(1.0, conns / target * 1000 - ms(res["c1"]["p50_us"]))
    res["half"] = wrk(url, conns, args.duration, work, delay_ms=pause)
    res["half"]["target_rps"] = round(target, 1)
    print(f"  {name}: ~half load {res['half']['rps']} req/s, p50 {ms(res['half']['p50_us'])} ms, "
          f"p99 {ms(res['half']['p99_us'])} ms", flush=True)

    res["ttft"] = asyncio.run(ttft(base, args.ttft_requests))
    print(f"  {name}: TTFT p50 {res['ttft']['p50_ms']} ms", flush=True)
    res["streams"] = asyncio.run(held_streams(base, args.streams, proc))
    print(f"  {name}: {res['streams']['completed']}/{res['streams']['opened']} slow streams completed "
          f"in {res['streams']['seconds']} s", flush=True)
    if direct is not None:
        res["added"] = {
            "c1_p50_ms": round(ms(res["c1"]["p50_us"] - direct["c1"]["p50_us"]), 3),
            "c1_p99_ms": round(ms(res["c1"]["p99_us"] - direct["c1"]["p99_us"]), 3),
            # At half of a proxy's max the mock is nearly idle, so its c=1 latency is the baseline.
            "half_p50_ms": round(ms(res["half"]["p50_us"] - direct["c1"]["p50_us"]), 3),
            "half_p99_ms": round(ms(res["half"]["p99_us"] - direct["c1"]["p99_us"]), 3),
            "ttft_p50_ms": round(res["ttft"]["p50_ms"] - direct["ttft"]["p50_ms"], 3)
            if res["ttft"]["p50_ms"] is not None and direct["ttft"]["p50_ms"] is not None else None,
        }
    return res


# -- report ---------------------------------------------------------------------------------------

def table(results: dict[str, Any], connections: int) -> str:
    head = ("| path | c=1 p50 / p99 ms (added) | ~half load: req/s, p50 / p99 ms (added p50) | "
            f"c={connections}: req/s, p50 ms, CPU µs/request | stream TTFT p50 ms (added) | slow streams held | RSS idle / load MB "
            "| start-up to ready s (p50 / max) |")
    rows = [head, "|" + "---|" * 8]
    for name, r in results.items():
        if "skipped" in r:
            why = [ln.strip() for ln in r["skipped"].splitlines() if ln.strip()]
            brief = why[0] + (f" ... {why[-1]}" if len(why) > 1 else "")
            rows.append(f"| {name} | skipped: {brief[:200].replace('|', '/')} | | | | | | |")
            continue
        a = r.get("added") or {}

        def plus(k: str, a: dict = a) -> str:  # a bound now: one row's additions
            return f" (+{a[k]})" if a.get(k) is not None else ""
        rows.append(
            f"| {name} | {ms(r['c1']['p50_us'])} / {ms(r['c1']['p99_us'])}{plus('c1_p50_ms')} "
            f"| {r['half']['rps']:.0f}, {ms(r['half']['p50_us'])} / {ms(r['half']['p99_us'])}{plus('half_p50_ms')} "
            f"| {r['cmax']['rps']:.0f}, {ms(r['cmax']['p50_us'])}, {r['cmax'].get('cpu_us_per_request', '-')} "
            f"| {r['ttft']['p50_ms']}{plus('ttft_p50_ms')} "
            f"| {r['streams']['completed']}/{r['streams']['opened']} in {r['streams']['seconds']} s "
            f"| {r['rss_idle_mb'] if r['rss_idle_mb'] is not None else '-'} / "
            f"{r['rss_load_mb'] if r['rss_load_mb'] is not None else '-'}"
            f"{' (streams ' + str(r['streams']['peak_rss_mb']) + ')' if r['streams'].get('peak_rss_mb') else ''}"
            f"{_working_set(r)} | {_startup(r)} |")
    errs = [f"{n}: {r[k]['errors']} errors in the {k} run" for n, r in results.items() if "skipped" not in r
            for k in ("c1", "cmax", "half") if r[k]["errors"]]
    return "\n".join(rows) + ("\n\nErrors: " + "; ".join(errs) if errs else "")


def _working_set(r: dict[str, Any]) -> str:
    idle, load = r.get("cgroup_working_set_idle_mb"), r.get("cgroup_working_set_load_mb")
    return f"; cgroup working set {idle} / {load}" if idle is not None else ""


def _startup(r: dict[str, Any]) -> str:
    s = r.get("startup")
    if not s:
        return "-"
    return f"{s['p50_s']} / {s['max_s']} ({s['ready']}/{s['runs']} ready)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10, help="Seconds per wrk run (default 10).")
    ap.add_argument("--connections", type=int, default=32, help="Connections for the max-rate run (default 32).")
    ap.add_argument("--streams", type=int, default=1000, help="Concurrent slow streams to hold (default 1000).")
    ap.add_argument("--ttft-requests", type=int, default=100, help="Streams for the TTFT sample (default 100).")
    ap.add_argument("--startup-runs", type=int, default=10, help="Sidecar starts timed to /healthz (default 10).")
    ap.add_argument("--only", default="direct,bare,spendwarden,gateway,litellm", help="Comma-separated paths to run.")
    args = ap.parse_args()

    if not shutil.which("wrk"):
        print("wrk is missing: apt-get install -y wrk", file=sys.stderr)
        return 2
    if (os.cpu_count() or 1) < 2:
        print("needs 2 cores (proxy on core 1, load on core 0)", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {int(LOAD_CORE)})  # this script's asyncio client is load, too
    paths = [p for p in args.only.split(",") if p]
    RESULTS.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="spendwarden-bench-"))

    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        print(f"warning: load average {load_before[0]:.2f} before the run: other work shares these cores, "
              "numbers will be lower and noisier", flush=True)
    mock_port = free_port()
    mock_cmd = ["taskset", "-c", LOAD_CORE, sys.executable, "-m", "spendwarden.cli", "mock-upstream", "--port", str(mock_port),
                "--record-limit", "1000"]
    for m, b in MODEL_BEHAVIOURS.items():
        mock_cmd += ["--model-behaviour", f"{m}={json.dumps(b)}"]
    mock = Proc("mock", mock_cmd, work)
    mock_url = f"http://127.0.0.1:{mock_port}"
    results: dict[str, Any] = {}
    try:
        why = wait_ready(mock, mock_url + "/v1/chat/completions", 20)
        if why:
            print(why, file=sys.stderr)
            return 1
        direct = None
        for name in (["direct"] if "direct" in paths else []) + [p for p in paths if p != "direct"]:
            print(f"{name}:", flush=True)
            if name == "direct":
                subprocess.run(["taskset", "-a", "-p", "-c", PROXY_CORE, str(mock.p.pid)], check=True, capture_output=True)
                try:
                    results[name] = measure(name, mock_url, mock, args, work, None)
                finally:
                    subprocess.run(["taskset", "-a", "-p", "-c", LOAD_CORE, str(mock.p.pid)], check=True, capture_output=True)
                results[name]["note"] = "the mock upstream alone on core 1"
                direct = results[name]
                continue
            proc, base, skip = start_path(name, mock_url, work)
            if skip:
                print(f"  {name}: skipped: {skip}", flush=True)
                results[name] = {"skipped": skip}
                continue
            try:
                results[name] = measure(name, base, proc, args, work, direct)
            finally:
                proc.stop()
            if name == "spendwarden" and args.startup_runs:
                results[name]["startup"] = startup_seconds(mock_url, work, args.startup_runs)
                print(f"  {name}: start-up to /healthz p50 {results[name]['startup']['p50_s']} s, "
                      f"max {results[name]['startup']['max_s']} s", flush=True)
        with urllib.request.urlopen(mock_url + "/_mock/requests", timeout=10) as r:
            totals = json.loads(r.read())["totals"]
    finally:
        mock.stop()
        for cp in CONTROL_PLANES:
            cp.stop()

    out = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "cpu": _cpu_model(), "python": platform.python_version(),
                    "kernel": platform.release(), "wrk": _wrk_version()},
        "settings": vars(args) | {"proxy_core": PROXY_CORE, "load_core": LOAD_CORE, "request": BODY,
                                  "model_behaviours": MODEL_BEHAVIOURS},
        "git": _git_state(),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "upstream_totals": totals,
        "results": results,
    }
    path = RESULTS / f"proxy-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2))
    print()
    print(table(results, args.connections))
    print(f"\nresult: {path}  (logs: {work})")
    return 0


def _git_state() -> dict[str, Any]:
    """Which code was measured: HEAD and whether the proxy's sources differed from it."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(HERE.parent), *a], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    return {"head": git("rev-parse", "--short", "HEAD"),
            "proxy_dirty": bool(git("status", "--porcelain", "--", "operator/spendwarden/proxy"))}


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _wrk_version() -> str:
    try:
        return subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0].strip()
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
