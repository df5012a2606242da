"""Budget alerts as Slack-compatible webhook payloads (pure: no I/O, no clock).

One alert per ledger announcement (ledger/store.LedgerStore.events: a threshold crossed, the
budget exhausted, the forecast turning to exhaustion; each once per period). The payload is
`text` (what notifications and plain receivers show) plus one legacy `attachments` entry with
fields: Slack renders it, and so do the Slack-compatible endpoints of Mattermost, Rocket.Chat and
Discord, which ignore Block Kit `blocks`.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..api.tokenbudget import TokenBudgetSpec
from ..ledger.usage import budget_state, usage_fraction, usage_status
from .status import limit_summary

# Attachment colour per announcement: amber for an early warning, red once the budget is spent.
COLOURS = {"ThresholdCrossed": "#f2c744", "ForecastExhaustion": "#f2c744", "BudgetExceeded": "#d40e0d"}
TITLES = {"ThresholdCrossed": "threshold crossed", "ForecastExhaustion": "forecast to run out",
          "BudgetExceeded": "exhausted"}


@dataclass(frozen=True, slots=True)
class Alert:
    namespace: str
    budget: str
    reason: str          # the Event reason: ThresholdCrossed | BudgetExceeded | ForecastExhaustion
    message: str         # the Event message
    percent: int
    threshold: int | None
    used: str            # e.g. "60k tokens, 12.50 USD"
    limit: str           # e.g. "100k tokens, 500.00 USD"
    period_end: str      # RFC 3339
    on_exceeded: str


def alert_for(namespace: str, budget: str, spec: TokenBudgetSpec, used: dict[str, Any], period_end: str,
              reason: str, message: str, now: datetime) -> Alert:
    """The facts of one announcement, from the budget's spec and its usage (status Usage fields)."""
    fraction, _ = usage_fraction(spec, used)
    percent, _ = budget_state(spec, fraction)
    crossed = [t for t in spec.thresholds if percent >= t]
    summary = usage_status(spec, used, [], period_end, None, now)["usedSummary"]
    return Alert(namespace=namespace, budget=budget, reason=reason, message=message, percent=percent,
                 threshold=max(crossed) if crossed and reason == "ThresholdCrossed" else None,
                 used=summary, limit=limit_summary(spec), period_end=period_end,
                 on_exceeded=spec.onExceeded.value)


def _escape(text: str) -> str:
    # Slack's mrkdwn control characters; everything else is literal.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_payload(alert: Alert) -> dict[str, Any]:
    """The JSON body to POST: Slack incoming-webhook format."""
    name = _escape(f"{alert.namespace}/{alert.budget}")
    headline = f"TokenBudget {name} {TITLES.get(alert.reason, alert.reason)}: {alert.percent}% used"
    if alert.threshold is not None:
        headline += f" (threshold {alert.threshold}%)"
    fields = [
        {"title": "Namespace", "value": _escape(alert.namespace), "short": True},
        {"title": "Budget", "value": _escape(alert.budget), "short": True},
        {"title": "Used", "value": f"{alert.percent}%", "short": True},
        {"title": "Used / limit", "value": _escape(f"{alert.used} / {alert.limit}"), "short": True},
        {"title": "Period ends", "value": alert.period_end, "short": True},
        {"title": "onExceeded", "value": alert.on_exceeded, "short": True},
    ]
    return {
        "text": headline,
        "attachments": [{
            "fallback": headline,
            "color": COLOURS.get(alert.reason, "#f2c744"),
            "title": f"{alert.reason}: {name}",
            "text": _escape(alert.message),
            "fields": fields,
            "footer": "spendwarden",
        }],
    }
