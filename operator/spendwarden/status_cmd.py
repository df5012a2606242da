"""`spendwarden status [-n NS | -A] [-o json]`: budgets at a glance, from TokenBudget status."""
from __future__ import annotations

import argparse
import json
import sys

from . import GROUP, VERSION
from .render.budget_table import rows, table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", help="Only this namespace (default: the kubeconfig context's).")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="Every namespace.")
    parser.add_argument("-o", "--output", choices=["table", "json"], default="table")
    parser.add_argument("--kubeconfig", help="Path to a kubeconfig (default: $KUBECONFIG or ~/.kube/config).")


def run(args: argparse.Namespace) -> int:
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    try:
        config.load_kube_config(config_file=args.kubeconfig)
        _, context = config.list_kube_config_contexts(config_file=args.kubeconfig)
    except (config.ConfigException, OSError) as exc:
        print(f"spendwarden status: no usable kubeconfig: {exc}", file=sys.stderr)
        return 2
    api = client.CustomObjectsApi()
    namespace = args.namespace or (context or {}).get("context", {}).get("namespace") or "default"
    try:
        if args.all_namespaces:
            found = api.list_cluster_custom_object(GROUP, VERSION, "tokenbudgets")
        else:
            found = api.list_namespaced_custom_object(GROUP, VERSION, namespace, "tokenbudgets")
    except ApiException as exc:
        print(f"spendwarden status: listing TokenBudgets failed: {exc.status} {exc.reason}", file=sys.stderr)
        return 1
    items = rows(found.get("items", []))
    if args.output == "json":
        print(json.dumps(items, indent=2))
    else:
        print(table(items, show_namespace=args.all_namespaces))
    return 0
