"""The gateway: the proxy as a shared pool outside tenant namespaces (issue #13).

One process serves every namespace in gateway mode. The operator writes, in the gateway's own
namespace, one rendered configuration per tenant namespace (ConfigMap spendwarden-gateway-config,
key `<namespace>.json`, mounted as a directory) and the provider keys each tenant may use (Secret
spendwarden-gateway-credentials, key `<namespace>_<secret>_<key>`): tenants can read neither.

Per request: the caller's credential (`Authorization: Bearer`, as the OpenAI SDKs send their API
key, or `x-api-key`, as the Anthropic SDKs do) must be a ServiceAccount token with audience
spendwarden; TokenReview says whose (cached per token hash, briefly), before any of the body is
read. The namespace comes from the token, never from the request: a token of a namespace the
gateway does not serve gets 403, a forged one 401. Then the namespace's and the ServiceAccount's
rate limits, then that namespace's Proxy (server.py) serves the request exactly as a sidecar would:
routes, budgets and their ledger leases (each tenant is one proxy to the ledger, reporting with the
gateway's own token), cache, loop breaker, metrics. The access log and
spendwarden_gateway_workload_* name the calling ServiceAccount.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import operator
import os
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import Counter

from ..tokenreview import INVALID_TOKEN, MISSING_TOKEN, ReviewBusy, TokenReviewer, bearer_token
from .config import ANTHROPIC, OPENAI, ConfigError
from .errors import ProxyError, refusal
from .limits import BodyMemory
from .metrics import Metrics
from .ratelimit import TenantLimits
from .responses import RESPONSE_ROUTES
from .server import SERVED, Proxy, Shared, upstream_session

log = logging.getLogger("spendwarden.gateway")

CONFIG_SUFFIX = ".json"
# A namespace name (RFC 1123 label); a file of another name in the config directory is not a tenant.
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
# Secret names are DNS subdomains, keys [-._a-zA-Z0-9]+: neither a namespace nor a Secret name
# holds "_", so `<namespace>_<secret>_<key>` splits at its first two underscores.
_SECRET_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]{1,253}")
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
NAMESPACE_HEADER = "x-spendwarden-namespace"


def credential(headers: Any) -> str | None:
    """The token a client sent as its API key: `Authorization: Bearer` (OpenAI SDKs) or `x-api-key`
    (Anthropic SDKs); None when neither holds something of a token's syntax."""
    auth = headers.get("Authorization")
    if auth:
        return bearer_token(auth)
    key = headers.get("x-api-key")
    return bearer_token("Bearer " + key) if key else None


def looks_like_jwt(token: str) -> bool:
    """A ServiceAccount token is a JWT: three base64url segments, the first a JSON header naming its
    algorithm. Anything else is refused without a TokenReview."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts) or not all(_B64URL.fullmatch(p) for p in parts):
        return False
    try:
        header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
    except (ValueError, binascii.Error):
        return False
    return isinstance(header, dict) and isinstance(header.get("alg"), str)


def tenant_secret_reader(directory: str, namespace: str) -> Callable[[str, str], str | None]:
    """API keys of one tenant: `<directory>/<namespace>_<secret>_<key>`, nothing else. Names that are
    not a Secret's or key's syntax (a path, "..") are refused, so one tenant's route cannot name
    another tenant's file."""
    root = os.path.realpath(directory)

    def read(name: str, key: str) -> str | None:
        if not (_SECRET_NAME.fullmatch(name) and _SECRET_KEY.fullmatch(key)) or key.startswith("."):
            return None
        path = os.path.join(root, f"{namespace}_{name}_{key}")
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().strip() or None
        except OSError:
            return None

    return read


def kube_authentication(kubeconfig: str | None) -> Callable[[], Any]:
    """A factory of AuthenticationV1Api: in-cluster (the gateway Pod's own ServiceAccount, which the
    chart binds to system:auth-delegator) or from a kubeconfig. The client is built on first use."""
    built: list[Any] = []

    def api() -> Any:
        if not built:
            from kubernetes import client, config

            configuration = client.Configuration()
            if kubeconfig:
                config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
            else:
                config.load_incluster_config(client_configuration=configuration)
            built.append(client.AuthenticationV1Api(client.ApiClient(configuration)))
        return built[0]

    return api


class Gateway:
    def __init__(self, config_dir: str, secrets_dir: str, reviewer: TokenReviewer, limits: TenantLimits,
                 proxy_options: dict[str, Any] | None = None, poll_interval: float = 1.0, access_log: Any = None):
        self.config_dir = config_dir
        self.secrets_dir = secrets_dir
        self.reviewer = reviewer
        self.limits = limits
        self.poll_interval = poll_interval
        self.proxy_options = dict(proxy_options or {})
        body_memory = self.proxy_options.pop("body_memory", None)
        self.shared = Shared(bodies=BodyMemory(body_memory) if body_memory else BodyMemory(),
                             metrics=Metrics(), session=None,
                             access_log=access_log if access_log is not None else sys.stdout.buffer,
                             secret_reader=lambda name, key: None)
        m = self.shared.metrics
        self.refusals = Counter("spendwarden_gateway_refusals", "Requests the gateway refused before a "
                                "namespace's proxy saw them, by reason.", ("reason",), registry=m.registry)
        self.tenants: dict[str, Proxy] = {}
        self._broken: dict[str, float] = {}  # tenant file -> mtime of the version that failed to load
        self._task: asyncio.Task | None = None
        self.sync_tenants()

    # -- tenants ------------------------------------------------------------------------------------

    def _tenant_files(self) -> dict[str, str]:
        try:
            names = os.listdir(self.config_dir)
        except OSError as exc:
            log.error("cannot list %s: %s; keeping the current tenants", self.config_dir, exc.strerror or exc)
            return {ns: p.config_path for ns, p in self.tenants.items()}
        out = {}
        for name in names:
            ns = name[:-len(CONFIG_SUFFIX)] if name.endswith(CONFIG_SUFFIX) else ""
            if _NAMESPACE.fullmatch(ns):
                out[ns] = os.path.join(self.config_dir, name)
        return out

    def sync_tenants(self) -> tuple[list[Proxy], list[Proxy]]:
        """Add a Proxy for every new tenant file, drop those whose file is gone. Returns (added,
        dropped) for the caller to start and stop (nothing at construction: no loop runs yet)."""
        files = self._tenant_files()
        added: list[Proxy] = []
        dropped: list[Proxy] = []
        for ns in [ns for ns in self.tenants if ns not in files]:
            log.info("namespace %s left gateway mode: its proxy reports for the last time", ns)
            dropped.append(self.tenants.pop(ns))
        for ns, path in files.items():
            if ns in self.tenants:
                continue
            try:
                mtime = os.stat(path).st_mtime
            except OSError:
                continue
            if self._broken.get(path) == mtime:
                continue  # the same broken version: logged once
            try:
                proxy = Proxy(path, namespace=ns, shared=self._tenant_shared(ns), poll_interval=self.poll_interval,
                              **self.proxy_options)
            except (ConfigError, ValueError) as exc:
                self._broken[path] = mtime
                log.error("namespace %s: invalid configuration, not served: %s", ns, exc)
                continue
            self._broken.pop(path, None)
            self.tenants[ns] = proxy
            log.info("namespace %s is served (%d routes)", ns, len(proxy.compiled.routes) if proxy.compiled else 0)
            added.append(proxy)
        return added, dropped

    def _tenant_shared(self, namespace: str) -> Shared:
        s = self.shared
        return Shared(bodies=s.bodies, metrics=s.metrics, session=s.session, access_log=s.access_log,
                      secret_reader=tenant_secret_reader(self.secrets_dir, namespace))

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                added, dropped = self.sync_tenants()
                for proxy in added:
                    await proxy.start()
                await asyncio.gather(*(p.stop() for p in dropped), return_exceptions=True)
            except Exception:  # never let the poller die
                log.exception("tenant sync failed")

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self, app: web.Application) -> None:
        self.shared.session = upstream_session()
        for proxy in self.tenants.values():
            proxy.shared = self._tenant_shared(proxy.namespace_arg or "")
            await proxy.start()
        self._task = asyncio.create_task(self._poll())

    async def stop(self, app: web.Application) -> None:
        if self._task is not None:
            self._task.cancel()
        # Every tenant's last report (usage, and its leases given back), at once.
        await asyncio.gather(*(p.stop() for p in self.tenants.values()), return_exceptions=True)
        if self.shared.session is not None:
            await self.shared.session.close()
        self.reviewer.close()

    def app(self, max_body: int) -> web.Application:
        app = web.Application(client_max_size=max_body, handler_args={"max_field_size": 16384})
        r = app.router
        for path, api, fmt in SERVED:
            r.add_post(path, self._serving(api, fmt))
        r.add_get("/v1/models", self._endpoint(lambda p: p.models))
        r.add_get("/v1/models/{model}", self._endpoint(lambda p: p.model))
        r.add_post("/v1/messages/count_tokens", self._endpoint(lambda p: p.count_tokens, ANTHROPIC))
        for method, path, name in RESPONSE_ROUTES:
            r.add_route(method, path, self._endpoint(operator.attrgetter(name), OPENAI))
        r.add_get("/healthz", self.health)
        r.add_route("*", "/{tail:.*}", self.not_found)
        app.on_startup.append(self.start)
        app.on_cleanup.append(self.stop)
        return app

    def metrics_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics_handler)
        app.router.add_get("/healthz", self.health)
        return app

    async def metrics_handler(self, request: web.Request) -> web.Response:
        for proxy in self.tenants.values():
            proxy._budget_gauges()
        return web.Response(body=self.shared.metrics.render(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    # -- requests -----------------------------------------------------------------------------------

    async def authorize(self, request: web.Request, fmt: str) -> tuple[Proxy, str]:
        """The tenant's Proxy and the calling ServiceAccount, or the refusal (ProxyError)."""
        token = credential(request.headers)
        if token is None:
            self.refusals.labels("missing_token").inc()
            raise ProxyError(401, f"{MISSING_TOKEN}: send it as the API key (Authorization: Bearer, or x-api-key)",
                             code="missing_token", headers={"Connection": "close"})
        if not looks_like_jwt(token):
            # A provider key sent by mistake (sk-...) must not travel on to the apiserver in a TokenReview.
            self.refusals.labels("not_a_jwt").inc()
            raise ProxyError(401, f"{INVALID_TOKEN}: the API key must be the Pod's ServiceAccount token "
                                  "($SPENDWARDEN_TOKEN_FILE), not a provider key: the gateway holds those",
                             code="invalid_token", headers={"Connection": "close"})
        try:
            who = await self.reviewer.review(token)
        except ReviewBusy:
            self.refusals.labels("review_busy").inc()
            raise ProxyError(503, "too many unknown tokens under review; retry", code="review_busy",
                             headers={"Retry-After": "1"}) from None
        except Exception as exc:  # noqa: BLE001 - the apiserver cannot answer: retryable, not the caller's fault
            self.refusals.labels("review_failed").inc()
            log.warning("TokenReview failed: %s", type(exc).__name__)
            raise ProxyError(503, "cannot verify the token now; retry", code="review_failed",
                             headers={"Retry-After": "1"}) from None
        if who is None:
            self.refusals.labels("invalid_token").inc()
            raise ProxyError(401, INVALID_TOKEN, code="invalid_token", headers={"Connection": "close"})
        namespace, serviceaccount = who
        claimed = request.headers.get(NAMESPACE_HEADER)
        if claimed is not None and claimed != namespace:
            self.refusals.labels("forbidden_namespace").inc()
            raise ProxyError(403, f"a token of namespace {namespace} cannot act for namespace {claimed[:63]!r}",
                             code="forbidden_namespace")
        proxy = self.tenants.get(namespace)
        if proxy is None:
            self.refusals.labels("namespace_not_served").inc()
            raise ProxyError(403, f"namespace {namespace} is not served by this gateway: the operator serves "
                                  "a namespace here once it is labelled spendwarden.io/mode=gateway and has routes",
                             code="namespace_not_served")
        limited = self.limits.admit(namespace, serviceaccount)
        if limited is not None:
            which, wait = limited
            self.refusals.labels(f"rate_limited_{which}").inc()
            subject = f"namespace {namespace}" if which == "namespace" else \
                f"ServiceAccount {namespace}/{serviceaccount}"
            # A rate limit, not a budget: typed as the providers type theirs, so SDKs back off and retry.
            raise ProxyError(429, f"the gateway's request rate limit of {subject} is reached; retry after "
                                  f"{wait:.2f}s", code="rate_limit_exceeded",
                             headers={"Retry-After": str(max(1, math.ceil(wait)))},
                             extra={"type": "rate_limit_error" if fmt == ANTHROPIC else "requests"})
        return proxy, serviceaccount

    def _serving(self, api: str, fmt: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                proxy, serviceaccount = await self.authorize(request, fmt)
            except ProxyError as exc:
                return refusal(fmt, exc)
            return await proxy.serve(request, api, fmt, serviceaccount=serviceaccount)
        return handle

    def _endpoint(self, pick: Callable[[Proxy], Callable[[web.Request], Awaitable[web.StreamResponse]]],
                  fmt: str | None = None) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            f = fmt or (ANTHROPIC if "anthropic-version" in request.headers else OPENAI)
            try:
                proxy, _ = await self.authorize(request, f)
            except ProxyError as exc:
                return refusal(f, exc)
            return await pick(proxy)(request)
        return handle

    async def not_found(self, request: web.Request) -> web.StreamResponse:
        fmt = ANTHROPIC if request.path.startswith("/v1/messages") or "anthropic-version" in request.headers \
            else OPENAI
        try:
            proxy, _ = await self.authorize(request, fmt)  # unauthenticated callers learn nothing of the routes
        except ProxyError as exc:
            return refusal(fmt, exc)
        return await proxy.not_found(request)


__all__ = ["Gateway", "credential", "looks_like_jwt", "tenant_secret_reader", "kube_authentication", "NAMESPACE_HEADER"]
