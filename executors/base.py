"""The executor interface: one ``Executor`` per GPU, one ``Tenant`` per lease on it.

The interface is shaped for asynchronous GPUs. Every device operation is *submitted* to the
executor and runs later on the executor's own worker thread (never on the event loop): each
tenant's work in the order it was submitted, tenants interleaved by the fair scheduler.
Calls with asynchronous CUDA semantics are submitted with ``wants_reply=False``: nobody waits for
them, so their errors are kept on the tenant (sticky) and delivered to the next submission that
does want a reply, exactly as CUDA reports asynchronous errors at the next synchronising call.

Handles (pointers, streams, events, modules, functions) are plain ints private to a tenant.
Stream 0 is the tenant's default stream. Module 0 is the built-in kernel library.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import InvalidHandle, InvalidValue
from .histogram import HistogramSnapshot

# struct codes a kernel argument may have; 'P' is a device pointer (an unsigned 64-bit address).
ARG_TYPE_CODES = frozenset("bBhHiIqQfdP")
DEFAULT_STREAM = 0
BUILTIN_MODULE = 0
# cudaMalloc returns 256-byte-aligned addresses; every executor aligns and charges allocations in
# this unit, so a tenant's quota (and its kernels' alignment) behaves the same on all of them.
ALIGNMENT = 256


def aligned_size(nbytes: int) -> int:
    """``nbytes`` rounded up to ``ALIGNMENT``: what an allocation of that size is charged."""
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def arg_struct_format(arg_types: str) -> str:
    """The ``struct`` format that packs and unpacks arguments of ``arg_types``.

    Arguments travel little-endian with standard sizes and no padding, but ``struct`` accepts 'P'
    only in native mode, so a device pointer is packed as 'Q' (unsigned 64-bit) instead. This is
    the executors' statement of docs/PROTOCOL.md's section 7; the protocol's own is
    ``bitfusion_net.protocol.messages.kernel_args_format`` (neither package may import the
    other), and ``tests/protocol/test_spec_document.py`` holds the two to each other.
    """
    return "<" + arg_types.replace("P", "Q")


@dataclass(frozen=True)
class DeviceProperties:
    """What a client may know about a device without asking it again."""

    name: str
    total_memory: int
    executor: str  # "numpy" or "pycuda"
    max_threads_per_block: int = 1024
    max_block: tuple[int, int, int] = (1024, 1024, 64)
    max_grid: tuple[int, int, int] = (2**31 - 1, 65535, 65535)
    max_shared_memory_per_block: int = 48 * 1024


def check_launch(
    props: DeviceProperties,
    grid: tuple[int, int, int],
    block: tuple[int, int, int],
    shared_mem: int,
) -> None:
    """Raise ``InvalidValue`` for a launch geometry the device cannot run."""
    # Written out rather than looped: this runs for every kernel of every tenant.
    (gx, gy, gz), (bx, by, bz), max_grid, max_block = grid, block, props.max_grid, props.max_block
    if not (1 <= gx <= max_grid[0] and 1 <= gy <= max_grid[1] and 1 <= gz <= max_grid[2]):
        raise InvalidValue(f"launch: grid {grid} is outside 1..{max_grid}")
    if not (1 <= bx <= max_block[0] and 1 <= by <= max_block[1] and 1 <= bz <= max_block[2]):
        raise InvalidValue(f"launch: block {block} is outside 1..{max_block}")
    if bx * by * bz > props.max_threads_per_block:
        raise InvalidValue(
            f"launch: block {block} has more than {props.max_threads_per_block} threads"
        )
    if not 0 <= shared_mem <= props.max_shared_memory_per_block:
        raise InvalidValue(
            f"launch: shared memory {shared_mem} is outside "
            f"0..{props.max_shared_memory_per_block} bytes"
        )


@dataclass(frozen=True)
class FunctionInfo:
    """A kernel a tenant may launch: its handle and its argument types (struct codes)."""

    handle: int
    arg_types: str


@dataclass
class AsyncFailure:
    """The first error of a call nobody waited for, kept until a call that waits can report it."""

    error: BaseException
    tag: int  # whatever the submitter gave to identify the call (the server uses the request id)
    later_failures: int = 0  # further no-reply calls that failed before the error was reported


class DeferredError(Exception):
    """Delivered to a reply-bearing submission in place of its result: an earlier call failed."""

    def __init__(self, failure: AsyncFailure) -> None:
        super().__init__(str(failure.error))
        self.failure = failure


Completion = Callable[[Any, BaseException | None], None]


class MemoryBudget:
    """Device memory promised to one lease. The tenants opened on it share it: several programs
    attached to one reservation at once each have their own context and allocations, and what
    any of them holds counts against the lease's one limit. Changed on the device's worker
    thread only (every tenant of a budget is on the same device); read from anywhere."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.tenants = 0  # open tenants on it; the executor promises ``limit`` while any is


@dataclass(frozen=True)
class TenantUsage:
    """A tenant's account on one device: measured device time, waiting, work done, memory."""

    device_time: float  # seconds its work occupied the device
    queue_wait: float  # seconds its work waited to start, summed over operations
    operations: int  # operations run (kernels, copies, memsets, ...)
    kernels: int  # kernels launched
    memory_used: int
    memory_high_water: int


class Tenant(ABC):
    """One tenant's context on one device.

    Every method except ``staging_buffer`` and ``return_staging`` runs on the executor's worker
    thread, in the tenant's submission order, or, for the queries ``Executor.run_if_idle`` answers
    at once, on the caller's thread while nothing of the tenant's runs.
    Methods raise the ``executors.errors`` classes for anything the caller got wrong.
    """

    def __init__(
        self,
        memory_limit: int,
        weight: float,
        cap: float | None = None,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.budget = budget if budget is not None else MemoryBudget(memory_limit)
        self.memory_limit = self.budget.limit
        self.weight = weight  # compute weight in fair sharing
        self.cap = cap  # hard limit on the share of device time, or None (work-conserving)
        # Kept up to date by the implementation, read by anyone (plain int reads need no lock).
        self.memory_used = 0
        self.memory_high_water = 0
        self.kernels_launched = 0
        self._async_failure: AsyncFailure | None = None
        self._failure_lock = threading.Lock()

    # -- memory accounting (on the worker thread) ---------------------------------------------
    def _fits(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit in the lease's limit (shared with its other tenants)."""
        return self.budget.used + nbytes <= self.budget.limit

    def _in_use(self) -> str:
        """What holds the lease's memory, for out-of-memory messages."""
        budget = self.budget
        shared = f" ({self.memory_used} by this tenant)" if self.memory_used != budget.used else ""
        return f"{budget.used} of the lease's {budget.limit} bytes in use{shared}"

    def _charge(self, nbytes: int) -> None:
        self.memory_used += nbytes
        self.budget.used += nbytes
        self.memory_high_water = max(self.memory_high_water, self.memory_used)

    def _uncharge(self, nbytes: int) -> None:
        self.memory_used -= nbytes
        self.budget.used -= nbytes

    def mem_get_info(self) -> tuple[int, int]:
        """(free, total) of the lease's memory limit."""
        return self.budget.limit - self.budget.used, self.budget.limit

    # -- sticky asynchronous errors (used by the worker) ---------------------------------------
    def record_async_failure(self, error: BaseException, tag: int) -> None:
        with self._failure_lock:
            if self._async_failure is None:
                self._async_failure = AsyncFailure(error, tag)
            else:
                self._async_failure.later_failures += 1

    def take_async_failure(self) -> AsyncFailure | None:
        with self._failure_lock:
            failure, self._async_failure = self._async_failure, None
            return failure

    # -- host side ------------------------------------------------------------------------------
    @abstractmethod
    def staging_buffer(self, nbytes: int) -> memoryview:
        """A writable host buffer of ``nbytes`` for a copy's payload (pinned on GPUs).

        Called on the event loop thread while a payload arrives, so it must be cheap.
        """

    def return_staging(self, buffer: memoryview) -> None:  # noqa: B027 - optional by design
        """Hand back a buffer from ``staging_buffer`` once its copy is done, for reuse (any
        thread). Optional: a buffer never returned is simply freed by the garbage collector."""

    # -- memory ---------------------------------------------------------------------------------
    @abstractmethod
    def mem_alloc(self, nbytes: int) -> int: ...

    @abstractmethod
    def mem_free(self, ptr: int) -> None: ...

    @abstractmethod
    def memcpy_htod(self, dst: int, src: memoryview, stream: int) -> None: ...

    @abstractmethod
    def memcpy_dtoh(self, dst: memoryview, src: int, stream: int) -> None:
        """Fill ``dst`` (all of it) from device memory; returns when the bytes are in ``dst``."""

    @abstractmethod
    def memcpy_dtod(self, dst: int, src: int, nbytes: int, stream: int) -> None: ...

    @abstractmethod
    def memset(self, ptr: int, value: int, itemsize: int, count: int, stream: int) -> None:
        """Set ``count`` elements of ``itemsize`` bytes (1, 2 or 4) to ``value``; ``ptr`` must
        be aligned to ``itemsize`` (``InvalidValue`` otherwise)."""

    # -- the device -----------------------------------------------------------------------------
    @abstractmethod
    def device_attributes(self) -> dict[int, int]:
        """The device's CUDA attributes: ``CUdevice_attribute`` number -> value (a C int).

        They never change. A query: it reads what the executor keeps, never the device, so it
        may run on the caller's thread (``Executor.run_if_idle``).
        """

    # -- code -----------------------------------------------------------------------------------
    @abstractmethod
    def module_load(self, image: bytes) -> int: ...

    @abstractmethod
    def module_unload(self, module: int) -> None: ...

    @abstractmethod
    def get_function(self, module: int, name: str, arg_types: str | None) -> FunctionInfo:
        """Look up a kernel. For built-ins (module 0) ``arg_types`` may be None: they declare theirs."""

    @abstractmethod
    def module_get_global(self, module: int, name: str) -> tuple[int, int]:
        """(device address, size in bytes) of global variable ``name`` of ``module``
        (``cuModuleGetGlobal``); copies and kernels may then address that range.
        ``InvalidHandle`` for a module that is not loaded, ``InvalidValue`` for a name the
        module has no global of (the built-in library, module 0, has none)."""

    @abstractmethod
    def launch(
        self,
        function: int,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        shared_mem: int,
        stream: int,
        args: bytes,
    ) -> None:
        """Launch a kernel; ``args`` is its arguments packed little-endian by its ``arg_types``."""

    # -- streams and events ---------------------------------------------------------------------
    @abstractmethod
    def stream_create(self) -> int: ...

    @abstractmethod
    def stream_destroy(self, stream: int) -> None: ...

    @abstractmethod
    def stream_synchronize(self, stream: int) -> None: ...

    @abstractmethod
    def stream_query(self, stream: int) -> bool:
        """Whether all work submitted to ``stream`` has completed (a query, as
        ``stream_synchronize`` is)."""

    @abstractmethod
    def stream_wait_event(self, stream: int, event: int) -> None:
        """Make work submitted to ``stream`` from now on wait until ``event`` has been reached
        (an event never recorded has been)."""

    @abstractmethod
    def event_create(self) -> int: ...

    @abstractmethod
    def event_destroy(self, event: int) -> None: ...

    @abstractmethod
    def event_record(self, event: int, stream: int) -> None: ...

    @abstractmethod
    def event_synchronize(self, event: int) -> None: ...

    @abstractmethod
    def event_elapsed_ms(self, start: int, end: int) -> float: ...

    @abstractmethod
    def event_query(self, event: int) -> bool:
        """Whether ``event`` has been reached (True for an event never recorded, as in CUDA;
        a query, as ``event_synchronize`` is)."""

    @abstractmethod
    def synchronize(self) -> None:
        """Wait until all of this tenant's work on the device has finished."""

    @abstractmethod
    def release(self) -> None:
        """Free everything the tenant holds. Runs after all its queued work; must not raise."""


class SerialTenant(Tenant):
    """Bookkeeping shared by tenants of devices that finish each operation before starting the
    next (both executors here): handles, streams, events' existence and argument checks.

    On such a device a tenant's streams all run as one FIFO (stronger ordering than CUDA promises,
    and correct), so a stream is a handle to check and synchronising has nothing to wait for.
    Handles come from one counter for streams, events and functions; 0 is never issued.
    """

    def __init__(
        self,
        memory_limit: int,
        weight: float,
        cap: float | None = None,
        budget: MemoryBudget | None = None,
    ) -> None:
        super().__init__(memory_limit, weight, cap, budget)
        self._next_handle = 1
        self._streams: set[int] = set()
        self._events: dict[int, Any] = {}  # handle -> whatever the device keeps for it

    def _new_handle(self) -> int:
        handle = self._next_handle
        self._next_handle += 1
        return handle

    def _check_alive(self) -> None:
        """Raise if the tenant can no longer work (a device may lose a tenant's context)."""

    def _check_stream(self, stream: int) -> None:
        if stream != DEFAULT_STREAM and stream not in self._streams:
            raise InvalidHandle(f"stream {stream} is not one of this tenant's")

    def _check_event(self, event: int) -> None:
        if event not in self._events:
            raise InvalidHandle(f"event {event} is not one of this tenant's")

    @staticmethod
    def _check_memset(ptr: int, itemsize: int, count: int) -> None:
        if itemsize not in (1, 2, 4):
            raise InvalidValue(f"memset: item size must be 1, 2 or 4 bytes, got {itemsize}")
        if count < 0:
            raise InvalidValue(f"memset: count must not be negative, got {count}")
        if ptr % itemsize:
            raise InvalidValue(
                f"memset: a {8 * itemsize}-bit memset needs a {itemsize}-byte-aligned pointer, "
                f"got {ptr:#x}"
            )

    def stream_create(self) -> int:
        self._check_alive()
        stream = self._new_handle()
        self._streams.add(stream)
        return stream

    def stream_destroy(self, stream: int) -> None:
        if stream == DEFAULT_STREAM:
            raise InvalidValue("the default stream cannot be destroyed")
        self._check_stream(stream)
        self._streams.discard(stream)

    def stream_synchronize(self, stream: int) -> None:
        self._check_stream(stream)
        self._check_alive()

    def stream_query(self, stream: int) -> bool:
        """Always done: what was submitted before finished before this runs."""
        self.stream_synchronize(stream)
        return True

    def stream_wait_event(self, stream: int, event: int) -> None:
        """Already holds: the tenant's streams run as one FIFO, so everything recorded before
        has been reached by the time later work starts. Only the handles are checked."""
        self._check_stream(stream)
        self._check_event(event)
        self._check_alive()

    def event_synchronize(self, event: int) -> None:
        self._check_event(event)
        self._check_alive()

    def event_query(self, event: int) -> bool:
        """Always reached: an event completes as it is recorded (or was never recorded)."""
        self.event_synchronize(event)
        return True

    def synchronize(self) -> None:
        """Nothing to wait for: each operation finished on the worker before the next began."""
        self._check_alive()


class Executor(ABC):
    """One physical (or emulated) GPU, shared by tenants.

    ``submit`` is the only way work reaches the device. It is thread-safe and never blocks.
    """

    properties: DeviceProperties

    @abstractmethod
    def open_tenant(
        self,
        memory_limit: int,
        weight: float,
        cap: float | None = None,
        budget: MemoryBudget | None = None,
    ) -> Tenant:
        """Open a context with a hard memory limit, a compute weight and optionally a hard cap
        on its share of device time (even when the device is otherwise idle). With ``budget``,
        the limit is the budget's, shared with the other tenants opened on it."""

    @abstractmethod
    def queued(self, tenant: Tenant) -> int:
        """How many of the tenant's operations wait to run (safe to call from any thread)."""

    @abstractmethod
    def usage(self, tenant: Tenant) -> TenantUsage:
        """What the tenant has used so far (safe to call from any thread)."""

    @abstractmethod
    def reweigh(self, tenant: Tenant, weight: float, cap: float | None = None) -> None:
        """Change an open tenant's compute weight and cap from now on (any thread)."""

    @abstractmethod
    def busy_time(self) -> float:
        """Seconds of device time spent on any tenant's work since start (any thread)."""

    @abstractmethod
    def queue_waits(self) -> HistogramSnapshot:
        """How long operations waited between submission and start, so far (any thread)."""

    @abstractmethod
    def alive(self) -> bool:
        """Whether the device takes work (its worker runs; any thread)."""

    @abstractmethod
    def submit(
        self,
        tenant: Tenant,
        op: Callable[[], Any],
        *,
        wants_reply: bool,
        tag: int = 0,
        on_done: Completion | None = None,
    ) -> None:
        """Run ``op`` on the worker thread after everything this tenant submitted before it.

        ``wants_reply=True``: if an earlier no-reply call of this tenant failed, ``op`` does not run
        and ``on_done`` gets a ``DeferredError``; otherwise it gets ``op``'s result or exception.
        ``wants_reply=False``: an exception is kept on the tenant, tagged with ``tag``.
        ``on_done(result, error)`` runs on the worker thread and must be quick.
        """

    def call(self, tenant: Tenant, op: Callable[[], Any], timeout: float | None = None) -> Any:
        """Submit ``op`` with a reply and wait for it: its result, or its exception raised here.

        For in-process users (benchmarks, tests); the server never blocks on the device. Raises
        ``TimeoutError`` if no answer comes within ``timeout`` seconds.
        """
        done = threading.Event()
        outcome: list[tuple[Any, BaseException | None]] = []

        def on_done(result: Any, error: BaseException | None) -> None:
            outcome.append((result, error))
            done.set()

        self.submit(tenant, op, wants_reply=True, on_done=on_done)
        if not done.wait(timeout):
            raise TimeoutError(
                f"the {self.properties.executor} device did not answer in {timeout} s"
            )
        result, error = outcome[0]
        if error is not None:
            raise error
        return result

    def run_if_idle(self, tenant: Tenant, op: Callable[[], Any]) -> tuple[bool, Any]:
        """Run a query on the calling thread when the tenant has no work queued or running.

        A call that only reads state (memory info, accounting) or waits for nothing (a
        synchronize with nothing to wait for) is then answered without a hop to the worker thread.
        Returns (True, result) if it ran (raising what ``op`` raised, or the tenant's pending
        ``DeferredError``), (False, None) if the caller must ``submit`` it. Executors whose
        device may still be busy when the worker is idle (asynchronous GPUs) never run it here.
        """
        return False, None

    @abstractmethod
    def close_tenant(self, tenant: Tenant, on_done: Callable[[], None] | None = None) -> None:
        """Release the tenant: its queued work is dropped, what is running finishes, then its
        memory is freed; ``on_done`` runs once the memory is back."""

    @abstractmethod
    def close(self) -> None:
        """Stop the worker after the queued work; release whatever tenants remain."""
