"""ModelRoute: how requests for one model alias are served."""
from __future__ import annotations

from enum import Enum

from pydantic import Field, model_validator

from .common import ApiModel, Condition, LocalObjectReference, Money, SecretKeyRef

KIND = "ModelRoute"
PLURAL = "modelroutes"
SINGULAR = "modelroute"
SHORT_NAMES = ["mr"]

NAME_PATTERN = r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$"


class Provider(str, Enum):
    OPENAI = "OpenAI"
    ANTHROPIC = "Anthropic"
    OPENAI_COMPATIBLE = "OpenAICompatible"


class Pricing(ApiModel):
    """Prices per 1M tokens, as decimal strings."""

    input: Money = Field(description="Price per 1M input (prompt) tokens.")
    output: Money = Field(description="Price per 1M output (completion) tokens.")
    cachedInput: Money | None = Field(default=None, description="Price per 1M cached input tokens; default: the input price.")
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$", description="ISO 4217 currency code. Default USD.")


class Credentials(ApiModel):
    """Where the upstream API key comes from."""

    secretRef: SecretKeyRef = Field(description="Secret (in the route's namespace) and key holding the API key.")


class WorkloadKind(str, Enum):
    DEPLOYMENT = "Deployment"
    STATEFULSET = "StatefulSet"


class DeploymentRef(ApiModel):
    """The in-cluster workload that serves a backend, so that the operator can scale it."""

    kind: WorkloadKind = Field(default=WorkloadKind.DEPLOYMENT, description="Deployment or StatefulSet.")
    name: str = Field(min_length=1, max_length=253, description="Name of the workload.")
    namespace: str | None = Field(default=None, max_length=63, description="Namespace of the workload; default: the route's namespace.")


class Backend(ApiModel):
    """One upstream that can serve the alias."""

    name: str = Field(min_length=1, max_length=63, pattern=NAME_PATTERN, description="Name of the backend, unique within the route.")
    provider: Provider = Field(description="Wire format of the upstream: OpenAI, Anthropic or OpenAICompatible (vLLM, llama.cpp, TGI, ...).")
    url: str = Field(pattern=r"^https?://", max_length=2048,
                     description="Base URL of the upstream API, e.g. https://api.openai.com/v1 or http://vllm.inference:8000/v1.")
    model: str = Field(min_length=1, max_length=256, description="Model name sent upstream, e.g. gpt-4o-mini.")
    pricing: Pricing = Field(description="Prices per 1M tokens.")
    credentials: Credentials | None = Field(default=None, description="API key for the upstream; none for unauthenticated in-cluster servers.")
    deploymentRef: DeploymentRef | None = Field(default=None, description="The workload serving this backend, for scaling.")
    timeoutSeconds: int = Field(default=120, ge=1, le=3600, description="Upstream timeout for one request (seconds). Default 120.")
    maxContextTokens: int | None = Field(default=None, ge=1, description="Context window of the upstream model; prompts above it skip this backend.")


class HeaderMatch(ApiModel):
    """Matches a request header."""

    name: str = Field(min_length=1, max_length=256, description="Header name (case-insensitive).")
    value: str | None = Field(default=None, max_length=1024, description="Exact value to match; omitted: the header only has to be present.")


class RuleMatch(ApiModel):
    """Conditions of a rule; all that are set must hold."""

    headers: list[HeaderMatch] = Field(default_factory=list, max_length=16, description="Headers that must match.")
    minPromptTokens: int | None = Field(default=None, ge=0, description="Estimated prompt tokens at least this many.")
    maxPromptTokens: int | None = Field(default=None, ge=0, description="Estimated prompt tokens at most this many.")
    toolsPresent: bool | None = Field(default=None, description="Whether the request declares tools.")


class Rule(ApiModel):
    """Send matching requests to a backend. Rules are tried in order; the first match wins."""

    name: str | None = Field(default=None, max_length=63, description="Name for metrics and logs.")
    match: RuleMatch = Field(description="What the request must look like.")
    backend: str = Field(min_length=1, max_length=63, description="Name of the backend (in spec.backends) to use.")


class RouteLimits(ApiModel):
    """Per-request caps."""

    maxTokens: int | None = Field(default=None, ge=1, description="Clamp max_tokens (and max_completion_tokens) to this.")
    maxPromptTokens: int | None = Field(default=None, ge=1, description="Refuse (400) requests whose estimated prompt exceeds this.")


class ModelRouteSpec(ApiModel):
    """How requests for the alias spec.model are served."""

    model: str = Field(min_length=1, max_length=256, description="The model alias apps ask for, e.g. \"chat\". Unique per namespace.")
    backends: list[Backend] = Field(min_length=1, max_length=32, description="Upstreams that can serve the alias.")
    rules: list[Rule] = Field(default_factory=list, max_length=64, description="Routing rules, tried in order.")
    defaultBackend: str = Field(min_length=1, max_length=63, description="Backend for requests no rule matches.")
    fallbacks: list[str] = Field(default_factory=list, max_length=16,
                                 description="Backends tried in order when the chosen one fails (connect error, timeout, 5xx, 429).")
    downgradeBackend: str | None = Field(default=None, max_length=63,
                                         description="Backend used while a Downgrade budget is exceeded; default: the cheapest backend.")
    limits: RouteLimits | None = Field(default=None, description="Per-request caps.")

    @model_validator(mode="after")
    def _references(self) -> "ModelRouteSpec":
        names = [b.name for b in self.backends]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"backend names must be unique, duplicated: {', '.join(dupes)}")
        known = set(names)

        def check(where: str, name: str) -> None:
            if name not in known:
                raise ValueError(f"{where} names unknown backend {name!r} (known: {', '.join(sorted(known))})")

        check("defaultBackend", self.defaultBackend)
        for i, rule in enumerate(self.rules):
            check(f"rules[{i}].backend", rule.backend)
            m = rule.match
            if m.minPromptTokens is not None and m.maxPromptTokens is not None and m.minPromptTokens > m.maxPromptTokens:
                raise ValueError(f"rules[{i}].match: minPromptTokens {m.minPromptTokens} > maxPromptTokens {m.maxPromptTokens}")
        for i, name in enumerate(self.fallbacks):
            check(f"fallbacks[{i}]", name)
        if self.downgradeBackend is not None:
            check("downgradeBackend", self.downgradeBackend)
        currencies = {b.pricing.currency for b in self.backends}
        if len(currencies) > 1:
            raise ValueError(f"all backends must price in one currency, got {', '.join(sorted(currencies))}")
        return self


class ResolvedBackend(ApiModel):
    """A backend as the proxies use it."""

    name: str = Field(description="Backend name.")
    provider: Provider = Field(description="Wire format.")
    model: str = Field(description="Upstream model.")
    url: str = Field(description="Upstream base URL.")


class ModelRouteStatus(ApiModel):
    """Observed state of a ModelRoute, written by the operator."""

    observedGeneration: int | None = Field(default=None, description="The metadata.generation last acted on.")
    ready: str | None = Field(default=None, description="True when the route is in the namespace's proxy configuration.")
    backendCount: int | None = Field(default=None, description="Number of backends.")
    backends: list[ResolvedBackend] = Field(default_factory=list, description="The backends the proxies use.")
    conditions: list[Condition] = Field(default_factory=list, description="Ready condition.")


class ModelRoute(ApiModel):
    """How requests for one model alias are served."""

    spec: ModelRouteSpec = Field(description="The desired routing.")
    status: ModelRouteStatus | None = Field(default=None, description="The observed state, written by the operator.")


PRINTER_COLUMNS = [
    {"name": "Model", "type": "string", "jsonPath": ".spec.model", "description": "The alias apps ask for"},
    {"name": "Default", "type": "string", "jsonPath": ".spec.defaultBackend", "description": "Default backend"},
    {"name": "Backends", "type": "integer", "jsonPath": ".status.backendCount", "description": "Number of backends"},
    {"name": "Ready", "type": "string", "jsonPath": ".status.ready", "description": "In the proxy configuration"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]
