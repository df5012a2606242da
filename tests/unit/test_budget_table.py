from __future__ import annotations

from datetime import UTC, datetime

from spendwarden.render.budget_table import rows, table, usage_bar

NOW = datetime(2026, 11, 22, 12, tzinfo=UTC)


def tb(ns, name, **status):
    return {"metadata": {"namespace": ns, "name": name}, "spec": {"onExceeded": "CutOff"}, "status": status}


def test_usage_bar_clamps_and_marks_unknown():
    assert usage_bar(0) == "[" + "." * 20 + "]"
    assert usage_bar(50) == "[" + "#" * 10 + "." * 10 + "]"
    assert usage_bar(250) == "[" + "#" * 20 + "]"
    assert usage_bar(None) == "[" + "?" * 20 + "]"


def test_table_rows_sorted_with_reset_countdown_and_invalid_budgets_explained():
    items = rows([
        tb("team-b", "daily", percentUsed=100, state="Exceeded", usedSummary="2M tokens", limitSummary="2M tokens",
           periodEnd="2026-11-22T23:00:00Z"),
        tb("team-a", "monthly", percentUsed=42, state="Active", usedSummary="210.00 USD", limitSummary="500.00 USD",
           periodEnd="2026-12-01T05:00:00Z", forecastExhaustion="2026-11-28T10:00:00Z"),
        tb("team-a", "broken", conditions=[{"type": "Ready", "status": "False", "message": "thresholds must be strictly ascending"}]),
    ], now=NOW)
    assert [(r["namespace"], r["name"]) for r in items] == [("team-a", "broken"), ("team-a", "monthly"), ("team-b", "daily")]
    assert items[1]["resetsIn"] == "2026-12-01T05:00:00Z (in 8d17h)"
    assert items[2]["resetsIn"] == "2026-11-22T23:00:00Z (in 11h0m)"
    text = table(items, show_namespace=True)
    lines = text.splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "USAGE", "SPENT", "/", "LIMIT", "STATE", "FORECAST", "RESETS"]
    assert "210.00 USD / 500.00 USD" in text and "Exceeded (CutOff)" in text and "2026-11-28T10:00:00Z" in text
    assert "Invalid budgets (not enforced):\n  team-a/broken: thresholds must be strictly ascending" in text
    assert table([], show_namespace=False) == "No TokenBudgets found."
