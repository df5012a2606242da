"""Prometheus metrics, named after the OpenTelemetry GenAI conventions where they fit.

Labels are bounded by the configuration (namespace, alias, route, backend, upstream model, budget)
and small enums (token type, outcome, operation); never user ids or prompts. Request tags
(x-spendwarden-tags) appear only in spendwarden_tagged_cost_total, capped: at most MAX_TAG_KEYS tag
names and MAX_TAG_VALUES values per name per process, the rest counted under "(other)".

Per-request metrics are aggregated in plain Python structures (one dict lookup and a few list
increments per request, no locks: everything runs on the event loop) and turned into metric
families only when /metrics is scraped. prometheus_client's own Histogram costs ~1.5 us per
observation with a lock and a Python loop over the buckets; a request records about eight.
"""
from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

# OTel GenAI bucket advice.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)

# gen_ai.provider.name well-known values (OpenTelemetry GenAI semantic conventions).
OTEL_PROVIDER = {"OpenAI": "openai", "Anthropic": "anthropic", "OpenAICompatible": "openai_compatible"}

MAX_TAG_KEYS = 8
MAX_TAG_VALUES = 50
OTHER = "(other)"
MAX_WORKLOADS = 100             # ServiceAccounts per namespace in the gateway's workload metrics
MAX_WORKLOAD_NAMESPACES = 2_000

BASE = ("namespace", "gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model",
        "gen_ai_response_model", "route", "backend")
# cached_input and cache_write are parts of input, reasoning a part of output (billed as output).
TOKEN_TYPES = ("input", "output", "cached_input", "cache_write", "reasoning")


class _Hist:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        acc = 0
        for bound, n in zip(self.bounds, self.counts):
            acc += n
            out.append((_fmt(bound), acc))
        out.append(("+Inf", acc + self.counts[-1]))
        return out


def _fmt(bound: float) -> str:
    return repr(float(bound))


class _Series:
    """Everything recorded for one label set (namespace, operation, provider, alias, model, route, backend)."""

    __slots__ = ("tokens", "cost", "currency", "duration", "ttft", "overhead")

    def __init__(self, currency: str):
        self.tokens = [_Hist(TOKEN_BUCKETS) for _ in TOKEN_TYPES]
        self.cost = 0.0
        self.currency = currency
        self.duration: dict[str, _Hist] = {}
        self.ttft = _Hist(TTFT_BUCKETS)
        self.overhead = _Hist(OVERHEAD_BUCKETS)


def _observe_parts(s: _Series, usage: Any) -> None:
    """The prompt's cache reads and writes (parts of its input tokens) and the hidden reasoning (a
    part of its output), only when there were any."""
    if usage.cached_input_tokens:
        s.tokens[2].observe(usage.cached_input_tokens)
    if usage.cache_write_tokens:
        s.tokens[3].observe(usage.cache_write_tokens)
    reasoning = getattr(usage, "reasoning_tokens", 0)
    if reasoning:
        s.tokens[4].observe(reasoning)


class _RequestCollector:
    def __init__(self, metrics: Metrics):
        self.m = metrics

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[Any]:
        series = list(self.m.series.items())
        tok = HistogramMetricFamily("gen_ai_client_token_usage", "Tokens used per request (provider's numbers; the "
                                    "cached_input and cache_write types are parts of input, reasoning a part of output).",
                                    labels=BASE + ("gen_ai_token_type",))
        cost = CounterMetricFamily("spendwarden_cost", "Money spent, priced with the backend's prices.",
                                   labels=BASE + ("currency",))
        dur = HistogramMetricFamily("gen_ai_client_operation_duration_seconds",
                                    "Request duration as seen by the app (through the proxy).",
                                    labels=BASE + ("outcome",))
        ttft = HistogramMetricFamily("gen_ai_server_time_to_first_token_seconds",
                                     "Time from request to the first streamed chunk sent to the app.", labels=BASE)
        over = HistogramMetricFamily("spendwarden_proxy_overhead_seconds",
                                     "Time spent in the proxy itself (request duration minus upstream time), "
                                     "non-streamed requests.", labels=BASE)
        for key, s in series:
            labels = list(key)
            for ttype, h in zip(TOKEN_TYPES, s.tokens):
                if h.counts and sum(h.counts):
                    tok.add_metric(labels + [ttype], h.buckets(), h.sum)
            if s.cost:
                cost.add_metric(labels + [s.currency], s.cost)
            for outcome, h in s.duration.items():
                dur.add_metric(labels + [outcome], h.buckets(), h.sum)
            if sum(s.ttft.counts):
                ttft.add_metric(labels, s.ttft.buckets(), s.ttft.sum)
            if sum(s.overhead.counts):
                over.add_metric(labels, s.overhead.buckets(), s.overhead.sum)
        req = CounterMetricFamily("spendwarden_requests", "Requests by outcome (ok, fallback, escalated, cache_hit, "
                                  "rejected, loop_detected, upstream_error, client_closed).",
                                  labels=("namespace", "route", "backend", "gen_ai_operation_name", "outcome", "status"))
        for key, n in list(self.m.requests.items()):
            req.add_metric(list(key), n)
        tagged = CounterMetricFamily("spendwarden_tagged_cost", "Money spent per request tag value "
                                     "(x-spendwarden-tags; bounded, overflow counted as (other)).",
                                     labels=("namespace", "tag", "value", "currency"))
        for key, value in list(self.m.tagged_cost.items()):
            tagged.add_metric(list(key), value)
        families = [tok, cost, dur, ttft, over, req, tagged]
        if self.m.workload_requests:
            wreq = CounterMetricFamily("spendwarden_gateway_workload_requests", "Requests the gateway served per "
                                       "calling ServiceAccount (bounded per namespace, overflow as (other)).",
                                       labels=("namespace", "serviceaccount", "outcome"))
            for key, n in list(self.m.workload_requests.items()):
                wreq.add_metric(list(key), n)
            wcost = CounterMetricFamily("spendwarden_gateway_workload_cost", "Money spent per calling "
                                        "ServiceAccount (bounded per namespace, overflow as (other)).",
                                        labels=("namespace", "serviceaccount", "currency"))
            for key, value in list(self.m.workload_cost.items()):
                wcost.add_metric(list(key), value)
            families += [wreq, wcost]
        return iter(families)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=False)
        self.series: dict[tuple[str, ...], _Series] = {}
        self.requests: dict[tuple[str, ...], int] = {}
        self.tagged_cost: dict[tuple[str, str, str, str], float] = {}
        self._tag_values: dict[str, set[str]] = {}
        self.workload_requests: dict[tuple[str, str, str], int] = {}
        self.workload_cost: dict[tuple[str, str, str], float] = {}
        self._workloads: dict[str, set[str]] = {}
        r.register(_RequestCollector(self))
        self.fallbacks = Counter("spendwarden_upstream_failures",
                                 "Upstream attempts that failed (and were retried on a fallback when one was left).",
                                 ("namespace", "route", "backend", "reason"), registry=r)
        self.wakes = Counter("spendwarden_backend_wakes",
                             "Requests for a scaled backend at zero replicas, by outcome (held, timeout, fallback, refused).",
                             ("namespace", "route", "backend", "outcome"), registry=r)
        self.budget_remaining_ratio = Gauge("spendwarden_budget_remaining_ratio",
                                            "Fraction of the tightest limit left in the current period.",
                                            ("namespace", "budget"), registry=r)
        self.budget_remaining_tokens = Gauge("spendwarden_budget_remaining_tokens",
                                             "Tokens left under the tightest token limit.", ("namespace", "budget"), registry=r)
        self.budget_remaining_cost = Gauge("spendwarden_budget_remaining_cost",
                                           "Money left under the cost limit.", ("namespace", "budget", "currency"), registry=r)
        self.budget_used_tokens = Gauge("spendwarden_budget_used_tokens", "Tokens used in the current period.",
                                        ("namespace", "budget", "gen_ai_token_type"), registry=r)
        self.budget_used_cost = Gauge("spendwarden_budget_used_cost", "Money spent in the current period.",
                                      ("namespace", "budget", "currency"), registry=r)
        self.budget_reserved = Gauge("spendwarden_budget_open_reservations",
                                     "Requests in flight holding a reservation.", ("namespace", "budget"), registry=r)
        self.config_reloads = Counter("spendwarden_config_reloads", "Configuration reloads by result.",
                                      ("result",), registry=r)
        # Ledger mode only (off the hot path: one report a second, so prometheus_client's own types).
        self.ledger_report_seconds = Histogram("spendwarden_ledger_report_duration_seconds",
                                               "Time for the ledger to answer one report (answered reports).",
                                               buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                                        1.0, 2.5, 5.0), registry=r)
        self.ledger_report_failures = Counter("spendwarden_ledger_report_failures",
                                              "Reports the ledger did not answer, by reason (unauthorized and "
                                              "forbidden: the token was refused).", ("reason",), registry=r)
        self.ledger_lease_ceiling = Gauge("spendwarden_ledger_lease_ceiling",
                                          "This proxy's lease ceiling per budget (most it may commit this period).",
                                          ("namespace", "budget", "dimension"), registry=r)
        self.ledger_lease_expiry = Gauge("spendwarden_ledger_lease_expiry_timestamp_seconds",
                                         "When this proxy's lease on the budget expires (the operator's expiresAt).",
                                         ("namespace", "budget"), registry=r)
        self.ledger_fail_mode = Gauge("spendwarden_ledger_fail_mode_active",
                                      "1 while the budget's lease has expired with the ledger unreachable (failMode "
                                      "Open: enforcing locally; Closed: refusing).", ("namespace", "budget"), registry=r)
        # Issue #7 (proxy/spend.py): only routes with tiers, a cache or a loop breaker touch these.
        self.tier_selections = Counter("spendwarden_tier_selections",
                                       "Requests routed by complexity, by tier and what decided (score or judge).",
                                       ("namespace", "route", "tier", "source"), registry=r)
        self.escalations = Counter("spendwarden_escalations",
                                   "Requests retried on the next tier because the answer failed a check, by cause "
                                   "(length, invalid_json, refusal, upstream_error).",
                                   ("namespace", "route", "from_tier", "to_tier", "cause"), registry=r)
        self.judge_calls = Counter("spendwarden_judge_calls",
                                   "Judge decisions near a tier boundary, by result (ok, cached, unparsed, failed, "
                                   "refused: the budget could not pay for it).", ("namespace", "route", "result"),
                                   registry=r)
        self.cache_lookups = Counter("spendwarden_cache_lookups",
                                     "Response cache lookups of deterministic requests (hit, miss) and answers stored.",
                                     ("namespace", "route", "result"), registry=r)
        self.cache_savings = Counter("spendwarden_cache_savings",
                                     "Money not spent thanks to cache hits (what the cached answers cost).",
                                     ("namespace", "route", "currency"), registry=r)
        self.loops_detected = Counter("spendwarden_loops_detected",
                                      "Requests refused with 429 loop_detected (the same request repeated too often).",
                                      ("namespace", "route"), registry=r)
        self.ledger_waits = Counter("spendwarden_ledger_lease_waits",
                                    "Requests that waited for a bigger lease, by result.", ("result",), registry=r)

    def attempt(self, namespace: str, operation: str, backend: Any, route: Any, usage: Any, cost: Any) -> None:
        """Tokens and cost of an upstream call that is not the request's final answer (an escalated
        first attempt, a judge call), so that spendwarden_cost stays the whole spend."""
        base = (namespace, operation, OTEL_PROVIDER.get(backend.provider, backend.provider), route.alias,
                backend.model, route.name, backend.name)
        s = self.series.get(base)
        if s is None:
            s = self.series[base] = _Series(backend.prices.currency)
        s.tokens[0].observe(usage.input_tokens)
        s.tokens[1].observe(usage.output_tokens)
        _observe_parts(s, usage)
        s.cost += float(cost)

    def request(self, base: tuple[str, ...] | None, currency: str, req_key: tuple[str, ...], outcome: str,
                duration: float, usage: Any, cost: float | None, ttft: float | None, overhead: float | None) -> None:
        """Record one finished request (cheap: no locks, no label validation)."""
        self.requests[req_key] = self.requests.get(req_key, 0) + 1
        if base is None:
            return
        s = self.series.get(base)
        if s is None:
            s = self.series[base] = _Series(currency)
        if usage is not None:
            s.tokens[0].observe(usage.input_tokens)
            if base[1] != "embeddings":
                s.tokens[1].observe(usage.output_tokens)
            _observe_parts(s, usage)
        if cost:
            s.cost += cost
        h = s.duration.get(outcome)
        if h is None:
            h = s.duration[outcome] = _Hist(DURATION_BUCKETS)
        h.observe(duration)
        if ttft is not None:
            s.ttft.observe(ttft)
        if overhead is not None:
            s.overhead.observe(overhead)

    def tagged(self, namespace: str, tags: dict[str, str], currency: str, cost: float) -> None:
        """Add one request's cost under each of its tags, within the cardinality caps."""
        for tag, value in tags.items():
            values = self._tag_values.get(tag)
            if values is None:
                if len(self._tag_values) >= MAX_TAG_KEYS:
                    tag, value = OTHER, OTHER
                    values = self._tag_values.setdefault(OTHER, {OTHER})
                else:
                    values = self._tag_values[tag] = set()
            if value not in values:
                if len(values) >= MAX_TAG_VALUES:
                    value = OTHER
                values.add(value)
            key = (namespace, tag, value, currency)
            self.tagged_cost[key] = self.tagged_cost.get(key, 0.0) + cost

    def workload(self, namespace: str, serviceaccount: str, outcome: str, currency: str | None,
                 cost: float | None) -> None:
        """One gateway request of a ServiceAccount; at most MAX_WORKLOADS of them per namespace
        (tenants create ServiceAccounts at will) and MAX_WORKLOAD_NAMESPACES namespaces."""
        known = self._workloads.get(namespace)
        if known is None:
            known = set() if len(self._workloads) < MAX_WORKLOAD_NAMESPACES else None
            if known is None:
                namespace, serviceaccount = OTHER, OTHER
                known = self._workloads.setdefault(OTHER, {OTHER})
            else:
                self._workloads[namespace] = known
        if serviceaccount not in known:
            if len(known) >= MAX_WORKLOADS:
                serviceaccount = OTHER
            known.add(serviceaccount)
        key = (namespace, serviceaccount, outcome)
        self.workload_requests[key] = self.workload_requests.get(key, 0) + 1
        if cost and currency:
            ckey = (namespace, serviceaccount, currency)
            self.workload_cost[ckey] = self.workload_cost.get(ckey, 0.0) + cost

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
