"""The operator's settings, read once from its flags and environment (controller/settings.py), and
the kopf registrations made from them (controller/handlers.py)."""
from __future__ import annotations

import argparse
import dataclasses
import os

import kopf
import pytest

from spendwarden.controller import handlers
from spendwarden.controller import run as operator_cli
from spendwarden.controller.runtime import Runtime
from spendwarden.controller.settings import OperatorSettings


def settings(argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> OperatorSettings:
    for name in [n for n in os.environ if n.startswith("SPENDWARDEN_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # the flags' defaults come from the environment
    parser = argparse.ArgumentParser()
    operator_cli.add_arguments(parser)
    return OperatorSettings.from_args(parser.parse_args(argv), env)


def test_flags_win_over_the_environment_and_the_rest_comes_from_it(monkeypatch):
    s = settings(["--ledger-port", "0", "--metrics-port", "0", "-n", "team-*", "--ledger-insecure"],
                 {"SPENDWARDEN_LEDGER_PORT": "9999", "SPENDWARDEN_LEDGER_FLUSH_INTERVAL": "0.5",
                  "SPENDWARDEN_RECONCILE_WORKERS": "3", "SPENDWARDEN_ROLLOVER_INTERVAL": "2",
                  "SPENDWARDEN_CUTOFF_RESYNC": "7", "SPENDWARDEN_SCALE_INTERVAL": "0.25",
                  "SPENDWARDEN_LEDGER_URL": "http://ledger:8081", "SPENDWARDEN_POD_NAME": "op-0"}, monkeypatch)
    assert (s.ledger.port, s.ledger.metrics_port, s.ledger.insecure) == (0, 0, True)
    assert s.ledger.namespaces == s.namespaces == ("team-*",)
    assert s.ledger.flush_interval == 0.5 and s.ledger.serves("team-a") and not s.ledger.serves("other")
    assert (s.reconcile.workers, s.reconcile.rollover_interval, s.reconcile.ledger_url) == (3, 2.0, "http://ledger:8081")
    assert (s.cutoff.resync, s.scaler.interval, s.leader.identity) == (7.0, 0.25, "op-0")
    assert not s.webhooks.enabled
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.ledger.port = 1  # type: ignore[misc]


def test_webhooks_flag_enables_the_webhooks_on_its_port(monkeypatch):
    s = settings(["--webhooks", "--webhook-port", "9555"], {}, monkeypatch)
    assert s.webhooks.enabled and s.webhooks.port == 9555
    assert settings([], {"SPENDWARDEN_WEBHOOK_PORT": "9443"}, monkeypatch).webhooks.enabled


def _registered(s: OperatorSettings) -> tuple[set[str], set[str]]:
    registry = kopf.OperatorRegistry()
    handlers.register(registry, Runtime(s))
    activities = {h.id for h in registry._activities.get_all_handlers()}
    webhooks = {h.id for h in registry._webhooks.get_all_handlers()}
    return activities, webhooks


def test_admission_is_registered_by_the_call_only_when_enabled(monkeypatch):
    activities, webhooks = _registered(settings([], {}, monkeypatch))
    assert {"spendwarden-ledger", "spendwarden-scaler", "login_via_client"} <= activities
    assert "spendwarden-admission" not in activities and not webhooks
    activities, webhooks = _registered(settings(["--webhooks"], {}, monkeypatch))
    assert "spendwarden-admission" in activities
    assert webhooks == {"validate-modelroute", "validate-tokenbudget", "inject-proxy"}


def _watchers(s: OperatorSettings) -> set[str]:
    registry = kopf.OperatorRegistry()
    handlers.register(registry, Runtime(s))
    return {h.id for h in registry._watching.get_all_handlers()}


def test_gateway_settings_come_from_the_chart_environment_and_register_the_gateway(monkeypatch):
    s = settings([], {"SPENDWARDEN_GATEWAY_NAMESPACE": "sw-gateway", "SPENDWARDEN_DEFAULT_MODE": "gateway",
                      "SPENDWARDEN_GATEWAY_SERVICE_ACCOUNT": "spendwarden-gateway",
                      "SPENDWARDEN_GATEWAY_EGRESS_CIDRS": "10.1.0.0/16"}, monkeypatch)
    assert (s.gateway.enabled, s.gateway.namespace, s.gateway.default_mode) == (True, "sw-gateway", "gateway")
    assert s.gateway.egress_cidrs == ("10.1.0.0/16",)
    runtime = Runtime(s)
    assert runtime.gateway is not None and runtime.reconciler.rendered == runtime.gateway.rendered
    activities, _ = _registered(s)
    assert "spendwarden-gateway" in activities and "gateway-namespaces" in _watchers(s)
    off = settings([], {}, monkeypatch)
    assert not off.gateway.enabled and Runtime(off).gateway is None
    assert "spendwarden-gateway" not in _registered(off)[0]
    assert {"gateway-mode-notes"} <= _watchers(off) and "gateway-namespaces" not in _watchers(off)
