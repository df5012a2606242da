"""The chart's Grafana dashboard and PrometheusRule, rendered with helm, and the queries in them."""
from __future__ import annotations

import json
import re
from pathlib import Path

import helm_python as helm
import promql_parser as promql
import yaml

ROOT = Path(__file__).resolve().parents[2]


CHART = ROOT / "charts" / "spendwarden"


NS = "spendwarden-system"


# Metrics the dashboard may name before anything exports them, each only in panels whose description
# starts with "PENDING:" (they show No data until then).
PENDING_METRICS: set[str] = set()


def render_docs(values: dict | None = None, *, namespace: str = NS) -> list[dict]:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name="spendwarden", namespace=namespace, is_install=True)
    return [doc for path, text in rendered.items() if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]


def dashboard_configmap(values: dict | None = None, **kw) -> dict | None:
    found = [d for d in render_docs(values, **kw)
             if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboards")]
    assert len(found) <= 1
    return found[0] if found else None


def load_dashboard(values: dict | None = None) -> dict:
    cm = dashboard_configmap(values)
    assert cm is not None, "the chart rendered no dashboard ConfigMap"
    return json.loads(cm["data"]["spendwarden.json"])


def all_panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out += p.get("panels", [])  # collapsed rows hold their panels
    return out


def dashboard_queries(dash: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable (the selector inside label_values)."""
    out = [(f"panel {p['title']!r} {t['refId']}", t["expr"])
           for p in all_panels(dash) for t in p.get("targets", []) if t.get("expr")]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", q.strip())
            assert m, f"variable {v['name']}: expected label_values(<selector>, <label>), got {q!r}"
            out.append((f"variable {v['name']}", m.group(1)))
    return out


def rule_queries(values: dict | None = None) -> list[tuple[str, str]]:
    values = values or {"metrics": {"prometheusRule": {"enabled": True}}}
    rules = [d for d in render_docs(values) if d["kind"] == "PrometheusRule"]
    assert len(rules) == 1, "the chart rendered no PrometheusRule"
    return [(f"rule {r.get('alert') or r.get('record')}", str(r["expr"]))
            for g in rules[0]["spec"]["groups"] for r in g["rules"]]


def substitute(expr: str, *, rate_interval: str = "1m", range_: str = "1h") -> str:
    """What Grafana sends: its interval macros resolved, each multi-value variable at its All value (.*)."""
    for macro, value in (("$__rate_interval", rate_interval), ("$__range", range_), ("$__interval", rate_interval)):
        expr = expr.replace(macro, value).replace("${" + macro[1:] + "}", value)
    expr = re.sub(r"\$\{(namespace|route|backend)(:\w+)?\}|\$(namespace|route|backend)\b", ".*", expr)
    assert "$" not in expr, f"unresolved variable in {expr!r}"
    return expr


def selectors(expr: str) -> list:
    found: list = []
    promql.walk(promql.parse(expr), lambda n: found.append(n) if isinstance(n, promql.VectorSelector) else None)
    return found
