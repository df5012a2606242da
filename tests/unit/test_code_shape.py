"""The shape of the code that review alone does not keep: module size, and no hidden state in the
control plane (issue #15). The import layers are checked by import-linter (scripts/lint.sh)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "operator" / "spendwarden"
MAX_LINES = 500
REASON = "Longer than 500 lines:"
# Module-level calls that build immutable values or process-wide objects that are not state of ours.
IMMUTABLE_CALLS = {"frozenset", "tuple", "compile", "getLogger", "TypeVar", "Decimal", "timedelta", "field",
                   "namedtuple", "NewType", "MappingProxyType", "Path", "ParamSpec", "object"}
# prometheus_client's metrics live in its process-wide registry whatever module holds them.
METRIC_CALLS = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"}


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_long_module_says_why_at_its_top(path: Path):
    lines = path.read_text().count("\n")
    if lines <= MAX_LINES:
        return
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert REASON in doc, f"{path.relative_to(PACKAGE)} has {lines} lines: split it, or say why in its docstring ({REASON} ...)"


def _mutable_module_state(tree: ast.Module) -> list[str]:
    found = []
    for node in tree.body:
        value = node.value if isinstance(node, ast.Assign | ast.AnnAssign) else None
        if value is None:
            continue
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        names = [t.id for t in targets if isinstance(t, ast.Name)]
        if names == ["__all__"]:
            continue
        if isinstance(value, ast.Dict | ast.List | ast.Set | ast.DictComp | ast.ListComp | ast.SetComp):
            found.append(f"{', '.join(names)} (line {node.lineno}): a mutable {type(value).__name__}")
        elif isinstance(value, ast.Call):
            func = value.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name not in IMMUTABLE_CALLS | METRIC_CALLS:
                found.append(f"{', '.join(names)} (line {node.lineno}): an object built at import ({name})")
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            found.append(f"global {', '.join(node.names)} (line {node.lineno})")
    return found


@pytest.mark.parametrize("path", sorted((PACKAGE / "controller").glob("*.py")), ids=lambda p: p.name)
def test_the_control_plane_keeps_no_module_level_state(path: Path):
    """State lives in the objects the operator's runtime builds and hands out, not in module globals
    patched at import (constants must be immutable: tuples, frozensets, MappingProxyType)."""
    assert _mutable_module_state(ast.parse(path.read_text())) == []


def test_the_state_check_sees_state():
    tree = ast.parse("A = {}\nB = Registry()\nC = (1, 2)\nD = frozenset()\nlog = logging.getLogger(__name__)\n"
                     "def f():\n    global A\n")
    assert [s.split(" ")[0] for s in _mutable_module_state(tree)] == ["A", "B", "global"]


def test_the_readme_layout_table_matches_the_tree():
    """Every package of the code is in the README's Layout table, and every path there exists."""
    import re

    root = PACKAGE.parents[1]
    readme = (root / "README.md").read_text()
    table = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = {p.rstrip("/") for row in re.findall(r"^\| (.+?) \|", table, re.M) for p in re.findall(r"`([^`]+)`", row)}
    assert listed, "no Layout table in README.md"
    missing = sorted(p for p in listed if not (root / p).exists())
    assert not missing, f"README Layout lists paths that do not exist: {missing}"
    packages = {str(d.relative_to(root)) for d in PACKAGE.iterdir() if (d / "__init__.py").exists()}
    assert sorted(packages - listed) == [], "packages missing from README's Layout table"
