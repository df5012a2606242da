"""The chart with real pods on kind: the operator image built from the Dockerfile, the chart
installed with webhooks, the GitOps examples applied with their backends pointed at an in-cluster
mock upstream (the same image's `spendwarden mock-upstream`), and the sample app: it gets the
proxy sidecar, the proxy gets the route's API-key Secrets, and the app gets answers through it
while the operator's ledger counts them in the TokenBudget's status."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import yaml

from .conftest import IMAGE, ROOT, Kind

NS = "spendwarden"
TEAM = "team-support"
MOCK = "mock-llm"


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def install_chart(kind: Kind) -> None:
    from helm import Chart

    repository, tag = IMAGE.split(":")
    values = {"image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
              "webhooks": {"enabled": True}, "logFormat": "plain"}
    with Chart.load(ROOT / "charts" / "spendwarden") as chart:
        crds = [yaml.safe_load(c["data"]) for c in chart.crds]
        rendered = chart.render(values, name="spendwarden", namespace=NS, is_install=True)
    docs = [d for path, text in sorted(rendered.items()) if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d]
    kind.kubectl("create", "namespace", NS, check=False)
    kind.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(crds))
    kind.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(docs))
    kind.kubectl("-n", NS, "rollout", "status", "deployment/spendwarden", "--timeout=240s")
    # The operator registers the webhooks (and patches in its CA) once it is up.
    wait_for(lambda: kind.kubectl("get", "mutatingwebhookconfiguration", "spendwarden.io", check=False).returncode == 0,
             120, "the mutating webhook configuration")


def mock_upstream(namespace: str) -> list[dict]:
    labels = {"app": MOCK}
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": MOCK, "namespace": namespace},
         "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
             # Never proxied itself: it is the upstream.
             "metadata": {"labels": {**labels, "spendwarden.io/inject": "false"}},
             "spec": {"containers": [{"name": "mock", "image": IMAGE, "imagePullPolicy": "Never",
                                      "args": ["mock-upstream", "--host", "0.0.0.0", "--port", "8000"],
                                      "ports": [{"containerPort": 8000}]}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": MOCK, "namespace": namespace},
         "spec": {"selector": labels, "ports": [{"port": 8000, "targetPort": 8000}]}},
    ]


def test_sample_app_gets_the_sidecar_and_answers(kind_cluster: Kind) -> None:
    kind = kind_cluster
    install_chart(kind)
    kind.kubectl("apply", "-k", str(ROOT / "examples"))
    kind.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(mock_upstream(TEAM)))
    for secret in ("openai", "anthropic"):
        kind.kubectl("-n", TEAM, "create", "secret", "generic", secret, "--from-literal=apiKey=sk-e2e", check=False)
    # The example's backends are the real providers; here both point at the in-cluster mock.
    base = f"http://{MOCK}.{TEAM}.svc:8000"
    patch = [{"op": "replace", "path": "/spec/backends/0/url", "value": f"{base}/v1"},
             {"op": "replace", "path": "/spec/backends/1/url", "value": base}]
    kind.kubectl("-n", TEAM, "patch", "modelroute", "chat", "--type=json", "-p", json.dumps(patch))
    kind.kubectl("-n", TEAM, "rollout", "status", f"deployment/{MOCK}", "--timeout=180s")

    kind.kubectl("apply", "-k", str(ROOT / "examples" / "sample-app"))
    kind.kubectl("-n", TEAM, "rollout", "status", "deployment/ticket-summariser", "--timeout=300s")
    pod = json.loads(kind.kubectl("-n", TEAM, "get", "pods", "-l", "app=ticket-summariser", "-o", "json").stdout)["items"][0]
    # The proxy is an init container (native sidecar) on Kubernetes 1.29+, a container before.
    containers = {c["name"]: c for c in pod["spec"]["containers"] + (pod["spec"].get("initContainers") or [])}
    assert set(containers) == {"app", "spendwarden-proxy"}
    assert pod["metadata"]["labels"]["spendwarden.io/proxy"] == "injected"
    mounts = {m["mountPath"] for m in containers["spendwarden-proxy"]["volumeMounts"]}
    assert {"/var/run/spendwarden/secrets/openai", "/var/run/spendwarden/secrets/anthropic"} <= mounts
    env = {e["name"]: e.get("value") for e in containers["app"].get("env") or []}
    assert env["OPENAI_BASE_URL"] == "http://127.0.0.1:8787/v1"

    name = pod["metadata"]["name"]
    # The app prints each reply with its usage: a line means a full round trip through the sidecar.
    logs = wait_for(lambda: (lambda out: out if "CompletionUsage" in out else None)(
        kind.kubectl("-n", TEAM, "logs", name, "-c", "app", check=False).stdout), 240, "an answer in the app's log")
    assert "completion_tokens" in logs
    access = kind.kubectl("-n", TEAM, "logs", name, "-c", "spendwarden-proxy").stdout
    lines = [json.loads(x) for x in access.splitlines() if x.startswith("{") and '"status"' in x]
    assert any(x["status"] == 200 and x.get("tags") == {"scenario": "ticket-summary"} for x in lines), access[-2000:]
    # The ledger (in the operator) counted it: the budget's status shows usage and its breakdown.
    budget = wait_for(lambda: (lambda tb: tb if (tb.get("status") or {}).get("breakdown") else None)(json.loads(
        kind.kubectl("-n", TEAM, "get", "tokenbudget", "monthly", "-o", "json").stdout)), 60, "the budget's breakdown")
    assert budget["status"]["breakdown"][0]["tag"] == "ticket-summary"
    assert int(budget["status"]["used"]["totalTokens"]) > 0
