"""`spendwarden demo`: the main job on the embedded default.

Starts the local control plane, installs the CRDs, runs the operator as a real process, applies the
GitOps examples (plus one deliberately broken route), and shows what a user would look at:
`kubectl get tb,mr -A`, the rendered proxy configuration and the Warning Event of the bad object.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BROKEN_ROUTE = """
apiVersion: spendwarden.io/v1alpha1
kind: ModelRoute
metadata: {name: typo, namespace: team-support}
spec:
  model: summarize
  backends:
    - {name: mini, provider: OpenAI, url: "https://api.openai.com/v1", model: gpt-4o-mini,
       pricing: {input: "0.15", output: "0.60"}}
  defaultBackend: minni
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--examples", default=str(ROOT / "examples"), help="Kustomize folder to apply. Default examples/.")
    parser.add_argument("--keep", action="store_true", help="Keep the cluster and operator running until Ctrl-C.")


def step(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace) -> int:
    import httpx

    from .localcluster.controlplane import ControlPlane

    started = time.monotonic()
    step("Starting the local control plane (etcd + kube-apiserver + kube-controller-manager)")
    with ControlPlane(crds=sorted((ROOT / "crds").glob("*.yaml"))) as cp:
        kubeconfig = str(cp.kubeconfig)
        env = {**os.environ, "KUBECONFIG": kubeconfig}
        kubectl = lambda *a, **kw: subprocess.run(["kubectl", *a], env=env, text=True, check=True, **kw)
        print(f"control plane up in {time.monotonic() - started:.1f}s; export KUBECONFIG={kubeconfig}")

        step("Starting the operator")
        port = _free_port()
        log_path = Path(tempfile.mkdtemp(prefix="spendwarden-demo-")) / "operator.log"
        with open(log_path, "wb") as log:
            operator = subprocess.Popen([sys.executable, "-m", "spendwarden.cli", "operator",
                                         "--liveness", f"http://127.0.0.1:{port}/healthz"],
                                        env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                for _ in range(150):
                    try:
                        if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                            break
                    except httpx.HTTPError:
                        time.sleep(0.2)
                else:
                    raise SystemExit(f"operator did not become live; log: {log_path}")
                print(f"operator live on :{port}/healthz (JSON log: {log_path})")

                step(f"Applying the GitOps examples: kubectl apply -k {args.examples}")
                kubectl("apply", "-k", args.examples)
                step("...and a ModelRoute with a typo (defaultBackend: minni)")
                kubectl("apply", "-f", "-", input=BROKEN_ROUTE)

                step("Waiting for the operator to render every namespace")
                _wait_rendered(kubectl, ["team-support", "team-research"])

                step("kubectl get tb,mr -A")
                kubectl("get", "tb,mr", "-A")

                step("The rendered proxy configuration of team-research (ConfigMap spendwarden-proxy)")
                raw = kubectl("get", "configmap", "spendwarden-proxy", "-n", "team-research",
                              "-o", "jsonpath={.data.config\\.json}", capture_output=True).stdout
                print(json.dumps(json.loads(raw), indent=2)[:2500])

                step("Why the typo route is not served: its condition and Event")
                kubectl("get", "mr", "typo", "-n", "team-support",
                        "-o", "jsonpath={range .status.conditions[*]}{.type}={.status} {.reason}: {.message}{\"\\n\"}{end}")
                kubectl("get", "events", "-n", "team-support", "--field-selector", "type=Warning",
                        "-o", "custom-columns=OBJECT:.involvedObject.name,REASON:.reason,MESSAGE:.message")
                step(f"Done in {time.monotonic() - started:.0f}s")
                if args.keep:
                    print(f"Cluster and operator keep running. export KUBECONFIG={kubeconfig}  (Ctrl-C to stop)")
                    try:
                        operator.wait()
                    except KeyboardInterrupt:
                        pass
            finally:
                operator.terminate()
                try:
                    operator.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    operator.kill()
    return 0


def _wait_rendered(kubectl, namespaces: list[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = kubectl("get", "tb,mr", "-A", "-o", "json", capture_output=True).stdout
        items = json.loads(out)["items"]
        if items and all(i.get("status", {}).get("conditions") for i in items):
            return
        time.sleep(0.5)
    raise SystemExit("the operator did not set conditions on every object in time")
