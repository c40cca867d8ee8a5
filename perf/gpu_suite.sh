#!/usr/bin/env bash
# The GPU suite: everything that needs an NVIDIA GPU, in one run of a few minutes.
#
#   bash perf/gpu_suite.sh            # from the repository root, on a host with a GPU
#
# Steps (each logged with timestamps to stdout and perf/results/gpu-suite.log; a failing step is
# recorded and the next one runs; the exit status is non-zero if any failed):
#   nvidia-smi   what the GPU and driver are
#   pycuda       PyCUDA imports, or is installed from perf/vendor, or built (perf/build_pycuda.sh)
#   env          the repository on PYTHONPATH (no pip install), uvloop or not
#   gpu-tests    pytest -m gpu on tests/gpu, tests/examples and tests/executors
#                                                                 > perf/results/gpu-tests.log
#   twins        perf/twins.py: built-ins on the GPU vs NumPy    > perf/results/gpu-twins.json
#   fairness     perf/fairness.py --executor pycuda              > perf/results/fairness-pycuda.*
#   latency      perf/latency.py --executor pycuda --quick       > perf/results/latency-pycuda.*
#   executors    the rest of tests/executors (not -m gpu), last: CI runs these anyway
#                                                                >> perf/results/gpu-tests.log
#
# The whole run is held to SUITE_BUDGET_S seconds (default 540): each step gets at most its own
# limit and what is left of the budget, and a step with no time left is skipped, so that the
# summary is always printed. If $OUT is set, the result files are copied there after every step
# (at most 7 files).
#
# Knobs (environment): CUDA_ROOT (default /usr/local/cuda), PYTHON (default python3),
# SUITE_BUDGET_S, FAIRNESS_DURATION (seconds per fairness scenario, default 5),
# FAIRNESS_SCENARIOS (which of perf/fairness.py's scenarios, default the open-loop ones).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
RESULTS=perf/results
LOG=$RESULTS/gpu-suite.log
TESTS_LOG=$RESULTS/gpu-tests.log
VENDOR=perf/vendor
PYTHON=${PYTHON:-python3}
# Not exported: tests/executors/test_cuda_sources.py expects no CUDA_ROOT in the environment.
CUDA_ROOT=${CUDA_ROOT:-/usr/local/cuda}
export PYTHONUNBUFFERED=1
SUITE_BUDGET_S=${SUITE_BUDGET_S:-540}
FAIRNESS_DURATION=${FAIRNESS_DURATION:-5}
# The open-loop scenarios fit the step's 200 s; the closed-loop ones (12 runs in "closed") are
# for a run of their own: FAIRNESS_SCENARIOS="closed closed20 closed_cost" bash perf/gpu_suite.sh
FAIRNESS_SCENARIOS=${FAIRNESS_SCENARIOS:-fair20 ratio alone light overhead}

log() {
    printf '[%s] %s\n' "$(date '+%H:%M:%S')" "$*" | tee -a "$LOG"
}

# ------------------------------------------------------------------------------------------------
# PyCUDA: used if it imports, else installed from a wheel in perf/vendor built for this Python
# (fast: no compiler), else built from source by perf/build_pycuda.sh (about a minute; from the
# sdist in perf/vendor when there is one, offline, else from PyPI).
# ------------------------------------------------------------------------------------------------
pycuda_imports() {
    "$PYTHON" -c 'import pycuda.driver' 2>/dev/null
}

build_pycuda() {
    if pycuda_imports; then
        echo "PyCUDA is already installed"
        return 0
    fi
    local pip=("$PYTHON" -m pip install --no-cache-dir --disable-pip-version-check)
    if [ -d "$VENDOR" ] && "${pip[@]}" --no-index --find-links "$VENDOR" --only-binary=:all: pycuda \
        && pycuda_imports; then
        echo "PyCUDA installed from a prebuilt wheel in $VENDOR"
        return 0
    fi
    echo "--- building PyCUDA from source"
    CUDA_ROOT="$CUDA_ROOT" bash perf/build_pycuda.sh "$PYTHON" && pycuda_imports
}

check_pycuda() {
    build_pycuda || return 1
    "$PYTHON" - <<'EOF'
import pycuda, pycuda.driver as cuda
cuda.init()
device = cuda.Device(0)
print(f"PyCUDA {pycuda.VERSION_TEXT}, driver API {cuda.get_driver_version()}, "
      f"{cuda.Device.count()} GPU(s); GPU 0: {device.name()}, "
      f"compute capability {'.'.join(map(str, device.compute_capability()))}, "
      f"{device.total_memory() / 2**30:.1f} GiB")
EOF
}

gpu_summary() {
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm \
        --format=csv
}

check_env() {
    echo "python: $("$PYTHON" --version 2>&1) at $(command -v "$PYTHON")"
    echo "PYTHONPATH=${PYTHONPATH:-}"
    "$PYTHON" -c 'import numpy; print("numpy", numpy.__version__)'
    if "$PYTHON" -c 'import uvloop' 2>/dev/null; then
        echo "uvloop: present"
    else
        echo "uvloop: absent (bitfusion-net falls back to the standard asyncio loop)"
    fi
    "$PYTHON" -c 'import bitfusion_net, executors; print("bitfusion_net", bitfusion_net.__version__)'
    command -v nvcc || echo "nvcc is not on PATH (CUDA_ROOT=$CUDA_ROOT)"
}

run_pytest() {  # run_pytest LABEL ARGS...: appended to gpu-tests.log
    local label=$1
    shift
    {
        echo "=== $label: pytest $* ($(date '+%H:%M:%S'))"
    } >>"$TESTS_LOG"
    set +e
    "$PYTHON" -m pytest -p no:cacheprovider "$@" 2>&1 | tee -a "$TESTS_LOG"
    local status=${PIPESTATUS[0]}
    set -e
    return "$status"
}

gpu_tests() {
    local paths=() path
    for path in tests/gpu tests/examples tests/executors; do
        if [ -e "$path" ]; then paths+=("$path"); else echo "($path does not exist)"; fi
    done
    run_pytest "gpu tests" -m gpu -q -rA "${paths[@]}"
}

executor_tests() {
    run_pytest "executor tests (not gpu)" -m "not gpu" -q -rfEs tests/executors
}

# A sub-command runs one step's function in a process of its own, so `timeout` can stop it.
if [ $# -gt 0 ]; then
    case $1 in
        gpu_summary | build_pycuda | check_pycuda | check_env | gpu_tests | executor_tests) "$1" ;;
        *)
            echo "usage: bash perf/gpu_suite.sh [gpu_summary|build_pycuda|check_pycuda|check_env|gpu_tests|executor_tests]" >&2
            exit 2
            ;;
    esac
    exit 0
fi

# ------------------------------------------------------------------------------------------------
mkdir -p "$RESULTS"
: >"$LOG"
: >"$TESTS_LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$CUDA_ROOT/bin:$PATH"
SUITE_START=$SECONDS
STEPS=()
STATUSES=()
TIMES=()

collect() {  # copy the result files to $OUT, if set (the GPU-machine tool returns 8 at most)
    [ -n "${OUT:-}" ] || return 0
    local file
    for file in "$LOG" "$TESTS_LOG" "$RESULTS/gpu-twins.json" \
        "$RESULTS"/fairness-pycuda.json "$RESULTS"/fairness-pycuda.png \
        "$RESULTS"/latency-pycuda.json "$RESULTS"/latency-pycuda.png; do
        if [ -f "$file" ]; then cp "$file" "$OUT"/ || log "could not copy $file to $OUT"; fi
    done
    return 0
}

step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2 left started status
    shift 2
    left=$((SUITE_BUDGET_S - (SECONDS - SUITE_START) - 15))
    if [ "$left" -lt 20 ]; then
        log "=== $name: SKIPPED, the suite's budget of ${SUITE_BUDGET_S} s is spent"
        STEPS+=("$name") STATUSES+=("skipped (no time)") TIMES+=("0")
        return 0
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    log "=== $name: $* (limit ${limit} s)"
    started=$SECONDS
    set +e
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    status=${PIPESTATUS[0]}
    set -e
    local took=$((SECONDS - started))
    case $status in
        0) STATUSES+=("ok") ;;
        124 | 137) STATUSES+=("FAILED: timed out after ${limit} s") ;;
        *) STATUSES+=("FAILED: exit status $status") ;;
    esac
    STEPS+=("$name") TIMES+=("$took")
    log "=== $name: exit status $status after ${took} s"
    collect
}

SELF=perf/gpu_suite.sh
log "GPU suite in $PWD (budget ${SUITE_BUDGET_S} s; CUDA_ROOT=$CUDA_ROOT)"
step nvidia-smi 30 bash "$SELF" gpu_summary
step pycuda 300 bash "$SELF" check_pycuda
step env 60 bash "$SELF" check_env
step gpu-tests 200 bash "$SELF" gpu_tests
step twins 150 "$PYTHON" perf/twins.py
fairness_args=()
for scenario in $FAIRNESS_SCENARIOS; do fairness_args+=(--scenario "$scenario"); done
step fairness 200 "$PYTHON" perf/fairness.py --executor pycuda --duration "$FAIRNESS_DURATION" \
    "${fairness_args[@]}"
step latency 150 "$PYTHON" perf/latency.py --executor pycuda --quick --no-progress
step executors 150 bash "$SELF" executor_tests

log "=== summary ($((SECONDS - SUITE_START)) s)"
failed=0
for i in "${!STEPS[@]}"; do
    printf '  %-11s %5s s  %s\n' "${STEPS[$i]}" "${TIMES[$i]}" "${STATUSES[$i]}" | tee -a "$LOG"
    [ "${STATUSES[$i]}" = ok ] || failed=$((failed + 1))
done
if [ "$failed" -gt 0 ]; then
    log "$failed step(s) did not pass"
else
    log "every step passed"
fi
collect
[ "$failed" -eq 0 ]
