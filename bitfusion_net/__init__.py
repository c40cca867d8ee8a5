"""bitfusion-net: share GPUs over the network, whole or in fractions down to 1/20.

    async with bitfusion_net.connect("tcp://gpu-host:7000", fraction=0.25) as session:
        device = session.devices[0]
        ptr = await device.mem_alloc(4096)

See README.md for the quick start and docs/PROTOCOL.md for the wire protocol.
"""

from typing import TYPE_CHECKING, Any

from .client import (
    DevicePtr,
    Event,
    Function,
    Module,
    RemoteDevice,
    Session,
    Stream,
    SyncEvent,
    SyncFunction,
    SyncModule,
    SyncRemoteDevice,
    SyncSession,
    SyncStream,
    TenantStats,
    connect,
    connect_sync,
)
from .protocol.errors import (
    AuthenticationError,
    BitfusionError,
    CallTimeoutError,
    CapacityError,
    ConnectionLostError,
    InternalError,
    InvalidHandleError,
    InvalidValueError,
    KernelError,
    LeaseEndedError,
    OutOfMemoryError,
    ProtocolError,
    QuotaExceededError,
    UnsupportedError,
)
from .transport import ClientTls, ServerTls, TlsError
from .units import parse_size

if TYPE_CHECKING:
    from .server import Server

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The server (with its executors and NumPy) loads only when asked for: clients and the
    # bitfusion-net command start faster without it.
    if name == "Server":
        from .server import Server

        return Server
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AuthenticationError", "BitfusionError", "CallTimeoutError", "CapacityError", "ClientTls", "ConnectionLostError", "DevicePtr", "Event", "Function",
    "InternalError", "InvalidHandleError", "InvalidValueError", "KernelError", "LeaseEndedError", "Module",
    "OutOfMemoryError", "ProtocolError", "QuotaExceededError", "RemoteDevice", "Server", "ServerTls", "Session", "Stream",
    "SyncEvent", "SyncFunction", "SyncModule", "SyncRemoteDevice", "SyncSession", "SyncStream", "TenantStats", "TlsError",
    "UnsupportedError", "__version__", "connect", "connect_sync", "parse_size",
]  # fmt: skip
