"""Lease negotiation: what a HELLO asks for, where it is placed, and the tenants made for it."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

from executors import Executor, Tenant
from executors.errors import DeviceError

from ..protocol import CapacityError, DeviceGrant, InvalidValueError
from ..protocol import messages as m
from .leases import GpuPool, Placement


@dataclass
class Lease:
    """One GPU of a session: where it is placed and the tenant context on its executor."""

    placement: Placement
    executor: Executor
    tenant: Tenant


def negotiate(
    hello: m.Hello, pool: GpuPool, executors: list[Executor]
) -> tuple[list[Lease], list[DeviceGrant]]:
    """Place the HELLO's leases and open their tenants, or raise the typed reason it cannot be
    (``InvalidValueError``, ``CapacityError``) with nothing left placed or open."""
    if hello.mode not in (m.MODE_SHARE, m.MODE_CAP):
        raise InvalidValueError(f"unknown scheduling mode {hello.mode} (0 share, 1 cap)")
    if not (hello.weight == 0 or (math.isfinite(hello.weight) and 0 < hello.weight <= 1000)):
        raise InvalidValueError(f"weight must be in (0, 1000], got {hello.weight}")
    placements = pool.request(hello.gpus, hello.fraction, hello.memory)
    leases: list[Lease] = []
    try:
        for placement in placements:
            executor = executors[placement.gpu]
            tenant = executor.open_tenant(
                placement.memory_limit,
                weight=hello.weight or placement.fraction,
                cap=placement.fraction if hello.mode == m.MODE_CAP else None,
            )
            leases.append(Lease(placement, executor, tenant))
    except DeviceError as exc:  # the executor disagrees with the pool: undo, report
        for lease in leases:
            lease.executor.close_tenant(lease.tenant)
        for placement in placements:
            pool.release(placement)
        raise CapacityError(f"the executor refused the lease: {exc}") from None
    grants = [
        DeviceGrant(
            index=i,
            server_gpu=lease.placement.gpu,
            total_memory=lease.executor.properties.total_memory,
            memory_limit=lease.placement.memory_limit,
            fraction=lease.placement.fraction,
            weight=lease.tenant.weight,
            mode=hello.mode,
            name=lease.executor.properties.name,
            executor=lease.executor.properties.executor,
        )
        for i, lease in enumerate(leases)
    ]
    return leases, grants


def describe(grants: list[DeviceGrant]) -> str:
    return ", ".join(
        f"gpu{g.server_gpu}@{g.fraction:g} (weight {g.weight:g}, "
        f"{'cap' if g.mode == m.MODE_CAP else 'share'})"
        for g in grants
    )


def release(lease: Lease, pool: GpuPool, loop: asyncio.AbstractEventLoop) -> None:
    """Drop the lease's queued work, free its memory, then give its share back to the pool."""

    def memory_freed() -> None:
        loop.call_soon_threadsafe(pool.release, lease.placement)

    lease.executor.close_tenant(lease.tenant, on_done=memory_freed)
