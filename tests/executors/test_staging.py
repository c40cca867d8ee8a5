"""Staging memory: the arena (pinned on GPUs) merges what comes back; the pool reuses, then lets go."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from executors import Tenant, worker
from executors.numpy_device import NumpyExecutor
from executors.staging import StagingArena, StagingPool

MiB = 2**20


def arena(size: int = 4 * MiB) -> StagingArena:
    return StagingArena(np.zeros(size, np.uint8), StagingPool(capacity=0))


def test_buffers_come_from_the_arena_without_overlapping() -> None:
    staging = arena()
    buffers = [staging.take(n) for n in (100_000, 1 * MiB, 300_000)]
    for buffer, n in zip(buffers, (100_000, 1 * MiB, 300_000), strict=True):
        assert buffer.obj is staging.arena and buffer.nbytes == n
        np.frombuffer(buffer, np.uint8)[:] = n % 251
    for buffer, n in zip(buffers, (100_000, 1 * MiB, 300_000), strict=True):
        assert (np.frombuffer(buffer, np.uint8) == n % 251).all(), "buffers overlap"


def test_returned_space_merges_so_a_whole_arena_buffer_fits_again() -> None:
    staging = arena()
    parts = [staging.take(MiB) for _ in range(4)]
    assert staging.idle_bytes() == 0
    for index in (2, 0, 3, 1):  # out of order: merging must join both neighbours
        staging.give_back(parts[index])
    assert staging.idle_bytes() == 4 * MiB
    assert staging.take(4 * MiB).obj is staging.arena


def test_small_and_overflowing_payloads_use_ordinary_memory() -> None:
    staging = arena(1 * MiB)
    assert staging.take(100).obj is not staging.arena  # not worth a slot of the arena
    held = staging.take(MiB)
    overflow = staging.take(MiB)
    assert overflow.obj is not staging.arena and overflow.nbytes == MiB
    staging.give_back(overflow)  # goes to the fallback pool, leaves the arena alone
    staging.give_back(held)
    assert staging.idle_bytes() == MiB


def test_concurrent_take_and_give_back_lose_nothing() -> None:
    staging = arena(8 * MiB)

    def churn(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(300):
            buffer = staging.take(int(rng.integers(64 * 1024, 512 * 1024)))
            staging.give_back(buffer)

    threads = [threading.Thread(target=churn, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert staging.idle_bytes() == 8 * MiB


def test_pooled_buffers_are_reused_then_cleared_back_to_the_system() -> None:
    pool = StagingPool(capacity=8 * MiB)
    first = pool.take(MiB)
    first[:4] = b"abcd"
    array = first.obj
    pool.give_back(first)
    again = pool.take(MiB)
    assert again.obj is array  # reused: no fresh pages to fault in
    pool.give_back(again)
    pool.clear()
    assert pool.take(MiB).obj is not array  # the idle one was dropped, and unmapped with it


def test_a_device_left_without_tenants_for_a_while_clears_its_idle_staging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker, "IDLE_CLEANUP_S", 0.05)
    executor = NumpyExecutor(memory=64 * MiB)

    def close(tenant: Tenant) -> None:
        done = threading.Event()
        executor.close_tenant(tenant, on_done=done.set)
        assert done.wait(5)

    try:
        tenants = [executor.open_tenant(16 * MiB, 0.5) for _ in range(2)]
        buffer = tenants[0].staging_buffer(MiB)
        array = buffer.obj
        tenants[0].return_staging(buffer)
        close(tenants[0])
        assert tenants[1].staging_buffer(MiB).obj is array  # a tenant remains: kept for it
        tenants[1].return_staging(memoryview(array.data))
        close(tenants[1])
        # The last one left; one that comes at once still finds it (leaving must stay cheap)...
        soon = executor.open_tenant(16 * MiB, 0.5)
        assert soon.staging_buffer(MiB).obj is array
        soon.return_staging(memoryview(array.data))
        close(soon)
        time.sleep(0.3)  # ... but once the device has had no tenant for a while, it goes back
        tenant = executor.open_tenant(16 * MiB, 0.5)
        assert tenant.staging_buffer(MiB).obj is not array
    finally:
        executor.close()


def test_a_buffer_nobody_takes_for_a_while_is_let_go() -> None:
    pool = StagingPool(capacity=8 * MiB, keep_s=0.05)
    buffer = pool.take(MiB)
    array = buffer.obj
    pool.give_back(buffer)
    time.sleep(0.1)
    assert pool.take(MiB).obj is not array  # stale: dropped rather than kept at the bound
