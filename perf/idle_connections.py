"""What an idle connection costs the server: RSS per connection, before and after its HELLO.

    python perf/idle_connections.py                    # 300 connections, writes perf/results/idle_connections.json
    python perf/idle_connections.py --connections 100 --output /tmp/r

Starts ``python -m bitfusion_net.server`` on loopback (NumPy devices, enough of them for one
1/20 lease per connection), opens ``--connections`` bare sockets and measures the server's RSS
once they are all accepted, then once each has sent a HELLO and holds a lease, then after they
have all closed. Nothing is asserted; the figures go to the JSON file and stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import baselines as bl  # perf/ is on sys.path when this file runs as a script

from bitfusion_net.protocol import FrameDecoder, encode_request
from bitfusion_net.protocol import messages as m

RESULTS = Path(__file__).resolve().parent / "results"
SETTLE_S = 1.0  # for the server to accept and handle everything before RSS is read


def measure(connections: int) -> dict[str, Any]:
    gpus = math.ceil(connections / 20)
    argv = [sys.executable, "-m", "bitfusion_net.server", "--listen", "tcp://127.0.0.1:0",
            "--executor", "numpy", "--gpus", str(gpus), "--gpu-memory", "1GiB",
            "--log-level", "WARNING"]  # fmt: skip
    with bl.server_process(argv, "bitfusion-net server") as address:
        figures = measure_server(address, bl.SERVER_PIDS[address], connections)
    return {
        "connections": connections,
        "gpus": gpus,
        **figures,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
    }


def measure_server(address: str, pid: int, connections: int) -> dict[str, float]:
    rss = bl.process_rss_bytes
    host, port = bl.split_address(address)
    socks: list[socket.socket] = []
    try:
        time.sleep(SETTLE_S)
        base = rss(pid)
        socks = [socket.create_connection((host, port)) for _ in range(connections)]
        time.sleep(SETTLE_S)
        connected = rss(pid)
        for sock in socks:
            sock.sendall(encode_request(m.Hello(1, 0.05, 0, "idle"), 1))
        for sock in socks:
            decoder = FrameDecoder(receives_replies=True)
            while (frame := decoder.next_frame()) is None:
                decoder.receive_data(sock.recv(65536))
            if not isinstance(frame.message, m.HelloReply):
                raise RuntimeError(f"HELLO refused: {frame.message}")
        time.sleep(SETTLE_S)
        leased = rss(pid)
        for sock in socks:
            sock.close()
        socks = []
        time.sleep(2 * SETTLE_S)
        after = rss(pid)
    finally:
        for sock in socks:
            sock.close()
    return {
        "rss_base_mib": base / 2**20,
        "rss_connected_mib": connected / 2**20,
        "rss_leased_mib": leased / 2**20,
        "rss_after_close_mib": after / 2**20,
        "per_connection_kib": (connected - base) / connections / 1024,
        "per_leased_connection_kib": (leased - base) / connections / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=300, help="(default: 300)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args(argv)
    result = measure(args.connections)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "idle_connections.json").write_text(json.dumps(result, indent=2))
    print(
        f"{args.connections} idle connections: {result['per_connection_kib']:.0f} KiB each "
        f"connected, {result['per_leased_connection_kib']:.0f} KiB each with a lease; server RSS "
        f"{result['rss_base_mib']:.0f} -> {result['rss_leased_mib']:.0f} MiB, "
        f"{result['rss_after_close_mib']:.0f} MiB once closed"
    )
    print(f"wrote {args.output / 'idle_connections.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
