"""The proxy's last stage: one access-log line per request (no prompts, no keys) and its metrics."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson

from ..enums import Provider
from ..ledger.pricing import format_money
from ..routing.apis import OPERATION
from . import spend
from .estimate import reserved_prompt
from .metrics import OTEL_PROVIDER
from .request import RequestState, usage_source
from .state import ProxyState

log = logging.getLogger("spendwarden.proxy")


class AccessLog(ProxyState):
    """Mixed into Proxy: what a finished request leaves behind."""

    def _record(self, ctx: RequestState) -> None:
        dur = time.perf_counter() - ctx.t0
        cfg = self.compiled
        ns = cfg.namespace if cfg else ""
        b = ctx.backend
        op = OPERATION[ctx.api]
        route = ctx.route or ""
        base = None
        if ctx.route is not None and b is not None:
            base = (ns, op, OTEL_PROVIDER.get(b.provider, b.provider), ctx.alias or "", b.model, route, b.name)
        self.metrics.request(
            base, b.prices.currency if b else "", (ns, route, b.name if b else "", op, ctx.outcome, str(ctx.status)),
            ctx.outcome, dur, ctx.usage,  # the reservation too, when that is what was charged
            float(ctx.cost) if ctx.cost is not None else None, ctx.ttft,
            max(dur - ctx.upstream_time, 0.0) if not ctx.stream and ctx.upstream_time else None)
        if ctx.tags and ctx.cost and b is not None:
            self.metrics.tagged(ns, ctx.tags, b.prices.currency, float(ctx.cost))
        if ctx.serviceaccount:
            self.metrics.workload(ns, ctx.serviceaccount, ctx.outcome, b.prices.currency if b else None,
                                  float(ctx.cost) if ctx.cost is not None else None)
        u = ctx.usage
        if b is not None and u is not None and ctx.usage_known and not ctx.partial and ctx.est is not None \
                and b.provider == Provider.OPENAI_COMPATIBLE.value and ctx.prompt_bound is None:
            self.calibration.observe((b.route, b.name), reserved_prompt(ctx.est), u.input_tokens)
        line: dict[str, Any] = {
            "ts": round(time.time(), 3), "namespace": ns, "api": ctx.api, "model": ctx.alias,
            "route": ctx.route, "status": ctx.status, "outcome": ctx.outcome, "stream": ctx.stream,
            "duration_ms": round(dur * 1000, 3), "attempts": ctx.attempts}
        if b is not None:
            line["backend"] = b.name
            line["upstream_model"] = b.model
            line["currency"] = b.prices.currency
        if u is not None:
            line["input_tokens"] = u.input_tokens
            line["output_tokens"] = u.output_tokens
            line["cached_input_tokens"] = u.cached_input_tokens
            if u.reasoning_tokens:
                line["reasoning_tokens"] = u.reasoning_tokens  # a part of output_tokens
            if u.cache_write_tokens:
                line["cache_write_tokens"] = u.cache_write_tokens
                line["cache_write_1h_tokens"] = u.cache_write_1h_tokens
        source = usage_source(ctx)
        if source is not None:
            line["usage_source"] = source
        if ctx.cost is not None:
            line["cost"] = format_money(ctx.cost)
        if ctx.earlier:
            line["earlier_attempts"] = ctx.earlier  # billed, then a fallback answered: part of the charge
        if ctx.ttft is not None:
            line["ttft_ms"] = round(ctx.ttft * 1000, 3)
        if ctx.est is not None:
            line["est_prompt_tokens"] = ctx.est
        if ctx.prompt_bound is not None:
            line["reserved_prompt_tokens"] = ctx.prompt_bound  # a conversation continued upstream
        if ctx.max_output is not None:
            line["max_output_tokens"] = ctx.max_output
        if ctx.budgets:
            line["budgets"] = ctx.budgets
        if ctx.downgraded:
            line["downgraded"] = True
        if ctx.over_budget:
            line["over_budget"] = ctx.over_budget
        if ctx.translating:
            line["translated"] = True
        if ctx.tags:
            line["tags"] = ctx.tags
        if ctx.serviceaccount:
            line["serviceaccount"] = ctx.serviceaccount
        if ctx.error:
            line["error"] = ctx.error
        if ctx.sp is not None:
            spend.log_fields(ctx, line)
        try:
            self._out.write(orjson.dumps(line) + b"\n")
        except (OSError, ValueError):
            return
        if not self._flush_scheduled:
            # Batch the write syscalls: lines reach the log within 50 ms.
            self._flush_scheduled = True
            asyncio.get_running_loop().call_later(0.05, self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        try:
            self._out.flush()
        except (OSError, ValueError):
            pass
