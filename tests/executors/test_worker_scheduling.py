"""The device worker driving a scheduler on a real thread: order, shutdown, closed tenants, usage.

No timing is asserted here (that is ``perf/``'s job); every wait is for an event, with a generous
timeout so a hung worker fails the test instead of hanging it.
"""

from __future__ import annotations

import itertools
import random
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from executors import (
    DeviceError,
    DeviceOutOfMemory,
    InvalidHandle,
    InvalidValue,
    NumpyExecutor,
    Tenant,
)
from executors.base import arg_struct_format
from executors.worker import DeviceWorker, WorkerExecutor

MiB = 2**20
TIMEOUT_S = 5.0


@pytest.fixture(params=["fair", "fifo"])
def device(request: pytest.FixtureRequest) -> Iterator[NumpyExecutor]:
    executor = NumpyExecutor(memory=256 * MiB, scheduling=request.param)
    yield executor
    executor.close()


class Outcomes:
    """Collects ``on_done`` calls; ``wait`` blocks until ``count`` of them have come in."""

    def __init__(self) -> None:
        self.results: list[tuple[Any, BaseException | None]] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    def on_done(self, result: Any, error: BaseException | None) -> None:
        with self._changed:
            self.results.append((result, error))
            self._changed.notify_all()

    def wait(self, count: int) -> list[tuple[Any, BaseException | None]]:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.results) >= count, TIMEOUT_S)
            return list(self.results)


def call(device: WorkerExecutor, tenant: Tenant, op: Callable[[], Any]) -> Any:
    outcomes = Outcomes()
    device.submit(tenant, op, wants_reply=True, on_done=outcomes.on_done)
    [(result, error)] = outcomes.wait(1)
    if error is not None:
        raise error
    return result


def close(device: WorkerExecutor, tenant: Tenant) -> None:
    closed = threading.Event()
    device.close_tenant(tenant, on_done=closed.set)
    assert closed.wait(TIMEOUT_S)


def test_each_tenants_work_runs_in_submission_order(device: NumpyExecutor) -> None:
    tenants = [device.open_tenant(MiB, weight) for weight in (0.2, 0.3, 0.5)]
    ran: list[tuple[int, int]] = []  # appended only on the worker thread
    outcomes = Outcomes()
    order = random.Random(7)
    submissions = [index for index in range(3) for _ in range(200)]
    order.shuffle(submissions)
    counters = itertools.count()
    next_seq = [0, 0, 0]
    for index in submissions:
        seq = next_seq[index]
        next_seq[index] += 1
        device.submit(
            tenants[index],
            lambda index=index, seq=seq: ran.append((index, seq)),
            wants_reply=next(counters) % 2 == 0,
            on_done=outcomes.on_done,
        )
    outcomes.wait(len(submissions))
    assert len(ran) == len(submissions)
    for index in range(3):
        assert [seq for who, seq in ran if who == index] == list(range(200))
    assert all(error is None for _, error in outcomes.results)


def test_threads_submitting_concurrently_keep_their_own_order(device: NumpyExecutor) -> None:
    tenants = [device.open_tenant(MiB, 1 / 3) for _ in range(3)]
    ran: list[tuple[int, int]] = []
    outcomes = Outcomes()
    start = threading.Barrier(3)

    def submitter(index: int) -> None:
        start.wait()
        for seq in range(300):
            device.submit(
                tenants[index],
                lambda seq=seq: ran.append((index, seq)),
                wants_reply=False,
                on_done=outcomes.on_done,
            )

    threads = [threading.Thread(target=submitter, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S)
    outcomes.wait(900)
    for index in range(3):
        assert [seq for who, seq in ran if who == index] == list(range(300))


def test_everything_queued_before_close_runs_then_later_work_fails(device: NumpyExecutor) -> None:
    tenant = device.open_tenant(MiB, 1.0)
    gate = threading.Event()
    ran: list[int] = []
    outcomes = Outcomes()
    device.submit(tenant, lambda: gate.wait(TIMEOUT_S), wants_reply=True, on_done=outcomes.on_done)
    for i in range(20):
        device.submit(tenant, lambda i=i: ran.append(i), wants_reply=True, on_done=outcomes.on_done)
    gate.set()
    device.close()
    assert ran == list(range(20))  # stop() ran what was queued before it returned
    late = Outcomes()
    device.submit(tenant, lambda: ran.append(99), wants_reply=True, on_done=late.on_done)
    [(result, error)] = late.wait(1)
    assert result is None and type(error) is DeviceError
    assert ran == list(range(20))


def test_a_worker_stopped_directly_answers_later_work_with_device_error() -> None:
    executor = NumpyExecutor(memory=16 * MiB)
    tenant = executor.open_tenant(MiB, 0.5)
    worker = DeviceWorker("test-worker", "fair")
    worker.add_tenant(tenant)
    outcomes = Outcomes()
    worker.submit(tenant, lambda: "before", True, 0, outcomes.on_done)
    worker.stop(TIMEOUT_S)
    worker.submit(tenant, lambda: "after", True, 0, outcomes.on_done)
    worker.submit(tenant, lambda: "after", False, 0, None)  # no callback: dropped, no crash
    (before, after) = outcomes.wait(2)
    assert before == ("before", None)
    assert after[0] is None and isinstance(after[1], DeviceError)
    executor.close()


def test_work_for_a_closed_tenant_is_refused_with_invalid_handle(device: NumpyExecutor) -> None:
    tenant = device.open_tenant(MiB, 0.5)
    gate = threading.Event()  # hold the device so that the tenant's work is still queued at close
    device.submit(tenant, lambda: gate.wait(TIMEOUT_S), wants_reply=False)
    other = device.open_tenant(MiB, 0.5)
    ran: list[str] = []
    queued = Outcomes()
    for i in range(5):
        device.submit(
            tenant, lambda i=i: ran.append(f"t{i}"), wants_reply=True, on_done=queued.on_done
        )
    threading.Timer(0.05, gate.set).start()
    close(device, tenant)
    # Work still queued when the tenant closed is dropped, and answered; what had run ran in order.
    outcomes = queued.wait(5)
    assert ran == [f"t{i}" for i in range(len(ran))]
    dropped = [error for _result, error in outcomes if error is not None]
    assert len(dropped) == 5 - len(ran)
    assert all(type(error) is DeviceError for error in dropped)
    late = Outcomes()
    device.submit(tenant, lambda: ran.append("late"), wants_reply=True, on_done=late.on_done)
    [(result, error)] = late.wait(1)
    assert result is None and isinstance(error, InvalidHandle)
    assert "late" not in ran
    assert call(device, other, lambda: "still fine") == "still fine"


def test_usage_counts_operations_kernels_and_memory(device: NumpyExecutor) -> None:
    tenant = device.open_tenant(4 * MiB, 1.0)
    other = device.open_tenant(4 * MiB, 1.0)
    before = device.usage(tenant)
    assert (before.operations, before.kernels, before.memory_used) == (0, 0, 0)

    n = 1024
    big = call(device, tenant, lambda: tenant.mem_alloc(2 * MiB))
    ptr = call(device, tenant, lambda: tenant.mem_alloc(n * 4))
    fill = call(device, tenant, lambda: tenant.get_function(0, "fill", None))
    args = struct.pack(arg_struct_format(fill.arg_types), n, 2.5, ptr)
    for _ in range(3):
        call(device, tenant, lambda: tenant.launch(fill.handle, (4, 1, 1), (256, 1, 1), 0, 0, args))
    call(device, tenant, lambda: tenant.mem_free(big))
    host = bytearray(n * 4)
    call(device, tenant, lambda: tenant.memcpy_dtoh(memoryview(host), ptr, 0))
    assert struct.unpack(f"<{n}f", host) == (2.5,) * n

    used = device.usage(tenant)
    assert used.operations == 8  # 2 allocs, get_function, 3 launches, free, copy
    assert used.kernels == 3
    assert used.memory_used == n * 4
    assert used.memory_high_water == 2 * MiB + n * 4
    assert used.device_time > 0 and used.queue_wait >= 0
    untouched = device.usage(other)
    assert (untouched.operations, untouched.kernels, untouched.memory_high_water) == (0, 0, 0)


@pytest.mark.parametrize("scheduling", ["fair", "fifo"])
def test_both_disciplines_run_everything(scheduling: str) -> None:
    executor = NumpyExecutor(memory=64 * MiB, scheduling=scheduling)
    try:
        tenants = [
            executor.open_tenant(MiB, 0.1),
            executor.open_tenant(MiB, 0.6),
            executor.open_tenant(MiB, 0.3, cap=1.0),
        ]
        outcomes = Outcomes()
        for i in range(300):
            executor.submit(
                tenants[i % 3], lambda i=i: i, wants_reply=True, on_done=outcomes.on_done
            )
        results = outcomes.wait(300)
        assert sorted(result for result, _ in results) == list(range(300))
        assert all(error is None for _, error in results)
        assert sum(executor.usage(t).operations for t in tenants) == 300
    finally:
        executor.close()


def test_an_unknown_scheduling_discipline_is_refused() -> None:
    with pytest.raises(ValueError, match="scheduling"):
        DeviceWorker("never-started", "round-robin")
    with pytest.raises(ValueError, match="scheduling"):
        NumpyExecutor(memory=MiB, scheduling="lottery")


def test_a_refused_cap_does_not_leak_the_tenants_memory_promise() -> None:
    executor = NumpyExecutor(memory=16 * MiB)
    try:
        with pytest.raises((InvalidValue, ValueError)):
            executor.open_tenant(16 * MiB, 0.5, cap=1.5)
        # The refused tenant never existed, so the whole device can still be promised.
        try:
            tenant = executor.open_tenant(16 * MiB, 0.5)
        except DeviceOutOfMemory as exc:
            pytest.fail(f"the refused tenant's memory limit is still committed: {exc}")
        assert call(executor, tenant, lambda: 1) == 1
    finally:
        executor.close()


def test_a_query_runs_inline_only_when_the_tenant_is_idle(device: NumpyExecutor) -> None:
    tenant = device.open_tenant(MiB, 0.5)
    other = device.open_tenant(MiB, 0.5)
    caller = threading.current_thread()
    ran, where = device.run_if_idle(tenant, lambda: threading.current_thread())
    assert ran and where is caller  # idle: answered on the calling thread, no hop

    gate = threading.Event()
    device.submit(tenant, lambda: gate.wait(TIMEOUT_S), wants_reply=False)
    device.submit(tenant, lambda: None, wants_reply=False)
    assert device.run_if_idle(tenant, lambda: "jumped the queue") == (False, None)
    assert device.run_if_idle(other, lambda: "another tenant") == (True, "another tenant")
    gate.set()
    assert call(device, tenant, lambda: "in order") == "in order"


def test_an_inline_query_reports_a_pending_sticky_error(device: NumpyExecutor) -> None:
    from executors import DeferredError

    tenant = device.open_tenant(MiB, 0.5)
    failed = threading.Event()

    def fail() -> None:
        failed.set()
        raise InvalidValue("bad launch")

    device.submit(tenant, fail, wants_reply=False, tag=7)
    assert failed.wait(TIMEOUT_S)
    call(device, device.open_tenant(MiB, 0.5), lambda: None)  # the worker has moved on
    with pytest.raises(DeferredError) as caught:
        device.run_if_idle(tenant, lambda: "answer")
    assert caught.value.failure.tag == 7
    assert device.run_if_idle(tenant, lambda: "answer") == (True, "answer")  # reported once


def test_an_executor_that_completes_asynchronously_never_runs_inline() -> None:
    class AsyncDevice(NumpyExecutor):
        completes_synchronously = False

    executor = AsyncDevice(memory=16 * MiB)
    try:
        tenant = executor.open_tenant(MiB, 0.5)
        assert executor.run_if_idle(tenant, lambda: "never") == (False, None)
    finally:
        executor.close()
