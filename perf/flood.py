"""A neighbour's latency beside a flooding client: does one client hold the server's loop?

    python perf/flood.py                   # 10 s, writes perf/results/flood.json
    python perf/flood.py --duration 2 --output /tmp/r

Starts ``python -m bitfusion_net.server`` on loopback. One client (a bare socket speaking the wire
protocol) floods no-reply ``fill`` launches as fast as the server takes them, never reading;
beside it a blocking session calls ``mem_get_info`` in a loop. Reports the neighbour's latency
percentiles and how many calls it got through, and the flood's launch count. Nothing is
asserted: the figures go to the JSON file and stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

import baselines as bl  # perf/ is on sys.path when this file runs as a script

import bitfusion_net as bf
from bitfusion_net.protocol import FrameDecoder, encode_request
from bitfusion_net.protocol import messages as m

RESULTS = Path(__file__).resolve().parent / "results"
BURST = 3000  # launches written per sendall


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


class Flooder:
    """A bare client that launches ``fill`` (n=1) without ever waiting, until stopped."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port))
        self.decoder = FrameDecoder(receives_replies=True)
        self.launches = 0
        self.stop = threading.Event()
        self.sock.sendall(encode_request(m.Hello(1, 0.5, 0, "flood"), 1))
        self._reply()
        self.sock.sendall(encode_request(m.GetFunction(0, 0, "fill"), 2))
        function = self._reply().function
        self.sock.sendall(encode_request(m.MemAlloc(0, 64), 3))
        ptr = self._reply().ptr
        launch = m.Launch(0, function, (1, 1, 1), (1, 1, 1), 0, 0, struct.pack("<ifQ", 1, 1.0, ptr))
        self.burst = b"".join(encode_request(launch, 10 + i) for i in range(BURST))

    def _reply(self) -> Any:
        while (frame := self.decoder.next_frame()) is None:
            self.decoder.receive_data(self.sock.recv(65536))
        return frame.message

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.sock.sendall(self.burst)
                self.launches += BURST
        except OSError:
            pass  # the server closed it at the end
        finally:
            self.sock.close()


def measure(duration: float) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bitfusion_net.server", "--listen", "tcp://127.0.0.1:0",
            "--executor", "numpy", "--gpu-memory", "1GiB", "--log-level", "WARNING"]  # fmt: skip
    with bl.server_process(argv, "bitfusion-net server") as address:
        flooder = Flooder(*bl.split_address(address))
        thread = threading.Thread(target=flooder.run, daemon=True)
        thread.start()
        time.sleep(0.5)  # the flood is under way
        latencies: list[float] = []
        with bf.connect_sync(address, fraction=0.25, client_name="neighbour") as session:
            gpu = session.devices[0]
            end = time.monotonic() + duration
            while time.monotonic() < end:
                started = time.perf_counter()
                gpu.mem_get_info()
                latencies.append(time.perf_counter() - started)
        flooder.stop.set()
    thread.join(10)
    latencies.sort()
    return {
        "duration_s": duration,
        "neighbour_calls": len(latencies),
        "neighbour_p50_ms": percentile(latencies, 50) * 1e3,
        "neighbour_p99_ms": percentile(latencies, 99) * 1e3,
        "neighbour_max_ms": latencies[-1] * 1e3,
        "flood_launches_sent": flooder.launches,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds (default: 10)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where flood.json goes")
    args = parser.parse_args(argv)
    result = measure(args.duration)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "flood.json").write_text(json.dumps(result, indent=2))
    print(
        f"neighbour beside a flood: {result['neighbour_calls']} calls in {args.duration:g} s, "
        f"p50 {result['neighbour_p50_ms']:.2f} ms, p99 {result['neighbour_p99_ms']:.2f} ms, "
        f"max {result['neighbour_max_ms']:.1f} ms; {result['flood_launches_sent']} launches sent"
    )
    print(f"wrote {args.output / 'flood.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
