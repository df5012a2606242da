"""Plumbing for the admission webhooks: settings from the environment, the TLS material (kept in a
Secret in-cluster, in a temp dir otherwise) and kopf's WebhookServer adapted to a Service.

In-cluster means SPENDWARDEN_WEBHOOK_SERVICE is set (the chart sets it): the apiserver then calls
the operator through that Service, with a `service:` client config, because apiservers often cannot
resolve cluster DNS names in URLs. Otherwise (local runs, tests) it calls https://localhost:<port>.
"""
from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import shutil
import tempfile
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import kopf

from .. import GROUP
from ..tls import WebhookTLS, issue_webhook_tls, not_after, webhook_tls_problem
from . import kube

log = logging.getLogger(__name__)

POLICIES = ("Fail", "Ignore")


def _policy(env: Mapping[str, str], name: str, default: str) -> str:
    value = (env.get(name) or default).strip().capitalize()
    if value not in POLICIES:
        raise ValueError(f"{name} must be Fail or Ignore, not {env.get(name)!r}")
    return value


@dataclass(frozen=True)
class WebhookSettings:
    enabled: bool
    port: int = 9443
    configuration: str = GROUP
    service: str | None = None
    service_port: int = 443
    namespace: str | None = None
    cert_secret: str = "spendwarden-webhook-tls"
    addr: str = "127.0.0.1"
    host: str = "localhost"
    # Pod injection: Ignore, because every Pod creation in the cluster passes through it (kopf
    # cannot set a namespaceSelector), so with Fail an operator outage would stop all new pods,
    # kube-system's included. A pod created meanwhile only misses its sidecar.
    pod_failure_policy: str = "Ignore"
    # TokenBudget/ModelRoute validation: Fail, so a bad spec is never stored unseen. An operator that
    # is down can serve nothing anyway, and on a clean shutdown kopf removes the webhooks.
    validation_failure_policy: str = "Fail"
    cert_check_interval: float = 12 * 3600

    @property
    def in_cluster(self) -> bool:
        return bool(self.service)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WebhookSettings:
        env = os.environ if env is None else env
        port = env.get("SPENDWARDEN_WEBHOOK_PORT")
        service = env.get("SPENDWARDEN_WEBHOOK_SERVICE") or None
        return cls(
            enabled=bool(port),
            port=int(port or 9443),
            configuration=env.get("SPENDWARDEN_WEBHOOK_CONFIGURATION") or GROUP,
            service=service,
            service_port=int(env.get("SPENDWARDEN_WEBHOOK_SERVICE_PORT") or 443),
            namespace=env.get("SPENDWARDEN_POD_NAMESPACE") or None,
            cert_secret=env.get("SPENDWARDEN_WEBHOOK_CERT_SECRET") or "spendwarden-webhook-tls",
            # In a pod the apiserver connects from outside: listen on all interfaces.
            addr=env.get("SPENDWARDEN_WEBHOOK_ADDR") or ("0.0.0.0" if service else "127.0.0.1"),
            host=env.get("SPENDWARDEN_WEBHOOK_HOST") or "localhost",
            pod_failure_policy=_policy(env, "SPENDWARDEN_WEBHOOK_FAILURE_POLICY", "Ignore"),
            validation_failure_policy=_policy(env, "SPENDWARDEN_VALIDATION_FAILURE_POLICY", "Fail"),
            cert_check_interval=float(env.get("SPENDWARDEN_WEBHOOK_CERT_CHECK_SECONDS") or 12 * 3600),
        )

    def hosts(self) -> list[str]:
        """Names the serving certificate must carry; the first is what the apiserver verifies."""
        if self.in_cluster:
            svc, ns = self.service, self.namespace
            return [f"{svc}.{ns}.svc", svc, f"{svc}.{ns}", f"{svc}.{ns}.svc.cluster.local"]  # type: ignore[list-item]
        return list(dict.fromkeys([self.host, "localhost", "127.0.0.1"]))

    def service_ref(self) -> dict[str, Any] | None:
        if not self.in_cluster:
            return None
        return {"namespace": self.namespace, "name": self.service, "port": self.service_port}


class WebhookServer(kopf.WebhookServer):
    """kopf's server, with three adaptations:

    * in-cluster it hands kopf a `service:` client config instead of kopf's URL one;
    * it fills a Pod's metadata.namespace from the request: for CREATE the apiserver runs mutating
      webhooks before it sets the namespace on the object, and the injection needs it;
    * it refuses a malformed AdmissionReview with a 400 naming what is wrong: kopf answered a body
      that is not UTF-8, is nested too deep, or has a request, resource or object of another type
      with a 500 (and a traceback in the operator's log).
    """

    def __init__(self, *, service: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.service = dict(service) if service else None

    async def __call__(self, fn: Any) -> AsyncIterator[Any]:
        async def with_namespace(request: dict[str, Any], **kwargs: Any) -> Any:
            payload = request.get("request") or {}
            obj, ns = payload.get("object"), payload.get("namespace")
            if ns and isinstance(obj, dict):
                meta = obj.setdefault("metadata", {})
                if not meta.get("namespace"):
                    meta["namespace"] = ns
            return await fn(request, **kwargs)

        # kopf types the request as its own TypedDict; ours reads it as the plain dict it is.
        async for config in super().__call__(cast(kopf.WebhookFn, with_namespace)):
            yield service_client_config(config, self.service) if self.service else config

    @staticmethod
    async def _serve(fn: Any, request: Any) -> Any:
        import aiohttp.web

        problem = review_problem(await request.read())
        if problem is not None:
            raise aiohttp.web.HTTPBadRequest(reason=f"malformed AdmissionReview: {problem}")
        return await kopf.WebhookServer._serve(fn, request)


def review_problem(raw: bytes) -> str | None:
    """What makes `raw` no AdmissionReview kopf can serve, or None (kopf itself then refuses a
    review without userInfo or object, and one for a resource it does not serve)."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return "the body is not UTF-8"
    except RecursionError:
        return "the body is nested too deep"
    except ValueError:
        return "the body is not JSON"
    if not isinstance(data, dict):
        return f"the body must be an object, not {type(data).__name__}"
    payload = data.get("request")
    if not isinstance(payload, dict):
        return "request: must be an object"
    resource = payload.get("resource")
    if not isinstance(resource, dict) or not all(isinstance(resource.get(k), str) for k in ("group", "version",
                                                                                            "resource")):
        return "request.resource: must be an object with group, version and resource strings"
    for key in ("object", "oldObject", "userInfo"):
        if payload.get(key) is not None and not isinstance(payload[key], dict):
            return f"request.{key}: must be an object"
    for key in ("object", "oldObject"):  # the apiserver always sends an object's metadata
        if payload.get(key) is not None and not isinstance(payload[key].get("metadata"), dict):
            return f"request.{key}.metadata: must be an object"
    for key in ("uid", "operation", "namespace", "subResource"):
        if payload.get(key) is not None and not isinstance(payload[key], str):
            return f"request.{key}: must be a string"
    return None


def service_client_config(config: Mapping[str, Any], service: Mapping[str, Any]) -> dict[str, Any]:
    """kopf's URL client config turned into a `service:` one with the same path and CA bundle."""
    path = urllib.parse.urlsplit(config.get("url") or "").path
    out: dict[str, Any] = {"service": {**service, **({"path": path} if path else {})}}
    if config.get("caBundle"):
        out["caBundle"] = config["caBundle"]
    return out


class CertStore:
    """Keeps the serving certificate files fresh: from/to the Secret in-cluster, in memory locally.

    kopf's WebhookServer re-reads its files every minute and restarts itself when they change, and
    kopf then re-patches the webhook configurations; so rotating is only rewriting the files."""

    def __init__(self, settings: WebhookSettings) -> None:
        self.settings = settings
        self.dir = Path(tempfile.mkdtemp(prefix="spendwarden-webhook-"))
        self.tls: WebhookTLS | None = None
        self.certfile, self.cafile = self.dir / "tls.pem", self.dir / "ca.crt"

    def ensure(self, now: datetime.datetime | None = None) -> str | None:
        """Issue or rotate if needed and (re)write the files; returns what was wrong, None if nothing."""
        hosts = self.settings.hosts()
        if self.settings.in_cluster:
            tls, problem = ensure_secret(kube.core(), self.settings.namespace or "",
                                         self.settings.cert_secret, hosts, now)
        else:
            problem = webhook_tls_problem(self.tls, hosts, now)
            tls = issue_webhook_tls(hosts, self.tls, now) if problem else self.tls  # type: ignore[assignment]
        if tls != self.tls or not self.certfile.exists():
            self.tls = tls
            tls.write(self.dir)
            log.info("webhook serving certificate ready", extra={
                "hosts": hosts, "expires": not_after(tls.cert).isoformat(), "renewed_because": problem,
                "secret": self.settings.cert_secret if self.settings.in_cluster else None})
        return problem

    async def keep_fresh(self) -> None:
        while True:
            await asyncio.sleep(self.settings.cert_check_interval)
            try:
                await asyncio.to_thread(self.ensure)
            except Exception:  # retried at the next interval; the current cert still serves
                log.exception("webhook certificate check failed")

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def ensure_secret(core: Any, namespace: str, name: str, hosts: list[str],
                  now: datetime.datetime | None = None) -> tuple[WebhookTLS, str | None]:
    """The webhook TLS material from Secret `namespace/name`, issued or rotated (and stored) when it is
    absent, expiring within 30 days or not naming `hosts`. Restarts reuse it, so the caBundle in the
    webhook configurations stays valid across restarts. Returns (tls, why it was renewed or None)."""
    for _ in range(5):  # optimistic concurrency: re-read on conflict
        secret = kube.or_none(lambda: core.read_namespaced_secret(name, namespace))
        stored = WebhookTLS.from_secret_data(secret.data if secret is not None else None)
        problem = webhook_tls_problem(stored, hosts, now)
        if problem is None:
            return stored, None  # type: ignore[return-value]
        tls = issue_webhook_tls(hosts, stored, now)
        meta: dict[str, Any] = {"name": name, "namespace": namespace,
                                "labels": {"app.kubernetes.io/managed-by": "spendwarden"}}
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "Secret", "metadata": meta,
                                "type": "kubernetes.io/tls", "data": tls.secret_data()}
        try:
            if secret is None:
                core.create_namespaced_secret(namespace, body)
            else:
                meta["resourceVersion"] = secret.metadata.resource_version
                meta["labels"] = {**(secret.metadata.labels or {}), **meta["labels"]}
                body["type"] = secret.type or body["type"]  # a Secret's type is immutable
                core.replace_namespaced_secret(name, namespace, body)
        except kube.ApiException as exc:
            if exc.status == 409:
                continue
            # The response of a failed write is not logged: it could echo the Secret.
            raise RuntimeError(f"cannot store the webhook certificate in Secret {namespace}/{name}: "
                               f"HTTP {exc.status} {exc.reason}") from None
        return tls, problem
    raise RuntimeError(f"Secret {namespace}/{name} kept changing while storing the webhook certificate")
