#!/usr/bin/env bash
# Build PyCUDA from source and install it, offline if need be.
#
#   bash perf/build_pycuda.sh [PYTHON]            (default PYTHON: python3)
#
# Sources, in order: perf/vendor/ (a pycuda-*.tar.gz sdist and wheels of its pure-Python
# dependencies: pytools, mako, platformdirs, siphash24; perf/fetch_vendor.sh fills it on a
# machine with internet), else PyPI. Env: CUDA_ROOT (default /usr/local/cuda).
#
# Two things stop a plain `pip install pycuda` on CUDA toolkits like ours:
# - no curand.h: PyCUDA's setup.py ignores environment variables, so curand can only be left out
#   through its configure.py (which writes the siteconf.py that setup.py reads);
# - no libcuda.so to link against (pip-packaged toolkits have no lib64/stubs): the extension must
#   still link against *a* libcuda.so.1, so we build a stub exporting every cu* name of cuda.h.
#   Only its SONAME matters: at run time the real driver's libcuda.so.1 is loaded.
set -euo pipefail

PY=${1:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
VENDOR="$HERE/vendor"
CUDA_ROOT=${CUDA_ROOT:-/usr/local/cuda}
WORK=$(mktemp -d /tmp/pycuda-build.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

find_links=()
if compgen -G "$VENDOR/pycuda-*.tar.gz" >/dev/null; then
  SDIST=$(find "$VENDOR" -maxdepth 1 -name 'pycuda-*.tar.gz' | sort | tail -1)
  find_links=(--no-index --find-links "$VENDOR")
else
  echo "no sdist in $VENDOR: downloading one from PyPI"
  "$PY" -m pip download --no-deps --no-binary :all: --no-build-isolation -d "$WORK/sdist" pycuda \
    || true  # pip may fail at metadata after the download itself has worked
  SDIST=$(find "$WORK/sdist" -maxdepth 1 -name 'pycuda-*.tar.gz' | sort | tail -1)
fi
echo "building $(basename "$SDIST") with $("$PY" --version) against $CUDA_ROOT"
tar xzf "$SDIST" -C "$WORK"
SRC=$(find "$WORK" -mindepth 1 -maxdepth 1 -type d -name 'pycuda-*' | head -1)

libdirs="$CUDA_ROOT/lib64,$CUDA_ROOT/lib64/stubs,$CUDA_ROOT/lib,$CUDA_ROOT/lib/stubs"
if ! compgen -G "$CUDA_ROOT/lib64/libcuda.so" >/dev/null \
    && ! compgen -G "$CUDA_ROOT/lib*/stubs/libcuda.so" >/dev/null; then
  mkdir -p "$WORK/stub"
  printf '#include <cuda.h>\n#include <cudaProfiler.h>\n' \
    | gcc -E -P -I"$CUDA_ROOT/include" -x c - \
    | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d ' \t(' | sort -u \
    | awk '{printf "int %s(void){return 999;}\n", $1}' >"$WORK/stub/stub.c"
  gcc -shared -fPIC -o "$WORK/stub/libcuda.so" -Wl,-soname,libcuda.so.1 "$WORK/stub/stub.c"
  libdirs="$WORK/stub,$libdirs"
fi

curand=--no-cuda-enable-curand
if [ -f "$CUDA_ROOT/include/curand.h" ] && compgen -G "$CUDA_ROOT/lib64/libcurand.so*" >/dev/null; then
  curand=
fi

cd "$SRC"
"$PY" configure.py --cuda-root="$CUDA_ROOT" $curand --cudadrv-lib-dir="$libdirs"
"$PY" -m pip wheel --no-deps --no-build-isolation "${find_links[@]}" -w "$WORK/wheels" .
"$PY" -m pip install "${find_links[@]}" "$WORK"/wheels/pycuda-*.whl
"$PY" -c 'import pycuda; print("PyCUDA", ".".join(map(str, pycuda.VERSION)), "installed")'
