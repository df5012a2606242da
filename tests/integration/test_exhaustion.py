"""A budget that stops short of its limit is still spent (docs/ledger-protocol.md, "Spent"): two real
proxy processes with real ServiceAccount tokens spend a CutOff budget through the operator's ledger;
their clamped last requests leave a few tokens that no request fits. The budget becomes Exceeded
(state, condition, BudgetExceeded Event), the namespace is cut off, both proxies refuse as
"exhausted", and raising the limit lifts all of it. A huge prompt that cannot fit what is left does
not spend the budget while the team's small requests still fit (no false cut-off)."""
from __future__ import annotations

import asyncio
import re

import httpx
import pytest
from kubernetes import client

from spendwarden.devtools.mock_upstream import MockUpstream
from tests.proxy.conftest import ProxyProcess
from tests.support.cluster import apply_custom, cut_off_policy, events, start_proxies
from tests.support.ledger_cluster import GROUP, VERSION, Operator, get_budget
from tests.support.operator_process import wait_for

LIMIT = 3000
PROMPT = [{"role": "user", "content": "Summarise the incident report in three sentences, please."}]


@pytest.fixture(scope="module")
def operator(control_plane, tmp_path_factory):
    op = Operator(control_plane, tmp_path_factory.mktemp("exhaustion"), pattern="test-a-budget-that-stops-*")
    op.env = {"SPENDWARDEN_LEDGER_URL": op.url}  # rendered into each namespace's proxy config
    op.start()
    yield op
    op.stop()


def _condition(status: dict, type_: str) -> dict:
    return next(c for c in status.get("conditions") or [] if c["type"] == type_)


def _route_and_budget(kube, ns: str, up: MockUpstream) -> None:
    """ModelRoute chat on the mock upstream and a CutOff TokenBudget of LIMIT tokens."""
    apply_custom(kube, ns, "ModelRoute", "modelroutes", "chat", {
        "model": "chat", "defaultBackend": "m", "backends": [
            {"name": "m", "provider": "OpenAICompatible", "url": up.openai_url, "model": "m",
             "pricing": {"input": "1", "output": "2"}}]})
    apply_custom(kube, ns, "TokenBudget", "tokenbudgets", "monthly", {
        "period": {"type": "Monthly"}, "limits": {"tokens": {"total": LIMIT}}, "onExceeded": "CutOff",
        "failMode": "Closed"})


async def _ask(http: httpx.AsyncClient, proxy: ProxyProcess, messages: list[dict] = PROMPT,
               max_tokens: int = 400) -> tuple[int, str]:
    r = await http.post(proxy.openai_url + "/chat/completions", timeout=30,
                        json={"model": "chat", "max_tokens": max_tokens, "messages": messages})
    return r.status_code, (r.json().get("error") or {}).get("message", "") if r.status_code != 200 else ""


async def _spend_until_refused(proxies: list[ProxyProcess]) -> list[tuple[int, str]]:
    """Requests to every proxy (a few at once) until each proxy refuses as 'exhausted'."""
    answers: list[tuple[int, str]] = []
    async with httpx.AsyncClient() as http:
        for _ in range(120):
            got = await asyncio.gather(*(_ask(http, p) for p in proxies for _ in range(2)))
            answers += got
            assert all(code in (200, 429) for code, _ in got), got
            if all("is exhausted for this period" in msg for _, msg in got):
                return answers
            if all(code == 429 for code, _ in got):
                await asyncio.sleep(0.2)  # refused for now: the operator hears of it with the next report
    raise AssertionError(f"the proxies never refused as exhausted; last answers: {answers[-4:]}")


async def test_a_budget_that_stops_short_of_its_limit_is_exceeded_and_cut_off(control_plane, kube, operator,
                                                                              namespace, tmp_path):
    ns = namespace
    core = client.CoreV1Api(kube)
    # The upstream writes every output token it may (the clamp is what stops it) and bills fewer
    # prompt tokens than the proxy reserves: the budget can never end exactly at its limit.
    # Another loopback address: the cut-off never denies the apiserver's (127.0.0.1 here).
    with MockUpstream(host="127.0.0.2", tokens=100_000) as up:
        _route_and_budget(kube, ns, up)
        proxies: list[ProxyProcess] = []
        try:
            start_proxies(kube, ns, tmp_path, proxies)
            answers = await _spend_until_refused(proxies)
            assert sum(1 for code, _ in answers if code == 200) >= 6
            served = [r for r in up.requests() if r["usage"]]
            assert any(r["max_tokens"] < 400 for r in served), "no request was clamped"
            billed = up.totals()["total_tokens"]

            status = wait_for(lambda: (lambda s: s if s.get("used", {}).get("totalTokens") == billed and
                                       _condition(s, "Exceeded")["status"] == "True" else None)(
                get_budget(kube, ns)["status"]), timeout=15, what=f"used {billed} tokens and Exceeded")
            assert billed < LIMIT, "the budget reached its limit exactly: this test needs it to stop short"
            print(f"\nthe budget stopped {LIMIT - billed} tokens short of {LIMIT}; "
                  f"{sum(1 for code, _ in answers if code == 200)} requests served")
            assert status["state"] == "Exceeded" and status["remaining"]["tokens"] == LIMIT - billed
            exceeded = _condition(status, "Exceeded")
            assert exceeded["reason"] == "TooLittleLeft"
            assert f"{LIMIT - billed} tokens left" in exceeded["message"]
            (event,) = wait_for(lambda: events(kube, ns, "BudgetExceeded"), what="the BudgetExceeded Event")
            assert event.type == "Warning" and f"{LIMIT - billed} tokens left" in event.message
            # The policy is applied first, the namespace label right after it.
            wait_for(lambda: cut_off_policy(kube, ns) is not None
                     and (core.read_namespace(ns).metadata.labels or {}).get("spendwarden.io/cut-off") == "true",
                     what="the cut-off NetworkPolicy and namespace label")
            wait_for(lambda: events(kube, ns, "NamespaceCutOff"), what="the NamespaceCutOff Event")
            assert operator.metric("spendwarden_namespace_cut_off", namespace=ns) == 1

            # The limit is raised: the cut-off is lifted and both proxies serve again.
            client.CustomObjectsApi(kube).patch_namespaced_custom_object(
                GROUP, VERSION, ns, "tokenbudgets", "monthly", {"spec": {"limits": {"tokens": {"total": LIMIT * 2}}}})
            wait_for(lambda: cut_off_policy(kube, ns) is None and "spendwarden.io/cut-off" not in (
                core.read_namespace(ns).metadata.labels or {}), timeout=30, what="the cut-off lifted")
            async with httpx.AsyncClient() as http:
                for p in proxies:
                    for _ in range(50):
                        if (await _ask(http, p))[0] == 200:
                            break
                        await asyncio.sleep(0.2)
                    else:
                        raise AssertionError("a proxy still refuses after the raise")
            wait_for(lambda: (lambda s: s["state"] == "Active" and _condition(s, "Exceeded")["status"] == "False")(
                get_budget(kube, ns)["status"]), what="the budget Active again, Exceeded False")
        finally:
            for p in proxies:
                p.stop()


async def test_a_budget_that_stops_only_a_huge_prompt_is_not_cut_off(control_plane, kube, operator, namespace,
                                                                     tmp_path):
    """The false cut-off: with 900 tokens left a 2,000-token prompt cannot fit, but the team's
    ordinary requests (about 40 tokens at the least) still do. The huge one is refused as "retry
    shortly"; the budget stays Active, the namespace is not cut off, small requests are served, and
    only when not even the smallest admitted request fits is the budget spent (TooLittleLeft,
    naming the small request's need, not the huge one's)."""
    ns = namespace
    core = client.CoreV1Api(kube)
    huge = [{"role": "user", "content": "lorem " * 2000}]  # ~2,000 tokens: below the limit, above what is left
    with MockUpstream(host="127.0.0.2", tokens=100_000) as up:
        _route_and_budget(kube, ns, up)
        proxies: list[ProxyProcess] = []
        try:
            start_proxies(kube, ns, tmp_path, proxies, count=1)
            (proxy,) = proxies
            async with httpx.AsyncClient() as http:
                for _ in range(5):  # about 2,100 of the 3,000 tokens
                    assert (await _ask(http, proxy)) == (200, "")
                code, message = await _ask(http, proxy, huge, max_tokens=16)
                assert code == 429 and "retry shortly" in message, message
                billed = up.totals()["total_tokens"]
                assert LIMIT - billed < 2000 < LIMIT
                # The operator heard of the huge need (the proxy asked for it) and flushed its status.
                status = wait_for(lambda: (lambda s: s if s.get("used", {}).get("totalTokens") == billed and any(
                    "smallestAdmitted" in p for p in s["ledger"]["proxies"].values()) else None)(
                    get_budget(kube, ns)["status"]), timeout=15, what=f"used {billed} tokens and smallestAdmitted")
                await asyncio.sleep(2)  # a cut-off, were there one, would be well under way by now
                status = get_budget(kube, ns)["status"]
                assert status["state"] != "Exceeded" and _condition(status, "Exceeded")["status"] == "False"
                assert cut_off_policy(kube, ns) is None and not events(kube, ns, "BudgetExceeded")
                assert "spendwarden.io/cut-off" not in (core.read_namespace(ns).metadata.labels or {})
                assert operator.metric("spendwarden_namespace_cut_off", namespace=ns) == 0
                assert (await _ask(http, proxy)) == (200, "")  # the team's ordinary requests go on

            # Small requests until not even the smallest admitted one fits: now it is spent.
            await _spend_until_refused(proxies)
            billed = up.totals()["total_tokens"]
            status = wait_for(lambda: (lambda s: s if s.get("used", {}).get("totalTokens") == billed and
                                       _condition(s, "Exceeded")["status"] == "True" else None)(
                get_budget(kube, ns)["status"]), timeout=15, what=f"used {billed} tokens and Exceeded")
            exceeded = _condition(status, "Exceeded")
            assert exceeded["reason"] == "TooLittleLeft", exceeded
            need = int(re.search(r"smallest request needs \((\d+) tokens\)", exceeded["message"]).group(1))
            assert need < 100 and LIMIT - billed < need, exceeded["message"]  # the small request, not the huge one
            wait_for(lambda: cut_off_policy(kube, ns) is not None, what="the cut-off NetworkPolicy")
        finally:
            for p in proxies:
                p.stop()
