"""Placement of fractional leases on a server's GPUs.

Shares are kept in integer millionths of a GPU so that twenty leases of 0.05 add up to exactly one
GPU (floats would not). A lease of fraction ``f`` gets ``f`` of the GPU's memory as a hard limit and
``f`` as its compute weight. Placement is best-fit: among GPUs with room, the fullest one, which
keeps whole GPUs free for clients that ask for whole GPUs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..protocol import CapacityError, InvalidValueError

SHARE_UNITS = 1_000_000  # one whole GPU


@dataclass
class GpuSlot:
    """One GPU's capacity as the server hands it out."""

    index: int
    total_memory: int
    leased_share: int = 0  # millionths of the GPU
    leased_memory: int = 0
    tenants: int = 0

    @property
    def free_share(self) -> int:
        return SHARE_UNITS - self.leased_share


@dataclass(frozen=True)
class Placement:
    """Where one GPU of a lease lives and what it may use."""

    gpu: int
    share: int  # millionths of the GPU (compute weight and capacity)
    memory_limit: int

    @property
    def fraction(self) -> float:
        return self.share / SHARE_UNITS


@dataclass
class GpuPool:
    """The server's GPUs and what is leased on each. Used from the event loop thread only."""

    slots: list[GpuSlot]
    min_share: int = field(default=SHARE_UNITS // 20)

    def request(
        self,
        gpus: int,
        fraction: float = 0.0,
        memory: int = 0,
        allowed: set[int] | None = None,
    ) -> list[Placement]:
        """Place ``gpus`` leases on distinct GPUs, each at ``fraction`` or with ``memory`` bytes,
        only on the GPUs numbered in ``allowed`` if given.

        Raises InvalidValueError for a malformed request and CapacityError when it cannot fit.
        """
        if not 1 <= gpus <= len(self.slots):
            raise InvalidValueError(
                f"asked for {gpus} GPU(s); this server has {len(self.slots)}"
                if gpus >= 1
                else "asked for no GPUs"
            )
        if not (math.isfinite(fraction) and 0 <= fraction <= 1) or memory < 0:
            raise InvalidValueError(f"fraction must be in (0, 1] (got {fraction}), memory >= 0")
        if (fraction > 0) == (memory > 0):
            raise InvalidValueError("give either a fraction or a memory size, not both or neither")
        if fraction > 0 and round(fraction * SHARE_UNITS) < self.min_share:
            raise InvalidValueError(
                f"fraction {fraction} is below this server's smallest slice "
                f"{self.min_share / SHARE_UNITS}"
            )
        candidates = []
        for slot in self.slots:
            if allowed is not None and slot.index not in allowed:
                continue
            share, limit = self._size(slot, fraction, memory)
            if share <= slot.free_share and limit <= slot.total_memory - slot.leased_memory:
                candidates.append((slot.free_share, slot.index, share, limit))
        if len(candidates) < gpus:
            wanted = f"{fraction:g} of a GPU" if fraction else f"{memory} bytes of GPU memory"
            free = ", ".join(f"gpu{s.index}: {s.free_share / SHARE_UNITS:.2f}" for s in self.slots)
            among = "" if allowed is None else f" among GPUs {sorted(allowed)}"
            raise CapacityError(
                f"cannot place {gpus} lease(s) of {wanted}: {len(candidates)} GPU(s){among} "
                f"have room (free shares {free})"
            )
        candidates.sort()
        placements = [
            Placement(index, share, limit) for _, index, share, limit in candidates[:gpus]
        ]
        for placement in placements:
            slot = self.slots[placement.gpu]
            slot.leased_share += placement.share
            slot.leased_memory += placement.memory_limit
            slot.tenants += 1
        return placements

    def release(self, placement: Placement) -> None:
        slot = self.slots[placement.gpu]
        slot.leased_share -= placement.share
        slot.leased_memory -= placement.memory_limit
        slot.tenants -= 1
        assert slot.leased_share >= 0 and slot.leased_memory >= 0 and slot.tenants >= 0

    def _size(self, slot: GpuSlot, fraction: float, memory: int) -> tuple[int, int]:
        """(share, memory limit) of one lease on ``slot``."""
        if fraction:
            share = round(fraction * SHARE_UNITS)
            return share, slot.total_memory * share // SHARE_UNITS
        if memory > slot.total_memory:
            return SHARE_UNITS + 1, memory  # cannot fit on this GPU
        share = max(-(-memory * SHARE_UNITS // slot.total_memory), self.min_share)
        return share, memory
