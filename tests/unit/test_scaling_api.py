"""ModelRoute backend scaling settings: good ones accepted with their defaults, bad ones refused with a
message that names the field."""
from __future__ import annotations

import copy
from datetime import UTC

import pytest

from spendwarden.api.modelroute import ModelRouteSpec, WakeMode
from spendwarden.api.validation import validate_spec
from spendwarden.render.status import modelroute_status

ROUTE = {
    "model": "chat",
    "backends": [
        {"name": "llama", "provider": "OpenAICompatible", "url": "http://llama.inference:8080/v1", "model": "llama",
         "pricing": {"input": "0", "output": "0"}, "deploymentRef": {"name": "llama"},
         "scaling": {"maxReplicas": 4}},
        {"name": "mini", "provider": "OpenAI", "url": "https://api.openai.com/v1", "model": "gpt-4o-mini",
         "pricing": {"input": "0.15", "output": "0.60"}},
    ],
    "defaultBackend": "llama",
    "fallbacks": ["mini"],
}


def route_with(**scaling) -> dict:
    spec = copy.deepcopy(ROUTE)
    spec["backends"][0]["scaling"].update(scaling)
    return spec


def test_defaults():
    spec = ModelRouteSpec.model_validate(ROUTE)
    s = spec.backends[0].scaling
    assert (s.minReplicas, s.maxReplicas, s.targetInFlightPerReplica) == (1, 4, 4)
    assert (s.scaleDownStabilization, s.idleToZeroAfter, s.costPerReplicaHour) == ("5m", None, None)
    assert (s.wake.mode, s.wake.timeout) == (WakeMode.HOLD, "60s")


def test_full_settings_accepted():
    spec, problem = validate_spec("ModelRoute", route_with(
        minReplicas=0, targetInFlightPerReplica=8, scaleDownStabilization="30s", idleToZeroAfter="10m",
        wake={"mode": "Fallback", "timeout": "5s"}, costPerReplicaHour="2.75"))
    assert problem is None, problem
    assert spec.backends[0].scaling.costPerReplicaHour == "2.75"


@pytest.mark.parametrize("change, message", [
    ({"minReplicas": 5}, "minReplicas 5 > maxReplicas 4"),
    ({"maxReplicas": 0}, "scaling.maxReplicas: Input should be greater than or equal to 1"),
    ({"targetInFlightPerReplica": 0}, "scaling.targetInFlightPerReplica: Input should be greater than or equal to 1"),
    ({"costPerReplicaHour": 2.5}, "scaling.costPerReplicaHour: Input should be a valid string"),
    ({"costPerReplicaHour": "-1"}, "scaling.costPerReplicaHour: String should match pattern"),
    ({"scaleDownStabilization": "5 minutes"}, "scaling.scaleDownStabilization: String should match pattern"),
    ({"idleToZeroAfter": "0s"}, "idleToZeroAfter must be longer than 0s"),
    ({"wake": {"mode": "Sleep"}}, "scaling.wake.mode: Input should be 'Hold' or 'Fallback'"),
    ({"wake": {"timeout": "0m"}}, "wake.timeout must be longer than 0s"),
    ({"replicas": 3}, "scaling.replicas: Extra inputs are not permitted"),
])
def test_bad_settings_name_the_field(change, message):
    _, problem = validate_spec("ModelRoute", route_with(**change))
    assert problem is not None and message in problem, problem


def test_scaling_needs_a_deployment_ref():
    spec = copy.deepcopy(ROUTE)
    del spec["backends"][0]["deploymentRef"]
    _, problem = validate_spec("ModelRoute", spec)
    assert "backends[0] (llama): scaling needs deploymentRef" in problem


def test_fallback_wake_needs_a_fallback():
    spec = route_with(wake={"mode": "Fallback"})
    spec["fallbacks"] = []
    _, problem = validate_spec("ModelRoute", spec)
    assert "scaling.wake.mode Fallback needs spec.fallbacks to name another backend" in problem
    spec["fallbacks"] = ["llama"]  # itself is no fallback
    _, problem = validate_spec("ModelRoute", spec)
    assert "needs spec.fallbacks" in problem


def test_reconcile_never_writes_the_scalers_fields():
    from datetime import datetime

    spec = ModelRouteSpec.model_validate(ROUTE)
    obj = {"kind": "ModelRoute", "metadata": {"name": "r", "generation": 2},
           "status": {"scaling": [{"backend": "llama", "workload": "Deployment/ns/llama", "replicas": 3}]}}
    assert "scaling" not in modelroute_status(obj, spec, datetime.now(UTC))
