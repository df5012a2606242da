"""`spendwarden simulate`: replay a traffic log against candidate ModelRoutes, offline.

    traffic     reading the proxy's access log and batch JSONL
    candidates  route and budget files, validated by the API models
    outcomes    answer lengths and cheap-tier failures where the log is silent (documented model)
    policy      the candidate's tiers/escalation/cache and the proxy's own scorer, checks and cache
    replay      per request: route, tier, cache, escalation, cost
    budget      when the budget would run out
    report      side-by-side summary (JSON) and table
    plot        cost over time per candidate (SVG built in, PNG with matplotlib)
"""
from __future__ import annotations

from datetime import datetime

from .candidates import Budget, Candidate
from .replay import Replay, Settings, arrival_times
from .report import CandidateRun, summarize_all
from .traffic import TrafficRequest


def simulate(requests: list[TrafficRequest], candidates: list[Candidate], start: datetime,
             per_day: int | None = None, settings: Settings | None = None) -> list[CandidateRun]:
    """Replay `requests` against each candidate (in time order; the log's order breaks ties)."""
    times = arrival_times(requests, start, per_day)
    order = sorted(range(len(requests)), key=lambda i: (times[i], i))
    reqs = [requests[i] for i in order]
    ts = [times[i] for i in order]
    return [CandidateRun(c, Replay(c, settings).run(reqs, ts)) for c in candidates]


__all__ = ["simulate", "summarize_all", "Settings", "Budget", "Candidate", "CandidateRun"]
