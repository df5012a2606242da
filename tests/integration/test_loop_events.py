"""The loop breaker's "Event on the budget" end to end: a real operator (reconcile + ledger with
TokenReview), a real proxy process on the configuration the operator rendered, the mock upstream.
The proxy refuses a repeated request with 429 loop_detected and reports it with its next ledger
report; the operator posts one LoopDetected Warning on each budget covering the route, at most one
per route and minute however long the loop runs, and counts spendwarden_loops_reported_total."""
from __future__ import annotations

import json
import time

import openai
import pytest
from kubernetes import client

from spendwarden.devtools.mock_upstream import MockUpstream
from tests.proxy.conftest import ProxyProcess
from tests.support.cluster import apply_custom, proxy_configmap
from tests.support.ledger_cluster import Operator, sa_token
from tests.support.operator_process import wait_for

PROMPT = [{"role": "user", "content": "call the tool again please"}]


@pytest.fixture(scope="module")
def operator(control_plane, tmp_path_factory):
    op = Operator(control_plane, tmp_path_factory.mktemp("loops"), pattern="test-loop-*")  # conftest's `namespace` names
    op.env = {"SPENDWARDEN_LEDGER_URL": op.url}
    op.start()
    yield op
    op.stop()


def _loop_events(kube, ns: str) -> list:
    return [e for e in client.CoreV1Api(kube).list_namespaced_event(ns).items if e.reason == "LoopDetected"]


def test_loop_detected_posts_one_event_per_route_on_the_covering_budgets(control_plane, kube, operator, namespace,
                                                                         tmp_path):
    ns = namespace
    with MockUpstream(tokens=5) as up:
        for name in ("chat", "code"):
            apply_custom(kube, ns, "ModelRoute", "modelroutes", name, {
                "model": name, "defaultBackend": "mini", "loopBreaker": {"maxRepeats": 2, "window": "1m"},
                "backends": [{"name": "mini", "provider": "OpenAI", "url": up.openai_url, "model": "gpt-4o-mini",
                              "pricing": {"input": "0.15", "output": "0.60"}}]})
        apply_custom(kube, ns, "TokenBudget", "tokenbudgets", "monthly", {
            "period": {"type": "Monthly"}, "limits": {"cost": {"amount": "10.00"}}})
        apply_custom(kube, ns, "TokenBudget", "tokenbudgets", "code-only", {
            "period": {"type": "Monthly"}, "limits": {"cost": {"amount": "10.00"}}, "routes": ["code"]})

        def rendered():
            cm = proxy_configmap(kube, ns)
            cfg = json.loads(cm.data["config.json"]) if cm and cm.data else {}
            return cm if len(cfg.get("budgets") or []) == 2 and len(cfg.get("routes") or []) == 2 \
                and (cfg.get("ledger") or {}).get("url") else None

        cm = wait_for(rendered, timeout=30, what="the rendered proxy config with both budgets and the ledger URL")
        config = tmp_path / "config.json"
        config.write_text(cm.data["config.json"])
        token = tmp_path / "token"
        token.write_text(sa_token(kube, ns))
        proxy = ProxyProcess(config, tmp_path, env={"SPENDWARDEN_LEDGER_TOKEN_FILE": str(token)},
                             extra_args=["--namespace", ns]).start()
        try:
            oa = openai.OpenAI(base_url=proxy.openai_url, api_key="unused", max_retries=0, timeout=30)

            def ask() -> str:
                try:
                    oa.chat.completions.create(model="chat", max_tokens=20, messages=PROMPT)
                    return "ok"
                except openai.RateLimitError as exc:
                    return exc.code

            assert [ask() for _ in range(3)] == ["ok", "ok", "loop_detected"]
            events = wait_for(lambda: _loop_events(kube, ns), timeout=20, what="a LoopDetected Event")
            [event] = events
            assert event.type == "Warning" and event.involved_object.kind == "TokenBudget"
            assert event.involved_object.name == "monthly"  # not code-only: it does not cover route chat
            assert "route chat (model chat): 1 request(s) refused with 429 loop_detected" in event.message
            assert "more than 2 times within 60s" in event.message and "spec.loopBreaker" in event.message
            assert PROMPT[0]["content"] not in event.message
            # The loop goes on: every refusal is counted, but no second Event within the minute.
            assert [ask() for _ in range(4)] == ["loop_detected"] * 4
            wait_for(lambda: operator.metric("spendwarden_loops_reported_total", namespace=ns, route="chat") == 5,
                     timeout=20, what="5 loop refusals counted by the operator")
            time.sleep(1.0)  # the ledger's tick runs every 0.25 s: a premature Event would be there by now
            assert len(_loop_events(kube, ns)) == 1
            assert proxy.alive() and "call the tool again" not in proxy.stderr()
        finally:
            proxy.stop()
