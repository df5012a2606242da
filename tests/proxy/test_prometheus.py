"""A real Prometheus scrapes a real proxy, and every PromQL expression the chart ships (Grafana dashboard
and PrometheusRule) is evaluated by it: they parse, evaluate, and the proxy's panels have data.

Prometheus is Debian's `prometheus` package (scripts/setup.sh installs it), run as a plain binary with
its own config and a temporary TSDB: no systemd, no network but 127.0.0.1. A missing binary FAILS the
test (CI must not pass without running it) unless SPENDWARDEN_SKIP_PROMETHEUS=1. SPENDWARDEN_PROMETHEUS
names another binary.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

import tests.support.prometheus
from spendwarden.devtools.mock_upstream import MockUpstream
from tests.support.dashboard import (
    PENDING_METRICS,
    all_panels,
    dashboard_queries,
    load_dashboard,
    render_docs,
    rule_queries,
    selectors,
    substitute,
)
from tests.support.prometheus import Prometheus, prometheus_binary

from .conftest import backend, budget_yaml, route_yaml, stream_of

JOB = "spendwarden-proxy"
RATE_INTERVAL = "10s"  # Grafana's $__rate_interval at a 1 s scrape is max(4 x scrape, step + scrape)






@pytest.fixture
def prometheus_bin() -> str:
    return prometheus_binary()


@pytest.fixture
def traffic_proxy(start_proxy) -> Iterator[tuple[Any, MockUpstream]]:
    """A standalone proxy with a fallback route and a budget, after ok, streamed and fallback requests."""
    with MockUpstream(tokens=12) as up:
        proxy = start_proxy(stream_of(
            route_yaml("chat", "chat", [backend("primary", up.openai_url), backend("spare", up.openai_url, "gpt-b")],
                       fallbacks=["spare"]),
            route_yaml("tiered", "tiered", [backend("small", up.openai_url, "mock-small"),
                                            backend("large", up.openai_url, "mock-large")],
                       tiers=[{"name": "small", "backends": ["small"]},
                              {"name": "large", "backends": ["large"], "minScore": 40}],
                       cache={"ttl": "1h"}, loopBreaker={"maxRepeats": 2, "window": "1h"}),
            budget_yaml("monthly", period={"type": "Monthly"},
                        limits={"cost": {"amount": "100"}, "tokens": {"total": 1000000}}),
        ))
        client = openai.OpenAI(base_url=proxy.openai_url, api_key="unused", max_retries=0, timeout=30)
        msgs: Any = [{"role": "user", "content": "hello there"}]  # the SDK wants its TypedDicts
        for _ in range(3):
            client.chat.completions.create(model="chat", messages=msgs,
                                           extra_headers={"x-spendwarden-tags": "scenario=ticket",
                                                          "x-mock-cached-tokens": "2"})
        for _ in range(2):  # streamed: time to first token
            for _ in client.chat.completions.create(model="chat", messages=msgs, stream=True):
                pass
        up.script({"status": 500})  # the primary fails once: a fallback and an upstream failure
        r = client.chat.completions.with_raw_response.create(model="chat", messages=msgs)
        assert r.headers["x-spendwarden-backend"] == "spare"
        # Issue #7: an escalation (the small tier fails once), a cache hit, a refused loop.
        up.script({"status": 500})
        client.chat.completions.create(model="tiered", messages=msgs)
        for _ in range(2):
            client.chat.completions.create(model="tiered", messages=msgs, temperature=0)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="tiered", messages=msgs, temperature=0)
        yield proxy, up


def test_prometheus_scrapes_the_proxy_and_evaluates_every_shipped_query(prometheus_bin, traffic_proxy, tmp_path):
    proxy, _ = traffic_proxy
    dash = load_dashboard()
    rule_values = {"metrics": {"prometheusRule": {"enabled": True}}}
    rule_doc_groups = _rule_groups(rule_values)
    live = {line.split("{")[0].split(" ")[0] for line in proxy.metrics().splitlines() if line and line[0] != "#"}
    with Prometheus(prometheus_bin, tmp_path, {JOB: f"127.0.0.1:{proxy.metrics_port}"}, rule_doc_groups) as prom:
        prom.wait_for(f'up{{job="{JOB}"}} == 1', "the proxy target to be up")
        prom.wait_for(f'spendwarden_cost_total{{job="{JOB}", route="chat"}} > 0', "cost samples")
        prom.wait_for(f'gen_ai_client_token_usage_sum{{job="{JOB}", gen_ai_token_type="output"}} > 0', "token samples")
        # Rates need two samples of every series inside the shortest window the queries use.
        time.sleep(3)

        pending = {p["title"] for p in all_panels(dash) if p.get("description", "").startswith("PENDING:")}
        empty_but_expected = []
        queries = dashboard_queries(dash)
        now = time.time()
        for where, raw in queries:
            expr = substitute(raw, rate_interval=RATE_INTERVAL, range_="5m")
            result = prom.query(expr)  # asserts status success: it parses and evaluates
            prom.api("query_range", query=expr, start=now - 60, end=now, step="1s")  # what time series panels send
            names = {s.name for s in selectors(expr)}
            if names & live and not any(where.startswith(f"panel {t!r}") for t in pending):
                if not result:
                    empty_but_expected.append((where, expr))
            if names & PENDING_METRICS:
                assert not result, f"{where}: pending metric has data; drop PENDING from the panel"
        assert empty_but_expected == [], "panels on the proxy's metrics without data:\n" + "\n".join(
            f"  {w}: {e}" for w, e in empty_but_expected)

        for where, expr in rule_queries(rule_values):
            prom.query(expr)  # operator metrics are absent here: empty results are fine, errors are not

        # Prometheus loaded the rendered rules as its own rule file and evaluates them without errors.
        deadline = time.time() + 10
        while True:
            rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
            if rules and all(not r.get("lastEvaluation", "0001").startswith("0001") for r in rules):  # evaluated once
                break
            assert time.time() < deadline, rules
            time.sleep(0.25)
        assert len(rules) == len(rule_queries(rule_values))
        assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]


def _rule_groups(values: dict) -> list[dict]:
    rule = next(d for d in render_docs(values) if d["kind"] == "PrometheusRule")
    return rule["spec"]["groups"]


def test_missing_prometheus_fails_unless_skipped_on_purpose(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("SPENDWARDEN_PROMETHEUS", str(tmp_path / "nope"))
    monkeypatch.setattr(tests.support.prometheus, "DEBIAN_PROMETHEUS", str(tmp_path / "nope"))
    monkeypatch.delenv("SPENDWARDEN_SKIP_PROMETHEUS", raising=False)
    with pytest.raises(pytest.fail.Exception, match="SPENDWARDEN_SKIP_PROMETHEUS=1"):
        prometheus_binary()
    monkeypatch.setenv("SPENDWARDEN_SKIP_PROMETHEUS", "1")
    with pytest.raises(pytest.skip.Exception):
        prometheus_binary()
