#!/usr/bin/env bash
# The README's main command: set-up (idempotent, cached), then the whole pipeline on the embedded
# default: local Spark, Delta tables in ./warehouse, a generated synthetic event log.
# Extra arguments go to `recsys-spark pipeline`, e.g. scripts/demo.sh --input u.data --preset movielens
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$(bash "$repo/scripts/setup.sh" | tail -n 1)
cd "$repo"
exec "$venv/bin/recsys-spark" pipeline "$@"
