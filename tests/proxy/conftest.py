"""End-to-end fixtures: `spendwarden proxy` as a real subprocess on 127.0.0.1, the mock upstream in
a thread of the test process, and the official SDKs as clients."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from spendwarden.devtools.mock_upstream import MockUpstream, free_port

PYTHON = sys.executable


class ProxyProcess:
    def __init__(self, config: Path, workdir: Path, env: dict[str, str] | None = None,
                 state_file: Path | None = None, extra_args: list[str] | None = None):
        self.config = config
        self.workdir = workdir
        self.env = env or {}
        self.state_file = state_file
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen | None = None
        self.port = self.metrics_port = 0
        self.log_path = workdir / "access.log"
        self.err_path = workdir / "proxy.err"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_url(self) -> str:
        return self.url + "/v1"

    def start(self, timeout: float = 20.0) -> ProxyProcess:
        self.port, self.metrics_port = free_port(), free_port()
        args = [PYTHON, "-m", "spendwarden.cli", "proxy", "--config", str(self.config), "--port", str(self.port),
                "--metrics-port", str(self.metrics_port), "--metrics-host", "127.0.0.1", *self.extra_args]
        if self.state_file:
            args += ["--state-file", str(self.state_file)]
        env = {**os.environ, "SPENDWARDEN_SECRETS_DIR": str(self.workdir / "secrets"), **self.env}
        self.proc = subprocess.Popen(args, stdout=open(self.log_path, "ab"), stderr=open(self.err_path, "ab"),
                                     env=env, cwd=self.workdir)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.proc.returncode}: {self.err_path.read_text()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=0.5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("proxy did not start: " + self.err_path.read_text())

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        code = self.proc.returncode
        self.proc = None
        return code

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and \
            httpx.get(self.url + "/healthz", timeout=2).status_code == 200

    def log(self, wait_for: int = 0, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Access log lines so far (waits until at least `wait_for` exist)."""
        deadline = time.time() + timeout
        while True:
            lines = [json.loads(x) for x in self.log_path.read_text().splitlines() if x.strip()]
            if len(lines) >= wait_for or time.time() > deadline:
                return lines
            time.sleep(0.05)

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text

    def stderr(self) -> str:
        return self.err_path.read_text()


@pytest.fixture
def up() -> Iterator[MockUpstream]:
    """The mock upstream, answering 12 output tokens unless told otherwise."""
    with MockUpstream(tokens=12) as u:
        yield u


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Any]:
    started: list[ProxyProcess] = []

    def start(config_text: str, name: str = "config.yaml", **kwargs: Any) -> ProxyProcess:
        path = tmp_path / name
        path.write_text(config_text)
        p = ProxyProcess(path, tmp_path, **kwargs).start()
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def route_yaml(name: str, alias: str, backends: list[dict[str, Any]], default: str | None = None,
               namespace: str = "team-a", **spec: Any) -> str:
    import yaml

    doc = {"apiVersion": "spendwarden.io/v1alpha1", "kind": "ModelRoute",
           "metadata": {"name": name, "namespace": namespace},
           "spec": {"model": alias, "backends": backends, "defaultBackend": default or backends[0]["name"], **spec}}
    return yaml.safe_dump(doc, sort_keys=False)


def budget_yaml(name: str, namespace: str = "team-a", **spec: Any) -> str:
    import yaml

    spec.setdefault("period", {"type": "Daily"})
    doc = {"apiVersion": "spendwarden.io/v1alpha1", "kind": "TokenBudget",
           "metadata": {"name": name, "namespace": namespace}, "spec": spec}
    return yaml.safe_dump(doc, sort_keys=False)


def backend(name: str, url: str, model: str = "gpt-4o-mini", provider: str = "OpenAI",
            price_in: str = "0.15", price_out: str = "0.60", **extra: Any) -> dict[str, Any]:
    return {"name": name, "provider": provider, "url": url, "model": model,
            "pricing": {"input": price_in, "output": price_out}, **extra}


def stream_of(*docs: str) -> str:
    return "---\n".join(docs)
