"""Budgets enforced by the proxy process: concurrency, clamping, refusal, downgrade, persistence, reload."""
from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal

import openai
import pytest

from spendwarden.devtools.mock_upstream import MockUpstream

from .conftest import backend, budget_yaml, route_yaml, stream_of


def cost_of(usage: dict, pin=Decimal("0.15"), pout=Decimal("0.60")) -> Decimal:
    return (usage["prompt_tokens"] * pin + usage["completion_tokens"] * pout) / Decimal(10**6)


async def _one_stream(client: openai.AsyncOpenAI, i: int) -> str:
    try:
        stream = await client.chat.completions.create(model="chat", stream=True, max_tokens=100,
                                                      messages=[{"role": "user", "content": f"q{i}"}])
        async for _ in stream:
            pass
        return "ok"
    except openai.RateLimitError as exc:
        assert isinstance(exc.body, dict)
        assert exc.body["type"] == "budget_exceeded" and exc.body["budget"] == "small"
        assert int(exc.response.headers["retry-after"]) >= 1
        return "429"


def test_200_concurrent_streams_never_exceed_the_budget(start_proxy, tmp_path):
    limit = Decimal("0.003")
    with MockUpstream(tokens=100, chunk_delay_ms=2) as up:
        proxy = start_proxy(stream_of(route_yaml("chat", "chat", [backend("oa", up.openai_url)]),
                                      budget_yaml("small", limits={"cost": {"amount": str(limit)}})),
                            state_file=tmp_path / "state.json")

        async def main():
            client = openai.AsyncOpenAI(base_url=proxy.openai_url, api_key="x", max_retries=0, timeout=60,
                                        http_client=None)
            return await asyncio.gather(*(_one_stream(client, i) for i in range(200)))

        results = asyncio.run(main())
        served = [r for r in up.requests() if r["usage"]]
        spent = sum((cost_of(r["usage"]) for r in served), Decimal(0))
        assert results.count("ok") == len(up.requests()) > 10
        assert results.count("429") > 0
        assert spent <= limit
        assert spent > limit * Decimal("0.8"), spent  # and reservations do not strand much of the budget
        lines = proxy.log(200)
        logged = sum((Decimal(x["cost"]) for x in lines if x.get("cost")), Decimal(0))
        assert logged == spent  # recorded cost equals the upstream's numbers exactly
        assert {x["outcome"] for x in lines} == {"ok", "rejected"}
        gauge = [x for x in proxy.metrics().splitlines()
                 if x.startswith("spendwarden_budget_remaining_cost{") and 'budget="small"' in x]
        assert gauge and float(gauge[0].split()[-1]) == pytest.approx(float(limit - spent))
        proxy.stop()
        state = json.loads((tmp_path / "state.json").read_text())["budgets"]["small"]
        assert Decimal(state["cost"]) == spent


def test_clamp_then_refuse_on_token_budget(start_proxy):
    with MockUpstream(tokens=1000) as up:
        proxy = start_proxy(stream_of(route_yaml("chat", "chat", [backend("oa", up.openai_url)]),
                                      budget_yaml("tok", limits={"tokens": {"total": 300}})))
        client = openai.OpenAI(base_url=proxy.openai_url, api_key="x", max_retries=0)
        r1 = client.chat.completions.create(model="chat", max_tokens=200, messages=[{"role": "user", "content": "a"}])
        assert r1.usage.completion_tokens == 200
        used = r1.usage.total_tokens
        r2 = client.chat.completions.create(model="chat", max_tokens=200, messages=[{"role": "user", "content": "b"}])
        # clamped to what is left
        assert up.requests()[-1]["max_tokens"] < 200
        assert used + r2.usage.total_tokens <= 300
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model="chat", max_tokens=200, messages=[{"role": "user", "content": "c"}])
        assert "tok" in e.value.message and "resets at" in e.value.message
        assert e.value.response.headers["x-should-retry"] == "false"  # SDKs do not hammer a spent budget
        # no max_tokens from the client: an explicit one is always sent upstream
        assert all(r["max_tokens"] is not None for r in up.requests())


def dear_and_cheap(up: MockUpstream) -> str:
    """Route chat: backend big (the default, dear) and small (cheap: the downgrade)."""
    return route_yaml("chat", "chat", [backend("big", up.openai_url, "gpt-big", price_in="10", price_out="30"),
                                       backend("small", up.openai_url, "gpt-small", price_in="0.1", price_out="0.2")],
                      default="big")


def test_downgrade_and_alert_only(start_proxy):
    with MockUpstream(tokens=50) as up:
        cfg = stream_of(
            dear_and_cheap(up),
            route_yaml("free", "free", [backend("f", up.openai_url, "gpt-free")]),
            budget_yaml("dg", routes=["chat"], onExceeded="Downgrade", limits={"cost": {"amount": "0.002"}}),
            budget_yaml("alert", routes=["free"], onExceeded="AlertOnly", limits={"tokens": {"total": 10}}),
        )
        proxy = start_proxy(cfg)
        client = openai.OpenAI(base_url=proxy.openai_url, api_key="x", max_retries=0)
        backends = []
        for _ in range(4):
            r = client.chat.completions.with_raw_response.create(
                model="chat", max_tokens=50, messages=[{"role": "user", "content": "hello"}])
            backends.append(r.headers["x-spendwarden-backend"])
        assert backends[0] == "big" and backends[-1] == "small"
        assert proxy.log(4)[-1]["downgraded"] is True
        for _ in range(2):
            client.chat.completions.create(model="free", max_tokens=50, messages=[{"role": "user", "content": "x"}])
        assert proxy.log(6)[-1]["over_budget"] == ["alert"]


def test_state_survives_restart_and_reload_without_restart(start_proxy, tmp_path):
    with MockUpstream(tokens=100) as up:
        state = tmp_path / "state.json"
        cfg = stream_of(route_yaml("chat", "chat", [backend("oa", up.openai_url)]),
                        budget_yaml("b", limits={"tokens": {"output": 250}}))
        proxy = start_proxy(cfg, state_file=state)
        client = openai.OpenAI(base_url=proxy.openai_url, api_key="x", max_retries=0)
        client.chat.completions.create(model="chat", max_tokens=100, messages=[{"role": "user", "content": "1"}])
        client.chat.completions.create(model="chat", max_tokens=100, messages=[{"role": "user", "content": "2"}])
        assert proxy.stop() == 0
        assert json.loads(state.read_text())["budgets"]["b"]["outputTokens"] == 200
        proxy.start()
        client = openai.OpenAI(base_url=proxy.openai_url, api_key="x", max_retries=0)
        # 50 output tokens left: the next request is clamped to them, the one after is refused
        r = client.chat.completions.create(model="chat", max_tokens=100, messages=[{"role": "user", "content": "3"}])
        assert r.usage.completion_tokens == 50
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="chat", max_tokens=100, messages=[{"role": "user", "content": "4"}])
        # reload: a new alias appears without a restart (config swapped by rename, as ConfigMaps do)
        new = tmp_path / "new.yaml"
        new.write_text(cfg + "---\n" + route_yaml("other", "other", [backend("o", up.openai_url)]))
        new.replace(proxy.config)
        deadline = time.time() + 5
        while time.time() < deadline:
            if "other" in [m.id for m in client.models.list()]:
                break
            time.sleep(0.2)
        assert "other" in [m.id for m in client.models.list()]
        # a broken file keeps the last good configuration
        proxy.config.write_text("kind: ModelRoute\nspec: {model: 3}\n")
        deadline = time.time() + 5  # the proxy polls its config every second
        while time.time() < deadline and not ("invalid configuration" in proxy.stderr() or "ignored" in proxy.stderr()):
            time.sleep(0.2)
        assert "invalid configuration" in proxy.stderr() or "ignored" in proxy.stderr()
        assert "other" in [m.id for m in client.models.list()]


def test_rules_caps_and_prompt_limit(start_proxy):
    with MockUpstream(tokens=500) as up:
        cfg = route_yaml(
            "chat", "chat",
            [backend("cheap", up.openai_url, "gpt-cheap"), backend("long", up.openai_url, "gpt-long"),
             backend("tools", up.openai_url, "gpt-tools"), backend("vip", up.openai_url, "gpt-vip")],
            default="cheap",
            rules=[{"name": "vip", "match": {"headers": [{"name": "X-Tier", "value": "gold"}]}, "backend": "vip"},
                   {"name": "tools", "match": {"toolsPresent": True}, "backend": "tools"},
                   {"name": "long", "match": {"minPromptTokens": 200}, "backend": "long"}],
            limits={"maxTokens": 64, "maxPromptTokens": 2000})
        proxy = start_proxy(cfg)
        client = openai.OpenAI(base_url=proxy.openai_url, api_key="x", max_retries=0)

        def which(**kw):
            r = client.chat.completions.with_raw_response.create(model="chat", **kw)
            return r.headers["x-spendwarden-backend"]

        msg = [{"role": "user", "content": "short"}]
        assert which(messages=msg) == "cheap"
        assert up.requests()[-1]["max_tokens"] == 64  # route cap applied though the client sent none
        assert which(messages=msg, extra_headers={"x-tier": "gold"}) == "vip"
        tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
        assert which(messages=msg, tools=[tool]) == "tools"
        assert which(messages=[{"role": "user", "content": "word " * 300}]) == "long"
        which(messages=msg, max_tokens=1000)
        assert up.requests()[-1]["max_tokens"] == 64
        with pytest.raises(openai.BadRequestError, match="maxPromptTokens"):
            which(messages=[{"role": "user", "content": "word " * 3000}])


def test_sigterm_lets_streams_finish_and_saves_usage(start_proxy, tmp_path):
    import threading

    with MockUpstream(tokens=20, chunk_delay_ms=100) as up:
        state = tmp_path / "state.json"
        proxy = start_proxy(stream_of(route_yaml("chat", "chat", [backend("oa", up.openai_url)]),
                                      budget_yaml("b", limits={"tokens": {"total": 100000}})), state_file=state)
        client = openai.OpenAI(base_url=proxy.openai_url, api_key="x", max_retries=0)
        got: list[str] = []
        started = threading.Event()

        def consume():
            for chunk in client.chat.completions.create(model="chat", stream=True, max_tokens=50,
                                                        messages=[{"role": "user", "content": "x"}]):
                started.set()
                got.extend(c.delta.content or "" for c in chunk.choices)

        t = threading.Thread(target=consume)
        t.start()
        assert started.wait(10)
        assert proxy.stop() == 0  # SIGTERM: waits for the stream, then saves
        t.join(10)
        usage = up.requests()[-1]["usage"]
        saved = json.loads(state.read_text())["budgets"]["b"]
        assert saved["outputTokens"] == usage["completion_tokens"] == 20
        assert saved["inputTokens"] == usage["prompt_tokens"]
        assert "".join(got)


def test_sidecar_starts_before_its_config_exists(tmp_path):
    from .conftest import ProxyProcess

    with MockUpstream() as up:
        config = tmp_path / "config" / "config.json"
        config.parent.mkdir()
        proxy = ProxyProcess(config, tmp_path, extra_args=["--namespace", "team-b"]).start()
        try:
            client = openai.OpenAI(base_url=proxy.openai_url, api_key="x", max_retries=0)
            with pytest.raises(openai.NotFoundError):
                client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}])
            doc = {"namespace": "team-b", "routes": [{"name": "chat", "spec": {
                "model": "chat", "defaultBackend": "oa", "backends": [{
                    "name": "oa", "provider": "OpenAI", "url": up.openai_url, "model": "gpt-4o-mini",
                    "pricing": {"input": "0.15", "output": "0.60"}}]}}]}
            config.write_text(json.dumps(doc))
            deadline = time.time() + 5
            while time.time() < deadline and "chat" not in [m.id for m in client.models.list()]:
                time.sleep(0.2)
            r = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}])
            assert r.choices and proxy.log(2)[-1]["namespace"] == "team-b"
        finally:
            proxy.stop()


def test_downgrade_past_the_limit_then_refusal_at_the_hard_ceiling(start_proxy):
    with MockUpstream(tokens=50) as up:
        cfg = stream_of(
            dear_and_cheap(up),
            budget_yaml("dg", routes=["chat"], onExceeded="Downgrade", limits={"tokens": {"total": 200}},
                        downgrade={"hardCeiling": {"tokens": 400}}))
        proxy = start_proxy(cfg)
        client = openai.OpenAI(base_url=proxy.openai_url, api_key="x", max_retries=0)
        backends = []
        with pytest.raises(openai.RateLimitError) as e:
            for _ in range(20):
                r = client.chat.completions.with_raw_response.create(
                    model="chat", max_tokens=50, messages=[{"role": "user", "content": "hello"}])
                backends.append(r.headers["x-spendwarden-backend"])
        assert "hard ceiling" in e.value.message and e.value.body["budget"] == "dg"
        assert backends[0] == "big" and backends[-1] == "small" and backends == sorted(backends)  # big..., small...
        spent = sum(r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] for r in up.requests())
        big = sum(r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] for r in up.requests()
                  if r["model"] == "gpt-big")
        assert big <= 200 < spent <= 400  # the limit kept on the big backend, the ceiling overall
