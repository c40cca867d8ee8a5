"""Shared helpers of the integration tests: servers, deadlines, raw peers, subprocesses.

Every test drives a real server on 127.0.0.1 port 0: an in-process ``bitfusion_net.Server`` on the
test's own event loop, or ``python -m bitfusion_net.server`` as a subprocess where a process must be
killed or measured. Nothing here sleeps to synchronise: waits poll a condition against a deadline.

(Not a conftest: plain functions read better at the call site, and pytest puts this directory on
``sys.path``, so the test modules import it by name.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import bitfusion_net as bf
from bitfusion_net.protocol import Frame, FrameDecoder, Limits, Request, encode_request
from bitfusion_net.protocol import messages as m

T = TypeVar("T")

KiB = 2**10
MiB = 2**20
GiB = 2**30

TEST_DEADLINE_S = 30.0  # the most one asyncio.run() of a test may take (pytest-timeout is 120 s)
WAIT_S = 5.0  # the most a polled condition may take to become true
POLL_S = 0.01
PROCESS_START_S = 20.0  # a subprocess printing its first line (imports numpy, maybe uvloop)

LISTENING = re.compile(rb"^listening on ((?:tcp|tls)://(\S+):(\d+))\s*$")


# -- running and waiting --------------------------------------------------------------------------
def run(coro: Coroutine[Any, Any, T], timeout: float = TEST_DEADLINE_S) -> T:
    """``asyncio.run(coro)``, bounded: a hang fails the test instead of stalling the suite."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Poll ``predicate`` every 10 ms until it holds; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(POLL_S)


def poll_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """``wait_until`` for code without an event loop (blocking clients, subprocesses)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(POLL_S)


def pool_is_empty(server: bf.Server) -> bool:
    return all(
        gpu["tenants"] == 0 and gpu["leased_fraction"] == 0 and gpu["leased_memory"] == 0
        for gpu in server.gpus()
    )


async def wait_released(server: bf.Server) -> None:
    """Wait until the server holds no lease and no session (clean-up is asynchronous)."""
    await wait_until(
        lambda: pool_is_empty(server) and not server.sessions(),
        f"every lease released (gpus: {server.gpus()}, sessions: {server.sessions()})",
    )


async def wait_tenants(server: bf.Server, count: int, gpu: int = 0) -> None:
    await wait_until(
        lambda: server.gpus()[gpu]["tenants"] == count,
        f"{count} tenant(s) on gpu{gpu} (have {server.gpus()[gpu]['tenants']})",
    )


@contextlib.asynccontextmanager
async def serve(**kwargs: Any) -> AsyncIterator[bf.Server]:
    """An in-process server on 127.0.0.1:0 (1 GiB NumPy devices unless told otherwise)."""
    kwargs.setdefault("gpu_memory", "1GiB")
    async with bf.Server("tcp://127.0.0.1:0", **kwargs) as server:
        yield server


def host_port(address: str) -> tuple[str, int]:
    match = re.fullmatch(r"tcp://(.+):(\d+)", address)
    assert match, address
    return match.group(1), int(match.group(2))


# -- a raw peer speaking bytes to the server ------------------------------------------------------
class RawPeer:
    """A bare TCP connection to the server: send any bytes, decode whatever frames come back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder(receives_replies=True, limits=Limits(max_payload=256 * MiB))
        self.frames: list[Frame] = []  # decoded, not yet taken
        self.eof = False
        self._next_id = 1

    @classmethod
    async def open(cls, address: str) -> RawPeer:
        host, port = host_port(address)
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    def next_id(self) -> int:
        request_id, self._next_id = self._next_id, self._next_id + 1
        return request_id

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def send_request(self, message: Request, payload: bytes = b"") -> int:
        request_id = self.next_id()
        self.send(encode_request(message, request_id, len(payload)) + payload)
        return request_id

    async def _receive(self) -> None:
        data = await self.reader.read(256 * KiB)
        if not data:
            self.eof = True
            return
        self.decoder.receive_data(data)
        while (frame := self.decoder.next_frame()) is not None:
            self.frames.append(frame)

    async def frame(self, timeout: float = WAIT_S) -> Frame:
        """The next frame from the server (fails on a timeout or if the server closes first)."""
        async with asyncio.timeout(timeout):
            while not self.frames:
                if self.eof:
                    raise AssertionError("the server closed the connection instead of answering")
                await self._receive()
        return self.frames.pop(0)

    async def until_closed(self, timeout: float = WAIT_S) -> list[Frame]:
        """Every frame until the server closes the connection (fails if it stays open)."""
        try:
            async with asyncio.timeout(timeout):
                while not self.eof:
                    try:
                        await self._receive()
                    except ConnectionResetError:
                        self.eof = True
        except TimeoutError:
            raise AssertionError(
                f"the server kept the connection open for {timeout} s; got {self.frames}"
            ) from None
        frames, self.frames = self.frames, []
        return frames

    async def hello(self, gpus: int = 1, fraction: float = 0.5, memory: int = 0) -> m.HelloReply:
        self.send_request(m.Hello(gpus, fraction, memory, "raw-peer"))
        frame = await self.frame()
        assert isinstance(frame.message, m.HelloReply), frame
        return frame.message

    async def alloc(self, nbytes: int, device: int = 0) -> int:
        self.send_request(m.MemAlloc(device, nbytes))
        frame = await self.frame()
        assert isinstance(frame.message, m.MemAllocReply), frame
        return frame.message.ptr

    def abort(self) -> None:
        transport = self.writer.transport
        transport.abort()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


# -- subprocesses ---------------------------------------------------------------------------------
def read_line(stream: Any, deadline: float) -> bytes:
    """One line from a pipe opened unbuffered, failing at ``deadline`` (time.monotonic())."""
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no complete line by the deadline (got {line!r})")
        ready, _, _ = select.select([stream], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(stream.fileno(), 1)  # byte by byte: never read past the line
        if not chunk:
            raise AssertionError(f"the process closed its output (got {line!r})")
        line += chunk
    return line


class CliServer:
    """``python -m bitfusion_net.server`` as a subprocess; ``address`` once it is listening."""

    def __init__(self, *args: str) -> None:
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bitfusion_net.server", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            bufsize=0,
        )
        self.address = ""

    def wait_listening(self, timeout: float = PROCESS_START_S) -> str:
        assert self.proc.stdout is not None
        line = read_line(self.proc.stdout, time.monotonic() + timeout)
        match = LISTENING.match(line)
        assert match, f"unexpected first line {line!r}; stderr: {self.stderr_text()}"
        self.address = match.group(1).decode()
        return self.address

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM, then wait; SIGKILL if it does not exit in time. Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"the server ignored SIGTERM for {timeout} s") from None
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.stderr.close()


@contextlib.contextmanager
def cli_server(*args: str) -> Iterator[CliServer]:
    """A listening CLI server (NumPy devices of 1 GiB, warnings only, unless told otherwise).

    The executor is pinned to numpy because the CLI's default, auto, would pick a GPU on a GPU
    host, and these tests are about the server, not the device.
    """
    argv = list(args)
    if "--executor" not in argv:
        argv += ["--executor", "numpy"]
    if "--gpu-memory" not in argv:
        argv += ["--gpu-memory", "1GiB"]
    if "--log-level" not in argv:
        argv += ["--log-level", "WARNING"]
    server = CliServer("--listen", "tcp://127.0.0.1:0", *argv)
    try:
        server.wait_listening()
        yield server
    finally:
        try:
            server.terminate()
        finally:
            server.close()


def vm_hwm(pid: int | str = "self") -> int:
    """Peak resident set size (VmHWM) of a process, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KiB
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def reset_hwm(pid: int | str = "self") -> None:
    """Reset VmHWM to the current RSS where the kernel allows it (Linux >= 4.0).

    Without it the baseline is the earlier peak, which only makes growth read smaller.
    """
    with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as refs:
        refs.write("5")


# -- one test, both APIs ----------------------------------------------------------------------------
_SYNC_TYPES = (
    bf.SyncSession, bf.SyncRemoteDevice, bf.SyncFunction, bf.SyncModule, bf.SyncStream,
    bf.SyncEvent,
)  # fmt: skip


class OverBlocking:
    """The blocking API's object behind the async API's shape: each call runs the real blocking
    call in a worker thread (so tests written once with ``await`` drive either API, and the
    blocking session is used from several threads, as its thread safety allows)."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if callable(value) and not isinstance(value, type):

            async def call(*args: Any, **kwargs: Any) -> Any:
                args = tuple(_unwrap(a) for a in args)
                kwargs = {k: _unwrap(v) for k, v in kwargs.items()}
                return _wrap(await asyncio.to_thread(value, *args, **kwargs))

            return call
        return _wrap(value)

    def __repr__(self) -> str:
        return repr(self._target)

    async def __aenter__(self) -> OverBlocking:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.to_thread(self._target.close)


def _wrap(value: Any) -> Any:
    if isinstance(value, _SYNC_TYPES):
        return OverBlocking(value)
    if isinstance(value, list) and value and isinstance(value[0], _SYNC_TYPES):
        return [OverBlocking(v) for v in value]
    return value


def _unwrap(value: Any) -> Any:
    return value._target if isinstance(value, OverBlocking) else value


class _BlockingOpener:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args, self._kwargs = args, kwargs
        self._session: OverBlocking | None = None

    async def _open(self) -> OverBlocking:
        return OverBlocking(await asyncio.to_thread(bf.connect_sync, *self._args, **self._kwargs))

    def __await__(self) -> Any:
        return self._open().__await__()

    async def __aenter__(self) -> OverBlocking:
        self._session = await self._open()
        return self._session

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()


class ClientApi:
    """Which client API a test drives: ``connect`` returns what ``bf.connect`` returns (awaitable,
    and an async context manager), for the async API itself or for the blocking one."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def connect(self, *args: Any, **kwargs: Any) -> Any:
        if self.kind == "async":
            return bf.connect(*args, **kwargs)
        if "client_name" not in kwargs:
            kwargs["client_name"] = "blocking-test"
        return _BlockingOpener(*args, **kwargs)

    def __repr__(self) -> str:
        return self.kind
