"""The pure cut-off builder (render/cutoff.py): which routes, hosts, namespaces and workloads an
exhausted CutOff budget takes away, and the NetworkPolicy that denies them."""
from __future__ import annotations

import pytest

from spendwarden.api.modelroute import ModelRouteSpec
from spendwarden.render.cutoff import (
    NAME_LABEL,
    POLICY_NAME,
    BudgetCut,
    CutOffSettings,
    Destination,
    Workload,
    classify,
    desired_cut_off,
)

DNS = {"api.openai.com": ["162.159.140.245", "2606:4700::6812:1"], "api.anthropic.com": ["160.79.104.10"],
       "shared.example.com": ["192.0.2.9"], "cdn-twin.example.com": ["192.0.2.9"], "kube.example.com": ["10.96.0.1"]}
NAMESPACES = {"inference", "models", "team-a", "kube-system", "spendwarden"}


def resolve(host: str) -> list[str]:
    if host not in DNS:
        raise OSError(f"cannot resolve {host}")
    return DNS[host]


def backend(name: str, url: str, ref: dict | None = None) -> dict:
    return {"name": name, "provider": "OpenAICompatible", "url": url, "model": "m",
            "pricing": {"input": "1", "output": "2"}, **({"deploymentRef": ref} if ref else {})}


def route(alias: str, *backends: dict) -> ModelRouteSpec:
    return ModelRouteSpec.model_validate({"model": alias, "backends": list(backends), "defaultBackend": backends[0]["name"]})


CHAT = route("chat", backend("mini", "https://api.openai.com/v1"), backend("vllm", "http://vllm.inference.svc:8000/v1"),
             backend("llama", "http://llama:8080/v1", {"name": "llama"}))
EMBED = route("embed", backend("e5", "http://e5.models.svc.cluster.local/v1", {"name": "e5", "kind": "StatefulSet",
                                                                                "namespace": "models"}),
              backend("local-e5", "http://local-e5:80/v1", {"name": "local-e5", "kind": "StatefulSet"}))


def budget(name: str = "monthly", cut: bool = True, routes: tuple[str, ...] = ()) -> BudgetCut:
    return BudgetCut(name, f"uid-{name}", routes, cut)


DEFAULTS = CutOffSettings()  # frozen: one instance serves every call


def build(budgets, routes=(CHAT, EMBED), settings=DEFAULTS):
    return desired_cut_off("team-a", budgets, list(routes), resolve, NAMESPACES.__contains__, settings)


def test_nothing_is_cut_without_an_exhausted_cutoff_budget():
    for budgets in ([], [budget(cut=False)]):
        d = build(budgets)
        assert not d.cut and d.policy is None and d.workloads == () and "not cut off" in d.message()


@pytest.mark.parametrize("host, want", [
    ("203.0.113.7", Destination(address="203.0.113.7")),
    ("2001:db8::1", Destination(address="2001:db8::1")),
    ("vllm.inference.svc", Destination(namespace="inference")),
    ("vllm.inference.svc.cluster.local", Destination(namespace="inference")),
    ("vllm.inference", Destination(namespace="inference")),      # short form, inference is a namespace
    ("example.com", Destination(host="example.com")),            # two labels, but com is no namespace
    ("llama", Destination(local=True)),                          # a Service of the namespace itself
    ("llama.team-a.svc", Destination(local=True)),
    ("localhost", Destination(host="localhost")),
])
def test_hosts_are_classified(host, want):
    assert classify(host, "team-a", NAMESPACES.__contains__) == want


def test_a_budget_over_every_route_denies_all_backends_and_scales_local_workloads():
    d = build([budget("monthly"), budget("weekly", cut=False)])
    assert d.cut and [b.name for b in d.budgets] == ["monthly"] and d.cut_routes == ("chat", "embed")
    assert d.denied_addresses == ("162.159.140.245/32", "2606:4700::6812:1/128")
    assert d.denied_namespaces == ("inference", "models")
    # Only workloads in the namespace itself: models/e5 belongs to another namespace.
    assert d.workloads == (Workload("Deployment", "llama"), Workload("StatefulSet", "local-e5"))
    p = d.policy
    assert p["metadata"]["name"] == POLICY_NAME and p["metadata"]["namespace"] == "team-a"
    assert p["metadata"]["ownerReferences"] == [{"apiVersion": "spendwarden.io/v1alpha1", "kind": "TokenBudget",
                                                 "name": "monthly", "uid": "uid-monthly", "blockOwnerDeletion": False}]
    spec = p["spec"]
    assert spec["podSelector"] == {} and spec["policyTypes"] == ["Egress"]
    dns, addresses, namespaces = spec["egress"]
    assert dns == {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
    assert addresses == {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["162.159.140.245/32"]}},
                                {"ipBlock": {"cidr": "::/0", "except": ["2606:4700::6812:1/128"]}}]}
    assert namespaces == {"to": [{"namespaceSelector": {"matchExpressions": [
        {"key": NAME_LABEL, "operator": "NotIn", "values": ["inference", "models"]}]}}]}
    message = d.message()
    assert "cut off by budget(s) monthly" in message and "namespace inference" in message
    assert "scaled to 0: Deployment/llama, StatefulSet/local-e5" in message
    assert "backend(s) llama, local-e5 in the namespace itself: not denied" in message


def test_a_budget_over_some_routes_takes_only_what_no_allowed_route_uses():
    shared_inference = route("embed", backend("e5", "http://e5.inference.svc/v1"),
                             backend("llama", "http://llama:8080/v1", {"name": "llama"}),
                             backend("twin", "https://cdn-twin.example.com/v1"))
    chat = route("chat", backend("mini", "https://api.openai.com/v1"), backend("vllm", "http://vllm.inference.svc/v1"),
                 backend("llama", "http://llama:8080/v1", {"name": "llama"}),
                 backend("other", "https://shared.example.com/v1", {"name": "chat-only"}))
    d = build([budget(routes=("chat", "no-such-route"))], routes=(chat, shared_inference))
    assert d.cut_routes == ("chat",)
    assert d.denied_addresses == ("162.159.140.245/32", "2606:4700::6812:1/128")  # not 192.0.2.9: embed's twin uses it
    assert d.denied_namespaces == ()                       # embed still uses inference
    assert d.workloads == (Workload("Deployment", "chat-only"),)  # llama still serves embed
    text = d.message()
    assert "192.0.2.9 (shared.example.com) is also used by a route still allowed" in text
    assert "namespace inference is also used by a route still allowed" in text
    assert "Deployment/llama also serve(s) a route still allowed" in text
    assert d.policy["spec"]["egress"][2] == {"to": [{"namespaceSelector": {}}]}  # no namespace denied


def test_two_budgets_cut_the_union_of_their_routes():
    d = build([budget("a", routes=("chat",)), budget("b", routes=("embed",))])
    assert [b.name for b in d.budgets] == ["a", "b"] and d.cut_routes == ("chat", "embed")
    assert d.policy["metadata"]["annotations"] == {"spendwarden.io/cut-off-budgets": "a,b"}
    assert len(d.policy["metadata"]["ownerReferences"]) == 2


def test_unresolvable_hosts_protected_addresses_and_namespaces_are_reported_not_denied():
    chat = route("chat", backend("gone", "https://nowhere.invalid/v1"), backend("api", "https://kube.example.com/v1"),
                 backend("dns", "http://coredns.kube-system.svc/v1"), backend("ip", "http://203.0.113.7:8000/v1"))
    settings = CutOffSettings(protected_namespaces=frozenset({"kube-system", "spendwarden"}),
                              protected_cidrs=("10.96.0.0/12",), cluster_cidrs=("10.244.0.0/16", "fd00::/48"))
    d = build([budget()], routes=(chat,), settings=settings)
    assert d.denied_addresses == ("203.0.113.7/32",) and d.denied_namespaces == ()
    text = d.message()
    assert "host nowhere.invalid did not resolve: not denied" in text
    assert "10.96.0.1 (kube.example.com) is protected" in text
    assert "namespace kube-system is protected" in text
    # The cluster's own ranges are excepted from the "every address" rule (CNIs matching pod IPs).
    assert d.policy["spec"]["egress"][1]["to"] == [
        {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["203.0.113.7/32", "10.244.0.0/16"]}},
        {"ipBlock": {"cidr": "::/0", "except": ["fd00::/48"]}}]


def test_no_policy_when_nothing_can_be_denied_but_the_namespace_is_still_cut():
    local_only = route("chat", backend("llama", "http://llama:8080/v1", {"name": "llama"}))
    d = build([budget()], routes=(local_only,))
    assert d.cut and d.policy is None and d.workloads == (Workload("Deployment", "llama"),)
    assert "no egress denied" in d.message()


def test_a_cut_budget_without_routes_still_cuts_the_namespace():
    d = build([budget()], routes=())
    assert d.cut and d.cut_routes == () and d.policy is None and d.workloads == ()


def test_the_builder_is_deterministic():
    assert build([budget()]).policy == build([budget()]).policy


def test_in_gateway_mode_the_policy_opens_no_address_and_its_namespaces_can_be_read_back():
    """Gateway mode (issue #13): NetworkPolicies add up, so the cut-off's every-other-address rule would
    undo the gateway egress policy's denial of the internet; it is left out there."""
    from spendwarden.render.cutoff import denied_namespaces
    sidecar = build([budget("monthly")])
    d = desired_cut_off("team-a", [budget("monthly")], [CHAT, EMBED], resolve, NAMESPACES.__contains__, DEFAULTS,
                        gateway=True)
    assert d.gateway and d.denied_namespaces == sidecar.denied_namespaces
    dns, namespaces = d.policy["spec"]["egress"]
    assert not any("ipBlock" in peer for rule in d.policy["spec"]["egress"] for peer in rule.get("to") or [])
    assert namespaces == sidecar.policy["spec"]["egress"][2]
    assert denied_namespaces(d.policy) == denied_namespaces(sidecar.policy) == ("inference", "models")
    assert denied_namespaces(None) == ()
