"""The local cluster node's configuration documents (pure builders in localcluster/node.py)."""
from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path

from spendwarden.localcluster import node


def test_containerd_config_restricts_oom_score_adj_and_closes_every_registry(tmp_path: Path) -> None:
    doc = tomllib.loads(node.containerd_config(tmp_path / "root", tmp_path / "state", tmp_path / "sock",
                                              tmp_path / "cni", tmp_path / "hosts"))
    assert doc["version"] == 3
    runtime = doc["plugins"]["io.containerd.cri.v1.runtime"]
    # Without it every pod sandbox fails here: runc cannot write oom_score_adj (no CAP_SYS_RESOURCE).
    assert runtime["restrict_oom_score_adj"] is True
    assert runtime["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"] is False
    images = doc["plugins"]["io.containerd.cri.v1.images"]
    assert images["pinned_images"]["sandbox"] == node.PAUSE_IMAGE
    assert images["registry"]["config_path"] == str(tmp_path / "hosts")
    hosts = tomllib.loads(node.CLOSED_REGISTRY_HOSTS)
    assert ipaddress.ip_address(hosts["server"].split("//")[1].split(":")[0]).is_loopback


def test_kubelet_runs_on_cgroup_v1_with_cluster_dns_and_no_anonymous_access(tmp_path: Path) -> None:
    cfg = node.kubelet_config(client_ca=tmp_path / "ca", socket=tmp_path / "sock", port=1, healthz_port=2,
                              resolv_conf=tmp_path / "resolv", tls_cert=tmp_path / "c", tls_key=tmp_path / "k")
    assert cfg["failCgroupV1"] is False and cfg["cgroupDriver"] == "cgroupfs"
    assert cfg["authentication"]["anonymous"]["enabled"] is False and cfg["readOnlyPort"] == 0
    assert cfg["clusterDNS"] == [node.DNS_SERVICE_IP]
    assert ipaddress.ip_address(node.DNS_SERVICE_IP) in ipaddress.ip_network(node.SERVICE_CIDR)


def test_pod_network_is_the_bridge_subnet_the_node_owns() -> None:
    cni = node.cni_config(Path("/x"))
    bridge = cni["plugins"][0]
    assert bridge["bridge"] == node.BRIDGE and bridge["ipMasq"] is False  # pods never NAT out of the machine
    assert bridge["ipam"]["ranges"] == [[{"subnet": node.POD_CIDR, "gateway": node.NODE_IP}]]
    assert ipaddress.ip_address(node.NODE_IP) in ipaddress.ip_network(node.POD_CIDR)
    assert ipaddress.ip_network(node.POD_CIDR).subnet_of(ipaddress.ip_network(node.CLUSTER_CIDR))


def test_cluster_dns_service_points_at_the_hosts_coredns() -> None:
    service, slice_ = node.dns_objects()
    assert service["spec"]["clusterIP"] == node.DNS_SERVICE_IP and "selector" not in service["spec"]
    assert slice_["metadata"]["labels"]["kubernetes.io/service-name"] == service["metadata"]["name"]
    assert slice_["endpoints"][0]["addresses"] == [node.NODE_IP]
    assert f"bind {node.NODE_IP}" in node.corefile(Path("/kc"), 1, 2)
