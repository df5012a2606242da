"""crds/ is generated from the models; a stale file fails here, and the schemas stay structural."""
from __future__ import annotations

from pathlib import Path

import yaml

from spendwarden.api.crdgen import all_crds, render_yaml

ROOT = Path(__file__).resolve().parents[2]


def test_crds_directory_is_up_to_date():
    for filename, manifest in all_crds().items():
        path = ROOT / "crds" / filename
        assert path.exists(), f"{path} missing: run `spendwarden crds`"
        assert path.read_text() == render_yaml(manifest), f"{path} is stale: run `spendwarden crds`"


def _walk(schema, path="$"):
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if "items" in schema:
        yield from _walk(schema["items"], f"{path}[]")


def test_schemas_are_structural_and_documented():
    for manifest in all_crds().values():
        schema = manifest["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for path, node in _walk(schema):
            for banned in ("$ref", "anyOf", "allOf", "oneOf", "title", "const"):
                assert banned not in node, f"{path} has {banned}"
            assert node.get("default", 1) not in (None, ""), f"{path}: apiserver 1.20 rejects null/empty defaults"
            assert "type" in node or path.endswith("metadata") or node.get("x-kubernetes-preserve-unknown-fields"), path
            top_level = path.count(".") == 1 and path.split(".")[1] in ("apiVersion", "kind", "metadata")
            scalar_item = path.endswith("[]") and node.get("type") in ("string", "integer", "boolean")
            if not top_level and not scalar_item and path != "$":
                assert node.get("description"), f"{path} has no description (kubectl explain would be empty)"


def test_no_floats_in_money_fields():
    for manifest in all_crds().values():
        schema = manifest["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for path, node in _walk(schema):
            assert node.get("type") != "number", f"{path} is a float"


def test_printer_columns():
    crds = {m["spec"]["names"]["kind"]: m for m in all_crds().values()}

    def cols(kind: str) -> list[str]:
        return [c["name"] for c in crds[kind]["spec"]["versions"][0]["additionalPrinterColumns"]]

    assert cols("TokenBudget") == ["Limit", "Used", "%", "State", "Resets", "Age"]
    assert cols("ModelRoute") == ["Model", "Default", "Backends", "Ready", "Age"]
    assert crds["TokenBudget"]["spec"]["names"]["shortNames"] == ["tb"]
    assert crds["ModelRoute"]["spec"]["names"]["shortNames"] == ["mr"]
    assert yaml.safe_load(render_yaml(crds["ModelRoute"]))["spec"]["scope"] == "Namespaced"


def test_crds_without_cel_differ_only_by_the_rules(tmp_path):
    """`spendwarden crds --no-cel --out DIR`: for apiservers before 1.23 (x-kubernetes-validations unknown)."""
    import argparse

    from spendwarden.cli import crds as crdcmd

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "x-kubernetes-validations"}
        return [strip(v) for v in node] if isinstance(node, list) else node

    plain = all_crds(cel=False)
    assert "x-kubernetes-validations" not in str(plain)
    assert plain == strip(all_crds())
    parser = argparse.ArgumentParser()
    crdcmd.add_arguments(parser)
    assert crdcmd.run(parser.parse_args(["--no-cel"])) == 2  # would overwrite crds/
    assert crdcmd.run(parser.parse_args(["--no-cel", "--out", str(tmp_path)])) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(plain)
    assert "x-kubernetes-validations" not in "".join(p.read_text() for p in tmp_path.iterdir())
