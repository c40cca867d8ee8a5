#!/usr/bin/env bash
# Fill perf/vendor/ (ignored by git) with what perf/build_pycuda.sh needs to build PyCUDA on a GPU
# host without internet: the PyCUDA sdist and wheels of its dependencies for that host's Python.
#
#   bash perf/fetch_vendor.sh [PYTHON_VERSION]      (default 3.12, the GPU machines' Python)
#
# Then copy perf/vendor/ to the GPU host with the tree (the device tool: carry ["perf/vendor"]).
set -euo pipefail
PYVER=${1:-3.12}
VENDOR=$(cd "$(dirname "$0")" && pwd)/vendor
mkdir -p "$VENDOR"
PYCUDA=${PYCUDA_VERSION:-2026.1}
# The sdist's address, from PyPI's JSON API (pip download would also try to build its metadata).
python3 - "$PYCUDA" "$VENDOR" <<'PY'
import json, sys, urllib.request
version, vendor = sys.argv[1:]
project = json.load(urllib.request.urlopen("https://pypi.org/pypi/pycuda/json"))
files = project.get("releases", {}).get(version) or project["urls"]  # urls: the latest release
(sdist,) = [f for f in files if f["packagetype"] == "sdist"]
urllib.request.urlretrieve(sdist["url"], f"{vendor}/{sdist['filename']}")
PY
python3 -m pip download -q --no-deps -d "$VENDOR" pytools mako platformdirs typing_extensions
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$VENDOR" siphash24 markupsafe
ls -l "$VENDOR"
