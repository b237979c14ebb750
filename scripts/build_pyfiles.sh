#!/usr/bin/env bash
# Build what `spark-submit --py-files` ships to executors: recsys_spark as a .zip (Spark puts .zip, .egg
# and .jar files from --py-files on the executors' Python path, but not .whl). Prints its path.
# Usage: scripts/build_pyfiles.sh [OUT_DIR]   (default dist/)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$repo/dist}
mkdir -p "$out"
zip=$(cd "$out" && pwd)/recsys_spark.zip
rm -f "$zip"
(cd "$repo" && find recsys_spark -name '*.py' -o -name '*.properties' | sort | zip -q -X "$zip" -@)
echo "$zip"
