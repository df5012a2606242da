"""`spendwarden local-cluster`: run a local Kubernetes cluster (control plane and a node) until Ctrl-C.

    spendwarden local-cluster --kubeconfig-out /tmp/spendwarden.kubeconfig
    spendwarden local-cluster --print-binaries      # only obtain the binaries (CI set-up), print their dir
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

from ..localcluster.controlplane import REPO_ROOT, BinariesUnavailable, ControlPlane, ControlPlaneError, ensure_binaries


def default_crd_dirs() -> list[str]:
    for d in (Path.cwd() / "crds", REPO_ROOT / "crds"):
        if d.is_dir():
            return [str(d)]
    return []


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--crds", action="append", default=None, metavar="PATH",
                        help="CRD file or directory to install (repeatable). Default: ./crds or the repo's crds/.")
    parser.add_argument("--no-crds", action="store_true", help="Install no CRDs.")
    parser.add_argument("--kubeconfig-out", metavar="PATH",
                        help="Also write the admin kubeconfig here (mode 0600; it holds a client key).")
    parser.add_argument("--print-binaries", action="store_true",
                        help="Only find or build the cluster's binaries, print their paths, exit.")
    parser.add_argument("--load-image", action="append", default=[], metavar="ARCHIVE",
                        help="Import an OCI/docker image archive into the node (repeatable), e.g. the one "
                             "scripts/build-image.sh prints: no registry is reachable, so pods run only these.")
    parser.add_argument("--no-node", action="store_true",
                        help="Only the control plane: no kubelet, Pods stay Pending (needs no root).")
    parser.add_argument("--no-build", action="store_true",
                        help="Fail instead of building the binaries when they are missing.")


def run(args: argparse.Namespace) -> int:
    try:
        binaries = ensure_binaries(build=not args.no_build)
    except BinariesUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_binaries:
        for name, path in binaries.items():
            print(f"{name}={path}")
        print(Path(binaries["kube-apiserver"]).parent)  # last line: the directory, like the build script
        return 0

    crds = [] if args.no_crds else (args.crds or default_crd_dirs())
    stop = threading.Event()
    # Handlers before start: a Ctrl-C during the start still tears everything down (via the finally).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    cp = ControlPlane(crds=crds, binaries=binaries, use_existing=False, node=not args.no_node)
    try:
        try:
            cp.start()
        except ControlPlaneError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        for archive in args.load_image:
            if cp.node is None:
                print("error: --load-image needs the node (drop --no-node)", file=sys.stderr)
                return 2
            cp.node.import_image(Path(archive).expanduser())
            print(f"imported {archive} into the node")
        kubeconfig = cp.kubeconfig
        assert kubeconfig is not None  # set by start()
        if args.kubeconfig_out:
            out = Path(args.kubeconfig_out).expanduser().resolve()
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(kubeconfig, out)
            os.chmod(out, 0o600)
            kubeconfig = out
        print(f"cluster ready in {cp.timings['total']:.1f}s at {cp.server}"
              + (f" (node {cp.node.timings['total']:.1f}s)" if cp.node else ""))
        if cp.crd_names:
            print(f"CRDs: {', '.join(cp.crd_names)}")
        print(f"logs: {cp.dir}")
        print(f"kubeconfig: {kubeconfig}")
        print(f"export KUBECONFIG={kubeconfig}")
        print("Ctrl-C to stop.", flush=True)
        while not stop.wait(1.0):
            try:
                cp.check()
            except ControlPlaneError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
        print("stopping", file=sys.stderr)
        return 0
    finally:
        cp.stop()
