"""The CRDs' CEL rules (x-kubernetes-validations) on a real apiserver with no operator and no webhook:
each invalid spec of tests/unit/cel_cases.py is refused by `kubectl apply` with the rule's message
on the field it names, and valid specs (those the unit tests evaluate offline) are accepted, so the
apiserver compiled every rule and accepted the CRDs' estimated cost. Skipped on apiservers without
CEL for CRDs (before 1.25)."""
from __future__ import annotations

import pytest
import yaml
from kubernetes import client

from spendwarden.render import injection

from ..unit.cel_cases import CASES, TB, Case, spec_of
from ..unit.test_api_validation import GOOD_BUDGET
from ..unit.test_cel_rules import VALID

GROUP, VERSION = "spendwarden.io", "v1alpha1"


@pytest.fixture(scope="module")
def cel_apiserver(kube) -> None:
    info = client.VersionApi(kube).get_code()
    version = injection.parse_server_version(info.major, info.minor, info.git_version)
    if version is None or version < (1, 25):
        pytest.skip(f"apiserver {info.git_version} does not run CEL validation rules of CRDs (1.25+)")


def _manifest(kind: str, name: str, spec: dict) -> str:
    return yaml.safe_dump({"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": spec})


def _apply(control_plane, namespace, kind, name, spec, *flags):
    return control_plane.kubectl("apply", "-n", namespace, *flags, "-f", "-", input=_manifest(kind, name, spec),
                                 check=False)


def test_the_apiserver_keeps_the_rules(control_plane, cel_apiserver):
    """Not dropped (a disabled feature gate would drop them silently)."""
    for plural in ("tokenbudgets", "modelroutes"):
        crd = yaml.safe_load(control_plane.kubectl("get", "crd", f"{plural}.{GROUP}", "-o", "yaml").stdout)
        spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        assert spec.get("x-kubernetes-validations"), plural


def test_valid_specs_are_accepted(control_plane, namespace, cel_apiserver):
    for i, (kind, spec) in enumerate(VALID):
        res = _apply(control_plane, namespace, kind, f"valid-{i}", spec)
        assert res.returncode == 0, f"{kind} valid-{i} refused:\n{res.stderr}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_invalid_spec_is_refused_with_the_rules_message(control_plane, namespace, cel_apiserver, case: Case):
    # Server-side dry run: the apiserver validates (CEL included) and stores nothing.
    res = _apply(control_plane, namespace, case.kind, case.id, spec_of(case), "--dry-run=server")
    assert res.returncode != 0, f"{case.kind} {case.id} was accepted: {res.stdout}"
    assert f"{case.where}: Invalid value" in res.stderr and case.message in res.stderr, res.stderr


def test_thresholds_outside_1_to_100_are_refused_by_the_item_schema(control_plane, namespace, cel_apiserver):
    res = _apply(control_plane, namespace, TB, "thresholds", {**GOOD_BUDGET, "thresholds": [0, 50]}, "--dry-run=server")
    assert res.returncode != 0 and "spec.thresholds[0]" in res.stderr, res.stderr
    assert "should be greater than or equal to 1" in res.stderr, res.stderr
