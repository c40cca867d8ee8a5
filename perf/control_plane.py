"""What the control plane costs: reserving, attaching, ``bitfusion-net run`` around a command,
and how fast a killed ``run``'s GPUs come back.

Against a real server process on loopback, side by side in one run:

- ``reserve``: a RESERVE and its reply on an open control connection, then RELEASE (median,
  p99 over ``--repeat`` rounds), and the SERVER_INFO round trip (brief and full);
- ``attach``: opening a session on a reservation (ATTACH) against leasing directly (HELLO),
  connect included, both APIs' blocking flavour;
- ``run``: wall time of ``bitfusion-net run -p 0.25 -- python -c pass`` against plain
  ``python -c pass``; the difference is what ``run`` adds (its own start-up, reserving, the
  release);
- ``killed_run``: a ``run`` whose program is attached is SIGKILLed, then its program killed;
  the time from the program's death until the server has the GPU back;
- ``peer_copy``: ``Session.memcpy_peer`` of 64 MiB between GPUs of two servers (the bytes pass
  through the client) beside a plain ``memcpy_dtoh`` of the same size, in GB/s.

Writes ``perf/results/control_plane.json``. ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import server_process  # noqa: E402

import bitfusion_net as bf  # noqa: E402
from bitfusion_net.cli.control import ControlConnection  # noqa: E402
from bitfusion_net.client.lease import LEASE_ENV, ReservationFile, ServerReservation  # noqa: E402
from bitfusion_net.protocol import messages as m  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "control_plane.json"
CLI = [sys.executable, "-m", "bitfusion_net"]


def summary(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        "median_ms": round(statistics.median(ordered) * 1e3, 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3, 3),
        "samples": len(ordered),
    }


def timed(action: Any, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        out.append(time.perf_counter() - started)
    return out


def measure_reserve(address: str, repeat: int) -> dict[str, Any]:
    control = ControlConnection(address, 5.0)
    try:

        def reserve_and_release() -> None:
            reply = control.reserve(m.Reserve(1, 0.25, 0))
            control.release(reply.reservation, reply.secret)

        return {
            "reserve_and_release": summary(timed(reserve_and_release, repeat)),
            "server_info_brief": summary(timed(lambda: control.info(m.INFO_BRIEF), repeat)),
            "server_info_full": summary(timed(lambda: control.info(m.INFO_FULL), repeat)),
        }
    finally:
        control.close()


def measure_attach(address: str, repeat: int, lease_path: Path) -> dict[str, Any]:
    control = ControlConnection(address, 5.0)
    try:
        reply = control.reserve(m.Reserve(1, 0.25, 0))
        ReservationFile(
            [ServerReservation(address, reply.server_id, reply.reservation, reply.secret, 0.0)]
        ).save(lease_path)
        os.environ[LEASE_ENV] = str(lease_path)

        def attach() -> None:
            bf.connect_sync().close()

        def hello() -> None:
            bf.connect_sync(address, fraction=0.25).close()

        # alternate, so that drift on a noisy machine hits both alike
        attach_times, hello_times = [], []
        for _ in range(repeat):
            attach_times += timed(attach, 1)
            hello_times += timed(hello, 1)
        return {"attach": summary(attach_times), "hello": summary(hello_times)}
    finally:
        os.environ.pop(LEASE_ENV, None)
        control.close()


def measure_run(address: str, repeat: int) -> dict[str, Any]:
    bare = address.removeprefix("tcp://")
    plain = [sys.executable, "-c", "pass"]
    wrapped = [*CLI, "run", "--server_list", bare, "-p", "0.25", "--", *plain]
    plain_times, run_times = [], []
    for _ in range(repeat):
        plain_times += timed(lambda: subprocess.run(plain, check=True), 1)
        run_times += timed(
            lambda: subprocess.run(wrapped, check=True, stderr=subprocess.DEVNULL), 1
        )
    return {
        "plain": summary(plain_times),
        "under_run": summary(run_times),
        "added_median_ms": round(
            (statistics.median(run_times) - statistics.median(plain_times)) * 1e3, 1
        ),
    }


def leased_fraction(address: str) -> float:
    control = ControlConnection(address, 5.0)
    try:
        return float(control.info()["gpus"][0]["leased_fraction"])
    finally:
        control.close()


def measure_killed_run(address: str, repeat: int) -> dict[str, Any]:
    bare = address.removeprefix("tcp://")
    program = (
        "import bitfusion_net as bf, time\n"
        "s = bf.connect_sync(); s.devices[0].synchronize(); print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    back = []
    for _ in range(repeat):
        run = subprocess.Popen(
            [*CLI, "run", "--server_list", bare, "-p", "0.5", "--", sys.executable, "-c", program],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        assert run.stdout is not None
        if run.stdout.readline().strip() != b"ready":
            raise RuntimeError("the program under run did not start")
        children = subprocess.run(
            ["pgrep", "-P", str(run.pid)], capture_output=True, text=True
        ).stdout.split()
        run.send_signal(signal.SIGKILL)
        run.wait()
        if leased_fraction(address) != 0.5:
            raise RuntimeError("the reservation ended while its program was still attached")
        for pid in children:
            os.kill(int(pid), signal.SIGKILL)
        killed = time.perf_counter()
        while leased_fraction(address) != 0.0:
            if time.perf_counter() - killed > 10:
                raise RuntimeError("the killed run's GPU did not come back within 10 s")
            time.sleep(0.002)
        back.append(time.perf_counter() - killed)
    return {"gpu_back_after_program_killed": summary(back)}


def measure_peer_copy(
    first: str, second: str, nbytes: int, repeat: int, lease_path: Path
) -> dict[str, Any]:
    import numpy as np

    controls, parts = [], []
    for address in (first, second):
        control = ControlConnection(address, 5.0)
        reply = control.reserve(m.Reserve(1, 0.5, 0))
        controls.append(control)
        parts.append(
            ServerReservation(address, reply.server_id, reply.reservation, reply.secret, 0.0)
        )
    ReservationFile(parts).save(lease_path)
    os.environ[LEASE_ENV] = str(lease_path)
    try:
        with bf.connect_sync() as session:
            a, b = session.devices
            src, dst = a.mem_alloc(nbytes), b.mem_alloc(nbytes)
            host = np.ones(nbytes, np.uint8)
            a.memcpy_htod(src, host)
            peer, down = [], []
            for _ in range(repeat):
                peer += timed(lambda: session.memcpy_peer(1, dst, 0, src, nbytes), 1)
                down += timed(lambda: a.memcpy_dtoh(host, src), 1)
            b.synchronize()
        return {
            "bytes": nbytes,
            "memcpy_peer_gb_s": round(nbytes / statistics.median(peer) / 1e9, 3),
            "memcpy_dtoh_gb_s": round(nbytes / statistics.median(down) / 1e9, 3),
        }
    finally:
        os.environ.pop(LEASE_ENV, None)
        for control in controls:
            control.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds: a smoke run")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rounds = 5 if args.quick else 200
    slow_rounds = 2 if args.quick else 20
    server_argv = [
        sys.executable, "-m", "bitfusion_net.server", "--executor", "numpy", "--gpus", "1",
        "--gpu-memory", "1GiB", "--log-level", "WARNING",
    ]  # fmt: skip
    with server_process(server_argv, "the server") as address, tempfile.TemporaryDirectory() as tmp:
        result = {
            "quick": args.quick,
            "reserve": measure_reserve(address, rounds),
            "attach": measure_attach(address, rounds, Path(tmp) / "lease.json"),
            "run": measure_run(address, slow_rounds),
            "killed_run": measure_killed_run(address, max(2, slow_rounds // 4)),
        }
        with server_process(server_argv, "the second server") as second:
            size = (4 if args.quick else 64) * 2**20
            result["peer_copy"] = measure_peer_copy(
                address, second, size, slow_rounds, Path(tmp) / "pool.json"
            )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
