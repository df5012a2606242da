"""ModelRoute: how requests for one model alias are served."""
from __future__ import annotations

from pydantic import ConfigDict, Field, model_validator

from ..enums import Provider, WakeMode, WorkloadKind
from .common import (
    ZERO_DURATION_REGEX,
    ApiModel,
    Condition,
    Duration,
    Money,
    SecretKeyRef,
    cel,
    parse_duration,
)
from .spend import (
    SPEND_RULES,
    BackendRef,
    Escalation,
    Judge,
    LoopBreaker,
    ResponseCache,
    Tier,
    check_spend_references,
    known_backend,
)

KIND = "ModelRoute"
PLURAL = "modelroutes"
SINGULAR = "modelroute"
SHORT_NAMES = ["mr"]

NAME_PATTERN = r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$"
CATALOG_CURRENCY = "USD"  # genai-prices prices in USD




class Pricing(ApiModel):
    """Prices per 1M tokens, as decimal strings. Each field that is unset comes from the cluster's
    pinned prices (the operator's spendwarden-prices ConfigMap), then from the genai-prices catalog
    for OpenAI and Anthropic models: setting only output keeps the pinned or catalog input price."""

    input: Money | None = Field(default=None, description="Price per 1M input (prompt) tokens; default: pinned, then catalog.")
    output: Money | None = Field(default=None, description="Price per 1M output (completion) tokens; default: pinned, then catalog.")
    cachedInput: Money | None = Field(default=None, description="Price per 1M cached input tokens; default: the input price.")
    cacheWrite: Money | None = Field(
        default=None, description="Price per 1M prompt tokens written to the provider's prompt cache (Anthropic "
                                  "cache_creation_input_tokens, 5-minute TTL); default: 1.25 x input for Anthropic "
                                  "backends, the input price otherwise.")
    cacheWrite1h: Money | None = Field(
        default=None, description="Price per 1M prompt tokens written to the prompt cache with the 1-hour TTL "
                                  "(Anthropic cache_creation.ephemeral_1h_input_tokens); default: 2 x input for "
                                  "Anthropic backends, the input price otherwise.")
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$", max_length=3, description="ISO 4217 currency code. Default USD.")


class Credentials(ApiModel):
    """Where the upstream API key comes from."""

    secretRef: SecretKeyRef = Field(description="Secret (in the route's namespace) and key holding the API key.")




class DeploymentRef(ApiModel):
    """The in-cluster workload that serves a backend, so that the operator can scale it."""

    kind: WorkloadKind = Field(default=WorkloadKind.DEPLOYMENT, description="Deployment or StatefulSet.")
    name: str = Field(min_length=1, max_length=253, description="Name of the workload.")
    namespace: str | None = Field(default=None, max_length=63, description="Namespace of the workload; default: the route's namespace.")


def longer_than_zero(field_name: str) -> dict:
    """The CEL half of BackendScaling._bounds for one duration field."""
    return cel((f"!self.matches('{ZERO_DURATION_REGEX}')", f"{field_name} must be longer than 0s"))




class WakeSettings(ApiModel):
    """What a proxy does with a request for this backend while its workload is at zero replicas.
    Either way it asks the operator for one replica at once."""

    mode: WakeMode = Field(default=WakeMode.HOLD,
                           description="Hold: the request waits until a replica is available (up to timeout); "
                                       "Fallback: it goes to the route's next fallback at once. Default Hold.")
    timeout: Duration = Field(default="60s", description="Hold: the longest a request waits for a replica, then 503. Default 60s.",
                              json_schema_extra=longer_than_zero("wake.timeout"))


class BackendScaling(ApiModel):
    """Demand-driven replicas for the workload in deploymentRef (the operator sets them through the
    scale subresource; it leaves alone a workload that an HorizontalPodAutoscaler targets or whose
    replicas another writer set after it, except to hold it at 0 while cut off)."""

    model_config = ConfigDict(json_schema_extra=cel(
        ("!has(self.minReplicas) || self.minReplicas <= self.maxReplicas", "minReplicas must not be above maxReplicas")))

    minReplicas: int = Field(default=1, ge=0, le=1000, description="Fewest replicas the operator sets. With idleToZeroAfter set, at least 1 is kept until that idle period has passed, then 0. Default 1.")
    maxReplicas: int = Field(ge=1, le=1000, description="Most replicas the operator sets.")
    targetInFlightPerReplica: int = Field(default=4, ge=1, le=100000,
                                          description="Concurrent requests one replica should serve: desired = ceil(in-flight / this). Default 4.")
    scaleDownStabilization: Duration = Field(default="5m", description="Replicas go down only to the highest count wanted within this window (up at once). Default 5m.",
                                             json_schema_extra=longer_than_zero("scaleDownStabilization"))
    idleToZeroAfter: Duration | None = Field(default=None,
                                             description="Scale to zero after this long without requests; woken by the next request. Default: never below minReplicas.",
                                             json_schema_extra=longer_than_zero("idleToZeroAfter"))
    wake: WakeSettings = Field(default_factory=WakeSettings, description="Requests that arrive while the workload is at zero.")
    costPerReplicaHour: Money | None = Field(default=None,
                                             description="What one replica costs per hour (decimal string, in the route's pricing currency); status reports replica-hours and their cost.")

    @model_validator(mode="after")
    def _bounds(self) -> BackendScaling:
        if self.minReplicas > self.maxReplicas:
            raise ValueError(f"minReplicas {self.minReplicas} > maxReplicas {self.maxReplicas}")
        for field_name in ("scaleDownStabilization", "idleToZeroAfter", "wake.timeout"):
            value = self.wake.timeout if field_name == "wake.timeout" else getattr(self, field_name)
            if value is not None and parse_duration(value).total_seconds() <= 0:
                raise ValueError(f"{field_name} must be longer than 0s, got {value!r}")
        return self


class Backend(ApiModel):
    """One upstream that can serve the alias."""

    model_config = ConfigDict(json_schema_extra=cel(
        ("!has(self.scaling) || has(self.deploymentRef)", "scaling needs deploymentRef (the workload to scale)")))

    name: str = Field(min_length=1, max_length=63, pattern=NAME_PATTERN, description="Name of the backend, unique within the route.")
    provider: Provider = Field(description="Wire format of the upstream: OpenAI, Anthropic or OpenAICompatible (vLLM, llama.cpp, TGI, ...).")
    url: str = Field(pattern=r"^https?://", max_length=2048,
                     description="Base URL of the upstream API, e.g. https://api.openai.com/v1 or http://vllm.inference:8000/v1.")
    model: str = Field(min_length=1, max_length=256, description="Model name sent upstream, e.g. gpt-4o-mini.")
    pricing: Pricing | None = Field(default=None, description="Prices per 1M tokens; each unset field comes from the cluster's "
                                                      "pinned prices, then the genai-prices catalog (OpenAI and Anthropic models). "
                                                      "OpenAICompatible backends need pricing or a pin.")
    credentials: Credentials | None = Field(default=None, description="API key for the upstream; none for unauthenticated in-cluster servers.")
    deploymentRef: DeploymentRef | None = Field(default=None, description="The workload serving this backend, for scaling.")
    scaling: BackendScaling | None = Field(default=None, description="Scale the deploymentRef workload with demand; needs deploymentRef.")
    timeoutSeconds: int = Field(default=120, ge=1, le=3600, description="Upstream timeout for one request (seconds). Default 120.")
    maxContextTokens: int | None = Field(default=None, ge=1, description="Context window of the upstream model; prompts above it skip this backend.")

    @property
    def currency(self) -> str:
        """The currency of the backend's own pricing; without one, USD (the catalog's)."""
        return self.pricing.currency if self.pricing is not None else CATALOG_CURRENCY


class HeaderMatch(ApiModel):
    """Matches a request header."""

    name: str = Field(min_length=1, max_length=256, description="Header name (case-insensitive).")
    value: str | None = Field(default=None, max_length=1024, description="Exact value to match; omitted: the header only has to be present.")


class RuleMatch(ApiModel):
    """Conditions of a rule; all that are set must hold."""

    model_config = ConfigDict(json_schema_extra=cel(
        ("!has(self.minPromptTokens) || !has(self.maxPromptTokens) || self.minPromptTokens <= self.maxPromptTokens",
         "minPromptTokens must not be above maxPromptTokens")))

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

    # What _references and _spend_references check (no other object needed). Defaults apply
    # before CEL runs, so pricing.currency (where pricing is set) and scaling.wake.mode are always set.
    model_config = ConfigDict(json_schema_extra=cel(
        ("self.backends.all(b, self.backends.exists_one(o, o.name == b.name))",
         "backend names must be unique within spec.backends"),
        (known_backend("self.defaultBackend"), "defaultBackend must name a backend in spec.backends"),
        ("!has(self.rules) || self.rules.all(r, " + known_backend("r.backend") + ")",
         "each rules[].backend must name a backend in spec.backends"),
        ("!has(self.fallbacks) || self.fallbacks.all(f, " + known_backend("f") + ")",
         "each fallbacks[] entry must name a backend in spec.backends"),
        ("!has(self.downgradeBackend) || " + known_backend("self.downgradeBackend"),
         "downgradeBackend must name a backend in spec.backends"),
        ("self.backends.all(b, !has(b.pricing) || self.backends.all(o, !has(o.pricing) || "
         "o.pricing.currency == b.pricing.currency))",
         "all backends must price in one currency (spec.backends[].pricing.currency)"),
        ("self.backends.all(b, !has(b.scaling) || !has(b.scaling.wake) || b.scaling.wake.mode != 'Fallback' || "
         "(has(self.fallbacks) && self.fallbacks.exists(f, f != b.name)))",
         "scaling.wake.mode Fallback needs spec.fallbacks to name another backend (requests go there while the "
         "workload is at zero)"),
        *SPEND_RULES))

    model: str = Field(min_length=1, max_length=256, description="The model alias apps ask for, e.g. \"chat\". Unique per namespace.")
    backends: list[Backend] = Field(min_length=1, max_length=32, description="Upstreams that can serve the alias.")
    rules: list[Rule] = Field(default_factory=list, max_length=64, description="Routing rules, tried in order.")
    defaultBackend: str = Field(min_length=1, max_length=63, description="Backend for requests no rule matches.")
    fallbacks: list[BackendRef] = Field(default_factory=list, max_length=16,
                                        description="Backends tried in order when the chosen one fails (connect error, timeout, 5xx, 429).")
    downgradeBackend: str | None = Field(default=None, max_length=63,
                                         description="Backend used while a Downgrade budget is exceeded; default: the cheapest backend.")
    limits: RouteLimits | None = Field(default=None, description="Per-request caps.")
    # Spending less for the same result (api/spend.py).
    tiers: list[Tier] = Field(default_factory=list, max_length=8,
                              description="Complexity routing: requests no rule matches go to the highest tier their "
                                          "complexity score reaches (instead of defaultBackend). Cheapest first.")
    judge: Judge | None = Field(default=None, description="A small model that decides requests scored near a tier boundary.")
    escalation: Escalation | None = Field(default=None,
                                          description="Retry once on the next tier when an answer fails a check; on by "
                                                      "default when tiers are set.")
    cache: ResponseCache | None = Field(default=None, description="Response cache for deterministic requests; off when unset.")
    loopBreaker: LoopBreaker | None = Field(default=None, description="Refuse runaway repeats of one request; off when unset.")

    @model_validator(mode="after")
    def _references(self) -> ModelRouteSpec:
        names = [b.name for b in self.backends]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"backend names must be unique, duplicated: {', '.join(dupes)}")
        known = set(names)

        def check(where: str, name: str) -> None:
            if name not in known:
                raise ValueError(f"{where} names unknown backend {name!r} (known: {', '.join(sorted(known))})")

        check("defaultBackend", self.defaultBackend)
        for i, b in enumerate(self.backends):
            if b.scaling is None:
                continue
            if b.deploymentRef is None:
                raise ValueError(f"backends[{i}] ({b.name}): scaling needs deploymentRef (the workload to scale)")
            if b.scaling.wake.mode is WakeMode.FALLBACK and not any(f != b.name for f in self.fallbacks):
                raise ValueError(f"backends[{i}] ({b.name}): scaling.wake.mode Fallback needs spec.fallbacks to name "
                                 "another backend (requests go there while the workload is at zero)")
        for i, rule in enumerate(self.rules):
            check(f"rules[{i}].backend", rule.backend)
            m = rule.match
            if m.minPromptTokens is not None and m.maxPromptTokens is not None and m.minPromptTokens > m.maxPromptTokens:
                raise ValueError(f"rules[{i}].match: minPromptTokens {m.minPromptTokens} > maxPromptTokens {m.maxPromptTokens}")
        for i, name in enumerate(self.fallbacks):
            check(f"fallbacks[{i}]", name)
        if self.downgradeBackend is not None:
            check("downgradeBackend", self.downgradeBackend)
        currencies = {b.pricing.currency for b in self.backends if b.pricing is not None}
        if len(currencies) > 1:
            raise ValueError(f"all backends must price in one currency, got {', '.join(sorted(currencies))}")
        return self

    @model_validator(mode="after")
    def _spend_references(self) -> ModelRouteSpec:
        check_spend_references(self, {b.name for b in self.backends})
        return self


class EffectivePricing(ApiModel):
    """The prices the proxies charge for a backend, per 1M tokens, and where each came from."""

    input: str = Field(description="Price per 1M input tokens (decimal string).")
    output: str = Field(description="Price per 1M output tokens (decimal string).")
    cachedInput: str = Field(description="Price per 1M cached input tokens (decimal string).")
    cacheWrite: str = Field(description="Price per 1M prompt-cache write tokens, 5-minute TTL (decimal string).")
    cacheWrite1h: str = Field(description="Price per 1M prompt-cache write tokens, 1-hour TTL (decimal string).")
    currency: str = Field(description="ISO 4217 currency code.")
    source: str = Field(description="Where the prices come from: route, pinned, catalog:genai-prices/<version>, or "
                                    "several joined with + when fields come from different places.")
    sources: dict[str, str] = Field(default_factory=dict,
                                    description="Per price field, its source (route, pinned, catalog:..., or default: "
                                                "derived from the input price).")
    note: str | None = Field(default=None, description="What the catalog prices that the proxies do not (long-context tiers).")


class ResolvedBackend(ApiModel):
    """A backend as the proxies use it."""

    name: str = Field(description="Backend name.")
    provider: Provider = Field(description="Wire format.")
    model: str = Field(description="Upstream model.")
    url: str = Field(description="Upstream base URL.")
    pricing: EffectivePricing | None = Field(default=None, description="The effective prices and their source.")


class BackendScalingStatus(ApiModel):
    """One scaled backend, as the operator's scaler last saw it."""

    backend: str = Field(description="Backend name.")
    workload: str = Field(description="Kind/namespace/name of the scaled workload.")
    desiredReplicas: int | None = Field(default=None, description="Replicas the scaler wants now.")
    replicas: int | None = Field(default=None, description="Replicas the workload has (status.replicas).")
    availableReplicas: int | None = Field(default=None, description="Replicas ready to serve.")
    inFlight: int | None = Field(default=None, description="Requests in flight through all proxies whose namespaces may use it.")
    reason: str | None = Field(default=None, description="Why the desired count is what it is (Demand, Idle, CutOff, Wake, Conflict, ...).")
    lastScaleTime: str | None = Field(default=None, description="When the scaler last changed the replicas.")
    foreignWriter: str | None = Field(default=None, description="The field manager that set spec.replicas after the scaler (\"unrecorded\": a scale-subresource write, which Kubernetes before 1.21 does not record); the scaler leaves the replicas alone until it no longer owns them or the workload is annotated spendwarden.io/scaling=force.")
    periodStart: str | None = Field(default=None, description="Start of the accounting period of replicaHours.")
    replicaHours: str | None = Field(default=None, description="Replica-hours of the workload this period (decimal string).")
    cost: str | None = Field(default=None, description="replicaHours x costPerReplicaHour (decimal string).")
    currency: str | None = Field(default=None, description="Currency of cost.")
    previous: dict[str, str] | None = Field(default=None, description="The previous period's periodStart, replicaHours and cost.")


class ModelRouteStatus(ApiModel):
    """Observed state of a ModelRoute, written by the operator."""

    observedGeneration: int | None = Field(default=None, description="The metadata.generation last acted on.")
    ready: str | None = Field(default=None, description="True when the route is in the namespace's proxy configuration.")
    backendCount: int | None = Field(default=None, description="Number of backends.")
    backends: list[ResolvedBackend] = Field(default_factory=list, description="The backends the proxies use.")
    conditions: list[Condition] = Field(default_factory=list, description="Ready condition; ScalingConflict when another autoscaler or writer owns a scaled workload's replicas.")
    scaling: list[BackendScalingStatus] = Field(default_factory=list, description="Scaled backends: replicas, demand, replica-hours and their cost (written by the scaler).")


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
