"""`spendwarden demo`: the main job on the embedded default, in under two minutes.

A local control plane (etcd + kube-apiserver + kube-controller-manager), the operator as a real
process (reconcile, ledger, cut-off), a real llama.cpp server on the tiny generated model as the
cheap "local" backend and the mock upstream as a "premium" reasoning model (it reasons 340 hidden
tokens before a 60-token answer, and bills them as output within the request's max_tokens, as
providers do), one real proxy process for the
namespace `demo` spending leases from the operator's ledger with a ServiceAccount token. Then:
traffic that burns the budget with a live status line per round, the threshold Events, the cut-off
(429 from the proxy, and what the operator did to the namespace: NetworkPolicy, label, the local
inference Deployment scaled to zero), its reversal by raising the limit, and `spendwarden report`.

`run_story(kubeconfig)` is the story on an existing control plane (the integration test runs it);
`run(args)` wraps it with a fresh local control plane.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[2]
GROUP, VERSION = "spendwarden.io", "v1alpha1"
NAMESPACE = "demo"
LIMIT, RAISED = "0.025", "0.10"         # USD per day: about six premium answers
PREMIUM_REASONING, PREMIUM_ANSWER = 340, 60  # tokens the premium model would produce; max_tokens (200) caps both
PROMPT = "Summarise ticket 4711 in one sentence: the printer on floor 3 is jammed again."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep", action="store_true", help="Keep the cluster, operator and proxy running until Ctrl-C.")


def step(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2,
          detail: Callable[[], str] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception:  # noqa: BLE001 - not there yet (connection refused, 404)
            value = None
        if value:
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}" + (f" ({detail()})" if detail else ""))


def _rendered_with_route_and_budget(core: Any) -> Any:
    cm = core.read_namespaced_config_map("spendwarden-proxy", NAMESPACE)
    rendered = json.loads((cm.data or {}).get("config.json") or "{}")
    routes = {r.get("name") for r in rendered.get("routes") or []}
    budgets = {b.get("name") for b in rendered.get("budgets") or []}
    return cm if "chat" in routes and "daily" in budgets else None


def _route_conditions(custom: Any) -> str:
    try:
        route = custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "modelroutes", "chat")
    except Exception as exc:  # noqa: BLE001 - the message is for a failure report
        return f"ModelRoute chat unreadable: {exc}"
    conditions = (route.get("status") or {}).get("conditions") or []
    return "ModelRoute chat: " + ("; ".join(f"{c.get('type')}={c.get('status')} {c.get('reason')}: {c.get('message')}"
                                            for c in conditions) or "no conditions yet")


@dataclass
class StoryResult:
    """What the story showed, for the summary and the test."""

    answered: dict[str, int] = field(default_factory=lambda: {"local": 0, "premium": 0})
    threshold_events: list[str] = field(default_factory=list)
    refused: str | None = None              # the 429 message once the budget is spent
    retry_shortly: int = 0                  # 429s before it was found spent (what was left fit no request)
    cut_off: dict[str, Any] = field(default_factory=dict)
    lifted: bool = False
    answered_after_raise: bool = False
    spent_at_cut_off: str = ""  # status.used.cost once cut off, before the limit is raised
    report: list[dict[str, Any]] = field(default_factory=list)
    local_backend: str = ""


class _Procs:
    """Child processes with their logs, stopped (SIGTERM, then SIGKILL) in reverse order."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.started: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "spendwarden.cli", *args], env=env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.started.append(proc)
        return proc, log

    def stop(self) -> None:
        for proc in reversed(self.started):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


def _http_ok(url: str) -> bool:
    import httpx
    return httpx.get(url, timeout=1).status_code == 200


def _manifests(local_url: str, local_model: str, premium_url: str) -> list[dict[str, Any]]:
    def backend(name: str, url: str, model: str, price_in: str, price_out: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "provider": "OpenAICompatible" if name == "local" else "OpenAI", "url": url,
                "model": model, "pricing": {"input": price_in, "output": price_out}, **extra}

    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "app", "namespace": NAMESPACE}},
        # The workload that serves "local" in a cluster (here no kubelet runs it): the cut-off scales it to 0.
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "local-llm", "namespace": NAMESPACE},
         "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "local-llm"}}, "template": {
             "metadata": {"labels": {"app": "local-llm"}},
             "spec": {"containers": [{"name": "llama", "image": "ghcr.io/ggml-org/llama.cpp:server"}]}}}},
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelRoute", "metadata": {"name": "chat", "namespace": NAMESPACE},
         "spec": {"model": "chat", "defaultBackend": "local",
                  "backends": [backend("local", local_url, local_model, "0.10", "0.40",
                                       deploymentRef={"name": "local-llm"}),
                               backend("premium", premium_url, "premium-reasoner", "5.00", "20.00")],
                  "rules": [{"name": "hard-tickets", "match": {"headers": [{"name": "x-ticket-priority", "value": "urgent"}]},
                             "backend": "premium"}]}},
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TokenBudget", "metadata": {"name": "daily", "namespace": NAMESPACE},
         "spec": {"window": "24h", "limits": {"cost": {"amount": LIMIT, "currency": "USD"}}, "thresholds": [50, 80],
                  "onExceeded": "CutOff", "failMode": "Closed"}},
    ]


def _status_line(budget: dict[str, Any]) -> str:
    from .render.budget_table import usage_bar
    st = budget.get("status") or {}
    pct = st.get("percentUsed")
    return (f"{usage_bar(pct)} {str(pct if pct is not None else '?'):>3}%  {st.get('usedSummary', '-'):>12} / "
            f"{st.get('limitSummary', '-')}  {st.get('state', '-')}")


def run_story(kubeconfig: str, workdir: Path, keep: Callable[[], None] | None = None) -> StoryResult:
    from kubernetes import client, config

    from .devtools.mock_upstream import MockUpstream
    from .render.budget_table import rows, table
    from .render.report import report_rows
    from .render.report import table as report_table

    api_client = config.new_client_from_config(kubeconfig)
    core, custom, apps = client.CoreV1Api(api_client), client.CustomObjectsApi(api_client), client.AppsV1Api(api_client)
    env = {**os.environ, "KUBECONFIG": kubeconfig, "SPENDWARDEN_LOG_FORMAT": "plain"}
    result = StoryResult()
    procs = _Procs(workdir)
    with ExitStack() as stack:
        stack.callback(procs.stop)

        step("Backends: llama.cpp (xllamacpp, the tiny generated model) as 'local', the mock upstream as 'premium'")
        local_url, local_model = _local_backend(stack, workdir, result)
        # Another loopback address: the cut-off never denies the apiserver's (127.0.0.1 here).
        premium = stack.enter_context(MockUpstream(
            host="127.0.0.2", model_behaviours={"premium-reasoner": {"reasoning_tokens": PREMIUM_REASONING, "tokens": PREMIUM_ANSWER,
                                                   "latency_ms": 150}}))
        print(f"local:   {result.local_backend} at {local_url}\npremium: mock reasoning model at {premium.openai_url} "
              f"(reasons {PREMIUM_REASONING} hidden tokens, answers in {PREMIUM_ANSWER}, all billed as output within "
              "max_tokens 200: 5.00 / 20.00 USD per 1M)")

        step("Starting the operator (reconcile, ledger with TokenReview, cut-off) for namespace demo")
        ledger_port, metrics_port, live_port = _free_port(), _free_port(), _free_port()
        ledger_url = f"http://127.0.0.1:{ledger_port}"
        procs.start("operator", ["operator", "--namespace", NAMESPACE, "--liveness", f"http://127.0.0.1:{live_port}/healthz",
                                 "--ledger-port", str(ledger_port), "--metrics-port", str(metrics_port)],
                    # A budget is found spent once what is left fits none of the requests admitted in
                    # the last 60 s (ledger/leases.py); the demo's minute is 8 s, so it ends in rounds.
                    {**env, "SPENDWARDEN_LEDGER_URL": ledger_url, "SPENDWARDEN_LEDGER_ADMITTED_WINDOW": "8"})
        _wait(lambda: _http_ok(f"{ledger_url}/healthz"), 60, "the operator's ledger")
        print(f"operator up; ledger {ledger_url}; logs in {workdir}")

        step(f"Applying namespace demo: ModelRoute chat (local, premium for x-ticket-priority: urgent), "
             f"TokenBudget daily ({LIMIT} USD, thresholds 50/80, onExceeded CutOff)")
        manifests = _manifests(local_url, local_model, premium.openai_url)
        import yaml
        subprocess.run(["kubectl", "apply", "-f", "-"], input=yaml.safe_dump_all(manifests), env=env, text=True,
                       check=True)
        # The budget and the route are reconciled independently: a render holding only one of them is a
        # normal intermediate state, and this proxy reads its copy once, so wait for both.
        cm = _wait(lambda: _rendered_with_route_and_budget(core), 30,
                   "the rendered proxy configuration with route chat and budget daily",
                   detail=lambda: _route_conditions(custom))
        config_path = workdir / "config.json"
        config_path.write_text(cm.data["config.json"])
        granted = core.create_namespaced_service_account_token("app", NAMESPACE, client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=["spendwarden"], expiration_seconds=3600))).status
        assert granted is not None and granted.token is not None  # the API server answers with the token
        (workdir / "token").write_text(granted.token)
        print("the operator rendered ConfigMap spendwarden-proxy (routes, budget, ledger URL)")

        step("Starting the proxy for namespace demo (what the webhook injects as a sidecar in a cluster)")
        port, proxy_metrics = _free_port(), _free_port()
        procs.start("proxy", ["proxy", "--config", str(config_path), "--port", str(port), "--metrics-port",
                              str(proxy_metrics), "--namespace", NAMESPACE],
                    {**env, "SPENDWARDEN_LEDGER_TOKEN_FILE": str(workdir / "token")})
        _wait(lambda: _http_ok(f"http://127.0.0.1:{port}/healthz"), 30, "the proxy")
        print(f"proxy on http://127.0.0.1:{port}/v1 (apps use it as OPENAI_BASE_URL); metrics :{proxy_metrics}")

        import openai
        app = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)

        def ask(urgent: bool, scenario: str) -> tuple[int, str]:
            headers = {"x-spendwarden-tags": f"scenario={scenario}", **({"x-ticket-priority": "urgent"} if urgent else {})}
            try:
                r = app.chat.completions.with_raw_response.create(
                    model="chat", max_tokens=200 if urgent else 16, extra_headers=headers,
                    messages=[{"role": "user", "content": PROMPT}])
                return 200, r.headers.get("x-spendwarden-backend", "?")
            except openai.APIStatusError as exc:
                return exc.status_code, exc.message.split(" - ", 1)[-1]  # without the SDK's "Error code: 429 - "

        def budget() -> dict[str, Any]:
            # The client types custom objects as object: they are the JSON dict.
            return cast(dict[str, Any], custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "tokenbudgets",
                                                                            "daily"))

        step("Traffic: each round two routine tickets (local) and one urgent ticket (premium); live status")
        failures: dict[str, int] = {}   # what was neither answered nor refused for the budget, for the error
        for round_no in range(1, 25):
            codes = []
            for urgent, scenario in ((False, "ticket-summary"), (False, "ticket-summary"), (True, "escalation")):
                status, detail = ask(urgent, scenario)
                codes.append(status)
                if status == 200:
                    result.answered[detail] = result.answered.get(detail, 0) + 1
                elif status == 429:
                    # "retry shortly" while the ledger cannot yet tell whether what is left still
                    # fits one of the team's requests; "is exhausted" once it is spent.
                    result.refused = detail
                    result.retry_shortly += "retry shortly" in detail
                else:
                    key = f"{status} {detail[:200]}"
                    failures[key] = failures.get(key, 0) + 1
            time.sleep(1.2)  # a report (1 s) and a status flush later, the line below is current
            print(f"round {round_no:>2}: {' '.join(str(c) for c in codes)}   {_status_line(budget())}", flush=True)
            if result.refused and "exhausted" in result.refused and all(c == 429 for c in codes):
                break
        if not result.refused or "exhausted" not in result.refused:
            seen = "; ".join(f"{n}x {k}" for k, n in failures.items()) or "none"
            raise RuntimeError(f"the budget was not spent: no 429 'exhausted' after 24 rounds (answered {result.answered}, "
                               f"last refusal: {result.refused}, "
                               f"failed: {seen}; budget: {_status_line(budget())}; logs in {workdir})")

        step("The alerts: threshold Events on the TokenBudget (kubectl get events -n demo)")
        # Posted after the status flush that saw them; BudgetExceeded is the last to come.
        events = _wait(lambda: (lambda evs: evs if any(e.reason == "BudgetExceeded" for e in evs) else None)(
            [e for e in core.list_namespaced_event(NAMESPACE).items
             if e.reason in ("ThresholdCrossed", "BudgetExceeded")]), 15, "threshold Events")
        for e in sorted(events, key=lambda e: e.metadata.creation_timestamp):
            print(f"  {e.type:<8} {e.reason:<17} {e.message}")
            if e.reason == "ThresholdCrossed":
                result.threshold_events.append(e.message)

        step("The cut-off: the proxy refuses, and the operator closes what bypasses it")
        print(f"  proxy: 429 budget_exceeded: {result.refused}")
        event = _wait(lambda: [e for e in core.list_namespaced_event(NAMESPACE).items if e.reason == "NamespaceCutOff"],
                      20, "the NamespaceCutOff Event")[0]
        print(f"  Event NamespaceCutOff: {event.message}")
        policy = _wait(lambda: client.NetworkingV1Api(api_client).read_namespaced_network_policy(
            "spendwarden-cut-off", NAMESPACE), 20, "the cut-off NetworkPolicy")
        ns_meta = _wait(lambda: (lambda m: m if m is not None
                                 and (m.labels or {}).get("spendwarden.io/cut-off") == "true" else None)(
            core.read_namespace(NAMESPACE).metadata), 20, "the namespace label")
        replicas = _wait(lambda: (lambda d: (d.spec.replicas,) if d.spec.replicas == 0 else None)(
            apps.read_namespaced_deployment("local-llm", NAMESPACE)), 20, "local-llm scaled to 0")[0]
        result.cut_off = {"networkPolicy": policy.metadata.name, "label": ns_meta.labels["spendwarden.io/cut-off"],
                          "localReplicas": replicas, "event": event.message}
        allowed = [b.ip_block.cidr + (f" except {', '.join(b.ip_block._except)}" if b.ip_block._except else "")
                   for rule in policy.spec.egress or [] for b in (rule.to or []) if b.ip_block is not None]
        print(f"  NetworkPolicy spendwarden-cut-off: egress of every pod allowed to {'; '.join(allowed) or '-'} (and DNS)")
        print(f"  namespace label spendwarden.io/cut-off={ns_meta.labels['spendwarden.io/cut-off']}")
        print(f"  deployment local-llm scaled 1 -> {replicas} (its replicas kept in a namespace annotation)")
        at_cut_off = budget()
        result.spent_at_cut_off = str(((at_cut_off.get("status") or {}).get("used") or {}).get("cost") or "0")
        print(f"  spent {result.spent_at_cut_off} of {LIMIT} USD: the last requests were clamped to what was left; "
              f"{result.retry_shortly} refused 'retry shortly' until what is left was found to fit none of the "
              "team's recent requests")
        print("\n" + table(rows([at_cut_off]), show_namespace=False))

        step(f"The reversal: the team lead raises the limit to {RAISED} USD (kubectl patch tokenbudget daily)")
        custom.patch_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "tokenbudgets", "daily",
                                              {"spec": {"limits": {"cost": {"amount": RAISED, "currency": "USD"}}}})
        _wait(lambda: (m := core.read_namespace(NAMESPACE).metadata) is not None
              and "spendwarden.io/cut-off" not in (m.labels or {}), 30, "the cut-off to be lifted")
        _wait(lambda: apps.read_namespaced_deployment("local-llm", NAMESPACE).spec.replicas == 1, 20, "local-llm back at 1")
        result.lifted = True
        print("  NetworkPolicy deleted, label removed, local-llm back at 1 replica")
        lifted = _wait(lambda: [e for e in core.list_namespaced_event(NAMESPACE).items if e.reason == "CutOffLifted"],
                       10, "the CutOffLifted Event")[0]
        print(f"  Event CutOffLifted: {lifted.message}")
        status, backend = _wait(lambda: (lambda r: r if r[0] == 200 else None)(ask(False, "ticket-summary")), 20,
                                "an answer after the raise", interval=0.5)
        result.answered_after_raise = True
        result.answered[backend] = result.answered.get(backend, 0) + 1
        time.sleep(1.2)
        print(f"  next request: {status} from {backend}   {_status_line(budget())}")

        step("Where the money went: spendwarden report -n demo")
        time.sleep(1.5)  # the last report reaches the status
        result.report = report_rows([budget()])
        print(report_table(result.report, show_namespace=False))
        if keep is not None:
            keep()
    return result


def _local_backend(stack: ExitStack, workdir: Path, result: StoryResult) -> tuple[str, str]:
    """The llama.cpp server on the tiny model; the mock upstream when xllamacpp is not installed."""
    from .devtools.llama_server import LlamaServer, xllamacpp_available
    if xllamacpp_available():
        llama = stack.enter_context(LlamaServer(workdir=workdir / "llama", parallel=2))
        result.local_backend = "llama.cpp (xllamacpp) on the tiny generated GGUF"
        return llama.openai_url, llama.model
    from .devtools.mock_upstream import MockUpstream
    mock = stack.enter_context(MockUpstream(tokens=16))
    result.local_backend = "mock upstream (xllamacpp is not installed: pip install xllamacpp for llama.cpp)"
    return mock.openai_url, "tiny-llama"


def run(args: argparse.Namespace) -> int:
    from .localcluster.controlplane import ControlPlane

    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="spendwarden-demo-"))
    step("Starting the local cluster (Kubernetes 1.37: control plane and a node)")
    with ControlPlane(crds=sorted((ROOT / "crds").glob("*.yaml")), node=True) as cp:
        print(f"cluster up in {time.monotonic() - started:.1f}s; export KUBECONFIG={cp.kubeconfig}")

        def keep() -> None:
            print(f"\nEverything keeps running. export KUBECONFIG={cp.kubeconfig}  (Ctrl-C to stop)")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass

        result = run_story(str(cp.kubeconfig), workdir, keep if args.keep else None)
    step(f"Summary ({time.monotonic() - started:.0f}s)")
    print(f"  answered: {result.answered.get('local', 0)} by local ({result.local_backend}), "
          f"{result.answered.get('premium', 0)} by premium")
    print(f"  alerts: {len(result.threshold_events)} threshold Events; then the budget ran out and the proxy answered 429")
    print(f"  cut-off: NetworkPolicy, namespace label, local-llm scaled to 0; lifted when the limit was raised: "
          f"{'yes' if result.lifted else 'no'}")
    from decimal import Decimal
    total = sum((Decimal(r["cost"]) for r in result.report), Decimal(0))
    print(f"  spent {total} USD in this period, per route/backend/tag in the report above; logs in {workdir}")
    return 0
