"""Types shared by the CRD models: money, durations, conditions, object references.

Money is never a float: amounts are decimal strings in the API and `decimal.Decimal` in code.
"""
from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from ..enums import ConditionStatus
from ..plainconfig import parse_duration  # noqa: F401 (re-exported)

# At most 15 integer digits: a sane maximum for any budget or price (ledger/breakdown.py bounds the
# sums proxies report at 1e18).
DECIMAL_PATTERN = r"^[0-9]{1,15}(\.[0-9]+)?$"
DURATION_PATTERN = r"^([0-9]+(s|m|h|d|w))+$"

Money = Annotated[
    str,
    Field(pattern=DECIMAL_PATTERN, max_length=32,
          description="A non-negative decimal amount written as a string, e.g. \"12.50\" (never a float)."),
]
Duration = Annotated[
    str,
    Field(pattern=DURATION_PATTERN, max_length=32,
          description="A duration such as \"30m\", \"24h\", \"7d\" or \"1h30m\" (units s, m, h, d, w)."),
]

# A Duration that is zero (every part 0): for CEL rules, which cannot add up the parts.
ZERO_DURATION_REGEX = "^(0+[smhdw])+$"


def to_decimal(amount: str) -> Decimal:
    return Decimal(amount)


def cel(*rules: tuple[str, str]) -> dict[str, Any]:
    """json_schema_extra that carries (rule, message) pairs into the CRD as x-kubernetes-validations,
    so the apiserver refuses such objects itself (Kubernetes 1.25+), webhook or not. Each repeats a
    pydantic validator, which still serves the webhook, the CLI and apiservers without CEL.

    Compatible with every apiserver that runs CEL: no messageExpression, reason or fieldPath, no
    optionals; only Kubernetes' list library (isSorted) beyond standard CEL. A rule that iterates
    needs maxItems on its lists and maxLength on the strings it compares, or the apiserver refuses
    the CRD for its estimated cost."""
    return {"x-kubernetes-validations": [{"rule": rule, "message": message} for rule, message in rules]}


class ApiModel(BaseModel):
    """Base for every API object: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, use_enum_values=False,
                              validate_default=True)




class Condition(ApiModel):
    """A Kubernetes-style condition (see metav1.Condition)."""

    type: str = Field(description="The aspect this condition reports, e.g. Ready or Exceeded.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(description="A one-word CamelCase reason for the last transition.")
    message: str = Field(default="", description="A human-readable explanation of the status.")
    lastTransitionTime: str = Field(description="When the status last changed (RFC 3339).")
    observedGeneration: int | None = Field(default=None, description="The metadata.generation this condition was computed from.")


def now_rfc3339(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(conditions: list[dict], type_: str, status: str, reason: str, message: str,
                  generation: int | None = None, now: datetime | None = None) -> list[dict]:
    """Return conditions with `type_` set; lastTransitionTime moves only when the status changes."""
    out, found = [], False
    for cond in conditions or []:
        if cond.get("type") == type_:
            found = True
            changed = cond.get("status") != status
            cond = {**cond, "status": status, "reason": reason, "message": message,
                    "observedGeneration": generation,
                    "lastTransitionTime": now_rfc3339(now) if changed else cond.get("lastTransitionTime") or now_rfc3339(now)}
        out.append(cond)
    if not found:
        out.append({"type": type_, "status": status, "reason": reason, "message": message,
                    "observedGeneration": generation, "lastTransitionTime": now_rfc3339(now)})
    return out


class LocalObjectReference(ApiModel):
    name: str = Field(min_length=1, max_length=253, description="Name of the object in the same namespace.")


# Kubernetes' own syntax for a Secret's name (a DNS subdomain) and for a key of its data, except that a
# key may not start with "..", as the kubelet's own entries in a Secret volume do. The proxy reads
# <secrets dir>/<name>/<key>: neither can then name another directory ("/x", "..", "a/b").
SECRET_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
SECRET_KEY_PATTERN = r"^\.?[-_a-zA-Z0-9][-._a-zA-Z0-9]*$"
SecretName = Annotated[str, Field(min_length=1, max_length=253, pattern=SECRET_NAME_PATTERN)]
SecretKey = Annotated[str, Field(min_length=1, max_length=253, pattern=SECRET_KEY_PATTERN)]


class SecretKeyRef(ApiModel):
    name: SecretName = Field(description="Name of the Secret in the route's namespace.")
    key: SecretKey = Field(default="apiKey", description="Key in the Secret that holds the API key.")
