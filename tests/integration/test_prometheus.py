"""A real Prometheus scrapes the operator process (its --metrics-port) the way the chart's ServiceMonitor
does (job = the Service name, honorLabels, the release namespace as target label), and the chart's
PrometheusRule and dashboard queries evaluate against it: the ledger-unreachable alert stays quiet while
the operator is scraped. The proxy side is tests/proxy/test_prometheus.py."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.dashboard import NS, dashboard_queries, load_dashboard, render_docs, rule_queries, substitute
from tests.support.operator_process import OperatorProcess, free_port
from tests.support.prometheus import Prometheus, prometheus_binary

JOB = "spendwarden"  # the chart's Service (= fullname) for release "spendwarden", as in rule_queries()


def operator_serves_metrics() -> bool:
    out = subprocess.run([sys.executable, "-m", "spendwarden.cli", "operator", "--help"],
                         capture_output=True, text=True, timeout=60).stdout
    return "--metrics-port" in out


def test_prometheus_scrapes_the_operator_and_the_ledger_alert_stays_quiet(control_plane, tmp_path):
    binary = prometheus_binary()
    if not operator_serves_metrics():  # the ledger issue adds it; until then there is nothing to scrape
        pytest.skip("`spendwarden operator` has no --metrics-port yet")
    values = {"metrics": {"prometheusRule": {"enabled": True}}}
    groups = next(d for d in render_docs(values) if d["kind"] == "PrometheusRule")["spec"]["groups"]
    port = free_port()
    op = OperatorProcess(str(control_plane.kubeconfig), tmp_path / "operator.log",
                         extra_args=["--metrics-port", str(port), "--ledger-port", "0"]).start()
    try:
        with Prometheus(binary, tmp_path, {JOB: f"127.0.0.1:{port}"}, groups,
                        target_labels={JOB: {"namespace": NS}}) as prom:
            prom.wait_for(f'up{{job="{JOB}", namespace="{NS}"}} == 1', "the operator target to be up")
            # A contract metric of templates/prometheusrule.yaml, exported from the start (a counter at 0).
            prom.wait_for(f'spendwarden_ledger_reports_total{{job="{JOB}"}}', "the operator's own series")
            rules = dict(rule_queries(values))
            for where, expr in rules.items():
                prom.query(expr)  # parses and evaluates
            # The operator is scraped: "ledger unreachable" has nothing to say.
            assert prom.query(rules["rule SpendwardenLedgerUnreachable"]) == []
            for where, raw in dashboard_queries(load_dashboard()):
                prom.query(substitute(raw, rate_interval="10s", range_="5m"))
    finally:
        op.stop()
    assert "cannot serve metrics" not in op.tail(200)
