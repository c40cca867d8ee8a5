"""Verbs: the small RDMA interface the RDMA transport is written against (``api``), and its
in-process simulator (``simulator``). The pyverbs binding lives in ``pyverbs_backend`` and is
imported only where a real device is wanted (it needs rdma-core)."""

from .api import (
    MAX_MESSAGE_BYTES,
    PATH_MTUS,
    PSN_MASK,
    Access,
    CompletionChannel,
    CompletionQueue,
    DeviceContext,
    MemoryRegion,
    ProtectionDomain,
    Provider,
    QpEndpoint,
    QpState,
    QueuePair,
    Sge,
    VerbsError,
    WcOpcode,
    WcStatus,
    WorkCompletion,
    WrOpcode,
)
from .simulator import Fabric, FabricStats, SimulatedProvider

__all__ = [
    "MAX_MESSAGE_BYTES", "PATH_MTUS", "PSN_MASK", "Access", "CompletionChannel",
    "CompletionQueue", "DeviceContext", "Fabric", "FabricStats", "MemoryRegion",
    "ProtectionDomain", "Provider", "QpEndpoint", "QpState", "QueuePair", "Sge",
    "SimulatedProvider", "VerbsError", "WcOpcode", "WcStatus", "WorkCompletion", "WrOpcode",
]  # fmt: skip
