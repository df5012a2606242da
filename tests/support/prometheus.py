"""A real Prometheus (Debian's binary) scraping the processes under test, and its query API."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from spendwarden.devtools.mock_upstream import free_port

SCRAPE = "1s"
DEBIAN_PROMETHEUS = "/usr/bin/prometheus"  # where apt-get install prometheus puts it


def prometheus_binary() -> str:
    if os.environ.get("SPENDWARDEN_SKIP_PROMETHEUS") == "1":
        pytest.skip("SPENDWARDEN_SKIP_PROMETHEUS=1")
    for candidate in (os.environ.get("SPENDWARDEN_PROMETHEUS"), shutil.which("prometheus"), DEBIAN_PROMETHEUS):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("prometheus not found (PATH, /usr/bin/prometheus, $SPENDWARDEN_PROMETHEUS): run scripts/setup.sh "
                "(apt-get install prometheus), or set SPENDWARDEN_SKIP_PROMETHEUS=1 to skip on purpose", pytrace=False)


class Prometheus:
    def __init__(self, binary: str, workdir: Path, targets: dict[str, str], rule_groups: list[dict],
                 target_labels: dict[str, dict[str, str]] | None = None):
        """targets: job -> host:port; target_labels: job -> labels Kubernetes SD would add (namespace)."""
        self.binary, self.workdir = binary, workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {"global": {"scrape_interval": SCRAPE, "scrape_timeout": SCRAPE, "evaluation_interval": SCRAPE},
                  "rule_files": [str(workdir / "rules.yml")],
                  "scrape_configs": [{"job_name": job, "honor_labels": True,  # as the ServiceMonitor
                                      "static_configs": [{"targets": [target],
                                                          "labels": (target_labels or {}).get(job, {})}]}
                                     for job, target in targets.items()]}
        (workdir / "rules.yml").write_text(yaml.safe_dump({"groups": rule_groups}, sort_keys=False))
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.log = workdir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Prometheus:
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--storage.tsdb.retention.time=1h", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"), cwd=self.workdir)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}: {self.log.read_text()}")
            try:
                if httpx.get(self.url + "/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("prometheus did not become ready: " + self.log.read_text())

    def __exit__(self, *exc: Any) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def api(self, path: str, **params: Any) -> dict:
        r = httpx.get(self.url + "/api/v1/" + path, params=params, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (path, params, r.status_code, body)
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def wait_for(self, expr: str, what: str, timeout: float = 30) -> list[dict]:
        deadline = time.time() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.time() > deadline:
                raise AssertionError(f"timed out waiting for {what} ({expr})\n{self.log.read_text()[-2000:]}")
            time.sleep(0.25)
