"""A real local Kubernetes cluster: etcd + kube-apiserver + kube-controller-manager + kube-scheduler,
and with node=True a node beside them (containerd, kubelet, kube-proxy, CoreDNS, kube-router: node.py).

Modelled on controller-runtime's envtest (same binary discovery, same apiserver flags). All binaries
are built from Go modules by scripts/cluster/build.sh (Kubernetes 1.37) and cached outside the repo.
Without a node, Pods stay Pending; with one they run (only images imported into the node: no registry).

    with ControlPlane(crds=["crds"], node=True) as cp:
        cp.kubectl("get", "tokenbudgets", "-A")
        api = cp.api_client()          # kubernetes.client.ApiClient

Environment:
  TEST_ASSET_<NAME>                            a binary's path (as envtest: TEST_ASSET_KUBE_APISERVER, ...)
  KUBEBUILDER_ASSETS                           a directory holding the binaries (as envtest)
  SPENDWARDEN_CACHE                            cache root (default ~/.cache/spendwarden), binaries in cluster/<key>/bin
  SPENDWARDEN_CONTROL_PLANE_SCRIPT             the script that builds the binaries (default scripts/cluster/build.sh)
  SPENDWARDEN_TEST_KUBECONFIG                  use this existing cluster instead of starting one
  USE_EXISTING_CLUSTER=true (+ KUBECONFIG)     the same, envtest's spelling
  SPENDWARDEN_CONTROL_PLANE_START_TIMEOUT      seconds (default 60; KUBEBUILDER_CONTROLPLANE_START_TIMEOUT too)
  SPENDWARDEN_CONTROL_PLANE_STOP_TIMEOUT       seconds (default 10; KUBEBUILDER_CONTROLPLANE_STOP_TIMEOUT too)
  SPENDWARDEN_KEEP_CONTROL_PLANE_DIR=1         keep the temp dir (certs, logs) after stop, for debugging

Longer than 500 lines: the control plane's processes, certificates and readiness checks form one
start/stop sequence with shared state; dev tooling only (node.py holds the node).
"""
from __future__ import annotations

import atexit
import base64
import ctypes
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import yaml

from spendwarden.localcluster import certs
from spendwarden.localcluster import node as nodes

CONTROL_PLANE_BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
NODE_BINARIES = ("kubelet", "kube-proxy", "containerd", "containerd-shim-runc-v2", "ctr", "coredns", "kube-router",
                 "pause")
BINARY_NAMES = CONTROL_PLANE_BINARIES + NODE_BINARIES + ("kubectl", "helm")
REPO_ROOT = Path(__file__).resolve().parents[3]

# The audience of the apiserver's own tokens. It is NOT "spendwarden": a token minted for the proxies
# (audience "spendwarden") must not be usable against the apiserver, as in a real cluster. Whoever
# reviews such a token passes spec.audiences=["spendwarden"] in the TokenReview.
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CLUSTER_IP_RANGE = nodes.SERVICE_CIDR

# Without a node, controllers that need nodes or volumes only log errors and burn CPU; with one, all run.
NODELESS_DISABLED_CONTROLLERS = (
    "node-ipam-controller", "node-lifecycle-controller", "ttl-controller",
    "persistentvolume-attach-detach-controller", "persistentvolume-binder-controller",
    "persistentvolume-expander-controller", "persistentvolume-protection-controller",
    "persistentvolumeclaim-protection-controller", "horizontal-pod-autoscaler-controller",
)


class ControlPlaneError(RuntimeError):
    """The control plane could not be started (the message carries the tail of the relevant log)."""


class BinariesUnavailable(ControlPlaneError):
    """etcd / kube-apiserver / kube-controller-manager could not be found or built."""


# --------------------------------------------------------------------------------------------------
# Binaries


def binaries_script() -> Path:
    return Path(os.environ.get("SPENDWARDEN_CONTROL_PLANE_SCRIPT") or REPO_ROOT / "scripts" / "cluster" / "build.sh")


def _is_exe(p: Path) -> bool:
    return p.is_file() and os.access(p, os.X_OK)


def find_binaries(extra_dirs: Sequence[Path] = ()) -> tuple[dict[str, Path], dict[str, list[str]]]:
    """Look for each binary as envtest does: TEST_ASSET_<NAME>, $KUBEBUILDER_ASSETS/<name>, the cache.

    Returns (found, searched) where searched[name] lists the places tried for each missing binary.
    """
    found: dict[str, Path] = {}
    searched: dict[str, list[str]] = {}
    for name in BINARY_NAMES:
        candidates: list[Path] = []
        env = "TEST_ASSET_" + name.upper().replace("-", "_")
        if os.environ.get(env):
            candidates.append(Path(os.environ[env]))
        if os.environ.get("KUBEBUILDER_ASSETS"):
            candidates.append(Path(os.environ["KUBEBUILDER_ASSETS"]) / name)
        candidates += [Path(d) / name for d in extra_dirs]
        for c in candidates:
            if _is_exe(c):
                found[name] = c
                break
        else:
            searched[name] = [str(c) for c in candidates]
    return found, searched


def ensure_binaries(build: bool = True, progress: IO[str] | None = None) -> dict[str, Path]:
    """Find the binaries: given by the environment, or the build script's (it builds what is missing,
    25-35 min on 2 cores the first time, and only names its cache directory after that).

    The script's progress is copied line by line to `progress` (default sys.stderr).
    """
    found, searched = find_binaries()
    if not searched:
        return found
    missing = ", ".join(sorted(searched))
    if not build:
        raise BinariesUnavailable(f"missing {missing}; searched: {searched}")
    script = binaries_script()
    if not script.is_file():
        raise BinariesUnavailable(f"missing {missing} and no build script at {script} "
                                  f"(set SPENDWARDEN_CONTROL_PLANE_SCRIPT or TEST_ASSET_*/KUBEBUILDER_ASSETS)")
    out = progress or sys.stderr
    print(f"[spendwarden] obtaining {missing} with {script} (a first build takes 25-35 min)", file=out, flush=True)
    proc = subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:  # the script writes progress to stderr (merged here) and the dir last on stdout
        lines.append(line.rstrip("\n"))
        del lines[:-40]
        out.write(line)
        out.flush()
    rc = proc.wait()
    if rc != 0:
        tail = "\n".join(lines[-25:])
        raise BinariesUnavailable(f"{script} failed with exit code {rc}; last output:\n{tail}")
    bin_dir = Path(lines[-1].strip())
    found, searched = find_binaries(extra_dirs=[bin_dir])
    if searched:
        raise BinariesUnavailable(f"{script} finished but binaries are still missing: {searched}")
    return found


# --------------------------------------------------------------------------------------------------
# Small helpers


def _free_port() -> int:
    # Picked at run time: a fixed port may still be held by an earlier run (see the reference notes).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_float(names: Iterable[str], default: float) -> float:
    for n in names:
        v = os.environ.get(n, "").strip().rstrip("s")
        if v:
            return float(v)
    return default


def _tail(path: Path | None, lines: int = 30) -> str:
    if path is None or not path.exists():
        return "(no log)"
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        text = f.read().decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


_prctl: Callable[..., int] | None
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None
_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    # Die with the parent (pytest killed by a timeout, Ctrl-C twice): no orphaned apiserver holding ports and
    # a tmpfs etcd. SIGKILL, not SIGTERM: all three get it at once, and an apiserver whose etcd is gone hangs
    # in its graceful shutdown. Note that "parent" is the forking *thread*: start the control plane from a
    # thread that lives as long as it does (the main thread in pytest and in `spendwarden local-cluster`).
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


_OWNER_FILE = ".spendwarden-owner-pid"


def _claim(directory: Path) -> Path:
    (directory / _OWNER_FILE).write_text(str(os.getpid()))
    return directory


def _sweep_stale_dirs() -> None:
    """Remove temp dirs left by control planes whose Python process died without stop() (SIGKILL).

    Only dirs carrying an owner-pid file whose process is gone: other users' running clusters stay.
    Matters most for etcd's data dirs on tmpfs, which would otherwise hold memory until reboot.
    """
    for base in (Path("/dev/shm"), Path(tempfile.gettempdir())):
        try:
            candidates = [*base.glob("spendwarden-etcd-*"), *base.glob("spendwarden-cp-*")]
        except OSError:
            continue
        for d in candidates:
            try:
                pid = int((d / _OWNER_FILE).read_text())
                os.kill(pid, 0)
            except ProcessLookupError:
                shutil.rmtree(d, ignore_errors=True)
            except (OSError, ValueError):
                continue  # no owner file (kept for debugging, or not ours), or not our process: leave it


class _Rest:
    """A minimal JSON REST client on the standard library: no kubernetes-client import on the start path."""

    def __init__(self, server: str, ca_file: str | None, cert_file: str | None, key_file: str | None,
                 verify: bool = True, token: Any = None) -> None:
        u = urllib.parse.urlsplit(server)
        self.https = u.scheme == "https"
        self.host, self.port = u.hostname or "127.0.0.1", u.port or (443 if self.https else 80)
        self.prefix = u.path.rstrip("/")
        self.token = token  # a str or a callable returning the Authorization header value
        self.ctx: ssl.SSLContext | None = None
        if self.https:
            self.ctx = ssl.create_default_context(cafile=ca_file) if verify else ssl._create_unverified_context()
            if cert_file:
                self.ctx.load_cert_chain(cert_file, key_file)

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                timeout: float = 10) -> tuple[int, Any]:
        if self.https:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(self.host, self.port, context=self.ctx,
                                                                           timeout=timeout)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
            if not isinstance(body, (bytes, str)):
                body = json.dumps(body)
        auth = self.token() if callable(self.token) else self.token
        if auth:
            headers["Authorization"] = auth
        try:
            conn.request(method, self.prefix + path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(data) if data else None
        except ValueError:
            return resp.status, data.decode("utf-8", "replace")


def _kubeconfig_doc(server: str, ca_pem: bytes, cert_pem: bytes, key_pem: bytes, name: str, user: str) -> dict:
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return {
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": name, "cluster": {"server": server, "certificate-authority-data": b64(ca_pem)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(cert_pem), "client-key-data": b64(key_pem)}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": user}}],
        "current-context": name,
    }


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds a client key
    with os.fdopen(fd, "w") as f:
        f.write(text)


def existing_cluster_kubeconfig() -> str | None:
    """The kubeconfig of an existing cluster to use instead of starting one, if the environment asks for it."""
    if os.environ.get("SPENDWARDEN_TEST_KUBECONFIG"):
        return os.environ["SPENDWARDEN_TEST_KUBECONFIG"]
    if os.environ.get("USE_EXISTING_CLUSTER", "").lower() == "true":
        return os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    return None


def load_crd_documents(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """CustomResourceDefinition documents from YAML files and directories (*.yaml, *.yml, *.json)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix in (".yaml", ".yml", ".json"))
        else:
            files.append(p)
    docs = []
    for f in files:
        for doc in yaml.safe_load_all(f.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                docs.append(doc)
    return docs


# --------------------------------------------------------------------------------------------------
# The control plane


class _Process:
    def __init__(self, name: str, args: list[str], log: Path) -> None:
        self.name, self.args, self.log = name, args, log
        self.popen: subprocess.Popen | None = None

    def start(self, env: dict[str, str]) -> None:
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=env, preexec_fn=_child_setup,
                                          # own session: Ctrl-C in a terminal reaches only us, and we stop
                                          # the processes in order (controller-manager, apiserver, etcd)
                                          start_new_session=True)

    @property
    def exited(self) -> bool:
        return self.popen is not None and self.popen.poll() is not None

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode if self.popen is not None else None

    def stop(self, timeout: float) -> None:
        p = self.popen
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager on free localhost ports, or an existing cluster.

    Attributes after start(): `server` (https URL), `kubeconfig` (Path of an admin kubeconfig, certificates
    embedded), `ca_file`, `dir` (temp dir with certs and logs), `logs` (name -> log Path), `ports`
    (name -> port), `timings` (phase -> seconds), `crd_names`, `existing` (True when an existing
    cluster is used: then no processes, and stop() leaves the cluster as it is).
    """

    def __init__(self, *, crds: Sequence[str | os.PathLike] = (), binaries: dict[str, Path] | None = None,
                 existing_kubeconfig: str | None = None, use_existing: bool | None = None,
                 controller_manager: bool = True, node: bool = False, start_timeout: float | None = None,
                 stop_timeout: float | None = None, extra_apiserver_args: Sequence[str] = (),
                 extra_controller_manager_args: Sequence[str] = ()) -> None:
        """
        crds: files/dirs installed before kube-controller-manager starts (so its garbage collector watches
          the custom resources from the beginning instead of after its 30 s discovery resync).
        binaries: name -> path; default: ensure_binaries() at start().
        existing_kubeconfig / use_existing: use an existing cluster; by default decided by the environment
          (SPENDWARDEN_TEST_KUBECONFIG, USE_EXISTING_CLUSTER=true).
        node: also start a node (node.py), so that Pods run; one per machine.
        """
        if use_existing is None:
            existing_kubeconfig = existing_kubeconfig or existing_cluster_kubeconfig()
            use_existing = existing_kubeconfig is not None
        elif use_existing and not existing_kubeconfig:
            existing_kubeconfig = existing_cluster_kubeconfig()
            if not existing_kubeconfig:
                raise ValueError("use_existing=True needs existing_kubeconfig or SPENDWARDEN_TEST_KUBECONFIG")
        self.existing = bool(use_existing)
        self._existing_kubeconfig = existing_kubeconfig
        self.crds = list(crds)
        self.binaries = binaries
        self.with_controller_manager = controller_manager
        self.with_node = node
        self.node: nodes.Node | None = None
        self.start_timeout = start_timeout or _env_float(
            ["SPENDWARDEN_CONTROL_PLANE_START_TIMEOUT", "KUBEBUILDER_CONTROLPLANE_START_TIMEOUT"], 60)
        self.stop_timeout = stop_timeout or _env_float(
            ["SPENDWARDEN_CONTROL_PLANE_STOP_TIMEOUT", "KUBEBUILDER_CONTROLPLANE_STOP_TIMEOUT"], 10)
        self.extra_apiserver_args = list(extra_apiserver_args)
        self.extra_controller_manager_args = list(extra_controller_manager_args)

        self.server: str = ""
        self.kubeconfig: Path | None = None
        self.ca_file: Path | None = None
        self.dir: Path | None = None
        self.etcd_dir: Path | None = None
        self.logs: dict[str, Path] = {}
        self.ports: dict[str, int] = {}
        self.timings: dict[str, float] = {}
        self.crd_names: list[str] = []
        self._procs: list[_Process] = []
        self._rest: _Rest | None = None
        self._started = False

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._started

    def start(self) -> ControlPlane:
        if self._started:
            return self
        t0 = time.monotonic()
        if self.existing:
            self._start_existing()
        else:
            if self.binaries is None:
                self.binaries = ensure_binaries()
            self.timings["binaries"] = time.monotonic() - t0
            atexit.register(self.stop)
            for attempt in range(3):
                try:
                    self._start_local()
                    break
                except _PortTaken as err:
                    # Another process grabbed a port between our probe and the bind: new ports, try again.
                    self._teardown()
                    if attempt == 2:
                        raise ControlPlaneError("ports kept being taken by other processes; gave up after 3 tries") from err
                except BaseException:
                    self._teardown()
                    raise
        self._started = True
        self.timings["total"] = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Stop kube-controller-manager, kube-apiserver, etcd (in that order), wait for them; clean up."""
        self._teardown()
        self._started = False
        try:
            atexit.unregister(self.stop)
        except Exception:  # noqa: BLE001  # pragma: no cover - interpreter shutting down
            pass

    def _teardown(self) -> None:
        if self.node is not None:
            self.node.stop(self.stop_timeout)
            self.node = None
        for p in reversed(self._procs):
            p.stop(self.stop_timeout)
        self._procs = []
        keep = os.environ.get("SPENDWARDEN_KEEP_CONTROL_PLANE_DIR") == "1"
        if self.etcd_dir:
            shutil.rmtree(self.etcd_dir, ignore_errors=True)  # may be on tmpfs: never keep it
            self.etcd_dir = None
        if self.dir and keep:
            (self.dir / _OWNER_FILE).unlink(missing_ok=True)  # kept on purpose: not for the sweeper
        elif self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None if not keep else self.dir

    # -- local processes ---------------------------------------------------------------------------

    def _start_local(self) -> None:
        assert self.binaries is not None
        t = time.monotonic()
        _sweep_stale_dirs()
        d = self.dir = _claim(Path(tempfile.mkdtemp(prefix="spendwarden-cp-")))
        # etcd 3.4 has no --unsafe-no-fsync; on tmpfs fsync is free, which makes writes (and start) faster.
        shm = Path("/dev/shm")
        base = shm if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > (1 << 30) else None
        self.etcd_dir = _claim(Path(tempfile.mkdtemp(prefix="spendwarden-etcd-", dir=base)))

        ca = certs.CA("spendwarden-local-ca")
        client_ca = certs.CA("spendwarden-local-client-ca")
        ca_crt, _ = ca.pair.write(d, "ca")
        self._ca = ca
        self._client_ca = client_ca
        hosts = ["localhost", "127.0.0.1"]
        if self.with_node:  # pods reach the apiserver at the node's address, through the kubernetes Service
            hosts += [nodes.NODE_IP, nodes.API_SERVICE_IP, "kubernetes", "kubernetes.default",
                      "kubernetes.default.svc", f"kubernetes.default.svc.{nodes.CLUSTER_DOMAIN}"]
        serving_crt, serving_key = ca.serving(hosts).write(d, "apiserver")
        client_ca_crt, _ = client_ca.pair.write(d, "client-ca")
        admin = client_ca.client("admin", ["system:masters"])
        admin_crt, admin_key = admin.write(d, "admin")
        kubelet_client_crt, kubelet_client_key = client_ca.client(
            "kube-apiserver-kubelet-client", ["system:masters"]).write(d, "apiserver-kubelet-client")
        sa_key, sa_pub = certs.write_signing_key(d, "sa")
        self.ca_file = ca_crt
        self.timings["certs"] = time.monotonic() - t

        etcd_port, peer_port, api_port = _free_port(), _free_port(), _free_port()
        self.ports = {"etcd": etcd_port, "etcd-peer": peer_port, "kube-apiserver": api_port}
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        self.server = f"https://127.0.0.1:{api_port}"
        self.logs = {n: d / f"{n}.log" for n in CONTROL_PLANE_BINARIES}
        env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG",)}

        etcd = _Process("etcd", [
            str(self.binaries["etcd"]),
            f"--data-dir={self.etcd_dir}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
            "--logger=zap", "--log-outputs=stderr",
        ], self.logs["etcd"])
        apiserver = _Process("kube-apiserver", [
            str(self.binaries["kube-apiserver"]),
            f"--etcd-servers={etcd_url}",
            # With a node, pods reach it at the node's address (the bridge); without, loopback only.
            f"--bind-address={'0.0.0.0' if self.with_node else '127.0.0.1'}", f"--secure-port={api_port}",
            *([f"--advertise-address={nodes.NODE_IP}"] if self.with_node else []),
            f"--cert-dir={d}",  # unused (explicit files below) but keeps it from writing /var/run/kubernetes
            f"--tls-cert-file={serving_crt}", f"--tls-private-key-file={serving_key}",
            f"--client-ca-file={client_ca_crt}",
            "--authorization-mode=Node,RBAC",
            f"--kubelet-client-certificate={kubelet_client_crt}", f"--kubelet-client-key={kubelet_client_key}",
            # exec, logs, port-forward: dial the kubelet at the node's IP (its name is in no DNS).
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            # Webhooks and aggregated APIs are called at their endpoints' addresses, not through the
            # Service IP: the apiserver does not depend on kube-proxy having programmed it.
            "--enable-aggregator-routing=true",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--allow-privileged=true",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--api-audiences={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={sa_pub}",
            f"--service-account-signing-key-file={sa_key}",
            # Webhooks are on by default; said explicitly because the operator depends on them.
            "--enable-admission-plugins=MutatingAdmissionWebhook,ValidatingAdmissionWebhook,NodeRestriction",
            # Without a node, ServiceAccount admission is off, as in envtest: Pods would get token volumes
            # that no kubelet mounts. With one, Pods get their projected tokens as in any cluster.
            *([] if self.with_node else ["--disable-admission-plugins=ServiceAccount"]),
            "--profiling=false",
            *self.extra_apiserver_args,
        ], self.logs["kube-apiserver"])
        self._procs = [etcd]
        etcd.start(env)
        # The apiserver is started right away, not after etcd is healthy: it retries its etcd connection,
        # and its own start (~2-3 s) dominates, so this saves etcd's start time.
        self._procs.append(apiserver)
        apiserver.start(env)

        self._rest = _Rest(self.server, str(ca_crt), str(admin_crt), str(admin_key))
        t = time.monotonic()
        self._wait("kube-apiserver /readyz", self._apiserver_ready, watch=[etcd, apiserver])
        self.timings["apiserver"] = time.monotonic() - t

        self.kubeconfig = d / "kubeconfig"
        _write_private(self.kubeconfig, yaml.safe_dump(_kubeconfig_doc(
            self.server, ca.pair.cert_pem, admin.cert_pem, admin.key_pem, "spendwarden-local", "admin")))

        if self.crds:
            t = time.monotonic()
            self.install_crds(self.crds)
            self.timings["crds"] = time.monotonic() - t

        if self.with_controller_manager:
            kcm_kubeconfig = self.client_kubeconfig("kube-controller-manager", "system:kube-controller-manager",
                                                    ["system:masters"])
            controller_manager = _Process("kube-controller-manager", [
                str(self.binaries["kube-controller-manager"]),
                f"--kubeconfig={kcm_kubeconfig}",
                f"--service-account-private-key-file={sa_key}",  # token controller signs legacy SA secrets
                f"--root-ca-file={ca_crt}",  # published as the kube-root-ca.crt ConfigMap and in SA secrets
                "--leader-elect=false",
                "--secure-port=0",  # no serving: nothing scrapes it, and no ports to collide
                # false: all controllers act with this process's credentials (system:masters). True would
                # make each controller wait for its own SA token first, adding seconds to the start.
                "--use-service-account-credentials=false",
                "--controllers=" + ",".join(["*", *(() if self.with_node else
                                                   ("-" + c for c in NODELESS_DISABLED_CONTROLLERS))]),
                # the node gets its pod CIDR (10.244.0.0/24, the CNI bridge's subnet) from node-ipam
                "--allocate-node-cidrs=true", f"--cluster-cidr={nodes.CLUSTER_CIDR}", "--node-cidr-mask-size=24",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                # csrsigning signs with the client CA (kubelets' client CSRs, kubectl certificate approve)
                f"--cluster-signing-cert-file={client_ca_crt}", f"--cluster-signing-key-file={d / 'client-ca.key'}",
                # tests create many objects at once; the default 20 qps throttles ReplicaSet/GC work
                "--kube-api-qps=100", "--kube-api-burst=200",
                "--profiling=false",
                *self.extra_controller_manager_args,
            ], self.logs["kube-controller-manager"])
            self._procs.append(controller_manager)
            t = time.monotonic()
            controller_manager.start(env)
            # The serviceaccount controller making the 'default' SA shows the controllers are running.
            self._wait("kube-controller-manager (ServiceAccount default/default)",
                       lambda: self._get("/api/v1/namespaces/default/serviceaccounts/default") == 200,
                       watch=self._procs)
            self.timings["controller-manager"] = time.monotonic() - t

        scheduler = _Process("kube-scheduler", [
            str(self.binaries["kube-scheduler"]),
            f"--kubeconfig={self.client_kubeconfig('kube-scheduler', 'system:kube-scheduler')}",
            "--leader-elect=false", "--secure-port=0", "--profiling=false",
            "--kube-api-qps=100", "--kube-api-burst=200",
        ], self.logs["kube-scheduler"])
        self._procs.append(scheduler)
        scheduler.start(env)

        if self.with_node:
            self.node = nodes.Node(self.binaries, _Process, _free_port, start_timeout=max(self.start_timeout, 120))
            self.node.start(self, env)
            self.timings.update({f"node-{k}": v for k, v in self.node.timings.items()})

    # -- certificates and kubeconfigs for more clients (the node's components, tests) -------------

    def client_kubeconfig(self, stem: str, user: str, groups: Sequence[str] = ()) -> Path:
        """A kubeconfig for this cluster whose client certificate names user and groups."""
        assert self.dir is not None
        pair = self._client_ca.client(user, list(groups))
        path = self.dir / f"{stem}.kubeconfig"
        _write_private(path, yaml.safe_dump(_kubeconfig_doc(self.server, self._ca.pair.cert_pem, pair.cert_pem,
                                                            pair.key_pem, "spendwarden-local", user)))
        return path

    def issue_serving(self, stem: str, hosts: list[str]) -> tuple[Path, Path]:
        """A serving certificate signed by the cluster CA (the kubelet's, so the apiserver can verify it)."""
        assert self.dir is not None
        return self._ca.serving(hosts).write(self.dir, stem)

    def apply(self, doc: dict) -> Any:
        """Server-side apply one object as admin; returns the object."""
        api = doc["apiVersion"]
        base = f"/api/{api}" if "/" not in api else f"/apis/{api}"
        plural = doc["kind"].lower() + "s"  # right for the kinds applied here (Service, EndpointSlice)
        ns = doc["metadata"].get("namespace")
        path = f"{base}/namespaces/{ns}/{plural}" if ns else f"{base}/{plural}"
        status, body = self.request("PATCH", f"{path}/{doc['metadata']['name']}?fieldManager=spendwarden-localcluster"
                                    "&force=true", doc, content_type="application/apply-patch+yaml")
        if status >= 300:
            raise ControlPlaneError(f"applying {doc['kind']} {doc['metadata']['name']} failed ({status}): {body}")
        return body

    def check(self) -> None:
        """Raise ControlPlaneError (with the tail of its log) if one of the processes has exited."""
        for p in self._procs + (self.node.procs if self.node else []):
            if p.exited:
                raise ControlPlaneError(f"{p.name} exited with code {p.popen.returncode}; "
                                        f"last lines of its log:\n{_tail(p.log)}")

    def _get(self, path: str) -> int:
        assert self._rest is not None
        try:
            status, _ = self._rest.request("GET", path, timeout=2)
            return status
        except (OSError, http.client.HTTPException):
            return 0

    def _apiserver_ready(self) -> bool:
        return self._get("/readyz") == 200

    def _wait(self, what: str, check: Any, watch: list[_Process]) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            for p in watch:
                if p.exited:
                    log = _tail(p.log)
                    if "address already in use" in log:
                        raise _PortTaken(p.name)
                    raise ControlPlaneError(f"{p.name} exited with code {p.returncode} while waiting for "
                                            f"{what}; last lines of {p.log}:\n{log}")
            if check():
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name} ({p.log}):\n{_tail(p.log, 15)}" for p in watch)
                raise ControlPlaneError(f"timed out after {self.start_timeout:.0f}s waiting for {what}\n{logs}")
            time.sleep(0.05)

    # -- existing cluster --------------------------------------------------------------------------

    def _start_existing(self) -> None:
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=self._existing_kubeconfig, client_configuration=cfg)
        self._kubeconfig_env = str(self._existing_kubeconfig)
        if os.pathsep in self._kubeconfig_env:
            # KUBECONFIG=a:b: one self-contained file, so that `.kubeconfig` is a single path for everyone
            self.dir = Path(tempfile.mkdtemp(prefix="spendwarden-cp-"))
            self.kubeconfig = self.dir / "kubeconfig"
            _write_private(self.kubeconfig, self.kubectl("config", "view", "--flatten", "--raw").stdout)
        else:
            self.kubeconfig = Path(self._kubeconfig_env)
        self.server = cfg.host
        self._rest = _Rest(cfg.host, cfg.ssl_ca_cert, cfg.cert_file, cfg.key_file, verify=cfg.verify_ssl,
                           token=lambda: cfg.get_api_key_with_prefix("authorization"))
        status = self._get("/version")
        if status != 200:
            raise ControlPlaneError(f"existing cluster {self.server} (kubeconfig {self._existing_kubeconfig}) "
                                    f"did not answer GET /version (status {status})")
        if self.crds:
            self.install_crds(self.crds)

    # -- using it ----------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """os.environ with KUBECONFIG pointing at this cluster (for kubectl, the operator, subprocesses)."""
        env = dict(os.environ)
        env["KUBECONFIG"] = getattr(self, "_kubeconfig_env", None) or str(self.kubeconfig)
        # never send apiserver or webhook traffic through a proxy
        no_proxy = ",".join(x for x in (env.get("NO_PROXY") or env.get("no_proxy"), "127.0.0.1,localhost") if x)
        env["NO_PROXY"] = env["no_proxy"] = no_proxy
        return env

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster; raises CalledProcessError (with stderr in it) when check fails."""
        exe = (os.environ.get("SPENDWARDEN_KUBECTL") or (self.binaries or {}).get("kubectl")  # the server's release
               or shutil.which("kubectl") or "/usr/bin/kubectl")
        res = subprocess.run([exe, *args], input=input, capture_output=True, text=True, env=self.env(),
                             timeout=timeout)
        if check and res.returncode != 0:
            raise subprocess.CalledProcessError(res.returncode, res.args, res.stdout,
                                                f"{res.stderr}") from None
        return res

    def api_client(self) -> Any:
        """A configured synchronous kubernetes.client.ApiClient."""
        from kubernetes import client, config

        cfg = client.Configuration()
        if self.existing:
            config.load_kube_config(config_file=self._existing_kubeconfig, client_configuration=cfg)
        else:
            assert self.dir is not None, "the control plane is not running"
            cfg.host = self.server
            cfg.ssl_ca_cert = str(self.ca_file)
            cfg.cert_file, cfg.key_file = str(self.dir / "admin.crt"), str(self.dir / "admin.key")
        return client.ApiClient(cfg)

    def request(self, method: str, path: str, body: Any = None,
                content_type: str = "application/json") -> tuple[int, Any]:
        """A raw API request as admin: (status, decoded JSON body)."""
        assert self._rest is not None, "the control plane is not running"
        return self._rest.request(method, path, body, content_type)

    def install_crds(self, paths: Iterable[str | os.PathLike], timeout: float = 20) -> list[str]:
        """Server-side apply the CRDs in these files/dirs and wait until they are served (discovery).

        CRDs installed after kube-controller-manager started are seen by its garbage collector only after
        its discovery resync (30 s); pass `crds=` to the constructor to install them before it starts.
        """
        docs = load_crd_documents(paths)
        for doc in docs:
            name = doc["metadata"]["name"]
            status, body = self.request(
                "PATCH", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
                         "?fieldManager=spendwarden-localcluster&force=true",
                doc, content_type="application/apply-patch+yaml")
            if status >= 300:
                msg = body.get("message") if isinstance(body, dict) else body
                raise ControlPlaneError(f"installing CRD {name} failed ({status}): {msg}")
            if name not in self.crd_names:
                self.crd_names.append(name)
        # Served = the group/version discovery lists the plural, as envtest's InstallCRDs polls.
        wanted = {(d["spec"]["group"], v["name"], d["spec"]["names"]["plural"])
                  for d in docs for v in d["spec"]["versions"] if v.get("served", True)}
        deadline = time.monotonic() + timeout
        while wanted:
            for group, version, plural in sorted(wanted):
                status, body = self.request("GET", f"/apis/{group}/{version}")
                if status == 200 and any(r.get("name") == plural for r in body.get("resources", [])):
                    wanted.discard((group, version, plural))
            if not wanted:
                break
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"CRDs not served after {timeout:.0f}s: {sorted(wanted)}")
            time.sleep(0.1)
        return [d["metadata"]["name"] for d in docs]

    def __repr__(self) -> str:
        kind = "existing" if self.existing else "local"
        return f"<ControlPlane {kind} {self.server or '(not started)'}>"


class _PortTaken(ControlPlaneError):
    pass
