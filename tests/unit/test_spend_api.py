"""ModelRoute's issue #7 fields: validation with field-naming messages, rendering into the proxy
config, and compilation into the proxy's runtime objects (stores kept across reloads)."""
from __future__ import annotations

import json

import pytest

from spendwarden.api.validation import validate_spec
from spendwarden.proxy.config import compile_config
from spendwarden.proxy.spend import carry_over
from spendwarden.render.proxyconfig import config_json, render_proxy_config
from spendwarden.spend.escalation import Cause
from tests.support.manifests import GOOD_ROUTE

TIERED = {**GOOD_ROUTE, "rules": [], "fallbacks": [],
          "tiers": [{"name": "small", "backends": ["small"]}, {"name": "large", "backends": ["big"], "minScore": 40}]}


def route_obj(spec: dict, name: str = "chat") -> dict:
    return {"apiVersion": "spendwarden.io/v1alpha1", "kind": "ModelRoute",
            "metadata": {"name": name, "namespace": "ns", "uid": "u"}, "spec": spec}


def test_good_spend_fields_validate_with_defaults():
    spec, err = validate_spec("ModelRoute", {**TIERED, "judge": {"backend": "small"}, "cache": {},
                                             "loopBreaker": {"maxRepeats": 3}})
    assert err is None
    assert spec.judge.band == 10 and spec.judge.verdictTTL == "1h"
    assert spec.cache.ttl == "1h" and spec.cache.maxEntries == 1000 and spec.cache.maxBytes == 64 * 1024 * 1024
    assert spec.loopBreaker.window == "1m" and spec.escalation is None


@pytest.mark.parametrize("change, expected", [
    ({"tiers": [{"name": "a", "backends": ["nope"]}]}, "spec: tiers[0].backends[0] names unknown backend 'nope'"),
    ({"tiers": [{"name": "a", "backends": ["small"]}, {"name": "a", "backends": ["big"], "minScore": 5}]},
     "spec: tiers: names must be unique, duplicated: a"),
    ({"tiers": [{"name": "a", "backends": ["small"], "minScore": 50}, {"name": "b", "backends": ["big"], "minScore": 40}]},
     "spec: tiers[1].minScore 40 must be above tiers[0].minScore 50"),
    ({"tiers": [{"name": "a", "backends": ["small"], "minScore": 101}]}, "spec.tiers[0].minScore: Input should be less"),
    ({"judge": {"backend": "small"}}, "spec: judge: needs at least two tiers"),
    ({**TIERED, "judge": {"backend": "x"}}, "spec: judge.backend names unknown backend 'x'"),
    ({"escalation": {"enabled": True}}, "spec: escalation: needs at least two tiers"),
    ({**TIERED, "escalation": {"causes": ["bogus"]}}, "spec.escalation.causes[0]: Input should be"),
    ({"cache": {"ttl": "soon"}}, "spec.cache.ttl: String should match pattern"),
    ({"loopBreaker": {"maxRepeats": 0}}, "spec.loopBreaker.maxRepeats: Input should be greater than or equal to 1"),
])
def test_bad_spend_fields_are_refused_precisely(change, expected):
    _, err = validate_spec("ModelRoute", {**GOOD_ROUTE, **change})
    assert err is not None and err.startswith(expected), err


def test_rendered_config_carries_the_fields_and_the_proxy_compiles_them():
    spec = {**TIERED, "cache": {"ttl": "5m", "maxEntries": 10}, "loopBreaker": {"maxRepeats": 2, "window": "30s"},
            "escalation": {"causes": ["length", "refusal"]}}
    result = render_proxy_config("ns", [route_obj(spec)], [])
    assert result.problems == []
    doc = json.loads(config_json(result.config))
    assert doc["routes"][0]["spec"]["tiers"][1] == {"name": "large", "backends": ["big"], "minScore": 40}
    rs = compile_config(result.config).routes["chat"].spend
    assert [t.name for t in rs.tiers] == ["small", "large"] and rs.min_scores == [0, 40]
    assert rs.escalate_on == {Cause.LENGTH, Cause.REFUSAL}
    assert rs.cache.ttl == 300 and rs.cache.max_entries == 10
    assert rs.loops.max_repeats == 2 and rs.loops.window == 30


def test_routes_without_the_fields_compile_to_nothing_and_reloads_keep_the_stores():
    plain = render_proxy_config("ns", [route_obj(GOOD_ROUTE)], []).config
    assert compile_config(plain).routes["chat"].spend is None
    cfg = render_proxy_config("ns", [route_obj({**TIERED, "cache": {}, "loopBreaker": {}})], []).config
    old, new = compile_config(cfg).routes, compile_config(cfg).routes
    carry_over(old, new)
    assert new["chat"].spend.cache is old["chat"].spend.cache and new["chat"].spend.loops is old["chat"].spend.loops
    changed = render_proxy_config("ns", [route_obj({**TIERED, "cache": {"ttl": "2h"}, "loopBreaker": {}})], []).config
    newer = compile_config(changed).routes
    carry_over(new, newer)
    assert newer["chat"].spend.cache is not new["chat"].spend.cache  # new settings: a new store
    assert newer["chat"].spend.loops is new["chat"].spend.loops
    # Escalation is on by default with tiers, off with a single tier.
    one = render_proxy_config("ns", [route_obj({**GOOD_ROUTE, "tiers": [{"name": "x", "backends": ["small"]}]})], [])
    assert compile_config(one.config).routes["chat"].spend.escalate_on == frozenset()
