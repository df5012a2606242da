"""Malformed AdmissionReview bodies against the operator's admission webhooks on their real HTTP
path: spendwarden's WebhookServer (kopf's, over HTTP here) handing requests to kopf's admission
engine with the operator's three handlers registered (TokenBudget and ModelRoute validation, Pod
injection). A malformed review must get a 4xx naming what is wrong, or, when the review is sound
and the object is not, an AdmissionReview refusing it with a message; never a 5xx, never an
internal error inside the review."""
from __future__ import annotations

import base64
import functools
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendwarden import GROUP
from spendwarden.controller import admission
from spendwarden.controller.inventory import Inventory
from spendwarden.controller.webhooks import WebhookServer, WebhookSettings
from spendwarden.render.injection import InjectionSettings

from . import kinds
from .support import FUZZ, LoopThread, json_value

BUDGETS = {"group": GROUP, "version": "v1alpha1", "resource": "tokenbudgets"}
ROUTES = {"group": GROUP, "version": "v1alpha1", "resource": "modelroutes"}
PODS = {"group": "", "version": "v1", "resource": "pods"}


class Webhooks:
    def __init__(self) -> None:
        import kopf
        from kopf._cogs.structs import references
        from kopf._core.engines import admission as kopf_admission
        from kopf._core.engines.indexing import OperatorIndexers
        from kopf._core.reactor.inventory import ResourceMemories

        registry = kopf.OperatorRegistry()
        hooks = admission.AdmissionWebhooks(WebhookSettings(enabled=True), InjectionSettings.from_env({}), Inventory())
        kw = dict(registry=registry, operations=["CREATE", "UPDATE"])
        kopf.on.validate(GROUP, "modelroutes", id="validate-modelroute", **kw)(hooks.validate_modelroute)
        kopf.on.validate(GROUP, "tokenbudgets", id="validate-tokenbudget", **kw)(hooks.validate_tokenbudget)
        kopf.on.mutate("v1", "pods", id="inject-proxy", registry=registry, operations=["CREATE"])(hooks.inject_proxy)
        insights = references.Insights()
        for r, kind in ((BUDGETS, "TokenBudget"), (ROUTES, "ModelRoute"), (PODS, "Pod")):
            insights.webhook_resources.add(references.Resource(r["group"], r["version"], r["resource"], kind=kind,
                                                               namespaced=True))
        self.fn = functools.partial(kopf_admission.serve_admission_request, settings=kopf.OperatorSettings(),
                                    registry=registry, insights=insights, memories=ResourceMemories(),
                                    memobase=kopf.Memo(), indices=OperatorIndexers().indices)
        self.server = WebhookServer(addr="127.0.0.1", port=0, host="127.0.0.1", insecure=True)
        self.thread = LoopThread("webhooks")
        self._gen: Any = None

    def start(self) -> Webhooks:
        self._gen = self.server(self.fn)
        config = self.thread.call(self._gen.__anext__())
        self.url = config["url"].rstrip("/")
        return self

    def stop(self) -> None:
        self.thread.call(self._gen.aclose())
        self.thread.close()


@pytest.fixture(scope="module")
def hooks() -> Iterator[Webhooks]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(admission, "_lookup_namespace_labels", lambda name: None)  # no apiserver here
        w = Webhooks().start()
        yield w
        w.stop()


def review(resource: dict[str, str], obj: Any, **request: Any) -> dict[str, Any]:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "u-1", "kind": {"group": resource.get("group"), "version": resource.get("version"), "kind": "X"},
        "resource": resource, "namespace": "team-a", "operation": "CREATE",
        "userInfo": {"username": "someone"}, "object": obj, **request}}


def budget(spec: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/v1alpha1", "kind": "TokenBudget", "metadata": {"name": "b", "namespace": "team-a"},
            "spec": spec}


def route(spec: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/v1alpha1", "kind": "ModelRoute", "metadata": {"name": "r", "namespace": "team-a"},
            "spec": spec}


def _judge(kind: str, r: httpx.Response) -> str:
    """CLEAR: a 4xx with a reason, or a review refusing the object with a message (not a 500 inside).
    HANDLED: a review allowing it (a Pod not selected for injection, say)."""
    outcome = kinds.CRASH
    if 400 <= r.status_code < 500 and (r.reason_phrase or r.text).strip():
        outcome = kinds.CLEAR
    elif r.status_code == 200:
        resp = r.json().get("response") or {}
        status = resp.get("status") or {}
        if resp.get("allowed") is True:
            outcome = kinds.HANDLED
        elif resp.get("allowed") is False and status.get("message") and (status.get("code") or 500) < 500:
            outcome = kinds.CLEAR
    kinds.record("webhooks", kind, outcome)
    return outcome


def _post(hooks: Webhooks, hook: str, body: bytes) -> httpx.Response:
    return httpx.post(f"{hooks.url}/{hook}", content=body, headers={"Content-Type": "application/json"}, timeout=30)


MALFORMED = {  # kind -> raw body sent to the TokenBudget validation webhook
    "not-json": b"{not json",
    "invalid-utf8": json.dumps(review(BUDGETS, budget({}))).encode().replace(b'"someone"', b'"some\xff\xfeone"'),
    "empty": b"",
    "json-a-list": b"[]",
    "json-a-string": b'"AdmissionReview"',
    "json-null": b"null",
    "request-a-string": json.dumps({"request": "x"}).encode(),
    "request-missing": json.dumps({"kind": "AdmissionReview"}).encode(),
    "resource-missing": json.dumps({"request": {**review(BUDGETS, budget({}))["request"], "resource": None}}).encode(),
    "resource-a-list": json.dumps({"request": {**review(BUDGETS, budget({}))["request"], "resource": [1]}}).encode(),
    "resource-fields-missing": json.dumps(review({"group": GROUP}, budget({}))).encode(),  # type: ignore[arg-type]
    "resource-unknown": json.dumps(review({"group": "x", "version": "v1", "resource": "things"}, {})).encode(),
    "user-info-missing": json.dumps({"request": {k: v for k, v in review(BUDGETS, budget({}))["request"].items()
                                                 if k != "userInfo"}}).encode(),
    "object-missing": json.dumps(review(BUDGETS, None)).encode(),
    "deep-nesting": b'{"request": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
}


def test_malformed_reviews_get_a_clear_error(hooks):
    for kind, body in MALFORMED.items():
        r = _post(hooks, "validate-tokenbudget", body)
        assert _judge(f"malformed:{kind}", r) == kinds.CLEAR, (kind, r.status_code, r.reason_phrase, r.text[:300])


@FUZZ
@given(hook=st.sampled_from(["validate-tokenbudget", "validate-modelroute", "inject-proxy"]),
       where=st.sampled_from(["object", "spec", "metadata", "oldObject", "operation", "namespace", "uid"]),
       value=json_value)
def test_a_review_of_any_shape_gets_a_review_or_a_4xx_never_an_internal_error(hooks, hook, where, value):
    resource = {"validate-tokenbudget": BUDGETS, "validate-modelroute": ROUTES, "inject-proxy": PODS}[hook]
    make = {"validate-tokenbudget": budget, "validate-modelroute": route}.get(hook)
    obj = make({"period": {"type": "Daily"}}) if make else {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "p", "namespace": "team-a"}, "spec": {"containers": [{"name": "app", "image": "x"}]}}
    body = review(resource, obj)
    if where in ("spec", "metadata"):
        obj[where] = value
    elif where == "object":
        body["request"]["object"] = value
    else:
        body["request"][where] = value
    r = _post(hooks, hook, json.dumps(body).encode())
    kind = f"{hook}:{where}-{type(value).__name__}"
    outcome = _judge(kind, r)
    assert outcome != kinds.CRASH, (kind, value, r.status_code, r.reason_phrase, r.text[:400])
    if r.status_code == 200 and hook == "inject-proxy" and r.json()["response"].get("patch"):
        json.loads(base64.b64decode(r.json()["response"]["patch"]))


def test_zz_after_the_abuse_the_webhooks_still_judge_a_sound_review(hooks):
    r = _post(hooks, "validate-tokenbudget", json.dumps(review(BUDGETS, budget({"period": {"type": "Daily"},
                                                                                "limits": {"cost": {"amount": "5"}}}))
                                                        ).encode())
    assert r.status_code == 200 and r.json()["response"]["allowed"] is True, r.text
    r = _post(hooks, "validate-tokenbudget", json.dumps(review(BUDGETS, budget({"period": {"type": "Daily"},
                                                                                "limits": {"cost": {"amount": "5"}},
                                                                                "thresholds": [80, 50]}))).encode())
    resp = r.json()["response"]
    assert resp["allowed"] is False and "thresholds must be strictly ascending" in resp["status"]["message"], resp
