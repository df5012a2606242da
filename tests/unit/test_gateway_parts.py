"""The gateway's pure parts: the caller's credential, each tenant's key files, the rate limits."""
from __future__ import annotations

import pytest

from spendwarden.proxy.gateway import credential, looks_like_jwt, tenant_secret_reader
from spendwarden.proxy.ratelimit import Rate, TenantLimits, TokenBuckets


def test_the_credential_is_the_api_key_either_sdk_sends():
    assert credential({"Authorization": "Bearer eyJ.a.b"}) == "eyJ.a.b"
    assert credential({"x-api-key": "eyJ.a.b"}) == "eyJ.a.b"
    # Authorization wins: a client cannot pick the header the gateway checks.
    assert credential({"Authorization": "Basic dXNlcg==", "x-api-key": "eyJ.a.b"}) is None
    assert credential({"x-api-key": "two words"}) is None
    assert credential({"x-api-key": "x" * 9000}) is None
    assert credential({}) is None


def test_a_tenant_reads_only_its_own_key_files(tmp_path):
    (tmp_path / "team-a_openai_apiKey").write_text("sk-a\n")
    (tmp_path / "team-b_openai_apiKey").write_text("sk-b")
    (tmp_path / "secret").write_text("not a key")
    read_a = tenant_secret_reader(str(tmp_path), "team-a")
    assert read_a("openai", "apiKey") == "sk-a"
    assert read_a("openai", "other") is None
    # No name leads to another tenant's file or out of the directory.
    for name, key in [("../team-b_openai", "apiKey"), ("openai", "../../secret"), ("x_team-b", "apiKey"),
                      ("openai", ".."), ("", "apiKey"), ("team-b_openai", "apiKey")]:
        assert read_a(name, key) is None, (name, key)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_admits_its_burst_then_its_rate():
    clock = Clock()
    b = TokenBuckets(Rate(2, 3), clock)
    assert [b.take("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take("k") == pytest.approx(0.5)
    clock.now = 0.5
    assert b.take("k") == 0.0
    assert b.take("k") > 0
    assert TokenBuckets(Rate(0, 0), clock).take("k") == 0.0  # 0: no limit


def test_the_namespace_limit_refunds_the_serviceaccount_token_it_refused():
    clock = Clock()
    limits = TenantLimits(Rate(1, 2), Rate(1, 2), clock)
    assert limits.admit("a", "x") is None
    assert limits.admit("a", "y") is None
    assert limits.admit("a", "z")[0] == "namespace"
    assert limits.admit("a", "x")[0] == "namespace"
    clock.now = 1.0
    assert limits.admit("a", "z") is None  # z's refused try cost it nothing
    assert limits.admit("b", "x") is None  # another namespace has its own bucket


def test_buckets_are_bounded_however_many_callers():
    clock = Clock()
    b = TokenBuckets(Rate(1, 5), clock, max_buckets=100)
    for i in range(10_000):
        b.take(i)
        clock.now += 0.001
    assert len(b) <= 100
    # Buckets that have refilled are the first dropped: a throttled caller stays throttled.
    slow = TokenBuckets(Rate(1, 1), clock, max_buckets=10)
    for i in range(10):
        slow.take(i)
    clock.now += 2  # 0..9 are full again
    slow.take("hot")
    slow.take("new")  # the eleventh bucket: the full ones go
    assert len(slow) == 2
    assert slow.take("hot") > 0


@pytest.mark.parametrize("rate,burst", [(-1, 1), (float("inf"), 1), (1, 0)])
def test_bad_rates_are_refused(rate, burst):
    with pytest.raises(ValueError):
        Rate(rate, burst)


def test_the_gateway_serves_the_metered_and_the_responses_endpoints_as_a_sidecar_does(tmp_path):
    from spendwarden.proxy.gateway import Gateway
    from spendwarden.proxy.responses import RESPONSE_ROUTES
    from spendwarden.proxy.server import SERVED

    gw = Gateway(str(tmp_path), str(tmp_path), reviewer=None, limits=TenantLimits(Rate(0, 0), Rate(0, 0)))
    served = {(r.method, r.resource.canonical) for r in gw.app(1024).router.routes()}
    assert {("POST", path) for path, _, _ in SERVED} <= served
    assert {(method, path) for method, path, _ in RESPONSE_ROUTES} <= served
    assert ("POST", "/v1/responses") in served


def test_only_jwt_shaped_credentials_go_to_tokenreview():
    assert looks_like_jwt("eyJhbGciOiJSUzI1NiIsImtpZCI6ImsifQ.eyJzdWIiOiJ4In0.c2ln")
    for not_a_token in ("sk-proj-abcdef123", "sk-ant-api03-abc", "a.b.c", "eyJhbGciOiJSUzI1NiJ9..sig",
                        "eyJ0eXAiOiJKV1QifQ.e30.c2ln",  # a JSON header without alg
                        "W10.e30.c2ln",                 # a JSON header that is not an object
                        "eyJhbGciOiJSUzI1NiJ9.e30.c2ln.extra", "eyJhbGc+.e30.c2ln"):
        assert not looks_like_jwt(not_a_token), not_a_token
