"""Default prices from the genai-prices catalog, the cluster's pinned prices and the routes' own
pricing, field by field; the unknown-model error; `spendwarden prices`; simulate agreeing.

Catalog numbers are read from the installed package in each test (through its own public
calc_price), never hard-coded: a new genai-prices release may change them."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest
from genai_prices import Usage, calc_price

from spendwarden.cli import main
from spendwarden.ledger.pricing import Prices, TokenUsage, cost
from spendwarden.prices import catalog, pins
from spendwarden.prices.resolve import PINNED, ROUTE, UNKNOWN_PRICES
from spendwarden.proxy.config import compile_config
from spendwarden.render.proxyconfig import render_proxy_config
from spendwarden.render.status import modelroute_status
from spendwarden.simulate.candidates import load_candidate

OPENAI_MODEL, ANTHROPIC_MODEL, TIERED_MODEL = "gpt-4o-mini", "claude-3-5-haiku-latest", "claude-sonnet-4-5"
M = 1_000_000
CATALOG = catalog.source()


def listed(model: str, provider: str, **tokens: int) -> Decimal:
    """The catalog's price per 1M tokens of one kind, by its own calculation."""
    return calc_price(Usage(**tokens), model, provider_id=provider).total_price


def catalog_prices(model: str, provider: str) -> dict[str, Decimal]:
    return {"input": listed(model, provider, input_tokens=M),
            "output": listed(model, provider, output_tokens=M),
            "cachedInput": listed(model, provider, input_tokens=M, cache_read_tokens=M),
            "cacheWrite": listed(model, provider, input_tokens=M, cache_write_tokens=M)}


def backend(name="b", provider="OpenAI", model=OPENAI_MODEL, pricing=None, url=None):
    url = url or {"OpenAI": "https://api.openai.com/v1", "Anthropic": "https://api.anthropic.com"}.get(
        provider, "http://llm.inference:8000/v1")
    b = {"name": name, "provider": provider, "url": url, "model": model}
    if pricing is not None:
        b["pricing"] = pricing
    return b


def route(name="chat", alias=None, *backends):
    return {"apiVersion": "spendwarden.io/v1alpha1", "kind": "ModelRoute",
            "metadata": {"name": name, "namespace": "team-a", "uid": f"uid-{name}", "generation": 1},
            "spec": {"model": alias or name, "backends": list(backends), "defaultBackend": backends[0]["name"]}}


def rendered(*routes, prices=None):
    result = render_proxy_config("team-a", list(routes), [], prices=prices)
    return result, {r.name: r.spec for r in result.config.routes}


def test_catalog_prices_of_an_openai_and_an_anthropic_model_are_the_catalogs_own():
    for provider, model, pid in (("OpenAI", OPENAI_MODEL, "openai"), ("Anthropic", ANTHROPIC_MODEL, "anthropic")):
        result, specs = rendered(route("chat", None, backend(provider=provider, model=model)))
        assert result.problems == []
        pricing = specs["chat"].backends[0].pricing
        want = catalog_prices(model, pid)
        assert Decimal(pricing.input) == want["input"] and Decimal(pricing.output) == want["output"]
        assert Decimal(pricing.cachedInput) == want["cachedInput"]
        if provider == "Anthropic":
            assert Decimal(pricing.cacheWrite) == want["cacheWrite"]
            hour = listed(model, pid, input_tokens=M, cache_write_tokens=M, cache_write_1h_tokens=M)
            assert Decimal(pricing.cacheWrite1h) == hour
        shown = result.prices["chat"][0]
        assert shown["source"] == CATALOG and shown["currency"] == "USD"
        assert Decimal(shown["input"]) == want["input"]
        # What the proxy bills equals what the catalog would charge for the same usage.
        usage = TokenUsage(input_tokens=5000, output_tokens=700, cached_input_tokens=1200)
        billed = cost(Prices.from_spec(pricing, provider), usage)
        assert billed == listed(model, pid, input_tokens=5000, output_tokens=700, cache_read_tokens=1200)


def test_tiered_prices_give_the_base_tier_and_say_so():
    result, specs = rendered(route("chat", None, backend(provider="Anthropic", model=TIERED_MODEL)))
    pricing = specs["chat"].backends[0].pricing
    assert Decimal(pricing.input) == listed(TIERED_MODEL, "anthropic", input_tokens=1000) * 1000  # below the tier
    assert Decimal(pricing.input) != listed(TIERED_MODEL, "anthropic", input_tokens=300_000) / 300_000 * M
    assert "above 200000 tokens" in result.prices["chat"][0]["note"]


def test_a_routes_pricing_overrides_the_catalog_field_by_field():
    result, specs = rendered(route("chat", None, backend(pricing={"output": "0.50"})))
    pricing = specs["chat"].backends[0].pricing
    want = catalog_prices(OPENAI_MODEL, "openai")
    assert pricing.output == "0.50" and Decimal(pricing.input) == want["input"]
    assert Decimal(pricing.cachedInput) == want["cachedInput"]
    shown = result.prices["chat"][0]
    assert shown["sources"]["output"] == ROUTE and shown["sources"]["input"] == CATALOG
    assert shown["source"] == f"{ROUTE}+{CATALOG}"
    # A route that prices everything itself uses no catalog price.
    _, specs = rendered(route("chat", None, backend(pricing={"input": "1", "output": "2"})))
    assert (specs["chat"].backends[0].pricing.input, specs["chat"].backends[0].pricing.output) == ("1", "2")


def test_a_pin_wins_over_the_catalog_and_loses_to_the_route():
    found, warnings = pins.parse_pins(textwrap.dedent(f"""
        pinned:
          - {{provider: OpenAI, model: {OPENAI_MODEL.upper()}, input: "0.10", cachedInput: "0.01"}}
    """))
    assert warnings == []
    book = pins.book_for(found)
    result, specs = rendered(route("chat", None, backend(pricing={"cachedInput": "0.02"})), prices=book)
    pricing = specs["chat"].backends[0].pricing
    assert pricing.input == "0.10"  # pinned over the catalog (models match case-insensitively)
    assert pricing.cachedInput == "0.02"  # the route over the pin
    assert Decimal(pricing.output) == catalog_prices(OPENAI_MODEL, "openai")["output"]  # neither sets it
    sources = result.prices["chat"][0]["sources"]
    assert (sources["input"], sources["cachedInput"], sources["output"]) == (PINNED, ROUTE, CATALOG)
    assert book.key != pins.book_for({}).key  # a reconcile with other pins is never "up to date"


def test_a_pin_prices_an_in_cluster_model_the_catalog_does_not_know():
    found, _ = pins.parse_pins('[{provider: OpenAICompatible, model: llama-3.1-8b, input: "0", output: "0.01"}]')
    result, specs = rendered(route("local", None, backend(provider="OpenAICompatible", model="llama-3.1-8b")),
                             prices=pins.book_for(found))
    assert result.problems == [] and specs["local"].backends[0].pricing.output == "0.01"
    assert result.prices["local"][0]["source"] == PINNED


def test_an_unknown_model_without_prices_is_a_problem_not_a_zero():
    local = route("local", None, backend(provider="OpenAICompatible", model="llama-3.1-8b"),
                  backend("cloud", model=OPENAI_MODEL))
    unknown = route("typo", None, backend(model="gpt-nonexistent-9", pricing={"output": "1"}))
    good = route("chat", None, backend())
    result, specs = rendered(local, unknown, good)
    assert list(specs) == ["chat"]  # the others are left out whole: rules and fallbacks name backends
    problem = result.problem_for("ModelRoute", "local")
    assert problem.reason == UNKNOWN_PRICES
    assert "spec.backends[0] (b): no input or output price for OpenAICompatible model 'llama-3.1-8b'" in problem.message
    assert "spendwarden-prices" in problem.message
    typo = result.problem_for("ModelRoute", "typo")
    assert "no input price for OpenAI model 'gpt-nonexistent-9' (not in the genai-prices catalog" in typo.message
    # Status of a priced route shows its effective prices.
    status = modelroute_status(good, specs["chat"], __import__("datetime").datetime.now(), result.prices["chat"])
    assert status["backends"][0]["pricing"]["source"] == CATALOG


def test_a_route_in_another_currency_does_not_borrow_catalog_prices():
    result, specs = rendered(route("eur", None, backend(pricing={"output": "1", "currency": "EUR"})))
    message = result.problem_for("ModelRoute", "eur").message
    assert "no input price" in message and f"another currency: {CATALOG} (USD)" in message
    result, specs = rendered(route("eur", None, backend(pricing={"input": "1", "output": "2", "currency": "EUR"}),
                                   backend("usd", model="gpt-4.1")))
    assert "all backends must price in one currency once resolved" in result.problem_for("ModelRoute", "eur").message


def test_bad_pins_are_named_and_ignored_never_raised(tmp_path: Path):
    found, warnings = pins.parse_pins(textwrap.dedent("""
        pinned:
          - {provider: OpenAI, model: gpt-4.1, input: "1.60", output: "6.40"}
          - {provider: OpenAI, model: gpt-4o, input: 2.5}
          - {provider: Mistral, model: large, input: "1"}
          - {provider: Anthropic, model: claude-x}
          - {provider: OpenAI, model: GPT-4.1, output: "1"}
          - just a string
    """), "prices.yaml")
    assert list(found) == [("OpenAI", "gpt-4.1")]
    assert len(warnings) == 5
    assert "prices.yaml: pinned[1] (OpenAI gpt-4o) ignored: entry.input: Input should be a valid string" in warnings[0]
    assert "pinned[2] (Mistral large) ignored: entry.provider" in warnings[1]
    assert "pinned[3] (Anthropic claude-x) ignored: it sets no price" in warnings[2]
    assert "pinned[4] (OpenAI GPT-4.1) ignored: OpenAI GPT-4.1 is already pinned above" in warnings[3]
    assert warnings[4].startswith("prices.yaml: pinned[5] ignored:")
    assert pins.parse_pins("pinned: {a: 1}")[1] == ["pinned prices: expected a list under `pinned`; no prices pinned"]
    assert pins.parse_pins("pinned: [")[0] == {}
    assert pins.load_pins(str(tmp_path / "missing.yaml"))[0] == {}


def test_the_watcher_notices_a_changed_file_and_only_then(tmp_path: Path):
    path = tmp_path / "prices.yaml"
    watcher = pins.PinWatcher(str(path))
    assert watcher.poll() is False  # no file: no pins, as before
    path.write_text('pinned: [{provider: OpenAI, model: gpt-4.1, input: "1"}]')
    assert watcher.poll() is True and watcher.book.pins[("OpenAI", "gpt-4.1")].values == {"input": "1"}
    assert watcher.poll() is False
    # A ConfigMap volume swaps the file for a new one: new identity, new content.
    new = tmp_path / "new.yaml"
    new.write_text('pinned: [{provider: OpenAI, model: gpt-4.1, input: "2"}]')
    os.replace(new, path)
    assert watcher.poll() is True and watcher.book.pins[("OpenAI", "gpt-4.1")].values == {"input": "2"}
    new.write_text('pinned: [{provider: OpenAI, model: gpt-4.1, input: "2"}]')
    os.replace(new, path)
    assert watcher.poll() is False  # same prices, nothing to re-render


def test_the_catalog_works_offline_and_the_sidecar_never_imports_it():
    """No socket may open while prices are looked up; a sidecar's load path (the ProxyConfig the
    operator rendered) compiles without genai-prices in sys.modules. Standalone manifests resolve as
    the operator does, importing the catalog then."""
    result, _ = rendered(route("chat", None, backend()))
    config_json = json.dumps(result.config.model_dump(mode="json", exclude_none=True))
    manifests = "---\n" + json.dumps(route("chat", None, backend()))
    code = textwrap.dedent(f"""
        import socket, sys
        def refuse(*a, **k): raise AssertionError("network used")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        from spendwarden.proxy.config import compile_config, parse_config_text
        import spendwarden.proxy.server, spendwarden.proxy.run
        cfg, _ = parse_config_text({config_json!r})
        compile_config(cfg)
        assert "genai_prices" not in sys.modules, "the sidecar path imported genai-prices"
        cfg, warnings = parse_config_text({manifests!r})
        assert warnings == [] and cfg.routes[0].spec.backends[0].pricing.input is not None, warnings
        assert "genai_prices" in sys.modules
        print(cfg.routes[0].spec.backends[0].pricing.input)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Decimal(out.stdout.strip()) == catalog_prices(OPENAI_MODEL, "openai")["input"]


def test_the_proxy_refuses_a_config_whose_backend_has_no_prices():
    result, _ = rendered(route("chat", None, backend()))
    cfg = copy.deepcopy(result.config)
    cfg.routes[0].spec.backends[0].pricing = None
    with pytest.raises(Exception, match="backend 'b' has no input and output prices"):
        compile_config(cfg)


def test_prices_command_prints_catalog_and_pinned_prices(tmp_path: Path, capsys):
    want = catalog_prices(OPENAI_MODEL, "openai")
    assert main(["prices", OPENAI_MODEL, "-o", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["provider"], r["model"]) for r in rows] == [("OpenAI", OPENAI_MODEL)]
    assert Decimal(rows[0]["input"]) == want["input"] and Decimal(rows[0]["output"]) == want["output"]
    assert rows[0]["source"] == CATALOG and isinstance(rows[0]["input"], str)
    pinned = tmp_path / "prices.yaml"
    pinned.write_text(f'pinned: [{{provider: OpenAI, model: {OPENAI_MODEL}, output: "0.5"}},'
                      f' {{provider: OpenAI, model: bad}}]')
    assert main(["prices", OPENAI_MODEL, "--provider", "OpenAI", "--prices", str(pinned)]) == 0
    out, err = capsys.readouterr()
    header, line = out.splitlines()[:2]
    assert header.split() == ["PROVIDER", "MODEL", "INPUT", "OUTPUT", "CACHED-INPUT", "CACHE-WRITE",
                              "CACHE-WRITE-1H", "CURRENCY", "SOURCE"]
    cells = line.split()
    assert cells[:4] == ["OpenAI", OPENAI_MODEL, str(want["input"]).rstrip("0").rstrip("."), "0.5"]
    assert cells[-1] == f"{PINNED}+{CATALOG}"
    assert "pinned[1] (OpenAI bad) ignored" in err
    assert main(["prices", "no-such-model"]) == 1
    assert "no prices for 'no-such-model'" in capsys.readouterr().err
    assert main(["prices", "--provider", "Anthropic", "-o", "json"]) == 0
    models = {r["model"] for r in json.loads(capsys.readouterr().out)}
    assert ANTHROPIC_MODEL in models or "claude-3-5-haiku" in " ".join(models)


def test_simulate_prices_backends_as_the_operator_does(tmp_path: Path):
    path = tmp_path / "route.yaml"
    spec = route("chat", None, backend(pricing={"output": "0.5"}), backend("big", "Anthropic", ANTHROPIC_MODEL))
    path.write_text(json.dumps(spec))
    cand = load_candidate(str(path))
    _, specs = rendered(spec)
    assert [b.pricing for b in cand.routes["chat"].backends] == [b.pricing for b in specs["chat"].backends]
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(json.dumps(route("local", None, backend(provider="OpenAICompatible", model="x"))))
    with pytest.raises(Exception, match="no input or output price for OpenAICompatible model 'x'"):
        load_candidate(str(unknown))


def test_catalog_lookups_are_remembered_only_where_the_prices_cannot_change_with_the_time(monkeypatch):
    from genai_prices.types import ModelPrice

    calls: list[str] = []
    constant = type("Info", (), {"prices": ModelPrice(input_mtok=1, output_mtok=2)})()
    dated = type("Info", (), {"prices": [object()]})()  # conditional prices: by date or time of day
    monkeypatch.setattr(catalog, "_model", lambda provider, model: calls.append(model) or
                        {"constant": constant, "dated": dated}.get(model))
    monkeypatch.setattr(catalog, "_entry", lambda info, at: catalog.PriceEntry(values={"input": "1", "output": "2"}))
    lookup = catalog.cached_lookup()
    for _ in range(3):
        assert lookup("OpenAI", "constant") is not None and lookup("OpenAI", "dated") is not None
        assert lookup("OpenAI", "unknown") is None
    assert calls.count("constant") == 1 and calls.count("unknown") == 1 and calls.count("dated") == 3
    assert catalog.cached_lookup()("OpenAI", "constant") is not None and calls.count("constant") == 2  # per book
