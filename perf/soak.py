"""A soak: tenants that connect, work, die and come back for an hour; does the server leak?

    python perf/soak.py                        # 1 hour, 16 tenants: perf/results/soak.json, .png
    python perf/soak.py --duration 600         # 10 minutes
    python perf/soak.py --duration 8 --tenants 4 --kill-rate 1 --sample-period 0.5 --output /tmp/r

Starts ``python -m bitfusion_net.server --executor numpy --gpus 2 --gpu-memory 2GiB`` on loopback
and keeps ``--tenants`` client processes (the blocking API) running against it for ``--duration``
seconds. Each tenant loops: it leases a random fraction (0.05..0.5) of one GPU, or of two, in
``share`` or ``cap`` mode, backing off and retrying while the server answers CAPACITY; then for a
random time it does a random mix of real work, checked against a host mirror of every byte it
wrote: allocations and frees, copies of 1 KiB..8 MiB each way and device to device, memsets,
``fill``/``saxpy``/``busy`` launches, synchronizes, floods of thousands of no-reply launches, and
checks of the server's accounting (``mem_get_info``, ``stats``). It then closes its session, or
ends its process with the session open (sometimes with launches still queued). Meanwhile the soak
SIGKILLs random tenants (``--kill-rate`` per second) and starts a replacement for every tenant that
ends, so the count stays constant. A tenant that reads back wrong bytes prints ``data-error`` and
exits with status 2; one that meets any other error (a call timing out included) prints ``error``
and exits with status 3.

Every ``--sample-period`` seconds the soak records the server's RSS, open file descriptors and
threads (from ``/proc``), its CPU time and the machine's, the leases it holds (from its SIGUSR1
report, parsed from its log; ``report_ms`` is how long the report took to come, i.e. how late the
server's event loop got to the signal), and the latency percentiles of a probe client's
``mem_get_info`` calls over the period (a process of its own, calling every ``--probe-interval``
seconds on a 0.05 lease of GPU 0 it holds for the whole run). At the end it SIGKILLs every tenant
and measures how long the server takes to hand every lease back ("drain"), and the server's RSS
and descriptors then, against the same figures before the first tenant started; then it stops the
probe (SIGTERM: it closes its session), measures RSS once more with no session left (a device with
no tenant drops its idle staging buffers and trims the heap, which the probe's lease prevents
until then), stops the server (SIGTERM) and records how that went. ``--server-log FILE`` keeps the
server's whole log (every session's lease and end, every report).

Writes ``soak.json`` (the configuration, every sample, the counts and the summary: RSS and
descriptors at the end of the warm-up, the first 10 % of the run or 30 s if less, against the end
and the maximum, least-squares slopes per hour after the warm-up, whether each is "flat" by the
rule stated in the file, the probe's p50/p99 over the run, the failures) and ``soak.png`` (needs
matplotlib). Memory and speed figures are never judged: the exit status is 1 only when the soak
itself broke (the server died or could not be stopped, a tenant or the probe saw wrong data or an
error, or leases never came back after the tenants died), else 0.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import ctypes
import json
import math
import os
import random
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, NoReturn

import numpy as np

import bitfusion_net as bf

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20
SERVER_MEMORY = "2GiB"
SIZE_MIN, SIZE_MAX = 1024, 8 * MIB  # copy sizes, log-uniform
BUFFERS_PER_DEVICE = 6
DEVICE_BUDGET = 64 * MIB  # the most one tenant allocates on one device (or half its lease)
FLOOD_MIN, FLOOD_MAX = 500, 10_000  # no-reply launches in one flood
BUSY_MIN_US, BUSY_MAX_US = 20, 2000
CALL_TIMEOUT_S = 60.0  # a tenant call that takes longer is an error: the server stalled
PROBE_FRACTION = 0.05
REPORT_TIMEOUT_S = 5.0  # the longest a sample waits for the server's SIGUSR1 report
DRAIN_TIMEOUT_S = 30.0  # the longest the leases of killed tenants may take to come back
FLAT_RSS_RATIO, FLAT_RSS_SLACK_MIB, FLAT_FDS_SLACK = 0.10, 16.0, 8
FLAT_WINDOW = 5  # samples: the warm-up and end figures are medians over this many
FLAT_RULE = (
    f"figures are medians of {FLAT_WINDOW} samples: the first ones at or after the end of the "
    f"warm-up, and the last ones of the run. RSS is flat when end <= warm-up * "
    f"{1 + FLAT_RSS_RATIO:g} + {FLAT_RSS_SLACK_MIB:g} MiB; descriptors are flat when "
    f"end <= warm-up + {FLAT_FDS_SLACK}. A figure, not an assertion."
)
EXIT_DATA_ERROR, EXIT_ERROR = 2, 3


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when the soak dies, so that nothing outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(0)


# -- the tenants ---------------------------------------------------------------------------------
@dataclass
class Buffer:
    """A device allocation and a host mirror of every byte in it (all written at allocation)."""

    ptr: bf.DevicePtr
    mirror: np.ndarray  # uint8
    floats: bool  # holds finite float32 values only: kernels work on these

    @property
    def size(self) -> int:
        return int(self.mirror.nbytes)

    @property
    def f32(self) -> np.ndarray:
        return self.mirror.view(np.float32)


@dataclass
class DeviceState:
    device: bf.SyncRemoteDevice
    total: int  # the lease's memory, from mem_get_info at the start
    buffers: list[Buffer] = field(default_factory=list)
    kernels: int = 0  # launched in this session, to check against stats()

    @property
    def allocated(self) -> int:
        return sum(b.size for b in self.buffers)


class SoakError(Exception):
    """What the tenant saw is wrong: the server returned other bytes or figures than it should."""

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind


class Tenant:
    """One tenant process: sessions one after another until killed, or until it chooses to exit."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.address: str = config["address"]
        self.slot: int = config["slot"]
        self.session_max: float = config["session_max"]
        self.think_s: float = config["think_ms"] / 1e3
        self.exit_probability: float = config["exit_probability"]
        self.rng = np.random.default_rng(config["seed"])
        self.ops = self.verified = self.launches = 0
        self._reported = time.monotonic()
        self.states: list[DeviceState] = []

    # what the soak reads, one line each
    def emit(self, line: str) -> None:
        try:
            print(line, flush=True)
        except (BrokenPipeError, ValueError):
            os._exit(0)  # the soak has gone

    def flush_counts(self) -> None:
        if self.ops or self.verified or self.launches:
            self.emit(f"ops {self.ops} {self.verified} {self.launches}")
            self.ops = self.verified = self.launches = 0
        self._reported = time.monotonic()

    def run(self) -> NoReturn:
        backoff = 0.05
        while True:
            gpus = 2 if self.rng.random() < 0.25 else 1
            fraction = round(float(self.rng.uniform(0.05, 0.5)), 2)
            mode = "cap" if self.rng.random() < 0.25 else "share"
            try:
                session = bf.connect_sync(
                    self.address, gpus=gpus, fraction=fraction, mode=mode,
                    client_name=f"soak-{self.slot}", call_timeout=CALL_TIMEOUT_S,
                )  # fmt: skip
            except bf.CapacityError:
                self.emit("capacity")
                time.sleep(backoff * float(self.rng.uniform(0.5, 1.5)))
                backoff = min(1.0, backoff * 2)
                continue
            backoff = 0.05
            self.emit(f"connected {gpus} {fraction:g} {mode}")
            self.session(session)

    def session(self, session: bf.SyncSession) -> None:
        self.states = []
        for device in session.devices:
            free, total = device.mem_get_info()
            if free != total:
                raise SoakError("check", f"a new lease has {total - free} of {total} bytes in use")
            self.states.append(DeviceState(device, total))
        ends = time.monotonic() + float(self.rng.uniform(0.5, self.session_max))
        while time.monotonic() < ends:
            self.step()
            if self.think_s:
                time.sleep(float(self.rng.uniform(0, self.think_s)))
            if time.monotonic() - self._reported > 0.5:
                self.flush_counts()
        if self.rng.random() < self.exit_probability:
            if self.rng.random() < 0.5:  # leave work queued behind
                state = self.pick_state()
                self.flood(state, verify=False)
            self.flush_counts()
            self.emit("exit")
            os._exit(0)  # the session is left open: the server sees the connection drop
        for state in self.states:
            self.verify_all(state)
        if self.rng.random() < 0.5:
            for state in self.states:
                self.free_all(state)
        session.close()
        self.flush_counts()
        self.emit("closed")

    # -- the work ------------------------------------------------------------------------------
    def pick_state(self) -> DeviceState:
        return self.states[int(self.rng.integers(len(self.states)))]

    def size(self, floats: bool) -> int:
        n = int(math.exp(self.rng.uniform(math.log(SIZE_MIN), math.log(SIZE_MAX))))
        return n - n % 4 if floats else n

    def host_data(self, nbytes: int, floats: bool) -> np.ndarray:
        if floats:
            return self.rng.standard_normal(nbytes // 4, dtype=np.float32).view(np.uint8)
        return np.frombuffer(self.rng.bytes(nbytes), np.uint8)

    def span(self, buffer: Buffer, limit: int | None = None) -> tuple[int, int]:
        """A random (offset, length) inside ``buffer``, 4-byte aligned for float buffers."""
        size = buffer.size if limit is None else min(limit, buffer.size)
        unit = 4 if buffer.floats else 1
        length = int(self.rng.integers(1, size // unit + 1)) * unit
        offset = int(self.rng.integers(0, (buffer.size - length) // unit + 1)) * unit
        return offset, length

    def buffer(self, state: DeviceState, floats: bool | None = None) -> Buffer:
        """A random buffer of the kind asked for, allocating one if there is none."""
        choices = [b for b in state.buffers if floats is None or b.floats == floats]
        if not choices:
            return self.allocate(state, bool(self.rng.random() < 0.5) if floats is None else floats)
        return choices[int(self.rng.integers(len(choices)))]

    def allocate(self, state: DeviceState, floats: bool) -> Buffer:
        size = self.size(floats)
        budget = min(DEVICE_BUDGET, state.total // 2)
        while state.buffers and (
            len(state.buffers) >= BUFFERS_PER_DEVICE or state.allocated + size > budget
        ):
            self.free(state, state.buffers[int(self.rng.integers(len(state.buffers)))])
        size = min(size, budget)
        ptr = state.device.mem_alloc(size)
        data = self.host_data(size, floats)
        state.device.memcpy_htod(ptr, data)
        buffer = Buffer(ptr, data.copy(), floats)
        state.buffers.append(buffer)
        self.ops += 2
        return buffer

    def free(self, state: DeviceState, buffer: Buffer) -> None:
        state.device.mem_free(buffer.ptr)
        state.buffers.remove(buffer)
        self.ops += 1

    def free_all(self, state: DeviceState) -> None:
        for buffer in list(state.buffers):
            self.free(state, buffer)
        free, total = state.device.mem_get_info()
        if free != total:
            raise SoakError("check", f"every buffer freed, yet {total - free} bytes in use")

    def check(self, state: DeviceState, buffer: Buffer, offset: int, length: int, op: str) -> None:
        host = np.empty(length, np.uint8)
        state.device.memcpy_dtoh(host, buffer.ptr + offset)
        self.ops += 1
        expected = buffer.mirror[offset : offset + length]
        if not np.array_equal(host, expected):
            wrong = np.flatnonzero(host != expected)
            raise SoakError(
                "data",
                f"gpu{state.device.index} after {op}: {wrong.size} of {length} bytes differ, "
                f"first at byte {offset + int(wrong[0])} of a {buffer.size}-byte buffer",
            )
        self.verified += length

    def verify_all(self, state: DeviceState) -> None:
        for buffer in state.buffers:
            self.check(state, buffer, 0, buffer.size, "the session's work")

    def step(self) -> None:
        state = self.pick_state()
        op = self.rng.choice(OPS, p=WEIGHTS)
        getattr(self, f"op_{op}")(state)

    def op_htod(self, state: DeviceState) -> None:
        buffer = self.buffer(state)
        offset, length = self.span(buffer)
        data = self.host_data(length, buffer.floats)
        state.device.memcpy_htod(buffer.ptr + offset, data)
        buffer.mirror[offset : offset + length] = data
        self.ops += 1

    def op_dtoh(self, state: DeviceState) -> None:
        buffer = self.buffer(state)
        offset, length = (0, buffer.size) if self.rng.random() < 0.3 else self.span(buffer)
        self.check(state, buffer, offset, length, "a copy back")

    def op_fill(self, state: DeviceState) -> None:
        buffer = self.buffer(state, floats=True)
        offset, length = self.span(buffer)
        value = float(np.float32(self.rng.uniform(-100, 100)))
        n = length // 4
        state.device.builtin("fill").launch(
            ((n + 255) // 256, 1, 1), (256, 1, 1), (n, value, buffer.ptr + offset)
        )
        buffer.f32[offset // 4 : offset // 4 + n] = np.float32(value)
        self.launched(state, 1)
        if self.rng.random() < 0.5:
            self.check(state, buffer, offset, length, "fill")

    def op_saxpy(self, state: DeviceState) -> None:
        x = self.buffer(state, floats=True)
        y = self.buffer(state, floats=True)
        if x is y:  # in place over one span, or one span of each half
            half = x.size // 8 * 4
            length = int(self.rng.integers(1, half // 4 + 1)) * 4
            x_off = int(self.rng.integers(0, (half - length) // 4 + 1)) * 4
            y_off = x_off
            if self.rng.random() < 0.5:
                y_off = half + int(self.rng.integers(0, (x.size - half - length) // 4 + 1)) * 4
        else:
            length = self.span(x, min(x.size, y.size))[1]
            x_off = int(self.rng.integers(0, (x.size - length) // 4 + 1)) * 4
            y_off = int(self.rng.integers(0, (y.size - length) // 4 + 1)) * 4
        n = length // 4
        a = float(np.float32(self.rng.uniform(-0.5, 0.5)))
        state.device.builtin("saxpy").launch(
            ((n + 255) // 256, 1, 1), (256, 1, 1), (n, a, x.ptr + x_off, y.ptr + y_off)
        )
        xs = x.f32[x_off // 4 : x_off // 4 + n]
        ys = y.f32[y_off // 4 : y_off // 4 + n]
        part = np.multiply(xs, np.float32(a))  # the device's own order: y + (a * x)
        np.add(ys, part, out=ys)
        self.launched(state, 1)
        if not np.isfinite(ys).all() or np.abs(ys).max(initial=0) > 1e6:  # keep values finite
            data = self.host_data(y.size, True)
            state.device.memcpy_htod(y.ptr, data)
            y.mirror[:] = data
            self.ops += 1
        if self.rng.random() < 0.5:
            self.check(state, y, y_off, length, "saxpy")

    def op_memset(self, state: DeviceState) -> None:
        buffer = self.buffer(state)
        offset, length = self.span(buffer)
        if buffer.floats:
            bits = int(np.float32(self.rng.uniform(-10, 10)).view(np.uint32))
            state.device.memset_d32(buffer.ptr + offset, bits, length // 4)
            buffer.mirror[offset : offset + length].view(np.uint32)[:] = bits
        else:
            value = int(self.rng.integers(256))
            state.device.memset_d8(buffer.ptr + offset, value, length)
            buffer.mirror[offset : offset + length] = value
        self.ops += 1
        if self.rng.random() < 0.5:
            self.check(state, buffer, offset, length, "memset")

    def op_dtod(self, state: DeviceState) -> None:
        dst = self.buffer(state)
        src = self.buffer(state, floats=True) if dst.floats else self.buffer(state)
        unit = 4 if dst.floats else 1
        limit = min(src.size, dst.size) // (2 if src is dst else 1)
        length = max(unit, int(self.rng.integers(1, limit // unit + 1)) * unit)
        src_off = int(self.rng.integers(0, (src.size - length) // unit + 1)) * unit
        dst_off = int(self.rng.integers(0, (dst.size - length) // unit + 1)) * unit
        if src is dst and abs(src_off - dst_off) < length:  # no overlap: place it after or before
            dst_off = src_off + length if src_off + 2 * length <= src.size else src_off - length
            if dst_off < 0:
                return
        state.device.memcpy_dtod(dst.ptr + dst_off, src.ptr + src_off, length)
        dst.mirror[dst_off : dst_off + length] = src.mirror[src_off : src_off + length]
        self.ops += 1
        if self.rng.random() < 0.5:
            self.check(state, dst, dst_off, length, "a device-to-device copy")

    def op_busy(self, state: DeviceState) -> None:
        busy = state.device.builtin("busy")
        count = int(self.rng.integers(1, 5))
        for _ in range(count):
            busy.launch((1, 1, 1), (1, 1, 1), (int(self.rng.integers(BUSY_MIN_US, BUSY_MAX_US)),))
        self.launched(state, count)

    def op_synchronize(self, state: DeviceState) -> None:
        state.device.synchronize()
        self.ops += 1

    def op_realloc(self, state: DeviceState) -> None:
        if state.buffers:
            self.free(state, state.buffers[int(self.rng.integers(len(state.buffers)))])
        self.allocate(state, bool(self.rng.random() < 0.5))

    def op_info(self, state: DeviceState) -> None:
        free, total = state.device.mem_get_info()
        self.ops += 1
        if total != state.total or total - free < state.allocated:
            raise SoakError(
                "check",
                f"mem_get_info says {free} free of {total}; the lease has {state.total}, "
                f"{state.allocated} allocated",
            )

    def op_stats(self, state: DeviceState) -> None:
        state.device.synchronize()
        stats = state.device.stats()
        free, total = state.device.mem_get_info()
        self.ops += 3
        if stats.kernels != state.kernels or stats.memory_used != total - free:
            raise SoakError(
                "check",
                f"stats() says {stats.kernels} kernels and {stats.memory_used} bytes in use; "
                f"{state.kernels} were launched, mem_get_info says {total - free} in use",
            )

    def op_flood(self, state: DeviceState) -> None:
        self.flood(state, verify=True)

    def flood(self, state: DeviceState, verify: bool) -> None:
        """Thousands of no-reply ``fill`` launches, each writing its index into one float; with
        a few ``busy`` ones among them. The last index must be what is read back."""
        buffer = self.buffer(state, floats=True)
        ptr = buffer.ptr
        fill = state.device.builtin("fill").launch
        busy = state.device.builtin("busy").launch
        count = int(self.rng.integers(FLOOD_MIN, FLOOD_MAX))
        one = (1, 1, 1)
        for i in range(1, count + 1):
            fill(one, one, (1, float(i), ptr))
            if i % 2000 == 0:
                busy(one, one, (50,))
                self.launched(state, 1)
        buffer.f32[0] = np.float32(count)
        self.launched(state, count)
        if verify:
            self.check(state, buffer, 0, 4, f"a flood of {count} launches")

    def launched(self, state: DeviceState, count: int) -> None:
        state.kernels += count
        self.launches += count
        self.ops += count


OPS = [
    "htod", "dtoh", "fill", "saxpy", "memset", "dtod", "busy", "synchronize", "realloc",
    "info", "stats", "flood",
]  # fmt: skip
_WEIGHTS = [16, 16, 10, 10, 6, 6, 8, 4, 6, 3, 2, 1.0]
WEIGHTS = [w / sum(_WEIGHTS) for w in _WEIGHTS]


def tenant_main(config: dict[str, Any]) -> NoReturn:
    die_with_parent(config["parent"])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the soak stops its tenants itself
    tenant = Tenant(config)
    try:
        tenant.run()
    except SoakError as exc:
        tenant.emit(f"{'data-error' if exc.kind == 'data' else 'check-error'} {exc}")
        os._exit(EXIT_DATA_ERROR)
    except Exception as exc:  # noqa: BLE001 - every error is a finding the soak reports
        tenant.emit(f"error {type(exc).__name__}: {exc}")
        os._exit(EXIT_ERROR)


# -- the probe -----------------------------------------------------------------------------------
def probe_main(address: str, parent: int, interval: float) -> int:
    """Call ``mem_get_info`` every ``interval`` s; print the latencies in batches; SIGTERM ends."""
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    deadline = time.monotonic() + 30
    while True:
        try:
            session = bf.connect_sync(
                address, fraction=PROBE_FRACTION, client_name="soak-probe",
                call_timeout=CALL_TIMEOUT_S,
            )  # fmt: skip
            break
        except bf.CapacityError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    gpu = session.devices[0]
    print("ready", flush=True)
    batch: list[str] = []
    flushed = time.monotonic()
    try:
        while not stop.is_set():
            started = time.perf_counter()
            free, total = gpu.mem_get_info()
            batch.append(f"{(time.perf_counter() - started) * 1e6:.0f}")
            if free != total:
                print(f"check-error the probe allocates nothing, yet {total - free} bytes in use")
                return EXIT_DATA_ERROR
            now = time.monotonic()
            if now - flushed >= 0.1:
                print(f"L {' '.join(batch)}", flush=True)
                batch, flushed = [], now
            stop.wait(interval)
        if batch:
            print(f"L {' '.join(batch)}", flush=True)
        session.close()
    except bf.BitfusionError as exc:
        print(f"error {type(exc).__name__}: {exc}", flush=True)
        return EXIT_ERROR
    print("closed", flush=True)
    return 0


# -- the server's log ----------------------------------------------------------------------------
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (\w+) ")
REPORT_GPU = re.compile(r"^gpu(\d+): ([\d.]+) leased to (\d+) tenant\(s\), (.+) of (.+) promised$")
REPORT_LEASE = re.compile(r"^  session (\d+) .*, (\d+) queued, memory ")
EVENTS = {
    "leased": re.compile(r": session \d+ \(.*\): leased "),
    "closed": re.compile(r": session \d+ \(.*\) closed; releasing [1-9]\d* lease"),
    "lost": re.compile(r": session \d+ \(.*\) lost \(.*\); releasing [1-9]\d* lease"),
    "refused": re.compile(r": session \d+ \(.*\): refused: "),
    "client_gone": re.compile(r"the client has gone; ending it"),
    "stalled_closed": re.compile(r": (no HELLO|a frame stalled halfway) for "),
    "protocol_errors": re.compile(r"protocol error"),
    "connections_refused": re.compile(r"connection from .* refused"),
}


@dataclass
class Report:
    """One SIGUSR1 report of the server."""

    leases: int  # leases the GPU pool counts (those of ended sessions until their memory is freed)
    leased_fraction: float  # summed over the GPUs
    lease_lines: int  # leases of connected sessions, one line each
    sessions: int
    queued: int  # operations queued on the devices, summed
    arrived: float  # time.monotonic() when its first line was read


class ServerLog:
    """Reads the server's stderr: counts its log events, keeps its warnings and errors, and
    parses the SIGUSR1 reports the soak asks for."""

    def __init__(self, stream: IO[bytes], log_path: Path | None) -> None:
        self._fd = stream.fileno()
        self._stream = stream
        self._log = log_path.open("wb") if log_path else None
        self._cond = threading.Condition()
        self._block: list[str] | None = None
        self._block_arrived = 0.0
        self.reports = 0
        self.latest: Report | None = None
        self.events = dict.fromkeys(EVENTS, 0)
        self.levels: dict[str, int] = {}
        self.notable: list[str] = []  # WARNING and above, and lines outside any record
        self.tail: list[str] = []
        self.closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        pending = b""
        while True:
            ready, _, _ = select.select([self._fd], [], [], 0.02)
            if not ready:
                self._end_block()  # a report is written at once: silence means it is whole
                continue
            data = os.read(self._fd, 65536)
            if not data:
                break
            if self._log:
                self._log.write(data)
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._line(line.decode(errors="replace"))
        self._end_block()
        if self._log:
            self._log.close()
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def _line(self, line: str) -> None:
        self.tail = (self.tail + [line])[-40:]
        stamp = TIMESTAMP.match(line)
        if stamp is None:
            if self._block is not None and (REPORT_GPU.match(line) or line.startswith("  ")):
                self._block.append(line)
            elif line.strip():
                self._note(line)
            return
        self._end_block()
        level = stamp.group(1)
        self.levels[level] = self.levels.get(level, 0) + 1
        if line.endswith("bitfusion_net.server: tenants:"):
            self._block, self._block_arrived = [], time.monotonic()
            return
        for name, pattern in EVENTS.items():
            if pattern.search(line):
                self.events[name] += 1
        if level not in ("DEBUG", "INFO"):
            self._note(line)

    def _note(self, line: str) -> None:
        if len(self.notable) < 200:
            self.notable.append(line)

    def _end_block(self) -> None:
        if self._block is None:
            return
        block, self._block = self._block, None
        gpus = [REPORT_GPU.match(line) for line in block]
        leases = [REPORT_LEASE.match(line) for line in block]
        report = Report(
            leases=sum(int(g.group(3)) for g in gpus if g),
            leased_fraction=sum(float(g.group(2)) for g in gpus if g),
            lease_lines=sum(1 for x in leases if x),
            sessions=len({x.group(1) for x in leases if x}),
            queued=sum(int(x.group(2)) for x in leases if x),
            arrived=self._block_arrived,
        )
        with self._cond:
            self.latest = report
            self.reports += 1
            self._cond.notify_all()

    def report(self, pid: int, timeout: float = REPORT_TIMEOUT_S) -> tuple[Report | None, float]:
        """Ask the server for its report (SIGUSR1): the report, and how long after the signal
        its first line came (the server's loop handles the signal between callbacks)."""
        with self._cond:
            seen = self.reports
            started = time.monotonic()
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                return None, 0.0
            self._cond.wait_for(lambda: self.reports > seen or self.closed, timeout)
            if self.reports == seen or self.latest is None:
                return None, timeout
            return self.latest, self.latest.arrived - started

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


# -- /proc ---------------------------------------------------------------------------------------
def proc_status(pid: int) -> dict[str, Any]:
    """The server's RSS (MiB), threads, open descriptors and CPU seconds so far."""
    status = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.split()
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return {
        "rss_mib": int(status["VmRSS"][0]) / 1024,
        "threads": int(status["Threads"][0]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "cpu_s": (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK"),
    }


def host_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields[:8]) - idle) / tick, sum(fields[:8]) / tick


# -- the soak ------------------------------------------------------------------------------------
@dataclass
class Counts:
    tenants_started: int = 0
    tenants_killed: int = 0  # SIGKILLed by the soak during the run
    tenant_exits: int = 0  # tenants that ended their process with the session open
    clean_closes: int = 0  # sessions closed with close()
    sessions_opened: int = 0
    reconnects: int = 0  # sessions opened in a slot after its first: by a tenant or its replacement
    two_gpu_sessions: int = 0
    cap_mode_sessions: int = 0
    capacity_refusals: int = 0
    operations: int = 0  # the tenants report every 0.5 s: a killed one's last are lost
    bytes_verified: int = 0
    launches: int = 0
    data_errors: int = 0  # wrong bytes read back
    check_errors: int = 0  # wrong figures from the server (mem_get_info, stats)
    tenant_errors: int = 0  # any other error a tenant met, or a tenant that crashed
    probe_errors: int = 0


class Children:
    """Every process the soak started, so that all of them are ended however it stops."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, env=env, start_new_session=True, **kwargs
        )
        self.procs.append(proc)
        return proc

    def reap(self) -> None:
        self.procs = [p for p in self.procs if p.poll() is None]

    def end_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        self.procs = []


@dataclass
class TenantProc:
    slot: int
    proc: subprocess.Popen[bytes]
    reader: threading.Thread
    started: float
    killed: bool = False
    output: list[str] = field(default_factory=list)  # lines that are not events: a traceback


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.children = Children()
        self.counts = Counts()
        self.lock = threading.Lock()
        self.errors: list[dict[str, Any]] = []
        self.slot_sessions = [0] * args.tenants
        self.tenants: list[TenantProc | None] = [None] * args.tenants
        self.window: list[float] = []  # the probe's latencies (s) since the last sample
        self.run_latencies = array.array("d")  # every one of them during the run
        self.run_started = 0.0  # seconds after t0 that the tenants started
        self.samples: list[dict[str, Any]] = []
        self.t0 = 0.0
        self.server: subprocess.Popen[bytes] | None = None
        self.log: ServerLog | None = None
        self.probe: subprocess.Popen[bytes] | None = None
        self.probe_reader: threading.Thread | None = None
        self.address = ""

    # -- children --------------------------------------------------------------------------------
    def server_argv(self) -> list[str]:
        return [
            sys.executable, "-m", "bitfusion_net.server", "--executor", "numpy",
            "--gpus", str(self.args.gpus), "--gpu-memory", SERVER_MEMORY,
            "--listen", "tcp://127.0.0.1:0", "--log-level", "INFO",
        ]  # fmt: skip

    def start_server(self) -> None:
        # PR_SET_PDEATHSIG needs a preexec_fn (the server is not ours to change); no thread runs
        # yet, which is what makes a preexec_fn safe.
        parent = os.getpid()
        self.server = self.children.start(
            self.server_argv(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=lambda: die_with_parent(parent),
        )  # fmt: skip
        assert self.server.stdout is not None and self.server.stderr is not None
        line = self.server.stdout.readline().decode()
        if not line.startswith("listening on "):
            raise RuntimeError(f"the server did not start: {line!r}")
        self.address = line.split()[-1]
        self.log = ServerLog(self.server.stderr, self.args.server_log)

    def start_probe(self) -> None:
        self.probe = self.children.start(
            [sys.executable, __file__, "--probe", self.address, str(os.getpid()),
             str(self.args.probe_interval)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        assert self.probe.stdout is not None
        line = self.probe.stdout.readline().decode()
        if line != "ready\n":
            raise RuntimeError(f"the probe did not start: {line!r}")
        self.probe_reader = threading.Thread(
            target=self._read_probe, args=(self.probe.stdout,), daemon=True
        )
        self.probe_reader.start()

    def _read_probe(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith("L "):
                values = [float(v) / 1e6 for v in line[2:].split()]
                with self.lock:
                    self.window.extend(values)
            elif line.startswith(("error", "check-error")):
                with self.lock:
                    self.counts.probe_errors += 1
                self.error("probe", line)
            elif line != "closed":
                self.error("probe", line)

    def start_tenant(self, slot: int) -> None:
        config = {
            "address": self.address, "slot": slot, "seed": self.rng.getrandbits(63),
            "parent": os.getpid(), "session_max": self.args.session_max,
            "think_ms": self.args.think_ms, "exit_probability": self.args.exit_probability,
        }  # fmt: skip
        proc = self.children.start(
            [sys.executable, __file__, "--tenant", json.dumps(config)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        tenant = TenantProc(slot, proc, threading.Thread(), time.monotonic())
        tenant.reader = threading.Thread(target=self._read_tenant, args=(tenant,), daemon=True)
        tenant.reader.start()
        self.tenants[slot] = tenant
        with self.lock:
            self.counts.tenants_started += 1

    def _read_tenant(self, tenant: TenantProc) -> None:
        assert tenant.proc.stdout is not None
        c = self.counts
        for raw in tenant.proc.stdout:
            word, _, rest = raw.decode(errors="replace").rstrip("\n").partition(" ")
            with self.lock:
                if word == "ops":
                    ops, verified, launches = map(int, rest.split())
                    c.operations += ops
                    c.bytes_verified += verified
                    c.launches += launches
                elif word == "capacity":
                    c.capacity_refusals += 1
                elif word == "connected":
                    gpus, _, mode = rest.split()
                    c.sessions_opened += 1
                    c.reconnects += self.slot_sessions[tenant.slot] > 0
                    self.slot_sessions[tenant.slot] += 1
                    c.two_gpu_sessions += gpus == "2"
                    c.cap_mode_sessions += mode == "cap"
                elif word == "closed":
                    c.clean_closes += 1
                elif word == "exit":
                    pass  # counted when the process has ended
                elif word in ("data-error", "check-error", "error"):
                    if word == "data-error":
                        c.data_errors += 1
                    elif word == "check-error":
                        c.check_errors += 1
                    else:
                        c.tenant_errors += 1
                    self._error(f"tenant {tenant.slot}", f"{word} {rest}")
                else:
                    tenant.output = (tenant.output + [f"{word} {rest}"])[-20:]

    def error(self, who: str, text: str) -> None:
        with self.lock:
            self._error(who, text)

    def _error(self, who: str, text: str) -> None:
        if len(self.errors) < 100:
            self.errors.append(
                {"t": round(time.monotonic() - self.t0, 2), "who": who, "text": text}
            )

    def reap_tenants(self, replace: bool) -> None:
        for slot, tenant in enumerate(self.tenants):
            if tenant is None or tenant.proc.poll() is None:
                continue
            tenant.reader.join(5)
            code = tenant.proc.returncode
            with self.lock:
                if tenant.killed:
                    pass
                elif code == 0:
                    self.counts.tenant_exits += 1
                elif code not in (EXIT_DATA_ERROR, EXIT_ERROR):  # crashed without saying why
                    self.counts.tenant_errors += 1
                    self._error(f"tenant {slot}", f"exit status {code}: {tenant.output[-5:]}")
            self.tenants[slot] = None
            if replace:
                self.start_tenant(slot)
        self.children.reap()

    def kill_one(self) -> None:
        alive = [
            t for t in self.tenants if t is not None and not t.killed and t.proc.poll() is None
        ]
        if alive:
            tenant = self.rng.choice(alive)
            tenant.proc.kill()
            tenant.killed = True
            with self.lock:
                self.counts.tenants_killed += 1

    # -- samples ---------------------------------------------------------------------------------
    def sample(self, phase: str) -> dict[str, Any]:
        assert self.server is not None and self.log is not None
        now = time.monotonic()
        figures = proc_status(self.server.pid)
        busy, total = host_cpu()
        report, delay = self.log.report(self.server.pid)
        with self.lock:
            window, self.window = sorted(self.window), []
            counts = asdict(self.counts)
        if phase == "run":
            self.run_latencies.extend(window)
        previous = self.samples[-1] if self.samples else None
        sample: dict[str, Any] = {
            "t": round(now - self.t0, 3),
            "phase": phase,
            **figures,
            "server_cpu_pct": None,
            "host_cpu_pct": None,  # the whole machine's busy share, all CPUs: 100 is all busy
            "host_cpu_s": [busy, total],
            "leases": report.leases if report else None,
            "leased_fraction": round(report.leased_fraction, 3) if report else None,
            "session_leases": report.lease_lines if report else None,
            "sessions": report.sessions if report else None,
            "queued": report.queued if report else None,
            "report_ms": round(delay * 1e3, 2) if report else None,
            "probe_calls": len(window),
            "probe_p50_ms": percentile(window, 50) * 1e3 if window else None,
            "probe_p99_ms": percentile(window, 99) * 1e3 if window else None,
            "probe_max_ms": window[-1] * 1e3 if window else None,
            "tenants_alive": sum(
                1 for t in self.tenants if t is not None and t.proc.poll() is None
            ),
            "counts": counts,
        }
        if previous is not None and sample["t"] > previous["t"]:
            sample["server_cpu_pct"] = round(
                100 * (sample["cpu_s"] - previous["cpu_s"]) / (sample["t"] - previous["t"]), 1
            )
            (busy0, total0) = previous["host_cpu_s"]
            if total > total0:
                sample["host_cpu_pct"] = round(100 * (busy - busy0) / (total - total0), 1)
        self.samples.append(sample)
        return sample

    # -- the run ---------------------------------------------------------------------------------
    def run(self, progress: Progress) -> dict[str, Any]:
        args = self.args
        self.t0 = time.monotonic()
        self.start_server()
        assert self.server is not None and self.log is not None
        self.start_probe()
        time.sleep(0.5)
        idle_before = self.sample("idle")
        for slot in range(args.tenants):
            self.start_tenant(slot)
        started = time.monotonic()
        self.run_started = started - self.t0
        end = started + args.duration
        next_sample = started + args.sample_period
        last_tick = started
        interrupted = False
        server_died: int | None = None
        try:
            while (now := time.monotonic()) < end:
                if self.server.poll() is not None:
                    server_died = self.server.returncode
                    break
                self.reap_tenants(replace=True)
                if args.kill_rate > 0 and self.rng.random() < -math.expm1(
                    -args.kill_rate * (now - last_tick)
                ):
                    self.kill_one()
                last_tick = now
                if now >= next_sample:
                    s = self.sample("run")
                    next_sample += args.sample_period * max(
                        1, math.ceil((now - next_sample) / args.sample_period)
                    )
                    progress.update(s, now - started)
                time.sleep(0.02)
        except KeyboardInterrupt:
            interrupted = True
            print(
                "\ninterrupted: stopping the tenants and writing what was measured", file=sys.stderr
            )
        ran = time.monotonic() - started
        progress.close()
        # The end: every tenant SIGKILLed at once; how long until the server has every lease back?
        killed_at_end = 0
        for tenant in self.tenants:
            if tenant is not None and tenant.proc.poll() is None:
                tenant.proc.kill()
                tenant.killed = True
                killed_at_end += 1
        for tenant in self.tenants:
            if tenant is not None:
                tenant.proc.wait()
        self.reap_tenants(replace=False)
        drain: dict[str, Any] = {"tenants_killed": killed_at_end}
        if server_died is None and self.server.poll() is None:
            drain.update(self.drain(idle_before))
        else:
            server_died = self.server.returncode
        shutdown = self.shutdown()
        return {
            "ran_s": round(ran, 2),
            "interrupted": interrupted,
            "server_died": server_died,
            "idle_before": idle_before,
            "drain": drain,
            "shutdown": shutdown,
        }

    def drain(self, idle_before: dict[str, Any]) -> dict[str, Any]:
        assert self.server is not None and self.log is not None
        killed = time.monotonic()
        back_s: float | None = None
        report: Report | None = None
        while time.monotonic() - killed < DRAIN_TIMEOUT_S:
            report, _ = self.log.report(self.server.pid)
            if report is not None and report.leases == 1 and report.lease_lines == 1:
                back_s = time.monotonic() - killed
                break
            time.sleep(0.05)
        time.sleep(0.5)  # let closed connections settle before counting descriptors
        drained = self.sample("drained")
        return {
            "leases_back_s": None if back_s is None else round(back_s, 3),
            "timeout_s": DRAIN_TIMEOUT_S,
            "leases_left": None if report is None else report.leases - 1,  # less the probe's
            "rss_mib": drained["rss_mib"],
            "fds": drained["fds"],
            "threads": drained["threads"],
            "rss_growth_mib": round(drained["rss_mib"] - idle_before["rss_mib"], 1),
            "fds_growth": drained["fds"] - idle_before["fds"],
            "threads_growth": drained["threads"] - idle_before["threads"],
        }

    def shutdown(self) -> dict[str, Any]:
        """Stop the probe (it closes its session), check the server's pool is empty, stop it."""
        assert self.server is not None and self.log is not None
        result: dict[str, Any] = {}
        if self.probe is not None and self.probe.poll() is None:
            self.probe.send_signal(signal.SIGTERM)
            try:
                result["probe_exit"] = self.probe.wait(15)
            except subprocess.TimeoutExpired:
                self.probe.kill()
                result["probe_exit"] = "hung; killed"
            if self.probe_reader is not None:
                self.probe_reader.join(5)
            if self.server.poll() is None:
                time.sleep(0.2)
                report, _ = self.log.report(self.server.pid)
                result["leases_after_probe_closed"] = None if report is None else report.leases
                # With no tenant left a device drops its idle staging buffers and trims the heap:
                # what is still resident now is what the server kept for good.
                time.sleep(1.0)
                figures = proc_status(self.server.pid)
                result["after_probe_closed"] = {
                    k: figures[k] for k in ("rss_mib", "fds", "threads")
                }
        if self.server.poll() is None:
            started = time.monotonic()
            self.server.send_signal(signal.SIGTERM)
            try:
                result["server_exit"] = self.server.wait(20)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
                result["server_exit"] = "hung after SIGTERM; killed"
            result["server_stop_s"] = round(time.monotonic() - started, 3)
        else:
            result["server_exit"] = self.server.returncode
        self.log.join(5)
        return result

    def close(self) -> None:
        self.children.end_all()


# -- the summary ---------------------------------------------------------------------------------
def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per hour."""
    if len(points) < 3:
        return None
    t = np.array([p[0] for p in points], dtype=np.float64)
    v = np.array([p[1] for p in points], dtype=np.float64)
    if np.ptp(t) <= 0:
        return None
    return float(np.polyfit(t, v, 1)[0] * 3600)


def summarize(soak: Soak, outcome: dict[str, Any], duration: float) -> dict[str, Any]:
    run = [s for s in soak.samples if s["phase"] == "run"]
    warmup_s = min(0.1 * duration, 30.0)
    if not run:
        return {"warmup_s": warmup_s, "samples": 0}
    t_run0 = soak.run_started
    after = [s for s in run if s["t"] - t_run0 >= warmup_s] or run

    def median(values: list[float]) -> float:
        return float(np.median(values))

    def figure(key: str) -> dict[str, Any]:
        warm = median([s[key] for s in after[:FLAT_WINDOW]])
        end = median([s[key] for s in run[-FLAT_WINDOW:]])
        slope = slope_per_hour([(s["t"] - t_run0, s[key]) for s in after])
        return {
            "warmup": round(warm, 2),
            "end": round(end, 2),
            "max": round(max(s[key] for s in run), 2),
            "slope_per_hour": None if slope is None else round(slope, 2),
        }

    rss, fds, threads = figure("rss_mib"), figure("fds"), figure("threads")
    rss["flat"] = rss["end"] <= rss["warmup"] * (1 + FLAT_RSS_RATIO) + FLAT_RSS_SLACK_MIB
    fds["flat"] = fds["end"] <= fds["warmup"] + FLAT_FDS_SLACK
    latencies = sorted(soak.run_latencies)
    counts = asdict(soak.counts)
    drain = outcome["drain"]
    leases_not_back = drain.get("leases_back_s") is None and outcome["server_died"] is None
    shutdown = outcome["shutdown"]
    failures = {
        "server_died": outcome["server_died"],
        "server_exit": shutdown.get("server_exit"),
        "data_errors": counts["data_errors"],
        "check_errors": counts["check_errors"],
        "tenant_errors": counts["tenant_errors"],
        "probe_errors": counts["probe_errors"],
        "leases_not_back_after_drain": leases_not_back,
    }
    broke = bool(
        outcome["server_died"] is not None
        or shutdown.get("server_exit") not in (0, None)
        or counts["data_errors"] or counts["check_errors"] or counts["tenant_errors"]
        or counts["probe_errors"] or leases_not_back
    )  # fmt: skip
    leases = [s["leases"] for s in run if s["leases"] is not None]
    reports = [s["report_ms"] for s in run if s["report_ms"] is not None]
    cpu = [s["server_cpu_pct"] for s in run if s["server_cpu_pct"] is not None]
    host = [s["host_cpu_pct"] for s in run if s["host_cpu_pct"] is not None]
    events = soak.log.events if soak.log else {}
    return {
        "run_started_s": round(t_run0, 3),
        "warmup_s": round(warmup_s, 2),
        "samples": len(run),
        "rss_mib": rss,
        "fds": fds,
        "threads": threads,
        "flat_rule": FLAT_RULE,
        "probe": {
            "calls": len(latencies),
            "p50_ms": percentile(latencies, 50) * 1e3 if latencies else None,
            "p99_ms": percentile(latencies, 99) * 1e3 if latencies else None,
            "p999_ms": percentile(latencies, 99.9) * 1e3 if latencies else None,
            "max_ms": latencies[-1] * 1e3 if latencies else None,
            "worst_period_p99_ms": max(
                (s["probe_p99_ms"] for s in run if s["probe_p99_ms"] is not None), default=None
            ),
        },
        "leases": {
            "mean": round(float(np.mean(leases)), 2) if leases else None,
            "max": max(leases, default=None),
            "missing_reports": len(run) - len(leases),
        },
        "report_ms": {
            "p50": percentile(sorted(reports), 50) if reports else None,
            "max": max(reports, default=None),
        },
        "server_cpu_pct_mean": round(float(np.mean(cpu)), 1) if cpu else None,
        "host_cpu_pct_mean": round(float(np.mean(host)), 1) if host else None,
        "counts": counts,
        "server_log": {
            "events": events,
            # sessions given leases that the server never logged as closed or lost: 0 once stopped
            "leased_not_ended": (
                events.get("leased", 0) - events.get("closed", 0) - events.get("lost", 0)
            ),
            "levels": soak.log.levels if soak.log else {},
        },
        "failures": failures,
        "broke": broke,
    }


# -- output --------------------------------------------------------------------------------------
class Progress:
    """A tqdm bar on stderr when tqdm is installed, otherwise one line per sample."""

    def __init__(self, duration: float) -> None:
        self._bar: Any = None
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            self._bar = tqdm(total=round(duration), file=sys.stderr, unit="s", leave=False)

    def update(self, s: dict[str, Any], elapsed: float) -> None:
        c = s["counts"]
        p99 = s["probe_p99_ms"]
        text = (
            f"rss {s['rss_mib']:.1f} MiB, fds {s['fds']}, threads {s['threads']}, "
            f"leases {s['leases']}, probe p99 {'-' if p99 is None else f'{p99:.2f}'} ms | "
            f"started {c['tenants_started']}, killed {c['tenants_killed']}, "
            f"exits {c['tenant_exits']}, closes {c['clean_closes']}, "
            f"refusals {c['capacity_refusals']}, "
            f"errors {c['data_errors'] + c['check_errors'] + c['tenant_errors'] + c['probe_errors']}"
        )
        if self._bar is not None:
            self._bar.update(round(elapsed) - self._bar.n)
            self._bar.set_postfix_str(text, refresh=True)
        else:
            print(f"soak {elapsed:7.1f} s: {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def plot(result: dict[str, Any], path: Path) -> str:
    """RSS, descriptors, leases and the probe's latency against time; returns a note."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: plot skipped (pip install -e '.[bench]')"
    samples = [s for s in result["samples"] if s["phase"] == "run"]
    if not samples:
        return "no samples: plot skipped"
    minutes = result["config"]["duration"] > 300
    scale, unit = (60.0, "min") if minutes else (1.0, "s")
    t = [s["t"] / scale for s in samples]
    warm = result["summary"]["run_started_s"] + result["summary"]["warmup_s"]
    figure, axes = plt.subplots(4, 1, figsize=(11, 11), sharex=True)
    rss, fds, leases, probe = axes
    rss.plot(t, [s["rss_mib"] for s in samples], color="C0")
    rss.set_ylabel("server RSS (MiB)")
    fds.plot(t, [s["fds"] for s in samples], color="C1", label="open descriptors")
    fds.plot(t, [s["threads"] for s in samples], color="C2", label="threads")
    fds.set_ylabel("count")
    fds.legend(loc="upper left")
    leases.plot(t, [s["leases"] for s in samples], color="C3", label="leases (GPU pool)")
    leases.plot(
        t, [s["session_leases"] for s in samples], color="C4", label="of connected sessions"
    )
    leases.plot(t, [s["tenants_alive"] for s in samples], color="C7", label="tenant processes")
    leases.set_ylabel("count")
    leases.legend(loc="upper left")
    probe.plot(t, [s["probe_p50_ms"] for s in samples], color="C5", label="p50")
    probe.plot(t, [s["probe_p99_ms"] for s in samples], color="C6", label="p99")
    probe.set_yscale("log")
    probe.set_ylabel("probe mem_get_info (ms)")
    probe.set_xlabel(f"time since the server started ({unit})")
    probe.legend(loc="upper left")
    for axis in axes:
        axis.axvline(warm / scale, color="grey", linestyle=":", linewidth=1)
        axis.grid(alpha=0.3)
    c = result["summary"]["counts"]
    figure.suptitle(
        f"soak: {result['config']['tenants']} tenants, {result['config']['duration']:g} s, "
        f"{c['tenants_killed']} killed, {c['sessions_opened']} sessions "
        f"(dotted: end of the warm-up)"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return f"wrote {path}"


def print_summary(result: dict[str, Any]) -> None:
    s = result["summary"]
    if not s.get("samples"):
        print("no samples were taken")
        return
    rss, fds, probe, c = s["rss_mib"], s["fds"], s["probe"], s["counts"]
    d = result["outcome"]["drain"]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} ms"

    print(
        f"server RSS {rss['warmup']:.1f} MiB after the {s['warmup_s']:g} s warm-up, "
        f"{rss['end']:.1f} MiB at the end, max {rss['max']:.1f}, slope {rss['slope_per_hour']} "
        f"MiB/h, flat: {rss['flat']}"
    )
    print(
        f"descriptors {fds['warmup']:g} after warm-up, {fds['end']:g} at the end, max "
        f"{fds['max']:g}, slope {fds['slope_per_hour']} /h, flat: {fds['flat']}"
    )
    print(
        f"probe mem_get_info: {probe['calls']} calls, p50 {ms(probe['p50_ms'])}, "
        f"p99 {ms(probe['p99_ms'])}, max {ms(probe['max_ms'])}"
    )
    print(
        f"tenants: {c['tenants_started']} started, {c['tenants_killed']} killed, "
        f"{c['tenant_exits']} exited with a session open, {c['clean_closes']} clean closes; "
        f"{c['sessions_opened']} sessions ({c['reconnects']} reconnects, {c['two_gpu_sessions']} "
        f"on 2 GPUs), {c['capacity_refusals']} capacity refusals; {c['operations']} operations, "
        f"{c['bytes_verified'] / 2**30:.2f} GiB verified, {c['launches']} launches"
    )
    if "leases_back_s" in d:
        back = d["leases_back_s"]
        print(
            f"drain: {d['tenants_killed']} tenants killed at the end, every lease back after "
            + (f"{back * 1e3:.0f} ms" if back is not None else f"more than {d['timeout_s']:g} s")
            + f"; then RSS {d['rss_mib']:.1f} MiB ({d['rss_growth_mib']:+.1f} since before the "
            f"tenants), descriptors {d['fds']} ({d['fds_growth']:+d}), threads {d['threads']} "
            f"({d['threads_growth']:+d})"
        )
    after = result["outcome"]["shutdown"].get("after_probe_closed")
    if after:
        before = result["outcome"]["idle_before"]
        print(
            f"every session closed: RSS {after['rss_mib']:.1f} MiB "
            f"({after['rss_mib'] - before['rss_mib']:+.1f} since before the tenants), "
            f"descriptors {after['fds']}, threads {after['threads']}"
        )
    print(
        f"CPU: the server {s['server_cpu_pct_mean']} % of one CPU on average, the machine "
        f"{s['host_cpu_pct_mean']} % busy ({os.cpu_count()} CPUs)"
    )
    f = s["failures"]
    print(
        f"failures: data errors {f['data_errors']}, check errors {f['check_errors']}, "
        f"tenant errors {f['tenant_errors']}, probe errors {f['probe_errors']}, "
        f"server died: {f['server_died']}, server exit {f['server_exit']}, leases not back: "
        f"{f['leases_not_back_after_drain']}"
    )
    for error in result["errors"][:10]:
        print(f"  at {error['t']} s, {error['who']}: {error['text']}")


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the soak the way Ctrl-C does, and so does SIGINT even where the shell
    started it with SIGINT ignored (a background job)."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous: dict[int, Any] = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, action in previous.items():
            signal.signal(sig, signal.SIG_DFL if action is None else action)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--tenant"]:
        tenant_main(json.loads(argv[1]))
    if argv[:1] == ["--probe"]:
        return probe_main(argv[1], int(argv[2]), float(argv[3]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=3600.0, help="seconds (default: 3600)")
    parser.add_argument("--tenants", type=int, default=16, help="client processes (default: 16)")
    parser.add_argument(
        "--kill-rate", type=float, default=0.2, help="tenants SIGKILLed per second (default: 0.2)"
    )
    parser.add_argument(
        "--sample-period", type=float, default=1.0, help="seconds between samples (default: 1)"
    )
    parser.add_argument(
        "--probe-interval", type=float, default=0.005,
        help="seconds between the probe's calls (default: 0.005)",
    )  # fmt: skip
    parser.add_argument(
        "--session-max", type=float, default=8.0,
        help="a tenant's session lasts 0.5 s to this many seconds (default: 8)",
    )  # fmt: skip
    parser.add_argument(
        "--think-ms", type=float, default=10.0,
        help="a tenant waits 0 to this many ms between operations (default: 10)",
    )  # fmt: skip
    parser.add_argument(
        "--exit-probability", type=float, default=0.2,
        help="chance a session ends with its process, not close() (default: 0.2)",
    )  # fmt: skip
    parser.add_argument("--gpus", type=int, default=2, help="NumPy devices served (default: 2)")
    parser.add_argument("--seed", type=int, default=None, help="the soak's random seed")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where the results go")
    parser.add_argument(
        "--server-log", type=Path, default=None, help="also keep the server's whole log here"
    )
    args = parser.parse_args(argv)
    if args.tenants < 1 or args.duration <= 0 or args.sample_period <= 0:
        parser.error("--tenants, --duration and --sample-period must be positive")
    if args.seed is None:
        args.seed = random.SystemRandom().getrandbits(32)
    args.output.mkdir(parents=True, exist_ok=True)
    soak = Soak(args)
    progress = Progress(args.duration)
    try:
        with terminate_as_interrupt():
            outcome = soak.run(progress)
    finally:
        progress.close()
        soak.close()
    config = {
        key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
    }
    config["server"] = soak.server_argv()
    result: dict[str, Any] = {
        "config": config,
        "summary": summarize(soak, outcome, args.duration),
        "outcome": outcome,
        "errors": soak.errors,
        "server_notable_log": soak.log.notable if soak.log else [],
        "samples": soak.samples,
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "numpy": np.__version__,
        },
    }
    (args.output / "soak.json").write_text(json.dumps(result, indent=1))
    print_summary(result)
    print(plot(result, args.output / "soak.png"))
    print(f"wrote {args.output / 'soak.json'}")
    if result["summary"].get("broke"):
        print("the soak broke: see failures above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
