"""Budget alert webhooks: POST the ledger's announcements to a budget's spec.alerting destination.

Fire and forget from the ledger's point of view: `announce` only schedules a task, so a slow or
failing receiver never delays a report, a flush or another budget. Each delivery has a timeout and
a few retries with exponential backoff (connection errors, timeouts, 408/425/429 and 5xx); other
answers are final. Deliveries beyond `max_pending` are dropped (counted), so a dead receiver cannot
pile up memory. At most once: an announcement is made after its usage was persisted, so a crash
between the two loses that alert rather than sending it twice after the restart.

The URL is a credential (a Slack webhook URL lets anyone post to the channel): it is never logged,
and exceptions are logged by type only (aiohttp puts URLs in some messages).
"""
from __future__ import annotations

import asyncio
import base64
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

from ..api.tokenbudget import Alerting
from ..render.alerts import alert_for, slack_payload

if TYPE_CHECKING:
    from ..ledger.store import BudgetEntry

log = logging.getLogger(__name__)

WEBHOOK = Counter("spendwarden_alert_webhook_total",
                  "Alert webhook deliveries by outcome: ok, rejected (a final 3xx/4xx answer), failed (retries "
                  "exhausted), dropped (too many pending), unresolved (no readable URL).", ["outcome"])

RETRYABLE = frozenset({408, 425, 429})


@dataclass(frozen=True)
class WebhookSettings:
    attempts: int = 4           # 1 + 3 retries
    timeout: float = 5.0        # per attempt
    backoff: float = 1.0        # before the first retry; doubles, capped at max_backoff
    max_backoff: float = 30.0
    max_pending: int = 200

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WebhookSettings:
        env = os.environ if env is None else env
        return cls(attempts=max(1, int(env.get("SPENDWARDEN_ALERT_ATTEMPTS") or 4)),
                   timeout=float(env.get("SPENDWARDEN_ALERT_TIMEOUT") or 5.0),
                   backoff=float(env.get("SPENDWARDEN_ALERT_BACKOFF") or 1.0))


def read_secret_value(namespace: str, name: str, key: str) -> str | None:
    """A key of a Secret in `namespace` (in a thread). None, with the reason logged, if unreadable."""
    from . import kube  # here: the pure alert settings and sender are used without a cluster client

    try:
        secret = kube.core().read_namespaced_secret(name, namespace)
    except kube.ApiException as exc:
        hint = (" (the chart lets the operator read only Secrets named as its alerting.webhookSecretName value)"
                if exc.status == 403 else "")
        log.warning("alert webhook: cannot read Secret %s/%s: HTTP %s%s", namespace, name, exc.status, hint)
        return None
    raw = (secret.data or {}).get(key)
    if raw is None:
        log.warning("alert webhook: Secret %s/%s has no key %r", namespace, name, key)
        return None
    try:
        return base64.b64decode(raw).decode().strip() or None
    except (ValueError, UnicodeDecodeError):
        log.warning("alert webhook: key %r of Secret %s/%s is not a UTF-8 URL", key, namespace, name)
        return None


SecretReader = Callable[[str, str, str], "str | None"]


class WebhookSender:
    def __init__(self, settings: WebhookSettings | None = None, read_secret: SecretReader = read_secret_value):
        self.settings = settings or WebhookSettings()
        self.read_secret = read_secret
        self._tasks: set[asyncio.Task] = set()
        self._last: dict[tuple[str, str], asyncio.Task] = {}  # per budget: alerts go out in order
        self._session: Any = None

    def announce(self, entry: BudgetEntry, reason: str, message: str) -> None:
        """Schedule the webhook POST for one ledger announcement, if the budget has a destination."""
        alerting = entry.spec.alerting
        if alerting is None or (alerting.webhookURL is None and alerting.webhookSecretRef is None):
            return
        from ..ledger.store import usage_dict
        alert = alert_for(entry.namespace, entry.name, entry.spec, usage_dict(entry.current.ledger.used()),
                          entry.current.end, reason, message, datetime.now(UTC))
        self.send(entry.namespace, entry.name, alerting, slack_payload(alert))

    def send(self, namespace: str, budget: str, alerting: Alerting, payload: dict[str, Any]) -> None:
        if len(self._tasks) >= self.settings.max_pending:
            WEBHOOK.labels(outcome="dropped").inc()
            log.warning("alert webhook: %d deliveries pending; dropping this one", len(self._tasks),
                        extra={"namespace": namespace, "budget": budget})
            return
        key = (namespace, budget)
        task = asyncio.create_task(self._deliver(namespace, budget, alerting, payload, self._last.get(key)),
                                   name=f"alert-webhook-{namespace}/{budget}")
        self._tasks.add(task)
        self._last[key] = task
        task.add_done_callback(lambda t: self._done(key, t))

    def _done(self, key: tuple[str, str], task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if self._last.get(key) is task:
            del self._last[key]

    async def _url(self, namespace: str, alerting: Alerting) -> str | None:
        ref = alerting.webhookSecretRef
        if ref is None:
            return alerting.webhookURL
        url = await asyncio.to_thread(self.read_secret, namespace, ref.name, ref.key)
        if url is not None and not url.startswith(("http://", "https://")):
            log.warning("alert webhook: the value in Secret %s/%s key %r is not an http(s) URL",
                        namespace, ref.name, ref.key)
            return None
        return url

    async def _deliver(self, namespace: str, budget: str, alerting: Alerting, payload: dict[str, Any],
                       after: asyncio.Task | None = None) -> None:
        where = {"namespace": namespace, "budget": budget}
        if after is not None:  # "80% used" before "exhausted", as they happened
            await asyncio.wait([after])
        try:
            url = await self._url(namespace, alerting)
        except Exception as exc:  # noqa: BLE001 - the apiserver is unreachable: no URL this time
            log.warning("alert webhook: reading the URL's Secret failed: %s", type(exc).__name__, extra=where)
            url = None
        if url is None:
            WEBHOOK.labels(outcome="unresolved").inc()
            return
        s = self.settings
        delay = s.backoff
        problem = ""
        for attempt in range(1, s.attempts + 1):
            status: int | None = None
            retry_after: float | None = None
            try:
                status, retry_after = await self._post(url, payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - aiohttp.ClientError, TimeoutError, OSError, InvalidURL
                problem = type(exc).__name__
            else:
                if 200 <= status < 300:
                    WEBHOOK.labels(outcome="ok").inc()
                    log.info("alert webhook delivered", extra={**where, "attempt": attempt})
                    return
                problem = f"HTTP {status}"
                if status < 500 and status not in RETRYABLE:
                    WEBHOOK.labels(outcome="rejected").inc()
                    log.warning("alert webhook refused the alert: %s (not retried)", problem, extra=where)
                    return
            if attempt < s.attempts:
                await asyncio.sleep(min(retry_after if retry_after is not None else delay, s.max_backoff))
                delay = min(delay * 2, s.max_backoff)
        WEBHOOK.labels(outcome="failed").inc()
        log.warning("alert webhook failed after %d attempts: %s", s.attempts, problem, extra=where)

    async def _post(self, url: str, payload: dict[str, Any]) -> tuple[int, float | None]:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout)
        # No redirects: a POST redirected elsewhere would carry the alert to a URL nobody configured.
        async with self._session.post(url, json=payload, timeout=timeout, allow_redirects=False) as resp:
            await resp.read()
            retry_after = resp.headers.get("Retry-After")
            return resp.status, float(retry_after) if retry_after and retry_after.isdigit() else None

    async def close(self, timeout: float = 2.0) -> None:
        """Give pending deliveries a moment (shutdown), then cancel the rest."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        if self._session is not None:
            await self._session.close()
            self._session = None
