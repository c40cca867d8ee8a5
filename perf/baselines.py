"""Baselines for ``perf/latency.py``: what the same machine does without bitfusion-net in the way.

Servers (each prints ``listening on tcp://HOST:PORT`` when ready and runs until SIGTERM/SIGINT)::

    python perf/baselines.py uvloop-echo-server [--host 127.0.0.1] [--port 0]
    python perf/baselines.py zmq-rep-server     [--host 127.0.0.1] [--port 0]   # needs pyzmq
    python perf/baselines.py grpc-server        [--host 127.0.0.1] [--port 0]   # needs grpcio
    python perf/baselines.py serve-all --host 0.0.0.0 --port 7101               # all four, for a
        second host: C on PORT, uvloop on PORT+1, zmq on PORT+2, grpc on PORT+3
    python perf/baselines.py keep-awake                                         # a nice-19 busy
        loop that keeps a (virtual) CPU from halting; see perf/README.md

The uvloop echo server and the C program ``native/tcp_baseline.c`` speak one tiny request
protocol, so they measure the same thing. Each request is a 16-byte little-endian header
``{u32 op, u32 reserved, u64 size}``:

- ``PING`` (1): ``size`` bytes follow; the answer is the same ``size`` bytes (a round trip).
- ``PUT`` (2): ``size`` bytes follow; the answer is 1 byte (a copy to the server, then a sync).
- ``GET`` (3): nothing follows; the answer is ``size`` bytes (a copy back).
- ``POST`` (4): ``size`` bytes follow; no answer (a no-reply kernel launch).

The client halves live here too (``UvloopBaselineClient``, ``zmq_round_trip``,
``grpc_round_trip``, ``run_c_client``) along with the helpers the harness shares: starting a
server subprocess and summarising latency samples.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

HEADER = struct.Struct("<IIQ")
OP_PING, OP_PUT, OP_GET, OP_POST = 1, 2, 3, 4
PING_SIZE = 32  # round-trip body: about the size of a small request frame (26-40 bytes)
POST_SIZE = 70  # one-way body: with the header, the size of a kernel-launch frame (86 bytes)

ROOT = Path(__file__).resolve().parent.parent
C_SOURCE = ROOT / "native" / "tcp_baseline.c"
LISTENING = re.compile(r"^listening on (tcp|tls|rdma)://(\S+):(\d+)\s*$")
SERVER_START_S = 30.0


# -- shared helpers -------------------------------------------------------------------------------
def summarize(samples_ns: Sequence[int]) -> dict[str, float]:
    """Latency percentiles (nearest rank, as the C client computes them) in microseconds."""
    ordered = sorted(samples_ns)
    count = len(ordered)

    def rank(q: float) -> float:
        return ordered[min(count, max(1, math.ceil(q * count))) - 1] / 1e3

    return {
        "p50_us": rank(0.5),
        "p99_us": rank(0.99),
        "p999_us": rank(0.999),
        "min_us": ordered[0] / 1e3,
        "mean_us": sum(ordered) / count / 1e3,
        "samples": count,
    }


# The process id of each server ``server_process`` started, by the address it yielded.
SERVER_PIDS: dict[str, int] = {}


def process_rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux ``/proc``)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def server_process(argv: Sequence[str], what: str) -> Iterator[str]:
    """Run a server subprocess; yield its ``tcp://HOST:PORT`` once it prints that it listens."""
    with server_addresses(argv, what, 1) as [address]:
        yield address


@contextlib.contextmanager
def server_addresses(argv: Sequence[str], what: str, count: int) -> Iterator[list[str]]:
    """Run a server subprocess; yield the ``count`` addresses it prints that it listens on."""
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(
            list(argv), stdout=subprocess.PIPE, stderr=errors, stdin=subprocess.DEVNULL
        )
        try:
            assert process.stdout is not None
            deadline = time.monotonic() + SERVER_START_S
            addresses: list[str] = []
            while len(addresses) < count:
                line = b""
                while not line.endswith(b"\n"):
                    remaining = deadline - time.monotonic()
                    ready, _, _ = select.select([process.stdout], [], [], max(0.0, remaining))
                    chunk = os.read(process.stdout.fileno(), 1) if ready else b""
                    if not chunk:
                        errors.seek(0)
                        tail = errors.read()[-2000:].decode(errors="replace")
                        raise RuntimeError(f"{what} did not start ({argv[0]} ...): {tail.strip()}")
                    line += chunk
                match = LISTENING.match(line.decode())
                if match is None:
                    raise RuntimeError(
                        f"{what} printed {line!r}, not 'listening on tcp://HOST:PORT'"
                    )
                addresses.append(f"{match.group(1)}://{match.group(2)}:{match.group(3)}")
                SERVER_PIDS[addresses[-1]] = process.pid
            yield addresses
        finally:
            stop_process(process)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


def split_address(address: str) -> tuple[str, int]:
    """``tcp://HOST:PORT`` -> (HOST, PORT)."""
    match = re.fullmatch(r"tcp://\[?([^\]]+?)\]?:(\d+)", address)
    if match is None:
        raise ValueError(f"expected tcp://HOST:PORT, got {address!r}")
    return match.group(1), int(match.group(2))


def python_server(command: str, host: str = "127.0.0.1", port: int = 0) -> list[str]:
    """The argv that runs one of this file's servers."""
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        command,
        "--host",
        host,
        "--port",
        str(port),
    ]


# -- the C baseline -------------------------------------------------------------------------------
def build_c_baseline(build_dir: Path) -> tuple[Path | None, str]:
    """Compile ``native/tcp_baseline.c`` with the system compiler; (binary or None, note)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler (cc) found: C baseline skipped"
    binary = build_dir / "tcp_baseline"
    if binary.exists() and binary.stat().st_mtime >= C_SOURCE.stat().st_mtime:
        return binary, f"reused {binary}"
    build_dir.mkdir(parents=True, exist_ok=True)
    command = [compiler, "-O2", "-o", str(binary), str(C_SOURCE), "-lm"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        return None, f"building the C baseline failed: {done.stderr.strip()[-500:]}"
    return binary, f"built {binary} with {' '.join(command[:2])}"


def run_c_client(
    binary: Path, address: str, plan: Sequence[tuple[str, int, int]], timeout: float
) -> list[dict[str, Any]]:
    """Run the C client through ``plan`` [(op, size, count), ...]; one result dict per entry."""
    host, port = split_address(address)
    argv = [str(binary), "client", host, str(port)]
    for op, size, count in plan:
        argv += [op, str(size), str(count)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"C client failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


# -- the uvloop echo server -----------------------------------------------------------------------
class EchoServerProtocol(asyncio.BufferedProtocol):
    """Server side of the baseline protocol; parses every request in Python, as ours does."""

    def __init__(self) -> None:
        self._buffer = bytearray(1 << 20)
        self._view = memoryview(self._buffer)
        self._start = 0
        self._end = 0
        self._skip = 0  # body bytes of a PUT/POST still to drop
        self._ack = False  # answer 1 byte once the skipped body is in (PUT)
        self._zeros = memoryview(bytearray(0))
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buffer) - self._end < 65536:
            tail = bytes(self._view[self._start : self._end])
            self._buffer[: len(tail)] = tail
            self._start, self._end = 0, len(tail)
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        view, transport = self._view, self._transport
        assert transport is not None
        while True:
            available = self._end - self._start
            if self._skip:
                take = min(available, self._skip)
                self._start += take
                self._skip -= take
                if self._skip:
                    return
                if self._ack:
                    transport.write(b"\x01")
                continue
            if available < HEADER.size:
                return
            op, _reserved, size = HEADER.unpack_from(view, self._start)
            if op == OP_PING:
                if size > len(self._buffer) // 2:
                    transport.close()  # pings are small; big transfers are PUT/GET
                    return
                if available < HEADER.size + size:
                    return
                body = self._start + HEADER.size
                transport.write(bytes(view[body : body + size]))
                self._start = body + size
            elif op in (OP_PUT, OP_POST):
                self._start += HEADER.size
                self._skip, self._ack = size, op == OP_PUT
                if not size and self._ack:
                    transport.write(b"\x01")
            elif op == OP_GET:
                self._start += HEADER.size
                if len(self._zeros) < size:
                    self._zeros = memoryview(bytearray(size))
                transport.write(self._zeros[:size])
            else:
                transport.close()
                return


async def _serve_uvloop_echo(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoServerProtocol, host, port, reuse_address=True)
    bound = server.sockets[0].getsockname()
    print(f"listening on tcp://{bound[0]}:{bound[1]}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


# -- the uvloop client ----------------------------------------------------------------------------
class UvloopBaselineClient(asyncio.BufferedProtocol):
    """Client side of the baseline protocol: one request in flight, answers land in place."""

    def __init__(self) -> None:
        self._scratch = memoryview(bytearray(1 << 20))
        self._destination: memoryview | None = None
        self._expected = 0
        self._filled = 0
        self._waiter: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def connect(cls, address: str) -> UvloopBaselineClient:
        host, port = split_address(address)
        _transport, client = await asyncio.get_running_loop().create_connection(cls, host, port)
        return client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError(f"baseline server went away: {exc}"))

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._destination is not None:
            return self._destination[self._filled :]
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        if self._filled >= self._expected and self._waiter is not None:
            self._destination = None
            if not self._waiter.done():
                self._waiter.set_result(None)

    def _expect(self, nbytes: int, into: memoryview | None = None) -> asyncio.Future[None]:
        self._expected, self._filled, self._destination = nbytes, 0, into
        self._waiter = self._loop.create_future()
        return self._waiter

    async def ping(self, message: bytes, size: int) -> None:
        waiter = self._expect(size)
        assert self.transport is not None
        self.transport.write(message)
        await waiter

    async def put(self, body: memoryview) -> None:
        waiter = self._expect(1)
        assert self.transport is not None
        self.transport.writelines([HEADER.pack(OP_PUT, 0, len(body)), body])
        await waiter

    async def get(self, into: memoryview) -> None:
        waiter = self._expect(len(into), into)
        assert self.transport is not None
        self.transport.write(HEADER.pack(OP_GET, 0, len(into)))
        await waiter

    async def post_burst(self, messages: list[bytes]) -> None:
        """Send the messages (no answers), then one ping: returns when the server read them all."""
        assert self.transport is not None
        self.transport.writelines(messages)
        await self.ping(ping_message(1), 1)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def ping_message(size: int = PING_SIZE) -> bytes:
    return HEADER.pack(OP_PING, 0, size) + b"\x07" * size


def post_message(size: int = POST_SIZE) -> bytes:
    return HEADER.pack(OP_POST, 0, size) + b"\x03" * size


# -- pyzmq and grpcio -----------------------------------------------------------------------------
def _serve_zmq(host: str, port: int) -> None:
    import zmq

    context = zmq.Context()
    sock = context.socket(zmq.REP)
    if port:
        sock.bind(f"tcp://{host}:{port}")
    else:
        port = sock.bind_to_random_port(f"tcp://{host}")
    print(f"listening on tcp://{host}:{port}", flush=True)
    # SIGTERM keeps its default action (exit at once): a handler would wait for recv() to return.
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            sock.send(sock.recv())


def zmq_round_trip(address: str, samples: int, warmup: int) -> dict[str, float]:
    """REQ/REP round trips of a PING_SIZE message, in microseconds."""
    import zmq

    context = zmq.Context()
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    message = b"\x07" * PING_SIZE
    clock = time.perf_counter_ns
    try:
        for _ in range(warmup):
            sock.send(message)
            sock.recv()
        timings = []
        for _ in range(samples):
            started = clock()
            sock.send(message)
            sock.recv()
            timings.append(clock() - started)
    finally:
        sock.close()
        context.term()
    return summarize(timings)


def _serve_grpc(host: str, port: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    def echo(request: bytes, context: Any) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    print(f"listening on tcp://{host}:{bound}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with contextlib.suppress(KeyboardInterrupt):
        while not done.is_set():
            time.sleep(0.2)
    server.stop(0)


def grpc_round_trip(address: str, samples: int, warmup: int) -> dict[str, float]:
    """Unary calls of a PING_SIZE message (raw bytes, no protobuf), in microseconds."""
    import grpc

    host, port = split_address(address)
    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=SERVER_START_S)
        echo = channel.unary_unary("/bench.Echo/Echo")  # no serializers: bytes in, bytes out
        message = b"\x07" * PING_SIZE
        clock = time.perf_counter_ns
        for _ in range(warmup):
            echo(message)
        timings = []
        for _ in range(samples):
            started = clock()
            echo(message)
            timings.append(clock() - started)
    finally:
        channel.close()
    return summarize(timings)


# -- the blocking-socket echo (Python) ----------------------------------------------------------
def _serve_blocking_echo(host: str, port: int) -> None:
    """PING echo on plain blocking sockets, a thread per connection: the baseline of the
    blocking API (no event loop on either side)."""
    listener = socket.create_server((host, port))
    bound = listener.getsockname()
    print(f"listening on tcp://{bound[0]}:{bound[1]}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_echo_pings, args=(conn,), daemon=True).start()


def _recv_exactly(sock: socket.socket, view: memoryview) -> bool:
    while view:
        count = sock.recv_into(view)
        if not count:
            return False
        view = view[count:]
    return True


def _echo_pings(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = memoryview(bytearray(HEADER.size + 65536))
    with conn:
        while _recv_exactly(conn, buffer[: HEADER.size]):
            op, _reserved, size = HEADER.unpack_from(buffer)
            if op != OP_PING or size > 65536:
                return
            if not _recv_exactly(conn, buffer[HEADER.size : HEADER.size + size]):
                return
            conn.sendall(buffer[HEADER.size : HEADER.size + size])


class BlockingBaselineClient:
    """A blocking socket that pings the blocking (or uvloop, or C) echo server."""

    def __init__(self, address: str) -> None:
        self._sock = socket.create_connection(split_address(address))
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._message = ping_message()
        self._reply = memoryview(bytearray(PING_SIZE))

    def ping(self) -> None:
        self._sock.sendall(self._message)
        if not _recv_exactly(self._sock, self._reply):
            raise ConnectionError("the echo server closed the connection")

    def close(self) -> None:
        self._sock.close()


class RawWireClient:
    """A bare blocking socket speaking bitfusion-net's wire protocol: one pre-encoded MEM_GET_INFO
    frame out, its 40-byte reply in. What the server alone costs per request, with no client
    library in the way."""

    def __init__(self, address: str) -> None:
        from bitfusion_net.protocol import FrameDecoder, encode_request
        from bitfusion_net.protocol import messages as m

        self._sock = socket.create_connection(split_address(address))
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.sendall(encode_request(m.Hello(1, 0, 2**20, "raw-wire"), 1))
        decoder = FrameDecoder(receives_replies=True)
        while (frame := decoder.next_frame()) is None:
            data = self._sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection instead of leasing")
            decoder.receive_data(data)
        if not isinstance(frame.message, m.HelloReply):
            raise ConnectionError(f"the server refused the lease: {frame.message}")
        # Ids may repeat: each request is answered before the next is sent.
        self._request = encode_request(m.MemGetInfo(0), 2)
        self._reply = memoryview(bytearray(40))  # header 24 + MemGetInfoReply 16

    def ping(self) -> None:
        self._sock.sendall(self._request)
        if not _recv_exactly(self._sock, self._reply):
            raise ConnectionError("the server closed the connection")

    def close(self) -> None:
        self._sock.close()


# -- keep-awake ---------------------------------------------------------------------------------
def _keep_awake() -> None:
    """Spin at the lowest priority so that one CPU never halts (see ``keep_awake``)."""
    os.nice(19)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            pass


@contextlib.contextmanager
def keep_awake(enabled: bool) -> Iterator[None]:
    """While enabled, a nice-19 busy loop in a subprocess keeps one CPU from going idle.

    On VMs an idle vCPU halts, and waking it costs a trip through the hypervisor: on the project's
    2-vCPU VM a loopback ping-pong in C took 50 us with both vCPUs idle between messages and
    11 us with one kept busy. The busy loop yields to any other work (nice 19).
    """
    if not enabled:
        yield
        return
    argv = [sys.executable, str(Path(__file__).resolve()), "keep-awake"]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        yield
    finally:
        stop_process(process)


# -- serve-all: every baseline server at once, for runs across two hosts --------------------------
def _serve_all(host: str, port: int) -> int:
    binary, note = build_c_baseline(ROOT / "perf" / "build")
    print(note, file=sys.stderr)
    argvs: list[tuple[str, list[str]]] = []
    if binary is not None:
        argvs.append(("C tcp_baseline", [str(binary), "server", host, str(port)]))
    argvs.append(("uvloop echo", python_server("uvloop-echo-server", host, port + 1)))
    argvs.append(("pyzmq REP", python_server("zmq-rep-server", host, port + 2)))
    argvs.append(("grpcio", python_server("grpc-server", host, port + 3)))
    argvs.append(("blocking echo", python_server("blocking-echo-server", host, port + 4)))
    with contextlib.ExitStack() as stack:
        for what, argv in argvs:
            try:
                address = stack.enter_context(server_process(argv, what))
            except RuntimeError as exc:
                print(f"{what}: not started: {exc}", flush=True)
                continue
            print(f"{what}: listening on {address}", flush=True)
        stop = False

        def request_stop(*_: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        while not stop:
            time.sleep(0.2)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python perf/baselines.py",
        description="Baseline servers for perf/latency.py (see the module docstring).",
    )
    parser.add_argument(
        "command",
        choices=[
            "uvloop-echo-server",
            "blocking-echo-server",
            "zmq-rep-server",
            "grpc-server",
            "serve-all",
            "keep-awake",
        ],  # fmt: skip
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    parser.add_argument("--port", type=int, default=0, help="port; 0 picks a free one (default: 0)")
    args = parser.parse_args(argv)
    if args.command == "uvloop-echo-server":
        with asyncio.Runner(loop_factory=uvloop_factory()) as runner:
            runner.run(_serve_uvloop_echo(args.host, args.port))
    elif args.command == "blocking-echo-server":
        _serve_blocking_echo(args.host, args.port)
    elif args.command == "zmq-rep-server":
        _serve_zmq(args.host, args.port)
    elif args.command == "grpc-server":
        _serve_grpc(args.host, args.port)
    elif args.command == "keep-awake":
        _keep_awake()
    else:
        if not args.port:
            parser.error("serve-all needs --port (the C server's; the others follow it)")
        return _serve_all(args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
