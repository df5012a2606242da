#!/usr/bin/env bash
# The static checks CI runs before the tests (scripts/test.sh): ruff, the import-linter layer
# contracts and acyclicity (pyproject.toml [tool.importlinter]), mypy. Expects the venv of setup.sh.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV=${VENV:-$HOME/.cache/spendwarden/venv}
export PYTHONPATH="$ROOT/operator${PYTHONPATH:+:$PYTHONPATH}"
rc=0
run() {
  local name=$1; shift
  local start=$(date +%s)
  if "$@"; then echo "[lint] $name: ok ($(( $(date +%s) - start ))s)" >&2
  else echo "[lint] $name: FAILED" >&2; rc=1; fi
}
run ruff "$VENV/bin/ruff" check --no-cache operator tests bench scripts
run import-linter "$VENV/bin/lint-imports" --no-cache
run mypy "$VENV/bin/mypy" --cache-dir "${TMPDIR:-/tmp}/spendwarden-mypy-cache"
exit $rc
