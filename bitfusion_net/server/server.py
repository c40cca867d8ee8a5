"""``Server``: exposes a host's GPUs (real or NumPy reference devices) to bitfusion-net clients."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from executors import Executor, create_executors
from executors.histogram import HistogramSnapshot

from ..protocol import CLIENT_LIMITS, PROTOCOL_VERSION, ErrorCode, Limits
from ..protocol import messages as m
from ..transport import ServerTls, Stream, TcpAddress, listen, parse_address
from ..units import format_size, parse_size
from .auth import Gatekeeper
from .flow import PROBE_PERIOD_S
from .leases import SHARE_UNITS, GpuPool, GpuSlot
from .reservations import EndedBy, Reservation, ReservationTable
from .session import ServerSession
from .stats import ServerStats
from .tokens import TOKEN_FILE, TokenStore

DEFAULT_STALL_TIMEOUT = 30.0  # seconds a connection may stall mid-frame, or wait with no HELLO
DEFAULT_MAX_CONNECTIONS = 4096
# The longest a reservation may sit idle before it is released (clients may ask for less): a
# forgotten ``request_gpus`` must not hold GPUs for ever.
DEFAULT_MAX_IDLE_TIMEOUT = 24 * 3600.0
TOKEN_CHECK_EVERY = 4  # sweeps between looks for revoked tokens (about once a second)
SHUTDOWN_NOTICE_S = 0.5  # how long a stopping server waits for its clients to hear why

if TYPE_CHECKING:
    from ..manage import ManagementEndpoint

log = logging.getLogger(__name__)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: not known to be loopback
        return False


class Server:
    """A bitfusion-net server. Use ``async with Server(...) as server:``, then ``server.address``.

    ``listen``: ``tcp://HOST:PORT`` (port 0 picks a free port). ``executor``: ``"numpy"`` (the
    embedded reference device, the default here), ``"pycuda"`` (this host's NVIDIA GPUs) or
    ``"auto"`` (PyCUDA if a GPU is usable, else NumPy; the command line's default). ``gpus``: how
    many devices (default: every GPU, or one NumPy device). ``gpu_memory``: each NumPy device's
    size (default 16 GiB), or a cap on the memory offered to tenants of each real GPU (default:
    its free memory less a headroom).
    ``min_fraction``: the smallest slice of a GPU a client may lease. ``max_payload``: the largest
    bulk payload of one frame; clients split larger copies. ``scheduling``: ``"fair"`` (weighted
    fair time-slicing of each GPU between its tenants) or ``"fifo"`` (arrival order, a baseline).
    ``stall_timeout``: seconds a connection may sit in the middle of a frame without a byte
    arriving, or connected without its HELLO, before it is closed with an error.
    ``max_connections``: connections beyond this many are refused with ``CapacityError``.
    ``max_idle_timeout``: the longest, in seconds, a reservation may stay idle (no call on any
    of its connections) before it is released; clients may ask for less; 0: no bound.
    ``tls``: serve TLS only (``ServerTls``: certificate, key, and a client CA for mutual TLS);
    ``state_dir``: the server's state directory; when it holds a token store
    (``bitfusion-server token create``), every connection needs a token (AUTHENTICATE) and its
    user's quotas hold. Without one the server accepts anonymous clients, which it does only on
    a loopback address unless ``insecure`` is set (logged as a warning).
    ``address`` then says ``tls://``. A plaintext client is answered, in plaintext, with a
    ``PROTOCOL`` error saying so; a client that does not finish its handshake within
    ``stall_timeout`` is closed. ``listen`` may say ``tls://`` only with ``tls``.
    ``manage``: also serve the management endpoint (health, metrics, JSON API, dashboards) on
    ``http://HOST:PORT`` (or ``https://`` with ``tls``), then at ``manage_address``;
    ``manage_pool``: the management URLs of the other servers of its pool (the cluster view);
    ``open_metrics``: ``/metrics`` needs no token even when the server has tokens
    (docs/OBSERVABILITY.md). ``also_listen``: more addresses to serve the same GPUs on, e.g.
    ``rdma://`` beside ``tcp://`` (``addresses`` lists them all; with ``tls``, every TCP one
    serves TLS).
    """

    def __init__(
        self,
        listen: str = "tcp://127.0.0.1:0",
        executor: str = "numpy",
        gpus: int | None = None,
        gpu_memory: str | int | None = None,
        *,
        min_fraction: float = 0.05,
        max_payload: str | int = "64MiB",
        scheduling: str = "fair",
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_idle_timeout: float = DEFAULT_MAX_IDLE_TIMEOUT,
        tls: ServerTls | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        insecure: bool = False,
        manage: str | None = None,
        manage_pool: list[str] | None = None,
        open_metrics: bool = False,
        also_listen: Sequence[str] = (),
    ) -> None:
        self._listen = parse_address(listen)
        self._also = [parse_address(a) for a in also_listen]
        store = TokenStore.existing(state_dir) if state_dir is not None else None
        for address in (self._listen, *self._also):
            if store is None and not insecure and not _is_loopback(address.host):
                where = f" (none in {Path(state_dir) / TOKEN_FILE})" if state_dir else ""
                raise ValueError(
                    f"listening on {address} needs tokens{where}: create one with "
                    "'bitfusion-server token create --user NAME', or pass --insecure "
                    "(insecure=True) to let anyone who reaches the port use the GPUs"
                )
            if address.tls and tls is None:
                raise ValueError(
                    f"{address} needs a certificate: give tls=ServerTls(cert_file, key_file)"
                )
        self._gate = Gatekeeper(store)
        self._insecure = insecure
        self._sweeps = 0
        self._tls = tls
        if gpus is not None and gpus < 1:
            raise ValueError("a server needs at least one GPU")
        if not 0 < min_fraction <= 1:
            raise ValueError("min_fraction must be in (0, 1]")
        if scheduling not in ("fair", "fifo"):
            raise ValueError(f"scheduling must be 'fair' or 'fifo', got {scheduling!r}")
        if not stall_timeout > 0:
            raise ValueError(f"stall_timeout must be positive, got {stall_timeout}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        if not max_idle_timeout >= 0:
            raise ValueError(f"max_idle_timeout must be >= 0, got {max_idle_timeout}")
        self._max_idle_timeout = max_idle_timeout
        self.id = str(uuid.uuid4())  # a new one at every start: reservations do not survive it
        self._started = time.time()
        self._stall_timeout = stall_timeout
        self._max_connections = max_connections
        self._sweeper: asyncio.TimerHandle | None = None
        self._executor_kind = executor
        self._scheduling = scheduling
        self._gpu_count = gpus
        self._gpu_memory = None if gpu_memory is None else parse_size(gpu_memory)
        self._min_share = round(min_fraction * SHARE_UNITS)
        self._limits = Limits(max_payload=parse_size(max_payload))
        self._executors: list[Executor] = []
        self._pool: GpuPool | None = None
        self._reservations: ReservationTable | None = None
        self._server: asyncio.Server | None = None
        self._sessions: set[ServerSession] = set()
        self._address: TcpAddress | None = None
        self._also_servers: list[asyncio.Server] = []
        self._also_addresses: list[TcpAddress] = []
        self.stats = ServerStats()
        self._manage: ManagementEndpoint | None = None
        if manage is not None:
            from ..manage import ManagementEndpoint

            self._manage = ManagementEndpoint(
                self, self._gate, manage, pool=manage_pool, open_metrics=open_metrics, tls=tls
            )

    @property
    def address(self) -> str:
        """The address clients connect to, e.g. ``tcp://127.0.0.1:40123``."""
        if self._address is None:
            raise RuntimeError("the server is not started")
        return str(self._address)

    @property
    def addresses(self) -> list[str]:
        """Every address the server accepts clients on, ``address`` first."""
        return [self.address, *(str(a) for a in self._also_addresses)]

    @property
    def manage_address(self) -> str:
        """The management endpoint's address, e.g. ``http://127.0.0.1:40124``."""
        if self._manage is None or not self._manage.address:
            raise RuntimeError("the server has no management endpoint (give manage=...)")
        return self._manage.address

    @property
    def tokens_required(self) -> bool:
        return self._gate.required

    def token_count(self) -> int:
        """Tokens in the store (0 without one); reads the store."""
        return len(self._gate.store.records()) if self._gate.store is not None else 0

    async def start(self) -> None:
        self._executors = create_executors(
            self._executor_kind, self._gpu_count, self._gpu_memory, self._scheduling
        )
        self._pool = GpuPool(
            [GpuSlot(i, e.properties.total_memory) for i, e in enumerate(self._executors)],
            min_share=self._min_share,
        )
        self._reservations = ReservationTable(
            self._pool, self._executors, self.id, self._max_idle_timeout
        )
        try:
            self._server, self._address = await self._listen_on(self._listen)
            for address in self._also:
                extra, bound = await self._listen_on(address)
                self._also_servers.append(extra)
                self._also_addresses.append(bound)
            if self._manage is not None:
                await self._manage.start()
        except BaseException:
            for listener in [self._server, *self._also_servers]:
                if listener is not None:
                    listener.close()
            self._server, self._also_servers = None, []
            self._close_executors()
            raise
        self._sweeper = asyncio.get_running_loop().call_later(PROBE_PERIOD_S, self._sweep)
        for index, executor in enumerate(self._executors):
            props = executor.properties
            log.info(
                "gpu%d: %s (%s executor), %s for tenants",
                index,
                props.name,
                props.executor,
                format_size(props.total_memory),
            )
        log.info(
            "serving %d %s GPU(s) on %s (%s scheduling)",
            len(self._executors),
            self._executors[0].properties.executor,
            ", ".join(self.addresses),
            self._scheduling,
        )
        store = self._gate.store
        if store is not None:
            log.info("tokens required: %d in %s", len(store.records()), store.path)
        elif self._insecure and not _is_loopback(self._listen.host):
            log.warning(
                "INSECURE: no tokens; anyone who can reach %s may use every GPU of this server",
                self._address,
            )
        else:
            log.info("no token store: accepting unauthenticated clients (loopback only)")

    async def _listen_on(self, address: TcpAddress) -> tuple[asyncio.Server, TcpAddress]:
        tls = None if address.rdma else self._tls
        server = await listen(
            address,
            self._new_session,
            tls=tls,
            plaintext_owner_factory=self._new_plaintext_session,
            handshake_timeout=self._stall_timeout,
        )
        host, port = server.sockets[0].getsockname()[:2]
        return server, TcpAddress(host, port, tls=tls is not None, rdma=address.rdma)

    def _new_session(self, stream: Stream) -> ServerSession:
        assert self._reservations is not None
        session = ServerSession(
            stream,
            self._reservations,
            self._limits,
            self.describe,
            self._sessions.discard,
            gate=self._gate,
            stats=self.stats,
        )
        if len(self._sessions) >= self._max_connections:
            session.refuse(
                ErrorCode.CAPACITY,
                f"the server has {len(self._sessions)} connections, its limit; try again later",
                "capacity",
            )
        else:
            self.stats.accepted += 1
        self._sessions.add(session)
        return session

    def _new_plaintext_session(self, stream: Stream) -> ServerSession:
        """A client that spoke plaintext to this TLS server: told so, in plaintext, and closed."""
        session = self._new_session(stream)
        session.refuse(
            ErrorCode.PROTOCOL,
            f"this server requires TLS: connect to {self.address} (tls://HOST:PORT, or --tls)",
            "protocol",
        )
        return session

    def _sweep(self) -> None:
        """End sessions whose client has gone unheard, and close connections stalled mid-frame
        or connected without a HELLO for too long."""
        now = time.monotonic()
        for session in list(self._sessions):
            session.probe()
            session.close_if_stalled(now, self._stall_timeout)
        if self._reservations is not None:
            self._reservations.sweep(now)
        self._sweeps += 1
        if self._gate.required and self._sweeps % TOKEN_CHECK_EVERY == 0:
            self._end_revoked_tokens()
        self._sweeper = asyncio.get_running_loop().call_later(PROBE_PERIOD_S, self._sweep)

    def _end_revoked_tokens(self) -> None:
        """End the sessions and reservations of tokens revoked or expired since they connected."""
        in_use = {s.user.id for s in self._sessions if s.user is not None}
        table = self._reservations
        assert table is not None
        in_use |= {r.user.id for r in table if r.user is not None}
        try:
            ended = self._gate.ended_tokens(in_use)
        except Exception:  # noqa: BLE001 - a locked or broken store must not stop the sweep
            log.exception("checking the token store failed; trying again at the next sweep")
            return
        if not ended:
            return
        for session in list(self._sessions):
            if session.user is not None and session.user.id in ended:
                session.token_ended(ended[session.user.id])
        for reservation in table.of_tokens(set(ended)):
            assert reservation.user is not None
            table.end(reservation, ended[reservation.user.id], EndedBy.TOKEN_ENDED)

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    async def close(self) -> None:
        """Stop listening, drop every client (their leases are released), stop the executors."""
        if self._manage is not None:
            await self._manage.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for extra in self._also_servers:
            extra.close()
        if self._server is not None:
            self._server.close()
            reason = "the server shut down; its reservations are released (reserve again)"
            for session in list(self._sessions):
                session.shut_down(reason)
            try:  # a moment for the reason to reach the clients; then they are cut off
                async with asyncio.timeout(SHUTDOWN_NOTICE_S):
                    while self._sessions:
                        await asyncio.sleep(0.01)
            except TimeoutError:
                pass
            for session in list(self._sessions):
                session.stream.abort()
            for server in [self._server, *self._also_servers]:
                await server.wait_closed()
            self._server, self._also_servers = None, []
        await asyncio.get_running_loop().run_in_executor(None, self._close_executors)

    def _close_executors(self) -> None:
        for executor in self._executors:
            executor.close()
        self._executors = []

    def gpus(self) -> list[dict[str, Any]]:
        """What is leased on each GPU, for operators and tests."""
        if self._pool is None:
            return []
        used = [0] * len(self._pool.slots)
        for reservation in self._reservations or ():
            for placement, budget in zip(reservation.placements, reservation.budgets, strict=True):
                used[placement.gpu] += budget.used
        return [
            {
                "gpu": slot.index,
                "name": executor.properties.name,
                "executor": executor.properties.executor,
                "total_memory": slot.total_memory,
                "leased_fraction": slot.leased_share / SHARE_UNITS,
                "leased_memory": slot.leased_memory,
                "memory_used": used[slot.index],
                "tenants": slot.tenants,
                "busy_time": executor.busy_time(),
            }
            for slot, executor in zip(self._pool.slots, self._executors, strict=True)
        ]

    def reservations(self) -> list[dict[str, Any]]:
        """Every reservation: its GPUs, its programs, how long it has been idle."""
        now = time.monotonic()
        out = []
        for r in self._reservations or ():
            out.append(
                {
                    "id": r.id,
                    "client": r.client_name,
                    "held_by": "idle timeout" if r.holder is None else "connection",
                    "idle_timeout": r.idle_timeout,
                    "idle_for": round(r.idle_for(now), 3),
                    "age": round(now - r.created, 3),
                    "devices": [
                        {
                            "gpu": p.gpu,
                            "fraction": p.fraction,
                            "memory_limit": p.memory_limit,
                            "memory_used": b.used,
                            "weight": r.weight or p.fraction,
                            "mode": "cap" if r.mode == m.MODE_CAP else "share",
                        }
                        for p, b in zip(r.placements, r.budgets, strict=True)
                    ],
                    "sessions": [
                        {"session": s.id, "client": s.client_name, "peer": s.peer}
                        for s in r.attached
                        if isinstance(s, ServerSession)
                    ],
                }
            )
        return out

    def info(self) -> dict[str, Any]:
        """This server, as SERVER_INFO's ``server`` object (docs/PROTOCOL.md, section 5.6)."""
        from .. import __version__

        return {
            "id": self.id,
            "hostname": socket.gethostname(),
            "address": str(self._address),
            "addresses": self.addresses if self._address is not None else [],
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "started": self._started,
            "time": time.time(),
            "executor": self._executors[0].properties.executor if self._executors else "",
            "scheduling": self._scheduling,
            "max_idle_timeout": self._max_idle_timeout,
            "min_fraction": self._min_share / SHARE_UNITS,
        }

    def describe(self, detail: int = m.INFO_FULL) -> str:
        """What SERVER_INFO answers: this server, and with ``INFO_FULL`` its GPUs and
        reservations, as JSON (docs/PROTOCOL.md, section 5)."""
        info: dict[str, Any] = {"server": self.info()}
        if detail == m.INFO_BRIEF:
            return json.dumps(info, separators=(",", ":"))
        info["gpus"] = self.gpus()
        reservations = self.reservations()
        # The reply must fit the client's metadata limit: list as many reservations as fit.
        room = CLIENT_LIMITS.max_metadata - 64
        kept = len(reservations)
        while True:
            info["reservations"] = reservations[:kept]
            if kept < len(reservations):
                info["reservations_omitted"] = len(reservations) - kept
            text = json.dumps(info, separators=(",", ":"))
            if len(text.encode()) <= room or not kept:
                return text
            kept = kept * 3 // 4

    def sessions(self) -> list[dict[str, Any]]:
        """Every connected session with its leases: fraction, weight, mode and usage so far."""
        return [session.status() for session in self._sessions]

    # -- what the management endpoint reads (docs/OBSERVABILITY.md) -----------------------------
    def live_reservations(self) -> list[Reservation]:
        return list(self._reservations or ())

    def executors(self) -> list[Executor]:
        return list(self._executors)

    def connection_count(self) -> int:
        return len(self._sessions)

    def traffic(self) -> tuple[int, int]:
        """Bytes received from and sent to clients since the server started."""
        stats = self.stats
        received, sent = stats.closed_received_bytes, stats.closed_sent_bytes
        for session in self._sessions:
            received += session.received_bytes
            sent += session.sent_bytes
        return received, sent

    def watch_reservations_ending(self, listener: Callable[[Reservation], None]) -> None:
        """Call ``listener`` with each reservation once it has ended (its accounts final)."""
        assert self._reservations is not None, "the server is not started"
        self._reservations.end_listeners.append(listener)

    def reservations_ended(self) -> dict[str, int]:
        return dict(self._reservations.ended_by) if self._reservations is not None else {}

    def queue_waits(self, gpu: int) -> HistogramSnapshot:
        return self._executors[gpu].queue_waits()

    def gpu_uuid(self, gpu: int) -> str:
        """A GPU's identity for monitoring, in NVIDIA's ``GPU-<uuid>`` form. A NumPy device is
        made anew at each start, so it is named by the server's run and its index."""
        return f"GPU-{uuid.uuid5(uuid.NAMESPACE_URL, f'bitfusion-net:{self.id}/{gpu}')}"

    def entitlements(self) -> dict[tuple[int, int], float]:
        """(reservation id, gpu) -> the share of the GPU's time the reservation is promised
        when every tenant of the GPU is busy: its weight over the GPU's weights (at least 1,
        the whole GPU), no more than its cap."""
        reservations = self.live_reservations()
        weights: dict[int, float] = {}
        for r in reservations:
            for p in r.placements:
                weights[p.gpu] = weights.get(p.gpu, 0.0) + (r.weight or p.fraction)
        shares = {}
        for r in reservations:
            for p in r.placements:
                share = (r.weight or p.fraction) / max(1.0, weights[p.gpu])
                if r.mode == m.MODE_CAP:
                    share = min(share, p.fraction)
                shares[r.id, p.gpu] = share
        return shares

    def report(self) -> str:
        """A table of every GPU and every tenant's lease and usage, for operators' logs."""
        lines = []
        for gpu in self.gpus():
            lines.append(
                f"gpu{gpu['gpu']}: {gpu['leased_fraction']:.2f} leased to {gpu['tenants']} tenant(s), "
                f"{format_size(gpu['leased_memory'])} of {format_size(gpu['total_memory'])} promised"
            )
        for session in sorted(self.sessions(), key=lambda s: s["session"]):
            for lease in session["leases"]:
                usage = lease["usage"]
                lines.append(
                    f"  session {session['session']} {session['client'] or session['peer']} "
                    f"gpu{lease['gpu']} {lease['fraction']:g} {lease['mode']} "
                    f"weight {lease['weight']:g}: device {usage['device_time']:.3f} s, "
                    f"waited {usage['queue_wait']:.3f} s, {usage['operations']} ops, "
                    f"{usage['kernels']} kernels, {lease['queued']} queued, memory "
                    f"{format_size(usage['memory_used'])} (peak "
                    f"{format_size(usage['memory_high_water'])})"
                )
        return "\n".join(lines)

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
