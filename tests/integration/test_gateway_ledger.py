"""Gateway mode on the real control plane with the operator's ledger: the operator renders the
gateway's tenant files (ConfigMap spendwarden-gateway-config in the gateway namespace) for a
namespace labelled spendwarden.io/mode=gateway, three `spendwarden gateway` processes serve it
from those files, reporting with the gateway ServiceAccount's token, and tenant clients call them
with their own ServiceAccount tokens, most of them streaming, concurrently, until every gateway
refuses as exhausted. The budget holds exactly: status.used equals what the upstream billed and
never exceeds the limit. The tenant's own token can no longer feed the ledger."""
from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from pathlib import Path

import httpx
from kubernetes import client

from spendwarden.devtools.mock_upstream import MockUpstream
from tests.support.gateway_process import GatewayProcess
from tests.support.ledger_cluster import GROUP, VERSION, Operator, get_budget, sa_token
from tests.support.operator_process import wait_for

LIMIT = 150_000
REPLICAS = 3
CLIENTS = 24      # per replica
OUTPUT = 48
MAX_TOKENS = 64
PROVIDER_KEY = "sk-gateway-held-provider-key"
GATEWAY_SA = "spendwarden-gateway"


def prompt(seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(f"{rng.choice(('alpha', 'beta', 'ticket', 'refund'))} {rng.randint(1000, 9999)}" for _ in range(120))


async def _call(http: httpx.AsyncClient, gw: GatewayProcess, token: str, seed: int, kind: str) -> httpx.Response:
    text = prompt(seed)
    if kind == "anthropic":
        body = {"model": "chat", "max_tokens": MAX_TOKENS, "stream": True, "messages": [{"role": "user", "content": text}]}
        path, headers = "/v1/messages", {"anthropic-version": "2023-06-01", "x-api-key": token}
    else:
        body = {"model": "chat", "max_tokens": MAX_TOKENS, "stream": kind == "stream",
                "messages": [{"role": "user", "content": text}]}
        path, headers = "/v1/chat/completions", {"Authorization": f"Bearer {token}"}
    async with http.stream("POST", gw.url + path, json=body, headers=headers) as resp:
        await resp.aread()
    return resp


async def spend(gateways: list[GatewayProcess], token: str, deadline: float = 120) -> dict:
    stop_at = time.monotonic() + deadline
    out = {"ok": 0, "retried": 0, "exhausted": set(), "errors": []}
    https = [httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=CLIENTS * 2)) for _ in gateways]

    async def worker(gi: int, w: int) -> None:
        kind = {0: "unary", 1: "anthropic"}.get(w % 6, "stream")
        k = 0
        while time.monotonic() < stop_at and gi not in out["exhausted"]:
            k += 1
            resp = await _call(https[gi], gateways[gi], token, (gi * 100 + w) * 10_000 + k, kind)
            if resp.status_code == 200:
                out["ok"] += 1
            elif resp.status_code == 429:
                err = resp.json()["error"]
                assert err["type"] == "budget_exceeded", err
                if int(resp.headers["retry-after"]) > 1:  # exhausted: Retry-After is the period's end
                    out["exhausted"].add(gi)
                    return
                out["retried"] += 1
                await asyncio.sleep(0.02)
            else:
                out["errors"].append(f"g{gi}: {resp.status_code} {resp.text[:200]}")
                await asyncio.sleep(0.05)

    try:
        await asyncio.gather(*(worker(gi, w) for gi in range(len(gateways)) for w in range(CLIENTS)))
    finally:
        for h in https:
            await h.aclose()
    return out


def test_a_budget_holds_exactly_across_three_gateway_replicas(control_plane, kube, tmp_path: Path):
    core, custom = client.CoreV1Api(kube), client.CustomObjectsApi(kube)
    suffix = uuid.uuid4().hex[:6]
    tenant, gw_ns = f"gx-tenant-{suffix}", f"gx-gateway-{suffix}"
    core.create_namespace({"metadata": {"name": gw_ns}})
    core.create_namespace({"metadata": {"name": tenant, "labels": {"spendwarden.io/mode": "gateway"}}})
    core.create_namespaced_secret(gw_ns, {"metadata": {"name": "openai", "annotations": {
        "spendwarden.io/tenants": tenant}}, "stringData": {"apiKey": PROVIDER_KEY}})
    op = Operator(control_plane, tmp_path, pattern="gx-*")
    op.env = {"SPENDWARDEN_LEDGER_URL": op.url, "SPENDWARDEN_LEDGER_LEASE_TTL": "10",
              "SPENDWARDEN_LEDGER_LEASE_GRACE": "3", "SPENDWARDEN_GATEWAY_NAMESPACE": gw_ns,
              "SPENDWARDEN_GATEWAY_SERVICE_ACCOUNT": GATEWAY_SA}
    upstream = MockUpstream(tokens=OUTPUT, record_limit=100, api_keys={PROVIDER_KEY}).start()
    gateways: list[GatewayProcess] = []
    try:
        op.start()
        backend = {"name": "oa", "provider": "OpenAI", "url": upstream.openai_url, "model": "gpt-4o-mini",
                   "pricing": {"input": "0.15", "output": "0.60"},
                   "credentials": {"secretRef": {"name": "openai", "key": "apiKey"}}}
        custom.create_namespaced_custom_object(GROUP, VERSION, tenant, "modelroutes", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelRoute", "metadata": {"name": "chat"},
            "spec": {"model": "chat", "defaultBackend": "oa", "backends": [backend]}})
        custom.create_namespaced_custom_object(GROUP, VERSION, tenant, "tokenbudgets", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "TokenBudget", "metadata": {"name": "monthly"},
            "spec": {"period": {"type": "Monthly"}, "limits": {"tokens": {"total": LIMIT}}, "onExceeded": "CutOff",
                     "failMode": "Closed"}})

        def rendered() -> tuple[dict, dict] | None:
            try:
                cm = core.read_namespaced_config_map("spendwarden-gateway-config", gw_ns)
                secret = core.read_namespaced_secret("spendwarden-gateway-credentials", gw_ns)
            except client.ApiException:
                return None
            raw = (cm.data or {}).get(f"{tenant}.json")
            cfg = json.loads(raw) if raw else None
            if not cfg or not cfg.get("budgets") or not cfg.get("routes"):
                return None
            return cfg, secret.data or {}

        cfg, keys = wait_for(rendered, timeout=40, what="the operator's gateway ConfigMap and credentials for the tenant")
        assert cfg["ledger"]["url"] == op.url
        assert set(keys) == {f"{tenant}_openai_apiKey"}
        gw_token = tmp_path / "gateway-token"
        gw_token.write_text(sa_token(kube, gw_ns, GATEWAY_SA))
        for i in range(REPLICAS):
            gw = GatewayProcess(tmp_path / f"g{i}", str(control_plane.kubeconfig),
                                extra_args=["--namespace-rate", "0", "--serviceaccount-rate", "0"],
                                env={"SPENDWARDEN_LEDGER_TOKEN_FILE": str(gw_token)})
            gw.serve(tenant, cfg)
            gw.key(tenant, "openai", "apiKey", PROVIDER_KEY)
            gateways.append(gw)
        for gw in gateways:
            gw.start(timeout=60)

        tenant_token = sa_token(kube, tenant, "app")
        res = asyncio.run(spend(gateways, tenant_token))
        assert not res["errors"], res["errors"][:5]
        assert res["exhausted"] == set(range(REPLICAS)), res
        totals = upstream.totals()
        billed = {"inputTokens": totals["billed_prompt_tokens"], "outputTokens": totals["billed_completion_tokens"]}

        def used() -> dict:
            u = (get_budget(kube, tenant).get("status") or {}).get("used") or {}
            return {k: u.get(k) for k in billed}

        wait_for(lambda: used() == billed, timeout=30, what=f"status.used == billed {billed}")
        status = get_budget(kube, tenant)["status"]
        total = status["used"]["totalTokens"]
        print(f"\n[gateway x{REPLICAS}] limit {LIMIT}  ledger used {total}  upstream billed "
              f"{billed['inputTokens'] + billed['outputTokens']}  overshoot {max(total - LIMIT, 0)}  "
              f"requests ok {res['ok']} retried {res['retried']}")
        assert total <= LIMIT
        assert total >= LIMIT * 0.9  # spent, not refused early
        # The usage is attributed to the calling workload.
        assert {r.get("workload") for r in status.get("breakdown") or []} == {"app"}

        # The tenant's own token cannot feed the ledger of a namespace in gateway mode.
        ledger = status["ledger"]
        body = {"proxyId": "forged", "namespace": tenant, "seq": 1, "budgets": {"monthly": {
            "periodStart": ledger["periodStart"], "used": {"inputTokens": 0, "outputTokens": 0, "cost": "0"}}}}
        resp = httpx.post(op.url + "/v1/report", json=body, timeout=10,
                          headers={"Authorization": f"Bearer {sa_token(kube, tenant, 'proxy')}"})
        assert resp.status_code == 403, resp.text
    finally:
        for gw in gateways:
            gw.stop()
        op.stop()
        upstream.stop()
        for ns in (tenant, gw_ns):
            core.delete_namespace(ns, propagation_policy="Background")

