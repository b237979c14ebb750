#!/usr/bin/env bash
# Idempotent set-up of Airflow in its own venv (its pins clash with the project's), keyed on
# constraints-airflow.txt: ~/.cache/recsys-spark/airflow-venv-<hash>. A second run with nothing changed
# only checks markers and takes well under a second.
#
#   scripts/setup_airflow.sh     set up (or reuse) and print the venv path on the last line
#   RECSYS_SPARK_CACHE=DIR       where the venv lives (default ~/.cache/recsys-spark)
#   PYTHON=python3.11            the interpreter the venv is made from (default python3)
#
# The venv holds Airflow and the Spark provider only. Tasks run `spark-submit` from the PATH: put the
# project venv's bin (scripts/setup.sh) first on the PATH of the Airflow processes.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${RECSYS_SPARK_CACHE:-$HOME/.cache/recsys-spark}
python=${PYTHON:-python3}
constraints=$repo/constraints-airflow.txt
key=$( (cat "$constraints"; "$python" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-12)
venv=$cache/airflow-venv-$key

log() { echo "[setup_airflow] $*" >&2; }

# 1. Exactly the frozen set: every pinned line, resolved together (pip checks that they agree).
if [ ! -f "$venv/.installed" ]; then
  log "creating $venv (first run: about a minute)"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  grep -Ev '^(#|$)' "$constraints" >"$venv/.requirements"
  "$venv/bin/pip" install -q -r "$venv/.requirements"
  touch "$venv/.installed"
fi

# 2. Verify once per venv: the CLI starts and the Spark provider's operator imports. AIRFLOW_HOME points
#    inside the venv so that this check never writes an airflow.cfg into ~/airflow.
if [ ! -f "$venv/.verified" ]; then
  log "verifying airflow and the spark provider"
  export AIRFLOW_HOME=$venv/.airflow-home
  "$venv/bin/airflow" version >&2
  "$venv/bin/python" -c 'from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator' >&2
  "$venv/bin/pip" check >&2
  touch "$venv/.verified"
fi
echo "$venv"
