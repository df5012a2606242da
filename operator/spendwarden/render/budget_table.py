"""The `spendwarden status` table: TokenBudget objects in, text or JSON rows out (pure)."""
from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

BAR_WIDTH = 20


def usage_bar(percent: int | None, width: int = BAR_WIDTH) -> str:
    if percent is None:
        return "[" + "?" * width + "]"
    filled = min(width, max(0, percent * width // 100))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _until(iso: str | None, now: datetime) -> str:
    if not iso:
        return "-"
    when = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    seconds = int((when - now).total_seconds())
    if seconds <= 0:
        return f"{iso} (due)"
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    span = f"{days}d{hours}h" if days else f"{hours}h{rest // 60}m"
    return f"{iso} (in {span})"


def rows(budgets: list[dict[str, Any]], now: datetime | None = None) -> list[dict[str, Any]]:
    now = now or datetime.now(UTC)
    out = []
    for tb in sorted(budgets, key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"])):
        st = tb.get("status") or {}
        ready = next((c for c in st.get("conditions", []) if c.get("type") == "Ready"), None)
        state = st.get("state") or "-"
        if ready is not None and ready.get("status") == "False":
            state = "Invalid"
        out.append({
            "namespace": tb["metadata"].get("namespace", ""),
            "name": tb["metadata"]["name"],
            "percentUsed": st.get("percentUsed"),
            "used": st.get("usedSummary") or "-",
            "limit": st.get("limitSummary") or "-",
            "state": state,
            "onExceeded": (tb.get("spec") or {}).get("onExceeded", "CutOff"),
            "forecastExhaustion": st.get("forecastExhaustion"),
            "resets": st.get("periodEnd"),
            "resetsIn": _until(st.get("periodEnd"), now),
            "message": ready.get("message") if ready is not None and ready.get("status") == "False" else None,
        })
    return out


def table(items: list[dict[str, Any]], show_namespace: bool) -> str:
    if not items:
        return "No TokenBudgets found."
    header = (["NAMESPACE"] if show_namespace else []) + ["NAME", "USAGE", "SPENT / LIMIT", "STATE", "FORECAST", "RESETS"]
    lines = [header]
    for r in items:
        pct = "?" if r["percentUsed"] is None else f"{r['percentUsed']}%"
        lines.append(([r["namespace"]] if show_namespace else []) + [
            r["name"], f"{usage_bar(r['percentUsed'])} {pct:>4}", f"{r['used']} / {r['limit']}",
            r["state"] + (f" ({r['onExceeded']})" if r["state"] == "Exceeded" else ""),
            r["forecastExhaustion"] or "-", r["resetsIn"]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)
    problems = [f"{r['namespace']}/{r['name']}: {r['message']}" for r in items if r["message"]]
    return text + ("\n\nInvalid budgets (not enforced):\n  " + "\n  ".join(problems) if problems else "")
