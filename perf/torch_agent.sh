#!/usr/bin/env bash
# Stock PyTorch through the libcuda.so.1 agent (docs/AGENT.md), opt-in: it installs torch (a CUDA
# build, several GB) into a virtual environment of its own, so it is not part of .ci/run.
#
#   perf/torch_agent.sh                  against a NumPy-device server it starts on loopback
#   EXECUTOR=pycuda perf/torch_agent.sh  against a GPU server on this host (real kernels)
#   TORCH_VENV=DIR                       the environment to use or make (default perf/build/torch-venv;
#                                        unset, a python3 that has torch is used as it is)
#
# It runs, under `bitfusion-net run -n 1 -p 0.5`, torch.cuda.is_available(), get_device_name(),
# mem_get_info() (the lease's memory), torch.tensor(...).cuda().cpu() (copies only) and
# (x @ x).sum().item() (a kernel: refused by the NumPy device), one step at a time, and writes
#   perf/results/torch_agent-$EXECUTOR.json  each step's result, the versions
#   perf/results/torch_agent-$EXECUTOR.log   the agent's trace (BITFUSION_NET_AGENT_LOG=4: the
#                                            entry points PyTorch looked up, the private tables,
#                                            every request to the server, calls not forwarded)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
EXECUTOR=${EXECUTOR:-numpy}
VENV=${TORCH_VENV:-$REPO/perf/build/torch-venv}
RESULTS=$REPO/perf/results
mkdir -p "$RESULTS" "$(dirname "$VENV")"

# A Python that already has torch (a GPU host's, often offline) is used as it is, with the
# repository on PYTHONPATH; otherwise torch goes into a virtual environment of its own.
if [ -z "${TORCH_VENV:-}" ] && python3 -c "import torch, numpy, h11, prometheus_client, yaml" 2>/dev/null; then
    PY=$(command -v python3)
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
else
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip install --quiet torch numpy
    "$VENV/bin/python" -m pip install --quiet -e "$REPO"
    PY=$VENV/bin/python
fi

WORK=$(mktemp -d)
SERVER_PID=
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

"$PY" -m bitfusion_net.server --listen tcp://127.0.0.1:0 --executor "$EXECUTOR" \
    --log-level WARNING >"$WORK/server.out" 2>"$WORK/server.err" &
SERVER_PID=$!
for _ in $(seq 100); do
    grep -q "listening on" "$WORK/server.out" 2>/dev/null && break
    sleep 0.1
done
ADDRESS=$(sed -n 's|^listening on tcp://||p' "$WORK/server.out" | head -1)
[ -n "$ADDRESS" ] || { cat "$WORK/server.err"; exit 1; }

cat >"$WORK/torch_steps.py" <<'PY'
import json
import sys
import traceback

import torch

results = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "steps": []}


def step(name, fn):
    try:
        value = fn()
        results["steps"].append({"step": name, "ok": True, "value": repr(value)})
    except Exception as exc:  # each step is reported, the next one still tried
        results["steps"].append({"step": name, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                                 "traceback": traceback.format_exc(limit=3)})


step("torch.cuda.is_available()", torch.cuda.is_available)
step("torch.cuda.device_count()", torch.cuda.device_count)
step("torch.cuda.get_device_name()", torch.cuda.get_device_name)
step("torch.cuda.mem_get_info()", torch.cuda.mem_get_info)
step("torch.tensor([1.0, 2.0, 3.0]).cuda().cpu()",
     lambda: torch.tensor([1.0, 2.0, 3.0]).cuda().cpu().tolist())
step("(x @ x).sum().item()", lambda: (lambda x: (x @ x).sum().item())(torch.ones(64, 64).cuda()))
json.dump(results, sys.stdout, indent=2)
PY

set +e
BITFUSION_NET_AGENT_LOG=4 "$PY" -m bitfusion_net run -n 1 -p 0.5 --server_list "$ADDRESS" -- \
    "$PY" "$WORK/torch_steps.py" >"$WORK/steps.json" 2>"$RESULTS/torch_agent-$EXECUTOR.log"
STATUS=$?
set -e
"$PY" - "$WORK/steps.json" "$RESULTS/torch_agent-$EXECUTOR.json" "$EXECUTOR" "$STATUS" <<'PY'
import json
import sys

source, target, executor, status = sys.argv[1:]
text = open(source).read()
start = text.find("{")  # run's own log lines come first
data = json.loads(text[start:]) if start >= 0 else {"steps": [], "output": text}
data.update({"executor": executor, "exit_status": int(status)})
json.dump(data, open(target, "w"), indent=2)
for s in data["steps"]:
    print(("ok  " if s["ok"] else "FAIL") + f" {s['step']}: " + (s.get("value") or s.get("error", "")))
PY
echo "results: $RESULTS/torch_agent-$EXECUTOR.json, trace: $RESULTS/torch_agent-$EXECUTOR.log"
