#!/usr/bin/env bash
# Build what `spark-submit --py-files` ships to executors: the recsys_spark wheel (a zip Python imports
# from). Prints its path. Usage: scripts/build_pyfiles.sh [OUT_DIR] (default dist/)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$repo/dist}
python=${PYTHON:-$repo/.venv/bin/python}
mkdir -p "$out"
rm -f "$out"/recsys_spark-*.whl
"$python" -m pip wheel -q --no-deps --no-build-isolation -w "$out" "$repo" >&2
rm -rf "$repo/build"
ls "$out"/recsys_spark-*.whl
