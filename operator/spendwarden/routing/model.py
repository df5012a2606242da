"""The compiled route model: a validated ProxyConfig as plain objects with everything the request
path needs precomputed (upstream URLs, prices, rule tables, budgets per alias, spend policies).

Compiled once per configuration change by the proxy (proxy.config, which passes the API-key reader)
and once per candidate by the offline simulator (which passes none).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..enums import OnExceeded, Provider
from ..ledger.pricing import Prices
from ..plainconfig import parse_duration
from .spend import RouteSpend, compile_route_spend

OPENAI = "openai"
ANTHROPIC = "anthropic"

SecretReader = Callable[[str, str], "str | None"]  # (secret name, key) -> the API key, or None


class ConfigError(Exception):
    pass


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
    spend: RouteSpend | None = None  # routing.spend.RouteSpend: tiers, judge, escalation, cache, loop breaker; None when unused


@dataclass(slots=True, eq=False)
class Compiled:
    namespace: str
    routes: dict[str, RouteRt]
    budgets: dict[str, BudgetRt]
    models_body: bytes
    source: Any  # ProxyConfig, or its plainconfig twin (the sidecar's load path)


def _backend(route_name: str, b: Any, secret: SecretReader | None) -> BackendRt:
    provider = Provider(b.provider)
    if b.pricing is None or b.pricing.input is None or b.pricing.output is None:
        # The operator resolves every price before it writes the configuration; a hand-written one
        # must carry them too: the proxy has no catalog, and a missing price is never a zero.
        raise ConfigError(f"route {route_name!r}: backend {b.name!r} has no input and output prices "
                          f"(the operator or `spendwarden render` fill them in from the catalog)")
    fmt = ANTHROPIC if provider is Provider.ANTHROPIC else OPENAI
    headers: dict[str, str] = {}
    missing = None
    if b.credentials is not None and secret is not None:
        ref = b.credentials.secretRef
        key = secret(ref.name, ref.key)
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


def _route(name: str, spec: Any, secret: SecretReader | None) -> RouteRt:
    backends = {b.name: _backend(name, b, secret) for b in spec.backends}
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
    return RouteRt(name=name, alias=spec.model, backends=backends, rules=rules,
                   default=backends[spec.defaultBackend],
                   fallbacks=[backends[f] for f in spec.fallbacks], downgrade=downgrade,
                   max_tokens_cap=limits.maxTokens if limits else None,
                   max_prompt_tokens=limits.maxPromptTokens if limits else None,
                   needs_estimate=needs, spend=compile_route_spend(spec, backends))


def compile_config(cfg: Any, namespace: str | None = None, secret: SecretReader | None = None) -> Compiled:
    """`cfg` (a ProxyConfig, or its plainconfig twin) as lookup tables. `secret(name, key)` reads a
    backend's API key (None: not found); without it no key is read and no auth header is set, as
    the offline simulator wants."""
    import orjson

    routes = {r.spec.model: _route(r.name, r.spec, secret) for r in cfg.routes}
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


__all__ = ["OPENAI", "ANTHROPIC", "ConfigError", "SecretReader", "BackendRt", "RuleRt", "BudgetRt", "RouteRt",
           "Compiled", "compile_config"]
