"""controller/kopf_namespaces.py: a namespace that only kopf's namespace watch lists (created after
the observer's first list) is watched."""
from __future__ import annotations

import asyncio

from kopf._cogs.structs import references
from kopf._core.reactor import observation

from spendwarden.controller import kopf_namespaces


def _ns(name: str, **meta: object) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, **meta}}


def test_the_watch_listing_adds_matching_namespaces(monkeypatch):
    monkeypatch.setattr(observation, "process_discovered_namespace_event", observation.process_discovered_namespace_event)
    assert kopf_namespaces.install() and kopf_namespaces.install(), "idempotent"
    process = observation.process_discovered_namespace_event

    async def run() -> set:
        insights = references.Insights()
        insights.namespaces.add("sc-old")
        for event in ({"type": None, "object": _ns("sc-new")}, {"type": None, "object": _ns("other")},
                      {"type": None, "object": _ns("sc-old")}):
            await process(raw_event=event, namespaces=["sc-*"], insights=insights)
        await process(raw_event={"type": "ADDED", "object": _ns("sc-later")}, namespaces=["sc-*"], insights=insights)
        await process(raw_event={"type": "DELETED", "object": _ns("sc-old")}, namespaces=["sc-*"], insights=insights)
        return set(insights.namespaces)

    assert asyncio.run(run()) == {"sc-new", "sc-later"}
