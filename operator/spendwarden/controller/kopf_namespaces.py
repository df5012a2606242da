"""A namespace created while kopf starts must still be watched.

With --namespace patterns kopf lists the namespaces, then starts a watch on them, which lists them
again and skips that second list (its events have type None, "already seen"). A namespace created
between the two lists is in neither's view: its TokenBudgets and ModelRoutes are not watched until
the namespace itself is next modified, which for most namespaces is their deletion. Seen on the
1.37 test cluster, where a test's namespace made right after the operator came up got no status.

`install()` makes the watch's own list revise the namespaces too (revising is idempotent: a
namespace already known stays, a terminating one is dropped as before).
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def install() -> bool:
    """Patch kopf's namespace-event processor; False (and a warning) if this kopf has none."""
    try:
        from kopf._core.reactor import observation
    except ImportError:
        original = revise = None
    else:
        original = getattr(observation, "process_discovered_namespace_event", None)
        revise = getattr(observation, "revise_namespaces", None)
    if original is None or revise is None:
        log.warning("kopf has no namespace observer to complete: namespaces created during start-up may go unwatched")
        return False
    if getattr(original, "_spendwarden", False):
        return True

    async def process(*, raw_event: Any, namespaces: Any, insights: Any, **kwargs: Any) -> None:
        if raw_event["type"] is None:
            async with insights.revised:
                revise(raw_bodies=[raw_event["object"]], insights=insights, namespaces=namespaces)
                insights.revised.notify_all()
            return
        await original(raw_event=raw_event, namespaces=namespaces, insights=insights, **kwargs)

    process._spendwarden = True  # type: ignore[attr-defined]
    # namespace_observer looks the processor up when it starts its watch, after this runs.
    observation.process_discovered_namespace_event = process
    return True
