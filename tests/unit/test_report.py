"""render/report.py: TokenBudget status in, the `spendwarden report` rows, table and CSV out."""
from __future__ import annotations

import pytest

from spendwarden.render.report import UNATTRIBUTED, report_rows, table, to_csv


def tb(ns, name, status, currency="EUR"):
    return {"metadata": {"namespace": ns, "name": name},
            "spec": {"limits": {"cost": {"amount": "10", "currency": currency}}}, "status": status}


def used(i, o, cost):
    return {"inputTokens": i, "outputTokens": o, "totalTokens": i + o, "cost": cost}


ROW = {"route": "chat", "backend": "mini", "tag": "ticket", "inputTokens": 10, "outputTokens": 5, "cost": "0.5",
       "requests": 2}
BUDGET = tb("team-a", "monthly", {
    "periodStart": "2026-11-01T00:00:00Z", "periodEnd": "2026-12-01T00:00:00Z",
    "used": used(15, 5, "0.75"), "breakdown": [ROW],
    "history": [{"periodStart": "2026-10-01T00:00:00Z", "periodEnd": "2026-11-01T00:00:00Z", "used": used(1, 1, "0.1"),
                 "breakdown": [{**ROW, "inputTokens": 1, "outputTokens": 1, "cost": "0.1", "requests": 1}]},
                {"periodStart": "2026-09-01T00:00:00Z", "periodEnd": "2026-10-01T00:00:00Z", "used": used(3, 0, "0.3")}]})


def test_current_period_rows_and_what_no_proxy_broke_down():
    rows = report_rows([BUDGET])
    assert [(r["route"], r["tag"], r["requests"], r["cost"], r["current"]) for r in rows] == [
        ("chat", "ticket", 2, "0.5", True), (UNATTRIBUTED, "", None, "0.25", True)]
    assert rows[1]["inputTokens"] == 5 and rows[1]["outputTokens"] == 0 and rows[0]["currency"] == "EUR"


def test_previous_and_all_periods():
    prev = report_rows([BUDGET], "previous")
    assert {r["periodStart"] for r in prev} == {"2026-10-01T00:00:00Z"} and len(prev) == 1
    everything = report_rows([BUDGET], "all")
    assert [r["periodStart"][:7] for r in everything] == ["2026-11", "2026-11", "2026-10", "2026-09"]
    assert everything[-1]["route"] == UNATTRIBUTED and everything[-1]["cost"] == "0.3"  # a period before breakdowns
    with pytest.raises(ValueError):
        report_rows([BUDGET], "yesterday")


def test_table_and_csv():
    rows = report_rows([BUDGET, tb("team-b", "daily", {})], "all")
    text = table(rows, show_namespace=True)
    assert text.splitlines()[0].split() == ["NAMESPACE", "BUDGET", "PERIOD", "ROUTE", "BACKEND", "TAG", "REQUESTS",
                                            "INPUT", "OUTPUT", "COST"]
    assert "team-a/monthly 2026-11-01T00:00 (current): 0.75" in text
    assert table([], show_namespace=False) == "No usage found."
    lines = to_csv(rows).splitlines()
    assert lines[0] == ("namespace,budget,periodStart,periodEnd,current,route,backend,tag,requests,inputTokens,"
                        "outputTokens,totalTokens,cost,currency,workload")
    assert lines[1] == "team-a,monthly,2026-11-01T00:00:00Z,2026-12-01T00:00:00Z,True,chat,mini,ticket,2,10,5,15,0.5,EUR,"
    assert len(lines) == 1 + len(rows)


def test_a_workload_column_appears_where_the_gateway_served():
    budget = tb("team-a", "monthly", {
        "periodStart": "2026-11-01T00:00:00Z", "periodEnd": "2026-12-01T00:00:00Z", "used": used(15, 5, "0.75"),
        "breakdown": [{**ROW, "workload": "ingest"}, {**ROW, "cost": "0.25", "inputTokens": 5, "outputTokens": 0}]})
    rows = report_rows([budget])
    assert [r["workload"] for r in rows] == ["ingest", ""]
    text = table(rows, show_namespace=False)
    assert "WORKLOAD" in text.splitlines()[0] and "ingest" in text.splitlines()[1]
    assert "WORKLOAD" not in table(report_rows([BUDGET]), show_namespace=False)
    assert to_csv(rows).splitlines()[1].endswith(",EUR,ingest")
