"""The gateway process (`spendwarden gateway`) against the real apiserver's TokenReview: every caller
is authenticated by its ServiceAccount token (audience spendwarden) before its body is read,
attributed to the token's namespace and ServiceAccount, never to what the request claims, and served
by that namespace's routes, budgets and keys only. The upstream is the mock provider, which accepts
only the tenant's provider key: a request that reached it with the caller's token would get 401."""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from kubernetes import client

from spendwarden.devtools.mock_upstream import MockUpstream

from ..support.gateway_process import GatewayProcess
from ..support.ledger_cluster import sa_token as token

PROVIDER_KEY = "sk-provider-key-of-team-a"


def tenant_config(upstream: MockUpstream, budget_tokens: int | None = None) -> dict:
    def backend(name: str, provider: str, model: str) -> dict:
        url = upstream.url if provider == "Anthropic" else upstream.openai_url
        return {"name": name, "provider": provider, "url": url, "model": model,
                "pricing": {"input": "0.15", "output": "0.60"},
                "credentials": {"secretRef": {"name": "openai", "key": "apiKey"}}}

    cfg: dict = {"routes": [
        {"name": "chat", "spec": {"model": "chat", "defaultBackend": "oa", "backends": [backend("oa", "OpenAI", "gpt-4o-mini")]}},
        {"name": "claude", "spec": {"model": "claude", "defaultBackend": "an",
                                    "backends": [backend("an", "Anthropic", "claude-haiku-4-5")]}}]}
    if budget_tokens is not None:
        cfg["budgets"] = [{"name": "daily", "spec": {"window": "24h", "limits": {"tokens": {"total": budget_tokens}}}}]
    return cfg


@pytest.fixture
def upstream() -> Iterator[MockUpstream]:
    up = MockUpstream(api_keys={PROVIDER_KEY}).start()
    yield up
    up.stop()


@pytest.fixture
def tenants(kube) -> Iterator[list[str]]:
    core = client.CoreV1Api(kube)
    names = [f"gw-{x}-{int(time.time() * 1000) % 100000}" for x in ("a", "b", "x")]
    for n in names:
        core.create_namespace({"metadata": {"name": n}})
    yield names
    for n in names:
        core.delete_namespace(n, propagation_policy="Background")


@pytest.fixture
def gateway(tmp_path: Path, control_plane, upstream, tenants) -> Iterator[GatewayProcess]:
    a, b, _ = tenants
    gw = GatewayProcess(tmp_path, str(control_plane.kubeconfig))
    gw.serve(a, tenant_config(upstream))
    gw.key(a, "openai", "apiKey", PROVIDER_KEY)
    gw.serve(b, tenant_config(upstream))  # same Secret name, but no key shared with b
    gw.start()
    yield gw
    gw.stop()


def _oa(gw: GatewayProcess, key: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.openai_url, api_key=key, max_retries=0, **kw)


def test_a_tenant_token_is_served_with_its_namespace_key_and_attributed(kube, gateway, upstream, tenants):
    a, _, _ = tenants
    tok = token(kube, a, "app")
    r = _oa(gateway, tok).chat.completions.create(model="chat", max_tokens=20,
                                                  messages=[{"role": "user", "content": "hello"}])
    assert r.usage is not None and r.usage.completion_tokens > 0
    m = anthropic.Anthropic(base_url=gateway.url, api_key=tok, max_retries=0).messages.create(
        model="claude", max_tokens=20, messages=[{"role": "user", "content": "hello"}])
    assert m.usage.output_tokens > 0
    # Both reached the provider (which accepts only the provider key, not the caller's token).
    assert [x["status"] for x in upstream.requests()] == [200, 200]
    lines = gateway.log(wait_for=2)
    assert [(x["namespace"], x["serviceaccount"], x["status"]) for x in lines] == [(a, "app", 200)] * 2
    assert lines[0]["input_tokens"] == r.usage.prompt_tokens and lines[0]["output_tokens"] == r.usage.completion_tokens
    assert f'spendwarden_gateway_workload_requests_total{{namespace="{a}",outcome="ok",serviceaccount="app"}} 2.0' \
        in gateway.metrics()
    # Listing models is authenticated too and shows the tenant's aliases.
    assert sorted(x.id for x in _oa(gateway, tok).models.list()) == ["chat", "claude"]


def test_forged_foreign_and_wrong_audience_tokens_are_refused(kube, gateway, upstream, tenants):
    a, b, x = tenants
    ask = dict(model="chat", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError) as e:
        _oa(gateway, "not-a-token").chat.completions.create(**ask)
    assert e.value.status_code == 401 and "audience spendwarden" in str(e.value)
    forged = token(kube, a, "app")[:-6] + "AAAAAA"  # a valid token's claims, a broken signature
    with pytest.raises(openai.AuthenticationError):
        _oa(gateway, forged).chat.completions.create(**ask)
    with pytest.raises(openai.AuthenticationError):  # the apiserver's own audience: not for spendwarden
        _oa(gateway, token(kube, a, "app", audience=None)).chat.completions.create(**ask)
    with pytest.raises(anthropic.AuthenticationError):  # a provider's key is not a token either
        anthropic.Anthropic(base_url=gateway.url, api_key="sk-ant-api03-abc", max_retries=0).messages.create(
            model="claude", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    # Neither that key nor "not-a-token" was sent on to the apiserver in a TokenReview.
    assert 'spendwarden_gateway_refusals_total{reason="not_a_jwt"} 2.0' in gateway.metrics()
    missing = httpx.post(gateway.url + "/v1/messages", json={"model": "claude", "max_tokens": 5, "messages": []})
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    # A namespace the gateway does not serve: authenticated, but forbidden.
    with pytest.raises(openai.PermissionDeniedError) as e:
        _oa(gateway, token(kube, x, "app")).chat.completions.create(**ask)
    assert f"namespace {x} is not served by this gateway" in str(e.value)
    # b's token claiming to act for a: forbidden; b's own request cannot use a's provider key.
    tok_b = token(kube, b, "app")
    with pytest.raises(openai.PermissionDeniedError):
        _oa(gateway, tok_b, default_headers={"x-spendwarden-namespace": a}).chat.completions.create(**ask)
    with pytest.raises(openai.InternalServerError) as e:
        _oa(gateway, tok_b).chat.completions.create(**ask)
    assert "no API key" in str(e.value)
    assert upstream.requests() == []  # nothing reached the provider
    # Unauthenticated callers learn nothing about the routes.
    assert httpx.get(gateway.openai_url + "/models").status_code == 401
    assert httpx.post(gateway.openai_url + "/files").status_code == 401


def test_tenants_come_and_go_with_their_files(kube, gateway, upstream, tenants):
    a, _, x = tenants
    tok_x = token(kube, x, "app")
    ask = dict(model="chat", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    gateway.serve(x, tenant_config(upstream))
    gateway.key(x, "openai", "apiKey", PROVIDER_KEY)
    deadline = time.time() + 15
    while True:
        try:
            _oa(gateway, tok_x).chat.completions.create(**ask)
            break
        except openai.PermissionDeniedError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    gateway.unserve(x)
    deadline = time.time() + 15
    while True:
        try:
            _oa(gateway, tok_x).chat.completions.create(**ask)
        except openai.PermissionDeniedError:
            break
        assert time.time() < deadline, "a namespace whose file is gone is still served"
        time.sleep(0.2)
    _oa(gateway, token(kube, a, "app")).chat.completions.create(**ask)  # the others are unaffected


def test_rate_limits_per_serviceaccount_and_per_namespace(kube, tmp_path, control_plane, upstream, tenants):
    a, _, _ = tenants
    gw = GatewayProcess(tmp_path, str(control_plane.kubeconfig), extra_args=[
        "--namespace-rate", "0.01", "--namespace-burst", "4", "--serviceaccount-rate", "0.01",
        "--serviceaccount-burst", "2"])
    gw.serve(a, tenant_config(upstream))
    gw.key(a, "openai", "apiKey", PROVIDER_KEY)
    gw.start()
    try:
        ask = dict(model="chat", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        noisy = _oa(gw, token(kube, a, "noisy"))
        noisy.chat.completions.create(**ask)
        noisy.chat.completions.create(**ask)
        with pytest.raises(openai.RateLimitError) as e:
            noisy.chat.completions.create(**ask)
        assert "ServiceAccount" in str(e.value) and int(e.value.response.headers["retry-after"]) >= 1
        # Another workload of the namespace still gets through, until the namespace's own limit.
        _oa(gw, token(kube, a, "quiet")).chat.completions.create(**ask)
        _oa(gw, token(kube, a, "other")).chat.completions.create(**ask)
        with pytest.raises(openai.RateLimitError) as e:
            _oa(gw, token(kube, a, "third")).chat.completions.create(**ask)
        assert f"namespace {a}" in str(e.value)
        assert len(upstream.requests()) == 4
    finally:
        gw.stop()


def test_a_budget_is_enforced_per_tenant_namespace(kube, tmp_path, control_plane, upstream, tenants):
    a, b, _ = tenants
    gw = GatewayProcess(tmp_path, str(control_plane.kubeconfig))
    gw.serve(a, tenant_config(upstream, budget_tokens=150))
    gw.serve(b, tenant_config(upstream))
    for ns in (a, b):
        gw.key(ns, "openai", "apiKey", PROVIDER_KEY)
    gw.start()
    try:
        ask = dict(model="chat", max_tokens=50, messages=[{"role": "user", "content": "hi"}])
        tok_a, tok_b = token(kube, a, "app"), token(kube, b, "app")
        refused = 0
        for _ in range(12):
            try:
                _oa(gw, tok_a).chat.completions.create(**ask)
            except openai.RateLimitError as exc:
                assert exc.body["type"] == "budget_exceeded", exc.body
                refused += 1
        assert refused > 0
        lines = [x for x in gw.log() if x["namespace"] == a and x["status"] == 200]
        assert sum(x["input_tokens"] + x["output_tokens"] for x in lines) <= 150
        for _ in range(3):  # b has no budget: a's is not b's
            _oa(gw, tok_b).chat.completions.create(**ask)
    finally:
        gw.stop()


async def _flood(url: str, tokens: list[str]) -> list[int]:
    import asyncio

    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as http:
        async def one(tok: str) -> int:
            r = await http.post(url, headers={"Authorization": f"Bearer {tok}"},
                                json={"model": "chat", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})
            return r.status_code
        return list(await asyncio.gather(*(one(t) for t in tokens)))


def test_a_flood_of_unknown_tokens_is_refused_without_starving_a_known_caller(kube, gateway, upstream, tenants):
    """Every unknown token costs a TokenReview: at most 64 run at once (more get 503 at once), a
    refused one is not reviewed again for 10 s, and a known token is answered from the cache."""
    import asyncio

    a, _, _ = tenants
    good = token(kube, a, "app")
    _oa(gateway, good).chat.completions.create(model="chat", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    fakes = [f"eyJhbGciOiJSUzI1NiJ9.fake{i:05d}.sig" for i in range(600)]
    url = gateway.openai_url + "/chat/completions"

    async def scenario():
        flood = asyncio.create_task(_flood(url, fakes))
        await asyncio.sleep(0.2)
        served = await asyncio.to_thread(lambda: _oa(gateway, good, timeout=10).chat.completions.create(
            model="chat", max_tokens=5, messages=[{"role": "user", "content": "during the flood"}]))
        codes = await flood
        return served, codes, await _flood(url, fakes[:100])

    served, codes, again = asyncio.run(scenario())
    assert served.usage is not None
    print(f"\n[gateway flood] 600 unknown tokens: {codes.count(401)} x 401, {codes.count(503)} x 503; 100 again: "
          f"{again.count(401)} x 401; the known caller served during it")
    assert set(codes) <= {401, 503} and codes.count(401) > 0, sorted(set(codes))
    assert set(again) == {401}  # refused ones are remembered: no second review, no 503
    assert gateway.alive()
    assert [x["status"] for x in upstream.requests()] == [200, 200]  # no fake reached the provider
