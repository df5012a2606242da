#!/usr/bin/env bash
# The test command: sets up everything (see setup.sh), then runs the whole suite, unit and
# integration (against a real local control plane). Extra arguments go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$ROOT/scripts/setup.sh"
cd "$ROOT"
start=$(date +%s)
set +e
# The static checks first (a minute); the suite runs whatever they say, and both decide the exit code.
lint=0
if [ "${SPENDWARDEN_SKIP_LINT:-}" != 1 ]; then bash "$ROOT/scripts/lint.sh"; lint=$?; fi
"$VENV/bin/python" -m pytest -p no:cacheprovider -ra "$@"
rc=$?
set -e
echo "[test] static checks exit code $lint; suite finished in $(( $(date +%s) - start ))s with exit code $rc" >&2
[ "$lint" -eq 0 ] || exit "$lint"
exit $rc
