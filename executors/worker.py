"""The device worker: the one thread that submits work to a device, in the scheduler's order.

Every operation of every tenant goes through one scheduler (``FairScheduler`` by default, FIFO as
the baseline to measure it against). The worker runs one operation at a time, measures how long it
occupied the device on its own clock, and charges that to the tenant: on the NumPy device an
operation runs synchronously, so wall time on the worker *is* device time.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .base import (
    Completion,
    DeferredError,
    DeviceProperties,
    Executor,
    MemoryBudget,
    Tenant,
    TenantUsage,
)
from .errors import DeviceError, DeviceOutOfMemory, InvalidHandle, InvalidValue
from .histogram import Histogram, HistogramSnapshot
from .scheduler import Dispatch, Scheduler, make_scheduler

log = logging.getLogger(__name__)

SCHEDULERS = ("fair", "fifo")
# How long a device must have had no tenant before the host memory kept for tenants goes back
# (``_host_memory_idle``: a garbage collection and a heap trim, about 5 ms with the interpreter
# lock held, which every tenant of every device would wait for if each departure paid it).
IDLE_CLEANUP_S = 1.0

# (operation, wants a reply, tag, completion)
_Job = tuple[Callable[[], Any], bool, int, Completion | None]


def _precise_sleeps() -> None:
    """Let this thread's short sleeps end on time: Linux adds up to 50 us of timer slack to every
    sleep by default, which would distort device-time measurements of short kernels."""
    if sys.platform.startswith("linux"):
        try:
            pr_set_timerslack = 29
            ctypes.CDLL(None).prctl(pr_set_timerslack, 1, 0, 0, 0)
        except (OSError, AttributeError):  # not fatal: sleeps are merely less precise
            log.debug("could not reduce timer slack", exc_info=True)


def _drop_frames(error: BaseException) -> None:
    """Cut an error (and those it chains to) loose from the frames it was raised through.

    The error travels on to other threads (the event loop, the next synchronising call); its
    traceback would keep the operation's locals alive there, and a GPU object freed on a thread
    other than its context's cannot be freed at all (PyCUDA leaks it, with a warning).
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.__traceback__ = None
        current = current.__cause__ or current.__context__


class DeviceWorker:
    """A thread that runs tenants' operations one at a time, in the scheduler's order, applying
    the sticky-error rule and charging each tenant the device time it used."""

    def __init__(
        self,
        name: str,
        scheduling: str = "fair",
        clock: Callable[[], float] = time.perf_counter,
        on_exit: Callable[[], None] | None = None,
    ) -> None:
        if scheduling not in SCHEDULERS:
            raise ValueError(f"unknown scheduling {scheduling!r}; choose from {SCHEDULERS}")
        self._scheduler: Scheduler[_Job] = make_scheduler(scheduling)
        self._clock = clock
        self._on_exit = on_exit  # runs on the worker thread as it stops (thread-bound cleanup)
        self._ready = threading.Condition()
        self._stopping = False
        self._stopped = False
        self._running: tuple[Tenant, float] | None = None  # whose job is on the device, since when
        self._busy = 0.0  # seconds of device time all tenants' finished jobs took
        self._waits = Histogram()  # how long each job waited to start (written by this thread)
        self._idle_task: tuple[float, Callable[[], None]] | None = None  # (due, what)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- tenants --------------------------------------------------------------------------------
    def add_tenant(self, tenant: Tenant) -> None:
        with self._ready:
            self._scheduler.add(tenant, tenant.weight, tenant.cap, self._clock())

    def reweigh(self, tenant: Tenant, weight: float, cap: float | None) -> None:
        with self._ready:
            if self._scheduler.has(tenant):
                self._scheduler.reweigh(tenant, weight, cap, self._clock())
                tenant.weight, tenant.cap = weight, cap

    def remove_tenant(self, tenant: Tenant) -> None:
        """Forget a tenant; anything it still had queued is answered with an error."""
        with self._ready:
            leftovers = self._scheduler.remove(tenant)
        self._refuse(leftovers)

    def drop_queued(self, tenant: Tenant) -> None:
        """Discard the tenant's queued work (its client is gone); what runs now finishes."""
        with self._ready:
            leftovers = self._scheduler.clear(tenant)
        self._refuse(leftovers)

    @staticmethod
    def _refuse(jobs: list[_Job]) -> None:
        for _op, _wants_reply, _tag, on_done in jobs:
            if on_done is not None:
                on_done(None, DeviceError("the tenant was closed"))

    def queued(self, tenant: Tenant) -> int:
        with self._ready:
            return self._scheduler.queued(tenant)

    def run_if_idle(self, tenant: Tenant, op: Callable[[], Any]) -> tuple[bool, Any]:
        """See ``Executor.run_if_idle``; holds the scheduler lock so nothing of the tenant starts."""
        with self._ready:
            running = self._running is not None and self._running[0] is tenant
            if self._stopped or running or self._scheduler.queued(tenant):
                return False, None
            if not self._scheduler.has(tenant):
                raise InvalidHandle("the tenant is closed")
            failure = tenant.take_async_failure()
            if failure is not None:
                raise DeferredError(failure)
            result = op()
            # Its answer leaves now: a closed-loop tenant may be back with work in a moment.
            self._scheduler.replied(tenant, self._clock())
            return True, result

    def usage(self, tenant: Tenant) -> TenantUsage:
        """The tenant's account, including the part of a job it is running right now (so that
        device time sampled at any moment is exact, not rounded down to whole jobs)."""
        with self._ready:
            used = self._scheduler.usage(tenant)
            running = 0.0
            if self._running is not None and self._running[0] is tenant:
                running = self._clock() - self._running[1]
            return TenantUsage(
                used.device_time + running,
                used.queue_wait,
                used.operations,
                tenant.kernels_launched,
                tenant.memory_used,
                tenant.memory_high_water,
            )

    def run_when_idle(self, task: Callable[[], None], after: float) -> None:
        """Run ``task`` on the worker thread once the device has had nothing to run for
        ``after`` seconds; any job dispatched before then cancels it."""
        with self._ready:
            self._idle_task = (self._clock() + after, task)
            self._ready.notify()

    def busy_time(self) -> float:
        """Seconds the device has spent on work since it started (any tenant's, running now
        included): utilisation over an interval is the difference of two samples over its length."""
        with self._ready:
            running = self._clock() - self._running[1] if self._running is not None else 0.0
            return self._busy + running

    def queue_waits(self) -> HistogramSnapshot:
        """How long jobs waited between submission and start, so far (any thread)."""
        return self._waits.snapshot()

    def alive(self) -> bool:
        """Whether the worker thread runs and takes work."""
        return self._thread.is_alive() and not self._stopping

    # -- work -----------------------------------------------------------------------------------
    def submit(
        self,
        tenant: Tenant,
        op: Callable[[], Any],
        wants_reply: bool,
        tag: int,
        on_done: Completion | None,
    ) -> None:
        error: DeviceError
        with self._ready:
            if self._stopped:
                error = DeviceError("the device has shut down")
            elif not self._scheduler.has(tenant):
                error = InvalidHandle("the tenant is closed")
            else:
                self._scheduler.push(tenant, (op, wants_reply, tag, on_done), self._clock())
                self._ready.notify()
                return
        if on_done is not None:
            on_done(None, error)

    def stop(self, timeout: float | None = None) -> None:
        """Run what is queued, then stop; later submissions fail with ``DeviceError``."""
        with self._ready:
            self._stopping = True
            self._ready.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        _precise_sleeps()
        try:
            self._serve()
        finally:
            if self._on_exit is not None:
                try:
                    self._on_exit()
                except Exception:  # noqa: BLE001 - the thread ends either way; say why
                    log.exception("device worker clean-up failed")

    def _serve(self) -> None:
        clock, scheduler, ready = self._clock, self._scheduler, self._ready
        while True:
            idle_work: Callable[[], None] | None = None
            with ready:
                while True:
                    choice = scheduler.pop(clock())
                    if isinstance(choice, Dispatch):
                        self._idle_task = None  # busy again: whoever armed it re-arms it
                        tenant: Tenant = choice.key  # type: ignore[assignment]
                        started = clock()
                        self._running = (tenant, started)  # under the lock that popped it
                        break
                    if self._stopping and not len(scheduler):
                        self._stopped = True
                        return
                    # None: nothing queued. A float: only capped tenants have work, and the
                    # first of them may run again in that many seconds.
                    if choice is None and self._idle_task is not None:
                        due, task = self._idle_task
                        if clock() >= due:
                            self._idle_task, idle_work = None, task
                            break
                        choice = due - clock()
                    ready.wait(choice)
            if idle_work is not None:
                try:
                    idle_work()
                except Exception:  # noqa: BLE001 - house-keeping must not stop the device
                    log.exception("idle house-keeping failed")
                continue
            assert isinstance(choice, Dispatch)
            self._waits.observe(choice.waited)
            op, wants_reply, tag, on_done = choice.job
            self._execute(tenant, op, wants_reply, tag, on_done)
            finished = clock()
            with ready:
                self._running = None
                self._busy += finished - started
                scheduler.charge(tenant, finished - started, finished, replied=wants_reply)

    @staticmethod
    def _execute(
        tenant: Tenant,
        op: Callable[[], Any],
        wants_reply: bool,
        tag: int,
        on_done: Completion | None,
    ) -> None:
        result: Any = None
        error: BaseException | None = None
        failure = tenant.take_async_failure() if wants_reply else None
        if failure is not None:
            error = DeferredError(failure)
        else:
            try:
                result = op()
            except Exception as exc:  # noqa: BLE001 - the tenant's error, never the worker's
                if not isinstance(exc, DeviceError):  # not the tenant's doing: a bug of ours
                    log.error("device operation failed unexpectedly", exc_info=exc)
                _drop_frames(exc)
                if not wants_reply:
                    tenant.record_async_failure(exc, tag)
                error = exc
        if on_done is not None:
            try:
                on_done(result, error)
            except Exception:  # a broken callback must not stop the device for everyone
                log.exception("completion callback failed")


class WorkerExecutor(Executor):
    """An executor whose device work runs on one ``DeviceWorker`` thread."""

    properties: DeviceProperties

    def __init__(self, worker_name: str, scheduling: str = "fair") -> None:
        self._worker = DeviceWorker(worker_name, scheduling, on_exit=self._worker_exiting)
        self._tenants: set[Tenant] = set()
        self._tenants_lock = threading.Lock()
        self._committed = 0  # sum of the open tenants' memory limits
        self._committed_lock = threading.Lock()

    def _admit(
        self, memory_limit: int, weight: float, cap: float | None, budget: MemoryBudget | None
    ) -> MemoryBudget:
        """Check a new tenant's terms and promise its budget (a new one of ``memory_limit``, or
        the one it shares) to it; returns the budget.

        The sum of the open budgets' limits never exceeds the device's memory, so a tenant's
        limit is a guarantee: an allocation within it never fails because a neighbour used the
        device up. The promise is taken back when the budget's last tenant is released.
        """
        if budget is None:
            budget = MemoryBudget(memory_limit)
        memory_limit = budget.limit
        if memory_limit < 0:
            raise InvalidValue(f"memory limit must not be negative, got {memory_limit}")
        if not weight > 0:
            raise InvalidValue(f"compute weight must be positive, got {weight}")
        if cap is not None and not 0 < cap <= 1:
            raise InvalidValue(f"a cap on device time must be in (0, 1], got {cap}")
        total = self.properties.total_memory
        with self._committed_lock:
            if budget.tenants == 0:
                if self._committed + memory_limit > total:
                    raise DeviceOutOfMemory(
                        f"device out of memory: a tenant limit of {memory_limit} bytes does not "
                        f"fit, {self._committed} of {total} bytes are promised to open tenants"
                    )
                self._committed += memory_limit
            budget.tenants += 1
        return budget

    def _register(self, tenant: Tenant) -> Tenant:
        self._worker.add_tenant(tenant)
        with self._tenants_lock:
            self._tenants.add(tenant)
        return tenant

    def submit(
        self,
        tenant: Tenant,
        op: Callable[[], Any],
        *,
        wants_reply: bool,
        tag: int = 0,
        on_done: Completion | None = None,
    ) -> None:
        self._worker.submit(tenant, op, wants_reply, tag, on_done)

    def usage(self, tenant: Tenant) -> TenantUsage:
        return self._worker.usage(tenant)

    def busy_time(self) -> float:
        return self._worker.busy_time()

    def queue_waits(self) -> HistogramSnapshot:
        return self._worker.queue_waits()

    def alive(self) -> bool:
        return self._worker.alive()

    def reweigh(self, tenant: Tenant, weight: float, cap: float | None = None) -> None:
        if not weight > 0:
            raise InvalidValue(f"compute weight must be positive, got {weight}")
        if cap is not None and not 0 < cap <= 1:
            raise InvalidValue(f"a cap on device time must be in (0, 1], got {cap}")
        self._worker.reweigh(tenant, weight, cap)

    def queued(self, tenant: Tenant) -> int:
        return self._worker.queued(tenant)

    # True for devices where an operation has finished when the worker returns from it, so a
    # tenant with nothing queued or running has nothing in flight (see ``run_if_idle``).
    completes_synchronously = False

    def run_if_idle(self, tenant: Tenant, op: Callable[[], Any]) -> tuple[bool, Any]:
        if not self.completes_synchronously:
            return False, None
        return self._worker.run_if_idle(tenant, op)

    def close_tenant(self, tenant: Tenant, on_done: Callable[[], None] | None = None) -> None:
        # Whoever would have read the results of its queued work is gone: skip it, free now.
        self._worker.drop_queued(tenant)
        self._release_after_queued(tenant, on_done)

    def _release_after_queued(self, tenant: Tenant, on_done: Callable[[], None] | None) -> None:
        last = False  # the device's last tenant: its idle host memory goes back afterwards

        def release() -> None:
            nonlocal last
            with self._tenants_lock:
                if tenant not in self._tenants:
                    return
                self._tenants.discard(tenant)
                last = not self._tenants
            try:
                tenant.release()
            except Exception:  # noqa: BLE001 - release must not raise; if it does, say so
                log.exception("releasing a tenant failed")
            finally:
                self._tenant_released(tenant)

        def finished(_result: Any, _error: BaseException | None) -> None:
            # Runs on the worker after the release (or at once if the worker has stopped, in
            # which case close() released every tenant itself).
            self._worker.remove_tenant(tenant)
            if on_done is not None:
                on_done()
            if last:  # not now: a tenant that comes and goes would pay for it every time
                self._worker.run_when_idle(self._idle_without_tenants, IDLE_CLEANUP_S)

        # Submitted without a reply, so a sticky error still pending on the tenant cannot stop it.
        self._worker.submit(tenant, release, False, 0, finished)

    def _idle_without_tenants(self) -> None:
        with self._tenants_lock:
            if self._tenants:
                return
        self._host_memory_idle()

    def _worker_exiting(self) -> None:
        """Hook for subclasses: clean up thread-bound device state on the worker as it stops."""

    def _host_memory_idle(self) -> None:
        """Hook for subclasses, on the worker once the device has had no tenant for
        ``IDLE_CLEANUP_S``: hand back host memory kept for tenants (idle staging buffers)."""

    def _tenant_released(self, tenant: Tenant) -> None:
        with self._committed_lock:
            budget = tenant.budget
            budget.tenants -= 1
            if budget.tenants == 0:
                self._committed -= budget.limit

    def close(self) -> None:
        with self._tenants_lock:
            remaining = list(self._tenants)
        for tenant in remaining:  # their queued work still runs: stop() promises that
            self._release_after_queued(tenant, None)
        self._worker.stop()
