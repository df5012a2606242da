"""Gateway mode (issue #13), pure: what the operator writes for the shared gateway pool and for the
tenant namespaces it serves, and whom the ledger trusts for which namespace.

The gateway is one Deployment in its own namespace (the chart's gateway.namespace) holding the
provider keys; tenant namespaces labelled spendwarden.io/mode=gateway reach the providers only
through it. This module decides, from plain inputs:
  - a namespace's mode (its label, else the chart's default; gateway mode only if the chart enabled
    the gateway);
  - the ConfigMap spendwarden-gateway-config: `<tenant>.json` -> the tenant's rendered ProxyConfig
    JSON, exactly what its own spendwarden-proxy ConfigMap holds;
  - the Secret spendwarden-gateway-credentials: `<tenant>_<secret>_<key>` -> the value of that key
    of that Secret in the gateway namespace, for the credentials each tenant's served routes name,
    only when the Secret shares itself with the tenant (annotation spendwarden.io/tenants);
  - the tenant's NetworkPolicy spendwarden-gateway-egress: egress only to DNS, cluster pods, the
    apiserver and the allowed CIDRs (the providers, on the internet, only through the gateway);
  - the ledger's trust: the gateway's ServiceAccount may report for gateway-mode namespaces, a
    tenant's own token may not while the namespace's egress is enforced.
controller/gateway.py does the I/O.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import GROUP
from ..api.common import set_condition
from ..api.proxyconfig import ProxyConfig

MODE_LABEL = f"{GROUP}/mode"
MODE_GATEWAY, MODE_SIDECAR = "gateway", "sidecar"
MODES = (MODE_GATEWAY, MODE_SIDECAR)
# While a namespace carries this label (value "open"), its egress policy is not applied: the
# migration window in which old sidecar pods still call the providers directly.
EGRESS_LABEL = f"{GROUP}/gateway-egress"
EGRESS_OPEN = "open"
TENANTS_ANNOTATION = f"{GROUP}/tenants"

GATEWAY_NAME = "spendwarden-gateway"           # its ServiceAccount, Deployment and Service
CONFIGMAP_NAME = "spendwarden-gateway-config"
CREDENTIALS_SECRET = "spendwarden-gateway-credentials"
EGRESS_POLICY_NAME = "spendwarden-gateway-egress"
GATEWAY_PORT = 8787
# A ConfigMap holds at most 1 MiB; what is above this bound is not written (the last good one stays).
MAX_CONFIGMAP_BYTES = 900 * 1024
CONFIG_SUFFIX = ".json"
CREDENTIALS_CONDITION = "CredentialsReady"
LABELS = {"app.kubernetes.io/managed-by": "spendwarden", "app.kubernetes.io/component": "gateway"}
NAME_LABEL = "kubernetes.io/metadata.name"
# Never put in gateway mode by the default: the cluster's own namespaces.
SYSTEM_NAMESPACES = frozenset({"kube-system", "kube-public", "kube-node-lease"})


@dataclass(frozen=True)
class GatewaySettings:
    """From the chart: SPENDWARDEN_GATEWAY_NAMESPACE (set only with gateway.enabled),
    SPENDWARDEN_GATEWAY_SERVICE_ACCOUNT, SPENDWARDEN_DEFAULT_MODE, SPENDWARDEN_GATEWAY_EGRESS_CIDRS."""

    namespace: str | None = None     # None: gateway mode is off
    service_account: str = GATEWAY_NAME
    default_mode: str = MODE_SIDECAR
    egress_cidrs: tuple[str, ...] = ()  # gateway.tenantEgress.allowCIDRs
    port: int = GATEWAY_PORT

    def __post_init__(self) -> None:
        if self.default_mode not in MODES:
            raise ValueError(f"SPENDWARDEN_DEFAULT_MODE must be gateway or sidecar, not {self.default_mode!r}")

    @property
    def enabled(self) -> bool:
        return bool(self.namespace)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> GatewaySettings:
        cidrs = tuple(c.strip() for c in (env.get("SPENDWARDEN_GATEWAY_EGRESS_CIDRS") or "").split(",") if c.strip())
        return cls(namespace=env.get("SPENDWARDEN_GATEWAY_NAMESPACE") or None,
                   service_account=env.get("SPENDWARDEN_GATEWAY_SERVICE_ACCOUNT") or GATEWAY_NAME,
                   default_mode=(env.get("SPENDWARDEN_DEFAULT_MODE") or MODE_SIDECAR).strip().lower(),
                   egress_cidrs=cidrs)

    def base_url(self) -> str:
        return f"http://{GATEWAY_NAME}.{self.namespace}.svc:{self.port}"


# -- modes ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModeDecision:
    mode: str
    note: str | None = None  # why a namespace labelled gateway is served as sidecar


def namespace_mode(namespace: str, labels: Mapping[str, str] | None, settings: GatewaySettings) -> ModeDecision:
    """The namespace's mode: its spendwarden.io/mode label, else the chart's default. The gateway's own
    namespace and the cluster's system namespaces are never tenants."""
    label = (labels or {}).get(MODE_LABEL)
    if not settings.enabled or namespace == settings.namespace:
        note = (f"namespace labelled {MODE_LABEL}={MODE_GATEWAY}, but the gateway is not enabled in the chart "
                f"(gateway.enabled): served in sidecar mode") if label == MODE_GATEWAY and not settings.enabled else None
        return ModeDecision(MODE_SIDECAR, note)
    if label in MODES:
        return ModeDecision(label)
    if label:
        return ModeDecision(settings.default_mode if namespace not in SYSTEM_NAMESPACES else MODE_SIDECAR,
                            f"unknown {MODE_LABEL}={label!r} (gateway or sidecar): the default applies")
    return ModeDecision(MODE_SIDECAR if namespace in SYSTEM_NAMESPACES else settings.default_mode)


def egress_open(labels: Mapping[str, str] | None) -> bool:
    """The migration window: the egress policy is not applied while spendwarden.io/gateway-egress=open."""
    return (labels or {}).get(EGRESS_LABEL) == EGRESS_OPEN


# -- the gateway's configuration -------------------------------------------------------------------------

def config_key(namespace: str) -> str:
    return f"{namespace}{CONFIG_SUFFIX}"


@dataclass(frozen=True)
class ConfigData:
    data: dict[str, str]
    left_out: tuple[str, ...] = ()  # tenants that did not fit under MAX_CONFIGMAP_BYTES

    @property
    def fits(self) -> bool:
        return not self.left_out


def gateway_config_data(configs: Mapping[str, str], max_bytes: int = MAX_CONFIGMAP_BYTES) -> ConfigData:
    """`configs`: tenant namespace -> its rendered ProxyConfig JSON (render.proxyconfig.config_json).
    Sorted; the tenants (in name order) from the first one that would cross `max_bytes` are left_out:
    the caller then keeps the last good ConfigMap rather than write an incomplete one."""
    data: dict[str, str] = {}
    size, left_out = 0, []
    for ns in sorted(configs):
        key, body = config_key(ns), configs[ns]
        size += len(key.encode()) + len(body.encode())
        if size > max_bytes:
            left_out.append(ns)
        else:
            data[key] = body
    return ConfigData(data, tuple(left_out))


def configmap_manifest(namespace: str, data: Mapping[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": CONFIGMAP_NAME, "namespace": namespace, "labels": dict(LABELS)},
            "data": dict(sorted(data.items()))}


# -- the gateway's credentials ---------------------------------------------------------------------------

def credential_key(namespace: str, secret: str, key: str) -> str:
    """Namespace and Secret names cannot contain "_": the gateway splits at the first two."""
    return f"{namespace}_{secret}_{key}"


@dataclass(frozen=True)
class GatewaySecret:
    """A Secret of the gateway namespace, as far as the selection needs it."""

    annotations: Mapping[str, str]
    data: Mapping[str, str]  # key -> base64 value, as the apiserver returns it

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> GatewaySecret:
        meta = obj.get("metadata") or {}
        return cls(dict(meta.get("annotations") or {}), dict(obj.get("data") or {}))


def shared_with(secret: GatewaySecret, tenant: str) -> bool:
    listed = {t.strip() for t in (secret.annotations.get(TENANTS_ANNOTATION) or "").split(",")}
    return tenant in listed or "*" in listed


@dataclass(frozen=True)
class CredentialProblem:
    reason: str   # SecretNotFound | SecretNotShared | KeyNotFound
    message: str


@dataclass
class CredentialSelection:
    data: dict[str, str] = field(default_factory=dict)  # credential_key -> base64 value
    # (tenant, route) -> its problems; a route of a gateway tenant that is absent has all it needs.
    problems: dict[tuple[str, str], list[CredentialProblem]] = field(default_factory=dict)
    routes: set[tuple[str, str]] = field(default_factory=set)  # every (tenant, route) that takes credentials


def route_credentials(config: ProxyConfig) -> list[tuple[str, str, str]]:
    """(route, secret, key) of every credentials.secretRef of the namespace's served routes."""
    return sorted({(r.name, b.credentials.secretRef.name, b.credentials.secretRef.key)
                   for r in config.routes for b in r.spec.backends if b.credentials is not None})


def select_credentials(tenants: Mapping[str, ProxyConfig], secrets: Mapping[str, GatewaySecret],
                       gateway_namespace: str) -> CredentialSelection:
    """Which keys of the gateway namespace's Secrets go to which tenant. A Secret is given to a tenant
    only if its annotation spendwarden.io/tenants lists the tenant (or "*")."""
    out = CredentialSelection()
    for tenant in sorted(tenants):
        for route, name, key in route_credentials(tenants[tenant]):
            out.routes.add((tenant, route))
            secret = secrets.get(name)
            problem = None
            if secret is None:
                problem = CredentialProblem("SecretNotFound", (
                    f"Secret {name!r} not found in the gateway namespace {gateway_namespace}: in gateway mode the provider "
                    f"keys live there, annotated {TENANTS_ANNOTATION}: {tenant}"))
            elif not shared_with(secret, tenant):
                problem = CredentialProblem("SecretNotShared", (
                    f"Secret {name!r} in the gateway namespace {gateway_namespace} is not shared with namespace {tenant}: "
                    f"add {tenant} (or *) to its annotation {TENANTS_ANNOTATION}"))
            elif key not in secret.data:
                problem = CredentialProblem("KeyNotFound", (
                    f"Secret {name!r} in the gateway namespace {gateway_namespace} has no key {key!r}"))
            if problem is None:
                out.data[credential_key(tenant, name, key)] = secret.data[key]  # type: ignore[union-attr]  # checked
            else:
                out.problems.setdefault((tenant, route), []).append(problem)
    out.data = dict(sorted(out.data.items()))
    return out


def credentials_manifest(namespace: str, data: Mapping[str, str]) -> dict[str, Any]:
    """`data`: already base64, as select_credentials gives it (values are never decoded here)."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": CREDENTIALS_SECRET, "namespace": namespace, "labels": dict(LABELS)},
            "data": dict(sorted(data.items()))}


def credentials_condition(status: Mapping[str, Any] | None, problems: Sequence[CredentialProblem] | None,
                          generation: int | None, now: Any) -> list[dict[str, Any]]:
    """The route's conditions with CredentialsReady set: False with the first problem's reason and
    every problem's message, else True."""
    conditions = list((status or {}).get("conditions") or [])
    if problems:
        return set_condition(conditions, CREDENTIALS_CONDITION, "False", problems[0].reason,
                             "; ".join(p.message for p in problems), generation, now)
    return set_condition(conditions, CREDENTIALS_CONDITION, "True", "SharedWithGateway",
                         "the gateway holds every credential this route uses", generation, now)


def without_credentials_condition(status: Mapping[str, Any] | None) -> list[dict[str, Any]] | None:
    """The conditions without CredentialsReady (a namespace that left gateway mode); None: none to remove."""
    conditions = list((status or {}).get("conditions") or [])
    kept = [c for c in conditions if c.get("type") != CREDENTIALS_CONDITION]
    return kept if len(kept) != len(conditions) else None


# -- the tenant's egress ---------------------------------------------------------------------------------

def egress_policy(namespace: str, apiserver: Sequence[tuple[str, int]], allow_cidrs: Sequence[str] = (),
                  cut_namespaces: Sequence[str] = ()) -> dict[str, Any]:
    """Every pod of a gateway-mode tenant namespace may reach only DNS (port 53 anywhere, as the
    cut-off's policy), the pods of every namespace (in-cluster services, the gateway, the ledger),
    the apiserver (`apiserver`: (CIDR, port) of its Service address and its endpoints, each only on
    its port: an apiserver often shares its address with the node, whose other ports are not the
    apiserver) and `allow_cidrs`; everything else, the LLM providers among it, is denied.
    `cut_namespaces`: the inference namespaces the namespace's cut-off denies (render/cutoff.py
    denied_namespaces): policies add up, so this one must not allow them either while it is cut."""
    selector: dict[str, Any] = ({"matchExpressions": [{"key": NAME_LABEL, "operator": "NotIn",
                                                        "values": sorted(set(cut_namespaces))}]}
                                if cut_namespaces else {})
    egress: list[dict[str, Any]] = [
        {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
        {"to": [{"namespaceSelector": selector}]},
    ]
    for port in sorted({p for _, p in apiserver}):
        cidrs = sorted({c for c, p in apiserver if p == port})
        egress.append({"to": [{"ipBlock": {"cidr": c}} for c in cidrs], "ports": [{"protocol": "TCP", "port": port}]})
    if allow_cidrs:
        egress.append({"to": [{"ipBlock": {"cidr": c}} for c in sorted(set(allow_cidrs))]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": EGRESS_POLICY_NAME, "namespace": namespace, "labels": dict(LABELS),
                     "annotations": {}, "ownerReferences": []},
        "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": egress},
    }


# -- the ledger's trust ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Refusal:
    reason: str   # the ledger's rejection counter label
    message: str


def ledger_refusal(principal: tuple[str, str], target: str, labels_of: Callable[[str], Mapping[str, str] | None],
                   settings: GatewaySettings) -> Refusal | None:
    """Whether a token of `principal` (namespace, serviceaccount) may report or wake for namespace
    `target`; None: it may. A tenant's own token: only its own namespace, and not at all while that
    namespace is in gateway mode with its egress enforced (its sidecars, if any, must not feed the
    ledger). The gateway's ServiceAccount: any namespace in gateway mode."""
    token_ns, sa = principal
    if settings.enabled and token_ns == settings.namespace and sa == settings.service_account:
        if namespace_mode(target, labels_of(target), settings).mode == MODE_GATEWAY:
            return None
        return Refusal("forbidden_namespace", f"the gateway may report only for namespaces in gateway mode; "
                                              f"{target} is in sidecar mode")
    if token_ns != target:
        return Refusal("forbidden_namespace", f"a token of namespace {token_ns} may report and wake only for that namespace")
    labels = labels_of(target)
    if namespace_mode(target, labels, settings).mode == MODE_GATEWAY and not egress_open(labels):
        return Refusal("gateway_mode", f"namespace {target} is in gateway mode: only the gateway reports its usage "
                                       f"(label {EGRESS_LABEL}={EGRESS_OPEN} while migrating keeps its sidecars reporting)")
    return None
