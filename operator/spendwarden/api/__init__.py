"""The spendwarden.io/v1alpha1 API: one pydantic model per CRD, the single source of truth."""
from .modelroute import ModelRoute, ModelRouteSpec
from .proxyconfig import ProxyConfig
from .tokenbudget import TokenBudget, TokenBudgetSpec

__all__ = ["ModelRoute", "ModelRouteSpec", "ProxyConfig", "TokenBudget", "TokenBudgetSpec"]
