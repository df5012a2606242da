"""render/injection.py: which Pods get the proxy, and the JSON Patch that adds it."""
from __future__ import annotations

import copy

import jsonpatch
import pytest

from spendwarden.render import injection as inj

S = inj.InjectionSettings(image="img:1", port=8787, metrics_port=9464, operator_namespace="spendwarden")
LABEL = inj.INJECT_LABEL


def pod(labels=None, containers=None, **spec):
    return {"metadata": {"name": "p", "namespace": "team", "labels": labels or {}},
            "spec": {"containers": containers or [{"name": "app", "image": "app:1"}], **spec}}


def injected(p, ns="team", settings=S, native=False):
    return jsonpatch.apply_patch(p, inj.patch(p, ns, settings, native=native))


def names(p):
    return [c["name"] for c in p["spec"]["containers"]]


def env(container):
    return {e["name"]: e["value"] for e in container.get("env") or []}


@pytest.mark.parametrize("pod_label, ns_labels, ns, expected", [
    (None, {LABEL: "true"}, "team", True),
    ("true", {}, "team", True),
    ("true", None, "team", True),            # namespace labels not needed when the pod asks
    (None, {}, "team", False),
    (None, None, "team", False),
    ("false", {LABEL: "true"}, "team", False),  # opt-out wins over the namespace
    (None, {LABEL: "false"}, "team", False),
    ("true", {LABEL: "true"}, "kube-system", False),
    ("true", {LABEL: "true"}, "spendwarden", False),  # the operator's own namespace
])
def test_decide(pod_label, ns_labels, ns, expected):
    p = pod({LABEL: pod_label} if pod_label else None)
    assert inj.decide(p, ns, ns_labels, S).inject is expected


def test_decide_skips_already_injected_and_host_network_pods():
    assert inj.decide(injected(pod()), "team", {LABEL: "true"}, S).reason == "already injected"
    assert not inj.decide(pod(hostNetwork=True), "team", {LABEL: "true"}, S).inject


def test_patch_adds_proxy_volumes_and_env():
    out = injected(pod())
    assert names(out) == ["app", inj.CONTAINER_NAME]
    proxy = out["spec"]["containers"][1]
    assert proxy["image"] == "img:1"
    assert proxy["args"] == ["proxy", "--config", "/etc/spendwarden/config/config.json", "--port", "8787",
                             "--metrics-port", "9464", "--namespace", "team"]
    sc = proxy["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "sw-metrics"}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "sw-metrics"}
    assert {p["name"]: p["containerPort"] for p in proxy["ports"]} == {"sw-proxy": 8787, "sw-metrics": 9464}
    assert proxy["resources"]["requests"]["memory"] and proxy["resources"]["limits"]["memory"]
    vols = {v["name"]: v for v in out["spec"]["volumes"]}
    assert vols[inj.CONFIG_VOLUME]["configMap"] == {"name": "spendwarden-proxy", "optional": True}
    assert vols[inj.TOKEN_VOLUME]["projected"]["sources"] == [
        {"serviceAccountToken": {"audience": "spendwarden", "expirationSeconds": 3600, "path": "token"}}]
    mounts = {m["name"]: m for m in proxy["volumeMounts"]}
    assert set(mounts) == {inj.CONFIG_VOLUME, inj.TOKEN_VOLUME, inj.TMP_VOLUME}
    assert mounts[inj.CONFIG_VOLUME]["readOnly"] and mounts[inj.TOKEN_VOLUME]["readOnly"]
    assert env(out["spec"]["containers"][0]) == {"OPENAI_BASE_URL": "http://127.0.0.1:8787/v1",
                                                 "ANTHROPIC_BASE_URL": "http://127.0.0.1:8787"}
    assert out["spec"]["serviceAccountName"] == "default"
    assert out["metadata"]["annotations"] == {"kubectl.kubernetes.io/default-container": "app"}
    assert out["metadata"]["labels"] == {inj.PROXY_LABEL: "injected"}  # what the chart's PodMonitor selects
    no_labels = pod()
    del no_labels["metadata"]["labels"]
    assert injected(no_labels)["metadata"]["labels"] == {inj.PROXY_LABEL: "injected"}


def test_patch_is_idempotent():
    once = injected(pod())
    assert inj.patch(once, "team", S) == []
    assert injected(copy.deepcopy(once)) == once


def test_env_already_set_is_not_overridden_and_other_env_is_kept():
    app = {"name": "app", "image": "a", "env": [{"name": "OPENAI_BASE_URL", "value": "https://mine/v1"},
                                                 {"name": "X", "value": "1"}]}
    side = {"name": "side", "image": "b"}
    out = injected(pod(containers=[app, side]))
    assert env(out["spec"]["containers"][0]) == {"OPENAI_BASE_URL": "https://mine/v1", "X": "1",
                                                 "ANTHROPIC_BASE_URL": "http://127.0.0.1:8787"}
    assert env(out["spec"]["containers"][1]) == {"OPENAI_BASE_URL": "http://127.0.0.1:8787/v1",
                                                 "ANTHROPIC_BASE_URL": "http://127.0.0.1:8787"}
    both = {"name": "app", "image": "a", "env": [{"name": "OPENAI_BASE_URL", "value": "o"},
                                                  {"name": "ANTHROPIC_BASE_URL", "value": "a"}]}
    ops = inj.patch(pod(containers=[both]), "team", S)
    assert not [op for op in ops if "/env" in op["path"]]


def test_existing_volumes_annotations_and_service_account_are_kept():
    p = pod(volumes=[{"name": "data", "emptyDir": {}}], serviceAccountName="robot")
    p["metadata"]["annotations"] = {"a/b": "c"}
    out = injected(p)
    assert [v["name"] for v in out["spec"]["volumes"]] == ["data", inj.CONFIG_VOLUME, inj.TOKEN_VOLUME, inj.TMP_VOLUME]
    assert out["spec"]["serviceAccountName"] == "robot"
    assert out["metadata"]["annotations"] == {"a/b": "c", "kubectl.kubernetes.io/default-container": "app"}
    p["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] = "other"
    assert injected(p)["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "other"


def test_no_metrics_port_means_no_probes():
    out = injected(pod(), settings=inj.InjectionSettings(image="i", metrics_port=0))
    proxy = out["spec"]["containers"][-1]
    assert "livenessProbe" not in proxy and "readinessProbe" not in proxy
    assert "--metrics-port" in proxy["args"] and proxy["args"][proxy["args"].index("--metrics-port") + 1] == "0"


def test_settings_from_env():
    s = inj.InjectionSettings.from_env({"SPENDWARDEN_PROXY_IMAGE": "r/i:2", "SPENDWARDEN_PROXY_PORT": "9000",
                                        "SPENDWARDEN_PROXY_METRICS_PORT": "9001", "SPENDWARDEN_POD_NAMESPACE": "ops"})
    assert (s.image, s.port, s.metrics_port) == ("r/i:2", 9000, 9001)
    assert s.excluded_namespaces == {"kube-system", "ops"}
    out = injected(pod(), settings=s)
    assert env(out["spec"]["containers"][0])["OPENAI_BASE_URL"] == "http://127.0.0.1:9000/v1"


def _route(name, alias, secrets, valid=True):
    backends = [{"name": f"b{i}", "provider": "OpenAI", "url": "https://api.example/v1", "model": "m",
                 "pricing": {"input": "1", "output": "2"},
                 **({"credentials": {"secretRef": {"name": s, "key": "apiKey"}}} if s else {})}
                for i, s in enumerate(secrets)]
    return {"kind": "ModelRoute", "metadata": {"name": name},
            "spec": {"model": alias, "backends": backends, "defaultBackend": "b0" if valid else "nope"}}


def test_referenced_secrets_are_those_of_served_routes_only():
    from spendwarden.render.proxyconfig import render_proxy_config
    routes = [_route("chat", "chat", ["openai", None, "anthropic"]), _route("emb", "emb", ["openai"]),
              _route("broken", "x", ["never-served"], valid=False)]
    config = render_proxy_config("team", routes, []).config
    assert inj.referenced_secrets(config) == ["anthropic", "openai"]


def test_patch_mounts_each_referenced_secret_read_only_where_the_proxy_reads_keys():
    from spendwarden import SECRETS_DIR as DEFAULT_SECRETS_DIR
    out = jsonpatch.apply_patch(pod(), inj.patch(pod(), "team", S, ["anthropic", "openai"]))
    vols = {v["name"]: v for v in out["spec"]["volumes"]}
    assert vols["sw-secret-openai"] == {"name": "sw-secret-openai", "secret": {"secretName": "openai", "optional": True}}
    assert vols["sw-secret-anthropic"]["secret"]["secretName"] == "anthropic"
    proxy = out["spec"]["containers"][-1]
    mounts = {m["name"]: m for m in proxy["volumeMounts"]}
    assert mounts["sw-secret-openai"] == {"name": "sw-secret-openai", "mountPath": f"{DEFAULT_SECRETS_DIR}/openai",
                                          "readOnly": True}
    assert env(proxy)["SPENDWARDEN_SECRETS_DIR"] == DEFAULT_SECRETS_DIR
    # Nothing referenced: no secret volumes at all (the app's own volumes are never exposed).
    plain = injected(pod())
    assert not [v for v in plain["spec"]["volumes"] if v["name"].startswith(inj.SECRET_VOLUME_PREFIX)]


def test_secret_volume_names_are_valid_dns_labels_and_distinct():
    import re
    names = ["openai", "a.b", "a-b", "x" * 60, "x" * 61, "Upper", "llm.keys.team-" + "y" * 200]
    volumes = [inj.secret_volume_name(n) for n in names]
    assert volumes[0] == "sw-secret-openai"
    assert len(set(volumes)) == len(volumes)
    for v in volumes:
        assert len(v) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", v), v


# -- native sidecars (Kubernetes 1.29+) ------------------------------------------------------------

def test_plain_shape_is_unchanged_by_native_sidecar_support():
    """Older clusters (and sidecar.native=false) keep exactly the container they always got."""
    out = injected(pod())
    proxy = out["spec"]["containers"][-1]
    assert "restartPolicy" not in proxy and "startupProbe" not in proxy
    assert "initContainers" not in out["spec"]


def test_native_shape_is_the_first_init_container_restarting_always():
    out = injected(pod(), native=True)
    assert names(out) == ["app"]
    [proxy] = out["spec"]["initContainers"]
    assert proxy == {**inj.proxy_container("team", S), "restartPolicy": "Always", "startupProbe": proxy["startupProbe"]}
    # The app containers start only once the proxy answers /healthz (which it does only once it listens).
    assert proxy["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "sw-metrics"}
    assert proxy["startupProbe"]["periodSeconds"] == 1
    # Everything else the proxy needs is the same as for the plain shape.
    plain = injected(pod())
    assert out["spec"]["volumes"] == plain["spec"]["volumes"]
    assert out["spec"]["containers"][0] == plain["spec"]["containers"][0]  # the app's env
    assert out["metadata"] == plain["metadata"]


def test_native_sidecar_goes_before_the_apps_own_init_containers():
    out = injected(pod(initContainers=[{"name": "migrate", "image": "m:1"}]), native=True)
    assert [c["name"] for c in out["spec"]["initContainers"]] == [inj.CONTAINER_NAME, "migrate"]
    out = injected(pod(initContainers=[]), native=True)
    assert [c["name"] for c in out["spec"]["initContainers"]] == [inj.CONTAINER_NAME]


def test_native_sidecar_without_metrics_port_has_no_probes():
    out = injected(pod(), settings=inj.InjectionSettings(image="i", metrics_port=0), native=True)
    proxy = out["spec"]["initContainers"][0]
    assert proxy["restartPolicy"] == "Always"
    assert not {"startupProbe", "livenessProbe", "readinessProbe"} & set(proxy)


@pytest.mark.parametrize("first, then", [(False, False), (False, True), (True, True), (True, False)])
def test_a_pod_injected_in_either_shape_is_not_injected_again(first, then):
    once = injected(pod(), native=first)
    assert inj.patch(once, "team", S, native=then) == []
    assert inj.decide(once, "team", {LABEL: "true"}, S).reason == "already injected"
    # An app's own init container of that name counts too, as its own container always did.
    own = pod(initContainers=[{"name": inj.CONTAINER_NAME, "image": "own:1"}])
    assert inj.patch(own, "team", S, native=then) == []


@pytest.mark.parametrize("mode, version, expected", [
    ("auto", (1, 37), True),
    ("auto", (1, 29), True),
    ("auto", (1, 28), False),   # SidecarContainers alpha, off by default
    ("auto", (1, 20), False),
    ("auto", (2, 0), True),
    ("auto", None, False),      # version unreadable: the shape that works everywhere
    ("true", None, True),
    ("false", (1, 37), False),
])
def test_use_native_sidecar(mode, version, expected):
    asked = []

    def server_version():
        asked.append(1)
        return version

    assert inj.use_native_sidecar(mode, server_version) is expected
    assert len(asked) == (1 if mode == "auto" else 0)  # a forced mode does not ask the apiserver


@pytest.mark.parametrize("major, minor, git_version, expected", [
    ("1", "37", "v1.37.0", (1, 37)),
    ("1", "29+", "v1.29.3-eks-adc7111", (1, 29)),   # EKS, GKE
    ("1+", "30+", "", (1, 30)),
    ("", "", "v1.31.2+k3s1", (1, 31)),
    ("", "", "", None),
    ("x", "y", "garbage", None),
])
def test_parse_server_version(major, minor, git_version, expected):
    assert inj.parse_server_version(major, minor, git_version) == expected


def test_native_sidecar_setting_from_env():
    assert inj.InjectionSettings.from_env({}).native_sidecar == "auto"
    assert inj.InjectionSettings.from_env({"SPENDWARDEN_NATIVE_SIDECAR": " True "}).native_sidecar == "true"
    assert inj.InjectionSettings.from_env({"SPENDWARDEN_NATIVE_SIDECAR": "false"}).native_sidecar == "false"
    with pytest.raises(ValueError, match="auto, true or false"):
        inj.InjectionSettings.from_env({"SPENDWARDEN_NATIVE_SIDECAR": "sometimes"})


def test_operator_reads_the_apiserver_version_and_falls_back_to_the_plain_container(monkeypatch):
    from types import SimpleNamespace

    from kubernetes import client

    from spendwarden.controller import admission, kube
    monkeypatch.setattr(kube, "api_client", lambda: None)
    monkeypatch.setattr(client, "VersionApi", lambda api: SimpleNamespace(
        get_code=lambda: SimpleNamespace(major="1", minor="37", git_version="v1.37.0")))
    assert admission._server_version() == (1, 37)

    def unreachable():
        raise OSError("connection refused")

    monkeypatch.setattr(client, "VersionApi", lambda api: SimpleNamespace(get_code=unreachable))
    assert admission._server_version() is None
    assert inj.use_native_sidecar("auto", admission._server_version) is False


# -- gateway mode: no sidecar, the SDKs pointed at the shared gateway

GW_URL = "http://spendwarden-gateway.spendwarden-gw.svc:8787"


def gateway_injected(p, settings=S):
    return jsonpatch.apply_patch(p, inj.gateway_patch(p, settings, GW_URL))


def test_gateway_patch_points_every_app_container_at_the_gateway_with_a_projected_token():
    p = pod(containers=[{"name": "app", "image": "app:1"},
                        {"name": "worker", "image": "w:1", "env": [{"name": "OPENAI_BASE_URL", "value": "mine"}],
                         "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
            volumes=[{"name": "data", "emptyDir": {}}])
    out = gateway_injected(p)
    assert names(out) == ["app", "worker"] and "initContainers" not in out["spec"]  # no sidecar
    app, worker = out["spec"]["containers"]
    assert env(app) == {"OPENAI_BASE_URL": f"{GW_URL}/v1", "ANTHROPIC_BASE_URL": GW_URL,
                        "SPENDWARDEN_TOKEN_FILE": "/var/run/secrets/spendwarden/token"}
    assert env(worker)["OPENAI_BASE_URL"] == "mine"  # never overrides the app's own
    assert env(worker)["ANTHROPIC_BASE_URL"] == GW_URL
    mount = {"name": "spendwarden-token", "mountPath": "/var/run/secrets/spendwarden", "readOnly": True}
    assert app["volumeMounts"] == [mount] and worker["volumeMounts"][-1] == mount
    vols = {v["name"]: v for v in out["spec"]["volumes"]}
    assert set(vols) == {"data", "spendwarden-token"}  # no config, no secrets: the keys stay in the gateway
    assert vols["spendwarden-token"]["projected"]["sources"] == [{"serviceAccountToken": {
        "audience": "spendwarden", "expirationSeconds": S.token_expiration_seconds, "path": "token"}}]
    assert vols["spendwarden-token"] == inj.volumes(S)[1]  # the sidecar's token volume, the same
    assert out["metadata"]["labels"][inj.PROXY_LABEL] == "gateway"
    assert out["spec"]["serviceAccountName"] == "default"


def test_gateway_patch_is_idempotent_and_decide_skips_a_pod_that_has_it():
    out = gateway_injected(pod(labels={LABEL: "true"}))
    assert inj.gateway_patch(out, S, GW_URL) == []
    assert inj.decide(out, "team", {}, S, gateway=True).reason == "already injected"


def test_gateway_mode_keeps_the_inject_label_rules_and_takes_host_network_pods():
    assert not inj.decide(pod(), "team", {}, S, gateway=True).inject  # not selected
    assert not inj.decide(pod(labels={LABEL: "false"}), "team", {LABEL: "true"}, S, gateway=True).inject
    assert inj.decide(pod(), "team", {LABEL: "true"}, S, gateway=True).inject
    host = pod(labels={LABEL: "true"}, hostNetwork=True)
    assert not inj.decide(host, "team", {}, S).inject            # a sidecar would bind the node's ports
    assert inj.decide(host, "team", {}, S, gateway=True).inject  # the gateway patch binds none
