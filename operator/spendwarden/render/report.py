"""The `spendwarden report`: cost and tokens per namespace, budget, period, route, backend, tag and
workload (the calling ServiceAccount, for requests the gateway served),
from TokenBudget status (the current period's `breakdown` and each finished period's in `history`).

Pure: TokenBudget objects in, rows / text / CSV out. Usage the proxies did not break down (proxies
older than the breakdown, escrow charged for proxies presumed dead) is shown as one (unattributed)
row per budget and period, so the rows of a period always add up to the budget's usage.
"""
from __future__ import annotations

import csv
import io
from decimal import Decimal
from typing import Any

PERIODS = ("current", "previous", "all")
UNATTRIBUTED = "(unattributed)"
# workload last: CSV consumers of the columns before it keep their positions.
COLUMNS = ("namespace", "budget", "periodStart", "periodEnd", "current", "route", "backend", "tag",
           "requests", "inputTokens", "outputTokens", "totalTokens", "cost", "currency", "workload")


def _periods(status: dict[str, Any], which: str) -> list[tuple[dict[str, Any], bool]]:
    """(period dict with periodStart/periodEnd/used/breakdown, is_current) for the selection."""
    current = {"periodStart": status.get("periodStart"), "periodEnd": status.get("periodEnd"),
               "used": status.get("used") or {}, "breakdown": status.get("breakdown") or []}
    history = [h for h in status.get("history") or [] if h.get("periodStart") != current["periodStart"]]
    if which == "current":
        return [(current, True)] if current["periodStart"] else []
    if which == "previous":
        return [(history[0], False)] if history else []
    return ([(current, True)] if current["periodStart"] else []) + [(h, False) for h in history]


def _row(base: dict[str, Any], route: str, backend: str, tag: str, requests: int | None, inp: int, out: int,
         cost: Decimal, workload: str = "") -> dict[str, Any]:
    return {**base, "route": route, "backend": backend, "tag": tag, "workload": workload, "requests": requests,
            "inputTokens": inp,
            "outputTokens": out, "totalTokens": inp + out, "cost": str(cost)}


def report_rows(budgets: list[dict[str, Any]], period: str = "current") -> list[dict[str, Any]]:
    if period not in PERIODS:
        raise ValueError(f"period must be one of {', '.join(PERIODS)}")
    out: list[dict[str, Any]] = []
    for tb in sorted(budgets, key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"])):
        spec, status = tb.get("spec") or {}, tb.get("status") or {}
        currency = ((spec.get("limits") or {}).get("cost") or {}).get("currency") or "USD"
        for p, is_current in _periods(status, period):
            base = {"namespace": tb["metadata"].get("namespace", ""), "budget": tb["metadata"]["name"],
                    "periodStart": p.get("periodStart"), "periodEnd": p.get("periodEnd"), "current": is_current,
                    "currency": currency}
            sum_in, sum_out, sum_cost = 0, 0, Decimal(0)
            for r in p.get("breakdown") or []:
                inp, outp, cost = int(r.get("inputTokens", 0)), int(r.get("outputTokens", 0)), Decimal(str(r.get("cost", "0")))
                sum_in, sum_out, sum_cost = sum_in + inp, sum_out + outp, sum_cost + cost
                out.append(_row(base, r.get("route", ""), r.get("backend", ""), r.get("tag", ""),
                                int(r.get("requests", 0)), inp, outp, cost, r.get("workload", "")))
            used = p.get("used") or {}
            rest = (int(used.get("inputTokens", 0)) - sum_in, int(used.get("outputTokens", 0)) - sum_out,
                    Decimal(str(used.get("cost", "0"))) - sum_cost)
            if any(v > 0 for v in rest):
                out.append(_row(base, UNATTRIBUTED, "", "", None, max(rest[0], 0), max(rest[1], 0), max(rest[2], Decimal(0))))
    return out


def table(rows: list[dict[str, Any]], show_namespace: bool) -> str:
    if not rows:
        return "No usage found."
    workloads = any(r.get("workload") for r in rows)  # the column only where a gateway served
    header = (["NAMESPACE"] if show_namespace else []) + ["BUDGET", "PERIOD", "ROUTE", "BACKEND", "TAG"] + \
        (["WORKLOAD"] if workloads else []) + ["REQUESTS", "INPUT", "OUTPUT", "COST"]
    lines = [header]
    totals: dict[tuple[str, str, str], Decimal] = {}
    for r in rows:
        period = f"{(r['periodStart'] or '')[:16]}{' (current)' if r['current'] else ''}"
        lines.append(([r["namespace"]] if show_namespace else []) + [
            r["budget"], period, r["route"], r["backend"] or "-", r["tag"] or "-",
            *([r.get("workload") or "-"] if workloads else []), "-" if r["requests"] is None else str(r["requests"]), str(r["inputTokens"]), str(r["outputTokens"]),
            f"{r['cost']} {r['currency']}"])
        key = (r["namespace"], r["budget"], period)
        totals[key] = totals.get(key, Decimal(0)) + Decimal(r["cost"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    right = {"REQUESTS", "INPUT", "OUTPUT", "COST"}
    text = "\n".join("  ".join(cell.rjust(w) if h in right else cell.ljust(w)
                               for cell, w, h in zip(line, widths, header)).rstrip() for line in lines)
    summary = [f"  {ns + '/' if show_namespace else ''}{budget} {period}: {cost}"
               for (ns, budget, period), cost in totals.items()]
    return text + "\n\nTotal cost per budget and period:\n" + "\n".join(summary)


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    return buf.getvalue()
