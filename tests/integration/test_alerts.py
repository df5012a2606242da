"""Budget alerts end to end: a real operator process and apiserver, proxies' reports with real
ServiceAccount tokens, and a real webhook receiver on 127.0.0.1 (a thread: the tests block while
they poll the apiserver)."""
from __future__ import annotations

import asyncio
import base64
import calendar
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from kubernetes import client

from spendwarden.ledger.allowance import Amount
from tests.support.ledger_cluster import Operator, SimProxy, create_budget, get_budget, sa_token
from tests.support.operator_process import wait_for

FAST_ALERTS = {"SPENDWARDEN_ALERT_ATTEMPTS": "3", "SPENDWARDEN_ALERT_BACKOFF": "0.05", "SPENDWARDEN_ALERT_TIMEOUT": "2",
               "SPENDWARDEN_LEDGER_FLUSH_INTERVAL": "0.5"}


class Receiver:
    """A Slack-like incoming webhook: records every POSTed JSON body and answers `status`."""

    def __init__(self, status: int = 200):
        self.status = status
        self.bodies: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length") or 0)
                outer.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(outer.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, secret: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/services/{secret}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def texts(self, forecasts: bool = True) -> list[str]:
        # A forecast alert depends on the day of the month the test runs: tests of thresholds skip it.
        return [b["text"] for b in self.bodies if forecasts or "forecast to run out" not in b["text"]]


@pytest.fixture
def receiver():
    rx = Receiver()
    yield rx
    rx.close()


def _budget(alerting: dict, total: int = 100_000) -> dict:
    return {"period": {"type": "Monthly"}, "limits": {"tokens": {"total": total}}, "thresholds": [50, 80],
            "onExceeded": "AlertOnly", "alerting": alerting}


async def _report(op: Operator, kube, ns: str, start: str, used: Amount, name: str = "monthly", proxy: SimProxy | None = None,
                  http: httpx.AsyncClient | None = None) -> SimProxy:
    p = proxy or SimProxy(http, op.url, sa_token(kube, ns), ns, start, budget=name)
    p.allowance.used = used
    t0 = time.monotonic()
    assert await p.report()
    assert time.monotonic() - t0 < 5  # the ledger answers whatever the webhook does
    return p


async def test_threshold_and_exhaustion_are_posted_once_also_across_a_restart(control_plane, kube, own_namespace,
                                                                               receiver, tmp_path):
    op = Operator(control_plane, tmp_path, env=FAST_ALERTS, pattern="lk-*")
    op.start()
    ns = own_namespace
    try:
        secret_url = receiver.url("T0/B0/from-a-secret")
        client.CoreV1Api(kube).create_namespaced_secret(ns, {
            "metadata": {"name": "spendwarden-alerting"},
            "data": {"url": base64.b64encode(secret_url.encode()).decode()}})
        start = create_budget(kube, ns, "monthly", _budget({"webhookURL": receiver.url("T1/B1/plain")}))["status"]["periodStart"]
        create_budget(kube, ns, "small", _budget({"webhookSecretRef": {"name": "spendwarden-alerting"}}, total=10_000))
        async with httpx.AsyncClient() as http:
            p = await _report(op, kube, ns, start, Amount(40_000, 20_000), http=http)
            wait_for(lambda: len(receiver.texts(False)) >= 1, what="the 50% alert")
            body = next(b for b in receiver.bodies if "threshold" in b["text"])
            assert body["text"] == f"TokenBudget {ns}/monthly threshold crossed: 60% used (threshold 50%)"
            fields = {f["title"]: f["value"] for f in body["attachments"][0]["fields"]}
            assert fields["Used / limit"] == "60k tokens / 100k tokens" and fields["onExceeded"] == "AlertOnly"
            assert fields["Period ends"] == get_budget(kube, ns)["status"]["periodEnd"]

            await _report(op, kube, ns, start, Amount(70_000, 31_000), proxy=p)
            wait_for(lambda: len(receiver.texts(False)) >= 3, what="the 80% and the exhausted alerts")
            assert receiver.texts(False)[1:] == [f"TokenBudget {ns}/monthly threshold crossed: 101% used (threshold 80%)",
                                            f"TokenBudget {ns}/monthly exhausted: 101% used"]

            q = await _report(op, kube, ns, start, Amount(5_000, 500), name="small", http=http)
            wait_for(lambda: len(receiver.texts(False)) >= 4, what="the alert to the URL from the Secret")
            assert receiver.texts(False)[3] == f"TokenBudget {ns}/small threshold crossed: 55% used (threshold 50%)"

            await asyncio.to_thread(op.stop)
            op.start()
            # New usage after the restart: written, but no threshold is new, so nothing is posted again.
            await _report(op, kube, ns, start, Amount(70_000, 32_000), proxy=p)
            await _report(op, kube, ns, start, Amount(5_000, 600), proxy=q)
            wait_for(lambda: get_budget(kube, ns)["status"]["used"]["totalTokens"] == 102_000, what="usage written")
            wait_for(lambda: get_budget(kube, ns, "small")["status"]["used"]["totalTokens"] == 5_600, what="usage written")
            sent = len(receiver.bodies)
            time.sleep(1.0)
            assert len(receiver.texts(False)) == 4 and len(receiver.bodies) == sent, receiver.texts()
            assert op.metric("spendwarden_alert_webhook_total", outcome="unresolved") == 0
        log = "".join(f.read_text(errors="replace") for f in tmp_path.glob("operator-*.log"))
        assert "from-a-secret" not in log and "T1/B1/plain" not in log  # webhook URLs are credentials
    finally:
        op.stop()


async def test_a_failing_receiver_does_not_hurt_the_ledger(control_plane, kube, own_namespace, tmp_path):
    rx = Receiver(status=500)
    op = Operator(control_plane, tmp_path, env=FAST_ALERTS, pattern="lk-*")
    op.start()
    ns = own_namespace
    try:
        start = create_budget(kube, ns, "monthly", _budget({"webhookURL": rx.url("T2/B2/down")}))["status"]["periodStart"]
        async with httpx.AsyncClient() as http:
            p = await _report(op, kube, ns, start, Amount(50_000, 10_000), http=http)
            wait_for(lambda: op.metric("spendwarden_alert_webhook_total", outcome="failed") >= 1, what="delivery given up")
            wait_for(lambda: len(rx.texts(False)) == 3, what="three attempts")
            assert len(set(rx.texts(False))) == 1 and "threshold 50%" in rx.texts(False)[0]
            for used in (85_000, 90_000, 95_000):  # the ledger goes on answering and writing
                await _report(op, kube, ns, start, Amount(used - 10_000, 10_000), proxy=p)
            wait_for(lambda: get_budget(kube, ns)["status"]["used"]["totalTokens"] == 95_000, what="usage written")
            wait_for(lambda: any("threshold 80%" in t for t in rx.texts()), what="the 80% alert tried")
            wait_for(lambda: op.metric("spendwarden_alert_webhook_total", outcome="failed") >= 2, what="and given up")
            assert op.metric("spendwarden_alert_webhook_total", outcome="ok") == 0
            events = {e.reason for e in client.CoreV1Api(kube).list_namespaced_event(ns).items}
            assert "ThresholdCrossed" in events  # Kubernetes Events do not depend on the webhook
    finally:
        op.stop()
        rx.close()


async def test_forecast_condition_event_and_alert_from_the_recent_burn_rate(control_plane, kube, own_namespace,
                                                                             receiver, tmp_path):
    """A 1-minute window (forecast time constant 7.5 s): spending 3% a second from the window's start
    runs the budget out well before the window ends."""
    op = Operator(control_plane, tmp_path, env=FAST_ALERTS, pattern="lk-*")
    op.start()
    ns = own_namespace
    try:
        spec = {"window": "1m", "limits": {"tokens": {"total": 100_000}}, "thresholds": [90], "onExceeded": "AlertOnly",
                "alerting": {"webhookURL": receiver.url("T3/B3/forecast")}}
        create_budget(kube, ns, "minute", spec)
        await asyncio.sleep(61 - time.time() % 60)  # the next window's first second
        def forecast_true() -> dict | None:
            o = get_budget(kube, ns, "minute")
            return o if any(c["type"] == "ForecastExhausted" and c["status"] == "True"
                            for c in o["status"].get("conditions", [])) else None

        obj = None
        async with httpx.AsyncClient() as http:
            start = time.strftime("%Y-%m-%dT%H:%M:00Z", time.gmtime())
            p = SimProxy(http, op.url, sa_token(kube, ns), ns, start, budget="minute")
            # Spend until the condition is seen: once the spending stops the forecast drifts past the
            # window's end (the condition follows at the next write), so it is read while burning.
            for i in range(1, 40):
                p.allowance.used = Amount(1_500 * i, 0)
                assert await p.report()
                await asyncio.sleep(0.5)
                if i >= 6 and (obj := await asyncio.to_thread(forecast_true)) is not None:
                    break
        assert obj is not None, "no ForecastExhausted=True while spending 3% a second"
        cond = next(c for c in obj["status"]["conditions"] if c["type"] == "ForecastExhausted")
        assert cond["reason"] == "BurnRate" and "runs out around" in cond["message"]
        # The window's end as the ledger knows it (status.periodEnd is the reconcile's, rewritten by the
        # period-reset loop up to SPENDWARDEN_ROLLOVER_INTERVAL after the window turned).
        end = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(calendar.timegm(time.strptime(start, "%Y-%m-%dT%H:%M:%SZ")) + 60))
        assert f"before the period ends at {end}" in cond["message"]
        assert obj["status"]["forecastExhaustion"] < end
        events = wait_for(lambda: [e for e in client.CoreV1Api(kube).list_namespaced_event(ns).items
                                   if e.reason == "ForecastExhaustion"], what="the ForecastExhaustion Event")
        assert len(events) == 1
        wait_for(lambda: any("forecast to run out" in t for t in receiver.texts()), what="the forecast alert")
        assert op.metric("spendwarden_budget_forecast_exceeded", namespace=ns, budget="minute") == 1
    finally:
        op.stop()
