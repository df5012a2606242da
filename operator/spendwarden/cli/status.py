"""`spendwarden status [-n NS | -A] [-o json]`: budgets at a glance, from TokenBudget status."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, cast

from .. import GROUP, VERSION
from ..render.budget_table import rows, table


def add_scope_arguments(parser: argparse.ArgumentParser, outputs: list[str]) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", help="Only this namespace (default: the kubeconfig context's).")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="Every namespace.")
    parser.add_argument("-o", "--output", choices=outputs, default="table")
    parser.add_argument("--kubeconfig", help="Path to a kubeconfig (default: $KUBECONFIG or ~/.kube/config).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_scope_arguments(parser, outputs=["table", "json"])


def list_budgets(args: argparse.Namespace, command: str) -> list[dict[str, Any]] | int:
    """The TokenBudgets in the selected scope, or an exit code after printing why not."""
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    try:
        config.load_kube_config(config_file=args.kubeconfig)
        _, context = config.list_kube_config_contexts(config_file=args.kubeconfig)
    except (config.ConfigException, OSError) as exc:
        print(f"spendwarden {command}: no usable kubeconfig: {exc}", file=sys.stderr)
        return 2
    api = client.CustomObjectsApi()
    namespace = args.namespace or (context or {}).get("context", {}).get("namespace") or "default"
    try:
        if args.all_namespaces:
            found = api.list_cluster_custom_object(GROUP, VERSION, "tokenbudgets")
        else:
            found = api.list_namespaced_custom_object(GROUP, VERSION, namespace, "tokenbudgets")
    except ApiException as exc:
        print(f"spendwarden {command}: listing TokenBudgets failed: {exc.status} {exc.reason}", file=sys.stderr)
        return 1
    # The client's stubs type custom objects as object: they are the JSON dict.
    return list(cast(dict[str, Any], found).get("items", []))


def run(args: argparse.Namespace) -> int:
    items = list_budgets(args, "status")
    if isinstance(items, int):
        return items
    out = rows(items)
    if args.output == "json":
        print(json.dumps(out, indent=2))
    else:
        print(table(out, show_namespace=args.all_namespaces))
    return 0
