"""The `spendwarden` command: one entry point, one module per subcommand (here, or for the two runtimes
their own run modules).

Each subcommand's module exposes `add_arguments(parser)` and `run(args) -> int`, imported lazily so
that `spendwarden crds` does not pay for kopf or aiohttp.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "operator": ("spendwarden.controller.run", "Run the operator (control plane)."),
    "proxy": ("spendwarden.proxy.run", "Run the sidecar proxy (data plane), in a pod or standalone."),
    "gateway": ("spendwarden.proxy.gateway_run", "Run the shared gateway: the proxy for every namespace in gateway mode, authenticating each caller."),
    "crds": ("spendwarden.cli.crds", "Write the CRD manifests generated from the API models."),
    "render": ("spendwarden.cli.render", "Render the proxy configuration for manifests in files (offline)."),
    "local-cluster": ("spendwarden.cli.local_cluster", "Start the local control plane (etcd + kube-apiserver + kube-controller-manager)."),
    "status": ("spendwarden.cli.status", "Show budgets: usage bar, spent / limit, state, forecast, reset time."),
    "report": ("spendwarden.cli.report", "Cost and tokens per namespace, route, backend and tag, per period."),
    "prices": ("spendwarden.cli.prices", "Effective prices per 1M tokens (catalog, pinned) and their source."),
    "simulate": ("spendwarden.cli.simulate", "Replay a traffic log against candidate ModelRoutes offline: cost, escalations, cache hits, budget run-out."),
    "demo": ("spendwarden.demo", "Run the demo on a local control plane: operator, examples, status."),
    "mock-upstream": ("spendwarden.devtools.mock_upstream", "Run the mock OpenAI/Anthropic upstream (tests, demo, benchmarks)."),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spendwarden", description="Kubernetes-native AI spend policies.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    wanted = argv[0] if argv else None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_module=module)
    args = parser.parse_args(argv)
    return int(args._module.run(args) or 0)

