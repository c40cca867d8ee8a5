"""Dead and crowding clients against a real server process: capacity comes back, bursts connect.

Doomed clients are ``perf/dead_clients.py``'s own (``--client STATE``), so that the test and the
benchmark that measures the exact figures drive the same session states: work queued past the
queue bound, copies past the staging budget, a kernel running under a waiting ``synchronize()``,
a copy cut halfway. Each is SIGKILLed; the whole GPU must be leasable again well within
``CAPACITY_BACK_S`` (the benchmark measures about 0.1 s on a 2-core VM; before the server probed
clients it did not read, the queued and staging states held the GPU for the 10 to 40 s their dead
work took to run).
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from integration_support import PROCESS_START_S, cli_server, read_line

import bitfusion_net as bf
from bitfusion_net.protocol import FrameDecoder, encode_request
from bitfusion_net.protocol import messages as m

DEAD_CLIENTS = Path(__file__).resolve().parents[2] / "perf" / "dead_clients.py"
CAPACITY_BACK_S = 5.0  # generous: the benchmark has the exact figure
DOOMED = 4


def _doomed(state: str, address: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(DEAD_CLIENTS), "--client", state, address, str(1 / DOOMED)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0,
    )  # fmt: skip


def _lease_whole_gpu_within(address: str, seconds: float) -> float:
    started = time.monotonic()
    while True:
        try:
            with bf.connect_sync(address, fraction=1.0, client_name="after"):
                return time.monotonic() - started
        except bf.CapacityError:
            if time.monotonic() - started > seconds:
                raise
            time.sleep(0.01)


@pytest.mark.parametrize("state", ["queued", "staging", "running", "mid_copy"])
def test_sigkilled_clients_capacity_is_back_at_once(state: str) -> None:
    with cli_server("--gpu-memory", "2GiB") as server:
        procs = [_doomed(state, server.address) for _ in range(DOOMED)]
        try:
            deadline = time.monotonic() + 2 * PROCESS_START_S
            for proc in procs:
                assert read_line(proc.stdout, deadline) == b"ready\n"
            with pytest.raises(bf.CapacityError):  # the doomed clients hold the whole GPU
                bf.connect_sync(server.address, fraction=0.05)
            time.sleep(0.3)  # settled in their state: reading paused, work queued or running
            for proc in procs:
                proc.send_signal(signal.SIGKILL)
            took = _lease_whole_gpu_within(server.address, CAPACITY_BACK_S)
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
                assert proc.stdout is not None
                proc.stdout.close()
        assert took < CAPACITY_BACK_S
        assert server.proc.poll() is None
        assert "internal error" not in server.stderr_text()


def test_a_live_client_the_server_stops_reading_hears_keepalives_and_goes_on() -> None:
    """Paused for its queue bound for about a second, a client is sent KEEPALIVE frames; both
    APIs ignore them, and the session carries on with its work intact."""

    async def main(address: str) -> None:
        async with bf.connect(address, fraction=0.5) as session:
            gpu = session.devices[0]
            busy = await gpu.builtin("busy")
            for _ in range(14_000):  # 1.4 s of device time: past the 10,000-operation bound
                await busy.launch((1, 1, 1), (1, 1, 1), (100,))
            await gpu.synchronize()
            assert (await gpu.stats()).kernels == 14_000

    def blocking(address: str) -> None:
        with bf.connect_sync(address, fraction=0.5) as session:
            gpu = session.devices[0]
            busy = gpu.builtin("busy")
            for _ in range(14_000):
                busy.launch((1, 1, 1), (1, 1, 1), (100,))
            gpu.synchronize()
            assert gpu.stats().kernels == 14_000

    with cli_server("--log-level", "INFO") as server:
        asyncio.run(asyncio.wait_for(main(server.address), 60))
        thread_error: list[BaseException] = []

        def run_blocking() -> None:
            try:
                blocking(server.address)
            except BaseException as exc:  # noqa: BLE001 - reported by the test thread
                thread_error.append(exc)

        thread = threading.Thread(target=run_blocking)
        thread.start()
        thread.join(60)
        assert not thread.is_alive() and not thread_error, thread_error
        assert "has gone" not in server.stderr_text()  # nobody was taken for dead


def _listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen backlog was full."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        if names.startswith("TcpExt:"):
            fields = dict(zip(names.split()[1:], values.split()[1:], strict=True))
            return int(fields["ListenOverflows"])
    raise AssertionError("no TcpExt in /proc/net/netstat")


def test_a_burst_of_200_simultaneous_connects_is_queued_not_dropped() -> None:
    """200 clients connect while the server is too busy to accept (here: stopped). The kernel
    queues them up to the listen backlog; beyond it, it drops their handshakes and they retry a
    second later or more (the old backlog, 100, dropped 18 of 200). With ours none is dropped,
    and once the server runs again every one of them gets a lease."""
    clients = 200
    with cli_server("--gpus", "10") as server:
        host, port = server.address.removeprefix("tcp://").rsplit(":", 1)
        os.kill(server.pid, signal.SIGSTOP)
        socks: list[socket.socket] = []
        try:
            before = _listen_overflows()
            for _ in range(clients):
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex((host, int(port)))
                socks.append(sock)
            pending = set(socks)
            deadline = time.monotonic() + 5
            while pending and time.monotonic() < deadline:  # handshakes done by the kernel
                _, writable, _ = select.select([], list(pending), [], 0.1)
                pending -= set(writable)
            time.sleep(0.2)
            overflows = _listen_overflows() - before
        finally:
            os.kill(server.pid, signal.SIGCONT)
        try:
            assert not pending and overflows == 0, (
                f"{len(pending)} unconnected, {overflows} dropped"
            )
            for sock in socks:
                sock.setblocking(True)
                sock.settimeout(30)
                sock.sendall(encode_request(m.Hello(1, 0.05, 0, "burst"), 1))
            for sock in socks:
                decoder = FrameDecoder(receives_replies=True)
                while (frame := decoder.next_frame()) is None:
                    decoder.receive_data(sock.recv(65536))
                assert isinstance(frame.message, m.HelloReply)
        finally:
            for sock in socks:
                sock.close()
        assert server.proc.poll() is None
