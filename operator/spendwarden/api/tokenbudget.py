"""TokenBudget: what one team/namespace may spend per period."""
from __future__ import annotations

from decimal import Decimal
from typing import Annotated

from pydantic import ConfigDict, Field, model_validator

from ..enums import BudgetState, FailMode, OnExceeded, PeriodType
from .common import ApiModel, Condition, Duration, Money, SecretKey, SecretName, cel, parse_duration

KIND = "TokenBudget"
PLURAL = "tokenbudgets"
SINGULAR = "tokenbudget"
SHORT_NAMES = ["tb"]










class Period(ApiModel):
    """A calendar-aligned budget period."""

    type: PeriodType = Field(description="Daily, Weekly (starting Monday) or Monthly; aligned to the calendar of timeZone.")
    timeZone: str = Field(default="UTC", max_length=64,
                          description="IANA time zone whose calendar the period follows, e.g. Europe/Berlin. Default UTC.")

    @model_validator(mode="after")
    def _known_zone(self) -> Period:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
        try:
            ZoneInfo(self.timeZone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown timeZone {self.timeZone!r}: use an IANA name such as Europe/Berlin") from exc
        return self


class TokenLimits(ApiModel):
    """Token limits for one period; any of them may be set."""

    model_config = ConfigDict(json_schema_extra=cel(
        ("has(self.total) || has(self.input) || has(self.output)",
         "limits.tokens needs at least one of total, input, output")))

    total: int | None = Field(default=None, ge=1, description="Maximum input + output tokens per period.")
    input: int | None = Field(default=None, ge=1, description="Maximum input (prompt) tokens per period.")
    output: int | None = Field(default=None, ge=1, description="Maximum output (completion) tokens per period.")

    @model_validator(mode="after")
    def _one_set(self) -> TokenLimits:
        if self.total is None and self.input is None and self.output is None:
            raise ValueError("limits.tokens needs at least one of total, input, output")
        return self


class CostLimit(ApiModel):
    """A money limit for one period."""

    amount: Money = Field(description="Maximum spend per period as a decimal string, e.g. \"250.00\".")
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$", max_length=3,
                          description="ISO 4217 currency code; must match the currency of the routes' prices. Default USD.")


class Limits(ApiModel):
    """What may be spent per period: tokens and/or money. Whichever runs out first ends the period's allowance."""

    model_config = ConfigDict(json_schema_extra=cel(
        ("has(self.tokens) || has(self.cost)", "limits needs tokens or cost (or both)")))

    tokens: TokenLimits | None = Field(default=None, description="Token limits.")
    cost: CostLimit | None = Field(default=None, description="Money limit, priced with each backend's prices.")

    @model_validator(mode="after")
    def _one_set(self) -> Limits:
        if self.tokens is None and self.cost is None:
            raise ValueError("limits needs tokens or cost (or both)")
        return self


class WebhookSecretRef(ApiModel):
    """A Secret key in the budget's namespace that holds a webhook URL."""

    name: SecretName = Field(description="Name of the Secret in the budget's namespace (the chart lets the operator read "
                             "only Secrets named as its alerting.webhookSecretName value, default spendwarden-alerting).")
    key: SecretKey = Field(default="url", description="Key in the Secret whose value is the URL. Default url.")


class Alerting(ApiModel):
    """Where threshold alerts go besides Kubernetes Events and metrics."""

    model_config = ConfigDict(json_schema_extra=cel(
        ("!(has(self.webhookURL) && has(self.webhookSecretRef))",
         "alerting: set webhookURL or webhookSecretRef, not both")))

    webhookURL: str | None = Field(default=None, max_length=2048, pattern=r"^https?://",
                                   description="URL that receives a Slack-compatible JSON POST when a threshold is crossed, the "
                                               "budget is exhausted or forecast to run out. Anyone who can read the budget can read "
                                               "it: prefer webhookSecretRef (a Slack webhook URL is a credential).")
    webhookSecretRef: WebhookSecretRef | None = Field(default=None,
                                                      description="The webhook URL from a Secret in the budget's namespace.")

    @model_validator(mode="after")
    def _one_destination(self) -> Alerting:
        if self.webhookURL is not None and self.webhookSecretRef is not None:
            raise ValueError("alerting: set webhookURL or webhookSecretRef, not both")
        return self


class HardCeiling(ApiModel):
    """Absolute per-period amounts beyond which even downgraded requests are refused."""

    model_config = ConfigDict(json_schema_extra=cel(
        ("has(self.tokens) || has(self.cost)", "downgrade.hardCeiling needs tokens or cost (or both)")))

    tokens: int | None = Field(default=None, ge=1, description="Maximum input + output tokens per period, downgraded requests included.")
    cost: Money | None = Field(default=None, description="Maximum spend per period, downgraded requests included, in the limit's currency.")

    @model_validator(mode="after")
    def _one_set(self) -> HardCeiling:
        if self.tokens is None and self.cost is None:
            raise ValueError("downgrade.hardCeiling needs tokens or cost (or both)")
        return self


class Downgrade(ApiModel):
    """How far onExceeded: Downgrade may go past the limits."""

    hardCeiling: HardCeiling | None = Field(default=None,
                                            description="Past the limits requests go to the cheap backend until this "
                                                        "ceiling, then they are refused like CutOff. None: no ceiling.")


_HARD = "has(self.downgrade) && has(self.downgrade.hardCeiling)"


class TokenBudgetSpec(ApiModel):
    """What a team/namespace may spend per period, and what happens when it is spent."""

    # What _coherent checks, except the window's 1m minimum (CEL cannot add up "1h30m"-style parts).
    # The ceiling against the cost limit compares doubles: exact to about 15 digits, and the
    # webhook and the operator compare the decimals exactly.
    model_config = ConfigDict(json_schema_extra=cel(
        ("!(has(self.period) && has(self.window))", "set either period or window, not both"),
        ("has(self.period) || has(self.window)", "one of period or window is required"),
        (f"!({_HARD}) || !has(self.onExceeded) || self.onExceeded == 'Downgrade'",
         "downgrade.hardCeiling applies only with onExceeded: Downgrade"),
        (f"!({_HARD} && has(self.downgrade.hardCeiling.tokens) && has(self.limits.tokens) && "
         "has(self.limits.tokens.total)) || self.downgrade.hardCeiling.tokens >= self.limits.tokens.total",
         "downgrade.hardCeiling.tokens is below limits.tokens.total: the ceiling is absolute and must be at least the limit"),
        (f"!({_HARD} && has(self.downgrade.hardCeiling.cost) && has(self.limits.cost)) || "
         "double(self.downgrade.hardCeiling.cost) >= double(self.limits.cost.amount)",
         "downgrade.hardCeiling.cost is below limits.cost.amount: the ceiling is absolute and must be at least the limit")))

    period: Period | None = Field(default=None, description="A calendar period. Exactly one of period and window must be set.")
    window: Duration | None = Field(default=None, description="A rolling window instead of a calendar period, e.g. \"24h\".")
    limits: Limits = Field(description="Token and/or cost limits per period.")
    # 1..100 in the CRD's item schema only: _coherent's own message names the bad threshold.
    thresholds: list[Annotated[int, Field(json_schema_extra={"minimum": 1, "maximum": 100})]] = Field(
        default_factory=lambda: [50, 80, 95], max_length=10,
        description="Percentages of the limit that raise an alert, ascending. Default 50, 80, 95.",
        json_schema_extra=cel(("self.isSorted() && self.all(t, self.exists_one(u, u == t))",
                               "thresholds must be strictly ascending, e.g. [50, 80, 95]")))
    onExceeded: OnExceeded = Field(default=OnExceeded.CUT_OFF,
                                   description="CutOff refuses requests, Downgrade routes to the cheapest backend, AlertOnly only reports.")
    failMode: FailMode = Field(default=FailMode.OPEN,
                               description="What proxies do when the operator is unreachable and their lease has expired: Open goes on, Closed refuses.")
    routes: list[Annotated[str, Field(max_length=256)]] = Field(
        default_factory=list, max_length=64,
        description="Model aliases (ModelRoute spec.model) this budget covers; empty means every route of the namespace.")
    alerting: Alerting | None = Field(default=None, description="Extra alert destinations.")
    downgrade: Downgrade | None = Field(default=None, description="Options of onExceeded: Downgrade (a hard ceiling).")

    @model_validator(mode="after")
    def _coherent(self) -> TokenBudgetSpec:
        if self.period is not None and self.window is not None:
            raise ValueError("set either period or window, not both")
        if self.period is None and self.window is None:
            raise ValueError("one of period or window is required")
        if self.window is not None and parse_duration(self.window).total_seconds() < 60:
            raise ValueError(f"window {self.window!r} is shorter than the 1m minimum")
        for t in self.thresholds:
            if not 1 <= t <= 100:
                raise ValueError(f"threshold {t} is outside 1..100")
        if any(b <= a for a, b in zip(self.thresholds, self.thresholds[1:])):
            raise ValueError(f"thresholds must be strictly ascending, got {self.thresholds}")
        self._check_hard_ceiling()
        return self

    def _check_hard_ceiling(self) -> None:
        hard = self.downgrade.hardCeiling if self.downgrade is not None else None
        if hard is None:
            return
        if self.onExceeded is not OnExceeded.DOWNGRADE:
            raise ValueError(f"downgrade.hardCeiling applies only with onExceeded: Downgrade, not {self.onExceeded.value}")
        tokens, cost = self.limits.tokens, self.limits.cost
        if hard.tokens is not None and tokens is not None and tokens.total is not None and hard.tokens < tokens.total:
            raise ValueError(f"downgrade.hardCeiling.tokens ({hard.tokens}) is below limits.tokens.total ({tokens.total}): "
                             "the ceiling is absolute and must be at least the limit")
        if hard.cost is not None and cost is not None and Decimal(hard.cost) < Decimal(cost.amount):
            raise ValueError(f"downgrade.hardCeiling.cost ({hard.cost}) is below limits.cost.amount ({cost.amount}): "
                             "the ceiling is absolute and must be at least the limit")


class Usage(ApiModel):
    """Usage within the current period."""

    inputTokens: int = Field(default=0, ge=0, description="Input (prompt) tokens used.")
    outputTokens: int = Field(default=0, ge=0, description="Output (completion) tokens used.")
    totalTokens: int = Field(default=0, ge=0, description="Input + output tokens used.")
    cost: Money = Field(default="0", description="Money spent, as a decimal string in the limit's currency.")


class Remaining(ApiModel):
    """What is left of the period's allowance."""

    tokens: int | None = Field(default=None, description="Tokens left under the tightest token limit, if any.")
    cost: Money | None = Field(default=None, description="Money left under the cost limit, if any.")


class BreakdownRow(ApiModel):
    """Usage of one (route, backend, tag, workload) in a period, as the proxies reported it."""

    route: str = Field(description="ModelRoute name; (other) for rows beyond the cap.")
    backend: str = Field(description="Backend name within the route.")
    tag: str | None = Field(default=None, description="The requests' scenario tag (x-spendwarden-tags: scenario=...); absent when none.")
    workload: str | None = Field(default=None, description="The calling ServiceAccount, when the gateway served the requests (it authenticates each); absent for sidecars.")
    inputTokens: int = Field(default=0, ge=0, description="Input (prompt) tokens.")
    outputTokens: int = Field(default=0, ge=0, description="Output (completion) tokens.")
    cost: Money = Field(default="0", description="Money spent, as a decimal string.")
    requests: int = Field(default=0, ge=0, description="Requests settled.")


class PeriodTotal(ApiModel):
    """The totals of a finished period, kept for reports."""

    periodStart: str = Field(description="Start of the period (RFC 3339).")
    periodEnd: str = Field(description="End of the period (RFC 3339).")
    used: Usage = Field(description="What was used in that period.")
    breakdown: list[BreakdownRow] = Field(default_factory=list, max_length=16,
                                          description="Where it went: the most expensive (route, backend, tag) rows, the rest as (other).")


class TokenBudgetStatus(ApiModel):
    """Observed state of a TokenBudget, written by the operator."""

    observedGeneration: int | None = Field(default=None, description="The metadata.generation last acted on.")
    periodStart: str | None = Field(default=None, description="Start of the current period (RFC 3339).")
    periodEnd: str | None = Field(default=None, description="End of the current period: when usage resets (RFC 3339).")
    used: Usage | None = Field(default=None, description="Usage in the current period.")
    remaining: Remaining | None = Field(default=None, description="What is left in the current period.")
    percentUsed: int | None = Field(default=None, description="Percentage of the tightest limit used (whole percent, floor).")
    state: BudgetState | None = Field(default=None, description="Active, Warning (a threshold crossed) or Exceeded.")
    limitSummary: str | None = Field(default=None, description="The limits in short form, for kubectl get.")
    usedSummary: str | None = Field(default=None, description="The usage in short form, for kubectl get.")
    forecastExhaustion: str | None = Field(default=None, description="When the budget runs out at the recent burn rate (RFC 3339), if within the period.")
    history: list[PeriodTotal] = Field(default_factory=list, max_length=12, description="Totals of the last finished periods, newest first.")
    breakdown: list[BreakdownRow] = Field(default_factory=list, max_length=32,
                                          description="Usage in the current period per (route, backend, tag), most expensive first; "
                                                      "usage of proxies that report none is not in it (spendwarden report shows it as unattributed).")
    conditions: list[Condition] = Field(default_factory=list, description="Ready, Exceeded and ForecastExhausted (the recent burn rate exhausts the budget before the period ends) conditions.")


class TokenBudget(ApiModel):
    """A spend budget for the routes of one namespace."""

    spec: TokenBudgetSpec = Field(description="The desired budget.")
    status: TokenBudgetStatus | None = Field(default=None, description="The observed state, written by the operator.")


PRINTER_COLUMNS = [
    {"name": "Limit", "type": "string", "jsonPath": ".status.limitSummary", "description": "Limits per period"},
    {"name": "Used", "type": "string", "jsonPath": ".status.usedSummary", "description": "Usage in this period"},
    {"name": "%", "type": "integer", "jsonPath": ".status.percentUsed", "description": "Percent of the tightest limit used"},
    {"name": "State", "type": "string", "jsonPath": ".status.state", "description": "Active, Warning or Exceeded"},
    # A string, not a date: kubectl renders date columns as an age, and a future reset shows "<invalid>".
    {"name": "Resets", "type": "string", "jsonPath": ".status.periodEnd", "description": "When usage resets (UTC)"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]
