"""Budget alert webhooks: the pure Slack payload, and delivery (retries, final answers, secrets never
logged) against a real HTTP receiver on 127.0.0.1."""
from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from spendwarden.api.tokenbudget import Alerting, TokenBudgetSpec
from spendwarden.controller.alerts import WebhookSender, WebhookSettings
from spendwarden.render.alerts import alert_for, slack_payload
from tests.support.operator_process import free_port

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
END = "2026-12-01T00:00:00Z"
SPEC = TokenBudgetSpec.model_validate({"period": {"type": "Monthly"}, "thresholds": [50, 80],
                                       "limits": {"tokens": {"total": 100_000}, "cost": {"amount": "500.00"}},
                                       "onExceeded": "Downgrade"})
USED = {"inputTokens": 60_000, "outputTokens": 25_000, "totalTokens": 85_000, "cost": "120.50"}


def test_threshold_payload_names_budget_percent_used_limit_period_end_and_on_exceeded():
    alert = alert_for("team-a", "monthly", SPEC, USED, END, "ThresholdCrossed", "85% of budget monthly used", NOW)
    assert alert.percent == 85 and alert.threshold == 80
    body = slack_payload(alert)
    assert body["text"] == "TokenBudget team-a/monthly threshold crossed: 85% used (threshold 80%)"
    (att,) = body["attachments"]
    fields = {f["title"]: f["value"] for f in att["fields"]}
    assert fields == {"Namespace": "team-a", "Budget": "monthly", "Used": "85%",
                      "Used / limit": "85k tokens, 120.50 USD / 100k tokens, 500.00 USD",
                      "Period ends": END, "onExceeded": "Downgrade"}
    assert att["text"] == "85% of budget monthly used" and att["color"] == "#f2c744"


def test_exhausted_payload_is_red_without_a_threshold_and_escapes_mrkdwn():
    used = {**USED, "totalTokens": 100_000, "inputTokens": 75_000}
    alert = alert_for("team-a", "monthly", SPEC, used, END, "BudgetExceeded", "a <b> & c", NOW)
    body = slack_payload(alert)
    assert body["text"] == "TokenBudget team-a/monthly exhausted: 100% used"
    assert body["attachments"][0]["color"] == "#d40e0d"
    assert body["attachments"][0]["text"] == "a &lt;b&gt; &amp; c"


def test_alerting_takes_a_url_or_a_secret_reference_not_both():
    assert Alerting.model_validate({"webhookSecretRef": {"name": "spendwarden-alerting"}}).webhookSecretRef.key == "url"
    with pytest.raises(ValueError, match="not both"):
        Alerting.model_validate({"webhookURL": "https://hooks.example/x", "webhookSecretRef": {"name": "s"}})


class Receiver:
    """A webhook receiver that answers the queued statuses (then 200) and records the bodies."""

    def __init__(self, statuses: list[int] | None = None):
        self.statuses = list(statuses or [])
        self.bodies: list[dict] = []
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        return web.Response(status=self.statuses.pop(0) if self.statuses else 200)

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook/{secret}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)  # the receiver's own log is not ours to check
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    def url(self, secret: str = "T000-SECRET") -> str:
        return f"http://127.0.0.1:{self.port}/hook/{secret}"


def count(outcome: str) -> float:
    return REGISTRY.get_sample_value("spendwarden_alert_webhook_total", {"outcome": outcome}) or 0.0


FAST = WebhookSettings(attempts=3, timeout=2.0, backoff=0.01)


async def _drain(sender: WebhookSender) -> None:
    await asyncio.wait_for(asyncio.gather(*sender._tasks), 10)


async def test_retries_server_errors_then_delivers_and_never_logs_the_url(caplog):
    caplog.set_level(logging.DEBUG)
    async with Receiver([503, 500]) as rx:
        sender = WebhookSender(FAST)
        before = count("ok")
        sender.send("team-a", "monthly", Alerting(webhookURL=rx.url()), {"text": "hi"})
        await _drain(sender)
        await sender.close()
    assert rx.bodies == [{"text": "hi"}] * 3 and count("ok") == before + 1
    assert "T000-SECRET" not in caplog.text


async def test_a_final_refusal_is_not_retried_and_an_unreachable_receiver_fails_after_the_attempts(caplog):
    caplog.set_level(logging.DEBUG)
    async with Receiver([404]) as rx:
        sender = WebhookSender(FAST)
        rejected, failed = count("rejected"), count("failed")
        sender.send("team-a", "monthly", Alerting(webhookURL=rx.url()), {"text": "hi"})
        dead = f"http://127.0.0.1:{free_port()}/hook/T000-SECRET"
        sender.send("team-a", "monthly", Alerting(webhookURL=dead), {"text": "hi"})
        await _drain(sender)
        await sender.close()
    assert len(rx.bodies) == 1 and count("rejected") == rejected + 1 and count("failed") == failed + 1
    assert "T000-SECRET" not in caplog.text and "failed after 3 attempts" in caplog.text


async def test_secret_reference_is_resolved_per_delivery_and_unreadable_is_counted():
    async with Receiver() as rx:
        secrets = {("team-a", "spendwarden-alerting", "url"): rx.url()}
        sender = WebhookSender(FAST, read_secret=lambda ns, name, key: secrets.get((ns, name, key)))
        unresolved = count("unresolved")
        sender.send("team-a", "monthly", Alerting.model_validate({"webhookSecretRef": {"name": "spendwarden-alerting"}}),
                    {"text": "from a secret"})
        sender.send("team-b", "monthly", Alerting.model_validate({"webhookSecretRef": {"name": "spendwarden-alerting"}}),
                    {"text": "nobody"})
        await _drain(sender)
        await sender.close()
    assert rx.bodies == [{"text": "from a secret"}] and count("unresolved") == unresolved + 1


async def test_deliveries_beyond_max_pending_are_dropped():
    sender = WebhookSender(WebhookSettings(attempts=1, timeout=0.5, max_pending=2))
    dropped = count("dropped")
    hook = Alerting(webhookURL=f"http://127.0.0.1:{free_port()}/x")
    for _ in range(3):
        sender.send("team-a", "monthly", hook, {"text": "x"})
    assert count("dropped") == dropped + 1
    await _drain(sender)
    await sender.close()


async def test_one_budgets_alerts_arrive_in_order_even_when_the_first_needs_retries():
    async with Receiver([503]) as rx:
        sender = WebhookSender(FAST)
        hook = Alerting(webhookURL=rx.url())
        for text in ("80%", "exhausted"):
            sender.send("team-a", "monthly", hook, {"text": text})
        await _drain(sender)
        await sender.close()
    assert [b["text"] for b in rx.bodies] == ["80%", "80%", "exhausted"]
    assert sender._last == {}
