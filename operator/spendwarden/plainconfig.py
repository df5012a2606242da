"""The operator-rendered ProxyConfig, loaded without pydantic.

The sidecar's configuration was validated by the operator before it rendered it; validating it
again with the API models costs every pod ~11 MB of RSS (pydantic and the models) and start-up
time. This loader builds plain objects with the same attribute names, defaults and enum members as
the models (their fields come from plainconfig_schema.py, generated from the models and checked by
a unit test), so the proxy's compiler reads either. It checks structure and types (unknown fields,
missing required ones, wrong types, unknown enum values) and raises PlainConfigError; the models'
cross-field rules it does not repeat: a caller with a document of unknown origin validates it with
the models (proxy/config.py does when this loader refuses one).

Pure: imports nothing outside the standard library and spendwarden's own pure modules, so the
offline simulator can share it.
"""
from __future__ import annotations

import copy
import re
from datetime import timedelta
from typing import Any

from . import enums
from .plainconfig_schema import SCHEMA
from .spend.escalation import Cause

_ENUMS: dict[str, Any] = {name: getattr(enums, name, None) for name in SCHEMA["enums"]}
_ENUMS["Cause"] = Cause
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class PlainConfigError(ValueError):
    pass


def parse_duration(text: str) -> timedelta:
    parts = re.findall(r"([0-9]+)(s|m|h|d|w)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"invalid duration {text!r}: expected e.g. 30m, 24h, 7d")
    return timedelta(seconds=sum(int(n) * _DURATION_UNITS[u] for n, u in parts))


class Node:
    """One model's fields as attributes."""

    def __init__(self, model: str, values: dict[str, Any]):
        self.__dict__.update(values)
        self._model = model

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items() if k != "_model")
        return f"{self._model}({fields})"


def _value(code: str, value: Any, where: str) -> Any:
    kind, _, rest = code.partition(":")
    if kind == "model":
        return _node(rest, value, where)
    if kind == "list":
        if not isinstance(value, list):
            raise PlainConfigError(f"{where}: expected a list")
        return [_value(rest, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if kind == "dict":
        if not isinstance(value, dict):
            raise PlainConfigError(f"{where}: expected an object")
        return {k: _value(rest, v, f"{where}.{k}") for k, v in value.items()}
    if kind == "enum":
        try:
            return _ENUMS[rest](value)
        except ValueError:
            raise PlainConfigError(f"{where}: {value!r} is not a {rest}") from None
    ok = (kind == "any" or (kind == "str" and isinstance(value, str))
          or (kind == "int" and isinstance(value, int) and not isinstance(value, bool))
          or (kind == "bool" and isinstance(value, bool))
          or (kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool)))
    if not ok:
        raise PlainConfigError(f"{where}: expected {kind}, got {type(value).__name__}")
    return value


def _node(model: str, doc: Any, where: str) -> Node:
    fields = SCHEMA["models"][model]
    if not isinstance(doc, dict):
        raise PlainConfigError(f"{where or model}: expected an object")
    unknown = set(doc) - set(fields)
    if unknown:
        raise PlainConfigError(f"{where or model}: unknown field(s) {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for name, (code, required, nullable, default) in fields.items():
        path = f"{where}.{name}" if where else name
        if name in doc:
            value = doc[name]
        elif required:
            raise PlainConfigError(f"{path}: missing")
        else:
            value = copy.deepcopy(default)
        if value is None:
            if not nullable and name in doc:
                raise PlainConfigError(f"{path}: may not be null")
            values[name] = None
            continue
        values[name] = _value(code, value, path)
    return Node(model, values)


def load_proxy_config(doc: Any) -> Node:
    """A ProxyConfig document (parsed JSON) as plain objects; PlainConfigError when it is not one."""
    return _node("ProxyConfig", doc, "")
