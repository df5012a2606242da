"""`spendwarden gateway` as a real subprocess on 127.0.0.1: a config directory of tenant files
(<namespace>.json) and a secrets directory of <namespace>_<secret>_<key> files, as the operator
writes them into the gateway's ConfigMap and Secret."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from spendwarden.devtools.mock_upstream import free_port

from ..proxy.conftest import PYTHON, ProxyProcess


class GatewayProcess(ProxyProcess):
    def __init__(self, workdir: Path, kubeconfig: str, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None):
        super().__init__(workdir / "tenants", workdir, env=env, extra_args=extra_args)
        self.kubeconfig = kubeconfig
        self.config_dir = workdir / "tenants"
        self.secrets_dir = workdir / "gateway-secrets"
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.secrets_dir.mkdir(parents=True, exist_ok=True)
        self.err_path = workdir / "gateway.err"

    def serve(self, namespace: str, config: dict[str, Any]) -> None:
        """Write a tenant's file atomically (as the kubelet swaps a ConfigMap volume's files)."""
        tmp = self.config_dir / f".{namespace}.tmp"
        tmp.write_text(json.dumps({**config, "namespace": namespace}))
        os.replace(tmp, self.config_dir / f"{namespace}.json")

    def unserve(self, namespace: str) -> None:
        (self.config_dir / f"{namespace}.json").unlink()

    def key(self, namespace: str, secret: str, key: str, value: str) -> None:
        (self.secrets_dir / f"{namespace}_{secret}_{key}").write_text(value)

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        self.port, self.metrics_port = free_port(), free_port()
        args = [PYTHON, "-m", "spendwarden.cli", "gateway", "--config-dir", str(self.config_dir),
                "--secrets-dir", str(self.secrets_dir), "--kubeconfig", self.kubeconfig, "--host", "127.0.0.1",
                "--port", str(self.port), "--metrics-port", str(self.metrics_port), "--metrics-host", "127.0.0.1",
                *self.extra_args]
        self.proc = subprocess.Popen(args, stdout=open(self.log_path, "ab"), stderr=open(self.err_path, "ab"),
                                     env={**os.environ, **self.env}, cwd=self.workdir)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}: {self.err_path.read_text()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.metrics_port}/healthz", timeout=0.5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("gateway did not start: " + self.err_path.read_text())

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and \
            httpx.get(f"http://127.0.0.1:{self.metrics_port}/healthz", timeout=2).status_code == 200
