"""spendwarden simulate: traffic reading, candidate validation, replay decisions, budget run-out,
report, plot and the command on small logs."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from spendwarden.api.modelroute import ModelRouteSpec
from spendwarden.api.tokenbudget import TokenBudgetSpec
from spendwarden.cli import main
from spendwarden.ledger.pricing import Prices, TokenUsage, cost
from spendwarden.simulate import simulate
from spendwarden.simulate.budget import run_out
from spendwarden.simulate.candidates import Budget, Candidate, CandidateError, load_budget, load_candidate
from spendwarden.simulate.outcomes import DEFAULT_OUTPUT_TOKENS, FailureModel, expected_output_tokens
from spendwarden.simulate.replay import Settings, prompt_tokens
from spendwarden.simulate.traffic import ACCESS_LOG, ANTHROPIC_BATCH, OPENAI_BATCH, TrafficError, read_lines

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
MINI = {"input": "0.15", "output": "0.60"}
STRONG = {"input": "2.50", "output": "10.00"}
MINI_P, STRONG_P = Prices.from_spec(MINI), Prices.from_spec(STRONG)


def route(**extra) -> dict:
    spec = {"model": "chat", "defaultBackend": "strong",
            "backends": [{"name": "mini", "provider": "OpenAI", "url": "https://api.openai.com/v1",
                          "model": "gpt-4o-mini", "pricing": MINI},
                         {"name": "strong", "provider": "OpenAI", "url": "https://api.openai.com/v1",
                          "model": "gpt-4o", "pricing": STRONG}]}
    spec.update(extra)
    return spec


TIERS = [{"name": "small", "backends": ["mini"], "minScore": 0}, {"name": "large", "backends": ["strong"], "minScore": 30}]


def candidate(name: str = "c", **extra) -> Candidate:
    spec = ModelRouteSpec.model_validate(route(**extra))
    return Candidate(name=name, path=f"{name}.yaml", routes={"chat": spec})


def batch(i: int, content: str, minutes: int = 0, **body) -> str:
    meta = body.pop("metadata", {})
    b = {"model": "chat", "messages": [{"role": "user", "content": content}], **body,
         "metadata": {"ts": (T0 + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%SZ"), **meta}}
    return json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": b})


EASY = "What does the Pro plan cost per month?"
HARD = ("Implement a Python function to merge overlapping intervals. Analyze the trade-offs, prove it "
        "correct step by step and explain the time complexity.\n```python\ndef merge(xs):\n    pass\n```")


def replay(cand: Candidate, lines: list[str], settings: Settings | None = None):
    reqs = read_lines(lines)
    runs = simulate(reqs, [cand], T0, settings=settings)
    return runs[0].results


def chat_body(content: str, **kw) -> dict:
    return {"model": "chat", "messages": [{"role": "user", "content": content}], **kw}


# -- traffic --------------------------------------------------------------------------------------

def test_reads_access_log_and_both_batch_formats():
    access = json.dumps({"ts": 1767603600.5, "namespace": "a", "api": "chat/completions", "model": "chat",
                         "route": "chat", "status": 200, "outcome": "ok", "backend": "mini", "input_tokens": 120,
                         "output_tokens": 30, "cached_input_tokens": 20, "tags": {"scenario": "faq"}})
    anthropic = json.dumps({"custom_id": "a1", "params": {"model": "chat", "max_tokens": 50,
                                                          "messages": [{"role": "user", "content": "hi"}]}})
    reqs = read_lines([access, "", batch(1, EASY, metadata={"scenario": "faq", "output_tokens": "77"}), anthropic])
    assert [r.source for r in reqs] == [ACCESS_LOG, OPENAI_BATCH, ANTHROPIC_BATCH]
    assert [r.line for r in reqs] == [1, 3, 4]
    a, o, m = reqs
    assert a.body is None and a.recorded.input_tokens == 120 and a.recorded.backend == "mini"
    assert a.ts == datetime.fromtimestamp(1767603600.5, UTC) and a.scenario == "faq"
    assert o.body["messages"][0]["content"] == EASY and o.recorded.output_tokens == 77 and o.scenario == "faq"
    assert o.ts == T0 and o.request_id == "r1"
    assert m.api == "messages" and m.ts is None


@pytest.mark.parametrize("line, message", [
    ("{not json", "not JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"foo": 1}', "neither a proxy access-log line"),
    ('{"custom_id": "x", "method": "POST", "url": "/v1/images", "body": {"model": "m"}}', "batch url '/v1/images'"),
    ('{"custom_id": "x", "url": "/v1/chat/completions", "body": {"messages": []}}', "has no 'model'"),
    ('{"custom_id": "x", "url": "/v1/chat/completions", "body": {"model": "m", "metadata": {"ts": "2026-01-05T09:00"}}}',
     "has no UTC offset"),
])
def test_bad_lines_name_file_line_and_problem(line, message):
    with pytest.raises(TrafficError) as err:
        read_lines(["", line], "log.jsonl")  # blank lines are skipped but counted
    assert str(err.value).startswith("log.jsonl:2: ") and message in str(err.value)


# -- candidates -----------------------------------------------------------------------------------

def manifest(kind: str, name: str, spec: dict) -> dict:
    return {"apiVersion": "spendwarden.io/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec}


def test_candidate_files_are_validated_by_the_api_model(tmp_path: Path):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(manifest("ModelRoute", "routed", route(tiers=TIERS))))
    cand = load_candidate(str(good))
    assert cand.name == "routed" and cand.route_for("anything").model == "chat"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(manifest("ModelRoute", "broken", route(
        tiers=[{"name": "small", "backends": ["nope"]}]))))
    with pytest.raises(CandidateError, match=r"bad.yaml: ModelRoute 'broken' is invalid: .*tiers\[0\]\.backends\[0\] "
                                             r"names unknown backend 'nope'"):
        load_candidate(str(bad))
    price = tmp_path / "price.yaml"
    price.write_text(yaml.safe_dump(manifest("ModelRoute", "p", route(backends=[{
        "name": "strong", "provider": "OpenAI", "url": "https://x/v1", "model": "m",
        "pricing": {"input": 2.5, "output": "1"}}]))))
    with pytest.raises(CandidateError, match=r"spec\.backends\.0\.pricing\.input|spec\.backends\[0\]\.pricing\.input"):
        load_candidate(str(price))
    budget = tmp_path / "budget.yaml"
    budget.write_text(yaml.safe_dump(manifest("ModelRoute", "x", route())))
    with pytest.raises(CandidateError, match="no TokenBudget in the file \\(found ModelRoute\\)"):
        load_budget(str(budget))


# -- outcomes -------------------------------------------------------------------------------------

def test_output_tokens_prefer_the_log_then_the_default_never_above_the_cap():
    assert expected_output_tokens(80, None) == 80
    assert expected_output_tokens(None, None) == DEFAULT_OUTPUT_TOKENS
    assert expected_output_tokens(None, 100) == 100 and expected_output_tokens(500, 300) == 300
    assert expected_output_tokens(80, None, embeddings=True) == 0


def test_failure_model_is_deterministic_and_grows_with_the_score_in_the_band():
    fm = FailureModel(seed=3)
    draws = [fm.outcome(f"r{i}", "gpt-4o-mini", 10, (0, 30), capped=True, wants_json=False) for i in range(2000)]
    assert draws == [fm.outcome(f"r{i}", "gpt-4o-mini", 10, (0, 30), capped=True, wants_json=False)
                     for i in range(2000)]
    low = sum(d != "ok" for d in draws) / 2000
    high = sum(fm.outcome(f"r{i}", "gpt-4o-mini", 29, (0, 30), capped=True, wants_json=False) != "ok"
               for i in range(2000)) / 2000
    assert abs(low - fm.probability(10, (0, 30))) < 0.03 and abs(high - fm.probability(29, (0, 30))) < 0.03
    assert low < high
    causes = {fm.outcome(f"r{i}", "m", 29, (0, 30), capped=False, wants_json=False) for i in range(2000)}
    assert causes == {"ok", "refusal", "upstream_error"}  # no length without a cap, no JSON unasked


# -- replay ---------------------------------------------------------------------------------------

def test_tiers_pick_the_backend_and_cost_uses_the_tokenizer_and_prices():
    results = replay(candidate(tiers=TIERS, escalation={"enabled": False}),
                     [batch(0, EASY, metadata={"output_tokens": "40"}), batch(1, HARD, metadata={"output_tokens": "300"})])
    easy, hard = results
    assert (easy.backend, easy.tier) == ("mini", 0) and (hard.backend, hard.tier) == ("strong", 1)
    assert easy.score < 30 <= hard.score
    n_easy = prompt_tokens("chat/completions", chat_body(EASY))
    assert easy.cost == cost(MINI_P, TokenUsage(n_easy, 40)) and easy.input_tokens == n_easy
    assert hard.cost == cost(STRONG_P, TokenUsage(prompt_tokens("chat/completions", chat_body(HARD)), 300))


def test_without_tiers_the_proxys_rules_decide():
    cand = candidate(rules=[{"name": "tools", "match": {"toolsPresent": True}, "backend": "strong"}],
                     defaultBackend="mini")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    results = replay(cand, [batch(0, EASY), batch(1, EASY, tools=tools)])
    assert [r.backend for r in results] == ["mini", "strong"]
    assert all(r.tier is None and not r.escalated for r in results)


def test_cache_hits_only_deterministic_repeats_within_the_ttl():
    cand = candidate(tiers=TIERS, escalation={"enabled": False}, cache={"ttl": "1h"})
    lines = [batch(0, EASY, 0, temperature=0), batch(1, EASY, 10, temperature=0, metadata={"scenario": "x"}),
             batch(2, EASY, 20, temperature=0.7), batch(3, EASY, 30, temperature=0.7),
             batch(4, EASY, 75, temperature=0)]  # 75 min after the first answer: expired
    results = replay(cand, lines)
    assert [r.cache_hit for r in results] == [False, True, False, False, False]
    assert results[1].cost == 0 and results[1].saved == results[0].cost > 0


def test_a_recorded_failure_escalates_only_when_the_proxys_check_sees_it():
    cand = candidate(tiers=TIERS)
    json_rf = {"type": "json_object"}
    lines = [batch(0, EASY, max_tokens=50, response_format=json_rf, metadata={"outcome": "invalid_json", "output_tokens": "20"}),
             # invalid_json on a request that did not ask for JSON: the proxy's check does not fire
             batch(1, EASY, max_tokens=50, metadata={"outcome": "invalid_json", "output_tokens": "20"}),
             batch(2, EASY, max_tokens=50, metadata={"outcome": "length", "output_tokens": "20"}),
             batch(3, EASY, max_tokens=50, metadata={"outcome": "upstream_error", "output_tokens": "20"})]
    r0, r1, r2, r3 = replay(cand, lines)
    n = prompt_tokens("chat/completions", chat_body(EASY, max_tokens=50, response_format=json_rf))
    assert r0.escalated and r0.escalation_cause == "invalid_json" and r0.backend == "strong"
    assert r0.cost == cost(MINI_P, TokenUsage(n, 20)) + cost(STRONG_P, TokenUsage(n, 20))
    assert not r1.escalated and r1.backend == "mini"
    # A cut-off answer bills the whole cap; an upstream error bills nothing.
    m = prompt_tokens("chat/completions", chat_body(EASY, max_tokens=50))
    assert r2.attempts[0].usage == TokenUsage(m, 50) and r2.backend == "strong"
    assert r3.attempts[0].cost == 0 and r3.cost == cost(STRONG_P, TokenUsage(m, 20))
    only_length = replay(candidate(tiers=TIERS, escalation={"causes": ["length"]}), lines)
    assert [r.escalated for r in only_length] == [False, False, True, False]


def test_the_judge_is_paid_near_a_boundary_once_per_fresh_verdict():
    cand = candidate(tiers=TIERS, escalation={"enabled": False}, judge={"backend": "mini", "band": 50})
    results = replay(cand, [batch(0, EASY, 0, temperature=0), batch(1, EASY, 5, temperature=0)])
    assert results[0].judge_cost > 0 and results[1].judge_cost == 0
    assert results[0].cost == results[0].judge_cost + results[0].attempts[0].cost


def test_access_log_lines_replay_recorded_usage_on_the_backend_that_served_them():
    line = json.dumps({"ts": T0.timestamp(), "api": "chat/completions", "model": "chat", "route": "chat",
                       "status": 200, "outcome": "ok", "backend": "mini", "input_tokens": 1000,
                       "output_tokens": 200, "cached_input_tokens": 400})
    (r,) = replay(candidate(), [line])
    assert r.backend == "mini"
    assert r.cost == cost(MINI_P, TokenUsage(1000, 200, 400))
    # A candidate without that backend serves it with its own default.
    (s,) = replay(Candidate("s", "s.yaml", {"chat": ModelRouteSpec.model_validate(route(
        backends=[route()["backends"][1]]))}), [line])
    assert s.backend == "strong" and s.cost == cost(STRONG_P, TokenUsage(1000, 200, 400))
    # Logged prompt-cache writes are priced as writes (above input), not as plain input.
    written = json.dumps({**json.loads(line), "cache_write_tokens": 300, "cache_write_1h_tokens": 100})
    priced = {**MINI, "cacheWrite": "0.1875", "cacheWrite1h": "0.30"}
    spec = route()
    spec["backends"][0]["pricing"] = priced
    (w,) = replay(Candidate("w", "w.yaml", {"chat": ModelRouteSpec.model_validate(spec)}), [written])
    assert w.cost == cost(Prices.from_spec(priced), TokenUsage(1000, 200, 400, 300, 100))
    assert w.cost > cost(Prices.from_spec(priced), TokenUsage(1000, 200, 400))


def access(**fields) -> str:
    return json.dumps({"ts": T0.timestamp(), "api": "chat/completions", "model": "chat", "route": "chat",
                       "status": 200, "outcome": "ok", **fields})


def test_access_log_scores_escalations_and_cache_hits_as_the_proxy_logged_them():
    esc = access(outcome="escalated", backend="strong", tier="large", complexity_score=12, input_tokens=500,
                 output_tokens=100, escalated={"from": "small", "to": "large", "cause": "length", "first_cost": "0.0001"})
    ok = access(backend="mini", tier="small", complexity_score=12, input_tokens=500, output_tokens=100)
    hit = access(outcome="cache_hit", backend="mini", tier="small", cache="hit", saved="0.00042")
    judged = access(backend="strong", tier="large", complexity_score=12, judge_score=80, input_tokens=500,
                    output_tokens=100)
    tiered = candidate(tiers=TIERS, cache={"ttl": "1h"})
    r_esc, r_ok, r_hit, r_judged = replay(tiered, [esc, ok, hit, judged])
    # Score 12 is the small tier's; the small tier's recorded failure escalates again.
    assert r_esc.escalated and r_esc.escalation_cause == "length" and r_esc.backend == "strong"
    assert r_esc.cost == r_esc.attempts[0].cost + cost(STRONG_P, TokenUsage(500, 100))
    assert not r_ok.escalated and r_ok.cost == cost(MINI_P, TokenUsage(500, 100))
    assert r_hit.cache_hit and r_hit.cost == 0 and r_hit.saved == Decimal("0.00042")
    assert r_judged.tier == 1 and r_judged.score == 80  # the judge's verdict picked the tier
    # Without tiers the logged backend serves; without a cache the hit is bought again.
    _, _, again, _ = replay(candidate(), [esc, ok, hit, judged])
    assert not again.cache_hit and again.cost == Decimal("0.00042")


def test_requests_for_an_alias_no_route_serves_are_counted_not_priced():
    two = Candidate("two", "t.yaml", {"chat": ModelRouteSpec.model_validate(route()),
                                      "embed": ModelRouteSpec.model_validate(route(model="embed"))})
    line = batch(0, EASY).replace('"model": "chat"', '"model": "other"')
    (r,) = replay(two, [line])
    assert r.route is None and r.cost == 0


# -- budget ---------------------------------------------------------------------------------------

def test_budget_runs_out_at_the_request_that_reaches_the_limit():
    cand = candidate()  # every request on strong: 1000 prompt-ish tokens, 100 output each
    one = cost(STRONG_P, TokenUsage(prompt_tokens("chat/completions", chat_body(EASY)), 100))
    limit = one * 3 + one / 2
    budget = Budget("b", TokenBudgetSpec.model_validate({"period": {"type": "Daily"},
                                                         "limits": {"cost": {"amount": str(limit)}}}))
    lines = [batch(i, EASY, i * 60, metadata={"output_tokens": "100"}) for i in range(6)]
    lines.append(batch(9, EASY, 24 * 60 + 1, metadata={"output_tokens": "100"}))  # the next day
    results = replay(cand, lines)
    periods = run_out(budget, results)
    assert len(periods) == 2
    first, second = periods
    assert first.exhausted_at == T0 + timedelta(hours=3) and first.after_exhaustion == 2 and first.requests == 6
    assert first.used.cost == one * 6
    assert second.exhausted_at is None and second.requests == 1


def test_projection_when_the_log_ends_before_the_budget_does():
    cand = candidate()
    one = cost(STRONG_P, TokenUsage(prompt_tokens("chat/completions", chat_body(EASY)), 100))
    budget = Budget("b", TokenBudgetSpec.model_validate({"period": {"type": "Daily"},
                                                         "limits": {"cost": {"amount": str(one * 4)}}}))
    results = replay(cand, [batch(i, EASY, i * 60, metadata={"output_tokens": "100"}) for i in range(2)])
    (p,) = run_out(budget, results)
    # Half the limit in the hour from the first to the last request: out one more hour on.
    assert p.exhausted_at is None and p.percent == 50.0
    assert p.projected_exhaustion == T0 + timedelta(hours=2)


# -- the command ----------------------------------------------------------------------------------

def write_candidates(tmp_path: Path) -> tuple[str, str, str]:
    strong = tmp_path / "strong.yaml"
    strong.write_text(yaml.safe_dump(manifest("ModelRoute", "all-strong", route())))
    routed = tmp_path / "routed.yaml"
    routed.write_text(yaml.safe_dump(manifest("ModelRoute", "routed", route(tiers=TIERS, cache={"ttl": "1h"}))))
    budget = tmp_path / "budget.yaml"
    budget.write_text(yaml.safe_dump(manifest("TokenBudget", "daily", {"period": {"type": "Daily"},
                                                                     "limits": {"cost": {"amount": "0.01"}}})))
    return str(strong), str(routed), str(budget)


def small_log(tmp_path: Path) -> str:
    lines = []
    for i in range(12):
        content, scenario = (HARD, "code") if i % 4 == 0 else (EASY, "faq")
        lines.append(batch(i, content, i * 10, temperature=0, max_tokens=400,
                           metadata={"scenario": scenario, "output_tokens": "120", "outcome": "ok"}))
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_command_prints_candidates_side_by_side_as_json_and_table(tmp_path: Path, capsys):
    strong, routed, budget = write_candidates(tmp_path)
    log = small_log(tmp_path)
    assert main(["simulate", "--route", strong, "--route", routed, "--budget", budget, "--traffic", log,
                 "-o", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    a, b = out["candidates"]
    assert out["baseline"] == "all-strong" and [a["candidate"], b["candidate"]] == ["all-strong", "routed"]
    assert a["requests"] == b["requests"] == 12
    # The baseline pays every request on strong; the routed one answers repeats from its cache.
    # Two distinct requests every 10 minutes for 2 hours, answers kept 1 h: the easy one is answered
    # at 10 and 70 min (expired), the hard one at 0 and 80 min; everything else is a hit.
    assert a["cacheHits"] == 0 and b["cacheHits"] == 12 - 4
    assert Decimal(b["cost"]) < Decimal(a["cost"])
    assert b["savingsVsBaseline"] == float(round((1 - Decimal(b["cost"]) / Decimal(a["cost"])) * 100, 2))
    assert sum(Decimal(s["cost"]) for s in a["scenarios"].values()) == Decimal(a["cost"])
    assert sum(Decimal(d) for d in a["days"].values()) == Decimal(a["cost"])
    assert a["budget"]["runsOutAt"] is not None
    assert main(["simulate", "--route", strong, "--route", routed, "--budget", budget, "--traffic", log]) == 0
    text = capsys.readouterr().out
    assert "all-strong" in text.splitlines()[0] and "routed" in text.splitlines()[0]
    for label in ("cost (USD)", "cost per request", "escalation rate", "cache hit rate", "  faq", "  code",
                  "  2026-01-05", "budget daily"):
        assert label in text


def test_command_refuses_bad_input_with_a_clear_message(tmp_path: Path, capsys):
    strong, routed, budget = write_candidates(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(batch(0, EASY) + "\n{oops\n")
    assert main(["simulate", "--route", strong, "--traffic", str(bad)]) == 2
    assert f"{bad}:2: not JSON" in capsys.readouterr().err
    eur = tmp_path / "eur.yaml"
    eur.write_text(yaml.safe_dump(manifest("TokenBudget", "eur", {"period": {"type": "Daily"},
                                                                 "limits": {"cost": {"amount": "1", "currency": "EUR"}}})))
    assert main(["simulate", "--route", strong, "--budget", str(eur), "--traffic", small_log(tmp_path)]) == 2
    assert "limits spend in EUR but the route prices in USD" in capsys.readouterr().err
    assert main(["simulate", "--route", str(tmp_path / "missing.yaml"), "--traffic", small_log(tmp_path)]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_plot_svg_is_built_in_and_png_names_its_extra(tmp_path: Path, capsys):
    strong, routed, _ = write_candidates(tmp_path)
    log = small_log(tmp_path)
    svg = tmp_path / "cost.svg"
    assert main(["simulate", "--route", strong, "--route", routed, "--traffic", log, "--plot", str(svg)]) == 0
    root = ET.fromstring(svg.read_text())
    lines = root.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 2
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert "all-strong" in texts and "routed" in texts
    png = tmp_path / "cost.png"
    rc = main(["simulate", "--route", strong, "--traffic", log, "--plot", str(png)])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert rc == 2
        err = capsys.readouterr().err
        assert "spendwarden[plot]" in err and "cost.svg" in err
    else:
        assert rc == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["simulate", "--route", strong, "--traffic", log, "--plot", str(tmp_path / "x.gif")]) == 2


def test_responses_api_lines_replay_their_usage_untiered_as_the_proxy_serves_them():
    line = access(api="responses", backend="mini", input_tokens=1000, output_tokens=200, cached_input_tokens=400,
                  reasoning_tokens=150)
    (r,) = replay(candidate(), [line])
    assert r.backend == "mini" and r.cost == cost(MINI_P, TokenUsage(1000, 200, 400))
    # the proxy applies no tiers to the Responses API: the default backend serves, whatever the score
    body = {"custom_id": "r1", "method": "POST", "url": "/v1/responses", "body": {
        "model": "chat", "input": HARD, "metadata": {"ts": T0.strftime("%Y-%m-%dT%H:%M:%SZ")}}}
    (t,) = replay(candidate(tiers=TIERS), [json.dumps(body)])
    assert t.backend == "strong" and t.tier is None
