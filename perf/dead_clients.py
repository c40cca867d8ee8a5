"""How fast a SIGKILLed client's GPU share comes back, in every state its session can be in.

    python perf/dead_clients.py                       # every state, writes perf/results/dead_clients.json
    python perf/dead_clients.py --state queued --clients 5 --output /tmp/r

For each state it starts ``python -m bitfusion_net.server`` on loopback with one NumPy device;
``--clients`` client processes (blocking API) lease ``1 / clients`` of the GPU each and drive their
session into that state:

- ``queued``: no-reply ``busy`` launches until the server stops reading for the queue bound;
- ``staging``: 10 s of kernels queued, then host-to-device copies until the staging budget stops
  reading;
- ``running``: 2 s of kernels queued, and a ``synchronize()`` waiting on them;
- ``mid_copy``: the header and half the payload of a 32 MiB copy, then nothing.

Once every client is in its state (its writes have stalled, or it is waiting), all are SIGKILLed
at once and the benchmark leases the whole GPU in a loop: the figure is the time from the kill
to the first whole-GPU lease. It also records the server's RSS before the clients, at the kill,
and two seconds after the GPU came back. Nothing is asserted; figures go to the JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import baselines as bl  # perf/ is on sys.path when this file runs as a script
import numpy as np

import bitfusion_net as bf

RESULTS = Path(__file__).resolve().parent / "results"
STATES = ("queued", "staging", "running", "mid_copy")
STALLED_S = 0.3  # a client whose writes made no progress this long is held by the server
KERNEL_US = 100_000  # the kernels the device is kept busy with: what is running when killed
COPY = 4 * 2**20
READY_TIMEOUT_S = 60.0


# -- the client processes ------------------------------------------------------------------------
def client(state: str, address: str, fraction: float) -> None:
    """Drive one session into ``state``, print ``ready``, then wait to be killed."""
    session = bf.connect_sync(address, fraction=fraction, client_name=f"doomed-{state}")
    gpu = session.devices[0]
    busy = gpu.builtin("busy")
    progress = [0]

    def flood() -> None:
        if state == "queued":
            while True:
                busy.launch((1, 1, 1), (1, 1, 1), (1000,))
                progress[0] += 1
        buffer = np.ones(COPY, dtype=np.uint8)
        ptr = gpu.mem_alloc(COPY)
        for _ in range(100):
            busy.launch((1, 1, 1), (1, 1, 1), (KERNEL_US,))
        while True:
            gpu.memcpy_htod(ptr, buffer)
            progress[0] += 1

    if state in ("queued", "staging"):
        threading.Thread(target=flood, daemon=True).start()
        last, since = -1, time.monotonic()
        while progress[0] != last or time.monotonic() - since < STALLED_S:
            if progress[0] != last:
                last, since = progress[0], time.monotonic()
            time.sleep(0.05)
        print("ready", flush=True)
        time.sleep(3600)
    elif state == "running":
        for _ in range(20):
            busy.launch((1, 1, 1), (1, 1, 1), (KERNEL_US,))
        print("ready", flush=True)
        gpu.synchronize()  # killed while waiting here
    else:  # mid_copy: a frame's header and half its payload, straight onto the socket
        from bitfusion_net.protocol import encode_request
        from bitfusion_net.protocol import messages as m

        ptr = gpu.mem_alloc(32 * 2**20)
        head = encode_request(m.MemcpyHtoD(0, ptr), 2**31, 32 * 2**20)
        stream = session._driver.stream  # noqa: SLF001 - a deliberately broken client
        stream.send(head, bytes(16 * 2**20))
        print("ready", flush=True)
        time.sleep(3600)


# -- the measurement -----------------------------------------------------------------------------
def whole_gpu_back(address: str, deadline: float) -> float | None:
    """Lease the whole GPU in a loop until it succeeds: the time it did, or None at ``deadline``."""
    while time.monotonic() < deadline:
        try:
            with bf.connect_sync(address, fraction=1.0, client_name="measure"):
                return time.monotonic()
        except bf.CapacityError:
            time.sleep(0.005)
    return None


def measure_state(state: str, clients: int, give_up: float) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bitfusion_net.server", "--listen", "tcp://127.0.0.1:0",
            "--executor", "numpy", "--gpu-memory", "4GiB", "--log-level", "WARNING"]  # fmt: skip
    with bl.server_process(argv, "bitfusion-net server") as address:
        return measure_clients(state, address, bl.SERVER_PIDS[address], clients, give_up)


def measure_clients(
    state: str, address: str, server_pid: int, clients: int, give_up: float
) -> dict[str, Any]:
    rss_idle = bl.process_rss_bytes(server_pid)
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--client", state, address, str(1 / clients)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(clients)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stderr is not None
            line = proc.stdout.readline()
            if line != b"ready\n":
                proc.kill()
                why = proc.stderr.read().decode(errors="replace").strip().splitlines()
                raise RuntimeError(f"a {state} client failed: {why[-1:] or line!r}")
        time.sleep(0.5)  # the server has stopped reading them, or is busy on their work
        rss_loaded = bl.process_rss_bytes(server_pid)
        killed = time.monotonic()
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
        back = whole_gpu_back(address, killed + give_up)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    time.sleep(2.0)
    return {
        "clients": clients,
        "capacity_back_s": None if back is None else back - killed,  # None: not within give_up
        "give_up_s": give_up,
        "rss_idle_mib": rss_idle / 2**20,
        "rss_loaded_mib": rss_loaded / 2**20,
        "rss_after_mib": bl.process_rss_bytes(server_pid) / 2**20,
    }


def measure(states: list[str], clients: int, give_up: float) -> dict[str, Any]:
    results = {}
    for state in states:
        results[state] = r = measure_state(state, clients, give_up)
        back = r["capacity_back_s"]
        print(
            f"{state:9s} {clients} clients killed: whole GPU back after "
            + (f"{back * 1e3:.0f} ms" if back is not None else f"more than {give_up:g} s")
            + f"; server RSS {r['rss_idle_mib']:.0f} MiB idle, "
            f"{r['rss_loaded_mib']:.0f} MiB loaded, {r['rss_after_mib']:.0f} MiB after",
            flush=True,
        )
    return {
        "states": results,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--client"]:
        client(argv[1], argv[2], float(argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state", action="append", choices=STATES, help="default: every state")
    parser.add_argument("--clients", type=int, default=20, help="doomed clients (default: 20)")
    parser.add_argument(
        "--give-up", type=float, default=30.0, help="seconds to wait for the GPU (default: 30)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args(argv)
    result = measure(args.state or list(STATES), args.clients, args.give_up)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "dead_clients.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output / 'dead_clients.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
