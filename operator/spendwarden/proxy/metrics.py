"""Prometheus metrics, named after the OpenTelemetry GenAI conventions where they fit.

Labels are bounded by the configuration (namespace, alias, route, backend, upstream model, budget)
and small enums (token type, outcome, operation); never user ids, tags or prompts.
"""
from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# OTel GenAI bucket advice.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)

BASE = ("namespace", "gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model",
        "gen_ai_response_model", "route", "backend")


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=False)
        self.tokens = Histogram("gen_ai_client_token_usage", "Tokens used per request (provider's numbers).",
                                BASE + ("gen_ai_token_type",), buckets=TOKEN_BUCKETS, registry=r)
        self.cost = Counter("spendwarden_cost", "Money spent, priced with the backend's prices.",
                            BASE + ("currency",), registry=r)
        self.duration = Histogram("gen_ai_client_operation_duration_seconds",
                                  "Request duration as seen by the app (through the proxy).",
                                  BASE + ("outcome",), buckets=DURATION_BUCKETS, registry=r)
        self.ttft = Histogram("gen_ai_server_time_to_first_token_seconds",
                              "Time from request to the first streamed chunk sent to the app.",
                              BASE, buckets=TTFT_BUCKETS, registry=r)
        self.overhead = Histogram("spendwarden_proxy_overhead_seconds",
                                  "Time spent in the proxy itself (request duration minus upstream time).",
                                  ("namespace", "route"), buckets=OVERHEAD_BUCKETS, registry=r)
        self.requests = Counter("spendwarden_requests", "Requests by outcome (ok, fallback, rejected, upstream_error).",
                                ("namespace", "route", "backend", "gen_ai_operation_name", "outcome", "status"), registry=r)
        self.fallbacks = Counter("spendwarden_upstream_failures",
                                 "Upstream attempts that failed (and were retried on a fallback when one was left).",
                                 ("namespace", "route", "backend", "reason"), registry=r)
        self.budget_remaining_ratio = Gauge("spendwarden_budget_remaining_ratio",
                                            "Fraction of the tightest limit left in the current period.",
                                            ("namespace", "budget"), registry=r)
        self.budget_remaining_tokens = Gauge("spendwarden_budget_remaining_tokens",
                                             "Tokens left under the tightest token limit.", ("namespace", "budget"), registry=r)
        self.budget_remaining_cost = Gauge("spendwarden_budget_remaining_cost",
                                           "Money left under the cost limit.", ("namespace", "budget", "currency"), registry=r)
        self.budget_reserved = Gauge("spendwarden_budget_open_reservations",
                                     "Requests in flight holding a reservation.", ("namespace", "budget"), registry=r)
        self.config_reloads = Counter("spendwarden_config_reloads", "Configuration reloads by result.",
                                      ("result",), registry=r)
        self._children: dict[Any, Any] = {}

    def child(self, metric: Any, labels: tuple[str, ...]) -> Any:
        key = (id(metric), labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def reset_children(self) -> None:
        self._children.clear()

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
