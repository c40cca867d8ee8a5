"""The verbs interface (``api``) on a real RDMA device, through rdma-core's pyverbs.

pyverbs is optional (``pip install 'bitfusion-net[rdma]'``) and imported only when a provider is
made, so nothing else pays for it. ``unavailable()`` says why RDMA cannot be used here, naming
which of the three things is missing: pyverbs itself, rdma-core libraries of a version pyverbs
can load (PyPI's pyverbs 59 needs rdma-core >= 59; Debian 12 ships 44), or a device.

What pyverbs does that the interface must not let through (see ``../../../docs/RDMA.md``):

- ``ibv_get_cq_event`` blocks holding the GIL, so the channel's fd is made non-blocking and an
  empty read is reported as ``BlockingIOError``, never waited for.
- ``MR(pd, length, access, address=...)`` registers the caller's own memory in place; the object
  keeps the buffer alive for as long as it is registered.
- Immediate data travels big-endian (``__be32``); it is converted here, so callers see the
  number they sent.
- The PVRDMA provider (VMware) has no inline data, no extended CQs and no dma-buf: this binding
  uses only the legacy ``CQ``/``QP.post_send`` path, and GPU data is staged through host memory.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
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
_WC_WITH_IMM = 2  # IBV_WC_WITH_IMM in ibv_wc.wc_flags


class RdmaUnavailable(ConnectionError):
    """RDMA cannot be used on this machine; the message says what is missing. A
    ``ConnectionError``: an ``rdma://`` connection fails with it, as a refused one would."""


def unavailable() -> str | None:
    """Why RDMA cannot be used here (pyverbs missing, rdma-core libraries missing or older than
    pyverbs, or no device), or None when a device is ready."""
    try:
        import pyverbs.device as device
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "pyverbs":
            return f"pyverbs is not installed: {INSTALL_PYVERBS}"
        return _libraries_problem(exc)
    except (ImportError, OSError) as exc:
        return _libraries_problem(exc)
    try:
        devices = device.get_device_list()
    except Exception as exc:  # noqa: BLE001 - any failure here is the answer
        return f"pyverbs cannot list RDMA devices: {exc}"
    if not devices:
        return (
            "no RDMA device on this machine (ibv_devices lists none): load its driver "
            "(vmw_pvrdma on VMware, mlx5_ib, or rdma_rxe for Soft-RoCE) and check ibv_devinfo"
        )
    return None


def _libraries_problem(exc: BaseException) -> str:
    return (
        "pyverbs is installed but cannot load the rdma-core libraries it was built for "
        f"({exc}): install rdma-core (libibverbs, librdmacm) of at least pyverbs' version, "
        "or Debian's python3-pyverbs, which matches the system's rdma-core"
    )


def _pyverbs_errno(exc: BaseException) -> int:
    return int(getattr(exc, "error_code", 0) or errno.EINVAL)


def _verbs_error(exc: BaseException, what: str) -> VerbsError:
    return VerbsError(_pyverbs_errno(exc), f"{what}: {exc}")


class PyverbsProvider(Provider):
    """Devices through pyverbs. Raises ``RdmaUnavailable`` when RDMA cannot be used here."""

    name = "pyverbs"

    def __init__(self) -> None:
        reason = unavailable()
        if reason is not None:
            raise RdmaUnavailable(reason)
        import pyverbs.device

        self._device = pyverbs.device

    def devices(self) -> list[str]:
        return [_text(d.name) for d in self._device.get_device_list()]

    def open(self, device: str | None = None) -> DeviceContext:
        names = self.devices()
        if not names or (device is not None and device not in names):
            wanted = f"device {device!r}" if device else "any device"
            raise VerbsError(errno.ENODEV, f"no {wanted}; present: {names or 'none'}")
        name = device or names[0]
        try:
            return _Context(self._device.Context(name=name), name)
        except Exception as exc:  # noqa: BLE001 - pyverbs raises its own error classes
            raise _verbs_error(exc, f"opening {name}") from None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Context(DeviceContext):
    def __init__(self, ctx: Any, name: str) -> None:
        self._ctx, self._name = ctx, name

    @property
    def name(self) -> str:
        return self._name

    def gid(self, port: int = 1, index: int = 0) -> bytes:
        try:
            text = self._ctx.query_gid(port, index).gid
        except Exception as exc:  # noqa: BLE001
            raise _verbs_error(exc, f"port {port} GID {index}") from None
        return bytes.fromhex(text.replace(":", ""))

    def lid(self, port: int = 1) -> int:
        return int(self._ctx.query_port(port).lid)

    def alloc_pd(self) -> ProtectionDomain:
        from pyverbs.pd import PD

        try:
            return _Pd(PD(self._ctx), self)
        except Exception as exc:  # noqa: BLE001
            raise _verbs_error(exc, "allocating a PD") from None

    def create_comp_channel(self) -> CompletionChannel:
        from pyverbs.cq import CompChannel

        try:
            channel = CompChannel(self._ctx)
        except Exception as exc:  # noqa: BLE001
            raise _verbs_error(exc, "creating a completion channel") from None
        flags = fcntl.fcntl(channel.fd, fcntl.F_GETFL)
        fcntl.fcntl(channel.fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)  # never block with the GIL
        return _Channel(channel, self)

    def create_cq(self, cqe: int, channel: CompletionChannel | None = None) -> CompletionQueue:
        from pyverbs.cq import CQ

        if cqe < 1:
            raise ValueError(f"a CQ holds at least one completion, not {cqe}")
        native_channel = None
        if channel is not None:
            if not isinstance(channel, _Channel) or channel.context is not self:
                raise VerbsError(errno.EINVAL, "the channel is of another context")
            if channel.cq is not None:
                raise VerbsError(errno.EBUSY, "the channel already serves a CQ")
            native_channel = channel.native
        try:
            cq = _Cq(CQ(self._ctx, cqe, None, native_channel, 0), cqe, channel)
        except Exception as exc:  # noqa: BLE001
            raise _verbs_error(exc, f"creating a CQ of {cqe}") from None
        if isinstance(channel, _Channel):
            channel.cq = cq
        return cq

    def close(self) -> None:
        self._ctx.close()


class _Pd(ProtectionDomain):
    def __init__(self, pd: Any, context: _Context) -> None:
        self._pd, self.context = pd, context

    def register(self, buffer: memoryview | bytearray, access: Access) -> MemoryRegion:
        from pyverbs.mr import MR

        view = memoryview(buffer)
        if view.readonly or not view.c_contiguous or view.nbytes < 1:
            raise ValueError("register needs a writable, C-contiguous buffer of at least 1 byte")
        if access & Access.REMOTE_WRITE and not access & Access.LOCAL_WRITE:
            raise VerbsError(errno.EINVAL, "REMOTE_WRITE needs LOCAL_WRITE")
        view = view.cast("B")
        address = _address(view)
        try:
            mr = MR(self._pd, view.nbytes, int(access), address=address)
        except Exception as exc:  # noqa: BLE001
            raise _verbs_error(exc, f"registering {view.nbytes} bytes") from None
        return _Mr(mr, view, address, access)

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
        import pyverbs.enums as e
        from pyverbs.qp import QP, QPCap, QPInitAttr

        if max_send_wr < 1 or max_recv_wr < 1 or max_inline < 0:
            raise ValueError("a QP needs room for at least one send and one receive")
        if not isinstance(send_cq, _Cq) or not isinstance(recv_cq, _Cq):
            raise VerbsError(errno.EINVAL, "the CQs must be this binding's")
        cap = QPCap(max_send_wr=max_send_wr, max_recv_wr=max_recv_wr, max_send_sge=1,
                    max_recv_sge=1, max_inline_data=max_inline)  # fmt: skip
        init = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=send_cq.native, rcq=recv_cq.native, cap=cap)
        try:
            qp = QP(self._pd, init)
        except Exception as exc:  # noqa: BLE001
            raise _verbs_error(exc, "creating an RC QP") from None
        return _Qp(qp, self.context, port, gid_index)

    def close(self) -> None:
        self._pd.close()


def _address(view: memoryview) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class _Mr(MemoryRegion):
    def __init__(self, mr: Any, view: memoryview, address: int, access: Access) -> None:
        self._mr, self._view, self._addr, self._access = mr, view, address, access
        self._registered = True

    @property
    def addr(self) -> int:
        return self._addr

    @property
    def length(self) -> int:
        return self._view.nbytes

    @property
    def lkey(self) -> int:
        return int(self._mr.lkey)

    @property
    def rkey(self) -> int:
        return int(self._mr.rkey)

    @property
    def access(self) -> Access:
        return self._access

    @property
    def view(self) -> memoryview:
        if not self._registered:
            raise VerbsError(errno.EBADF, "the memory region is deregistered")
        return self._view

    def deregister(self) -> None:
        if self._registered:
            self._registered = False
            self._mr.close()


class _Channel(CompletionChannel):
    def __init__(self, channel: Any, context: _Context) -> None:
        self.native, self.context = channel, context
        self.cq: _Cq | None = None

    @property
    def fd(self) -> int:
        return int(self.native.fd)

    def get_event(self) -> CompletionQueue:
        if self.cq is None:
            raise BlockingIOError(errno.EAGAIN, "the channel serves no CQ")
        try:
            self.native.get_cq_event(self.cq.native)
        except Exception as exc:  # noqa: BLE001
            if _pyverbs_errno(exc) in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise BlockingIOError(errno.EAGAIN, "no completion event") from None
            raise _verbs_error(exc, "getting a completion event") from None
        self.cq.unacked += 1
        return self.cq

    def close(self) -> None:
        if self.cq is not None and not self.cq.closed:
            raise VerbsError(errno.EBUSY, "a CQ still uses this channel")
        self.native.close()


class _Cq(CompletionQueue):
    def __init__(self, cq: Any, cqe: int, channel: CompletionChannel | None) -> None:
        self.native, self._capacity, self._channel = cq, cqe, channel
        self.unacked = 0
        self.closed = False

    @property
    def capacity(self) -> int:
        return self._capacity

    def poll(self, max_entries: int = 16) -> list[WorkCompletion]:
        if max_entries < 1:
            raise ValueError(f"poll takes at least one entry, not {max_entries}")
        try:
            _count, wcs = self.native.poll(max_entries)
        except Exception as exc:  # noqa: BLE001
            raise _verbs_error(exc, "polling the CQ") from None
        return [_completion(wc) for wc in wcs]

    def req_notify(self, solicited_only: bool = False) -> None:
        if self._channel is None:
            raise VerbsError(errno.EINVAL, "the CQ has no completion channel")
        self.native.req_notify(solicited_only)

    def ack_events(self, n: int) -> None:
        if n < 0 or n > self.unacked:
            raise ValueError(f"{n} events to acknowledge, {self.unacked} unacknowledged")
        self.native.ack_events(n)
        self.unacked -= n

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.native.close()  # acknowledges what is outstanding


def _completion(wc: Any) -> WorkCompletion:
    status = WcStatus(wc.status)
    imm = socket.ntohl(wc.imm_data) if wc.wc_flags & _WC_WITH_IMM else None
    opcode = WcOpcode(wc.opcode) if status is WcStatus.SUCCESS else WcOpcode.SEND
    return WorkCompletion(int(wc.wr_id), status, opcode, int(wc.byte_len), int(wc.qp_num), imm)


class _Qp(QueuePair):
    def __init__(self, qp: Any, context: _Context, port: int, gid_index: int) -> None:
        self._qp, self._context, self._port, self._gid_index = qp, context, port, gid_index
        self._psn = 0

    @property
    def qpn(self) -> int:
        return int(self._qp.qp_num)

    @property
    def state(self) -> QpState:
        return QpState(int(self._qp.qp_state))

    def endpoint(self, psn: int) -> QpEndpoint:
        if not 0 <= psn < 1 << 24:
            raise ValueError(f"a PSN is 24 bits, not {psn}")
        self._psn = psn
        gid = self._context.gid(self._port, self._gid_index)
        return QpEndpoint(self.qpn, psn, gid, self._context.lid(self._port))

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
        from pyverbs.addr import GID, AHAttr, GlobalRoute
        from pyverbs.qp import QPAttr

        check_connect_attributes(
            remote, path_mtu, rnr_retry, retry_count, min_rnr_timer, ack_timeout
        )
        if self.state is not QpState.RESET:
            raise VerbsError(errno.EINVAL, f"connect needs a QP in RESET, not {self.state.name}")
        attr = QPAttr(port_num=self._port)
        attr.qp_access_flags = int(access)
        attr.path_mtu = PATH_MTUS.index(path_mtu) + 1  # IBV_MTU_256 is 1
        attr.dest_qp_num, attr.rq_psn, attr.sq_psn = remote.qpn, remote.psn, self._psn
        attr.max_dest_rd_atomic = attr.max_rd_atomic = 1
        attr.min_rnr_timer, attr.timeout = min_rnr_timer, ack_timeout
        attr.retry_cnt, attr.rnr_retry = retry_count, rnr_retry
        text = remote.gid.hex()
        route = GlobalRoute(
            dgid=GID(":".join(text[i : i + 4] for i in range(0, 32, 4))),
            sgid_index=self._gid_index,
        )
        attr.ah_attr = AHAttr(port_num=self._port, is_global=1, gr=route, dlid=remote.lid)
        try:
            self._qp.to_rts(attr)
        except Exception as exc:  # noqa: BLE001
            raise _verbs_error(exc, f"connecting QP {self.qpn} to {remote.qpn}") from None

    def post_recv(self, wr_id: int, sge: Sge | None) -> None:
        from pyverbs.wr import SGE, RecvWR

        check_u(wr_id, 64, "wr_id")
        check_sge(sge)
        sg = [SGE(sge.addr, sge.length, sge.lkey)] if sge is not None and sge.length else None
        try:
            self._qp.post_recv(RecvWR(wr_id=wr_id, num_sge=len(sg or ()), sg=sg))
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
        import pyverbs.enums as e
        from pyverbs.wr import SGE, SendWR

        check_send_request(wr_id, opcode, sge, remote_addr, rkey, imm_data, inline)
        flags = (e.IBV_SEND_SIGNALED if signaled else 0) | (
            e.IBV_SEND_SOLICITED if solicited else 0
        )
        flags |= e.IBV_SEND_INLINE if inline else 0
        sg = [SGE(sge.addr, sge.length, sge.lkey)] if sge is not None and sge.length else None
        request = SendWR(
            wr_id=wr_id,
            opcode=int(opcode),
            num_sge=len(sg or ()),
            imm_data=socket.htonl(imm_data) if imm_data is not None else 0,
            sg=sg,
            send_flags=flags,
        )
        if opcode.one_sided:
            request.set_wr_rdma(rkey, remote_addr)
        try:
            self._qp.post_send(request)
        except Exception as exc:  # noqa: BLE001
            raise _verbs_error(exc, f"posting {opcode.name}") from None

    def to_error(self) -> None:
        from pyverbs.qp import QPAttr

        attr = QPAttr()
        attr.qp_state = QpState.ERR
        import pyverbs.enums as e

        self._qp.modify(attr, e.IBV_QP_STATE)

    def close(self) -> None:
        self._qp.close()
