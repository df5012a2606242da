#!/usr/bin/env bash
# The main job on the embedded default: a local control plane, the operator, examples/ applied.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$VENV/bin/spendwarden" demo "$@"
