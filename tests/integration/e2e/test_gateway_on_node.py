"""Gateway mode on the local cluster's node (issue #13), as a platform engineer sets it up:

  1. helm install with gateway.enabled and 3 gateway replicas -> the pool Ready behind its Service.
  2. a provider outside the cluster: the mock upstream as a process of this host (pods reach the
     host, as they would reach the internet), accepting only the provider key, which lives in a
     Secret of the gateway namespace shared with the tenant by annotation.
  3. a tenant namespace labelled spendwarden.io/mode=gateway: its app Pod gets no sidecar but the
     gateway's base URL and a projected token; its openai-SDK calls (the token as API key) are served
     and metered per workload; the key is not readable from the tenant's namespace (`kubectl auth
     can-i`); a direct connection to the provider is refused by the enforced egress NetworkPolicy.
  4. forged, foreign-audience and other-namespace tokens get 401/403.
  5. a tight budget spent by concurrent streams across the 3 replicas: overshoot 0, and the ledger
     equals what the provider billed.
"""
from __future__ import annotations

import json
import textwrap
import time

import pytest

from spendwarden.devtools.mock_upstream import MockUpstream, free_port
from spendwarden.localcluster.node import NODE_IP

from .conftest import DIRECT_CONNECT, IMAGE, ROOT, TESTBED, Cluster, ready, record, wait_for

RELEASE, RELEASE_NS = "e2egw", "e2e-gw-system"
TEAM_NS, OTHER_NS = "e2e-gw-team", "e2e-gw-other"
APP = "app"
PROVIDER_KEY = "sk-e2e-provider-key-held-by-the-gateway"
GATEWAY = f"spendwarden-gateway.{RELEASE_NS}.svc.cluster.local"
REPLICAS = 3


def helm_values_args() -> list[str]:
    repo, tag = IMAGE.split(":")
    return ["--set", f"image.repository={repo}", "--set", f"image.tag={tag}", "--set", "image.pullPolicy=Never",
            "--set", "webhooks.enabled=true", "--set", "webhooks.configurationName=e2egw.spendwarden.io",
            "--set", "watchNamespaces[0]=e2e-gw-*", "--set", "logFormat=plain",
            "--set", "gateway.enabled=true", "--set", f"gateway.replicas={REPLICAS}",
            "--set", "gateway.rateLimit.namespace.rate=0", "--set", "gateway.rateLimit.serviceAccount.rate=0",
            "--set", "gateway.resources.requests.cpu=10m"]


@pytest.fixture(scope="module")
def provider():
    up = MockUpstream(host="0.0.0.0", port=free_port(), tokens=24, api_keys={PROVIDER_KEY}).start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def release(cluster: Cluster, request: pytest.FixtureRequest):
    cluster.namespace(RELEASE_NS)
    t = time.monotonic()
    cluster.helm("install", RELEASE, str(ROOT / "charts" / "spendwarden"), "-n", RELEASE_NS,
                 *helm_values_args(), "--wait", "--timeout", "5m")
    record(request.config, "helm install (gateway mode) to a Ready operator and gateway pool", time.monotonic() - t)
    yield
    cluster.helm("uninstall", RELEASE, "-n", RELEASE_NS, "--wait", "--timeout", "2m", check=False)


CALLS = textwrap.dedent("""
    import json, os, sys, openai
    token = {token!r} or open(os.environ["SPENDWARDEN_TOKEN_FILE"]).read().strip()
    client = openai.OpenAI(api_key=token, max_retries=0, timeout=30)
    out = []
    for i in range({n}):
        try:
            r = client.chat.completions.create(model="chat", max_tokens=16,
                                               messages=[{{"role": "user", "content": "hello number %d" % i}}])
            out.append({{"ok": True, "total": r.usage.total_tokens}})
        except openai.APIStatusError as e:
            out.append({{"ok": False, "status": e.status_code, "body": str(e)[:300]}})
    print(json.dumps(out))
""")

STREAMS = textwrap.dedent("""
    import json, os, threading, openai
    token = open(os.environ["SPENDWARDEN_TOKEN_FILE"]).read().strip()
    result = {{"ok": 0, "total": 0, "exhausted": 0, "retried": 0, "errors": []}}
    lock = threading.Lock()

    def worker(w):
        client = openai.OpenAI(api_key=token, max_retries=0, timeout=60)  # a client each: connections spread
        for k in range(400):
            try:
                stream = client.chat.completions.create(
                    model="chat", max_tokens=32, stream=True, stream_options={{"include_usage": True}},
                    messages=[{{"role": "user", "content": "stream %d of worker %d " % (k, w) + "word " * 40}}])
                used = 0
                for chunk in stream:
                    if chunk.usage:
                        used = chunk.usage.total_tokens
                with lock:
                    result["ok"] += 1
                    result["total"] += used
            except openai.RateLimitError as e:
                if int(e.response.headers.get("retry-after", "1")) > 1:
                    with lock:
                        result["exhausted"] += 1
                    return
                with lock:
                    result["retried"] += 1
            except openai.APIError as e:
                with lock:
                    result["errors"].append(str(e)[:200])
                return

    threads = [threading.Thread(target=worker, args=(w,)) for w in range({workers})]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(result))
""")

def route(provider: MockUpstream) -> dict:
    return {"apiVersion": "spendwarden.io/v1alpha1", "kind": "ModelRoute", "metadata": {"name": "chat", "namespace": TEAM_NS},
            "spec": {"model": "chat", "defaultBackend": "provider", "backends": [{
                "name": "provider", "provider": "OpenAI", "url": f"http://{NODE_IP}:{provider.port}/v1",
                "model": "gpt-4o-mini", "pricing": {"input": "1", "output": "2"},
                "credentials": {"secretRef": {"name": "openai", "key": "apiKey"}}}]}}


def budget(name: str, total_tokens: int) -> dict:
    return {"apiVersion": "spendwarden.io/v1alpha1", "kind": "TokenBudget", "metadata": {"name": name, "namespace": TEAM_NS},
            "spec": {"period": {"type": "Daily", "timeZone": "UTC"}, "limits": {"tokens": {"total": total_tokens}},
                     "onExceeded": "CutOff", "failMode": "Closed"}}


def app_pod(c: Cluster) -> dict:
    pods = [p for p in c.json("-n", TEAM_NS, "get", "pods", "-l", f"app={APP}")["items"] if ready(p)]
    return pods[0] if len(pods) == 1 else {}


def gateways_serving(c: Cluster, namespace: str) -> int:
    pods = c.json("-n", RELEASE_NS, "get", "pods", "-l", "app.kubernetes.io/component=gateway")["items"]
    return sum(f"namespace {namespace} is served" in c.kubectl("-n", RELEASE_NS, "logs", p["metadata"]["name"],
                                                             check=False).stdout for p in pods)


def status(c: Cluster, name: str) -> dict:
    return c.json("-n", TEAM_NS, "get", "tokenbudget", name).get("status") or {}


def test_the_gateway_pool_is_ready_behind_its_service(cluster: Cluster, release) -> None:
    c = cluster
    c.kubectl("-n", RELEASE_NS, "rollout", "status", "deployment/spendwarden-gateway", "--timeout=180s")
    pods = c.json("-n", RELEASE_NS, "get", "pods", "-l", "app.kubernetes.io/component=gateway")["items"]
    assert len([p for p in pods if ready(p)]) == REPLICAS, [p["status"] for p in pods]
    endpoints = c.json("-n", RELEASE_NS, "get", "endpointslices", "-l", "kubernetes.io/service-name=spendwarden-gateway")
    assert sum(len(s.get("endpoints") or []) for s in endpoints["items"]) == REPLICAS


def test_a_gateway_mode_app_is_served_through_the_gateway_and_cannot_bypass_it(
        cluster: Cluster, release, provider: MockUpstream, request: pytest.FixtureRequest) -> None:
    c = cluster
    c.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {
        "name": "openai", "namespace": RELEASE_NS, "annotations": {"spendwarden.io/tenants": TEAM_NS}},
        "stringData": {"apiKey": PROVIDER_KEY}})
    c.namespace(TEAM_NS, {"spendwarden.io/inject": "true", "spendwarden.io/mode": "gateway"})
    c.apply([route(provider), budget("daily", 10_000_000)])
    wait_for(lambda: TEAM_NS + ".json" in (c.json("-n", RELEASE_NS, "get", "configmap", "spendwarden-gateway-config")
                                           .get("data") or {}), 60, "the tenant's file in the gateway's ConfigMap")
    wait_for(lambda: c.kubectl("-n", TEAM_NS, "get", "networkpolicy", "spendwarden-gateway-egress", check=False)
             .returncode == 0, 60, "the tenant's egress NetworkPolicy")
    # Each replica picks the tenant up once the kubelet has refreshed its ConfigMap volume (its sync
    # period: up to a minute on a real cluster); until then that replica answers 403 not served.
    wait_for(lambda: gateways_serving(c, TEAM_NS) == REPLICAS, 150, "every gateway replica serving the tenant",
             interval=2)
    t = time.monotonic()
    c.apply({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": APP, "namespace": TEAM_NS},
             "spec": {"replicas": 1, "selector": {"matchLabels": {"app": APP}}, "template": {
                 "metadata": {"labels": {"app": APP}},
                 "spec": {"containers": [{"name": APP, "image": TESTBED, "imagePullPolicy": "Never",
                                          "command": ["python", "-c", "import time; time.sleep(10**9)"]}]}}}})
    pod = wait_for(lambda: app_pod(c), 180, "the app Pod Ready")
    record(request.config, "gateway-mode app Pod from apply to Ready", time.monotonic() - t)
    names = [x["name"] for x in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]]
    assert names == [APP], names  # no sidecar
    assert pod["metadata"]["labels"].get("spendwarden.io/proxy") == "gateway"
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0].get("env") or []}
    assert env["OPENAI_BASE_URL"] == f"http://spendwarden-gateway.{RELEASE_NS}.svc:8787/v1", env
    name = pod["metadata"]["name"]

    # Served by the gateway with the key the tenant never sees, and metered per workload.
    results = c.exec_python(TEAM_NS, name, APP, CALLS.format(token="", n=4))
    assert all(r["ok"] for r in results), results
    sent = sum(r["total"] for r in results)
    wait_for(lambda: int((status(c, "daily").get("used") or {}).get("totalTokens") or 0) == sent, 60,
             f"the ledger counting {sent} tokens")
    assert {r.get("workload") for r in status(c, "daily").get("breakdown") or []} == {"default"}

    # The key: not in the tenant's namespace, and the gateway's namespace is closed to the tenant.
    secrets = c.json("-n", TEAM_NS, "get", "secrets")["items"]
    assert not any(PROVIDER_KEY.encode().hex() in json.dumps(s).encode().hex() for s in secrets)
    who = f"--as=system:serviceaccount:{TEAM_NS}:default"
    for args in (("get", "secrets", "-n", RELEASE_NS), ("list", "secrets", "-n", RELEASE_NS),
                 ("patch", f"namespace/{TEAM_NS}")):
        res = c.kubectl("auth", "can-i", *args, who, check=False)
        assert res.stdout.strip() == "no", (args, res.stdout, res.stderr)

    # A direct connection to the provider fails (kube-router enforces the egress policy); the gateway
    # Service is reachable.
    check = lambda host, port: c.exec_python(TEAM_NS, name, APP, DIRECT_CONNECT.format(host=host, port=port))  # noqa: E731
    wait_for(lambda: not check(NODE_IP, provider.port)["connected"], 60, "the direct connection refused", interval=2)
    assert check(GATEWAY, 8787)["connected"]

    # Tokens that are not this namespace's ServiceAccount's, for spendwarden.
    c.namespace(OTHER_NS)
    other = c.kubectl("-n", OTHER_NS, "create", "token", "default", "--audience", "spendwarden").stdout.strip()
    wrong_audience = c.kubectl("-n", TEAM_NS, "create", "token", "default").stdout.strip()
    forged = c.kubectl("-n", TEAM_NS, "create", "token", "default", "--audience", "spendwarden").stdout.strip()[:-8] + "AAAAAAAA"
    for tok, want in ((other, 403), (wrong_audience, 401), (forged, 401), ("sk-not-a-token", 401)):
        got = c.exec_python(TEAM_NS, name, APP, CALLS.format(token=tok, n=1))
        assert got[0].get("status") == want, (want, got)


def test_a_budget_holds_exactly_across_the_gateway_replicas_under_concurrent_streams(
        cluster: Cluster, release, provider: MockUpstream) -> None:
    c = cluster
    limit = 6_000
    c.apply(budget("tight", limit))
    pod = app_pod(c)["metadata"]["name"]
    # Each replica learns of the budget from its ConfigMap volume and reports it (no traffic needed):
    # wait until all three are in the ledger.
    wait_for(lambda: len((status(c, "tight").get("ledger") or {}).get("proxies") or {}) == REPLICAS, 120,
             "every gateway replica reporting the tight budget", interval=2)
    before = provider.totals()
    result = c.exec_python(TEAM_NS, pod, APP, STREAMS.format(workers=24), timeout=300)
    assert not result["errors"], result["errors"][:5]
    assert result["exhausted"] > 0, result
    after = provider.totals()
    billed = (after["billed_prompt_tokens"] - before["billed_prompt_tokens"]
              + after["billed_completion_tokens"] - before["billed_completion_tokens"])

    wait_for(lambda: int((status(c, "tight").get("used") or {}).get("totalTokens") or 0) == billed, 60,
             f"the tight budget counting exactly what the provider billed ({billed})")
    used = int(status(c, "tight")["used"]["totalTokens"])
    proxies = (status(c, "tight").get("ledger") or {}).get("proxies") or {}
    print(f"\n[gateway e2e] limit {limit}  used {used}  billed since {billed}  overshoot {max(used - limit, 0)}  "
          f"streams ok {result['ok']} retried {result['retried']} exhausted {result['exhausted']}  "
          f"gateway proxies leasing {len(proxies)}")
    assert used <= limit
    # The Service spread the 24 clients' connections over the replicas (all three: 1 - 3*(2/3)^24).
    served = 0
    for gw in c.json("-n", RELEASE_NS, "get", "pods", "-l", "app.kubernetes.io/component=gateway")["items"]:
        lines = c.kubectl("-n", RELEASE_NS, "logs", gw["metadata"]["name"], "--tail=100000").stdout.splitlines()
        served += any('"tight"' in x and '"status":200' in x for x in lines if x.startswith("{"))
    assert served == REPLICAS, served
    assert len(proxies) == REPLICAS, proxies


MOVE_NS = "e2e-gw-move"

SIDECAR_CALL = textwrap.dedent("""
    import json, openai
    client = openai.OpenAI(api_key="unused-the-sidecar-holds-the-key", max_retries=0, timeout=30)
    try:
        r = client.chat.completions.create(model="chat", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
        print(json.dumps({"ok": True, "total": r.usage.total_tokens}))
    except openai.APIStatusError as e:
        print(json.dumps({"ok": False, "status": e.status_code, "body": str(e)[:300]}))
""")


def move_pods(c: Cluster) -> list[dict]:
    return [p for p in c.json("-n", MOVE_NS, "get", "pods", "-l", f"app={APP}")["items"] if ready(p)]


def call_in(c: Cluster, pod: dict) -> dict:
    """One call as the Pod's app makes it: through its sidecar, or to the gateway with its token."""
    gateway_mode = pod["metadata"]["labels"].get("spendwarden.io/proxy") == "gateway"
    code = CALLS.format(token="", n=1) if gateway_mode else SIDECAR_CALL
    got = c.exec_python(MOVE_NS, pod["metadata"]["name"], APP, code)
    return got[0] if isinstance(got, list) else got


def test_a_namespace_moves_from_sidecar_to_gateway_mode_without_a_failed_call(
        cluster: Cluster, release, provider: MockUpstream) -> None:
    """README's migration: sidecar pods keep working while the namespace is in gateway mode with its
    egress open, restarted pods use the gateway, and enforcing the egress leaves them working."""
    c = cluster
    c.namespace(MOVE_NS, {"spendwarden.io/inject": "true"})
    c.kubectl("-n", MOVE_NS, "create", "secret", "generic", "openai", f"--from-literal=apiKey={PROVIDER_KEY}")
    move_route = route(provider)
    move_route["metadata"]["namespace"] = MOVE_NS
    c.apply([move_route])
    c.apply({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": APP, "namespace": MOVE_NS},
             "spec": {"replicas": 1, "selector": {"matchLabels": {"app": APP}}, "template": {
                 "metadata": {"labels": {"app": APP}},
                 "spec": {"containers": [{"name": APP, "image": TESTBED, "imagePullPolicy": "Never",
                                          "command": ["python", "-c", "import time; time.sleep(10**9)"]}]}}}})
    (old,) = wait_for(lambda: move_pods(c) or None, 180, "the sidecar app Pod Ready")
    assert old["metadata"]["labels"].get("spendwarden.io/proxy") == "injected"
    wait_for(lambda: call_in(c, old)["ok"], 90, "the sidecar serving", interval=2)

    # 1. the key to the gateway, 2. gateway mode with the egress still open.
    c.kubectl("-n", RELEASE_NS, "annotate", "secret", "openai", "--overwrite",
              f"spendwarden.io/tenants={TEAM_NS},{MOVE_NS}")
    c.kubectl("label", "namespace", MOVE_NS, "spendwarden.io/mode=gateway", "spendwarden.io/gateway-egress=open")
    wait_for(lambda: gateways_serving(c, MOVE_NS) == REPLICAS, 150, "every gateway replica serving the namespace",
             interval=2)
    assert c.kubectl("-n", MOVE_NS, "get", "networkpolicy", "spendwarden-gateway-egress", check=False).returncode != 0
    assert call_in(c, old)["ok"], "the old sidecar Pod stops working before its restart"

    # 3. the restart: the new Pod calls the gateway.
    c.kubectl("-n", MOVE_NS, "rollout", "restart", f"deployment/{APP}")
    c.kubectl("-n", MOVE_NS, "rollout", "status", f"deployment/{APP}", "--timeout=180s")
    (new,) = wait_for(lambda: (lambda ps: ps if len(ps) == 1 and ps[0]["metadata"]["uid"] != old["metadata"]["uid"]
                               else None)(move_pods(c)), 120, "the restarted Pod alone")
    assert new["metadata"]["labels"].get("spendwarden.io/proxy") == "gateway"
    assert call_in(c, new)["ok"]

    # 4. enforce: the policy is applied, the gateway still serves, the direct path is closed.
    c.kubectl("label", "namespace", MOVE_NS, "spendwarden.io/gateway-egress-")
    wait_for(lambda: c.kubectl("-n", MOVE_NS, "get", "networkpolicy", "spendwarden-gateway-egress", check=False)
             .returncode == 0, 60, "the egress policy applied")
    name = new["metadata"]["name"]
    wait_for(lambda: not c.exec_python(MOVE_NS, name, APP, DIRECT_CONNECT.format(host=NODE_IP, port=provider.port))
             ["connected"], 60, "the direct connection refused", interval=2)
    assert call_in(c, new)["ok"]
