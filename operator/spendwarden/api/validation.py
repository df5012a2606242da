"""Validating a CR's spec with its model, with errors in the words users write (spec.backends[0].x).

Shared by the reconcile, the ledger, the admission webhook, the simulator and the price pins, so a
spec is accepted or refused with the same message everywhere.
"""
from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from . import modelroute
from .modelroute import ModelRouteSpec
from .tokenbudget import TokenBudgetSpec


def explain_validation_error(exc: ValidationError) -> str:
    """One line per error, with the field path as users write it (spec.backends[0].pricing.input)."""
    lines = []
    for err in exc.errors():
        path = "spec"
        for part in err["loc"]:
            path += f"[{part}]" if isinstance(part, int) else f".{part}"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {msg}" if err["loc"] else f"spec: {msg}")
    return "; ".join(lines)


def validate_spec(kind: str, spec: Any) -> tuple[Any, str | None]:
    """(parsed spec, None) or (None, message)."""
    model = ModelRouteSpec if kind == modelroute.KIND else TokenBudgetSpec
    if not isinstance(spec, dict):
        return None, "spec: must be an object"
    try:
        return model.model_validate(spec), None
    except ValidationError as exc:
        return None, explain_validation_error(exc)
