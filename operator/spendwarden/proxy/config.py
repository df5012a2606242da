"""Loading the proxy configuration and compiling it into lookup tables for the hot path.

The file holds either a ProxyConfig (JSON or YAML; what the operator renders into the ConfigMap)
or a YAML stream of ModelRoute/TokenBudget manifests (standalone use). Both end up as a validated
`ProxyConfig`, which is compiled once per change into plain objects with everything the request
path needs precomputed (upstream URLs, auth headers, prices, rule tables, budgets per alias).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .. import SECRETS_DIR
from ..enums import OnExceeded, Provider
from ..ledger.pricing import Prices
from ..plainconfig import PlainConfigError, load_proxy_config, parse_duration

log = logging.getLogger("spendwarden.proxy")

DEFAULT_SECRETS_DIR = SECRETS_DIR

OPENAI = "openai"
ANTHROPIC = "anthropic"


class ConfigError(Exception):
    pass


# -- reading the file -----------------------------------------------------------------------------

def parse_config_text(text: str, namespace: str | None = None) -> tuple[Any, list[str]]:
    """A ProxyConfig from the file's text, and warnings (manifests that were left out).

    JSON (what the operator renders, after validating every object) is loaded without pydantic
    (spendwarden.plainconfig: same fields, defaults and enums, structure and types checked); a
    document that loader refuses, YAML and manifests are validated with the API models, for their
    full rules and error messages."""
    stripped = text.lstrip()
    doc: Any = None
    if stripped.startswith("{"):
        import json

        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"invalid JSON: {exc}") from exc
    else:
        import yaml

        try:
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as exc:
            raise ConfigError(f"invalid YAML: {exc}") from exc
        if len(docs) == 1 and isinstance(docs[0], dict) and "kind" not in docs[0]:
            doc = docs[0]
    if isinstance(doc, dict) and "kind" not in doc:
        if namespace and not doc.get("namespace"):
            doc = {**doc, "namespace": namespace}
        if stripped.startswith("{"):
            try:
                return load_proxy_config(doc), []
            except PlainConfigError:
                pass  # the models say what is wrong (or accept what they can coerce)
        from pydantic import ValidationError

        from ..api.proxyconfig import ProxyConfig

        try:
            return ProxyConfig.model_validate(doc), []
        except ValidationError as exc:
            from ..api.validation import explain_validation_error

            raise ConfigError(f"invalid ProxyConfig: {explain_validation_error(exc)}") from exc
    # A stream of manifests.
    from ..render.proxyconfig import load_manifests, render_proxy_config

    routes, budgets = load_manifests(text)
    if not routes and not budgets:
        raise ConfigError("no ProxyConfig and no ModelRoute/TokenBudget manifests found")
    ns = namespace or next((o.get("metadata", {}).get("namespace") for o in routes + budgets
                            if o.get("metadata", {}).get("namespace")), None) or "default"
    # Standalone use (a policy folder on a laptop or in CI): prices resolve as the operator resolves
    # them, so genai-prices is imported here, on first need. A sidecar never takes this path: it
    # reads the ProxyConfig the operator rendered, with every price already filled in.
    result = render_proxy_config(ns, routes, budgets)
    warnings = [f"{p.kind} {p.name!r} ignored: {p.message}" for p in result.problems]
    return result.config, warnings


# -- credentials ----------------------------------------------------------------------------------

def _env_name(name: str, key: str) -> str:
    return "SPENDWARDEN_SECRET_" + re.sub(r"[^A-Za-z0-9]", "_", f"{name}_{key}").upper()


def read_secret(name: str, key: str) -> str | None:
    """The API key from `$SPENDWARDEN_SECRETS_DIR/<name>/<key>` or env SPENDWARDEN_SECRET_<NAME>_<KEY>.

    None, whatever the environment says, for a name or key that leads out of the secrets directory
    ("/etc", "..", a symlink out): the route must not send another file's content as its API key."""
    directory = os.path.realpath(os.environ.get("SPENDWARDEN_SECRETS_DIR", DEFAULT_SECRETS_DIR))
    path = os.path.realpath(os.path.join(directory, name, key))
    if os.path.commonpath((directory, path)) != directory:
        log.warning("secret %r key %r resolves outside %s: refused", name[:253], key[:253], directory)
        return None
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().strip()
        if value:
            return value
    except OSError:
        pass
    value = os.environ.get(_env_name(name, key), "").strip()
    return value or None


# -- compiled tables ------------------------------------------------------------------------------

@dataclass(slots=True, eq=False)
class BackendRt:
    name: str
    route: str
    fmt: str  # OPENAI or ANTHROPIC (the wire format)
    provider: str  # OpenAI, OpenAICompatible, Anthropic
    base_url: str
    model: str
    prices: Prices
    headers: dict[str, str]  # auth headers (never logged)
    timeout: float
    max_context: int | None
    missing_credentials: str | None = None  # "secret/key" when a key was configured but not found
    _urls: dict[str, Any] = field(default_factory=dict)
    wake: tuple[str, float] | None = None  # scaled backends: (Hold | Fallback, hold timeout seconds)

    @property
    def load_key(self) -> str:
        """How the ledger report names this backend's load (scaled backends)."""
        return f"{self.route}/{self.name}"

    def url(self, api: str) -> Any:
        """Upstream URL (a parsed yarl.URL, cached) for 'chat/completions', 'completions', 'embeddings'
        or 'messages'."""
        u = self._urls.get(api)
        if u is None:
            from yarl import URL

            base = self.base_url
            if self.fmt == ANTHROPIC:
                text = base + ("/messages" if base.endswith("/v1") else "/v1/messages")
            else:
                text = base + "/" + api
            u = self._urls[api] = URL(text)
        return u


@dataclass(slots=True, eq=False)
class RuleRt:
    name: str
    headers: list[tuple[str, str | None]]
    min_tokens: int | None
    max_tokens: int | None
    tools: bool | None
    backend: BackendRt


@dataclass(slots=True, eq=False)
class BudgetRt:
    name: str
    spec: Any  # TokenBudgetSpec, or its plainconfig twin
    on_exceeded: OnExceeded
    routes: frozenset[str]  # empty: all


@dataclass(slots=True, eq=False)
class RouteRt:
    name: str
    alias: str
    backends: dict[str, BackendRt]
    rules: list[RuleRt]
    default: BackendRt
    fallbacks: list[BackendRt]
    downgrade: BackendRt
    max_tokens_cap: int | None
    max_prompt_tokens: int | None
    needs_estimate: bool
    budgets: list[BudgetRt] = field(default_factory=list)
    spend: Any = None  # proxy.spend.RouteSpend: tiers, judge, escalation, cache, loop breaker; None when unused


@dataclass(slots=True, eq=False)
class Compiled:
    namespace: str
    routes: dict[str, RouteRt]
    budgets: dict[str, BudgetRt]
    models_body: bytes
    source: Any  # ProxyConfig, or its plainconfig twin (the sidecar's load path)


def _backend(route_name: str, b: Any) -> BackendRt:
    provider = Provider(b.provider)
    if b.pricing is None or b.pricing.input is None or b.pricing.output is None:
        # The operator resolves every price before it writes the configuration; a hand-written one
        # must carry them too: the proxy has no catalog, and a missing price is never a zero.
        raise ConfigError(f"route {route_name!r}: backend {b.name!r} has no input and output prices "
                          f"(the operator or `spendwarden render` fill them in from the catalog)")
    fmt = ANTHROPIC if provider is Provider.ANTHROPIC else OPENAI
    headers: dict[str, str] = {}
    missing = None
    if b.credentials is not None:
        ref = b.credentials.secretRef
        key = read_secret(ref.name, ref.key)
        if key is None:
            missing = f"{ref.name}/{ref.key}"
        elif fmt == ANTHROPIC:
            headers["x-api-key"] = key
        else:
            headers["Authorization"] = f"Bearer {key}"
    return BackendRt(name=b.name, route=route_name, fmt=fmt, provider=provider.value,
                     base_url=b.url.rstrip("/"), model=b.model, prices=Prices.from_spec(b.pricing, provider),
                     headers=headers, timeout=float(b.timeoutSeconds), max_context=b.maxContextTokens,
                     missing_credentials=missing,
                     wake=(b.scaling.wake.mode.value, parse_duration(b.scaling.wake.timeout).total_seconds())
                     if b.scaling is not None else None)


def _route(name: str, spec: Any) -> RouteRt:
    backends = {b.name: _backend(name, b) for b in spec.backends}
    rules = [RuleRt(name=r.name or f"rule{i}", headers=[(h.name.lower(), h.value) for h in r.match.headers],
                    min_tokens=r.match.minPromptTokens, max_tokens=r.match.maxPromptTokens,
                    tools=r.match.toolsPresent, backend=backends[r.backend])
             for i, r in enumerate(spec.rules)]
    if spec.downgradeBackend:
        downgrade = backends[spec.downgradeBackend]
    else:
        # Cheapest by output price, then input price: output dominates worst cases.
        downgrade = min(backends.values(), key=lambda b: (b.prices.output, b.prices.input))
    limits = spec.limits
    needs = any(r.min_tokens is not None or r.max_tokens is not None for r in rules) \
        or any(b.max_context is not None for b in backends.values()) \
        or bool(limits and limits.maxPromptTokens)
    from .spend import compile_route_spend

    return RouteRt(name=name, alias=spec.model, backends=backends, rules=rules,
                   default=backends[spec.defaultBackend],
                   fallbacks=[backends[f] for f in spec.fallbacks], downgrade=downgrade,
                   max_tokens_cap=limits.maxTokens if limits else None,
                   max_prompt_tokens=limits.maxPromptTokens if limits else None,
                   needs_estimate=needs, spend=compile_route_spend(spec, backends))


def compile_config(cfg: Any, namespace: str | None = None) -> Compiled:
    import orjson

    routes = {r.spec.model: _route(r.name, r.spec) for r in cfg.routes}
    budgets = {b.name: BudgetRt(name=b.name, spec=b.spec, on_exceeded=OnExceeded(b.spec.onExceeded),
                                routes=frozenset(b.spec.routes)) for b in cfg.budgets}
    for route in routes.values():
        route.budgets = [b for b in budgets.values() if not b.routes or route.alias in b.routes]
        if route.budgets:
            route.needs_estimate = True
    models = {"object": "list", "data": [{"id": alias, "object": "model", "created": 0,
                                          "owned_by": "spendwarden"} for alias in sorted(routes)]}
    return Compiled(namespace=namespace or cfg.namespace, routes=routes, budgets=budgets,
                    models_body=orjson.dumps(models), source=cfg)


def secrets_fingerprint(cfg: Any) -> str:
    """A hash over the credentials the config refers to, so that rotated keys are picked up."""
    h = hashlib.sha256()
    for r in cfg.routes:
        for b in r.spec.backends:
            if b.credentials is not None:
                ref = b.credentials.secretRef
                h.update(f"{ref.name}/{ref.key}=".encode())
                h.update((read_secret(ref.name, ref.key) or "").encode())
                h.update(b"\0")
    return h.hexdigest()
