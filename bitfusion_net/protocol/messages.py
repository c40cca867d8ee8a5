"""Opcodes and the metadata of every frame (docs/PROTOCOL.md, "Opcodes").

Each message is a frozen dataclass. Its metadata is its fixed fields packed with ``struct``
(little-endian, no padding) followed by its variable fields, each a u32 length and that many
bytes (UTF-8 for text). A request's reply carries the request's opcode with the REPLY flag; an
ERROR frame may answer any request instead.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import InvalidValueError, ProtocolError

if TYPE_CHECKING:
    from .rules import OpcodeRule


class Opcode(IntEnum):
    HELLO = 0x01
    ERROR = 0x02
    KEEPALIVE = 0x03
    RESERVE = 0x04
    ATTACH = 0x05
    RELEASE = 0x06
    SERVER_INFO = 0x07
    AUTHENTICATE = 0x08
    MEM_ALLOC = 0x10
    MEM_FREE = 0x11
    MEM_GET_INFO = 0x12
    MEMCPY_HTOD = 0x13
    MEMCPY_DTOH = 0x14
    MEMCPY_DTOD = 0x15
    MEMSET = 0x16
    SYNCHRONIZE = 0x17
    TENANT_STATS = 0x18
    DEVICE_ATTRIBUTES = 0x19
    MODULE_LOAD = 0x20
    MODULE_UNLOAD = 0x21
    GET_FUNCTION = 0x22
    LAUNCH = 0x23
    MODULE_GET_GLOBAL = 0x24
    STREAM_CREATE = 0x30
    STREAM_DESTROY = 0x31
    STREAM_SYNCHRONIZE = 0x32
    STREAM_QUERY = 0x33
    STREAM_WAIT_EVENT = 0x34
    EVENT_CREATE = 0x38
    EVENT_DESTROY = 0x39
    EVENT_RECORD = 0x3A
    EVENT_SYNCHRONIZE = 0x3B
    EVENT_ELAPSED = 0x3C
    EVENT_QUERY = 0x3D


_LENGTH = struct.Struct("<I")


class Message:
    """Base of all metadata layouts. Subclasses declare ``FIXED`` and ``VARIABLE``.

    ``FIXED``: (field name, struct code) in wire order; a code like ``3I`` is a tuple field.
    ``VARIABLE``: (field name, "str" | "bytes") in wire order, each length-prefixed.
    """

    FIXED: ClassVar[tuple[tuple[str, str], ...]] = ()
    VARIABLE: ClassVar[tuple[tuple[str, str], ...]] = ()
    HAS_PAYLOAD: ClassVar[bool] = False  # a bulk payload follows the metadata
    _struct: ClassVar[struct.Struct]
    _layout: ClassVar[tuple[tuple[str, int], ...]]  # (name, value count) for the fixed fields
    _flat: ClassVar[bool]  # only scalar fixed fields

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._struct = struct.Struct("<" + "".join(code for _, code in cls.FIXED))
        cls._layout = tuple(
            (name, int(code[:-1]) if len(code) > 1 else 0) for name, code in cls.FIXED
        )
        # Most messages are a few scalars: they pack and unpack in one call, with no field loop.
        cls._flat = not cls.VARIABLE and all(count == 0 for _, count in cls._layout)

    def encode(self) -> bytes:
        if self._flat:
            try:
                return self._struct.pack(*[getattr(self, name) for name, _ in self._layout])
            except struct.error as exc:
                raise ValueError(f"{type(self).__name__}: {exc}") from None
        values: list[Any] = []
        for name, count in self._layout:
            value = getattr(self, name)
            if count:
                values.extend(value)
            else:
                values.append(value)
        try:
            out = self._struct.pack(*values)
        except struct.error as exc:
            raise ValueError(f"{type(self).__name__}: {exc}") from None
        for name, kind in self.VARIABLE:
            data = getattr(self, name)
            raw = data.encode() if kind == "str" else bytes(data)
            out += _LENGTH.pack(len(raw)) + raw
        return out

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Message:
        size = cls._struct.size
        if len(data) < size:
            raise ProtocolError(f"{cls.__name__} metadata is {len(data)} bytes, needs {size}")
        if cls._flat:
            if len(data) != size:
                raise ProtocolError(f"{cls.__name__} metadata has {len(data) - size} stray bytes")
            return cls(*cls._struct.unpack_from(data))
        data = memoryview(data)
        raw = cls._struct.unpack_from(data)
        kwargs: dict[str, Any] = {}
        index = 0
        for name, count in cls._layout:
            if count:
                kwargs[name] = tuple(raw[index : index + count])
                index += count
            else:
                kwargs[name] = raw[index]
                index += 1
        offset = size
        for name, kind in cls.VARIABLE:
            if len(data) - offset < _LENGTH.size:
                raise ProtocolError(f"{cls.__name__} metadata ends before field {name!r}")
            (length,) = _LENGTH.unpack_from(data, offset)
            offset += _LENGTH.size
            if length > len(data) - offset:
                raise ProtocolError(f"{cls.__name__} field {name!r} overruns the metadata")
            chunk = bytes(data[offset : offset + length])
            offset += length
            if kind == "str":
                try:
                    kwargs[name] = chunk.decode()
                except UnicodeDecodeError:
                    raise ProtocolError(f"{cls.__name__} field {name!r} is not UTF-8") from None
            else:
                kwargs[name] = chunk
        if offset != len(data):
            raise ProtocolError(f"{cls.__name__} metadata has {len(data) - offset} stray bytes")
        return cls(**kwargs)


class Request(Message):
    OPCODE: ClassVar[Opcode]
    # Whether it has a reply, and which, is the opcode's rule (``protocol.rules.RULES``), set there.
    RULE: ClassVar[OpcodeRule]


class Reply(Message):
    pass


# ---------------------------------------------------------------------------------------------
# Session


MODE_SHARE = 0  # work-conserving: idle device time goes to busy tenants by weight
MODE_CAP = 1  # hard cap at the lease's fraction of device time, even when the device is idle
MODES = {"share": MODE_SHARE, "cap": MODE_CAP}


@dataclass(frozen=True)
class Hello(Request):
    """First frame of a connection: ask for ``gpus`` GPUs, each at ``fraction`` or ``memory`` bytes."""

    OPCODE = Opcode.HELLO
    FIXED = (("gpus", "H"), ("fraction", "d"), ("memory", "Q"), ("weight", "d"), ("mode", "B"))
    VARIABLE = (("client_name", "str"),)
    gpus: int
    fraction: float  # 0 when ``memory`` is given
    memory: int  # 0 when ``fraction`` is given
    client_name: str = ""
    weight: float = 0.0  # compute weight; 0 means "the lease's fraction"
    mode: int = MODE_SHARE


HOLD_BY_CONNECTION = 1  # a reservation ends when the connection that made it has gone (and its
HOLD_BY_IDLE_TIMEOUT = 0  # programs have detached); or it lives until released or idle too long


@dataclass(frozen=True)
class Reserve(Request):
    """Reserve GPUs apart from any one connection (a control request): programs ATTACH to the
    reservation with its secret. ``idle_timeout``: seconds without a call on any of its
    connections before the server ends it; 0 asks for the server's longest."""

    OPCODE = Opcode.RESERVE
    FIXED = (
        ("gpus", "H"),
        ("fraction", "d"),
        ("memory", "Q"),
        ("weight", "d"),
        ("mode", "B"),
        ("hold", "B"),
        ("idle_timeout", "d"),
    )
    VARIABLE = (("client_name", "str"), ("only_gpus", "bytes"))
    gpus: int
    fraction: float
    memory: int
    weight: float = 0.0
    mode: int = MODE_SHARE
    hold: int = HOLD_BY_CONNECTION
    idle_timeout: float = 0.0
    client_name: str = ""
    only_gpus: bytes = b""  # u16 server GPU numbers the reservation may use; empty: any

    @staticmethod
    def gpu_list(indices: list[int]) -> bytes:
        """``only_gpus`` from GPU numbers."""
        return struct.pack(f"<{len(indices)}H", *indices)

    def allowed_gpus(self) -> set[int] | None:
        """The GPU numbers of ``only_gpus`` (None: any); ``InvalidValueError`` if it is not a
        list of u16 (a request the server refuses, not a broken frame)."""
        if not self.only_gpus:
            return None
        if len(self.only_gpus) % 2:
            raise InvalidValueError(
                f"RESERVE only_gpus holds {len(self.only_gpus)} bytes, not a list of u16 GPU numbers"
            )
        return set(struct.unpack(f"<{len(self.only_gpus) // 2}H", self.only_gpus))


@dataclass(frozen=True)
class ReserveReply(Reply):
    """The reservation: its id and secret (both needed to attach or release), the server's
    instance id (a new one after every start), the idle timeout granted (0: none) and its GPUs."""

    FIXED = (("reservation", "Q"), ("idle_timeout", "d"))
    VARIABLE = (("secret", "bytes"), ("server_id", "str"), ("grants", "bytes"))
    reservation: int
    idle_timeout: float
    secret: bytes
    server_id: str
    grants: bytes  # DeviceGrant records, as in HelloReply

    @property
    def devices(self) -> list[DeviceGrant]:
        return decode_grants(self.grants)


@dataclass(frozen=True)
class Attach(Request):
    """First frame of a program's session on a reservation (instead of HELLO); the reply is a
    HelloReply with the reservation's GPUs."""

    OPCODE = Opcode.ATTACH
    FIXED = (("reservation", "Q"),)
    VARIABLE = (("secret", "bytes"), ("server_id", "str"), ("client_name", "str"))
    reservation: int
    secret: bytes
    server_id: str
    client_name: str = ""


@dataclass(frozen=True)
class Release(Request):
    """End a reservation (a control request): its programs' sessions are closed with
    LEASE_ENDED and its GPUs go back to the pool."""

    OPCODE = Opcode.RELEASE
    FIXED = (("reservation", "Q"),)
    VARIABLE = (("secret", "bytes"),)
    reservation: int
    secret: bytes


@dataclass(frozen=True)
class Authenticate(Request):
    """A connection's first request on a server that uses tokens: who the client is. The reply
    names the user; a refusal is fatal (AUTH)."""

    OPCODE = Opcode.AUTHENTICATE
    VARIABLE = (("token", "str"),)
    token: str


@dataclass(frozen=True)
class AuthenticateReply(Reply):
    VARIABLE = (("user", "str"),)
    user: str  # empty: the server does not use tokens, and took the connection as anonymous


INFO_BRIEF = 0  # the server's identity, version and clock only (a cheap round trip)
INFO_FULL = 1  # and every GPU, reservation and session


@dataclass(frozen=True)
class ServerInfo(Request):
    """What the server is and holds, as JSON (allowed on any connection, before or after HELLO)."""

    OPCODE = Opcode.SERVER_INFO
    FIXED = (("detail", "B"),)
    detail: int = INFO_FULL


@dataclass(frozen=True)
class ServerInfoReply(Reply):
    VARIABLE = (("info", "str"),)
    info: str  # a JSON object (docs/PROTOCOL.md, section 5.6)


@dataclass(frozen=True)
class DeviceGrant:
    """One leased GPU as the client sees it."""

    index: int  # the client's device number
    server_gpu: int  # the server's GPU number
    total_memory: int
    memory_limit: int
    fraction: float
    weight: float  # compute weight in fair sharing
    mode: int  # MODE_SHARE or MODE_CAP
    name: str
    executor: str

    _FIXED: ClassVar[struct.Struct] = struct.Struct("<HHQQddB")


@dataclass(frozen=True)
class HelloReply(Reply):
    FIXED = (("session_id", "Q"), ("max_payload", "Q"), ("max_metadata", "I"))
    VARIABLE = (("grants", "bytes"),)
    session_id: int
    max_payload: int
    max_metadata: int
    grants: bytes  # DeviceGrant records; use ``devices`` and ``with_devices``

    @classmethod
    def with_devices(
        cls, session_id: int, max_payload: int, max_metadata: int, devices: list[DeviceGrant]
    ) -> HelloReply:
        return cls(session_id, max_payload, max_metadata, encode_grants(devices))

    @property
    def devices(self) -> list[DeviceGrant]:
        return decode_grants(self.grants)


def encode_grants(devices: list[DeviceGrant]) -> bytes:
    """DeviceGrant records, back to back (the ``grants`` of HELLO and RESERVE replies)."""
    out = bytearray()
    for grant in devices:
        out += DeviceGrant._FIXED.pack(
            grant.index,
            grant.server_gpu,
            grant.total_memory,
            grant.memory_limit,
            grant.fraction,
            grant.weight,
            grant.mode,
        )
        for text in (grant.name, grant.executor):
            raw = text.encode()
            out += _LENGTH.pack(len(raw)) + raw
    return bytes(out)


def decode_grants(data: bytes) -> list[DeviceGrant]:
    offset, out = 0, []
    try:
        while offset < len(data):
            fixed = DeviceGrant._FIXED.unpack_from(data, offset)
            offset += DeviceGrant._FIXED.size
            texts = []
            for _ in range(2):
                (length,) = _LENGTH.unpack_from(data, offset)
                offset += _LENGTH.size
                if offset + length > len(data):
                    raise ProtocolError("device record overruns its reply")
                texts.append(data[offset : offset + length].decode())
                offset += length
            out.append(DeviceGrant(*fixed, *texts))
    except (struct.error, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed device record: {exc}") from None
    return out


@dataclass(frozen=True)
class ErrorReply(Reply):
    """Answers a request that failed, or (request id 0) says why the connection is closing."""

    FIXED = (("code", "H"), ("flags", "H"), ("deferred_from", "I"), ("later_failures", "I"))
    VARIABLE = (("message", "str"),)
    code: int
    flags: int  # ERROR_DEFERRED | ERROR_FATAL
    deferred_from: int  # request id of the no-reply call that failed (with ERROR_DEFERRED)
    later_failures: int
    message: str


ERROR_DEFERRED = 0x1  # the error belongs to an earlier no-reply call, not to this request
ERROR_FATAL = 0x2  # the sender closes the connection after this frame


# ---------------------------------------------------------------------------------------------
# Memory


@dataclass(frozen=True)
class MemAlloc(Request):
    OPCODE = Opcode.MEM_ALLOC
    FIXED = (("device", "H"), ("nbytes", "Q"))
    device: int
    nbytes: int


@dataclass(frozen=True)
class MemAllocReply(Reply):
    FIXED = (("ptr", "Q"),)
    ptr: int


@dataclass(frozen=True)
class MemFree(Request):
    OPCODE = Opcode.MEM_FREE
    FIXED = (("device", "H"), ("ptr", "Q"))
    device: int
    ptr: int


@dataclass(frozen=True)
class MemGetInfo(Request):
    OPCODE = Opcode.MEM_GET_INFO
    FIXED = (("device", "H"),)
    device: int


@dataclass(frozen=True)
class MemGetInfoReply(Reply):
    FIXED = (("free", "Q"), ("total", "Q"))
    free: int
    total: int


@dataclass(frozen=True)
class MemcpyHtoD(Request):
    """The payload is the data; its length is the copy size."""

    OPCODE = Opcode.MEMCPY_HTOD
    HAS_PAYLOAD = True
    FIXED = (("device", "H"), ("dst", "Q"), ("stream", "Q"))
    device: int
    dst: int
    stream: int = 0


@dataclass(frozen=True)
class MemcpyDtoH(Request):
    OPCODE = Opcode.MEMCPY_DTOH
    FIXED = (("device", "H"), ("src", "Q"), ("nbytes", "Q"), ("stream", "Q"))
    device: int
    src: int
    nbytes: int
    stream: int = 0


@dataclass(frozen=True)
class MemcpyDtoHReply(Reply):
    """The payload is the data, exactly ``nbytes`` of the request."""

    HAS_PAYLOAD = True


@dataclass(frozen=True)
class MemcpyDtoD(Request):
    OPCODE = Opcode.MEMCPY_DTOD
    FIXED = (("device", "H"), ("dst", "Q"), ("src", "Q"), ("nbytes", "Q"), ("stream", "Q"))
    device: int
    dst: int
    src: int
    nbytes: int
    stream: int = 0


@dataclass(frozen=True)
class Memset(Request):
    OPCODE = Opcode.MEMSET
    FIXED = (
        ("device", "H"),
        ("itemsize", "B"),
        ("value", "I"),
        ("ptr", "Q"),
        ("count", "Q"),
        ("stream", "Q"),
    )
    device: int
    itemsize: int  # 1 (memset_d8), 2 (memset_d16) or 4 (memset_d32); ptr aligned to it
    value: int
    ptr: int
    count: int
    stream: int = 0


@dataclass(frozen=True)
class Synchronize(Request):
    OPCODE = Opcode.SYNCHRONIZE
    FIXED = (("device", "H"),)
    device: int


@dataclass(frozen=True)
class TenantStats(Request):
    """The lease's account on its GPU (after everything sent before it has run)."""

    OPCODE = Opcode.TENANT_STATS
    FIXED = (("device", "H"),)
    device: int


@dataclass(frozen=True)
class TenantStatsReply(Reply):
    FIXED = (
        ("device_time_ns", "Q"),
        ("queue_wait_ns", "Q"),
        ("operations", "Q"),
        ("kernels", "Q"),
        ("memory_used", "Q"),
        ("memory_high_water", "Q"),
    )
    device_time_ns: int  # device time its work used
    queue_wait_ns: int  # time its work waited to start, summed
    operations: int  # operations run (kernels, copies, memsets, ...)
    kernels: int  # kernels launched
    memory_used: int
    memory_high_water: int


@dataclass(frozen=True)
class DeviceAttributes(Request):
    """The device's CUDA attributes (``cuDeviceGetAttribute``); they never change, so a client
    asks once."""

    OPCODE = Opcode.DEVICE_ATTRIBUTES
    FIXED = (("device", "H"),)
    device: int


# One attribute of a DeviceAttributesReply: a CUDA ``CUdevice_attribute`` number and its value
# (a C int in CUDA, so signed: a few attributes, such as HOST_NUMA_ID, may be -1).
DEVICE_ATTRIBUTE_RECORD = struct.Struct("<Ii")


@dataclass(frozen=True)
class DeviceAttributesReply(Reply):
    VARIABLE = (("attributes", "bytes"),)
    attributes: bytes  # (u32 attribute, i32 value) records; use ``from_dict`` and ``as_dict``

    @classmethod
    def from_dict(cls, attributes: Mapping[int, int]) -> DeviceAttributesReply:
        """The reply for ``attributes`` (CUDA attribute number -> value), in ascending order;
        ``ValueError`` for a number or value that does not fit its field."""
        try:
            return cls(
                b"".join(
                    DEVICE_ATTRIBUTE_RECORD.pack(key, attributes[key]) for key in sorted(attributes)
                )
            )
        except struct.error as exc:
            raise ValueError(f"DeviceAttributesReply: {exc}") from None

    def as_dict(self) -> dict[int, int]:
        """The attributes by CUDA attribute number; ``ProtocolError`` if ``attributes`` is not
        whole records, or names an attribute twice."""
        if len(self.attributes) % DEVICE_ATTRIBUTE_RECORD.size:
            raise ProtocolError(
                f"device attributes of {len(self.attributes)} bytes are not whole "
                f"{DEVICE_ATTRIBUTE_RECORD.size}-byte records"
            )
        out: dict[int, int] = {}
        for key, value in DEVICE_ATTRIBUTE_RECORD.iter_unpack(self.attributes):
            if key in out:
                raise ProtocolError(f"device attribute {key} is given twice")
            out[key] = value
        return out


# ---------------------------------------------------------------------------------------------
# Code


@dataclass(frozen=True)
class ModuleLoad(Request):
    """The payload is the module image (PTX text, cubin or fatbin)."""

    OPCODE = Opcode.MODULE_LOAD
    HAS_PAYLOAD = True
    FIXED = (("device", "H"),)
    device: int


@dataclass(frozen=True)
class ModuleLoadReply(Reply):
    FIXED = (("module", "Q"),)
    module: int


@dataclass(frozen=True)
class ModuleUnload(Request):
    OPCODE = Opcode.MODULE_UNLOAD
    FIXED = (("device", "H"), ("module", "Q"))
    device: int
    module: int


@dataclass(frozen=True)
class GetFunction(Request):
    """Module 0 is the built-in kernel library. Empty ``arg_types``: the kernel declares its own."""

    OPCODE = Opcode.GET_FUNCTION
    FIXED = (("device", "H"), ("module", "Q"))
    VARIABLE = (("name", "str"), ("arg_types", "str"))
    device: int
    module: int
    name: str
    arg_types: str = ""


@dataclass(frozen=True)
class GetFunctionReply(Reply):
    FIXED = (("function", "Q"),)
    VARIABLE = (("arg_types", "str"),)
    function: int
    arg_types: str


@dataclass(frozen=True)
class Launch(Request):
    """``args``: the kernel's arguments packed little-endian, unpadded, by its ``arg_types``."""

    OPCODE = Opcode.LAUNCH
    FIXED = (
        ("device", "H"),
        ("function", "Q"),
        ("grid", "3I"),
        ("block", "3I"),
        ("shared_mem", "I"),
        ("stream", "Q"),
    )
    VARIABLE = (("args", "bytes"),)
    device: int
    function: int
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int
    stream: int
    args: bytes = field(default=b"")


@dataclass(frozen=True)
class ModuleGetGlobal(Request):
    """Where a module's global variable (``__device__`` or ``__constant__``) is: ``cuModuleGetGlobal``."""

    OPCODE = Opcode.MODULE_GET_GLOBAL
    FIXED = (("device", "H"), ("module", "Q"))
    VARIABLE = (("name", "str"),)
    device: int
    module: int
    name: str


@dataclass(frozen=True)
class ModuleGetGlobalReply(Reply):
    FIXED = (("ptr", "Q"), ("nbytes", "Q"))
    ptr: int  # its device address: copies and kernels may address [ptr, ptr + nbytes)
    nbytes: int


def kernel_args_format(arg_types: str) -> str:
    """The ``struct`` format of LAUNCH arguments: little-endian, unpadded, a pointer is a u64."""
    return "<" + arg_types.replace("P", "Q")  # struct knows 'P' only in native mode


# ---------------------------------------------------------------------------------------------
# Streams and events


@dataclass(frozen=True)
class StreamCreate(Request):
    OPCODE = Opcode.STREAM_CREATE
    FIXED = (("device", "H"),)
    device: int


@dataclass(frozen=True)
class HandleReply(Reply):
    """The new handle of a STREAM_CREATE or EVENT_CREATE."""

    FIXED = (("handle", "Q"),)
    handle: int


@dataclass(frozen=True)
class StreamDestroy(Request):
    OPCODE = Opcode.STREAM_DESTROY
    FIXED = (("device", "H"), ("stream", "Q"))
    device: int
    stream: int


@dataclass(frozen=True)
class StreamSynchronize(Request):
    OPCODE = Opcode.STREAM_SYNCHRONIZE
    FIXED = (("device", "H"), ("stream", "Q"))
    device: int
    stream: int


@dataclass(frozen=True)
class StreamQuery(Request):
    """Whether all work submitted to the stream has completed (``cuStreamQuery``)."""

    OPCODE = Opcode.STREAM_QUERY
    FIXED = (("device", "H"), ("stream", "Q"))
    device: int
    stream: int


@dataclass(frozen=True)
class QueryReply(Reply):
    """The answer to a STREAM_QUERY or EVENT_QUERY."""

    FIXED = (("done", "B"),)
    done: int  # 1: completed; 0: work is still in flight


@dataclass(frozen=True)
class StreamWaitEvent(Request):
    """Work submitted to ``stream`` after this waits until ``event`` has been reached
    (``cuStreamWaitEvent``)."""

    OPCODE = Opcode.STREAM_WAIT_EVENT
    FIXED = (("device", "H"), ("stream", "Q"), ("event", "Q"))
    device: int
    stream: int
    event: int


@dataclass(frozen=True)
class EventCreate(Request):
    OPCODE = Opcode.EVENT_CREATE
    FIXED = (("device", "H"),)
    device: int


@dataclass(frozen=True)
class EventDestroy(Request):
    OPCODE = Opcode.EVENT_DESTROY
    FIXED = (("device", "H"), ("event", "Q"))
    device: int
    event: int


@dataclass(frozen=True)
class EventRecord(Request):
    OPCODE = Opcode.EVENT_RECORD
    FIXED = (("device", "H"), ("event", "Q"), ("stream", "Q"))
    device: int
    event: int
    stream: int = 0


@dataclass(frozen=True)
class EventSynchronize(Request):
    OPCODE = Opcode.EVENT_SYNCHRONIZE
    FIXED = (("device", "H"), ("event", "Q"))
    device: int
    event: int


@dataclass(frozen=True)
class EventElapsed(Request):
    OPCODE = Opcode.EVENT_ELAPSED
    FIXED = (("device", "H"), ("start", "Q"), ("end", "Q"))
    device: int
    start: int
    end: int


@dataclass(frozen=True)
class EventElapsedReply(Reply):
    FIXED = (("milliseconds", "d"),)
    milliseconds: float


@dataclass(frozen=True)
class EventQuery(Request):
    """Whether the event has been reached (``cuEventQuery``; an event never recorded has)."""

    OPCODE = Opcode.EVENT_QUERY
    FIXED = (("device", "H"), ("event", "Q"))
    device: int
    event: int


@dataclass(frozen=True)
class Keepalive(Reply):
    """Sent by the server, unasked, while it is not reading the client: a client that has gone
    answers at the TCP level (a reset), so its session ends without waiting for the server to read
    again. The client ignores it (docs/PROTOCOL.md, section 10)."""


@dataclass(frozen=True)
class Done(Reply):
    """The empty reply of a request that returns nothing (SYNCHRONIZE, *_SYNCHRONIZE)."""
