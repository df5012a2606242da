#!/usr/bin/env bash
# Everything a fresh machine needs, idempotent: Debian packages, a venv outside the repo with the
# project and its test dependencies, and the local cluster's binaries (built once, then cached).
# Source it (`. scripts/setup.sh`) to get $VENV and $SPENDWARDEN_CACHE; running it also works.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export SPENDWARDEN_CACHE=${SPENDWARDEN_CACHE:-$HOME/.cache/spendwarden}
VENV=${SPENDWARDEN_VENV:-$SPENDWARDEN_CACHE/venv}
log() { echo "[setup] $*" >&2; }
mkdir -p "$SPENDWARDEN_CACHE"

SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
need=()
# These machines ship kubectl 1.32 in the base image. Debian's own kubectl (kubernetes-client,
# 1.20) is the fallback: it drives the tests, but its built-in kustomize predates `replacements`,
# which examples/ uses, so examples/ then needs a standalone kustomize >= 4.1.
command -v kubectl >/dev/null || need+=(kubernetes-client)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  log "apt-get install ${need[*]}"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >&2
fi

# Prometheus (Debian's 2.42) for tests/{proxy,integration}/test_prometheus.py: run as a plain binary
# with its own config; --no-install-recommends skips node-exporter and its collectors.
if ! command -v prometheus >/dev/null && [ ! -x /usr/bin/prometheus ]; then
  log "apt-get install prometheus"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >&2
  # The package starts prometheus.service on :9090 where systemd runs; the tests need only the binary.
  $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >&2
fi
stamp="$VENV/.spendwarden-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  log "installing spendwarden and test dependencies into the venv"
  "$VENV/bin/pip" install -q -e "$ROOT[test]" >&2
  touch "$stamp"
fi

# The local cluster: Kubernetes 1.37 (control plane and a node), etcd, containerd, CoreDNS,
# kube-router, built from Go modules once (25-35 min on 2 cores) and cached; Debian's runc and CNI plugins.
if [ -z "${KUBEBUILDER_ASSETS:-}" ] && [ -z "${SPENDWARDEN_TEST_KUBECONFIG:-}" ]; then
  export KUBEBUILDER_ASSETS=$(bash "$ROOT/scripts/cluster/build.sh" | tail -1)
fi
# The cluster's kubectl and helm (the server's release) come before the machine's own.
export VENV PATH="$VENV/bin${KUBEBUILDER_ASSETS:+:$KUBEBUILDER_ASSETS}:$PATH"
# The venv's editable install points at the checkout that first created it; this checkout's code
# must win (a second clone, a git worktree), in this shell and in every process it starts.
export PYTHONPATH="$ROOT/operator${PYTHONPATH:+:$PYTHONPATH}"
log "ready: venv $VENV, control plane binaries ${KUBEBUILDER_ASSETS:-(existing cluster)}"
