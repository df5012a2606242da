"""examples/ is a policy repo users copy: every object in it must be valid."""
from __future__ import annotations

from pathlib import Path

from spendwarden.render.proxyconfig import load_manifests, render_proxy_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_every_team_folder_renders_without_problems():
    teams = sorted(p for p in (EXAMPLES / "teams").iterdir() if p.is_dir())
    assert len(teams) >= 2
    for team in teams:
        text = "\n---\n".join(p.read_text() for p in sorted(team.glob("*.yaml")) if p.name != "kustomization.yaml")
        routes, budgets = load_manifests(text)
        assert routes and budgets, f"{team.name} needs a ModelRoute and a TokenBudget"
        namespaces = {o["metadata"]["namespace"] for o in routes + budgets}
        assert len(namespaces) == 1, f"{team.name}: one namespace per team folder"
        result = render_proxy_config(namespaces.pop(), routes, budgets)
        assert result.problems == [], f"{team.name}: {result.problems}"
