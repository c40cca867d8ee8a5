"""The verbs interface (``api``) on a real RDMA device, through rdma-core's pyverbs.

pyverbs is optional (``pip install 'bitfusion-net[rdma]'``) and imported only when a provider is
made, so nothing else pays for it. ``unavailable()`` says why RDMA cannot be used here, naming
which of the three things is missing: pyverbs itself, rdma-core libraries of a version pyverbs
can load (PyPI's pyverbs 59 needs rdma-core >= 59; Debian 12 ships 44), or a device.

Written against pyverbs' source (linux-rdma/rdma-core ``pyverbs/``, v44 to v65); what it does
that the interface must not let through (see also ``../../../docs/RDMA.md``):

- ``ibv_get_cq_event`` blocks holding the GIL, so the channel's fd is made non-blocking and an
  empty read is reported as ``BlockingIOError``, never waited for. ``CompChannel.fd`` exists
  only from rdma-core 57; with an older pyverbs the fd is found in ``/proc/self/fd`` (the
  kernel names it ``anon_inode:[infinibandevent]``).
- ``MR(pd, length, access, address=...)`` registers the caller's own memory in place (``mr.pyx``:
  with ``address`` it allocates nothing); the binding keeps a memoryview of the buffer, which
  also stops a ``bytearray`` from being resized while it is registered.
- ``QPInitAttr`` defaults to ``sq_sig_all=1`` (every send completes): this binding asks for 0,
  so an unsignaled send is unsignaled.
- ``SendWR`` refuses ``num_sge=0`` for RDMA and SEND opcodes (and ``RecvWR`` did before rdma-core
  57), though ibverbs takes it: a zero-length WR is built with a placeholder SGE and then given
  ``num_sge = 0``, so the provider reads none.
- pyverbs' enum modules moved (``pyverbs.enums`` until rdma-core 58, ``pyverbs.libibverbs_enums``
  from 59, whose members are reachable only through their enum classes when it is built with
  Cython >= 3.1). pyverbs stores whatever integer it is given, so ibverbs' ABI numbers
  (``libibverbs/verbs.h``) are used directly.
- ``PyverbsRDMAError.error_code`` is -1 when pyverbs had no errno to give (a GID or device not
  found, for instance): that becomes ``EINVAL``.
- ``pyverbs.base`` calls ``logging.basicConfig(level=INFO)`` when imported; the binding undoes
  that, so the application's own logging set-up still works.
- pyverbs frees an object's C resources when its parent closes (a context its PDs, CQs and
  channels; a PD its MRs and QPs; a CQ its QPs) and would crash on a call through a freed
  pointer, so every object here knows its parents and raises ``EBADF`` once any is closed.
- ``QP.qp_state`` is the state libibverbs last set, not the device's: a fault is learnt from the
  QP's first error completion polled here (or ``to_error``), as the interface says.
- Immediate data travels big-endian (``__be32``; pyverbs passes it through unconverted in
  ``SendWR.imm_data`` and ``WC.imm_data``); it is converted here, so callers see the number
  they sent.
- The PVRDMA provider (VMware) has no inline data, no extended CQs and no dma-buf: this binding
  uses only the legacy ``CQ``/``QP.post_send`` path, and GPU data is staged through host memory.
"""

from __future__ import annotations

import errno
import fcntl
import importlib
import logging
import os
import select
import socket
from types import ModuleType
from typing import Any

from .api import (
    PATH_MTUS,
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
    check_connect_attributes,
    check_send_request,
    check_sge,
    check_u,
)

INSTALL_PYVERBS = (
    "pip install 'bitfusion-net[rdma]' (PyPI's pyverbs, which needs rdma-core libraries of its "
    "own version), or use the system Python with Debian's python3-pyverbs"
)
# What the binding imports; pyverbs.device first (it is the one ``unavailable`` needs).
_MODULES = (
    "pyverbs.device",
    "pyverbs.pd",
    "pyverbs.mr",
    "pyverbs.cq",
    "pyverbs.qp",
    "pyverbs.addr",
    "pyverbs.wr",
)

# ibverbs' ABI numbers (libibverbs/verbs.h), used instead of pyverbs' enum modules (see above).
_IBV_QPT_RC = 2
_IBV_QPS_RESET, _IBV_QPS_RTS = 0, 3
_IBV_QP_STATE = 1 << 0  # enum ibv_qp_attr_mask
_IBV_SEND_SIGNALED, _IBV_SEND_SOLICITED, _IBV_SEND_INLINE = 1 << 1, 1 << 2, 1 << 3
_IBV_WC_WITH_IMM = 1 << 1  # ibv_wc.wc_flags
_IBV_WC_RECV = 1 << 7  # receive-side ibv_wc_opcode values have this bit
_ACCESS_ALL = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ
# The GRH hop limit of the QP's path: GlobalRoute's default of 1 keeps RoCE v2 packets in their
# IP subnet; 64 lets them be routed, as rdma_cm's default does.
_HOP_LIMIT = 64
_WC_STATUSES = {int(s): s for s in WcStatus}
_WC_OPCODES = {int(o): o for o in WcOpcode}
_QP_STATES = {int(s): s for s in QpState}


class RdmaUnavailable(ConnectionError):
    """RDMA cannot be used on this machine; the message says what is missing. A
    ``ConnectionError``: an ``rdma://`` connection fails with it, as a refused one would."""


def _import(name: str) -> ModuleType:
    """Import a pyverbs module without keeping what ``pyverbs.base`` does to logging on import
    (``logging.basicConfig(level=INFO)``: a root handler that would make the application's own
    ``basicConfig`` a no-op)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return importlib.import_module(name)
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)


def unavailable() -> str | None:
    """Why RDMA cannot be used here (pyverbs missing, rdma-core libraries missing or older than
    pyverbs, or no device), or None when a device is ready."""
    try:
        device = _import("pyverbs.device")
    except ImportError as exc:
        return _import_problem(exc)
    except OSError as exc:
        return _libraries_problem(exc)
    for name in _MODULES[1:]:
        try:
            _import(name)
        except ModuleNotFoundError:
            pass  # an incomplete install: ``open`` says so
        except (ImportError, OSError) as exc:  # a symbol version rdma-core lacks, typically
            return _libraries_problem(exc)
    try:
        devices = device.get_device_list()
    except Exception as exc:  # noqa: BLE001 - any failure here is the answer
        # ibv_get_device_list fails (rather than finding none) when the kernel has no RDMA
        # stack at all: no /sys/class/infiniband_verbs, ib_uverbs not loaded.
        return (
            f"no RDMA device on this machine: pyverbs cannot list RDMA devices ({exc}), which "
            "usually means the kernel's RDMA stack (ib_uverbs) is not loaded: load the device's "
            "driver (vmw_pvrdma on VMware, mlx5_ib, or rdma_rxe for Soft-RoCE) and check "
            "ibv_devinfo"
        )
    if not devices:
        return (
            "no RDMA device on this machine (ibv_devices lists none): load its driver "
            "(vmw_pvrdma on VMware, mlx5_ib, or rdma_rxe for Soft-RoCE) and check ibv_devinfo"
        )
    return None


def _import_problem(exc: ImportError) -> str:
    name = exc.name if isinstance(exc, ModuleNotFoundError) else None
    if name == "pyverbs":
        return f"pyverbs is not installed: {INSTALL_PYVERBS}"
    if name and name.startswith("pyverbs."):
        return (
            f"pyverbs is installed but incomplete for this Python ({exc}): its compiled modules "
            f"are missing or were built for another Python version; reinstall it: "
            f"{INSTALL_PYVERBS}"
        )
    return _libraries_problem(exc)


def _libraries_problem(exc: BaseException) -> str:
    return (
        "pyverbs is installed but cannot load the rdma-core libraries it was built for "
        f"({exc}): install rdma-core (libibverbs, librdmacm) of at least pyverbs' version, "
        "or Debian's python3-pyverbs, which matches the system's rdma-core"
    )


def _load() -> dict[str, ModuleType]:
    """Every pyverbs module the binding uses, or ``RdmaUnavailable`` saying why not."""
    try:
        return {name.rpartition(".")[2]: _import(name) for name in _MODULES}
    except ImportError as exc:
        raise RdmaUnavailable(_import_problem(exc)) from None
    except OSError as exc:
        raise RdmaUnavailable(_libraries_problem(exc)) from None


def _pyverbs_errno(exc: BaseException) -> int:
    """The errno of a pyverbs failure. ``PyverbsRDMAError.error_code`` is -1 where pyverbs had
    none to give (``query_gid``, ``Context(name=)`` of an unknown device), a few providers return
    negative errnos, and ``PyverbsUserError`` has none: EINVAL when unknown."""
    code = getattr(exc, "error_code", None)
    if isinstance(code, int) and code not in (0, -1):
        return abs(code)
    return errno.EINVAL


def _verbs_error(exc: BaseException, what: str) -> VerbsError:
    return VerbsError(_pyverbs_errno(exc), f"{what}: {exc}")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class PyverbsProvider(Provider):
    """Devices through pyverbs. Raises ``RdmaUnavailable`` when RDMA cannot be used here."""

    name = "pyverbs"

    def __init__(self) -> None:
        reason = unavailable()
        if reason is not None:
            raise RdmaUnavailable(reason)
        self._device = _import("pyverbs.device")

    def devices(self) -> list[str]:
        return [_text(d.name) for d in self._device.get_device_list()]

    def open(self, device: str | None = None) -> DeviceContext:
        try:
            names = self.devices()
        except Exception as exc:  # noqa: BLE001 - pyverbs raises its own error classes
            raise VerbsError(errno.ENODEV, f"cannot list RDMA devices: {exc}") from None
        if not names or (device is not None and device not in names):
            wanted = f"device {device!r}" if device else "any device"
            raise VerbsError(errno.ENODEV, f"no {wanted}; present: {names or 'none'}")
        modules = _load()
        name = device or names[0]
        try:
            return _Context(modules, modules["device"].Context(name=name), name)
        except Exception as exc:  # noqa: BLE001
            raise _verbs_error(exc, f"opening {name}") from None


class _Node:
    """What every object here shares: it is usable while neither it nor any of its parents is
    closed (pyverbs frees a closed parent's children; a call on one would crash)."""

    _what = "object"
    _closed_as = "closed"
    _closed = False
    _parents: tuple[_Node, ...] = ()

    @property
    def alive(self) -> bool:
        return not self._closed and all(parent.alive for parent in self._parents)

    def _check(self) -> None:
        if self._closed:
            raise VerbsError(errno.EBADF, f"the {self._what} is {self._closed_as}")
        if not self.alive:
            raise VerbsError(errno.EBADF, f"the {self._what} was closed with what it belongs to")


class _Context(_Node, DeviceContext):
    _what = "device context"

    def __init__(self, modules: dict[str, ModuleType], ctx: Any, name: str) -> None:
        self.pv, self.native, self._name = modules, ctx, name

    @property
    def name(self) -> str:
        return self._name

    def gid(self, port: int = 1, index: int = 0) -> bytes:
        self._check()
        try:
            text = self.native.query_gid(port, index).gid  # "fe80:0000:...": 8 groups of 4
        except Exception as exc:  # noqa: BLE001
            raise _verbs_error(exc, f"port {port} GID index {index}") from None
        return bytes.fromhex(text.replace(":", ""))

    def port(self, port: int) -> Any:
        """``query_port``: pyverbs' ``PortAttr`` (``lid``, ``active_mtu``, ``link_layer``)."""
        self._check()
        try:
            return self.native.query_port(port)
        except Exception as exc:  # noqa: BLE001
            raise _verbs_error(exc, f"querying port {port}") from None

    def alloc_pd(self) -> ProtectionDomain:
        self._check()
        try:
            return _Pd(self.pv["pd"].PD(self.native), self)
        except Exception as exc:  # noqa: BLE001
            raise _verbs_error(exc, "allocating a PD") from None

    def create_comp_channel(self) -> CompletionChannel:
        self._check()
        comp_channel = self.pv["cq"].CompChannel
        exposes_fd = hasattr(comp_channel, "fd")  # rdma-core >= 57
        before = {} if exposes_fd else _event_fds()
        try:
            channel = comp_channel(self.native)
        except Exception as exc:  # noqa: BLE001
            raise _verbs_error(exc, "creating a completion channel") from None
        if exposes_fd:
            fd = int(channel.fd)
        else:
            new = [fd for fd, link in _event_fds().items() if before.get(fd) != link]
            if len(new) != 1:
                channel.close()
                raise VerbsError(
                    errno.EOPNOTSUPP,
                    f"this pyverbs does not expose a completion channel's fd (rdma-core >= 57 "
                    f"does), and it could not be told apart ({len(new)} new event fds)",
                )
            fd = new[0]
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)  # never block with the GIL
        except OSError as exc:
            channel.close()
            raise VerbsError(
                exc.errno or errno.EINVAL, f"making channel fd {fd} non-blocking"
            ) from None
        return _Channel(channel, fd, self)

    def create_cq(self, cqe: int, channel: CompletionChannel | None = None) -> CompletionQueue:
        if isinstance(cqe, bool) or not isinstance(cqe, int) or cqe < 1:
            raise ValueError(f"a CQ holds at least one completion, not {cqe!r}")
        self._check()
        native_channel = None
        if channel is not None:
            if not isinstance(channel, _Channel) or channel.context is not self:
                raise VerbsError(errno.EINVAL, "the channel is of another context")
            channel._check()
            if channel.cq is not None and channel.cq.alive:
                raise VerbsError(errno.EBUSY, "the channel already serves a CQ")
            native_channel = channel.native
        try:
            native = self.pv["cq"].CQ(self.native, cqe, None, native_channel, 0)
        except Exception as exc:  # noqa: BLE001
            raise _verbs_error(exc, f"creating a CQ of {cqe}") from None
        cq = _Cq(native, cqe, channel if isinstance(channel, _Channel) else None, self)
        if cq.channel is not None:
            cq.channel.cq = cq
        return cq

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True  # pyverbs closes what was made from it, first
        try:
            self.native.close()
        except Exception as exc:  # noqa: BLE001
            raise _verbs_error(exc, f"closing {self._name}") from None


def _event_fds() -> dict[int, str]:
    """This process's ib_uverbs event fds (completion channels and async event fds)."""
    found: dict[int, str] = {}
    try:
        entries = os.listdir("/proc/self/fd")
    except OSError:
        return found
    for entry in entries:
        try:
            link = os.readlink(f"/proc/self/fd/{entry}")
        except OSError:
            continue
        if "infinibandevent" in link:
            found[int(entry)] = link
    return found


class _Pd(_Node, ProtectionDomain):
    _what = "protection domain"

    def __init__(self, pd: Any, context: _Context) -> None:
        self.native, self.context = pd, context
        self._parents = (context,)

    def register(self, buffer: memoryview | bytearray, access: Access) -> MemoryRegion:
        try:
            view = memoryview(buffer)
        except TypeError:
            raise ValueError(f"register needs a buffer, not {type(buffer).__name__}") from None
        if view.readonly or not view.c_contiguous or view.nbytes < 1:
            raise ValueError("register needs a writable, C-contiguous buffer of at least 1 byte")
        if isinstance(access, bool) or not isinstance(access, int) or access & ~_ACCESS_ALL:
            raise ValueError(f"access must be a combination of Access flags, not {access!r}")
        self._check()
        if access & Access.REMOTE_WRITE and not access & Access.LOCAL_WRITE:
            raise VerbsError(errno.EINVAL, "REMOTE_WRITE needs LOCAL_WRITE")
        view = view.cast("B")
        address = _address(view)
        try:
            mr = self.context.pv["mr"].MR(self.native, view.nbytes, int(access), address=address)
        except Exception as exc:  # noqa: BLE001
            raise _verbs_error(exc, f"registering {view.nbytes} bytes") from None
        return _Mr(mr, view, address, Access(access), self)

    def create_qp(
        self,
        send_cq: CompletionQueue,
        recv_cq: CompletionQueue,
        max_send_wr: int,
        max_recv_wr: int,
        max_inline: int = 0,
        *,
        port: int = 1,
        gid_index: int = 0,
    ) -> QueuePair:
        if max_send_wr < 1 or max_recv_wr < 1 or max_inline < 0:
            raise ValueError("a QP needs room for at least one send and one receive")
        self._check()
        for cq in (send_cq, recv_cq):
            if not isinstance(cq, _Cq) or cq.context is not self.context:
                raise VerbsError(errno.EINVAL, "the CQs must be of this PD's device context")
            if not cq.alive:
                raise VerbsError(errno.EINVAL, "a CQ is closed")
        assert isinstance(send_cq, _Cq) and isinstance(recv_cq, _Cq)
        self.context.gid(port, gid_index)  # EINVAL now for a port or GID index not there
        qp_module = self.context.pv["qp"]
        cap = qp_module.QPCap(max_send_wr=max_send_wr, max_recv_wr=max_recv_wr,
                              max_send_sge=1, max_recv_sge=1, max_inline_data=max_inline)  # fmt: skip
        # sq_sig_all defaults to 1 in pyverbs' QPInitAttr: every send would complete.
        init = qp_module.QPInitAttr(qp_type=_IBV_QPT_RC, scq=send_cq.native, rcq=recv_cq.native,
                                    cap=cap, sq_sig_all=0)  # fmt: skip
        try:
            qp = qp_module.QP(self.native, init)
        except Exception as exc:  # noqa: BLE001
            raise _verbs_error(exc, "creating an RC QP") from None
        return _Qp(qp, self, send_cq, recv_cq, max_inline, port, gid_index)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True  # pyverbs deregisters its MRs and destroys its QPs first
        try:
            self.native.close()
        except Exception as exc:  # noqa: BLE001
            raise _verbs_error(exc, "freeing the PD") from None


def _address(view: memoryview) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class _Mr(_Node, MemoryRegion):
    _what = "memory region"
    _closed_as = "deregistered"

    def __init__(self, mr: Any, view: memoryview, address: int, access: Access, pd: _Pd) -> None:
        self.native, self._addr, self._access = mr, address, access
        self._view: memoryview | None = view  # also keeps a bytearray from being resized
        self._length = view.nbytes
        self._lkey, self._rkey = int(mr.lkey), int(mr.rkey)  # mr.lkey crashes once freed
        self._parents = (pd,)

    @property
    def addr(self) -> int:
        return self._addr

    @property
    def length(self) -> int:
        return self._length

    @property
    def lkey(self) -> int:
        return self._lkey

    @property
    def rkey(self) -> int:
        return self._rkey

    @property
    def access(self) -> Access:
        return self._access

    @property
    def view(self) -> memoryview:
        self._check()
        assert self._view is not None
        return self._view

    def deregister(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._view = None  # the buffer is the caller's again
        try:
            self.native.close()  # does nothing if its PD or context already deregistered it
        except Exception as exc:  # noqa: BLE001
            raise _verbs_error(exc, "deregistering the memory region") from None


class _Channel(_Node, CompletionChannel):
    _what = "completion channel"

    def __init__(self, channel: Any, fd: int, context: _Context) -> None:
        self.native, self._fd, self.context = channel, fd, context
        self.cq: _Cq | None = None
        self._parents = (context,)
        # Asked before each read: an empty channel is then EAGAIN without relying on the errno
        # pyverbs reads after ibv_get_cq_event's failed read (PyverbsRDMAErrno, base.pyx).
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN)

    @property
    def fd(self) -> int:
        self._check()
        return self._fd

    def get_event(self) -> CompletionQueue:
        self._check()
        cq = self.cq
        if cq is None or not cq.alive:
            raise BlockingIOError(errno.EAGAIN, "the channel serves no CQ")
        if not self._poller.poll(0):
            raise BlockingIOError(errno.EAGAIN, "no completion event")
        try:
            self.native.get_cq_event(cq.native)  # the fd is non-blocking: EAGAIN, not a wait
        except Exception as exc:  # noqa: BLE001
            if _pyverbs_errno(exc) in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise BlockingIOError(errno.EAGAIN, "no completion event") from None
            raise _verbs_error(exc, "getting a completion event") from None
        cq.unacked += 1
        return cq

    def close(self) -> None:
        if self._closed:
            return
        if self.cq is not None and self.cq.alive:
            raise VerbsError(errno.EBUSY, "a CQ still uses this channel: close it first")
        self._closed = True
        try:
            self.native.close()
        except Exception as exc:  # noqa: BLE001
            raise _verbs_error(exc, "destroying the completion channel") from None


class _Cq(_Node, CompletionQueue):
    _what = "completion queue"

    def __init__(self, cq: Any, cqe: int, channel: _Channel | None, context: _Context) -> None:
        self.native, self.channel, self.context = cq, channel, context
        try:
            self._capacity = max(cqe, int(cq.cqe))  # the device rounds up
        except Exception:  # noqa: BLE001 - a pyverbs without CQ.cqe
            self._capacity = cqe
        self.unacked = 0
        self.qps: dict[int, _Qp] = {}  # by QP number: an error completion marks its QP errored
        self._parents = (context,)

    @property
    def capacity(self) -> int:
        return self._capacity

    def poll(self, max_entries: int = 16) -> list[WorkCompletion]:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"poll takes at least one entry, not {max_entries!r}")
        self._check()
        try:
            _count, wcs = self.native.poll(max_entries)
        except Exception as exc:  # noqa: BLE001
            raise _verbs_error(exc, "polling the CQ") from None
        completions = [_completion(wc) for wc in wcs]
        for wc in completions:
            if not wc.ok:  # on RC every error completion means its QP is in ERR
                qp = self.qps.get(wc.qp_num)
                if qp is not None:
                    qp.errored = True
        return completions

    def req_notify(self, solicited_only: bool = False) -> None:
        self._check()
        if self.channel is None:
            raise VerbsError(errno.EINVAL, "the CQ has no completion channel")
        try:
            self.native.req_notify(1 if solicited_only else 0)
        except Exception as exc:  # noqa: BLE001
            raise _verbs_error(exc, "arming the CQ") from None

    def ack_events(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.unacked:
            raise ValueError(f"{n!r} events to acknowledge, {self.unacked} unacknowledged")
        self._check()
        self.native.ack_events(n)
        self.unacked -= n

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True  # pyverbs destroys the QPs still using it, and acks its events
        self.qps.clear()
        if self.channel is not None and self.channel.cq is self:
            self.channel.cq = None
        try:
            self.native.close()
        except Exception as exc:  # noqa: BLE001
            raise _verbs_error(exc, "destroying the CQ") from None


def _completion(wc: Any) -> WorkCompletion:
    status = _WC_STATUSES.get(int(wc.status), WcStatus.GENERAL_ERR)
    if status is not WcStatus.SUCCESS:  # opcode, byte_len and imm_data are undefined
        return WorkCompletion(int(wc.wr_id), status, WcOpcode.SEND, 0, int(wc.qp_num), None)
    code = int(wc.opcode)
    opcode = _WC_OPCODES.get(code) or (WcOpcode.RECV if code & _IBV_WC_RECV else WcOpcode.SEND)
    imm = socket.ntohl(int(wc.imm_data)) if int(wc.wc_flags) & _IBV_WC_WITH_IMM else None
    return WorkCompletion(int(wc.wr_id), status, opcode, int(wc.byte_len), int(wc.qp_num), imm)


def _gid_text(gid: bytes) -> str:
    text = gid.hex()
    return ":".join(text[i : i + 4] for i in range(0, 32, 4))  # what pyverbs' GID() parses


class _Qp(_Node, QueuePair):
    _what = "queue pair"

    def __init__(
        self,
        qp: Any,
        pd: _Pd,
        send_cq: _Cq,
        recv_cq: _Cq,
        max_inline: int,
        port: int,
        gid_index: int,
    ) -> None:
        self.native, self._context = qp, pd.context
        self._port, self._gid_index, self._max_inline = port, gid_index, max_inline
        self._qpn = int(qp.qp_num)
        self._psn = 0
        self.errored = False  # an error completion of it was polled, or to_error
        self._parents = (pd, send_cq, recv_cq)
        self._cqs = (send_cq, recv_cq)
        for cq in self._cqs:
            cq.qps[self._qpn] = self
        wr = pd.context.pv["wr"]
        self._sge, self._send_wr, self._recv_wr = wr.SGE, wr.SendWR, wr.RecvWR

    @property
    def qpn(self) -> int:
        return self._qpn

    def _native_state(self) -> int:
        return int(self.native.qp_state)  # ibv_qp.state: what the last modify set

    @property
    def state(self) -> QpState:
        self._check()
        if self.errored:
            return QpState.ERR
        return _QP_STATES.get(self._native_state(), QpState.ERR)  # 7: IBV_QPS_UNKNOWN

    def endpoint(self, psn: int) -> QpEndpoint:
        check_u(psn, 24, "psn")
        self._check()
        self._psn = psn
        gid = self._context.gid(self._port, self._gid_index)
        return QpEndpoint(self._qpn, psn, gid, int(self._context.port(self._port).lid))

    def connect(
        self,
        remote: QpEndpoint,
        *,
        access: Access = Access.LOCAL_WRITE | Access.REMOTE_WRITE | Access.REMOTE_READ,
        path_mtu: int = 1024,
        rnr_retry: int = 7,
        retry_count: int = 7,
        min_rnr_timer: int = 12,
        ack_timeout: int = 14,
    ) -> None:
        check_connect_attributes(
            remote, path_mtu, rnr_retry, retry_count, min_rnr_timer, ack_timeout
        )
        if isinstance(access, bool) or not isinstance(access, int) or access & ~_ACCESS_ALL:
            raise ValueError(f"access must be a combination of Access flags, not {access!r}")
        self._check()
        if self.errored or self._native_state() != _IBV_QPS_RESET:
            raise VerbsError(errno.EINVAL, f"connect needs a QP in RESET, not {self.state.name}")
        mtu = PATH_MTUS.index(path_mtu) + 1  # enum ibv_mtu: IBV_MTU_256 is 1
        active = int(self._context.port(self._port).active_mtu)
        if 1 <= active <= len(PATH_MTUS) and mtu > active:
            # Hardware would take it and drop every packet longer than the link's MTU: the
            # first large send would fail with RETRY_EXC_ERR, saying nothing of why.
            raise VerbsError(
                errno.EINVAL,
                f"path MTU {path_mtu} exceeds port {self._port}'s active MTU "
                f"{PATH_MTUS[active - 1]} (on Ethernet, the interface MTU limits it)",
            )
        pv = self._context.pv
        attr = pv["qp"].QPAttr(port_num=self._port)
        attr.pkey_index = 0
        attr.qp_access_flags = int(access)
        attr.path_mtu = mtu
        attr.dest_qp_num, attr.rq_psn, attr.sq_psn = remote.qpn, remote.psn, self._psn
        attr.max_dest_rd_atomic = attr.max_rd_atomic = 1
        attr.min_rnr_timer, attr.timeout = min_rnr_timer, ack_timeout
        attr.retry_cnt, attr.rnr_retry = retry_count, rnr_retry
        addr = pv["addr"]
        # Always GRH-addressed: RoCE (PVRDMA included) routes by GID and needs it; on InfiniBand
        # the LID routes and the GRH is harmless.
        route = addr.GlobalRoute(dgid=addr.GID(_gid_text(remote.gid)),
                                 sgid_index=self._gid_index, hop_limit=_HOP_LIMIT)  # fmt: skip
        attr.ah_attr = addr.AHAttr(dlid=remote.lid, is_global=1, port_num=self._port, gr=route)
        try:
            # RESET -> INIT -> RTR -> RTS, each with the attribute mask qp.pyx's
            # _get_comp_mask gives an RC QP.
            self.native.to_rts(attr)
        except Exception as exc:  # noqa: BLE001
            self._reset()  # a failure half-way leaves it in INIT or RTR: nothing changed
            raise _verbs_error(exc, f"connecting QP {self._qpn} to {remote.qpn}") from None

    def _reset(self) -> None:
        try:
            self.native.modify(self._context.pv["qp"].QPAttr(qp_state=_IBV_QPS_RESET),
                               _IBV_QP_STATE)  # fmt: skip
        except Exception:  # noqa: BLE001 - best effort: the error that led here is raised
            pass

    def post_recv(self, wr_id: int, sge: Sge | None) -> None:
        check_u(wr_id, 64, "wr_id")
        check_sge(sge)
        self._check()
        if self._native_state() == _IBV_QPS_RESET and not self.errored:
            raise VerbsError(errno.EINVAL, "posting a receive to a QP in RESET")
        if sge is not None and sge.length:
            request = self._recv_wr(wr_id=wr_id, num_sge=1,
                                    sg=[self._sge(sge.addr, sge.length, sge.lkey)])  # fmt: skip
        else:
            # Zero SGEs (for an RDMA WRITE with immediate): pyverbs before rdma-core 57 refused
            # num_sge=0, so a placeholder is given and then not counted.
            request = self._recv_wr(wr_id=wr_id, num_sge=1, sg=[self._sge(0, 0, 0)])
            request.num_sge = 0
        try:
            self.native.post_recv(request)
        except Exception as exc:  # noqa: BLE001
            raise _verbs_error(exc, "posting a receive") from None

    def post_send(
        self,
        wr_id: int,
        opcode: WrOpcode,
        sge: Sge | None,
        *,
        remote_addr: int = 0,
        rkey: int = 0,
        imm_data: int | None = None,
        signaled: bool = True,
        solicited: bool = False,
        inline: bool = False,
    ) -> None:
        check_send_request(wr_id, opcode, sge, remote_addr, rkey, imm_data, inline)
        self._check()
        if self._native_state() < _IBV_QPS_RTS and not self.errored:
            raise VerbsError(errno.EINVAL, "posting a send to a QP that is not in RTS")
        length = sge.length if sge is not None else 0
        if inline and length > self._max_inline:
            raise VerbsError(
                errno.EINVAL, f"{length} bytes inline, the QP takes {self._max_inline}"
            )
        flags = _IBV_SEND_SIGNALED if signaled else 0
        flags |= _IBV_SEND_SOLICITED if solicited else 0
        flags |= _IBV_SEND_INLINE if inline else 0
        imm = socket.htonl(imm_data) if imm_data is not None else 0  # __be32 on the wire
        if sge is not None and length:
            sg = [self._sge(sge.addr, length, sge.lkey)]
        else:
            sg = [self._sge(0, 0, 0)]  # SendWR refuses num_sge=0 (wr.pyx): a placeholder
        request = self._send_wr(wr_id=wr_id, opcode=int(opcode), num_sge=1, imm_data=imm,
                                sg=sg, send_flags=flags)  # fmt: skip
        if not length:
            request.num_sge = 0  # ... that the provider does not read
        if opcode.one_sided:
            request.set_wr_rdma(rkey, remote_addr)
        try:
            self.native.post_send(request)
        except Exception as exc:  # noqa: BLE001
            raise _verbs_error(exc, f"posting {opcode.name}") from None

    def to_error(self) -> None:
        self._check()
        attr = self._context.pv["qp"].QPAttr(qp_state=int(QpState.ERR))
        try:
            self.native.modify(attr, _IBV_QP_STATE)
        except Exception as exc:  # noqa: BLE001
            raise _verbs_error(exc, f"moving QP {self._qpn} to ERR") from None
        self.errored = True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for cq in self._cqs:
            if cq.qps.get(self._qpn) is self:
                del cq.qps[self._qpn]
        try:
            self.native.close()  # does nothing if its PD, CQ or context already destroyed it
        except Exception as exc:  # noqa: BLE001
            raise _verbs_error(exc, f"destroying QP {self._qpn}") from None
