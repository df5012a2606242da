"""The chart on the local cluster's node, as a platform engineer and a team would use it.

In order (one release for the module; each test builds on the one before):
  1. helm install (webhooks on) -> the operator Pod Ready; the webhooks registered.
  2. an app in an injected namespace gets the sidecar and its Secrets; its openai-SDK requests reach
     the in-cluster mock upstream through the sidecar; the ledger counts them (the proxy reports
     with the projected token the kubelet mounted).
  3. a ModelRoute change reaches the running sidecar through the ConfigMap volume.
  4. the budget spent: 429 from the sidecar, and a direct connection from the app container to the
     upstream refused by the enforced NetworkPolicy; a raised limit lifts both.
  5. the operator Pod deleted mid-traffic: the new one resumes the ledger, nothing lost.
  6. a llama.cpp Deployment (real readiness: the model loaded) scaled to zero when idle, woken by a request.
  7. a Job's Pod, with the proxy as a native sidecar (1.29+), runs its request and completes.
  8. helm upgrade changes the release; helm uninstall removes the operator and its webhooks.
"""
from __future__ import annotations

import json
import textwrap
import time

import pytest

from .conftest import DIRECT_CONNECT, IMAGE, RELEASE_NS, ROOT, TESTBED, Cluster, ready, record, wait_for

RELEASE = "e2e"
LLM_NS = "e2e-llm"
TEAM_NS = "e2e-team"
MOCK = "mock-llm"
APP = "app"
WEBHOOK_CONFIG = "e2e.spendwarden.io"
# kube-router matches ipBlock rules against pod IPs too: the cut-off must except the cluster's ranges.
CLUSTER_CIDRS = ["10.244.0.0/16", "10.96.0.0/16"]


def helm_values_args() -> list[str]:
    repo, tag = IMAGE.split(":")
    return ["--set", f"image.repository={repo}", "--set", f"image.tag={tag}", "--set", "image.pullPolicy=Never",
            "--set", "webhooks.enabled=true", "--set", f"webhooks.configurationName={WEBHOOK_CONFIG}",
            "--set", "watchNamespaces[0]=e2e-*", "--set", "logFormat=plain",
            "--set", "proxy.limits.headTimeoutSeconds=15", "--set", "proxy.limits.maxBodyBytes=4000000",
            "--set", f"cutOff.clusterCIDRs[0]={CLUSTER_CIDRS[0]}", "--set", f"cutOff.clusterCIDRs[1]={CLUSTER_CIDRS[1]}"]


def operator_pods(c: Cluster) -> list[dict]:
    return c.json("-n", RELEASE_NS, "get", "pods", "-l", "app.kubernetes.io/name=spendwarden")["items"]


@pytest.fixture(scope="module")
def release(cluster: Cluster, request: pytest.FixtureRequest):
    cluster.namespace(RELEASE_NS)
    t = time.monotonic()
    cluster.helm("install", RELEASE, str(ROOT / "charts" / "spendwarden"), "-n", RELEASE_NS,
                 *helm_values_args(), "--wait", "--timeout", "5m")
    took = time.monotonic() - t
    record(request.config, "helm install to a Ready operator", took)
    yield took
    cluster.helm("uninstall", RELEASE, "-n", RELEASE_NS, "--wait", "--timeout", "2m", check=False)  # if a test failed


def test_helm_install_gives_a_ready_operator_with_webhooks(cluster: Cluster, release: float) -> None:
    pods = operator_pods(cluster)
    assert pods and all(ready(p) for p in pods), [p["status"] for p in pods]
    image = pods[0]["spec"]["containers"][0]["image"]
    assert image == IMAGE, image
    wait_for(lambda: cluster.kubectl("get", "mutatingwebhookconfiguration", WEBHOOK_CONFIG, check=False).returncode == 0,
             60, "the operator's mutating webhook configuration")
    wait_for(lambda: cluster.kubectl("get", "validatingwebhookconfiguration", WEBHOOK_CONFIG, check=False).returncode == 0,
             60, "the operator's validating webhook configuration")


# --- 2. the sidecar in a team's pod ---------------------------------------------------------------

OPENAI_CALLS = textwrap.dedent("""
    import json, sys, openai
    client = openai.OpenAI(api_key="unused-the-proxy-holds-the-key", max_retries=0, timeout=30)
    out = []
    for i in range(int(sys.argv[1]) if len(sys.argv) > 1 else {n}):
        try:
            r = client.chat.completions.create(model="{model}", max_tokens={max_tokens},
                                               messages=[{{"role": "user", "content": "hello number %d" % i}}])
            out.append({{"ok": True, "total": r.usage.total_tokens, "model": r.model}})
        except openai.APIStatusError as e:
            out.append({{"ok": False, "status": e.status_code, "body": str(e)[:400]}})
    print(json.dumps(out))
""")

def calls(c: Cluster, pod: str, n: int, model: str = "chat", max_tokens: int = 16) -> list[dict]:
    return c.exec_python(TEAM_NS, pod, APP, OPENAI_CALLS.format(n=n, model=model, max_tokens=max_tokens))


def direct(c: Cluster, pod: str) -> dict:
    return c.exec_python(TEAM_NS, pod, APP, DIRECT_CONNECT.format(host=f"{MOCK}.{LLM_NS}.svc.cluster.local", port=8000))


def mock_upstream() -> list[dict]:
    labels = {"app": MOCK}
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": MOCK, "namespace": LLM_NS},
         "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
             "metadata": {"labels": {**labels, "spendwarden.io/inject": "false"}},  # it is the upstream
             "spec": {"containers": [{"name": "mock", "image": IMAGE, "imagePullPolicy": "Never",
                                      "args": ["mock-upstream", "--host", "0.0.0.0", "--port", "8000", "--tokens", "8"],
                                      "ports": [{"containerPort": 8000}],
                                      "readinessProbe": {"httpGet": {"path": "/_mock/health", "port": 8000},
                                                         "periodSeconds": 1}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": MOCK, "namespace": LLM_NS},
         "spec": {"selector": labels, "ports": [{"port": 8000, "targetPort": 8000}]}},
    ]


def route(model: str = "chat") -> dict:
    return {"apiVersion": "spendwarden.io/v1alpha1", "kind": "ModelRoute", "metadata": {"name": "chat", "namespace": TEAM_NS},
            "spec": {"model": model, "defaultBackend": "mock", "backends": [{
                "name": "mock", "provider": "OpenAI", "url": f"http://{MOCK}.{LLM_NS}.svc.cluster.local:8000/v1",
                "model": "gpt-4o-mini", "pricing": {"input": "1", "output": "2"},
                "credentials": {"secretRef": {"name": "openai", "key": "apiKey"}}}]}}


def budget(total_tokens: int, name: str = "daily") -> dict:
    return {"apiVersion": "spendwarden.io/v1alpha1", "kind": "TokenBudget", "metadata": {"name": name, "namespace": TEAM_NS},
            "spec": {"period": {"type": "Daily", "timeZone": "UTC"}, "limits": {"tokens": {"total": total_tokens}},
                     "onExceeded": "CutOff", "failMode": "Closed"}}


def app_deployment() -> dict:
    labels = {"app": APP}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": APP, "namespace": TEAM_NS},
            "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": APP, "image": TESTBED, "imagePullPolicy": "Never",
                                         "command": ["python", "-c", "import time; time.sleep(10**9)"]}]}}}}


def app_pod(c: Cluster) -> dict:
    pods = [p for p in c.json("-n", TEAM_NS, "get", "pods", "-l", f"app={APP}")["items"] if ready(p)]
    return pods[0] if len(pods) == 1 else {}


def used_tokens(c: Cluster, name: str = "daily") -> int:
    status = c.json("-n", TEAM_NS, "get", "tokenbudget", name).get("status") or {}
    return int((status.get("used") or {}).get("totalTokens") or 0)


def test_an_injected_app_reaches_the_upstream_through_its_sidecar_and_the_ledger_counts(
        cluster: Cluster, release, request: pytest.FixtureRequest) -> None:
    c = cluster
    c.namespace(LLM_NS)
    c.apply(mock_upstream())
    c.namespace(TEAM_NS, {"spendwarden.io/inject": "true"})
    c.kubectl("-n", TEAM_NS, "create", "secret", "generic", "openai", "--from-literal=apiKey=sk-e2e")
    c.apply([route(), budget(100_000)])
    c.kubectl("-n", LLM_NS, "rollout", "status", f"deployment/{MOCK}", "--timeout=120s")
    t = time.monotonic()
    c.apply(app_deployment())
    pod = wait_for(lambda: app_pod(c), 180, "the app Pod Ready (app and sidecar)")
    names = [x["name"] for x in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]]
    assert "spendwarden-proxy" in names, names
    assert pod["metadata"]["labels"].get("spendwarden.io/proxy") == "injected"
    sidecar = next(x for x in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]
                   if x["name"] == "spendwarden-proxy")
    sidecar_env = {e["name"]: e.get("value") for e in sidecar.get("env") or []}
    # The chart's proxy.limits reach the sidecar (and it runs Ready with them).
    assert (sidecar_env.get("SPENDWARDEN_HEAD_TIMEOUT"), sidecar_env.get("SPENDWARDEN_MAX_BODY_BYTES")) == ("15", "4000000")
    app = next(x for x in pod["spec"]["containers"] if x["name"] == APP)
    env = {e["name"]: e.get("value") for e in app.get("env") or []}
    assert env["OPENAI_BASE_URL"] == "http://127.0.0.1:8787/v1"
    record(request.config, "app Pod (app + sidecar) from apply to Ready", time.monotonic() - t)

    results = calls(c, pod["metadata"]["name"], 5)
    assert all(r["ok"] for r in results), results
    sent = sum(r["total"] for r in results)
    # The ledger (in the operator Pod) counted them: the sidecar reported with its projected token.
    wait_for(lambda: used_tokens(c) >= sent, 60, f"the budget's status to count {sent} tokens")
    assert used_tokens(c) == sent
    # The chart's NetworkPolicy (kube-router enforces it): a team Pod reaches the ledger port, not
    # the unauthenticated metrics, which only namespace "monitoring" may scrape.
    service = f"{RELEASE}-spendwarden.{RELEASE_NS}.svc.cluster.local"
    name = pod["metadata"]["name"]
    assert c.exec_python(TEAM_NS, name, APP, DIRECT_CONNECT.format(host=service, port=8081))["connected"]
    assert not c.exec_python(TEAM_NS, name, APP, DIRECT_CONNECT.format(host=service, port=9090))["connected"]


# --- 3. a ModelRoute change reaches the running sidecar ----------------------------------------------


def test_a_route_change_reaches_the_running_sidecar_through_its_configmap_volume(cluster: Cluster, release) -> None:
    c = cluster
    pod = app_pod(c)["metadata"]["name"]
    before = calls(c, pod, 1, model="assistant")
    assert before[0]["status"] in (400, 404), before  # no such alias yet
    c.apply(route(model="assistant"))
    # operator renders the ConfigMap; the kubelet updates the volume; the proxy reloads it.
    t = time.monotonic()
    wait_for(lambda: calls(c, pod, 1, model="assistant")[0]["ok"], 120, "the new alias served by the sidecar", interval=2)
    print(f"\nModelRoute change served by the running sidecar after {time.monotonic() - t:.1f}s")
    assert calls(c, pod, 1, model="chat")[0]["status"] in (400, 404)  # the old alias is gone


# --- 4. budget spent: 429 and an enforced NetworkPolicy -------------------------------------------------


def test_a_spent_budget_gives_429_and_the_network_policy_blocks_direct_connections(cluster: Cluster, release) -> None:
    """A second, tight budget (a new one: no lease of the first one's generous limit is out on it)."""
    c = cluster
    pod = app_pod(c)["metadata"]["name"]
    assert direct(c, pod)["connected"], "before the cut-off the app can reach the upstream directly"
    limit = 60
    c.apply(budget(limit, name="tight"))
    # The sidecar learns of a new budget from its ConfigMap volume (kubelet sync, then a reload): until
    # then it does not enforce it. Its first lease request shows it does.
    wait_for(lambda: ((c.json("-n", TEAM_NS, "get", "tokenbudget", "tight").get("status") or {}).get("ledger")
                      or {}).get("proxies"), 120, "the sidecar leasing from the tight budget", interval=2)
    results = calls(c, pod, 12, model="assistant")
    refused = [r for r in results if not r["ok"]]
    assert refused and all(r["status"] == 429 for r in refused), results
    assert sum(r["total"] for r in results if r["ok"]) <= limit
    wait_for(lambda: used_tokens(c, "tight") == sum(r["total"] for r in results if r["ok"]), 30, "the tight budget's count")
    wait_for(lambda: c.kubectl("-n", TEAM_NS, "get", "networkpolicy", "spendwarden-cut-off", check=False).returncode == 0,
             60, "the cut-off NetworkPolicy")
    # kube-router enforces it: the app container's own connection to the upstream now fails.
    wait_for(lambda: not direct(c, pod)["connected"], 60, "the direct connection refused", interval=2)

    c.apply(budget(10_000_000, name="tight"))
    wait_for(lambda: c.kubectl("-n", TEAM_NS, "get", "networkpolicy", "spendwarden-cut-off", check=False).returncode != 0,
             60, "the cut-off lifted")
    wait_for(lambda: direct(c, pod)["connected"], 60, "direct connections allowed again", interval=2)
    wait_for(lambda: calls(c, pod, 1, model="assistant")[0]["ok"], 60, "the sidecar answering again", interval=2)


# --- 5. the operator Pod replaced mid-traffic ------------------------------------------------------------


def settled_used_tokens(c: Cluster, quiet: float = 5.0) -> int:
    """The count once the last calls' reports are in status: unchanged for `quiet` seconds (the proxy
    reports about every second, the ledger writes status every 2 s)."""
    value, since = used_tokens(c), time.monotonic()
    deadline = since + 60
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "the budget's count did not settle within 60 s"
        time.sleep(0.5)
        now = used_tokens(c)
        if now != value:
            value, since = now, time.monotonic()
    return value


def test_the_operator_pod_deleted_mid_traffic_resumes_the_ledger_with_nothing_lost(cluster: Cluster, release) -> None:
    import threading

    c = cluster
    pod = app_pod(c)["metadata"]["name"]
    before = settled_used_tokens(c)
    results: list[dict] = []
    traffic = threading.Thread(target=lambda: results.extend(calls(c, pod, 40, model="assistant")))
    traffic.start()
    time.sleep(2)
    old = operator_pods(c)[0]["metadata"]["name"]
    c.kubectl("-n", RELEASE_NS, "delete", "pod", old, "--wait=false")
    traffic.join(300)
    wait_for(lambda: any(ready(p) and p["metadata"]["name"] != old for p in operator_pods(c)), 180,
             "a new operator Pod Ready")
    ok = sum(r["total"] for r in results if r["ok"])
    assert ok > 0, results
    # Every answered request is in the ledger once: the sidecar re-reports its cumulative usage to the new leader.
    wait_for(lambda: used_tokens(c) >= before + ok, 120, f"the ledger to count {before + ok} tokens")
    time.sleep(3)
    assert used_tokens(c) == before + ok


# --- 6. a llama.cpp Deployment scaled to zero when idle, woken by a request --------------------------------

LLAMA = "llama"


def llama_upstream() -> list[dict]:
    labels = {"app": LLAMA}
    return [
        # No replicas in the manifest: a server-side applied count would make this test its owner,
        # and the scaler leaves a workload whose replicas another writer owns alone.
        # Another namespace's routes may scale it only where it says so.
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {
            "name": LLAMA, "namespace": LLM_NS, "annotations": {"spendwarden.io/scaling-shared-with": TEAM_NS}},
         "spec": {"selector": {"matchLabels": labels}, "template": {
             "metadata": {"labels": {**labels, "spendwarden.io/inject": "false"}},
             "spec": {"containers": [{
                 "name": "llama", "image": TESTBED, "imagePullPolicy": "Never",
                 "command": ["python", "-m", "spendwarden.devtools.llama_server", "--write-tiny-model",
                             "--model", "/tmp/tiny.gguf", "--host", "0.0.0.0", "--port", "8080", "--alias", "tiny-llama"],
                 "ports": [{"containerPort": 8080}],
                 # Ready only once llama.cpp has loaded the model and answers /health.
                 "readinessProbe": {"httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 1}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": LLAMA, "namespace": LLM_NS},
         "spec": {"selector": labels, "ports": [{"port": 8080, "targetPort": 8080}]}},
    ]


def local_route() -> dict:
    return {"apiVersion": "spendwarden.io/v1alpha1", "kind": "ModelRoute", "metadata": {"name": "local", "namespace": TEAM_NS},
            "spec": {"model": "local", "defaultBackend": LLAMA, "backends": [{
                "name": LLAMA, "provider": "OpenAICompatible", "url": f"http://{LLAMA}.{LLM_NS}.svc.cluster.local:8080/v1",
                "model": "tiny-llama", "pricing": {"input": "0", "output": "0"},
                "deploymentRef": {"name": LLAMA, "namespace": LLM_NS},
                "scaling": {"minReplicas": 0, "maxReplicas": 1, "scaleDownStabilization": "1s", "idleToZeroAfter": "10s",
                            "wake": {"mode": "Hold", "timeout": "120s"}}}]}}


def llama_replicas(c: Cluster) -> int:
    return int(c.json("-n", LLM_NS, "get", "deployment", LLAMA)["spec"].get("replicas") or 0)


def test_a_llama_cpp_deployment_scales_to_zero_when_idle_and_wakes_on_demand(cluster: Cluster, release) -> None:
    c = cluster
    c.apply(llama_upstream())
    c.kubectl("-n", LLM_NS, "rollout", "status", f"deployment/{LLAMA}", "--timeout=180s", timeout=200)
    c.apply(local_route())
    pod = app_pod(c)["metadata"]["name"]
    wait_for(lambda: calls(c, pod, 1, model="local")[0]["ok"], 120, "llama.cpp answering through the sidecar", interval=2)
    wait_for(lambda: llama_replicas(c) == 0, 120, "llama scaled to zero after 10 s idle", interval=2)
    wait_for(lambda: not c.json("-n", LLM_NS, "get", "pods", "-l", f"app={LLAMA}")["items"], 120, "its Pod gone")
    t = time.monotonic()
    woken = calls(c, pod, 1, model="local", max_tokens=8)
    held = time.monotonic() - t
    assert woken[0]["ok"], woken  # held until a replica was Ready (real readiness: model loaded), then served
    assert llama_replicas(c) == 1
    print(f"\nwake from zero: the request was held and answered in {held:.1f}s")


# --- 7. a Job with the native sidecar completes ---------------------------------------------------------


def test_a_job_with_the_native_sidecar_runs_its_request_and_completes(cluster: Cluster, release) -> None:
    """On 1.29+ the proxy is an init container with restartPolicy Always: up before the app starts,
    and not holding the Pod open once the app has exited (a plain sidecar container would)."""
    c = cluster
    code = OPENAI_CALLS.format(n=1, model="assistant", max_tokens=8) + "\nassert out[0]['ok'], out\n"
    c.apply({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "one-call", "namespace": TEAM_NS},
             "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [{
                 "name": APP, "image": TESTBED, "imagePullPolicy": "Never", "command": ["python", "-c", code]}]}}}})
    job = wait_for(lambda: (lambda j: j if (j.get("status") or {}).get("succeeded") == 1 or
                            (j.get("status") or {}).get("failed") else None)(c.json("-n", TEAM_NS, "get", "job", "one-call")),
                   180, "the Job to finish")
    assert job["status"].get("succeeded") == 1, job["status"]
    pod = c.json("-n", TEAM_NS, "get", "pods", "-l", "job-name=one-call")["items"][0]
    proxy = [x for x in pod["spec"].get("initContainers", []) if x["name"] == "spendwarden-proxy"]
    assert proxy and proxy[0].get("restartPolicy") == "Always", pod["spec"]


# --- 8. helm upgrade and uninstall ----------------------------------------------------------------------------


def test_helm_upgrade_rolls_the_operator_and_uninstall_removes_it(cluster: Cluster, release) -> None:
    c = cluster
    c.helm("upgrade", RELEASE, str(ROOT / "charts" / "spendwarden"), "-n", RELEASE_NS, *helm_values_args(),
           "--set", "verbose=true", "--wait", "--timeout", "5m")
    history = json.loads(c.helm("history", RELEASE, "-n", RELEASE_NS, "-o", "json").stdout)
    assert [h["revision"] for h in history][-1] == 2 and history[-1]["status"] == "deployed"
    pods = operator_pods(c)
    assert pods and all(ready(p) for p in pods)
    assert "--verbose" in pods[0]["spec"]["containers"][0]["args"]
    c.helm("uninstall", RELEASE, "-n", RELEASE_NS, "--wait", "--timeout", "2m")
    wait_for(lambda: not operator_pods(c), 120, "the operator Pods gone")
    # The configurations are the release's: nothing is left calling the removed Service.
    for kind in ("mutatingwebhookconfiguration", "validatingwebhookconfiguration"):
        wait_for(lambda: c.kubectl("get", kind, WEBHOOK_CONFIG, check=False).returncode != 0, 60, f"the {kind} gone")
    # A TokenBudget change is accepted again without the operator (the validating webhook is gone).
    c.apply(budget(20_000_000, name="tight"))
