"""Error codes on the wire and the exceptions users catch.

Every error a server reports travels as an ERROR frame carrying one ``ErrorCode``; the client raises
the exception class registered for that code. All of them subclass ``BitfusionError``.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    PROTOCOL = 1  # malformed frame, bad magic/version, unknown opcode, oversize length
    OUT_OF_MEMORY = 2  # allocation beyond the tenant's memory limit
    CAPACITY = 3  # the server cannot place the requested lease
    INVALID_HANDLE = 4  # pointer, stream, event, module or function that is not the tenant's
    INVALID_VALUE = 5  # argument out of range
    KERNEL = 6  # a kernel failed while running
    UNSUPPORTED = 7  # the executor cannot do this (e.g. PTX on the NumPy device)
    INTERNAL = 8  # a server bug; the server logs it with a traceback
    LEASE_ENDED = 9  # the reservation the session used has ended (released, idle, restarted)
    AUTH = 10  # no token, or one that is unknown, expired or revoked; or too many bad attempts
    QUOTA = 11  # the request would take the user past a limit of their token


class BitfusionError(Exception):
    """Base class of every error bitfusion-net raises on purpose.

    ``deferred_from`` is set when the error belongs to an earlier call that returned without a
    reply (a launch, memset, copy from host, free): it is that call's request id, and
    ``later_failures`` counts further such calls that failed before the error could be reported.
    """

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, deferred_from: int | None = None, later_failures: int = 0):
        super().__init__(message)
        self.message = message
        self.deferred_from = deferred_from
        self.later_failures = later_failures

    def __str__(self) -> str:
        text = self.message
        if self.deferred_from is not None:
            text += f" (asynchronous error from earlier request #{self.deferred_from}"
            if self.later_failures:
                text += f"; {self.later_failures} later call(s) failed too"
            text += ")"
        return text


class ProtocolError(BitfusionError):
    """The peer broke the wire protocol; the connection is closed."""

    code = ErrorCode.PROTOCOL


class OutOfMemoryError(BitfusionError, MemoryError):
    """An allocation would exceed the tenant's memory limit."""

    code = ErrorCode.OUT_OF_MEMORY


class CapacityError(BitfusionError):
    """The server has no GPU with enough free share for the requested lease."""

    code = ErrorCode.CAPACITY


class InvalidHandleError(BitfusionError):
    """A pointer or handle that does not belong to this tenant (or was already freed)."""

    code = ErrorCode.INVALID_HANDLE


class InvalidValueError(BitfusionError, ValueError):
    """An argument out of range: a size, a launch geometry, a kernel argument."""

    code = ErrorCode.INVALID_VALUE


class KernelError(BitfusionError):
    """A kernel failed on the device."""

    code = ErrorCode.KERNEL


class UnsupportedError(BitfusionError):
    """The server's executor cannot do this."""

    code = ErrorCode.UNSUPPORTED


class InternalError(BitfusionError):
    """The server hit a bug; its log has the traceback."""

    code = ErrorCode.INTERNAL


class ConnectionLostError(BitfusionError, ConnectionError):
    """The connection to the server closed or broke; the session's leases are gone."""

    code = ErrorCode.PROTOCOL


class CallTimeoutError(ConnectionLostError, TimeoutError):
    """A call got no answer within the session's ``call_timeout``. The session is closed (what
    the server did with the call is unknown), and its leases are released when the server sees
    the connection go."""


class LeaseEndedError(ConnectionLostError):
    """The reservation this session's GPUs came from has ended, and the message says why: it
    was released (``release_gpus``, or its ``run`` ended), it sat idle past its idle timeout, or
    the server restarted. Its GPUs are gone; reserve again to go on."""

    code = ErrorCode.LEASE_ENDED


class AuthenticationError(BitfusionError, PermissionError):
    """The server refused the connection's token (none given where one is needed, unknown,
    expired or revoked; or too many failed attempts from this address), or revoked it during
    the session, which is then over. The message says which."""

    code = ErrorCode.AUTH


class QuotaExceededError(CapacityError):
    """The request would take its user past a limit of their token (GPUs, total fraction,
    total memory, over all their sessions and reservations); the message says which limit,
    and how much is in use."""

    code = ErrorCode.QUOTA


_BY_CODE: dict[int, type[BitfusionError]] = {
    cls.code: cls
    for cls in (
        ProtocolError,
        OutOfMemoryError,
        CapacityError,
        InvalidHandleError,
        InvalidValueError,
        KernelError,
        UnsupportedError,
        InternalError,
        LeaseEndedError,
        AuthenticationError,
        QuotaExceededError,
    )
}


def error_class(code: int) -> type[BitfusionError]:
    """The exception class for a wire error code (unknown codes from newer servers: BitfusionError)."""
    return _BY_CODE.get(code, BitfusionError)
