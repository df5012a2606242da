"""Four real proxy processes sharing budgets through a ledger (LedgerStub over HTTP, wrapping the real
lease core) in front of the mock upstream: the sum never exceeds the limit, the ledger's numbers are
the proxies' numbers, failMode when the ledger is gone, reconciliation when it is back, cutOff."""
from __future__ import annotations

import asyncio
import json
import time

import openai
import pytest

from spendwarden.devtools.mock_upstream import MockUpstream
from spendwarden.ledger.leases import LeaseSettings
from spendwarden.proxy.config import compile_config, parse_config_text

from .conftest import ProxyProcess
from .ledger_stub import LedgerServer, LedgerStub

LIMIT = 20000
N_PROXIES = 4
PER_PROXY = 32


def proxy_config(upstream: str, ledger: str) -> dict:
    def route(name: str) -> dict:
        return {"name": name, "spec": {"model": name, "defaultBackend": "oa", "backends": [{
            "name": "oa", "provider": "OpenAI", "url": upstream, "model": "gpt-4o-mini",
            "pricing": {"input": "0.15", "output": "0.60"}}]}}

    def budget(name: str, alias: str, fail_mode: str) -> dict:
        return {"name": name, "spec": {"window": "24h", "routes": [alias], "failMode": fail_mode,
                                       "limits": {"tokens": {"total": LIMIT}}}}

    return {"namespace": "team-a", "routes": [route("a"), route("b")],
            "budgets": [budget("closed", "a", "Closed"), budget("open", "b", "Open")], "ledger": {"url": ledger}}


async def _stream(client: openai.AsyncOpenAI, model: str, i: int) -> str:
    try:
        stream = await client.chat.completions.create(model=model, stream=True, max_tokens=200,
                                                      messages=[{"role": "user", "content": f"question {i}"}])
        async for _ in stream:
            pass
        return "ok"
    except openai.RateLimitError as exc:
        assert isinstance(exc.body, dict)
        assert exc.body["type"] == "budget_exceeded", exc.body
        return "429"
    except openai.InternalServerError as exc:
        return str(exc.status_code)


def _served(p: ProxyProcess, model: str) -> int:
    return sum(x.get("input_tokens", 0) + x.get("output_tokens", 0) for x in p.log()
               if x.get("model") == model and x["status"] == 200)


def _wait(cond, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while not cond():
        assert time.time() < end, what
        time.sleep(0.1)


@pytest.fixture
def cluster(tmp_path):
    with MockUpstream(tokens=200, chunk_delay_ms=3) as up:
        cfg_doc = proxy_config(up.openai_url, "http://placeholder")
        compiled = compile_config(parse_config_text(json.dumps(cfg_doc))[0])
        # Short leases so the failMode part of the test takes seconds: valid ttl - 2 s margin = 2 s.
        stub = LedgerStub({n: b.spec for n, b in compiled.budgets.items()}, LeaseSettings(ttl=4.0, grace=6.0))
        server = LedgerServer(stub).start()
        config = tmp_path / "config.json"
        config.write_text(json.dumps(proxy_config(up.openai_url, server.url)))
        proxies = []
        try:
            for i in range(N_PROXIES):
                work = tmp_path / f"p{i}"
                work.mkdir()
                proxies.append(ProxyProcess(config, work).start())
            yield up, stub, server, proxies
        finally:
            for p in proxies:
                p.stop()
            server.stop()


def test_four_proxies_share_budgets_through_the_ledger(cluster):
    up, stub, server, proxies = cluster

    async def load(model: str, per_proxy: int) -> list[str]:
        clients = [openai.AsyncOpenAI(base_url=p.openai_url, api_key="x", max_retries=0, timeout=60) for p in proxies]
        return await asyncio.gather(*(_stream(c, model, i) for c in clients for i in range(per_proxy)))

    # 1. 4 x 32 concurrent streams of ~210 tokens each on a 20k-token budget.
    results = asyncio.run(load("a", PER_PROXY))
    # A stream's access-log line is written after its last chunk reached the client.
    totals = up.totals()
    _wait(lambda: sum(_served(p, "a") for p in proxies) == totals["prompt_tokens"] + totals["completion_tokens"], 5,
          "every stream in the access logs")
    served = sum(_served(p, "a") for p in proxies)
    assert served <= LIMIT, served
    assert served > LIMIT * 0.6, served  # leases do not strand most of the budget
    assert results.count("ok") > 60 and results.count("429") > 0, results
    print(f"served {served} of {LIMIT} tokens: {results.count('ok')} ok, {results.count('429')} refused")
    _wait(lambda: stub.used("closed").total_tokens == served, 5, "the ledger's used is what the proxies settled")
    assert not stub.ledgers["closed"].check_invariant()
    metrics = proxies[0].metrics()
    assert "spendwarden_ledger_report_duration_seconds_count" in metrics
    assert 'spendwarden_ledger_lease_ceiling{budget="closed",dimension="total",namespace="team-a"}' in metrics

    # 2. The ledger goes away: leases are spent until they expire; then Closed refuses, Open goes on.
    server.stop()
    time.sleep(3.0)  # lease validity is 2 s after the last answer
    client = openai.OpenAI(base_url=proxies[1].openai_url, api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="a", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 503 and "'closed'" in e.value.message and "unreachable" in e.value.message
    results = asyncio.run(load("b", 4))
    assert results == ["ok"] * 16, results
    assert "failMode Open" in proxies[0].stderr()

    # 3. The ledger is back: the usage of the Open budget reaches it, Closed serves again.
    server.start()
    _wait(lambda: sum(1 for p in proxies for x in p.log() if x.get("model") == "b") == 16, 5, "16 'b' access-log lines")
    served_b = sum(_served(p, "b") for p in proxies)
    _wait(lambda: stub.used("open").total_tokens == served_b, 5, "usage reconciled after the outage")
    _wait(lambda: _ok(client, "b"), 3, "Open on leases again")
    # Closed has a valid lease again: served (from what is left of the budget) or 429, never 503.
    _ok(client, "a")
    assert stub.used("closed").total_tokens <= LIMIT

    # 4. cutOff from the operator is honoured within about a second, and lifted.
    stub.cut_off.add("open")
    t0 = time.time()
    _wait(lambda: not _ok(client, "b"), 3, "cut off")
    print(f"cut off after {time.time() - t0:.2f} s")
    assert time.time() - t0 < 2.0  # the next regular report (every second) carries it
    stub.cut_off.clear()
    _wait(lambda: _ok(client, "b"), 3, "cut-off lifted")


def _ok(client: openai.OpenAI, model: str) -> bool:
    try:
        client.chat.completions.create(model=model, max_tokens=10, messages=[{"role": "user", "content": "x"}])
        return True
    except openai.RateLimitError as exc:
        assert exc.response.headers.get("retry-after")
        return False
