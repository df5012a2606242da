"""The namespace cut-off of an exhausted onExceeded=CutOff budget (or a Downgrade one at its hard
ceiling; issue #4), as desired state.

Pure: budgets and validated routes in, a `DesiredCutOff` out (NetworkPolicy manifest, namespace
label, workloads to hold at zero). DNS resolution and "is this a namespace?" are injected functions,
so this module does no I/O of its own; controller/cutoff.py applies the result.

Which routes are cut. A budget with `spec.routes` covers only those aliases (empty: all). The
proxies refuse the covered routes of an exhausted CutOff budget; the other routes keep working. So
the NetworkPolicy and the scale-to-zero take only what the cut routes use and NO still-allowed
route uses: a host, an inference namespace or a workload shared with an allowed route stays open
(reported in the message). The namespace label is set as soon as any CutOff budget is exhausted.

Where a backend is. The host of its URL decides:
  - an IP literal: denied as that address (/32, /128);
  - `svc.ns.svc[.cluster.local]`, or `svc.ns` where `ns` is a namespace of the cluster: in-cluster,
    denied as the whole namespace `ns` (namespaceSelector NotIn on kubernetes.io/metadata.name);
  - a single label (`svc`) or a Service in the namespace itself: NOT denied by the policy, which
    would also cut the namespace's pods off from each other; a deploymentRef scales it to zero;
  - anything else: an external host, denied as the addresses it resolves to NOW (a host whose
    addresses rotate can be reached on new ones until the next resync; unresolvable ones are
    reported and left open).
The policy allows everything else: DNS (port 53 anywhere), every other namespace (the operator's
ledger Service, so proxies learn of the reset), and every other address (the apiserver).
ipBlock rules are meant for cluster-external addresses; CNIs that also match pod IPs with them
need the cluster's pod/service ranges in `cluster_cidrs`, or in-cluster denials leak through the
0.0.0.0/0 rule.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .. import API_VERSION
from ..api.modelroute import ModelRouteSpec

POLICY_NAME = "spendwarden-cut-off"
NAMESPACE_LABEL = "spendwarden.io/cut-off"
BUDGETS_ANNOTATION = "spendwarden.io/cut-off-budgets"
NAME_LABEL = "kubernetes.io/metadata.name"  # automatic from Kubernetes 1.21; the operator sets it on 1.20
LABELS = {"app.kubernetes.io/managed-by": "spendwarden", "app.kubernetes.io/component": "cut-off"}

Resolver = Callable[[str], Sequence[str]]  # host -> addresses; raises OSError when it cannot


@dataclass(frozen=True)
class BudgetCut:
    """What the cut-off needs to know of one budget."""

    name: str
    uid: str | None
    routes: tuple[str, ...]  # spec.routes: the aliases covered; empty: every route
    cut: bool                # onExceeded CutOff and the current period is exhausted (or Downgrade at its hard ceiling)


@dataclass(frozen=True, order=True)
class Workload:
    kind: str  # Deployment | StatefulSet
    name: str

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.name}"

    @classmethod
    def from_key(cls, key: str) -> Workload:
        kind, _, name = key.partition("/")
        return cls(kind, name)


@dataclass(frozen=True)
class CutOffSettings:
    # Never denied: the operator's namespace (the ledger) and kube-system (DNS).
    protected_namespaces: frozenset[str] = frozenset({"kube-system"})
    # Never excepted from the allowed addresses: the apiserver's.
    protected_cidrs: tuple[str, ...] = ()
    # Excepted from the 0.0.0.0/0 and ::/0 rules (for CNIs whose ipBlocks match pod IPs).
    cluster_cidrs: tuple[str, ...] = ()


@dataclass
class DesiredCutOff:
    namespace: str
    cut: bool
    budgets: tuple[BudgetCut, ...] = ()          # the exhausted CutOff budgets
    cut_routes: tuple[str, ...] = ()
    denied_addresses: tuple[str, ...] = ()       # CIDRs (/32, /128)
    denied_namespaces: tuple[str, ...] = ()
    workloads: tuple[Workload, ...] = ()         # namespace-local, to hold at zero replicas
    notes: list[str] = field(default_factory=list)
    policy: dict[str, Any] | None = None         # None: no NetworkPolicy (nothing to deny)
    # Gateway mode with its egress enforced (render/gateway.py): the namespace's egress policy already
    # denies every address but a few, and NetworkPolicies add up, so the cut-off's "every other
    # address" rule would open the internet again: left out. The egress policy takes over the denied
    # namespaces (controller/gateway.py reads them from this policy: denied_namespaces).
    gateway: bool = False

    def message(self) -> str:
        if not self.cut:
            return f"namespace {self.namespace} is not cut off"
        parts = [f"namespace {self.namespace} cut off by budget(s) {', '.join(b.name for b in self.budgets)} "
                 f"(routes {', '.join(self.cut_routes) or 'none'})"]
        denied = [*self.denied_addresses, *(f"namespace {n}" for n in self.denied_namespaces)]
        parts.append(f"egress denied to {', '.join(denied)}" if denied else "no egress denied")
        if self.workloads:
            parts.append(f"scaled to 0: {', '.join(w.key for w in self.workloads)}")
        parts.extend(self.notes)
        return "; ".join(parts)


# -- where backends are ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Destination:
    """A backend's host, classified: exactly one of address, namespace, host is set (or local)."""

    address: str | None = None     # an IP literal
    namespace: str | None = None   # an in-cluster Service's namespace
    host: str | None = None        # an external DNS name
    local: bool = False            # a Service of the route's own namespace


def url_host(url: str) -> str:
    return (urlsplit(url).hostname or "").rstrip(".").lower()


def classify(host: str, own_namespace: str, is_namespace: Callable[[str], bool]) -> Destination:
    try:
        return Destination(address=str(ipaddress.ip_address(host)))
    except ValueError:
        pass
    labels = host.split(".")
    namespace: str | None = None
    if len(labels) == 1 and host != "localhost":
        namespace = own_namespace
    elif len(labels) >= 3 and labels[2] == "svc":
        namespace = labels[1]
    elif len(labels) == 2 and is_namespace(labels[1]):
        namespace = labels[1]
    if namespace is None:
        return Destination(host=host)
    return Destination(local=True) if namespace == own_namespace else Destination(namespace=namespace)


def _cidr(address: str) -> str:
    ip = ipaddress.ip_address(address)
    return f"{ip}/{32 if ip.version == 4 else 128}"


# -- the builder ------------------------------------------------------------------------------------

def cut_routes(budgets: Iterable[BudgetCut], aliases: Iterable[str]) -> tuple[list[BudgetCut], set[str]]:
    """(the exhausted CutOff budgets, the aliases they cut among `aliases`)."""
    aliases = set(aliases)
    cutting = sorted((b for b in budgets if b.cut), key=lambda b: b.name)
    cut: set[str] = set()
    for b in cutting:
        cut |= aliases if not b.routes else aliases & set(b.routes)
    return cutting, cut


def desired_cut_off(namespace: str, budgets: Iterable[BudgetCut], routes: Sequence[ModelRouteSpec],
                    resolve: Resolver, is_namespace: Callable[[str], bool],
                    settings: CutOffSettings = CutOffSettings(), gateway: bool = False) -> DesiredCutOff:
    """The namespace's cut-off, from its budgets and its valid routes (one per alias). `gateway`: the
    namespace is in gateway mode with its egress enforced (DesiredCutOff.gateway)."""
    by_alias = {r.model: r for r in routes}
    cutting, cut_aliases = cut_routes(budgets, by_alias)
    if not cutting:
        return DesiredCutOff(namespace, cut=False)
    notes: list[str] = []

    def uses(aliases: Iterable[str]) -> tuple[dict[Destination, list[str]], set[Workload]]:
        dests: dict[Destination, list[str]] = {}
        workloads: set[Workload] = set()
        for alias in sorted(aliases):
            for b in by_alias[alias].backends:
                d = classify(url_host(b.url), namespace, is_namespace)
                dests.setdefault(d, []).append(b.name)
                ref = b.deploymentRef
                if ref is not None and (ref.namespace or namespace) == namespace:
                    workloads.add(Workload(ref.kind.value, ref.name))
        return dests, workloads

    cut_dests, cut_workloads = uses(cut_aliases)
    open_dests, open_workloads = uses(set(by_alias) - cut_aliases)
    resolved: dict[str, set[str]] = {}

    def addresses(d: Destination) -> set[str]:
        if d.address is not None:
            return {d.address}
        if d.host is None:
            return set()
        if d.host not in resolved:
            try:
                resolved[d.host] = {str(ipaddress.ip_address(a)) for a in resolve(d.host)}
            except (OSError, ValueError):
                resolved[d.host] = set()
        return resolved[d.host]

    open_addresses = set().union(*(addresses(d) for d in open_dests))
    open_namespaces = {d.namespace for d in open_dests if d.namespace}
    protected = [ipaddress.ip_network(c, strict=False) for c in settings.protected_cidrs]
    denied_addresses: set[str] = set()
    denied_namespaces: set[str] = set()
    for d, backends in sorted(cut_dests.items(), key=lambda kv: str(kv[0])):
        what = d.host or d.address or d.namespace
        if d.local:
            notes.append(f"backend(s) {', '.join(backends)} in the namespace itself: not denied by the policy")
        elif d.namespace is not None:
            if d.namespace in settings.protected_namespaces:
                notes.append(f"namespace {d.namespace} is protected (DNS, ledger): not denied")
            elif d.namespace in open_namespaces:
                notes.append(f"namespace {d.namespace} is also used by a route still allowed: not denied")
            else:
                denied_namespaces.add(d.namespace)
        else:
            found = addresses(d)
            if not found:
                notes.append(f"host {what} did not resolve: not denied")
            for a in sorted(found):
                if a in open_addresses:
                    notes.append(f"{a} ({what}) is also used by a route still allowed: not denied")
                elif any(ipaddress.ip_address(a) in net for net in protected):
                    notes.append(f"{a} ({what}) is protected (apiserver): not denied")
                else:
                    denied_addresses.add(a)
    shared = sorted(cut_workloads & open_workloads)
    if shared:
        notes.append(f"{', '.join(w.key for w in shared)} also serve(s) a route still allowed: not scaled")
    out = DesiredCutOff(namespace, cut=True, budgets=tuple(cutting), cut_routes=tuple(sorted(cut_aliases)),
                        denied_addresses=tuple(sorted((_cidr(a) for a in denied_addresses), key=_sort_key)),
                        denied_namespaces=tuple(sorted(denied_namespaces)),
                        workloads=tuple(sorted(cut_workloads - open_workloads)), notes=notes, gateway=gateway)
    if out.denied_addresses or out.denied_namespaces:
        out.policy = network_policy(out, settings)
    return out


def _sort_key(cidr: str) -> tuple[int, Any]:
    net = ipaddress.ip_network(cidr)
    return net.version, net.network_address


def network_policy(desired: DesiredCutOff, settings: CutOffSettings = CutOffSettings()) -> dict[str, Any]:
    """All egress of every pod of the namespace except to the denied addresses and namespaces."""
    v4 = [c for c in desired.denied_addresses if ":" not in c]
    v6 = [c for c in desired.denied_addresses if ":" in c]
    v4 += [c for c in settings.cluster_cidrs if ":" not in c]
    v6 += [c for c in settings.cluster_cidrs if ":" in c]
    blocks = [{"ipBlock": {"cidr": "0.0.0.0/0", **({"except": v4} if v4 else {})}},
              {"ipBlock": {"cidr": "::/0", **({"except": v6} if v6 else {})}}]
    namespaces: dict[str, Any] = ({"matchExpressions": [{"key": NAME_LABEL, "operator": "NotIn",
                                                          "values": list(desired.denied_namespaces)}]}
                                  if desired.denied_namespaces else {})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": POLICY_NAME, "namespace": desired.namespace, "labels": dict(LABELS),
            "annotations": {BUDGETS_ANNOTATION: ",".join(b.name for b in desired.budgets)},
            # Garbage-collected with the last of its budgets, even while the operator is down.
            "ownerReferences": [{"apiVersion": API_VERSION, "kind": "TokenBudget", "name": b.name, "uid": b.uid,
                                 "blockOwnerDeletion": False} for b in desired.budgets if b.uid],
        },
        "spec": {
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [
                # DNS anywhere: names must keep resolving, also to learn where the ledger is.
                {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
                # Every address but the denied ones (the apiserver among them); not in gateway mode.
                *([] if desired.gateway else [{"to": blocks}]),
                # Pods of every namespace but the denied inference namespaces (the ledger among them).
                {"to": [{"namespaceSelector": namespaces}]},
            ],
        },
    }


def denied_namespaces(policy: dict[str, Any] | None) -> tuple[str, ...]:
    """The inference namespaces a cut-off policy (network_policy's, as read back) denies."""
    out: set[str] = set()
    for rule in ((policy or {}).get("spec") or {}).get("egress") or []:
        for peer in rule.get("to") or []:
            selector = peer.get("namespaceSelector") or peer.get("namespace_selector") or {}
            for expr in selector.get("matchExpressions") or selector.get("match_expressions") or []:
                if expr.get("key") == NAME_LABEL and expr.get("operator") == "NotIn":
                    out.update(expr.get("values") or [])
    return tuple(sorted(out))
