#!/usr/bin/env bash
# Idempotent set-up: a venv keyed on constraints.txt, Horovod built once from its sdist (cached wheel),
# the Delta jars resolved once from Maven Central, one verification, and the JVM class archive. A second
# run with nothing changed only checks markers and finishes in a few seconds.
#
#   scripts/setup.sh            set up (or reuse) and print the venv path on the last line
#   RECSYS_SPARK_CACHE=DIR      where the venv, wheels and jars live (default ~/.cache/recsys-spark)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${RECSYS_SPARK_CACHE:-$HOME/.cache/recsys-spark}
python=${PYTHON:-python3}
delta_version=$(sed -n 's/^delta-spark==//p' "$repo/constraints.txt")
horovod_version=$(sed -n 's/^horovod==//p' "$repo/constraints.txt")
key=$( (cat "$repo/constraints.txt"; "$python" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-12)
venv=$cache/venv-$key
wheels=$cache/wheels
jars=$cache/jars/delta-$delta_version

log() { echo "[setup] $*" >&2; }

# 1. Python packages, from the constraints file only.
if [ ! -f "$venv/.installed" ]; then
  log "creating $venv (first run: downloads torch, pyspark, ...; a few minutes)"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip "setuptools<80" wheel
  grep -Ev '^(#|horovod==|$)' "$repo/constraints.txt" | cut -d= -f1 >"$venv/.requirements"
  "$venv/bin/pip" install -q -c "$repo/constraints.txt" -r "$venv/.requirements"
  touch "$venv/.installed"
fi

# 2. Horovod 0.28.1 with PyTorch + Gloo: torch >= 2.1 headers need C++17, Horovod asks for C++14, so a
#    compiler wrapper appends -std=c++17; Debian's CMake 3.25 (PyPI's CMake 4 rejects Horovod's files).
if ! "$venv/bin/python" -c "import horovod.torch" 2>/dev/null; then
  wheel=$(ls "$wheels"/horovod-"$horovod_version"-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$wheel" ]; then
    log "building horovod $horovod_version (about 5 minutes on 2 cores; cached afterwards)"
    mkdir -p "$wheels" "$cache/bin"
    printf '#!/bin/sh\nexec g++ "$@" -std=c++17\n' >"$cache/bin/cxx17"
    chmod +x "$cache/bin/cxx17"
    gpu_env=()
    if [ -n "${CUDA_HOME:-}" ] || [ -d /usr/local/cuda ]; then
      cuda=${CUDA_HOME:-/usr/local/cuda}
      gpu_env=(CUDA_HOME="$cuda" CUDAToolkit_ROOT="$cuda" HOROVOD_GPU_OPERATIONS=NCCL
               HOROVOD_BUILD_CUDA_CC_LIST="${HOROVOD_BUILD_CUDA_CC_LIST:-90}")
    fi
    env PATH="$venv/bin:/usr/bin:/bin" CXX="$cache/bin/cxx17" "${gpu_env[@]}" \
      HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
      HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
      "$venv/bin/pip" wheel -q --no-build-isolation --no-deps -w "$wheels" "horovod==$horovod_version"
    wheel=$(ls "$wheels"/horovod-"$horovod_version"-*.whl | head -1)
  fi
  "$venv/bin/pip" install -q --no-deps "$wheel"
fi

# 3. Delta jars, resolved once so that Spark never needs the network at run time.
if [ ! -f "$jars/.complete" ]; then
  log "fetching Delta $delta_version jars into $jars"
  mkdir -p "$jars"
  for artifact in "io.delta:delta-spark_2.12:$delta_version" "io.delta:delta-storage:$delta_version"; do
    mvn -q -B org.apache.maven.plugins:maven-dependency-plugin:3.6.1:copy \
      -Dartifact="$artifact" -DoutputDirectory="$jars" >&2
  done
  touch "$jars/.complete"
fi

# 4. The project itself, editable, re-pointed when the venv is reused from another checkout.
if [ "$(cat "$venv/.project" 2>/dev/null)" != "$repo" ]; then
  "$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$repo"
  echo "$repo" >"$venv/.project"
fi
ln -sfn "$venv" "$repo/.venv"

# 5. Verify once per venv: Horovod build flags, Petastorm import, a Delta write and read.
if [ ! -f "$venv/.verified" ]; then
  log "verifying the stack"
  "$venv/bin/horovodrun" --check-build | tee "$venv/.horovod-build" >&2
  grep -q '\[X\] PyTorch' "$venv/.horovod-build" && grep -q '\[X\] Gloo' "$venv/.horovod-build" \
    || { log "horovod was built without PyTorch or Gloo"; exit 1; }
  RECSYS_SPARK_JARS="$jars" "$venv/bin/python" -m recsys_spark.doctor >&2
  touch "$venv/.verified"
fi

# 6. The driver JVM's class-data archive (recsys_spark.session.class_archive), once per venv and JDK: every
#    local Spark session starts from it, several seconds sooner. Optional: without it Spark starts as usual.
archive=$venv/share/recsys-spark/classes.jsa
jdk=$(java -version 2>&1 | head -n 2 | tr '\n' ' ')
if [ ! -f "$archive" ] || [ "$(cat "$archive.jdk" 2>/dev/null)" != "$jdk" ]; then
  log "building the JVM class archive $archive (about 2 minutes, once)"
  mkdir -p "$(dirname "$archive")"
  if RECSYS_SPARK_JARS="$jars" RECSYS_SPARK_DRIVER_MEMORY=1g "$venv/bin/python" \
       "$repo/scripts/build_class_archive.py" "$archive" >"$venv/.class-archive.log" 2>&1; then
    echo "$jdk" >"$archive.jdk"
  else
    log "no class archive (Spark starts without it): see $venv/.class-archive.log"
  fi
fi
echo "$venv"
