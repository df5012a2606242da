"""The Grafana dashboard the chart ships (charts/spendwarden/dashboards/spendwarden.json as a ConfigMap for
Grafana's sidecar): it renders, its JSON is a usable dashboard, every query parses as PromQL and names
only series that exist: the proxy's (taken from a populated proxy.metrics.Metrics, not a hand-kept list)
or the operator's contract in templates/prometheusrule.yaml.

The helpers here (dashboard_queries, rule_queries, substitute) are also used by
tests/proxy/test_prometheus.py, which sends the same queries to a real Prometheus."""
from __future__ import annotations

import json
import re

import helm_python as helm
import promql_parser as promql
import pytest
from prometheus_client import Counter, Gauge, Histogram, Summary
from prometheus_client.parser import text_string_to_metric_families

from spendwarden.ledger.pricing import TokenUsage
from spendwarden.proxy.metrics import BASE, Metrics
from tests.support.dashboard import (
    CHART,
    NS,
    PENDING_METRICS,
    all_panels,
    dashboard_configmap,
    dashboard_queries,
    load_dashboard,
    rule_queries,
    selectors,
    substitute,
)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


REQUIRED_PANELS = {"Cost by team (namespace)", "Cost by route", "Cost by backend", "Cost by tag (scenario)",
                   "Tokens by type", "p95 request latency", "p95 time to first token", "Fallback rate",
                   "Escalation rate", "Escalations by cause", "Tier chosen", "Cache savings",
                   "Cache hit rate and loops refused", "Remaining budget", "Forecast: budgets projected to run out"}


# -- helpers (shared with tests/proxy/test_prometheus.py) --------------------------------------------------

















def by_labels(expr: str) -> set[str]:
    found: set[str] = set()

    def visit(n):
        if isinstance(n, promql.AggregateExpr) and n.modifier is not None and n.modifier.type == promql.AggModifierType.By:
            found.update(n.modifier.labels)
    promql.walk(promql.parse(expr), visit)
    return found


def proxy_series_labels() -> dict[str, set[str]]:
    """Sample name -> label names, from a proxy Metrics with every family populated once."""
    m = Metrics()
    usage = TokenUsage(input_tokens=10, output_tokens=5, cached_input_tokens=2, cache_write_tokens=3)
    base = tuple(f"x{i}" for i in range(len(BASE)))
    m.request(base, "USD", ("ns", "route", "backend", "chat", "ok", "200"), "ok", 0.1, usage, 0.01, 0.05, 0.001)
    m.tagged("ns", {"scenario": "ticket"}, "USD", 0.01)
    for metric in vars(m).values():  # the prometheus_client metrics (budgets, reloads, ledger, ...)
        if isinstance(metric, (Counter, Gauge, Histogram, Summary)):
            child = metric.labels(*["x"] * len(metric._labelnames)) if metric._labelnames else metric
            child.observe(1) if isinstance(metric, (Histogram, Summary)) else child.inc()
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


def operator_contract() -> dict[str, set[str]]:
    """The operator's metric names and labels, from the contract comment in templates/prometheusrule.yaml."""
    text = (CHART / "templates" / "prometheusrule.yaml").read_text()
    block = text.split("{{- /*", 1)[1].split("*/}}", 1)[0]
    out = {}
    for line in block.splitlines():
        m = re.match(r"^\s{2}([a-z_:][a-z0-9_:]*)(?:\{([a-z_,]*)\})?\s{2,}\S", line)
        if m:
            out[m.group(1)] = set(filter(None, (m.group(2) or "").split(",")))
    out["up"] = {"job", "instance", "namespace"}  # target labels Prometheus adds (namespace: Kubernetes SD)
    return out


# -- tests ------------------------------------------------------------------------------------------------

def test_the_contract_is_read_from_the_prometheus_rule():
    contract = operator_contract()
    assert {"spendwarden_budget_percent_used", "spendwarden_budget_state", "spendwarden_budget_forecast_exceeded",
            "spendwarden_namespace_cut_off", "spendwarden_ledger_reports_total", "up"} <= set(contract)
    assert contract["spendwarden_budget_state"] == {"namespace", "budget", "state"}


def test_chart_renders_the_dashboard_configmap_by_default():
    cm = dashboard_configmap()
    assert cm is not None
    assert cm["metadata"]["namespace"] == NS
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert list(cm["data"]) == ["spendwarden.json"]
    # Shipped verbatim: what Grafana gets is the file in the chart.
    assert json.loads(cm["data"]["spendwarden.json"]) == json.loads((CHART / "dashboards" / "spendwarden.json").read_text())


def test_dashboard_configmap_label_namespace_and_annotations_are_configurable():
    cm = dashboard_configmap({"dashboards": {"label": "example.com/dashboard", "labelValue": "spend",
                                             "namespace": "monitoring", "annotations": {"grafana_folder": "LLM"}}})
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["example.com/dashboard"] == "spend"
    assert "grafana_dashboard" not in cm["metadata"]["labels"]
    assert cm["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    assert dashboard_configmap({"dashboards": {"enabled": False}}) is None


@pytest.mark.parametrize("values, message", [
    ({"dashboards": {"enabled": "yes"}}, "at '/dashboards/enabled'"),
    ({"dashboards": {"labelValue": 1}}, "at '/dashboards/labelValue'"),
    ({"dashboards": {"namespace": "Monitoring"}}, "at '/dashboards/namespace'"),
    ({"dashboards": {"folder": "x"}}, "additional properties 'folder' not allowed"),
])
def test_schema_rejects_bad_dashboard_values(values, message):
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError) as excinfo:
        chart.validate_schema(values)
    assert message in str(excinfo.value)


@pytest.mark.parametrize("values", [None, {"dashboards": {"namespace": "monitoring", "annotations": {"a": "b"}}}],
                         ids=["defaults", "custom"])
def test_lint_passes_with_the_dashboard(values):
    report = helm.lint(CHART, values, strict=True, namespace=NS, kube_version="v1.20.2")
    assert report["errors"] == [], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_dashboard_structure():
    dash = load_dashboard()
    assert dash["uid"] == "spendwarden" and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert set(variables) == {"datasource", "namespace", "route", "backend"}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "route", "backend"):
        assert variables[name]["datasource"] == DATASOURCE
        assert variables[name]["multi"] and variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
    panels = all_panels(dash)
    titles = {p["title"] for p in panels}
    assert REQUIRED_PANELS <= titles, REQUIRED_PANELS - titles
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    # No two panels overlap on Grafana's 24-column grid.
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
    for p in panels:
        if p["type"] == "row":
            continue
        assert p.get("description"), f"panel {p['title']!r} has no description"
        # The data source is the variable, never a baked-in uid of someone's Prometheus.
        assert p["datasource"] == DATASOURCE, p["title"]
        assert p["targets"] and all(t["datasource"] == DATASOURCE for t in p["targets"]), p["title"]


def test_every_query_parses_and_names_only_real_series():
    dash = load_dashboard()
    proxy = proxy_series_labels()
    operator = operator_contract()
    known = {**operator, **proxy}
    pending_panels = {p["title"] for p in all_panels(dash) if p.get("description", "").startswith("PENDING:")}
    queries = dashboard_queries(dash)
    assert len(queries) > 20
    for where, raw in queries:
        expr = substitute(raw)
        try:
            sels = selectors(expr)
        except Exception as e:  # noqa: BLE001 - promql-parser raises ValueError/RuntimeError by version
            pytest.fail(f"{where}: {expr!r} does not parse: {e}")
        assert sels, where
        labels_in_expr: set[str] = {"le"}
        for sel in sels:
            name = sel.name
            assert name, f"{where}: selector without a metric name"
            if name in PENDING_METRICS and name not in known:
                assert any(where.startswith(f"panel {t!r}") for t in pending_panels), \
                    f"{where}: pending metric {name} outside a PENDING panel"
                continue
            assert name in known, f"{where}: {name} is neither a proxy metric nor in the operator contract"
            labels = known[name]
            labels_in_expr |= labels
            for matcher in sel.matchers.matchers:
                assert matcher.name in labels | {"__name__"}, f"{where}: {name} has no label {matcher.name}"
        if not any(s.name in PENDING_METRICS and s.name not in known for s in sels):
            assert by_labels(expr) <= labels_in_expr, f"{where}: aggregates by {by_labels(expr) - labels_in_expr}"
    # The dashboard really shows the proxy's series, not only the operator's.
    used = {s.name for _, raw in queries for s in selectors(substitute(raw))}
    for name in ("spendwarden_cost_total", "gen_ai_client_token_usage_sum", "spendwarden_requests_total",
                 "gen_ai_client_operation_duration_seconds_bucket", "gen_ai_server_time_to_first_token_seconds_bucket",
                 "spendwarden_budget_remaining_ratio", "spendwarden_budget_percent_used",
                 "spendwarden_budget_forecast_exceeded"):
        assert name in used, name


def test_pending_panels_say_so():
    panels = {p["title"]: p for p in all_panels(load_dashboard())}
    assert not panels["Escalation rate"]["description"].startswith("PENDING:")  # the proxy escalates now
    tagged = panels["Cost by tag (scenario)"]
    assert not tagged["description"].startswith("PENDING:")
    assert "spendwarden_tagged_cost_total" in tagged["targets"][0]["expr"]


def test_rule_queries_are_collected():
    assert {w for w, _ in rule_queries()} >= {"rule SpendwardenBudgetThresholdCrossed", "rule SpendwardenLedgerUnreachable"}
