"""Loading the proxy configuration, reading its API keys, and compiling it for the hot path.

The file holds either a ProxyConfig (JSON or YAML; what the operator renders into the ConfigMap)
or a YAML stream of ModelRoute/TokenBudget manifests (standalone use). Both end up as a validated
`ProxyConfig`, which is compiled once per change (spendwarden.routing.model) into plain objects
with everything the request path needs precomputed (upstream URLs, auth headers, prices, rule
tables, budgets per alias). The compiled classes are re-exported here for the proxy's modules.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable
from typing import Any

from .. import SECRETS_DIR
from ..plainconfig import PlainConfigError, load_proxy_config
from ..routing.model import ANTHROPIC, OPENAI, BackendRt, BudgetRt, Compiled, ConfigError, RouteRt, RuleRt
from ..routing.model import compile_config as _compile

log = logging.getLogger("spendwarden.proxy")

DEFAULT_SECRETS_DIR = SECRETS_DIR

# -- reading the file -----------------------------------------------------------------------------

def parse_config_text(text: str, namespace: str | None = None) -> tuple[Any, list[str]]:
    """A ProxyConfig from the file's text, and warnings (manifests that were left out).

    JSON (what the operator renders, after validating every object) is loaded without pydantic
    (spendwarden.plainconfig: same fields, defaults and enums, structure and types checked); a
    document that loader refuses, YAML and manifests are validated with the API models, for their
    full rules and error messages."""
    stripped = text.lstrip()
    doc: Any = None
    if stripped.startswith("{"):
        import json

        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"invalid JSON: {exc}") from exc
    else:
        import yaml

        try:
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as exc:
            raise ConfigError(f"invalid YAML: {exc}") from exc
        if len(docs) == 1 and isinstance(docs[0], dict) and "kind" not in docs[0]:
            doc = docs[0]
    if isinstance(doc, dict) and "kind" not in doc:
        if namespace and not doc.get("namespace"):
            doc = {**doc, "namespace": namespace}
        if stripped.startswith("{"):
            try:
                return load_proxy_config(doc), []
            except PlainConfigError:
                pass  # the models say what is wrong (or accept what they can coerce)
        from pydantic import ValidationError

        from ..api.proxyconfig import ProxyConfig

        try:
            return ProxyConfig.model_validate(doc), []
        except ValidationError as exc:
            from ..api.validation import explain_validation_error

            raise ConfigError(f"invalid ProxyConfig: {explain_validation_error(exc)}") from exc
    # A stream of manifests.
    from ..render.proxyconfig import load_manifests, render_proxy_config

    routes, budgets = load_manifests(text)
    if not routes and not budgets:
        raise ConfigError("no ProxyConfig and no ModelRoute/TokenBudget manifests found")
    ns = namespace or next((o.get("metadata", {}).get("namespace") for o in routes + budgets
                            if o.get("metadata", {}).get("namespace")), None) or "default"
    # Standalone use (a policy folder on a laptop or in CI): prices resolve as the operator resolves
    # them, so genai-prices is imported here, on first need. A sidecar never takes this path: it
    # reads the ProxyConfig the operator rendered, with every price already filled in.
    result = render_proxy_config(ns, routes, budgets)
    warnings = [f"{p.kind} {p.name!r} ignored: {p.message}" for p in result.problems]
    return result.config, warnings


# -- credentials ----------------------------------------------------------------------------------

def _env_name(name: str, key: str) -> str:
    return "SPENDWARDEN_SECRET_" + re.sub(r"[^A-Za-z0-9]", "_", f"{name}_{key}").upper()


def read_secret(name: str, key: str) -> str | None:
    """The API key from `$SPENDWARDEN_SECRETS_DIR/<name>/<key>` or env SPENDWARDEN_SECRET_<NAME>_<KEY>.

    None, whatever the environment says, for a name or key that leads out of the secrets directory
    ("/etc", "..", a symlink out): the route must not send another file's content as its API key."""
    directory = os.path.realpath(os.environ.get("SPENDWARDEN_SECRETS_DIR", DEFAULT_SECRETS_DIR))
    path = os.path.realpath(os.path.join(directory, name, key))
    if os.path.commonpath((directory, path)) != directory:
        log.warning("secret %r key %r resolves outside %s: refused", name[:253], key[:253], directory)
        return None
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().strip()
        if value:
            return value
    except OSError:
        pass
    value = os.environ.get(_env_name(name, key), "").strip()
    return value or None


# -- compiling ------------------------------------------------------------------------------------

def compile_config(cfg: Any, namespace: str | None = None,
                   secret: Callable[[str, str], str | None] = read_secret) -> Compiled:
    """routing.model's compilation, with the backends' API keys read from the secrets (by `secret`:
    the gateway reads each tenant's from its own file names)."""
    return _compile(cfg, namespace, secret=secret)


def secrets_fingerprint(cfg: Any, secret: Callable[[str, str], str | None] = read_secret) -> str:
    """A hash over the credentials the config refers to, so that rotated keys are picked up."""
    h = hashlib.sha256()
    for r in cfg.routes:
        for b in r.spec.backends:
            if b.credentials is not None:
                ref = b.credentials.secretRef
                h.update(f"{ref.name}/{ref.key}=".encode())
                h.update((secret(ref.name, ref.key) or "").encode())
                h.update(b"\0")
    return h.hexdigest()


__all__ = ["OPENAI", "ANTHROPIC", "ConfigError", "BackendRt", "RuleRt", "BudgetRt", "RouteRt", "Compiled",
           "DEFAULT_SECRETS_DIR", "parse_config_text", "read_secret", "compile_config", "secrets_fingerprint"]
