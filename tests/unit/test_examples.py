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


def test_cloud_backends_take_catalog_prices_and_no_price_is_copied_by_kustomize(built):
    """The catalog prices OpenAI and Anthropic models, so examples/ copies no prices around; in-cluster
    models, which the catalog cannot know, carry their own."""
    from spendwarden.prices import catalog

    docs = [d for d in yaml.safe_load_all(built) if d]
    assert not [d for d in docs if d["kind"] == "ConfigMap"]
    for kustomization in EXAMPLES.rglob("kustomization.yaml"):
        assert "replacements" not in yaml.safe_load(kustomization.read_text()), kustomization
    routes = [d for d in docs if d["kind"] == "ModelRoute"]
    for route in routes:
        result = render_proxy_config(route["metadata"]["namespace"], [route], [])
        for backend, shown in zip(route["spec"]["backends"], result.prices[route["metadata"]["name"]]):
            if backend["provider"] == "OpenAICompatible":
                assert "pricing" in backend and shown["source"] == "route", backend["name"]
            else:
                assert "pricing" not in backend and shown["source"] == catalog.source(), backend["name"]


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
