"""The per-namespace proxy configuration: the contract between the operator (control plane) and
the sidecar proxies (data plane).

The operator renders it into the ConfigMap `spendwarden-proxy` (key `config.json`); a standalone
proxy reads the same document from a file. Routes and budgets embed the CRD specs unchanged, so a
spec means the same thing on both sides.
"""
from __future__ import annotations

from pydantic import Field

from .common import ApiModel
from .modelroute import ModelRouteSpec
from .tokenbudget import TokenBudgetSpec

CONFIGMAP_NAME = "spendwarden-proxy"
CONFIG_KEY = "config.json"
SCHEMA_VERSION = 1


class RouteEntry(ApiModel):
    name: str = Field(description="Name of the ModelRoute object.")
    spec: ModelRouteSpec


class BudgetEntry(ApiModel):
    name: str = Field(description="Name of the TokenBudget object.")
    spec: TokenBudgetSpec


class LedgerSettings(ApiModel):
    url: str | None = Field(default=None, description="Base URL of the operator's ledger API; none in standalone mode.")


class ProxyConfig(ApiModel):
    schemaVersion: int = SCHEMA_VERSION
    namespace: str = Field(description="The namespace whose routes and budgets this is.")
    routes: list[RouteEntry] = Field(default_factory=list, description="Valid routes, sorted by alias.")
    budgets: list[BudgetEntry] = Field(default_factory=list, description="Valid budgets, sorted by name.")
    ledger: LedgerSettings = Field(default_factory=LedgerSettings)

    def route_for(self, alias: str) -> RouteEntry | None:
        return next((r for r in self.routes if r.spec.model == alias), None)
