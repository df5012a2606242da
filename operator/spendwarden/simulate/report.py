"""Summaries of replayed candidates, side by side: a dict (for JSON) and a text table.

Money stays Decimal until it is written: JSON carries exact decimal strings, the table rounds for
reading (totals to 4 places, per-request figures to 6). The first candidate is the baseline that
the others are compared with. Rates: escalations per request answered upstream (cache hits have
no answer to check), cache hits per request.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timezone
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any
from zoneinfo import ZoneInfo

from ..ledger.pricing import ZERO, format_money
from .budget import PeriodRun, limit_summary, run_out
from .candidates import Budget, Candidate
from .replay import RequestResult


@dataclass(frozen=True, slots=True)
class CandidateRun:
    candidate: Candidate
    results: list[RequestResult]


def _day_zone(budget: Budget | None) -> ZoneInfo | timezone:
    if budget is not None and budget.spec.period is not None:
        return ZoneInfo(budget.spec.period.timeZone)
    return UTC


def _rate(n: int, of: int) -> float:
    return round(100.0 * n / of, 2) if of else 0.0


def _time(t: datetime | None) -> str | None:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if t is not None else None


def _period(p: PeriodRun) -> dict[str, Any]:
    return {"start": _time(p.start), "end": _time(p.end), "requests": p.requests,
            "cost": format_money(p.used.cost), "inputTokens": p.used.input_tokens,
            "outputTokens": p.used.output_tokens, "percentOfLimit": p.percent,
            "exhaustedAt": _time(p.exhausted_at), "requestsAfterExhaustion": p.after_exhaustion,
            "projectedExhaustion": _time(p.projected_exhaustion)}


def summarize(run: CandidateRun, budget: Budget | None, baseline_cost: Decimal | None) -> dict[str, Any]:
    res = run.results
    served = [r for r in res if r.route is not None]
    upstream = [r for r in served if not r.cache_hit]
    total = sum((r.cost for r in served), ZERO)
    currency = next((r.currency for r in served if r.currency), "")
    zone = _day_zone(budget)
    by_scenario: dict[str, list[RequestResult]] = defaultdict(list)
    by_day: dict[str, Decimal] = defaultdict(lambda: ZERO)
    for r in served:
        by_scenario[r.scenario].append(r)
        by_day[r.ts.astimezone(zone).date().isoformat()] += r.cost
    escalated = [r for r in served if r.escalated]
    hits = [r for r in served if r.cache_hit]
    out: dict[str, Any] = {
        "candidate": run.candidate.name, "file": run.candidate.path, "currency": currency,
        "requests": len(served), "unrouted": len(res) - len(served),
        "cost": format_money(total),
        "costPerRequest": format_money(total / len(served)) if served else "0",
        "savingsVsBaseline": (float(round((1 - total / baseline_cost) * 100, 2))
                              if baseline_cost is not None and baseline_cost > 0 else None),
        "inputTokens": sum(r.input_tokens for r in served),
        "outputTokens": sum(r.output_tokens for r in served),
        "backends": dict(sorted(Counter(r.backend for r in upstream if r.backend).items())),
        "escalations": len(escalated),
        "escalationRate": _rate(len(escalated), len(upstream)),
        "escalationCauses": dict(sorted(Counter(r.escalation_cause for r in escalated).items())),
        "cacheHits": len(hits), "cacheHitRate": _rate(len(hits), len(served)),
        "cacheSaved": format_money(sum((r.saved for r in hits), ZERO)),
        "scenarios": {s: {"requests": len(rs), "cost": format_money(sum((r.cost for r in rs), ZERO)),
                          "costPerRequest": format_money(sum((r.cost for r in rs), ZERO) / len(rs)),
                          "escalations": sum(1 for r in rs if r.escalated),
                          "cacheHits": sum(1 for r in rs if r.cache_hit)}
                      for s, rs in sorted(by_scenario.items())},
        "days": {d: format_money(c) for d, c in sorted(by_day.items())},
    }
    if budget is not None:
        periods = run_out(budget, res)
        out["budget"] = {"name": budget.name, "limit": limit_summary(budget),
                         "onExceeded": budget.spec.onExceeded.value,
                         "runsOutAt": next((_time(p.exhausted_at) for p in periods if p.exhausted_at), None),
                         "periods": [_period(p) for p in periods]}
    return out


def summarize_all(runs: list[CandidateRun], budget: Budget | None) -> dict[str, Any]:
    baseline = None
    out = []
    for i, run in enumerate(runs):
        s = summarize(run, budget, baseline)
        if i == 0:
            baseline = Decimal(s["cost"])
            s["savingsVsBaseline"] = None
        out.append(s)
    return {"baseline": runs[0].candidate.name if runs else None, "candidates": out}


# -- the table -----------------------------------------------------------------------------------

def _money(text: str, places: int) -> str:
    return str(Decimal(text).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_EVEN))


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) or "-"


def _budget_cell(b: dict[str, Any]) -> str:
    periods = b["periods"]
    if not periods:
        return "no covered requests"
    done = [p for p in periods if p["exhaustedAt"]]
    if done:
        first = done[0]
        return (f"out at {first['exhaustedAt']} ({len(done)}/{len(periods)} periods; "
                f"{first['requestsAfterExhaustion']} requests after)")
    last = periods[-1]
    peak = max(p["percentOfLimit"] for p in periods)
    if last["projectedExhaustion"]:
        return f"not in the log (peak {peak}%); at this rate out at {last['projectedExhaustion']}"
    return f"never (peak {peak}% of the limit)"


def table(summary: dict[str, Any]) -> str:
    cands = summary["candidates"]
    if not cands:
        return "no candidates\n"
    cur = cands[0]["currency"]
    rows: list[tuple[str, list[str]]] = [("", [c["candidate"] for c in cands])]

    def row(label: str, cells: list[str]) -> None:
        rows.append((label, cells))

    row("requests", [f"{c['requests']}" + (f" (+{c['unrouted']} without a route)" if c["unrouted"] else "")
                     for c in cands])
    row(f"cost ({cur})", [_money(c["cost"], 4) for c in cands])
    row("cost per request", [_money(c["costPerRequest"], 6) for c in cands])
    row(f"vs {summary['baseline']}", ["baseline" if c["savingsVsBaseline"] is None
                                      else f"{-c['savingsVsBaseline']:+.1f}%" for c in cands])
    row("escalation rate", [f"{c['escalationRate']}% ({c['escalations']})" for c in cands])
    row("  causes", [_counts(c["escalationCauses"]) for c in cands])
    row("cache hit rate", [f"{c['cacheHitRate']}% ({c['cacheHits']}, saved {_money(c['cacheSaved'], 4)})"
                           for c in cands])
    row("answered by", [_counts(c["backends"]) for c in cands])
    scenarios = sorted({s for c in cands for s in c["scenarios"]})
    if scenarios and scenarios != ["-"]:
        row("cost per request by scenario", ["" for _ in cands])
        for s in scenarios:
            row(f"  {s}", [_money(c["scenarios"][s]["costPerRequest"], 6) if s in c["scenarios"] else "-"
                           for c in cands])
    days = sorted({d for c in cands for d in c["days"]})
    row("cost per day", ["" for _ in cands])
    for d in days:
        row(f"  {d}", [_money(c["days"][d], 4) if d in c["days"] else "-" for c in cands])
    if "budget" in cands[0]:
        b = cands[0]["budget"]
        row(f"budget {b['name']}: {b['limit']}", [_budget_cell(c["budget"]) for c in cands])
    width = max(len(label) for label, _ in rows)
    widths = [max(len(cells[i]) for _, cells in rows) for i in range(len(cands))]
    lines = []
    for label, cells in rows:
        lines.append("  ".join([label.ljust(width)] + [cell.ljust(w) for cell, w in zip(cells, widths)]).rstrip())
    return "\n".join(lines) + "\n"


def cumulative(results: list[RequestResult]) -> list[tuple[datetime, Decimal]]:
    """(time, cost so far) after each served request: the series the plot draws."""
    total = ZERO
    out = []
    for r in results:
        if r.route is None:
            continue
        total += r.cost
        out.append((r.ts, total))
    return out
