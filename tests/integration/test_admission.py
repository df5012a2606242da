"""Admission webhooks served by the operator, called by the real kube-apiserver over TLS.

The operator runs as a real process with --webhooks on a port picked now (a port still held by an
earlier operator would answer with its old handlers), under a webhook configuration name unique to
this run; both configurations are deleted afterwards even if the operator had to be killed.
Pods stay Pending (no kubelet): the tests inspect the Pods as stored.
"""
from __future__ import annotations

import base64
import copy
import datetime
import uuid

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from spendwarden.controller.webhooks import ensure_secret
from spendwarden.render import injection
from spendwarden.tls import WebhookTLS
from tests.support.operator_process import OperatorProcess, free_port, wait_for

from ..unit.test_api_validation import GOOD_BUDGET, GOOD_ROUTE

GROUP, VERSION = "spendwarden.io", "v1alpha1"
IMAGE = "registry.example/spendwarden:test"
INJECT = injection.INJECT_LABEL


@pytest.fixture(scope="module")
def webhook_conf() -> str:
    return f"adm-{uuid.uuid4().hex[:8]}.spendwarden.io"


@pytest.fixture(scope="module")
def operator_ns(kube):
    name = f"adm-operator-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(kube).create_namespace({"metadata": {"name": name, "labels": {INJECT: "true"}}})
    yield name
    client.CoreV1Api(kube).delete_namespace(name)


def serve_webhooks(control_plane, kube, log_dir, webhook_conf, operator_ns, native_sidecar, env=None):
    """The operator with its webhooks, as a fixture's generator; both configurations deleted after.
    `env`: more of the operator's environment."""
    port = free_port()
    proc = OperatorProcess(str(control_plane.kubeconfig), log_dir / "operator.log",
                           extra_args=["--namespace", "adm-*", "--webhooks", "--webhook-port", str(port)],
                           env={"SPENDWARDEN_WEBHOOK_CONFIGURATION": webhook_conf,
                                "SPENDWARDEN_PROXY_IMAGE": IMAGE,
                                "SPENDWARDEN_PROXY_PORT": "8787", "SPENDWARDEN_PROXY_METRICS_PORT": "9464",
                                "SPENDWARDEN_POD_NAMESPACE": operator_ns,
                                "SPENDWARDEN_NATIVE_SIDECAR": native_sidecar,
                                "SPENDWARDEN_LOG_FORMAT": "plain", **(env or {})})
    proc.start()
    adm = client.AdmissionregistrationV1Api(kube)
    try:
        # kopf creates both configurations and patches in the webhooks with our CA bundle.
        wait_for(lambda: len(adm.read_validating_webhook_configuration(webhook_conf).webhooks or []) == 2
                 and len(adm.read_mutating_webhook_configuration(webhook_conf).webhooks or []) == 1,
                 timeout=30, what="webhook configurations")
        yield proc
    finally:
        proc.stop()
        for delete in (adm.delete_validating_webhook_configuration, adm.delete_mutating_webhook_configuration):
            try:
                delete(webhook_conf)
            except ApiException as e:
                if e.status != 404:
                    raise


@pytest.fixture(scope="module")
def operator(control_plane, kube, tmp_path_factory, webhook_conf, operator_ns):
    # The tests here check the plain container, on every cluster; test_native_sidecar.py the other shape.
    yield from serve_webhooks(control_plane, kube, tmp_path_factory.mktemp("admission"), webhook_conf, operator_ns,
                              native_sidecar="false")


def _ns(kube, labels=None) -> str:
    name = f"adm-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(kube).create_namespace({"metadata": {"name": name, "labels": labels or {}}})
    return name


@pytest.fixture
def labelled_ns(kube, operator):
    name = _ns(kube, {INJECT: "true"})
    yield name
    client.CoreV1Api(kube).delete_namespace(name)


@pytest.fixture
def plain_ns(kube, operator):
    name = _ns(kube)
    yield name
    client.CoreV1Api(kube).delete_namespace(name)


def _pod(name, labels=None, env=None, containers=None):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {}},
            "spec": {"containers": containers or [
                {"name": "app", "image": "app:1", **({"env": env} if env is not None else {})}]}}


def _ready_for_pods(kube, ns):
    """The apiserver learns of new webhook configurations asynchronously: wait until a dry-run
    Pod creation comes back injected."""
    wait_for(lambda: injection.injected_already(create_pod(kube, ns, _pod("probe"), dry_run="All")["spec"]),
             timeout=30, what="the mutating webhook")


def create_pod(kube, ns, body, **kwargs):
    return kube.sanitize_for_serialization(client.CoreV1Api(kube).create_namespaced_pod(ns, body, **kwargs))


def containers(pod):
    return {c["name"]: c for c in pod["spec"]["containers"]}


def env_of(container):
    return {e["name"]: e.get("value") for e in container.get("env") or []}


def test_pod_in_labelled_namespace_gets_the_proxy(kube, operator, labelled_ns):
    _ready_for_pods(kube, labelled_ns)
    pod = create_pod(kube, labelled_ns, _pod("app"))
    stored = kube.sanitize_for_serialization(client.CoreV1Api(kube).read_namespaced_pod("app", labelled_ns))
    assert stored["spec"]["containers"] == pod["spec"]["containers"]
    cs = containers(stored)
    assert list(cs) == ["app", injection.CONTAINER_NAME]
    proxy = cs[injection.CONTAINER_NAME]
    assert proxy["image"] == IMAGE
    assert proxy["args"] == ["proxy", "--config", "/etc/spendwarden/config/config.json", "--port", "8787",
                             "--metrics-port", "9464", "--namespace", labelled_ns]
    assert {p["name"]: p["containerPort"] for p in proxy["ports"]} == {"sw-proxy": 8787, "sw-metrics": 9464}
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "sw-metrics", "scheme": "HTTP"}
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/healthz"
    sc = proxy["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and sc["capabilities"] == {"drop": ["ALL"]}
    assert proxy["resources"]["requests"] and proxy["resources"]["limits"]["memory"]
    mounts = {m["name"]: m["mountPath"] for m in proxy["volumeMounts"]}
    assert mounts[injection.CONFIG_VOLUME] == "/etc/spendwarden/config"
    assert mounts[injection.TOKEN_VOLUME] == injection.TOKEN_DIR
    vols = {v["name"]: v for v in stored["spec"]["volumes"]}
    assert vols[injection.CONFIG_VOLUME]["configMap"] == {"name": "spendwarden-proxy", "optional": True,
                                                          "defaultMode": 420}
    token = vols[injection.TOKEN_VOLUME]["projected"]["sources"][0]["serviceAccountToken"]
    assert token == {"audience": "spendwarden", "expirationSeconds": 3600, "path": "token"}
    assert env_of(cs["app"]) == {"OPENAI_BASE_URL": "http://127.0.0.1:8787/v1",
                                 "ANTHROPIC_BASE_URL": "http://127.0.0.1:8787"}
    assert stored["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "app"
    assert stored["metadata"]["labels"][injection.PROXY_LABEL] == "injected"  # the chart's PodMonitor selects it


def _with_keys(openai_secret, anthropic_secret):
    route = copy.deepcopy(GOOD_ROUTE)
    route["backends"][0]["credentials"] = {"secretRef": {"name": openai_secret, "key": "apiKey"}}
    route["backends"][1]["credentials"] = {"secretRef": {"name": anthropic_secret, "key": "key"}}
    return route


def _secret_mounts(pod):
    proxy = containers(pod)[injection.CONTAINER_NAME]
    vols = {v["name"]: v["secret"] for v in pod["spec"]["volumes"] if "secret" in v
            and v["name"].startswith(injection.SECRET_VOLUME_PREFIX)}
    mounts = {m["name"]: (m["mountPath"], m.get("readOnly")) for m in proxy["volumeMounts"] if m["name"] in vols}
    assert set(mounts) == set(vols)
    return {v["secretName"]: mounts[name] for name, v in vols.items()}


def test_pod_mounts_the_secrets_its_namespace_routes_reference(control_plane, kube, operator, labelled_ns):
    _ready_for_pods(kube, labelled_ns)
    bare = create_pod(kube, labelled_ns, _pod("before-routes"))
    assert _secret_mounts(bare) == {}
    control_plane.kubectl("apply", "-n", labelled_ns, "-f", "-",
                          input=_manifest("ModelRoute", "chat", _with_keys("openai", "anthropic-keys")))
    core = client.CoreV1Api(kube)
    # The operator's index of routes is updated from its watch: wait until a dry run shows it.
    wait_for(lambda: "openai" in _secret_mounts(kube.sanitize_for_serialization(
        core.create_namespaced_pod(labelled_ns, _pod("probe"), dry_run="All"))), timeout=20, what="secret mounts")
    pod = create_pod(kube, labelled_ns, _pod("with-keys"))
    base = injection.SECRETS_DIR
    assert _secret_mounts(pod) == {"openai": (f"{base}/openai", True),
                                   "anthropic-keys": (f"{base}/anthropic-keys", True)}
    assert all(v["secret"]["optional"] for v in pod["spec"]["volumes"] if "secret" in v)
    # A route that now references another Secret: Pods created from then on mount that one instead.
    control_plane.kubectl("apply", "-n", labelled_ns, "-f", "-",
                          input=_manifest("ModelRoute", "chat", _with_keys("openai", "anthropic-rotated")))
    wait_for(lambda: "anthropic-rotated" in _secret_mounts(kube.sanitize_for_serialization(
        core.create_namespaced_pod(labelled_ns, _pod("probe"), dry_run="All"))), timeout=20, what="the new secret")
    later = create_pod(kube, labelled_ns, _pod("later"))
    assert set(_secret_mounts(later)) == {"openai", "anthropic-rotated"}


def test_app_env_already_set_is_kept(kube, operator, labelled_ns):
    _ready_for_pods(kube, labelled_ns)
    pod = create_pod(kube, labelled_ns, _pod("mine", env=[{"name": "OPENAI_BASE_URL", "value": "https://my.gateway/v1"}]))
    app = containers(pod)["app"]
    assert env_of(app) == {"OPENAI_BASE_URL": "https://my.gateway/v1", "ANTHROPIC_BASE_URL": "http://127.0.0.1:8787"}
    assert injection.CONTAINER_NAME in containers(pod)


def test_opted_out_pod_is_untouched(kube, operator, labelled_ns):
    _ready_for_pods(kube, labelled_ns)
    pod = create_pod(kube, labelled_ns, _pod("optout", labels={INJECT: "false"}))
    assert list(containers(pod)) == ["app"]
    assert not pod["spec"].get("volumes") or all(v["name"] not in (injection.CONFIG_VOLUME, injection.TOKEN_VOLUME)
                                                  for v in pod["spec"]["volumes"])
    assert "env" not in containers(pod)["app"]


def test_pod_that_already_has_the_proxy_is_unchanged(kube, operator, labelled_ns):
    _ready_for_pods(kube, labelled_ns)
    mine = [{"name": "app", "image": "app:1"}, {"name": injection.CONTAINER_NAME, "image": "own:1"}]
    pod = create_pod(kube, labelled_ns, _pod("already", containers=mine))
    assert [(c["name"], c["image"]) for c in pod["spec"]["containers"]] == [("app", "app:1"), (injection.CONTAINER_NAME, "own:1")]
    assert "env" not in containers(pod)["app"]


def test_unlabelled_namespace_is_untouched_unless_the_pod_asks(kube, operator, plain_ns, labelled_ns):
    _ready_for_pods(kube, labelled_ns)  # the webhook is live; the plain namespace must still be skipped
    pod = create_pod(kube, plain_ns, _pod("plain"))
    assert list(containers(pod)) == ["app"] and "env" not in containers(pod)["app"]
    asked = create_pod(kube, plain_ns, _pod("asked", labels={INJECT: "true"}))
    assert list(containers(asked)) == ["app", injection.CONTAINER_NAME]


def test_operator_namespace_is_never_injected(kube, operator, operator_ns, labelled_ns):
    _ready_for_pods(kube, labelled_ns)
    pod = create_pod(kube, operator_ns, _pod("own", labels={INJECT: "true"}))
    assert list(containers(pod)) == ["app"]


def _manifest(kind, name, spec):
    return yaml.safe_dump({"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": spec})


def _refused(control_plane, ns, manifest, webhook_conf, hook):
    res = control_plane.kubectl("apply", "-n", ns, "-f", "-", input=manifest, check=False)
    assert res.returncode != 0, res.stdout
    prefix = f'admission webhook "{hook}.{webhook_conf}" denied the request: '
    assert prefix in res.stderr, res.stderr
    return res.stderr.split(prefix, 1)[1].strip()


def _refused_by_schema(control_plane, ns, manifest) -> str:
    """Refused by the CRD's own schema (CEL): before any validating webhook is called."""
    res = control_plane.kubectl("apply", "-n", ns, "-f", "-", input=manifest, check=False)
    assert res.returncode != 0, res.stdout
    assert "admission webhook" not in res.stderr and " is invalid: " in res.stderr, res.stderr
    return res.stderr


def test_invalid_specs_are_refused_with_the_operators_message(control_plane, kube, operator, plain_ns, webhook_conf):
    # What only the operator can check (an IANA zone) gets the webhook's message; cross-field rules
    # that need no other object are the CRD's CEL rules, refused by the apiserver before the webhook.
    budget = copy.deepcopy(GOOD_BUDGET)
    budget["period"]["timeZone"] = "Mars/Olympus_Mons"
    wait_for(lambda: control_plane.kubectl("apply", "--dry-run=server", "-n", plain_ns, "-f", "-",
                                           input=_manifest("TokenBudget", "probe", budget), check=False).returncode != 0,
             timeout=30, what="the validating webhook")
    assert _refused(control_plane, plain_ns, _manifest("TokenBudget", "bad", budget), webhook_conf,
                    "validate-tokenbudget") == ("spec.period: unknown timeZone 'Mars/Olympus_Mons': use an IANA name "
                                                "such as Europe/Berlin")
    budget = copy.deepcopy(GOOD_BUDGET)
    budget["thresholds"] = [80, 50]
    assert "thresholds must be strictly ascending" in _refused_by_schema(
        control_plane, plain_ns, _manifest("TokenBudget", "bad", budget))

    route = copy.deepcopy(GOOD_ROUTE)
    route["rules"] = [{"match": {"minPromptTokens": 10}, "backend": "huge"}]
    assert "each rules[].backend must name a backend in spec.backends" in _refused_by_schema(
        control_plane, plain_ns, _manifest("ModelRoute", "bad", route))

    custom = client.CustomObjectsApi(kube)
    for plural in ("tokenbudgets", "modelroutes"):
        with pytest.raises(ApiException) as err:
            custom.get_namespaced_custom_object(GROUP, VERSION, plain_ns, plural, "bad")
        assert err.value.status == 404

    # Valid ones are accepted; a TokenBudget naming a route that does not exist yet only warns.
    ok = control_plane.kubectl("apply", "-n", plain_ns, "-f", "-", input=_manifest("ModelRoute", "chat", GOOD_ROUTE))
    assert "created" in ok.stdout
    warned = control_plane.kubectl("apply", "-n", plain_ns, "-f", "-",
                                   input=_manifest("TokenBudget", "monthly", {**GOOD_BUDGET, "routes": ["nope"]}))
    assert "created" in warned.stdout
    assert "Warning: spec.routes: no ModelRoute in this namespace serves 'nope' yet" in warned.stderr

    # An update that breaks a stored object is refused too, and the stored spec stays.
    broken = copy.deepcopy(GOOD_ROUTE)
    broken["defaultBackend"] = "huge"
    assert "defaultBackend must name a backend" in _refused_by_schema(
        control_plane, plain_ns, _manifest("ModelRoute", "chat", broken))
    assert custom.get_namespaced_custom_object(GROUP, VERSION, plain_ns, "modelroutes", "chat")["spec"]["defaultBackend"] == "small"
    assert operator.alive()


def test_second_route_for_a_served_alias_is_refused(control_plane, kube, operator, plain_ns, webhook_conf):
    control_plane.kubectl("apply", "-n", plain_ns, "-f", "-", input=_manifest("ModelRoute", "first", GOOD_ROUTE))
    # The operator's index must have seen the first route before it can refuse the second one.
    msg = wait_for(lambda: (lambda r: r.returncode != 0 and r.stderr)(control_plane.kubectl(
        "apply", "--dry-run=server", "-n", plain_ns, "-f", "-", input=_manifest("ModelRoute", "second", GOOD_ROUTE),
        check=False)), timeout=20, what="the duplicate alias to be refused")
    assert "spec.model: alias 'chat' is already served by ModelRoute 'first'" in msg
    # The first one itself can still be updated.
    changed = {**GOOD_ROUTE, "fallbacks": []}
    control_plane.kubectl("apply", "-n", plain_ns, "-f", "-", input=_manifest("ModelRoute", "first", changed))


def test_a_route_priced_in_another_currency_than_a_budget_is_accepted_with_a_warning(control_plane, operator, plain_ns,
                                                                                       webhook_conf):
    control_plane.kubectl("apply", "-n", plain_ns, "-f", "-", input=_manifest("ModelRoute", "chat", GOOD_ROUTE))
    control_plane.kubectl("apply", "-n", plain_ns, "-f", "-", input=_manifest("TokenBudget", "team", GOOD_BUDGET))
    euro = copy.deepcopy(GOOD_ROUTE)
    for backend in euro["backends"]:
        backend["pricing"]["currency"] = "EUR"
    want = "Warning: spec.backends[].pricing.currency: EUR, but TokenBudget 'team' limits cost in USD"
    # The operator's inventory must have seen the budget before it can warn.
    wait_for(lambda: want in control_plane.kubectl("apply", "--dry-run=server", "-n", plain_ns, "-f", "-",
                                                   input=_manifest("ModelRoute", "chat", euro)).stderr,
             timeout=20, what="the currency warning")
    applied = control_plane.kubectl("apply", "-n", plain_ns, "-f", "-", input=_manifest("ModelRoute", "chat", euro))
    assert "configured" in applied.stdout and want in applied.stderr


def test_webhook_configurations_point_at_the_operator(kube, operator, webhook_conf):
    adm = client.AdmissionregistrationV1Api(kube)
    validating = adm.read_validating_webhook_configuration(webhook_conf)
    mutating = adm.read_mutating_webhook_configuration(webhook_conf)
    hooks = {w.name: w for w in validating.webhooks + mutating.webhooks}
    assert set(hooks) == {f"validate-modelroute.{webhook_conf}", f"validate-tokenbudget.{webhook_conf}",
                          f"inject-proxy.{webhook_conf}"}
    assert hooks[f"validate-modelroute.{webhook_conf}"].failure_policy == "Fail"
    assert hooks[f"inject-proxy.{webhook_conf}"].failure_policy == "Ignore"
    assert hooks[f"inject-proxy.{webhook_conf}"].rules[0].operations == ["CREATE"]
    for hook in hooks.values():
        assert hook.client_config.url.startswith("https://localhost:")
        assert hook.client_config.ca_bundle
    assert operator.alive()


def test_certificates_kept_in_a_secret_are_reused_and_rotated(kube, plain_ns):
    core = client.CoreV1Api(kube)
    hosts = ["spendwarden-webhook.spendwarden.svc", "spendwarden-webhook"]
    first, why = ensure_secret(core, plain_ns, "webhook-tls", hosts)
    assert why == "absent"
    again, why = ensure_secret(core, plain_ns, "webhook-tls", hosts)  # a restart
    assert why is None and again == first
    stored = core.read_namespaced_secret("webhook-tls", plain_ns)
    assert stored.type == "kubernetes.io/tls" and WebhookTLS.from_secret_data(stored.data) == first

    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=340)  # < 30 days left
    rotated, why = ensure_secret(core, plain_ns, "webhook-tls", hosts, now=later)
    assert why.startswith("expires")
    assert rotated.cert != first.cert and rotated.ca_cert == first.ca_cert  # the caBundle stays valid
    assert WebhookTLS.from_secret_data(core.read_namespaced_secret("webhook-tls", plain_ns).data) == rotated

    renamed, why = ensure_secret(core, plain_ns, "webhook-tls", ["other.spendwarden.svc"])
    assert why == "does not name other.spendwarden.svc" and renamed.ca_cert == first.ca_cert


def test_in_cluster_mode_uses_the_service_and_keeps_certificates_in_a_secret(control_plane, kube, operator_ns,
                                                                            tmp_path):
    """With SPENDWARDEN_WEBHOOK_SERVICE set (as the chart does) the configurations name the Service
    and the CA lives in the Secret. Nothing can call a Service here (no endpoints), so both
    failure policies are Ignore for this run, and only the configurations are inspected."""
    conf = f"adm-svc-{uuid.uuid4().hex[:8]}.spendwarden.io"
    env = {"SPENDWARDEN_WEBHOOK_CONFIGURATION": conf, "SPENDWARDEN_WEBHOOK_SERVICE": "sw-webhook",
           "SPENDWARDEN_WEBHOOK_SERVICE_PORT": "443", "SPENDWARDEN_WEBHOOK_CERT_SECRET": "sw-webhook-tls",
           "SPENDWARDEN_POD_NAMESPACE": operator_ns, "SPENDWARDEN_WEBHOOK_FAILURE_POLICY": "Ignore",
           "SPENDWARDEN_VALIDATION_FAILURE_POLICY": "Ignore", "SPENDWARDEN_LOG_FORMAT": "plain"}
    adm = client.AdmissionregistrationV1Api(kube)
    core = client.CoreV1Api(kube)
    bundles = []
    for _ in range(2):  # the second start (a restart) reuses the Secret: same CA bundle
        proc = OperatorProcess(str(control_plane.kubeconfig), tmp_path / "operator.log",
                               extra_args=["--namespace", "adm-none-*", "--webhooks", "--webhook-port", str(free_port())],
                               env=env)
        try:
            proc.start()
            hooks = wait_for(lambda: (lambda v, m: len(v) == 2 and len(m) == 1 and v + m)(
                adm.read_validating_webhook_configuration(conf).webhooks or [],
                adm.read_mutating_webhook_configuration(conf).webhooks or []), timeout=30, what="configurations")
            for hook in hooks:
                ref = hook.client_config.service
                assert hook.client_config.url is None and ref is not None
                assert (ref.namespace, ref.name, ref.port) == (operator_ns, "sw-webhook", 443)
                assert ref.path.strip("/") in ("validate-modelroute", "validate-tokenbudget", "inject-proxy")
                assert hook.failure_policy == "Ignore"
            secret = core.read_namespaced_secret("sw-webhook-tls", operator_ns)
            assert base64.b64decode(hooks[0].client_config.ca_bundle) == base64.b64decode(secret.data["ca.crt"])
            bundles.append(hooks[0].client_config.ca_bundle)
            assert proc.alive()
            proc.stop()
            # A clean stop removes the (non-persistent) webhooks: a stopped operator blocks nothing.
            assert not adm.read_validating_webhook_configuration(conf).webhooks
            assert not adm.read_mutating_webhook_configuration(conf).webhooks
        finally:
            proc.stop()
            for delete in (adm.delete_validating_webhook_configuration, adm.delete_mutating_webhook_configuration):
                try:
                    delete(conf)
                except ApiException as e:
                    if e.status != 404:
                        raise
    assert bundles[0] == bundles[1]
    assert "PRIVATE KEY" not in (tmp_path / "operator.log").read_text()
