"""Sidecar injection, pure: a Pod (as the apiserver sends it for admission) and settings in, whether
to inject and the JSON Patch that does it out. The kopf handler (controller/admission.py) only
looks up the namespace's labels, decides once whether the cluster has native sidecars, and applies
the patch.

Two shapes of the same proxy container:
* native sidecar (Kubernetes 1.29+): the first init container, `restartPolicy: Always`. The kubelet
  starts the app containers only once its startupProbe passed, and stops it when they have exited,
  so a Job's Pod completes;
* plain container (older clusters, and the only shape before sidecar.native): appended to
  `containers`.

In gateway mode (render/gateway.py) there is no sidecar: `gateway_patch` points the SDKs at the
shared gateway and mounts a projected token (audience spendwarden) for them to authenticate with.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import GROUP, SECRETS_DIR
from ..api.proxyconfig import CONFIG_KEY, CONFIGMAP_NAME, ProxyConfig

INJECT_LABEL = f"{GROUP}/inject"
# Set on injected Pods: what the chart's PodMonitor selects (and `kubectl get pods -l` finds).
PROXY_LABEL = f"{GROUP}/proxy"
PROXY_LABEL_VALUE = "injected"
GATEWAY_LABEL_VALUE = "gateway"  # gateway mode: no sidecar, the SDKs pointed at the gateway
ENV_TOKEN_FILE = "SPENDWARDEN_TOKEN_FILE"
CONTAINER_NAME = "spendwarden-proxy"
CONFIG_VOLUME = "spendwarden-config"
TOKEN_VOLUME = "spendwarden-token"
TMP_VOLUME = "spendwarden-tmp"
CONFIG_DIR = "/etc/spendwarden/config"
TOKEN_DIR = "/var/run/secrets/spendwarden"
TOKEN_FILE = "token"
# Where the proxy reads ModelRoute credentials (proxy/config.read_secret): <dir>/<secret>/<key>.
SECRET_VOLUME_PREFIX = "sw-secret-"
TOKEN_AUDIENCE = "spendwarden"
# The image's user (Dockerfile USER 10001); numeric so the kubelet can verify runAsNonRoot.
PROXY_UID = 10001
ENV_OPENAI = "OPENAI_BASE_URL"
ENV_ANTHROPIC = "ANTHROPIC_BASE_URL"
ALWAYS_EXCLUDED = frozenset({"kube-system"})

# sidecar.native / SPENDWARDEN_NATIVE_SIDECAR: auto asks the apiserver's version.
NATIVE_SIDECAR_MODES = ("auto", "true", "false")
# SidecarContainers is beta and on by default from 1.29 (GA in 1.33).
NATIVE_SIDECAR_SINCE = (1, 29)

# The chart's proxy.resources default, measured (values.yaml says how; a unit test keeps them equal).
DEFAULT_RESOURCES: dict[str, Any] = {
    "requests": {"cpu": "50m", "memory": "64Mi"},
    # No CPU limit: throttling the proxy adds latency to every LLM call; memory is capped.
    "limits": {"memory": "256Mi"},
}


# Proxy settings the chart (proxy.limits, proxy.logLevel) sets for every injected sidecar: the
# operator's SPENDWARDEN_SIDECAR_<NAME> becomes the sidecar's SPENDWARDEN_<NAME> (proxy/run.py reads
# them). A fixed list: nothing else of the operator's environment reaches tenant Pods.
SIDECAR_ENV = ("HEAD_TIMEOUT", "BODY_TIMEOUT", "MAX_BODY_BYTES", "MAX_BUFFERED_BYTES", "MAX_RESPONSE_BYTES",
               "LOG_LEVEL")
SIDECAR_ENV_PREFIX = "SPENDWARDEN_SIDECAR_"


def sidecar_resources(raw: str | None) -> dict[str, Any]:
    """The sidecar's resources from SPENDWARDEN_PROXY_RESOURCES (JSON, the chart's proxy.resources);
    empty: DEFAULT_RESOURCES. A value the operator cannot use stops it at start-up, with the reason."""
    if not raw or not raw.strip() or raw.strip() in ("{}", "null"):
        return copy.deepcopy(DEFAULT_RESOURCES)
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"SPENDWARDEN_PROXY_RESOURCES is not JSON: {exc}") from None
    if not isinstance(value, dict) or set(value) - {"requests", "limits"} or not all(
            isinstance(v, dict) and all(isinstance(q, (str, int)) for q in v.values()) for v in value.values()):
        raise ValueError("SPENDWARDEN_PROXY_RESOURCES must be {requests: {...}, limits: {...}} of quantities")
    return value


@dataclass(frozen=True)
class InjectionSettings:
    image: str
    port: int = 8787
    metrics_port: int = 9464
    # The operator's own namespace: injecting there would make the operator depend on itself.
    operator_namespace: str | None = None
    resources: Mapping[str, Any] = field(default_factory=lambda: copy.deepcopy(DEFAULT_RESOURCES))
    token_expiration_seconds: int = 3600
    image_pull_policy: str | None = None
    native_sidecar: str = "auto"
    env: tuple[tuple[str, str], ...] = ()  # (name, value) set on the sidecar: SIDECAR_ENV names only

    def __post_init__(self) -> None:
        if self.native_sidecar not in NATIVE_SIDECAR_MODES:
            raise ValueError(f"native sidecar mode must be auto, true or false, not {self.native_sidecar!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> InjectionSettings:
        env = os.environ if env is None else env
        from .. import __version__
        return cls(
            image=env.get("SPENDWARDEN_PROXY_IMAGE") or f"ghcr.io/spendwarden/spendwarden:{__version__}",
            port=int(env.get("SPENDWARDEN_PROXY_PORT") or 8787),
            metrics_port=int(env.get("SPENDWARDEN_PROXY_METRICS_PORT") or 9464),
            operator_namespace=env.get("SPENDWARDEN_POD_NAMESPACE") or None,
            native_sidecar=(env.get("SPENDWARDEN_NATIVE_SIDECAR") or "auto").strip().lower(),
            resources=sidecar_resources(env.get("SPENDWARDEN_PROXY_RESOURCES")),
            env=tuple((f"SPENDWARDEN_{name}", env[SIDECAR_ENV_PREFIX + name]) for name in SIDECAR_ENV
                      if env.get(SIDECAR_ENV_PREFIX + name)),
        )

    @property
    def excluded_namespaces(self) -> frozenset[str]:
        return ALWAYS_EXCLUDED | ({self.operator_namespace} if self.operator_namespace else set())


def parse_server_version(major: str, minor: str, git_version: str = "") -> tuple[int, int] | None:
    """(major, minor) from the apiserver's /version; managed clusters report minor as e.g. "29+",
    some only gitVersion ("v1.29.3-eks-…"). None when it cannot be read."""
    found = re.match(r"(\d+)\D*\.(\d+)", f"{major}.{minor}") or re.match(r"v?(\d+)\.(\d+)", git_version or "")
    return (int(found.group(1)), int(found.group(2))) if found else None


def use_native_sidecar(mode: str, server_version: Callable[[], tuple[int, int] | None]) -> bool:
    """Whether to inject the proxy as a native sidecar. `server_version` is only called in auto mode;
    an unknown version keeps the plain container, which works on every cluster."""
    if mode != "auto":
        return mode == "true"
    version = server_version()
    return version is not None and version >= NATIVE_SIDECAR_SINCE


def injected_already(spec: Mapping[str, Any]) -> bool:
    """The proxy is in the Pod in either shape (or the app brought a container of that name)."""
    return any(c.get("name") == CONTAINER_NAME
               for c in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])])


@dataclass(frozen=True)
class Decision:
    inject: bool
    reason: str


def decide(pod: Mapping[str, Any], namespace: str, namespace_labels: Mapping[str, str] | None,
           settings: InjectionSettings, gateway: bool = False) -> Decision:
    """Whether this Pod gets the proxy (`gateway`: the namespace is in gateway mode, and the Pod gets
    gateway_patch instead of a sidecar). `namespace_labels` None means unknown; it is only needed when
    the Pod itself carries no inject label."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    label = (meta.get("labels") or {}).get(INJECT_LABEL)
    if injected_already(spec) or (gateway and gateway_injected_already(pod)):
        return Decision(False, "already injected")
    if label == "false":
        return Decision(False, f"opted out ({INJECT_LABEL}=false)")
    if namespace in settings.excluded_namespaces:
        return Decision(False, f"namespace {namespace} is never injected")
    if spec.get("hostNetwork") and not gateway:
        # Every such pod on a node would bind the same 127.0.0.1 ports of the node.
        return Decision(False, "hostNetwork pod")
    if label == "true":
        return Decision(True, f"pod labelled {INJECT_LABEL}=true")
    if (namespace_labels or {}).get(INJECT_LABEL) == "true":
        return Decision(True, f"namespace labelled {INJECT_LABEL}=true")
    return Decision(False, "not selected")


def app_env(settings: InjectionSettings) -> list[dict[str, str]]:
    base = f"http://127.0.0.1:{settings.port}"
    # The OpenAI SDKs expect the /v1 prefix in the base URL, the Anthropic SDKs add it themselves.
    return [{"name": ENV_OPENAI, "value": f"{base}/v1"}, {"name": ENV_ANTHROPIC, "value": base}]


def referenced_secrets(config: ProxyConfig) -> list[str]:
    """The Secrets the namespace's served routes take API keys from, sorted and unique."""
    return sorted({b.credentials.secretRef.name for r in config.routes for b in r.spec.backends
                   if b.credentials is not None})


def secret_volume_name(secret: str) -> str:
    """A volume name (a DNS label, at most 63 characters) for a Secret name (a DNS subdomain, up to
    253 characters, dots allowed); a hash keeps shortened or rewritten names apart."""
    name = SECRET_VOLUME_PREFIX + secret
    if len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name):
        return name
    digest = hashlib.sha256(secret.encode()).hexdigest()[:8]
    stem = re.sub(r"[^a-z0-9-]", "-", secret.lower())[:63 - len(SECRET_VOLUME_PREFIX) - 9].strip("-")
    return f"{SECRET_VOLUME_PREFIX}{stem}-{digest}" if stem else f"{SECRET_VOLUME_PREFIX}{digest}"


def secret_volumes(secrets: list[str]) -> list[dict[str, Any]]:
    # One Secret volume each (not one projected volume): a Secret volume shows all of the Secret's
    # keys and follows its updates, so a route that switches to another key of the same Secret, or a
    # rotated key, works without a restart. optional: the Pod starts even before the Secret exists
    # (the proxy then answers that backend with 502 naming the missing secret/key).
    return [{"name": secret_volume_name(s), "secret": {"secretName": s, "optional": True}} for s in secrets]


def secret_mounts(secrets: list[str]) -> list[dict[str, Any]]:
    return [{"name": secret_volume_name(s), "mountPath": f"{SECRETS_DIR}/{s}", "readOnly": True} for s in secrets]


def proxy_container(namespace: str, settings: InjectionSettings, secrets: Sequence[str] = (),
                    native: bool = False) -> dict[str, Any]:
    ports = [{"name": "sw-proxy", "containerPort": settings.port, "protocol": "TCP"}]
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": settings.image,
        # The image's ENTRYPOINT is `spendwarden`.
        "args": ["proxy", "--config", f"{CONFIG_DIR}/{CONFIG_KEY}", "--port", str(settings.port),
                 "--metrics-port", str(settings.metrics_port), "--namespace", namespace],
        "env": [{"name": "SPENDWARDEN_LEDGER_TOKEN_FILE", "value": f"{TOKEN_DIR}/{TOKEN_FILE}"},
                {"name": "SPENDWARDEN_SECRETS_DIR", "value": SECRETS_DIR},
                *({"name": name, "value": value} for name, value in settings.env)],
        "ports": ports,
        "resources": copy.deepcopy(dict(settings.resources)),
        "volumeMounts": [
            {"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": TMP_VOLUME, "mountPath": "/tmp"},
            *secret_mounts(list(secrets)),
        ],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if settings.image_pull_policy:
        container["imagePullPolicy"] = settings.image_pull_policy
    if settings.metrics_port:
        ports.append({"name": "sw-metrics", "containerPort": settings.metrics_port, "protocol": "TCP"})
        # Probes go to the metrics port: the proxy port listens on 127.0.0.1 only (apps reach it
        # over loopback), which the kubelet, connecting to the pod IP, cannot reach.
        probe = {"httpGet": {"path": "/healthz", "port": "sw-metrics"}, "timeoutSeconds": 2}
        container["livenessProbe"] = {**probe, "periodSeconds": 10, "failureThreshold": 3}
        container["readinessProbe"] = {**probe, "periodSeconds": 5, "failureThreshold": 2}
        if native:
            # The kubelet starts the app containers once a native sidecar's startupProbe passed (a
            # readinessProbe does not hold them): the proxy answers /healthz only after it listens.
            container["startupProbe"] = {**probe, "periodSeconds": 1, "failureThreshold": 120}
    if native:
        container["restartPolicy"] = "Always"
    return container


def token_volume(settings: InjectionSettings) -> dict[str, Any]:
    # A short-lived token only spendwarden accepts (audience), unlike the pod's default token.
    return {"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": {
        "audience": TOKEN_AUDIENCE, "expirationSeconds": settings.token_expiration_seconds, "path": TOKEN_FILE}}]}}


def volumes(settings: InjectionSettings, secrets: Sequence[str] = ()) -> list[dict[str, Any]]:
    return [
        # optional: the pod starts before the operator has rendered the namespace's first config.
        {"name": CONFIG_VOLUME, "configMap": {"name": CONFIGMAP_NAME, "optional": True}},
        token_volume(settings),
        {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": "64Mi"}},
        *secret_volumes(list(secrets)),
    ]


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def patch(pod: Mapping[str, Any], namespace: str, settings: InjectionSettings,
          secrets: Sequence[str] = (), native: bool = False) -> list[dict[str, Any]]:
    """JSON Patch (RFC 6902) ops that add the proxy to `pod`; [] for a pod that already has it (in
    either shape). `native`: as the first init container with restartPolicy Always (use_native_sidecar
    decides), else appended to the containers.

    `secrets`: the Secrets the namespace's routes reference (referenced_secrets), mounted read-only
    where the proxy looks for API keys. The set is fixed when the Pod is created: a Secret that a
    route starts to reference later needs a Pod restart (new keys and values of a mounted Secret
    do not)."""
    spec = pod.get("spec") or {}
    containers = spec.get("containers") or []
    if injected_already(spec):
        return []
    ops = env_ops(containers, app_env(settings))
    proxy = proxy_container(namespace, settings, secrets, native)
    if not native:
        ops.append({"op": "add", "path": "/spec/containers/-", "value": proxy})
    elif spec.get("initContainers"):
        # First, so the app's own init containers can already use it.
        ops.append({"op": "add", "path": "/spec/initContainers/0", "value": proxy})
    else:
        ops.append({"op": "add", "path": "/spec/initContainers", "value": [proxy]})
    ops += service_account_ops(spec) + volume_ops(spec, volumes(settings, secrets))
    ops.append(label_op(pod, PROXY_LABEL_VALUE))
    # `kubectl logs/exec` without -c keep meaning the app, not the sidecar appended after it (a
    # native sidecar is not among the containers, but the annotation does no harm there).
    annotations = (pod.get("metadata") or {}).get("annotations")
    default_key = "kubectl.kubernetes.io/default-container"
    if containers and (annotations or {}).get(default_key) is None:
        first = containers[0].get("name")
        if annotations is None:
            ops.append({"op": "add", "path": "/metadata/annotations", "value": {default_key: first}})
        else:
            ops.append({"op": "add", "path": f"/metadata/annotations/{_escape(default_key)}", "value": first})
    return ops


def env_ops(containers: Sequence[Mapping[str, Any]], wanted: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Add `wanted` env entries to every container, never overriding one the app sets itself."""
    ops: list[dict[str, Any]] = []
    for i, container in enumerate(containers):
        present = {e.get("name") for e in container.get("env") or []}
        missing = [e for e in wanted if e["name"] not in present]
        if not missing:
            continue
        if "env" not in container or container["env"] is None:
            ops.append({"op": "add", "path": f"/spec/containers/{i}/env", "value": missing})
        else:
            ops.extend({"op": "add", "path": f"/spec/containers/{i}/env/-", "value": e} for e in missing)
    return ops


def service_account_ops(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    if spec.get("serviceAccountName") or spec.get("serviceAccount"):
        return []
    # A projected token needs a named ServiceAccount. The ServiceAccount admission plugin, which
    # runs before webhooks, normally sets "default"; apiservers without it (envtest-like) do not.
    return [{"op": "add", "path": "/spec/serviceAccountName", "value": "default"}]


def volume_ops(spec: Mapping[str, Any], wanted: list[dict[str, Any]]) -> list[dict[str, Any]]:
    existing = {v.get("name") for v in spec.get("volumes") or []}
    new_volumes = [v for v in wanted if v["name"] not in existing]
    if spec.get("volumes") is None:
        return [{"op": "add", "path": "/spec/volumes", "value": new_volumes}]
    return [{"op": "add", "path": "/spec/volumes/-", "value": v} for v in new_volumes]


def label_op(pod: Mapping[str, Any], value: str) -> dict[str, Any]:
    if (pod.get("metadata") or {}).get("labels") is None:
        return {"op": "add", "path": "/metadata/labels", "value": {PROXY_LABEL: value}}
    return {"op": "add", "path": f"/metadata/labels/{_escape(PROXY_LABEL)}", "value": value}


# -- gateway mode (render/gateway.py): no sidecar; the SDKs are pointed at the shared gateway and
# given a projected token (audience spendwarden) to authenticate with.

def gateway_injected_already(pod: Mapping[str, Any]) -> bool:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return labels.get(PROXY_LABEL) == GATEWAY_LABEL_VALUE


def gateway_env(base_url: str) -> list[dict[str, str]]:
    # As app_env: the OpenAI SDKs expect /v1 in the base URL, the Anthropic SDKs add it themselves.
    return [{"name": ENV_OPENAI, "value": f"{base_url}/v1"}, {"name": ENV_ANTHROPIC, "value": base_url},
            {"name": ENV_TOKEN_FILE, "value": f"{TOKEN_DIR}/{TOKEN_FILE}"}]


def gateway_patch(pod: Mapping[str, Any], settings: InjectionSettings, base_url: str) -> list[dict[str, Any]]:
    """JSON Patch ops for a Pod of a gateway-mode namespace: OPENAI_BASE_URL / ANTHROPIC_BASE_URL at
    the gateway (`base_url`: http://spendwarden-gateway.<ns>.svc:8787), SPENDWARDEN_TOKEN_FILE and
    the projected token mounted read-only in every app container, label spendwarden.io/proxy=gateway.
    [] for a Pod that has it already."""
    if gateway_injected_already(pod):
        return []
    spec = pod.get("spec") or {}
    containers = spec.get("containers") or []
    ops = env_ops(containers, gateway_env(base_url))
    for i, container in enumerate(containers):
        mounts = container.get("volumeMounts")
        if any(m.get("mountPath") == TOKEN_DIR or m.get("name") == TOKEN_VOLUME for m in mounts or []):
            continue
        mount = {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True}
        if mounts is None:
            ops.append({"op": "add", "path": f"/spec/containers/{i}/volumeMounts", "value": [mount]})
        else:
            ops.append({"op": "add", "path": f"/spec/containers/{i}/volumeMounts/-", "value": mount})
    ops += service_account_ops(spec) + volume_ops(spec, [token_volume(settings)])
    ops.append(label_op(pod, GATEWAY_LABEL_VALUE))
    return ops
