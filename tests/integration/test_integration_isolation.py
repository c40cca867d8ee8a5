"""Tenants sharing a GPU cannot touch each other's memory, nor see each other's errors.

API calls (free, copies, memset) given another tenant's pointer fail with InvalidHandleError:
at once for calls that wait for a reply, at the tenant's next synchronising call for no-reply calls.
A kernel addressing another tenant's memory faults like a GPU on an illegal address (KernelError),
as the NumPy device documents. Either way the owner's bytes are unchanged and the owner sees
nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import numpy as np
import pytest
from integration_support import ClientApi, run, serve, wait_released

import bitfusion_net as bf

N = 4096  # bytes of the victim's allocation
PATTERN = np.random.default_rng(11).integers(0, 256, N, dtype=np.uint8)

Attack = Callable[[bf.RemoteDevice, bf.DevicePtr, bf.DevicePtr], Awaitable[None]]


async def _free(b: bf.RemoteDevice, victim: bf.DevicePtr, own: bf.DevicePtr) -> None:
    await b.mem_free(victim)


async def _htod(b: bf.RemoteDevice, victim: bf.DevicePtr, own: bf.DevicePtr) -> None:
    await b.memcpy_htod(victim, np.zeros(N, np.uint8))


async def _htod_interior(b: bf.RemoteDevice, victim: bf.DevicePtr, own: bf.DevicePtr) -> None:
    await b.memcpy_htod(victim + 256, np.zeros(16, np.uint8))


async def _htod_large(b: bf.RemoteDevice, victim: bf.DevicePtr, own: bf.DevicePtr) -> None:
    await b.memcpy_htod(victim, np.zeros(N, np.uint8).tobytes() * 32)  # a streamed payload


async def _memset_d8(b: bf.RemoteDevice, victim: bf.DevicePtr, own: bf.DevicePtr) -> None:
    await b.memset_d8(victim, 0xFF, N)


async def _memset_d16(b: bf.RemoteDevice, victim: bf.DevicePtr, own: bf.DevicePtr) -> None:
    await b.memset_d16(victim, 0xFFFF, N // 2)


async def _memset_d32(b: bf.RemoteDevice, victim: bf.DevicePtr, own: bf.DevicePtr) -> None:
    await b.memset_d32(victim, 0xFFFF_FFFF, N // 4)


async def _dtod_into_victim(b: bf.RemoteDevice, victim: bf.DevicePtr, own: bf.DevicePtr) -> None:
    await b.memcpy_dtod(victim, own, N)


async def _dtod_from_victim(b: bf.RemoteDevice, victim: bf.DevicePtr, own: bf.DevicePtr) -> None:
    await b.memcpy_dtod(own, victim, N)


NO_REPLY_ATTACKS = [_free, _htod, _htod_interior, _htod_large, _memset_d8, _memset_d16,
                    _memset_d32, _dtod_into_victim, _dtod_from_victim]  # fmt: skip


async def _check_victim(a: bf.RemoteDevice, victim: bf.DevicePtr) -> None:
    out = np.zeros(N, np.uint8)
    await a.memcpy_dtoh(out, victim)
    np.testing.assert_array_equal(out, PATTERN)
    await a.synchronize()  # the attacker's failures are not the victim's


async def _two_tenants(server: bf.Server) -> tuple[bf.Session, bf.Session]:
    first = await bf.connect(server.address, fraction=0.5, client_name="victim")
    second = await bf.connect(server.address, fraction=0.5, client_name="attacker")
    return first, second


@pytest.mark.parametrize("attack", NO_REPLY_ATTACKS, ids=lambda f: f.__name__.strip("_"))
def test_no_reply_call_on_anothers_pointer_fails_at_next_synchronize(attack: Attack) -> None:
    async def main() -> None:
        async with serve() as server:
            first, second = await _two_tenants(server)
            a, b = first.devices[0], second.devices[0]
            assert a.server_gpu == b.server_gpu  # both on the one GPU, one address space
            victim = await a.mem_alloc(N)
            await a.memcpy_htod(victim, PATTERN)
            own = await b.mem_alloc(N)
            await b.memcpy_htod(own, np.ones(N, np.uint8))

            await attack(b, victim, own)  # returns without a round trip
            with pytest.raises(bf.InvalidHandleError) as caught:
                await b.synchronize()
            assert caught.value.deferred_from is not None
            await b.synchronize()  # reported once; the attacker's session goes on

            await _check_victim(a, victim)
            out = np.zeros(N, np.uint8)
            await b.memcpy_dtoh(out, own)  # the attacker's own buffer was not touched either
            np.testing.assert_array_equal(out, np.ones(N, np.uint8))
            await a.mem_free(victim)  # still the victim's to free
            await a.synchronize()
            await second.close()
            await first.close()
            await wait_released(server)

    run(main())


def test_reading_anothers_pointer_fails_at_once() -> None:
    async def main() -> None:
        async with serve() as server:
            first, second = await _two_tenants(server)
            a, b = first.devices[0], second.devices[0]
            victim = await a.mem_alloc(N)
            await a.memcpy_htod(victim, PATTERN)
            for ptr, size in ((victim, N), (victim + 128, 64), (victim, 1)):
                out = np.zeros(size, np.uint8)
                with pytest.raises(bf.InvalidHandleError) as caught:
                    await b.memcpy_dtoh(out, ptr)
                assert caught.value.deferred_from is None  # its own error, not a sticky one
                assert not out.any()  # nothing of the victim's bytes arrived
            await b.synchronize()
            await _check_victim(a, victim)
            await second.close()
            await first.close()

    run(main())


@pytest.mark.parametrize("kernel", ["fill", "saxpy_write", "saxpy_read", "reduce_sum"])
def test_kernel_on_anothers_pointer_faults(kernel: str) -> None:
    async def main() -> None:
        async with serve() as server:
            first, second = await _two_tenants(server)
            a, b = first.devices[0], second.devices[0]
            victim = await a.mem_alloc(N)
            await a.memcpy_htod(victim, PATTERN)
            own = await b.mem_alloc(N)
            await b.memset_d8(own, 0, N)
            count = N // 4
            if kernel == "fill":
                await (await b.builtin("fill")).launch(1, 256, [count, 1.0, victim])
            elif kernel == "saxpy_write":
                await (await b.builtin("saxpy")).launch(1, 256, [count, 1.0, own, victim])
            elif kernel == "saxpy_read":
                await (await b.builtin("saxpy")).launch(1, 256, [count, 1.0, victim, own])
            else:
                await (await b.builtin("reduce_sum")).launch(1, 256, [count, victim, own])
            with pytest.raises(bf.KernelError) as caught:
                await b.synchronize()
            assert caught.value.deferred_from is not None
            out = np.ones(N, np.uint8)
            await b.memcpy_dtoh(out, own)
            assert not out.any()  # no byte of the victim's leaked into the attacker's buffer
            await _check_victim(a, victim)
            await second.close()
            await first.close()

    run(main())


def test_a_freed_pointer_is_dead_for_everyone() -> None:
    async def main() -> None:
        async with serve() as server:
            first, second = await _two_tenants(server)
            a, b = first.devices[0], second.devices[0]
            ptr = await a.mem_alloc(N)
            await a.mem_free(ptr)
            await a.synchronize()
            # Use after free: the address is not handed out again at once, so it fails loudly.
            replacement = await b.mem_alloc(N)
            assert replacement != ptr
            with pytest.raises(bf.InvalidHandleError):
                await a.memcpy_dtoh(np.zeros(N, np.uint8), ptr)
            await a.mem_free(ptr)  # double free
            with pytest.raises(bf.InvalidHandleError):
                await a.synchronize()
            with pytest.raises(bf.InvalidHandleError):
                await b.memcpy_dtoh(np.zeros(N, np.uint8), ptr)
            await second.close()
            await first.close()
            await wait_released(server)

    run(main())


def test_a_closed_tenants_memory_is_gone(api: ClientApi) -> None:
    """After a tenant leaves, its pointers are invalid for whoever comes next."""

    async def main() -> None:
        async with serve() as server:
            async with api.connect(server.address, fraction=0.5) as leaver:
                ptr = await leaver.devices[0].mem_alloc(N)
                await leaver.devices[0].memcpy_htod(ptr, PATTERN)
            await wait_released(server)
            async with api.connect(server.address, fraction=1.0) as successor:
                device = successor.devices[0]
                with pytest.raises(bf.InvalidHandleError):
                    await device.memcpy_dtoh(np.zeros(N, np.uint8), ptr)
                assert await device.mem_get_info() == (device.memory_limit, device.memory_limit)

    run(main())
