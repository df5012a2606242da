import json

import pytest

from spendwarden.proxy.config import ANTHROPIC, ConfigError, compile_config, parse_config_text, read_secret
from spendwarden.proxy.server import parse_tags
from spendwarden.routing.rules import select_backend

MANIFESTS = """
apiVersion: spendwarden.io/v1alpha1
kind: ModelRoute
metadata: {name: chat, namespace: team-a}
spec:
  model: chat
  defaultBackend: oa
  fallbacks: [an]
  rules:
  - {name: gold, match: {headers: [{name: X-Tier, value: gold}]}, backend: an}
  - {match: {minPromptTokens: 100}, backend: an}
  backends:
  - name: oa
    provider: OpenAI
    url: https://api.openai.com/v1/
    model: gpt-4o-mini
    pricing: {input: "0.15", output: "0.60"}
    credentials: {secretRef: {name: openai-key, key: apiKey}}
  - name: an
    provider: Anthropic
    url: https://api.anthropic.com
    model: claude-haiku
    pricing: {input: "1", output: "5"}
    credentials: {secretRef: {name: anthropic, key: key}}
---
apiVersion: spendwarden.io/v1alpha1
kind: TokenBudget
metadata: {name: b, namespace: team-a}
spec:
  window: 24h
  routes: [chat]
  limits: {tokens: {total: 1000}}
---
apiVersion: spendwarden.io/v1alpha1
kind: TokenBudget
metadata: {name: broken, namespace: team-a}
spec: {limits: {}}
"""


def test_manifest_stream_is_rendered_with_warnings(tmp_path, monkeypatch):
    (tmp_path / "openai-key").mkdir()
    (tmp_path / "openai-key" / "apiKey").write_text("sk-file\n")
    monkeypatch.setenv("SPENDWARDEN_SECRETS_DIR", str(tmp_path))
    monkeypatch.setenv("SPENDWARDEN_SECRET_ANTHROPIC_KEY", "sk-ant-env")
    cfg, warnings = parse_config_text(MANIFESTS)
    assert cfg.namespace == "team-a" and len(cfg.routes) == 1 and [b.name for b in cfg.budgets] == ["b"]
    assert len(warnings) == 1 and "broken" in warnings[0]
    c = compile_config(cfg)
    route = c.routes["chat"]
    oa, an = route.backends["oa"], route.backends["an"]
    assert oa.headers == {"Authorization": "Bearer sk-file"}
    assert an.headers == {"x-api-key": "sk-ant-env"} and an.fmt == ANTHROPIC
    assert str(oa.url("chat/completions")) == "https://api.openai.com/v1/chat/completions"
    assert str(an.url("messages")) == "https://api.anthropic.com/v1/messages"
    assert route.needs_estimate and [b.name for b in route.budgets] == ["b"]
    assert route.downgrade is oa  # cheapest
    assert json.loads(c.models_body)["data"][0]["id"] == "chat"
    # rules: headers, then prompt size, then the default
    assert select_backend(route, {"x-tier": "gold"}, 5, False)[0] is an
    assert select_backend(route, {}, 150, False)[0] is an
    assert select_backend(route, {}, 5, False)[0] is oa


def test_proxyconfig_json_and_errors():
    doc = {"namespace": "ns", "routes": [], "budgets": []}
    cfg, warnings = parse_config_text(json.dumps(doc))
    assert cfg.namespace == "ns" and not warnings
    with pytest.raises(ConfigError, match="invalid ProxyConfig"):
        parse_config_text(json.dumps({"namespace": "ns", "routes": [{"name": "x"}]}))
    with pytest.raises(ConfigError):
        parse_config_text("{not json")
    with pytest.raises(ConfigError, match="no ProxyConfig"):
        parse_config_text("kind: ConfigMap\n")


def test_missing_secret_is_flagged(monkeypatch, tmp_path):
    monkeypatch.setenv("SPENDWARDEN_SECRETS_DIR", str(tmp_path))
    monkeypatch.delenv("SPENDWARDEN_SECRET_OPENAI_KEY_APIKEY", raising=False)
    assert read_secret("openai-key", "apiKey") is None
    monkeypatch.setenv("SPENDWARDEN_SECRET_OPENAI_KEY_APIKEY", "k")
    assert read_secret("openai-key", "apiKey") == "k"


def test_a_secret_path_outside_the_secrets_directory_is_refused(monkeypatch, tmp_path, caplog):
    """`name: /some/other/dir` made the proxy send that file's content as the Bearer key: whatever the
    name and key (the model refuses such names, an older config may not), only files under the
    secrets directory are read, symlinks resolved (the kubelet's ..data links stay inside)."""
    secrets, outside = tmp_path / "secrets", tmp_path / "elsewhere"
    (secrets / "openai" / "..2026_01_01").mkdir(parents=True)
    (secrets / "openai" / "..2026_01_01" / "apiKey").write_text("sk-good\n")
    (secrets / "openai" / "..data").symlink_to("..2026_01_01")
    (secrets / "openai" / "apiKey").symlink_to("..data/apiKey")
    outside.mkdir()
    (outside / "apiKey").write_text("not-a-key")
    (secrets / "escape").mkdir()
    (secrets / "escape" / "apiKey").symlink_to(outside / "apiKey")
    monkeypatch.setenv("SPENDWARDEN_SECRETS_DIR", str(secrets))
    assert read_secret("openai", "apiKey") == "sk-good"
    for name, key in [(str(outside), "apiKey"), ("../elsewhere", "apiKey"), ("openai", "../../elsewhere/apiKey"),
                      ("escape", "apiKey"), ("openai", str(outside / "apiKey"))]:
        monkeypatch.setenv("SPENDWARDEN_SECRET_" + "".join(c if c.isalnum() else "_" for c in f"{name}_{key}").upper(),
                           "from-env")
        assert read_secret(name, key) is None, (name, key)
    assert "outside" in caplog.text and "not-a-key" not in caplog.text


def test_parse_tags_is_bounded():
    assert parse_tags("scenario=ticket, team=x") == {"scenario": "ticket", "team": "x"}
    assert parse_tags("bad key=1,novalue,k=" + "v" * 65) is None
    many = ",".join(f"k{i}=v" for i in range(50))
    assert len(parse_tags(many)) == 8


def test_a_policy_folder_is_read_as_one_manifest_stream(tmp_path):
    """`--config examples/teams/support/`: the folder a team keeps in Git works as it is."""
    import shutil
    from pathlib import Path

    from spendwarden.proxy.server import Proxy

    src = Path(__file__).resolve().parents[2] / "examples" / "teams" / "support"
    folder = tmp_path / "support"
    shutil.copytree(src, folder)
    (folder / "README.txt").write_text("not yaml: ignored")
    proxy = Proxy(str(folder), access_log=open(tmp_path / "access.log", "wb"))
    assert proxy.compiled.namespace == "team-support"
    assert sorted(proxy.compiled.routes) == ["chat"]
    assert sorted(proxy.compiled.budgets) == ["monthly"]
