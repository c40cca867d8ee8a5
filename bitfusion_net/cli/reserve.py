"""Reserving GPUs across a pool: ask every server, choose (``placement``), reserve, retry.

Capacity is first come, first served, as in Bitfusion: a client that finds no room waits and
asks again until its ``--wait`` deadline. Reservations made for ``run`` are held by their control
connections (they end if ``run`` dies, once its command's connections are gone too); those made
by ``request_gpus`` live until ``release_gpus`` or their idle timeout.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from ..client.lease import ReservationFile, ServerReservation
from ..protocol import BitfusionError, CapacityError
from ..protocol import messages as m
from ..transport import ClientTls
from . import logline
from .config import ServerList
from .control import ControlConnection, ServerView, query_servers
from .placement import Ask, Filter, NoRoom, choose, eligible_gpus, fraction_of

RETRY_S = 0.5  # how often a waiting client asks again


class NoServer(Exception):
    """No server of the pool answered."""


@dataclass
class Held:
    """A reservation across the pool and the control connections holding it."""

    lease: ReservationFile
    connections: list[ControlConnection]

    def close(self) -> None:
        for connection in self.connections:
            connection.close()


def reserve(
    ask: Ask,
    pool: ServerList,
    filters: list[Filter],
    *,
    mode: str,
    weight: float | None,
    hold: bool,
    idle_timeout: float,
    wait: float,
    query_timeout: float,
    client_name: str,
    tls: ClientTls | None = None,
    token: str = "",
) -> Held:
    """Reserve ``ask`` somewhere in the pool; raises ``NoServer`` or ``NoRoom`` (after waiting
    up to ``wait`` seconds for capacity), or the server's ``BitfusionError``. ``tls`` and
    ``token``: the client's credentials, written into the reservation for its programs too."""
    deadline = time.monotonic() + wait
    warned: set[str] = set()
    announced_wait = False
    while True:
        if not announced_wait:
            for server in pool.servers:
                logline.info(f"Query server {server.name} gpu availability")
        views = query_servers(
            pool.servers, query_timeout, keep_open=True, tls=tls, token=token or None
        )
        for view in views:
            if not view.ok and view.server.name not in warned:
                warned.add(view.server.name)
                logline.warn(f"Server {view.server.name} did not answer, skipped: {view.error}")
        answered = [v for v in views if v.ok]
        try:
            if not answered:
                raise NoServer(
                    f"none of the {len(views)} server(s) from {pool.source} answered: "
                    + "; ".join(v.error for v in views)
                )
            if not announced_wait:
                logline.info(
                    "Choosing GPUs from server list ["
                    + ", ".join(v.address.removeprefix("tcp://") for v in answered)
                    + "]"
                )
            plan = choose(ask, [(v, v.info) for v in answered], filters)
            held = _reserve_plan(
                plan, ask, filters, mode, weight, hold, idle_timeout, client_name, tls, token
            )
        except (NoRoom, NoServer, CapacityError) as exc:
            _close_views(views)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoRoom(str(exc)) if isinstance(exc, CapacityError) else exc from None
            if not announced_wait:
                announced_wait = True
                logline.info(f"Waiting up to {wait:g} s for capacity: {exc}")
            time.sleep(min(RETRY_S, remaining))
            continue
        except BaseException:
            _close_views(views)
            raise
        _close_views(v for v in views if v.connection not in held.connections)
        return held


def _close_views(views: Iterable[ServerView]) -> None:
    for view in views:
        if view.connection is not None:
            view.connection.close()
            view.connection = None


def _reserve_plan(
    plan: list[tuple[ServerView, int]],
    ask: Ask,
    filters: list[Filter],
    mode: str,
    weight: float | None,
    hold: bool,
    idle_timeout: float,
    client_name: str,
    tls: ClientTls | None,
    token: str,
) -> Held:
    """Reserve each server's part; if one is refused, release the parts already made."""
    made: list[tuple[ControlConnection, ServerReservation]] = []
    try:
        for number, (view, count) in enumerate(plan):
            connection = view.connection
            assert connection is not None
            version = view.info["server"].get("version", "?")
            size = (
                f"{ask.memory // 2**20} MiB of memory"
                if ask.memory
                else f"partial memory {ask.fraction:g}"
            )
            logline.info(
                f"Requesting GPUs {list(range(count))} with {size} from server {number}, "
                f"with version {version}..."
            )
            reply = connection.reserve(
                m.Reserve(
                    count,
                    ask.fraction,
                    ask.memory,
                    weight or 0.0,
                    m.MODES[mode],
                    m.HOLD_BY_CONNECTION if hold else m.HOLD_BY_IDLE_TIMEOUT,
                    idle_timeout,
                    client_name,
                    # the filters chose GPUs, not only servers: the server must keep to them
                    m.Reserve.gpu_list([g["gpu"] for g in eligible_gpus(view.info, filters)])
                    if filters
                    else b"",
                )
            )
            devices = [
                {
                    "server_gpu": g.server_gpu,
                    "name": g.name,
                    "executor": g.executor,
                    "total_memory": g.total_memory,
                    "memory_limit": g.memory_limit,
                    "fraction": g.fraction,
                    "weight": g.weight,
                    "mode": mode,
                }
                for g in reply.devices
            ]
            made.append(
                (
                    connection,
                    ServerReservation(
                        connection.address,
                        reply.server_id,
                        reply.reservation,
                        reply.secret,
                        reply.idle_timeout,
                        devices,
                        version,
                    ),
                )
            )
    except BaseException:
        for connection, part in made:
            try:
                connection.release(part.reservation, part.secret)
            except BitfusionError:
                pass  # it ends with its connection anyway (held) or when idle
        raise
    tls_files = {}
    if tls is not None:
        names = (("ca", tls.ca_file), ("cert", tls.cert_file), ("key", tls.key_file))
        tls_files = {name: str(path) for name, path in names if path}
    lease = ReservationFile(
        [part for _, part in made], logline.timestamp(), client_name, token, tls_files
    )
    return Held(lease, [connection for connection, _ in made])


def partial_memory(lease: ReservationFile) -> float:
    """The fraction of a GPU each reserved GPU has, as Bitfusion's log states it."""
    device = lease.servers[0].devices[0]
    return float(
        device.get("fraction") or fraction_of(device["memory_limit"], device["total_memory"])
    )
