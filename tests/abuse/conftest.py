"""The abuse suite (issue 16, "make it stay fixed"): hypothesis-generated bad input against the real
proxy process, the real ledger HTTP server and the admission webhooks' HTTP path. Every example is
recorded in kinds.REGISTRY (counted with the earlier hostile tests by tests/abuse/plugin.py, which
prints the counts per surface at the end of the run)."""
from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from spendwarden.devtools.mock_upstream import MockUpstream
from tests.proxy.conftest import ProxyProcess, backend, budget_yaml, route_yaml, stream_of
from tests.support.memory import rss_mb


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockUpstream]:
    with MockUpstream(tokens=8) as up:
        yield up


@pytest.fixture(scope="module")
def proxy(upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """One real proxy process for a module's examples: an OpenAI and an Anthropic route on the mock
    upstream, under a budget large enough never to be the reason of a refusal."""
    workdir = tmp_path_factory.mktemp("abuse-proxy")
    config = workdir / "config.yaml"
    config.write_text(stream_of(
        route_yaml("chat", "chat", [backend("oa", upstream.openai_url)]),
        route_yaml("claude", "claude", [backend("an", upstream.url, "claude-haiku", provider="Anthropic")]),
        budget_yaml("b", limits={"tokens": {"total": 10**12}, "cost": {"amount": "1000000"}})))
    p = ProxyProcess(config, workdir, state_file=workdir / "state.json").start()
    # The RSS bounds are stated against this: after one ordinary request (the encoder loaded).
    assert httpx.post(p.openai_url + "/chat/completions", json={"model": "chat", "messages": [
        {"role": "user", "content": "hi"}]}, timeout=30).status_code == 200
    p.rss_at_start = rss_mb(p.proc.pid)  # type: ignore[attr-defined]
    yield p
    p.stop()
