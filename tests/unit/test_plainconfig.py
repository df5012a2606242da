"""spendwarden.plainconfig: the sidecar's pydantic-free load path must read an operator-rendered
ProxyConfig exactly as the API models do, and refuse what is not one."""
import json
from pathlib import Path

import pytest

from spendwarden import plainconfig
from spendwarden.api import plainschema
from spendwarden.api.proxyconfig import ProxyConfig
from spendwarden.proxy.config import compile_config, parse_config_text
from spendwarden.render.proxyconfig import config_json, load_manifests, render_proxy_config

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = [ROOT / "examples/teams/research/modelroute.yaml", ROOT / "examples/teams/research/tokenbudget.yaml",
             ROOT / "examples/teams/support/modelroute.yaml", ROOT / "examples/teams/support/tokenbudget.yaml",
             ROOT / "bench/workload/routed.yaml", ROOT / "bench/workload/budget.yaml"]
RICH_ROUTE = {"apiVersion": "spendwarden.io/v1alpha1", "kind": "ModelRoute", "metadata": {"name": "rich"},
              "spec": {"model": "rich", "defaultBackend": "small", "fallbacks": ["big"],
                       "backends": [
                           {"name": "big", "provider": "Anthropic", "url": "https://api.anthropic.com",
                            "model": "claude-x", "pricing": {"input": "3", "output": "15", "cacheWrite": "3.75"},
                            "credentials": {"secretRef": {"name": "keys", "key": "anthropic"}},
                            "maxContextTokens": 200000, "timeoutSeconds": 30},
                           {"name": "small", "provider": "OpenAICompatible", "url": "http://llama.inference:8080/v1",
                            "model": "llama", "pricing": {"input": "0", "output": "0"},
                            "deploymentRef": {"name": "llama", "namespace": "inference"},
                            "scaling": {"maxReplicas": 3, "idleToZeroAfter": "10m", "wake": {"mode": "Fallback"}}}],
                       "rules": [{"name": "long", "match": {"minPromptTokens": 1000}, "backend": "big"},
                                 {"match": {"headers": [{"name": "x-tier", "value": "cheap"}]}, "backend": "small"}],
                       "tiers": [{"name": "s", "backends": ["small"]}, {"name": "l", "backends": ["big"], "minScore": 40}],
                       "judge": {"backend": "small"}, "loopBreaker": {"maxRepeats": 3},
                       "limits": {"maxTokens": 2048, "maxPromptTokens": 100000}}}
RICH_BUDGET = {"apiVersion": "spendwarden.io/v1alpha1", "kind": "TokenBudget", "metadata": {"name": "monthly"},
               "spec": {"period": {"type": "Monthly", "timeZone": "Europe/Berlin"}, "onExceeded": "Downgrade",
                        "failMode": "Closed", "routes": ["rich"],
                        "limits": {"tokens": {"input": 10**9}, "cost": {"amount": "250.00", "currency": "USD"}},
                        "downgrade": {"hardCeiling": {"cost": "300"}}}}


def _plain_dump(node):
    """A plainconfig object as the models' JSON dump (exclude_none) would write it."""
    if isinstance(node, plainconfig.Node):
        return {k: _plain_dump(v) for k, v in vars(node).items() if k != "_model" and v is not None}
    if isinstance(node, list):
        return [_plain_dump(v) for v in node]
    if isinstance(node, dict):
        return {k: _plain_dump(v) for k, v in node.items()}
    return node.value if hasattr(node, "value") else node


def _rendered() -> list[str]:
    out = []
    for path in MANIFESTS:
        routes, budgets = load_manifests(path.read_text())
        out.append(config_json(render_proxy_config("team", routes, budgets).config))
    out.append(config_json(render_proxy_config("team", [RICH_ROUTE], [RICH_BUDGET],
                                               ledger_url="https://ledger:8081").config))
    return out


def test_the_schema_file_is_generated_from_the_models():
    assert Path(plainschema.path()).read_text() == plainschema.render(), \
        "stale: run PYTHONPATH=operator python -m spendwarden.api.plainschema"


@pytest.mark.parametrize("text", _rendered())
def test_a_rendered_config_loads_as_the_models_load_it(text):
    doc = json.loads(text)
    plain = plainconfig.load_proxy_config(doc)
    model = ProxyConfig.model_validate(doc)
    assert _plain_dump(plain) == model.model_dump(mode="json", exclude_none=True)
    assert len(plain.routes) + len(plain.budgets) > 0
    # and with every default left out, as a hand-written file would: the schema's defaults fill in
    sparse = json.loads(ProxyConfig.model_validate(doc).model_dump_json(exclude_defaults=True))
    assert _plain_dump(plainconfig.load_proxy_config(sparse)) == model.model_dump(mode="json", exclude_none=True)


def test_enums_are_the_api_enums_and_the_compiled_tables_agree():
    text = _rendered()[-1]
    plain, _ = parse_config_text(text)
    assert isinstance(plain, plainconfig.Node)
    model = ProxyConfig.model_validate_json(text)
    from spendwarden.api.tokenbudget import FailMode

    assert plain.budgets[0].spec.failMode is FailMode.CLOSED
    a, b = compile_config(plain), compile_config(model)
    route_a, route_b = a.routes["rich"], b.routes["rich"]
    for x, y in zip(route_a.backends.values(), route_b.backends.values()):
        assert (x.prices, x.wake, x.timeout, x.max_context, x.fmt) == (y.prices, y.wake, y.timeout, y.max_context, y.fmt)
    assert [r.name for r in route_a.rules] == [r.name for r in route_b.rules]
    assert route_a.spend.min_scores == route_b.spend.min_scores and route_a.needs_estimate
    assert a.source.ledger.url == "https://ledger:8081"


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(extra=1), "unknown field"),
    (lambda d: d["routes"][0]["spec"].pop("model"), r"routes\[0\]\.spec\.model: missing"),
    (lambda d: d["routes"][0]["spec"]["backends"][0].update(provider="Gemini"), "is not a Provider"),
    (lambda d: d["routes"][0]["spec"]["backends"][0].update(timeoutSeconds="30"), "expected int"),
    (lambda d: d["budgets"][0]["spec"].update(limits=None), "may not be null"),
])
def test_what_is_no_proxy_config_is_refused(mutate, message):
    doc = json.loads(_rendered()[-1])
    mutate(doc)
    with pytest.raises(plainconfig.PlainConfigError, match=message):
        plainconfig.load_proxy_config(doc)


def test_a_refused_json_document_is_explained_by_the_models():
    doc = json.loads(_rendered()[-1])
    doc["routes"][0]["spec"]["backends"][0]["timeoutSeconds"] = "30"  # the models coerce it
    cfg, _ = parse_config_text(json.dumps(doc))
    assert isinstance(cfg, ProxyConfig) and cfg.routes[0].spec.backends[0].timeoutSeconds == 30
    doc["routes"][0]["spec"]["backends"][0]["provider"] = "Gemini"
    from spendwarden.proxy.config import ConfigError

    with pytest.raises(ConfigError, match="invalid ProxyConfig"):
        parse_config_text(json.dumps(doc))
