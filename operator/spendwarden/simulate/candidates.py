"""Candidate policies for `spendwarden simulate`: ModelRoute files and a TokenBudget file.

Each --route file is one candidate: a YAML (or JSON) file with one or more ModelRoute manifests,
or a bare ModelRoute spec. Every spec is validated by the API model, so a candidate that would be
refused by the cluster is refused here too, with the field path of each error.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError

from ..api import modelroute, tokenbudget
from ..api.modelroute import ModelRouteSpec
from ..api.tokenbudget import TokenBudgetSpec
from ..api.validation import explain_validation_error
from ..prices import pins
from ..prices.resolve import PriceBook, resolve_route


class CandidateError(ValueError):
    """A route or budget file that cannot be used; the message names the file."""


@dataclass(frozen=True, slots=True)
class Candidate:
    name: str
    path: str
    routes: dict[str, ModelRouteSpec]  # by alias (spec.model)

    def route_for(self, alias: str | None) -> ModelRouteSpec | None:
        """The route serving `alias`; a single-route candidate serves every alias, so a log can be
        replayed against a route whose alias differs from the one the log recorded."""
        if alias is not None and alias in self.routes:
            return self.routes[alias]
        if len(self.routes) == 1:
            return next(iter(self.routes.values()))
        return None


@dataclass(frozen=True, slots=True)
class Budget:
    name: str
    spec: TokenBudgetSpec

    def covers(self, alias: str) -> bool:
        return not self.spec.routes or alias in self.spec.routes


def _documents(path: str) -> list[Any]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise CandidateError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise CandidateError(f"{path}: invalid YAML: {exc}") from None


def _objects(path: str, kind: str) -> list[tuple[str, Any]]:
    """(name, spec) of every `kind` manifest in the file; a file of one bare spec counts as one."""
    docs = _documents(path)
    found: list[tuple[str, Any]] = []
    others: set[str] = set()
    for doc in docs:
        if not isinstance(doc, dict):
            raise CandidateError(f"{path}: expected a {kind} manifest (a mapping), got {type(doc).__name__}")
        items = doc.get("items", []) if doc.get("kind") == "List" else [doc]
        for item in items:
            if not isinstance(item, dict):
                continue
            if item.get("kind") == kind:
                name = (item.get("metadata") or {}).get("name") or os.path.splitext(os.path.basename(path))[0]
                found.append((name, item.get("spec")))
            elif "kind" in item:
                others.add(str(item.get("kind")))
            elif len(docs) == 1:
                # A bare spec (no apiVersion/kind/metadata).
                found.append((os.path.splitext(os.path.basename(path))[0], item.get("spec", item)))
    if not found:
        extra = f" (found {', '.join(sorted(others))})" if others else ""
        raise CandidateError(f"{path}: no {kind} in the file{extra}")
    return found


def _validate(path: str, kind: str, name: str, spec: Any, model: Any) -> Any:
    if not isinstance(spec, dict):
        raise CandidateError(f"{path}: {kind} {name!r}: spec must be a mapping")
    try:
        return model.model_validate(spec)
    except ValidationError as exc:
        raise CandidateError(f"{path}: {kind} {name!r} is invalid: {explain_validation_error(exc)}") from None


def load_candidate(path: str, prices: PriceBook | None = None) -> Candidate:
    """`prices`: pins and catalog for the prices the routes leave unset, resolved as the operator does
    (default: the catalog alone)."""
    routes: dict[str, ModelRouteSpec] = {}
    names = []
    book = prices if prices is not None else pins.current()
    for name, raw in _objects(path, modelroute.KIND):
        priced = resolve_route(_validate(path, modelroute.KIND, name, raw, ModelRouteSpec), book)
        if isinstance(priced, str):
            raise CandidateError(f"{path}: {modelroute.KIND} {name!r}: {priced}")
        spec = priced[0]
        if spec.model in routes:
            raise CandidateError(f"{path}: two ModelRoutes serve the alias {spec.model!r}")
        routes[spec.model] = spec
        names.append(name)
    label = names[0] if len(names) == 1 else os.path.splitext(os.path.basename(path))[0]
    return Candidate(name=label, path=path, routes=routes)


def load_candidates(paths: list[str], prices: PriceBook | None = None) -> list[Candidate]:
    """Candidates in command-line order; names made unique (file name appended when two clash)."""
    cands = [load_candidate(p, prices) for p in paths]
    seen: dict[str, int] = {}
    out = []
    for c in cands:
        n = seen.get(c.name, 0)
        seen[c.name] = n + 1
        if n or sum(1 for d in cands if d.name == c.name) > 1:
            c = Candidate(name=f"{c.name} ({os.path.basename(c.path)})", path=c.path, routes=c.routes)
        out.append(c)
    return out


def load_budget(path: str) -> Budget:
    found = _objects(path, tokenbudget.KIND)
    if len(found) > 1:
        raise CandidateError(f"{path}: {len(found)} TokenBudgets in the file; simulate takes one")
    name, raw = found[0]
    return Budget(name=name, spec=_validate(path, tokenbudget.KIND, name, raw, TokenBudgetSpec))
