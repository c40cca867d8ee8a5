"""The process's connection to its remote GPUs, and PyCUDA's per-thread stack of contexts.

A PyCUDA program sees the devices of one session: the reservation ``bitfusion-net run`` made for
it (``BITFUSION_NET_LEASE``), attached to at the first call that needs a device and closed when
the program exits. A context stands for one of those devices; contexts are made current per
thread, as in CUDA, but all share the session (its memory limit is the lease's, whatever the
number of contexts).
"""

from __future__ import annotations

import atexit
import threading

from ..client import SyncRemoteDevice, SyncSession, connect_sync
from ..protocol import BitfusionError
from ._errors import LogicError, RuntimeError

_lock = threading.Lock()
_session: SyncSession | None = None
_stacks = threading.local()  # .contexts: list of this thread's current contexts, top last
_HOW = (
    "a PyCUDA program needs remote GPUs: run it under 'bitfusion-net run -n 1 -p 0.25 -- "
    "python PROGRAM' (or give it a reservation from 'request_gpus' in BITFUSION_NET_LEASE)"
)


def session() -> SyncSession:
    """The process's session, attached on first use."""
    global _session
    with _lock:
        if _session is None:
            try:
                _session = connect_sync()
            except BitfusionError as exc:
                raise RuntimeError(f"{exc}; {_HOW}") from exc
            atexit.register(close)
        return _session


def device(ordinal: int) -> SyncRemoteDevice:
    devices = session().devices
    if not 0 <= ordinal < len(devices):
        raise LogicError(
            f"invalid device ordinal {ordinal}: this program has {len(devices)} GPU(s) "
            "(bitfusion-net run -n N gives it N)"
        )
    return devices[ordinal]


def close() -> None:
    """Close the session (at exit): the server has the lease's memory back at once."""
    global _session
    with _lock:
        if _session is not None:
            _session.close()
            _session = None


def stack() -> list[object]:
    contexts: list[object] | None = getattr(_stacks, "contexts", None)
    if contexts is None:
        contexts = _stacks.contexts = []
    return contexts


def current() -> object | None:
    contexts = stack()
    return contexts[-1] if contexts else None
