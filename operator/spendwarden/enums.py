"""The API's enumerations, without pydantic: the CRD models (spendwarden.api) use these classes, and
so does the proxy's pydantic-free configuration loader (spendwarden.plainconfig)."""
from __future__ import annotations

from enum import Enum


class PeriodType(str, Enum):
    DAILY = "Daily"
    WEEKLY = "Weekly"
    MONTHLY = "Monthly"


class OnExceeded(str, Enum):
    CUT_OFF = "CutOff"
    DOWNGRADE = "Downgrade"
    ALERT_ONLY = "AlertOnly"


class FailMode(str, Enum):
    OPEN = "Open"
    CLOSED = "Closed"


class BudgetState(str, Enum):
    ACTIVE = "Active"
    WARNING = "Warning"
    EXCEEDED = "Exceeded"


class Provider(str, Enum):
    OPENAI = "OpenAI"
    ANTHROPIC = "Anthropic"
    OPENAI_COMPATIBLE = "OpenAICompatible"


class WorkloadKind(str, Enum):
    DEPLOYMENT = "Deployment"
    STATEFULSET = "StatefulSet"


class WakeMode(str, Enum):
    HOLD = "Hold"
    FALLBACK = "Fallback"


class ConditionStatus(str, Enum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"

