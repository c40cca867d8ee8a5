"""``perf/latency.py --transport rdma``: round trips, copies and launches over ``rdma://``.

    python perf/latency.py --transport rdma                     # a device if there is one, else
                                                                # the verbs simulator (labelled)
    python perf/latency.py --transport rdma --rdma-provider simulator --quick
    python perf/latency.py --transport rdma --server rdma://HOST:PORT   # a server on a fabric

Both client APIs, against one server: the round trip of ``mem_get_info``, ``memcpy_htod``
(+ ``synchronize``) and ``memcpy_dtoh`` from 8 B up, and pipelined launches.

- On a real device (pyverbs), the server is a subprocess listening on ``rdma://`` and
  ``tcp://`` (or the ``--server`` given, with ``--tcp-server`` beside it), and the same figures
  are measured over TCP in the same run, so that the ratios compare like with like.
- On the simulator the server runs in this process (the simulated fabric is one process's), on
  a thread of its own. Those figures time this code's path through the simulator (staging
  copies, credit bookkeeping, the simulator's own copies and locks, two threads sharing the
  GIL), not a fabric: they are labelled simulated, written to ``latency-rdma-simulated.json``,
  and never set beside TCP's.

A simulated run also records the simulator's counters (``simulator``: its faults, RNR, access,
length and overrun, of which the transport must meet none).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import baselines as bl
import latency as lat
import latency_report as report
import numpy as np

import bitfusion_net as bf
from bitfusion_net.transport import loop_factory, rdma_ring

MiB = 2**20
SERVER_MEMORY = "2GiB"


def choose_provider(requested: str) -> tuple[str, str | None]:
    """("pyverbs" or "simulator", a note saying why the simulator when it was not asked for)."""
    if requested == "simulator":
        return "simulator", None
    os.environ.pop(rdma_ring.PROVIDER_ENV, None)
    try:
        devices = rdma_ring.default_provider().devices()
    except ConnectionError as exc:  # RdmaUnavailable: pyverbs, its libraries or a device
        if requested == "pyverbs":
            raise SystemExit(f"error: --rdma-provider pyverbs: {exc}") from None
        return "simulator", f"no RDMA here ({exc}): measured on the verbs simulator instead"
    if not devices:
        if requested == "pyverbs":
            raise SystemExit("error: --rdma-provider pyverbs: no RDMA device")
        return "simulator", "no RDMA device: measured on the verbs simulator instead"
    return "pyverbs", None


@contextlib.contextmanager
def in_process_server() -> Iterator[str]:
    """A server on ``rdma://127.0.0.1:0`` on a thread of its own (the simulator's fabric is
    this process's)."""
    started: queue.Queue[str | BaseException] = queue.Queue()
    stop = threading.Event()

    async def serve() -> None:
        try:
            server = bf.Server(listen="rdma://127.0.0.1:0", gpus=1, gpu_memory=SERVER_MEMORY)
            await server.start()
        except BaseException as exc:
            started.put(exc)
            raise
        started.put(server.address)
        try:
            while not stop.is_set():
                await asyncio.sleep(0.05)
        finally:
            await server.close()

    def thread_main() -> None:
        with (
            contextlib.suppress(BaseException),
            asyncio.Runner(loop_factory=loop_factory()) as runner,
        ):
            runner.run(serve())

    thread = threading.Thread(target=thread_main, name="rdma-server", daemon=True)
    thread.start()
    first = started.get(timeout=60)
    if isinstance(first, BaseException):
        raise SystemExit(f"error: the in-process RDMA server did not start: {first}")
    try:
        yield first
    finally:
        stop.set()
        thread.join(30)


@contextlib.contextmanager
def device_server() -> Iterator[tuple[str, str]]:
    """A server subprocess on a real device: its (rdma://, tcp://) addresses."""
    argv = [
        sys.executable, "-m", "bitfusion_net.server", "--listen", "rdma://127.0.0.1:0",
        "--listen", "tcp://127.0.0.1:0", "--executor", "numpy", "--gpu-memory", SERVER_MEMORY,
        "--log-level", "WARNING",
    ]  # fmt: skip
    with bl.server_addresses(argv, "bitfusion-net server", 2) as [over_rdma, tcp]:
        yield over_rdma, tcp


def bench_copies_blocking(
    gpu: bf.SyncRemoteDevice, cfg: lat.Config, host: memoryview, progress: lat.Progress
) -> dict[str, list[dict[str, float]]]:
    """The blocking API's memcpy_htod + synchronize and memcpy_dtoh for each size."""
    device = gpu.mem_alloc(max(cfg.sizes))
    htod: list[dict[str, float]] = []
    dtoh: list[dict[str, float]] = []
    try:
        for size in cfg.sizes:
            progress.stage(f"blocking copies of {lat.format_size(size)}")
            view, reps = host[:size], lat.copy_reps(cfg, size)

            def to_device(view: memoryview = view) -> None:
                gpu.memcpy_htod(device, view)
                gpu.synchronize()

            def to_host(view: memoryview = view) -> None:
                gpu.memcpy_dtoh(view, device)

            warmup = max(1, reps // 10)
            htod.append(lat.copy_result(size, lat.time_sync(to_device, reps, warmup)))
            dtoh.append(lat.copy_result(size, lat.time_sync(to_host, reps, warmup)))
            progress.advance()
    finally:
        gpu.mem_free(device)
    return {"htod": htod, "dtoh": dtoh}


def measure(
    address: str, cfg: lat.Config, host: memoryview, progress: lat.Progress
) -> dict[str, Any]:
    """Both APIs against ``address``: round trips, copies, launches."""
    lease = max(cfg.sizes) + 16 * MiB

    async def on_the_loop() -> dict[str, Any]:
        async with bf.connect(address, memory=lease, client_name="perf/latency-rdma") as session:
            gpu = session.devices[0]
            progress.stage(f"{address.split(':')[0]}: round trip, async API")
            round_trip = await lat.bench_round_trip_async(gpu, cfg)
            progress.advance()
            copies = await lat.bench_copies(gpu, cfg, host, progress)
            progress.stage("pipelined launches, async API")
            launches = await lat.bench_launches_async(gpu, cfg)
            progress.advance()
        return {"round_trip": round_trip, "memcpy": copies, "launches": launches}

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        results: dict[str, Any] = {"async": runner.run(on_the_loop())}
    with bf.connect_sync(address, memory=lease, client_name="perf/latency-rdma-sync") as session:
        gpu = session.devices[0]
        progress.stage("round trip, blocking API")
        round_trip = lat.bench_round_trip_blocking(gpu, cfg)
        progress.advance()
        copies = bench_copies_blocking(gpu, cfg, host, progress)
        progress.stage("pipelined launches, blocking API")
        launches = lat.bench_launches_blocking(gpu, cfg)
        progress.advance()
    results["blocking"] = {"round_trip": round_trip, "memcpy": copies, "launches": launches}
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure, write ``latency-rdma[-simulated].json`` (or ``--name``), return the results."""
    cfg = lat.make_config(args.quick)
    provider, note = choose_provider(args.rdma_provider)
    simulated = provider == "simulator"
    if simulated:
        if args.server is not None:
            raise SystemExit("error: the simulator's fabric is this process's: drop --server")
        os.environ[rdma_ring.PROVIDER_ENV] = "simulator"
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    stem = args.name or ("latency-rdma-simulated" if simulated else "latency-rdma")
    host = np.full(max(cfg.sizes), 0x5A, np.uint8).data
    per_api = 3 + 2 * len(cfg.sizes)
    progress = lat.Progress(per_api * (1 if simulated else 2), enabled=not args.no_progress)
    meta: dict[str, Any] = {
        "machine": lat.machine(),
        "quick": cfg.quick,
        "argv": sys.argv[1:],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "transport": "rdma",
        "provider": provider,
        "simulated": simulated,
        "keep_awake": args.keep_awake,
        "bitfusion_net": bf.__version__,
    }
    notes = [note] if note else []
    results: dict[str, Any] = {"meta": meta, "notes": notes}
    try:
        with contextlib.ExitStack() as servers:
            servers.enter_context(bl.keep_awake(args.keep_awake))  # an idle vCPU halts
            if simulated:
                address, tcp = servers.enter_context(in_process_server()), None
                notes.append(
                    "SIMULATED: the server and the client share this process and its simulated "
                    "fabric; these figures time this code's path through the simulator, not a "
                    "fabric, and are not comparable with TCP's"
                )
            elif args.server is not None:
                address, tcp = args.server, args.tcp_server
            else:
                address, tcp = servers.enter_context(device_server())
            meta["server"] = address
            results["rdma"] = measure(address, cfg, host, progress)
            if tcp is not None:  # the same server over TCP, in the same run: real ratios
                results["tcp"] = measure(tcp, cfg, host, progress)
                results["ratios"] = ratios(results["rdma"], results["tcp"])
    finally:
        progress.close()
    if simulated:
        stats = rdma_ring.default_provider().fabric.stats  # type: ignore[attr-defined]
        results["simulator"] = {"faults": stats.faults, **stats.as_dict()}
        if stats.faults:
            notes.append(f"the simulator saw {stats.faults} faults: a transport bug")
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report.write_json(results, output / f"{stem}.json")
    notes.append(f"results written to {output / f'{stem}.json'}")
    return results


def ratios(rdma: dict[str, Any], tcp: dict[str, Any]) -> dict[str, float]:
    """RDMA over TCP, from one run on real devices: round-trip p50 and p99, and the bandwidth
    of the largest copies (each API)."""
    out: dict[str, float] = {}
    for api in ("async", "blocking"):
        mine, theirs = rdma[api], tcp[api]
        for figure in ("p50_us", "p99_us"):
            out[f"{api}_round_trip_{figure}"] = (
                mine["round_trip"][figure] / theirs["round_trip"][figure]
            )
        for direction in ("htod", "dtoh"):
            out[f"{api}_{direction}_gbps_largest"] = (
                mine["memcpy"][direction][-1]["gbps"] / theirs["memcpy"][direction][-1]["gbps"]
            )
    return out


def print_report(results: dict[str, Any]) -> None:
    meta = results["meta"]
    label = "SIMULATED (verbs simulator, not a fabric)" if meta["simulated"] else meta["provider"]
    print(f"bitfusion-net over rdma:// - {label}")
    print(f"machine: {meta['machine']}")
    columns = [("rdma", results["rdma"])] + ([("tcp", results["tcp"])] if "tcp" in results else [])
    for api in ("async", "blocking"):
        for name, measured in columns:
            figures = measured[api]
            trip = figures["round_trip"]
            print(
                f"  {name:4} {api:8} round trip p50 {trip['p50_us']:8.1f} us  "
                f"p99 {trip['p99_us']:8.1f} us   launches "
                f"{figures['launches']['per_second']:10.0f}/s"
            )
            for direction in ("htod", "dtoh"):
                largest = figures["memcpy"][direction][-1]
                print(
                    f"  {name:4} {api:8} {direction} {lat.format_size(largest['size']):>8}: "
                    f"{largest['gbps']:6.2f} GB/s  (p50 {largest['p50_us']:.0f} us)"
                )
    for key, value in results.get("ratios", {}).items():
        print(f"  rdma/tcp {key}: {value:.2f}")
    if "simulator" in results:
        stats = results["simulator"]
        print(
            f"  simulator: {stats['faults']} faults (RNR, access, length, overrun) in "
            f"{stats['writes']} RDMA writes of {stats['bytes_written'] / 2**30:.2f} GiB"
        )
    for note in results["notes"]:
        print(f"note: {note}")
