"""The CEL rules (x-kubernetes-validations) of the generated CRDs: each is carried by the schema
where its pydantic validator's model sits, pydantic refuses the same spec, and the rules stay
within what every CEL-capable apiserver compiles and within its cost estimate.

With cel-python installed (a dev check, not a dependency: `pip install cel-python`), the rules are
also evaluated offline the way the apiserver does (defaults first, then each rule with `self` bound
to its node): valid specs pass them all, and each case of cel_cases.py breaks exactly its own rule.
What cel-python cannot tell (Kubernetes' type check and cost estimate) only a real apiserver does:
tests/integration/test_cel_validation.py."""
from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from spendwarden.api.crdgen import all_crds
from spendwarden.api.validation import validate_spec
from tests.support.manifests import GOOD_BUDGET, GOOD_ROUTE

from .cel_cases import CASES, MR, TB, TWO_TIERS, Case, spec_of

ROOT = Path(__file__).resolve().parents[2]
IDS = [c.id for c in CASES]
# Standard CEL macros and functions, and the one Kubernetes list function the rules use (there since
# CEL came to CRDs). Anything newer (optionals, quantity, messageExpression) would make an older
# apiserver refuse the CRD.
CEL_FUNCTIONS = {"has", "all", "exists", "exists_one", "map", "size", "matches", "double", "isSorted"}


def spec_schema(kind: str) -> dict:
    crd = next(m for m in all_crds().values() if m["spec"]["names"]["kind"] == kind)
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def node_at(kind: str, where: str) -> dict:
    """The schema node for a field path as the apiserver writes it, e.g. spec.backends[0].scaling."""
    node = spec_schema(kind)
    for name, index in re.findall(r"\.(\w+)|\[(\d+)\]", where[len("spec"):]):
        node = node["items"] if index else node["properties"][name]
    return node


def walk(node: dict, value=None, where: str = "spec"):
    """(where, schema node, value) for the node and everything below it that `value` has; the schema
    alone (value None) walks lists as [0]."""
    yield where, node, value
    for name, sub in node.get("properties", {}).items():
        if value is None or (isinstance(value, dict) and name in value):
            yield from walk(sub, None if value is None else value[name], f"{where}.{name}")
    if "items" in node:
        for i, item in enumerate([None] if value is None else value):
            yield from walk(node["items"], item, f"{where}[{i}]")


def all_rules():
    for kind in (TB, MR):
        for where, node, _ in walk(spec_schema(kind)):
            for rule in node.get("x-kubernetes-validations", []):
                yield kind, where, rule


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_crd_carries_the_rule(case: Case):
    messages = [r["message"] for r in node_at(case.kind, case.where).get("x-kubernetes-validations", [])]
    assert case.message in messages, f"{case.where} has no rule saying {case.message!r}: {messages}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_pydantic_refuses_the_same_spec(case: Case):
    spec, error = validate_spec(case.kind, spec_of(case))
    assert spec is None, f"pydantic accepts what the CRD refuses: {spec_of(case)}"
    assert case.pydantic in error


def test_every_rule_has_a_case_and_a_message_of_its_own():
    rules = [(kind, where, rule["message"]) for kind, where, rule in all_rules()]
    covered = {(c.kind, re.sub(r"\[\d+\]", "[0]", c.where), c.message) for c in CASES}
    assert sorted(set(rules) - covered) == []
    assert len(set(rules)) == len(rules)


def test_rules_use_only_what_every_cel_capable_apiserver_compiles():
    for kind, where, rule in all_rules():
        assert set(rule) == {"rule", "message"}, (where, rule)  # no messageExpression, reason, fieldPath (1.27+, 1.28+)
        assert not re.search(r"\.\?|\[\?", rule["rule"]), (where, rule)  # optional field selection: 1.29+
        called = set(re.findall(r"(\w+)\s*\(", rule["rule"]))
        assert called <= CEL_FUNCTIONS, (where, called - CEL_FUNCTIONS)
        assert rule["message"] and len(rule["message"]) < 160 and "\n" not in rule["message"]


def test_lists_and_strings_are_bounded_for_the_cost_estimate():
    """The apiserver estimates each rule's cost from maxItems and maxLength (unbounded strings count as
    the whole request) and refuses a CRD whose rules could cost too much."""
    for kind in (TB, MR):
        for where, node, _ in walk(spec_schema(kind)):
            if node.get("type") == "array":
                assert "maxItems" in node, f"{kind} {where}"
            if node.get("type") == "string":
                assert "maxLength" in node or "enum" in node, f"{kind} {where}"


def test_thresholds_range_is_in_the_item_schema():
    assert node_at(TB, "spec.thresholds[0]") == {"type": "integer", "minimum": 1, "maximum": 100}
    assert "threshold 0 is outside 1..100" in validate_spec(TB, {**GOOD_BUDGET, "thresholds": [0, 50]})[1]


# -- offline evaluation with cel-python -----------------------------------------------------------

class Evaluator:
    def __init__(self, celpy):
        self.celpy = celpy
        self.env = celpy.Environment()
        bool_type = celpy.celtypes.BoolType
        self.functions = {"isSorted": lambda items: bool_type(all(a <= b for a, b in zip(items, items[1:])))}
        self.programs: dict[str, object] = {}

    def holds(self, rule: str, value) -> bool | str:
        if rule not in self.programs:
            self.programs[rule] = self.env.program(self.env.compile(rule), functions=self.functions)
        try:
            result = self.programs[rule].evaluate({"self": self.celpy.json_to_cel(value)})
        except Exception as exc:  # noqa: BLE001 - reported as the rule's failure
            return f"error: {exc}"
        return f"error: {result}" if isinstance(result, self.celpy.CELEvalError) else bool(result)

    def violations(self, kind: str, spec: dict) -> list[tuple[str, str]]:
        spec = with_defaults(spec_schema(kind), copy.deepcopy(spec))
        out = []
        for where, node, value in walk(spec_schema(kind), spec):
            for rule in node.get("x-kubernetes-validations", []):
                verdict = self.holds(rule["rule"], value)
                if verdict is not True:
                    out.append((where, rule["message"] if verdict is False else f"{rule['message']} ({verdict})"))
        return out


def with_defaults(node: dict, value):
    """The schema's defaults filled in, as the apiserver does before it validates."""
    if isinstance(value, dict):
        for name, sub in node.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = with_defaults(sub, value[name])
    elif isinstance(value, list) and "items" in node:
        value = [with_defaults(node["items"], item) for item in value]
    return value


@pytest.fixture(scope="module")
def cel() -> Evaluator:
    celpy = pytest.importorskip("celpy", reason="cel-python not installed: the CEL rules were not evaluated offline")
    return Evaluator(celpy)


def test_every_rule_parses(cel):
    for kind, where, rule in all_rules():
        cel.env.compile(rule["rule"])


def _examples() -> list[tuple[str, dict]]:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        return []
    built = subprocess.run([kubectl, "kustomize", str(ROOT / "examples")], capture_output=True, text=True, check=True).stdout
    return [(d["kind"], d["spec"]) for d in yaml.safe_load_all(built) if d and d["kind"] in (TB, MR)]


VALID = [
    (TB, GOOD_BUDGET),
    (MR, GOOD_ROUTE),
    # Everything optional set, at the boundaries the rules allow (ceilings equal to the limits).
    (TB, {**GOOD_BUDGET, "thresholds": [1, 100], "onExceeded": "Downgrade",
          "downgrade": {"hardCeiling": {"tokens": 1_000_000, "cost": "250"}},
          "alerting": {"webhookSecretRef": {"name": "spendwarden-alerting"}}}),
    (TB, {"window": "1h30m", "limits": {"tokens": {"output": 5}}, "thresholds": [],
          "downgrade": {}, "alerting": {"webhookURL": "https://hooks.example/x"}}),
    (MR, {**GOOD_ROUTE, "downgradeBackend": "small", "tiers": TWO_TIERS, "judge": {"backend": "small"},
          "escalation": {"enabled": True}, "rules": [{"match": {"minPromptTokens": 5, "maxPromptTokens": 5}, "backend": "big"}],
          "backends": [{**GOOD_ROUTE["backends"][0], "deploymentRef": {"name": "llama"},
                        "scaling": {"minReplicas": 0, "maxReplicas": 1, "idleToZeroAfter": "30m",
                                    "wake": {"mode": "Fallback", "timeout": "1s"}}},
                       GOOD_ROUTE["backends"][1]]}),
    (MR, {**GOOD_ROUTE, "escalation": {"enabled": False}}),
    # Prices from the catalog or a pin: pricing left out, or only some fields of it set; the one
    # currency rule compares only the backends that set pricing.
    (MR, {**GOOD_ROUTE, "backends": [{k: v for k, v in GOOD_ROUTE["backends"][0].items() if k != "pricing"},
                                     {**GOOD_ROUTE["backends"][1], "pricing": {"output": "12", "currency": "EUR"}}]}),
]


def test_valid_specs_and_the_examples_pass_every_rule(cel):
    specs = VALID + _examples()
    for kind, spec in specs:
        assert validate_spec(kind, spec)[1] is None, spec  # valid for pydantic too
        assert cel.violations(kind, spec) == [], spec


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_each_case_breaks_exactly_its_rule(cel, case: Case):
    assert cel.violations(case.kind, spec_of(case)) == [(case.where, case.message)]
