"""The local cluster's node: containerd + runc, CNI (bridge), kubelet, kube-proxy, CoreDNS and a
NetworkPolicy enforcer (kube-router, firewall only), all as host processes beside the control plane.

One node per machine: the bridge, the iptables rules, the kubelet's cgroups and the containerd
image store are the host's. A lock file keeps a second node from starting while one runs.

Network (fixed, private to this machine):
  pods      10.244.0.0/24 on the bridge `swbr0` (10.244.0.1 is the node's and the apiserver's address)
  services  10.96.0.0/16, the apiserver at 10.96.0.1, cluster DNS at 10.96.0.10
Traffic from pods to anything beyond the bridge and this host is rejected (no pod reaches outside
this machine), and image pulls go to a closed local port: only images imported into the node run.

Longer than 500 lines: one node's start-up is one ordered sequence of short steps (network,
containerd, kubelet, kube-proxy, CoreDNS, policy enforcer) that share its state; dev tooling only.
"""
from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import yaml

NODE_NAME = "spendwarden-node"
BRIDGE = "swbr0"
POD_CIDR = "10.244.0.0/24"
CLUSTER_CIDR = "10.244.0.0/16"
NODE_IP = "10.244.0.1"
SERVICE_CIDR = "10.96.0.0/16"
API_SERVICE_IP = "10.96.0.1"
DNS_SERVICE_IP = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"
# The sandbox image containerd runs for every pod; made locally from Kubernetes' pause.c.
PAUSE_IMAGE = "registry.k8s.io/pause:3.10.2"
CNI_BIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
ISOLATION_CHAIN = "SPENDWARDEN-NODE-ISOLATION"
K8S_NAMESPACE = "k8s.io"  # containerd's namespace for the CRI's images and containers
STATE_DIR = Path("/run/spendwarden-node")  # containerd's socket and state: gone at a reboot, like its tasks


class NodeError(RuntimeError):
    """The node could not be started (the message says which component and why)."""


def node_state_root() -> Path:
    """Where the node keeps what outlives one start: containerd's image store (imports are slow)."""
    root = Path(os.environ.get("SPENDWARDEN_CACHE") or Path.home() / ".cache" / "spendwarden")
    return root / "node"


def run(*args: str, check: bool = True, input: str | bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    text = not isinstance(input, bytes)
    res = subprocess.run(list(args), capture_output=True, text=text, input=input, timeout=timeout)
    if check and res.returncode != 0:
        err = res.stderr if text else res.stderr.decode("utf-8", "replace")
        raise NodeError(f"{' '.join(args)} failed ({res.returncode}): {str(err).strip()[-2000:]}")
    return res


# --------------------------------------------------------------------------------------------------
# Host network


def _sysctl(name: str, value: str) -> None:
    Path("/proc/sys", *name.split(".")).write_text(value)


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run("iptables", "-w", "5", *args, check=check)


def setup_network() -> None:
    """The bridge with the node's address, forwarding, bridged traffic through iptables (services and
    NetworkPolicies see pod-to-pod packets), a route that keeps service IPs on the bridge, and the
    isolation chain that stops pod traffic at this machine's edge."""
    if run("ip", "link", "show", BRIDGE, check=False).returncode != 0:
        run("ip", "link", "add", BRIDGE, "type", "bridge")
    prefix = ipaddress.ip_network(POD_CIDR).prefixlen
    run("ip", "addr", "replace", f"{NODE_IP}/{prefix}", "dev", BRIDGE)
    run("ip", "link", "set", BRIDGE, "up")
    # Host processes (the apiserver calling a webhook Service, tests) reach service IPs through
    # kube-proxy's OUTPUT DNAT; the route makes the first lookup succeed and keeps an unprogrammed
    # service IP on the bridge instead of sending it to the default gateway.
    run("ip", "route", "replace", SERVICE_CIDR, "dev", BRIDGE, "src", NODE_IP)
    _sysctl("net.ipv4.ip_forward", "1")
    _sysctl("net.bridge.bridge-nf-call-iptables", "1")
    _sysctl("net.ipv4.conf.all.route_localnet", "1")  # kube-proxy's localhost NodePorts
    if _iptables("-n", "-L", ISOLATION_CHAIN, check=False).returncode != 0:
        _iptables("-N", ISOLATION_CHAIN)
    _iptables("-F", ISOLATION_CHAIN)
    # Forwarded packets from the bridge may only go back onto it: no pod reaches beyond this host.
    _iptables("-A", ISOLATION_CHAIN, "-i", BRIDGE, "!", "-o", BRIDGE, "-j", "REJECT")
    if _iptables("-C", "FORWARD", "-j", ISOLATION_CHAIN, check=False).returncode != 0:
        _iptables("-I", "FORWARD", "1", "-j", ISOLATION_CHAIN)


def teardown_network() -> None:
    """Drop what kube-proxy and kube-router left in iptables, and the route; the bridge stays (cheap)."""
    run("ip", "route", "del", SERVICE_CIDR, check=False)
    for table in ("filter", "nat", "mangle"):
        rules = _iptables("-t", table, "-S", check=False).stdout.splitlines()
        chains = [r.split()[1] for r in rules if r.startswith("-N ") and r.split()[1].startswith(("KUBE-", "KUBE_"))]
        for rule in rules:  # jumps from the built-in chains into kube-proxy's and kube-router's
            parts = rule.split()
            if parts[:1] == ["-A"] and parts[1] in ("INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING") \
                    and any(p.startswith(("KUBE-", "KUBE_")) for p in parts[2:]):
                _iptables("-t", table, "-D", *parts[1:], check=False)
        for chain in chains:
            _iptables("-t", table, "-F", chain, check=False)
        for chain in chains:
            _iptables("-t", table, "-X", chain, check=False)
    for line in run("ipset", "list", "-n", check=False).stdout.split():
        if line.startswith(("KUBE-", "kube-router")):
            run("ipset", "destroy", line, check=False)


# --------------------------------------------------------------------------------------------------
# Configuration files (pure: values in, documents out)


def containerd_config(root: Path, state: Path, socket: Path, cni_conf_dir: Path, hosts_dir: Path) -> str:
    return f"""\
version = 3
root = "{root}"
state = "{state}"

[grpc]
  address = "{socket}"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{PAUSE_IMAGE}"
  [plugins.'io.containerd.cri.v1.images'.registry]
    config_path = "{hosts_dir}"

[plugins.'io.containerd.cri.v1.runtime']
  # runc cannot write oom_score_adj here (no CAP_SYS_RESOURCE): without this every sandbox fails.
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "{shutil.which('runc') or '/usr/sbin/runc'}"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = {json.dumps([d for d in CNI_BIN_DIRS if Path(d).is_dir()])}
    conf_dir = "{cni_conf_dir}"
"""


# Every registry resolves to a closed local port: a pull of an image that was not imported fails at
# once (ErrImagePull), and nothing leaves this machine.
CLOSED_REGISTRY_HOSTS = """\
server = "http://127.0.0.1:9"

[host."http://127.0.0.1:9"]
  capabilities = ["pull", "resolve"]
"""


def cni_config(ipam_dir: Path) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0", "name": "spendwarden",
        "plugins": [
            {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
             "ipam": {"type": "host-local", "dataDir": str(ipam_dir),
                      "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]],
                      "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(*, client_ca: Path, socket: Path, port: int, healthz_port: int, resolv_conf: Path,
                   tls_cert: Path, tls_key: Path) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": str(client_ca)}},
        "authorization": {"mode": "Webhook"},
        "address": NODE_IP, "port": port, "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1", "healthzPort": healthz_port,
        "tlsCertFile": str(tls_cert), "tlsPrivateKeyFile": str(tls_key),
        "containerRuntimeEndpoint": f"unix://{socket}",
        "cgroupDriver": "cgroupfs",
        # These machines run cgroup v1, which kubelet 1.35+ refuses unless told to carry on.
        "failCgroupV1": False,
        "clusterDNS": [DNS_SERVICE_IP], "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": str(resolv_conf),
        "failSwapOn": False,
        "staticPodPath": "",
        # Tests change ConfigMaps and wait for mounted volumes to follow: the default 1 min is slow.
        "syncFrequency": "5s",
        "serializeImagePulls": False,
        # A small shared disk must not evict the test pods.
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "nodefs.inodesFree": "1%",
                         "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        "maxPods": 110,
        "podPidsLimit": 4096,
        "shutdownGracePeriod": "0s",
        "nodeStatusReportFrequency": "10s",
    }


def kube_proxy_config(kubeconfig: Path, healthz_port: int, metrics_port: int) -> dict[str, Any]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
        "mode": "iptables", "clusterCIDR": CLUSTER_CIDR, "hostnameOverride": NODE_NAME,
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "bindAddress": NODE_IP,
        "healthzBindAddress": f"127.0.0.1:{healthz_port}", "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        # Leave the host's conntrack sysctls alone (a sandboxed machine may refuse them).
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        "iptables": {"syncPeriod": "10s", "minSyncPeriod": "0s"},
    }


def corefile(kubeconfig: Path, health_port: int, ready_port: int) -> str:
    return f"""\
{CLUSTER_DOMAIN}:53 in-addr.arpa:53 {{
    bind {NODE_IP}
    errors
    health 127.0.0.1:{health_port}
    ready 127.0.0.1:{ready_port}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
    }}
    cache 5
    loadbalance
}}
"""


def dns_objects() -> list[dict[str, Any]]:
    """The kube-dns Service with the host's CoreDNS as its endpoint (CoreDNS runs beside the kubelet)."""
    labels = {"k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS"}
    ports = [{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]
    return [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": labels},
         "spec": {"clusterIP": DNS_SERVICE_IP, "ports": [{**p, "targetPort": 53} for p in ports]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "kube-dns-host", "namespace": "kube-system",
                      "labels": {"kubernetes.io/service-name": "kube-dns",
                                 "endpointslice.kubernetes.io/managed-by": "spendwarden-localcluster"}},
         "addressType": "IPv4",
         "endpoints": [{"addresses": [NODE_IP], "conditions": {"ready": True}, "nodeName": NODE_NAME}],
         "ports": ports},
    ]


# --------------------------------------------------------------------------------------------------
# Images


def pause_image_archive(pause_binary: Path, out: Path) -> Path:
    """The sandbox image as an OCI archive, built with buildah from scratch around the static pause."""
    if out.exists() and out.stat().st_mtime >= pause_binary.stat().st_mtime:
        return out
    ctr_id = run("buildah", "from", "scratch").stdout.strip()
    try:
        run("buildah", "copy", ctr_id, str(pause_binary), "/pause")
        run("buildah", "config", "--entrypoint", '["/pause"]', "--user", "65535:65535", ctr_id)
        image = run("buildah", "commit", "--rm", ctr_id, "localhost/spendwarden-pause:local").stdout.strip()
        ctr_id = ""
        tmp = out.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        run("buildah", "push", image, f"oci-archive:{tmp}:{PAUSE_IMAGE}")
        tmp.rename(out)
    finally:
        if ctr_id:
            run("buildah", "rm", ctr_id, check=False)
    return out


# --------------------------------------------------------------------------------------------------
# Mounts the kubelet leaves behind


def unmount_below(root: Path) -> None:
    """Unmount everything mounted below root (volumes, tmpfs for Secrets), deepest first."""
    prefix = str(root.resolve()).rstrip("/") + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    for p in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", p], capture_output=True)


class NodeLock:
    """One node per machine (the bridge, iptables and cgroups are shared): an exclusive flock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "?"
            f.close()
            raise NodeError(f"another local cluster node is running on this machine (pid {owner}); "
                            "stop it first (one node per machine: the bridge and iptables are shared)") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._f = f

    def release(self) -> None:
        if self._f is not None:
            fcntl.flock(self._f, fcntl.LOCK_UN)
            self._f.close()
            self._f = None


def wait_until(what: str, check: Callable[[], bool], timeout: float, alive: Callable[[], None] = lambda: None,
               interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while True:
        alive()
        if check():
            return
        if time.monotonic() > deadline:
            raise NodeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def write_yaml(path: Path, doc: Any) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------------
# The node's processes


class Node:
    """containerd, kubelet, kube-proxy, CoreDNS and kube-router for a running ControlPlane.

    Made by ControlPlane(node=True); `start(cp)` needs the control plane's CA, client CA and
    kubeconfigs, which it finds in cp.dir. Attributes: `dir`, `socket` (containerd's), `logs`, `timings`.
    """

    def __init__(self, binaries: dict[str, Path], process_factory: Callable[..., Any], free_port: Callable[[], int],
                 start_timeout: float = 120) -> None:
        self.binaries = binaries
        self._process = process_factory
        self._free_port = free_port
        self.start_timeout = start_timeout
        self.root = node_state_root()
        self.lock = NodeLock(self.root / "node.lock")
        self.dir: Path | None = None
        self.socket: Path | None = None
        self.logs: dict[str, Path] = {}
        self.timings: dict[str, float] = {}
        self.procs: list[Any] = []

    # -- helpers the control plane and the tests use -------------------------------------------

    def ctr(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        """containerd's own client, in the CRI's namespace (where the kubelet's images and containers are)."""
        assert self.socket is not None
        return run(str(self.binaries["ctr"]), "--address", str(self.socket), "-n", K8S_NAMESPACE, *args,
                   timeout=timeout, check=check)

    def import_image(self, archive: Path) -> None:
        """Import an OCI/docker archive where the kubelet looks for images."""
        self.ctr("images", "import", "--all-platforms", str(archive), timeout=600)

    def has_image(self, name: str) -> bool:
        return name in self.ctr("images", "ls", "-q").stdout.split()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, cp: Any, env: dict[str, str]) -> None:
        self.lock.acquire()
        try:
            self._start(cp, env)
        except BaseException:
            self.stop()
            raise

    def _start(self, cp: Any, env: dict[str, str]) -> None:
        t0 = time.monotonic()
        d = self.dir = cp.dir / "node"
        d.mkdir()
        # Left by a node that was killed: its containers' mounts and its kube-proxy rules.
        self._clean_leftovers()
        setup_network()
        self.timings["network"] = time.monotonic() - t0

        state = STATE_DIR
        shutil.rmtree(state, ignore_errors=True)
        state.mkdir(parents=True)
        self.socket = socket = state / "containerd.sock"
        cni_dir, hosts_dir = d / "cni", d / "registry-hosts" / "_default"
        cni_dir.mkdir()
        hosts_dir.mkdir(parents=True)
        (hosts_dir / "hosts.toml").write_text(CLOSED_REGISTRY_HOSTS)
        (cni_dir / "10-spendwarden.conflist").write_text(json.dumps(cni_config(d / "cni-ipam")))
        cfg = d / "containerd.toml"
        cfg.write_text(containerd_config(self.root / "containerd", state / "containerd", self.socket, cni_dir,
                                         hosts_dir.parent))
        path_env = {**env, "PATH": f"{self.binaries['containerd'].parent}:{env.get('PATH', '/usr/bin:/bin')}"}
        t = time.monotonic()
        containerd = self._spawn("containerd", [str(self.binaries["containerd"]), "--config", str(cfg)], path_env)
        wait_until("containerd's socket", lambda: socket.exists() and self.ctr("version", check=False).returncode == 0,
                   30, alive=lambda: self._alive([containerd]))
        self.timings["containerd"] = time.monotonic() - t

        t = time.monotonic()
        if not self.has_image(PAUSE_IMAGE):
            self.import_image(pause_image_archive(self.binaries["pause"], self.root / "pause.oci.tar"))
        self.timings["pause-image"] = time.monotonic() - t

        client_ca = cp.dir / "client-ca.crt"
        resolv = d / "resolv.conf"
        # Pods with dnsPolicy Default get this: no upstream resolver, since nothing outside is reachable.
        resolv.write_text("options ndots:1\n")
        kubelet_dir = d / "kubelet"
        kubelet_dir.mkdir()
        tls_cert, tls_key = cp.issue_serving("kubelet", [NODE_NAME, NODE_IP, "127.0.0.1", "localhost"])
        kubelet_cfg = write_yaml(d / "kubelet.yaml", kubelet_config(
            client_ca=client_ca, socket=self.socket, port=self._free_port(), healthz_port=self._free_port(),
            resolv_conf=resolv, tls_cert=tls_cert, tls_key=tls_key))
        t = time.monotonic()
        kubelet = self._spawn("kubelet", [
            str(self.binaries["kubelet"]), f"--config={kubelet_cfg}",
            f"--kubeconfig={cp.client_kubeconfig('kubelet', f'system:node:{NODE_NAME}', ['system:nodes'])}",
            f"--root-dir={kubelet_dir}", f"--cert-dir={d / 'kubelet-pki'}",
            f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_IP}", "--v=1",
        ], path_env)
        proxy_cfg = write_yaml(d / "kube-proxy.yaml", kube_proxy_config(
            cp.client_kubeconfig("kube-proxy", "system:kube-proxy"), self._free_port(), self._free_port()))
        proxy = self._spawn("kube-proxy", [str(self.binaries["kube-proxy"]), f"--config={proxy_cfg}", "--v=1"],
                            path_env)
        admin_kubeconfig = cp.client_kubeconfig("node-addons", "spendwarden:node-addons", ["system:masters"])
        dns_file = d / "Corefile"
        dns_file.write_text(corefile(admin_kubeconfig, self._free_port(), self._free_port()))
        dns = self._spawn("coredns", [str(self.binaries["coredns"]), "-conf", str(dns_file), "-dns.port", "53"],
                          path_env)
        for doc in dns_objects():
            cp.apply(doc)
        watch = [containerd, kubelet, proxy, dns]
        wait_until(f"node {NODE_NAME} Ready", lambda: self._node_ready(cp), self.start_timeout,
                   alive=lambda: self._alive(watch), interval=0.5)
        self.timings["node-ready"] = time.monotonic() - t
        # kube-router finds its node by name at start: only once the kubelet has registered it.
        t = time.monotonic()
        health = self._free_port()
        router = self._spawn("kube-router", [
            str(self.binaries["kube-router"]), f"--kubeconfig={admin_kubeconfig}",
            f"--hostname-override={NODE_NAME}", "--run-firewall=true", "--run-router=false",
            "--run-service-proxy=false", "--enable-cni=false", "--metrics-port=0",
            f"--health-port={health}", "--v=1",
        ], path_env)
        wait_until("kube-router's network policy controller", lambda: _healthy(f"http://127.0.0.1:{health}/healthz"),
                   60, alive=lambda: self._alive([router]))
        self.timings["network-policy"] = time.monotonic() - t
        self.timings["total"] = time.monotonic() - t0

    @staticmethod
    def _node_ready(cp: Any) -> bool:
        status, body = cp.request("GET", f"/api/v1/nodes/{NODE_NAME}")
        if status != 200:
            return False
        conditions = {c["type"]: c["status"] for c in body.get("status", {}).get("conditions", [])}
        taints = [t["key"] for t in body.get("spec", {}).get("taints", []) or []]
        return conditions.get("Ready") == "True" and "node.kubernetes.io/not-ready" not in taints

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> Any:
        assert self.dir is not None
        self.logs[name] = self.dir / f"{name}.log"
        p = self._process(name, args, self.logs[name])
        self.procs.append(p)
        p.start(env)
        return p

    def _alive(self, procs: list[Any]) -> None:
        for p in procs:
            if p.exited:
                raise NodeError(f"{p.name} exited with code {p.popen.returncode}; last lines of {p.log}:\n"
                                f"{_tail_text(p.log)}")

    def check(self) -> None:
        self._alive(self.procs)

    def stop(self, timeout: float = 10) -> None:
        """kubelet first (no new pods), then every pod's containers, then the rest; clean the host."""
        by_name = {p.name: p for p in self.procs}
        if "kubelet" in by_name:
            by_name["kubelet"].stop(timeout)
        if self.socket is not None and "containerd" in by_name and not by_name["containerd"].exited:
            self._remove_pods()
        for p in reversed(self.procs):
            p.stop(timeout)
        self.procs = []
        self._clean_leftovers()
        self.lock.release()

    def _remove_pods(self) -> None:
        """Kill and delete every CRI container and sandbox, so that no pod outlives its cluster."""
        tasks = self.ctr("tasks", "ls", "-q").stdout.split()
        for task in tasks:
            self.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False)
        for task in tasks:
            self.ctr("tasks", "delete", "-f", task, check=False)
        containers = self.ctr("containers", "ls", "-q").stdout.split()
        if containers:
            self.ctr("containers", "rm", *containers, check=False)

    def _clean_leftovers(self) -> None:
        # Shims of a killed containerd keep their containers running: end them by their cgroup.
        for pid in _pids_in_cgroup("kubepods"):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        unmount_below(STATE_DIR)
        if self.dir is not None:
            unmount_below(self.dir)
        teardown_network()
        # Pod network namespaces left by a killed node: their veths hang on the bridge otherwise.
        for ns in Path("/run/netns").glob("cni-*") if Path("/run/netns").is_dir() else []:
            run("ip", "netns", "delete", ns.name, check=False)


def _healthy(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def _pids_in_cgroup(name: str) -> list[int]:
    base = Path("/sys/fs/cgroup/pids") / name
    if not base.is_dir():
        return []
    pids: list[int] = []
    for procs in base.rglob("cgroup.procs"):
        try:
            pids += [int(x) for x in procs.read_text().split()]
        except OSError:
            continue
    return pids


def _tail_text(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
