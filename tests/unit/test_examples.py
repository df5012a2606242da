"""examples/ is a policy repo users copy: what kustomize builds from it must be valid and priced."""
from __future__ import annotations

import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from spendwarden.render.proxyconfig import load_manifests, render_proxy_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
KUBECTL = shutil.which("kubectl")


@pytest.fixture(scope="module")
def built() -> str:
    # scripts/setup.sh installs kubectl; its built-in kustomize is what `kubectl apply -k` uses.
    assert KUBECTL, "kubectl is needed to build examples/ with kustomize (scripts/setup.sh installs it)"
    return subprocess.run([KUBECTL, "kustomize", str(EXAMPLES)], capture_output=True, text=True, check=True).stdout


def test_every_team_renders_without_problems(built):
    routes, budgets = load_manifests(built)
    by_ns = defaultdict(lambda: ([], []))
    for r in routes:
        by_ns[r["metadata"]["namespace"]][0].append(r)
    for b in budgets:
        by_ns[b["metadata"]["namespace"]][1].append(b)
    teams = sorted(p.name for p in (EXAMPLES / "teams").iterdir() if p.is_dir())
    assert sorted(by_ns) == [f"team-{t}" for t in teams]
    for ns, (rs, bs) in by_ns.items():
        assert rs and bs, f"{ns} needs a ModelRoute and a TokenBudget"
        assert render_proxy_config(ns, rs, bs).problems == [], ns


def test_shared_price_list_fills_every_paid_backend_and_is_never_applied(built):
    docs = [d for d in yaml.safe_load_all(built) if d]
    assert not [d for d in docs if d["kind"] == "ConfigMap"], "the price list is local-config: never applied"
    prices = yaml.safe_load((EXAMPLES / "shared" / "prices.yaml").read_text())["data"]
    for route in (d for d in docs if d["kind"] == "ModelRoute"):
        for backend in route["spec"]["backends"]:
            if backend["provider"] == "OpenAICompatible":
                continue  # in-cluster models are priced per team
            for field in ("input", "output", "cachedInput"):
                assert backend["pricing"][field] == prices[f"{backend['model']}.{field}"], (backend["name"], field)
            for field in ("cacheWrite", "cacheWrite1h"):  # optional: listed only where the provider bills cache writes
                listed = prices.get(f"{backend['model']}.{field}")
                assert backend["pricing"].get(field) == listed, (backend["name"], field)


def test_sample_app_is_selected_for_injection_and_sets_no_base_url_itself():
    from spendwarden.render.injection import InjectionSettings, decide

    out = subprocess.run([KUBECTL, "kustomize", str(EXAMPLES / "sample-app")], capture_output=True, text=True, check=True).stdout
    deployment = next(d for d in yaml.safe_load_all(out) if d and d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]
    assert decide(pod, "team-support", {"spendwarden.io/inject": "true"}, InjectionSettings(image="x")).inject
    env = {e["name"] for c in pod["spec"]["containers"] for e in c.get("env", [])}
    assert "OPENAI_BASE_URL" not in env  # the sidecar injection sets it
    app = next(d for d in yaml.safe_load_all(out) if d and d["kind"] == "ConfigMap")
    compile(app["data"]["app.py"], "app.py", "exec")
