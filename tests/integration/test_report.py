"""`spendwarden report` end to end: a real operator (reconcile + ledger with TokenReview), two real
proxy processes on the configuration the operator rendered, the mock upstream, and the CLI reading
TokenBudget status: the per-(route, backend, tag) rows are the proxies' own numbers and add up to
the budget's usage."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from decimal import Decimal

import openai
import pytest

from spendwarden.devtools.mock_upstream import MockUpstream
from tests.proxy.conftest import ProxyProcess
from tests.support.cluster import apply_custom, start_proxies
from tests.support.ledger_cluster import Operator, get_budget
from tests.support.operator_process import wait_for


@pytest.fixture(scope="module")
def operator(control_plane, tmp_path_factory):
    op = Operator(control_plane, tmp_path_factory.mktemp("report"), pattern="test-report-*")  # conftest's `namespace` names
    op.env = {"SPENDWARDEN_LEDGER_URL": op.url}  # rendered into each namespace's proxy config
    op.start()
    yield op
    op.stop()




def _report(control_plane, ns: str, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "spendwarden.cli", "report", "--kubeconfig",
                           str(control_plane.kubeconfig), "-n", ns, *args],
                          capture_output=True, text=True, check=True).stdout


def test_report_shows_cost_per_route_backend_and_tag_from_real_proxies(control_plane, kube, operator, namespace,
                                                                       tmp_path):
    ns = namespace
    with MockUpstream(tokens=20) as up:
        backends = [{"name": name, "provider": "OpenAI", "url": up.openai_url, "model": model,
                     "pricing": {"input": price_in, "output": price_out}}
                    for name, model, price_in, price_out in (("mini", "gpt-4o-mini", "0.15", "0.60"),
                                                             ("big", "gpt-4o", "2.50", "10.00"))]
        apply_custom(kube, ns, "ModelRoute", "modelroutes", "chat", {
            "model": "chat", "backends": backends, "defaultBackend": "mini",
            "rules": [{"match": {"headers": [{"name": "x-tier", "value": "premium"}]}, "backend": "big"}]})
        apply_custom(kube, ns, "TokenBudget", "tokenbudgets", "monthly", {
            "period": {"type": "Monthly"}, "limits": {"cost": {"amount": "10.00"}}, "failMode": "Closed"})
        proxies: list[ProxyProcess] = []
        try:
            start_proxies(kube, ns, tmp_path, proxies)
            sent = [(0, "scenario=ticket", None)] * 3 + [(1, "scenario=summary,team=x", "premium")] * 2 + [(1, None, None)]
            for i, tags, tier in sent:
                headers = {**({"x-spendwarden-tags": tags} if tags else {}), **({"x-tier": tier} if tier else {})}
                oa = openai.OpenAI(base_url=proxies[i].openai_url, api_key="unused", max_retries=0, timeout=30)
                oa.chat.completions.create(model="chat", max_tokens=50, extra_headers=headers,
                                           messages=[{"role": "user", "content": "where does the money go"}])
            # What the proxies' access logs say, per (route, backend, tag).
            expected: dict[tuple, list] = defaultdict(lambda: [0, 0, 0, Decimal(0)])
            for p in proxies:
                for line in p.log(3):  # each served 3; a line is written just after its answer
                    row = expected[("chat", line["backend"], (line.get("tags") or {}).get("scenario", ""))]
                    row[0] += 1
                    row[1] += line["input_tokens"]
                    row[2] += line["output_tokens"]
                    row[3] += Decimal(line["cost"])
            assert len(expected) == 3 and sum(r[0] for r in expected.values()) == 6

            def breakdown_complete():
                status = get_budget(kube, ns)["status"]
                rows = status.get("breakdown") or []
                return status if sum(r["requests"] for r in rows) == 6 else None

            status = wait_for(breakdown_complete, timeout=20, what="status.breakdown with all 6 requests")
            got = {(r["route"], r["backend"], r.get("tag", "")): [r["requests"], r["inputTokens"], r["outputTokens"],
                                                          Decimal(r["cost"])] for r in status["breakdown"]}
            assert got == dict(expected)
            assert sum(r[3] for r in got.values()) == Decimal(status["used"]["cost"])
            assert f'spendwarden_tagged_cost_total{{currency="USD",namespace="{ns}",tag="scenario",value="ticket"}}' \
                in proxies[0].metrics()
        finally:
            for p in proxies:
                p.stop()

    rows = json.loads(_report(control_plane, ns, "-o", "json"))
    assert {(r["backend"], r["tag"]): r["requests"] for r in rows} == {("mini", "ticket"): 3, ("big", "summary"): 2,
                                                                      ("mini", ""): 1}
    assert all(r["namespace"] == ns and r["budget"] == "monthly" and r["current"] and r["currency"] == "USD"
               for r in rows)
    assert sum(Decimal(r["cost"]) for r in rows) == Decimal(status["used"]["cost"])
    table = _report(control_plane, ns)
    assert "summary" in table and "ticket" in table and "Total cost per budget and period" in table
    csv_lines = _report(control_plane, ns, "-o", "csv").splitlines()
    assert csv_lines[0].startswith("namespace,budget,periodStart") and len(csv_lines) == 4
    assert _report(control_plane, ns, "--period", "previous").strip() == "No usage found."




