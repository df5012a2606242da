#!/usr/bin/env bash
# The test command: sets up everything (see setup.sh), then runs the whole suite, unit and
# integration (against a real local control plane). Extra arguments go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$ROOT/scripts/setup.sh"
cd "$ROOT"
start=$(date +%s)
set +e
"$VENV/bin/python" -m pytest -p no:cacheprovider -ra "$@"
rc=$?
set -e
echo "[test] suite finished in $(( $(date +%s) - start ))s with exit code $rc" >&2
exit $rc
