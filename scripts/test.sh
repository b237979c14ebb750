#!/usr/bin/env bash
# The README's test command: set-up (idempotent, cached), then the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not cluster" -x
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$(bash "$repo/scripts/setup.sh" | tail -n 1)
cd "$repo"
exec "$venv/bin/python" -m pytest "$@"
