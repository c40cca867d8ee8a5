"""``list_gpus`` and ``smi``: what the servers of a pool hold, and what the caller holds on them.

``list_gpus`` lists every GPU of every server (its memory, what can still be leased, the share
leased and the tenants), then the servers that did not answer and why. ``smi`` draws an
nvidia-smi-like table (the driver-565 geometry, with a ``Server`` cell in place of ``Bus-Id``):
inside a ``bitfusion-net run`` (``BITFUSION_NET_LEASE`` set) only the run's GPUs, numbered from 0
as the program sees them, each with the reservation's memory and the programs attached to it;
elsewhere every GPU of the configured servers and every program on each. ``--servers`` or
``--server_list`` inside a run ask for the pool's view instead. GPU utilisation is measured over
``--interval``: the device time each server counted between two answers over the server's clock.

Exit status: 0 when at least one server answered; 68 (``EXIT_NO_SERVER``) when none did; 78
(``EXIT_CONFIG``) when no servers are configured or a configuration file is wrong.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .. import __version__
from ..protocol import PROTOCOL_VERSION, BitfusionError, InvalidValueError
from ..protocol import messages as m
from . import EXIT_CONFIG, EXIT_NO_SERVER, Failure, logline
from .config import ConfigError, Server, find_servers, load_client_config
from .control import ServerView, query_servers

MiB = 2**20
WIDTH = 91  # nvidia-smi 565: 91 characters a line, 89 inside the borders
CELLS = (41, 24, 22)  # the three cells of a GPU's rows


# -- the pool ---------------------------------------------------------------------------------------
def pool_settings(args: argparse.Namespace) -> tuple[tuple[Server, ...], str, float]:
    """The servers to ask, where that list came from, and how long each has to answer."""
    timeout = query_timeout(args)
    try:
        pool = find_servers(args.servers, args.server_list)
    except ConfigError as exc:
        raise Failure(EXIT_CONFIG, str(exc)) from None
    return pool.servers, pool.source, timeout


def query_timeout(args: argparse.Namespace) -> float:
    """``--timeout``, else client.yaml's ``query_timeout``."""
    try:
        config = load_client_config()
    except ConfigError as exc:
        raise Failure(EXIT_CONFIG, str(exc)) from None
    return float(args.timeout or config.query_timeout)


def name_of(address: str) -> str:
    """``tcp://HOST:PORT`` as the user writes it, ``HOST:PORT``."""
    return address.removeprefix("tcp://")


def view_name(view: ServerView) -> str:
    """The address the client reached the server at (not the one the server listens on, which
    may be ``0.0.0.0``), or for a server that did not answer the first of its addresses."""
    if view.connection is not None:
        return name_of(view.connection.address)
    return view.server.name


def ask_all(
    servers: Sequence[Server], timeout: float, *, keep_open: bool
) -> list[tuple[ServerView, str]]:
    """Every server's full answer, asked at once, each with the address that answered (or
    why not). The connections stay open only with ``keep_open``."""
    views = query_servers(tuple(servers), timeout, detail=m.INFO_FULL, keep_open=True)
    answers = [(view, view_name(view)) for view in views]
    for view in views:
        if view.ok:
            view.info.setdefault("gpus", [])
            view.info.setdefault("reservations", [])
    if not keep_open:
        close_all(views)
    return answers


def close_all(views: Sequence[ServerView]) -> None:
    connections = [v.connection for v in views if v.connection is not None]
    for view in views:
        view.connection = None
    if connections:
        with ThreadPoolExecutor(max_workers=min(16, len(connections))) as pool:
            list(pool.map(lambda c: c.close(), connections))


def unreachable_entry(view: ServerView, name: str) -> dict[str, str]:
    """``{"address", "error"}`` of a server that did not answer."""
    return {"address": name, "error": view.error.removeprefix(f"tcp://{name}: ")}


def warn_unreachable(entries: Sequence[dict[str, str]]) -> None:
    for entry in entries:
        logline.warn(f"Server {entry['address']} did not answer: {entry['error']}")


def no_server_error(asked: int) -> None:
    logline.error(
        f"none of the {asked} server(s) answered; check that they are running and reachable "
        "(bitfusion-net health)"
    )


def _mib(nbytes: int | float, *, up: bool = False) -> int:
    return math.ceil(nbytes / MiB) if up else int(nbytes // MiB)


# -- list_gpus --------------------------------------------------------------------------------------
def list_gpus(args: argparse.Namespace) -> int:
    servers, _, timeout = pool_settings(args)
    answers = ask_all(servers, timeout, keep_open=False)
    answered = [(v, name) for v, name in answers if v.ok]
    unreachable = [unreachable_entry(v, name) for v, name in answers if not v.ok]
    warn_unreachable(unreachable)
    if args.json:
        listing = {
            "servers": [
                {
                    "address": name,
                    "server": v.info["server"],
                    "gpus": [
                        {**g, "free_memory": int(g["total_memory"]) - int(g["leased_memory"])}
                        for g in v.gpus
                    ],
                    "reservations": v.info["reservations"],
                }
                for v, name in answered
            ],
            "unreachable": unreachable,
        }
        print(json.dumps(listing, indent=2))
    else:
        print(gpu_table(answered, unreachable))
    if not answered:
        no_server_error(len(answers))
        return EXIT_NO_SERVER
    return 0


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            str(cell).rjust(widths[i]) if i in right else str(cell).ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def gpu_table(
    answered: Sequence[tuple[ServerView, str]], unreachable: Sequence[dict[str, str]]
) -> str:
    """The text of ``list_gpus``: one row per GPU, then the servers that did not answer."""
    header = ("SERVER", "GPU", "NAME", "EXECUTOR", "MEMORY", "FREE", "LEASED", "TENANTS")
    rows: list[tuple[str, ...]] = []
    for view, name in answered:
        if not view.gpus:
            rows.append((name, "-", "(no GPUs)", "", "", "", "", ""))
        for g in view.gpus:
            total = int(g["total_memory"])
            free = total - int(g["leased_memory"])
            rows.append(
                (
                    name,
                    str(g["gpu"]),
                    str(g["name"]),
                    str(g["executor"]),
                    f"{_mib(total)} MiB",
                    f"{_mib(free)} MiB",
                    f"{float(g['leased_fraction']):.2f}",
                    str(g["tenants"]),
                )
            )
    lines = _table(header, rows, right={1, 4, 5, 6, 7})
    if unreachable:
        lines.append("")
        lines += _table(
            ("NOT ANSWERING", "WHY"), [(e["address"], e["error"]) for e in unreachable], set()
        )
    return "\n".join(lines)


# -- smi: what the caller holds ---------------------------------------------------------------------
@dataclass
class SmiGpu:
    """One row block of the table."""

    index: int  # as the caller sees it: from 0, in the order of the run's devices
    server: str  # HOST:PORT
    server_gpu: int
    name: str
    executor: str
    share: float  # the run's fraction inside a run, else the fraction leased on the GPU
    mode: str | None  # the run's share/cap mode; None outside a run
    weight: float | None
    tenants: int
    memory_used: int
    memory_total: int  # the run's limit inside a run, else the GPU's memory
    utilization: float | None  # percent over the interval; None when not measured
    scheduling: str
    reservation: int | None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class SmiProcess:
    gpu: int
    server: str
    server_gpu: int
    reservation: int
    session: int
    client: str
    peer: str
    memory_used: int | None  # None: the reservation's memory is shared by several programs
    type: str = "C"

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class SmiView:
    lease: str | None  # the reservation file of the run, or None
    interval: float
    gpus: list[SmiGpu] = field(default_factory=list)
    processes: list[SmiProcess] = field(default_factory=list)
    unreachable: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "lease": self.lease,
            "interval": self.interval,
            "gpus": [g.to_json() for g in self.gpus],
            "processes": [p.to_json() for p in self.processes],
            "unreachable": self.unreachable,
        }


def _run_lease(args: argparse.Namespace) -> tuple[str, Any] | None:
    """The run's reservation file, when inside one and the pool was not named on the command
    line; a file that cannot be read is warned about and the pool's view is shown instead."""
    from ..client.lease import LEASE_ENV, ReservationFile

    path = os.environ.get(LEASE_ENV)
    if not path or args.servers or args.server_list:
        return None
    try:
        return path, ReservationFile.load(path)
    except InvalidValueError as exc:
        logline.warn(f"{LEASE_ENV}: {exc.message}; showing every GPU of the configured servers")
        return None


def _utilization(first: dict[str, Any], second: dict[str, Any], gpu: int) -> float | None:
    try:
        span = float(second["server"]["time"]) - float(first["server"]["time"])
        before = next(g for g in first["gpus"] if g["gpu"] == gpu)
        after = next(g for g in second["gpus"] if g["gpu"] == gpu)
        busy = float(after["busy_time"]) - float(before["busy_time"])
    except (KeyError, StopIteration, TypeError, ValueError):
        return None
    if span <= 0:
        return None
    return min(100.0, max(0.0, 100.0 * busy / span))


def _second_look(views: Sequence[ServerView], interval: float) -> list[dict[str, Any] | None]:
    """Each open connection's answer ``interval`` seconds after the first (None where it
    could not be asked again)."""

    def again(view: ServerView) -> dict[str, Any] | None:
        if view.connection is None:
            return None
        try:
            return view.connection.info(m.INFO_FULL)
        except BitfusionError as exc:
            logline.warn(f"Server {view_name(view)} did not answer again: {exc.message}")
            return None

    if interval <= 0 or not views:
        return [None] * len(views)
    time.sleep(interval)
    with ThreadPoolExecutor(max_workers=min(16, len(views))) as pool:
        return list(pool.map(again, views))


def _gpu_by_index(info: dict[str, Any], index: int) -> dict[str, Any] | None:
    return next((g for g in info.get("gpus", []) if g.get("gpu") == index), None)


def _process_memory(device: dict[str, Any], sessions: Sequence[Any]) -> int | None:
    # A reservation's memory on a GPU is one budget shared by its programs: one program's
    # use is known only when it is the only one.
    return int(device.get("memory_used", 0)) if len(sessions) == 1 else None


def _processes(
    index: int, name: str, device: dict[str, Any], reservation: dict[str, Any]
) -> list[SmiProcess]:
    sessions = reservation.get("sessions", [])
    return [
        SmiProcess(
            gpu=index,
            server=name,
            server_gpu=int(device["gpu"]),
            reservation=int(reservation["id"]),
            session=int(s["session"]),
            client=str(s.get("client") or reservation.get("client") or s.get("peer") or ""),
            peer=str(s.get("peer", "")),
            memory_used=_process_memory(device, sessions),
        )
        for s in sessions
    ]


def _pool_gpus(
    view: SmiView, name: str, first: dict[str, Any], second: dict[str, Any] | None
) -> None:
    """Outside a run: every GPU of the server, and every program on each."""
    info = second or first
    scheduling = str(info["server"].get("scheduling", ""))
    for g in info.get("gpus", []):
        index = len(view.gpus)
        view.gpus.append(
            SmiGpu(
                index=index,
                server=name,
                server_gpu=int(g["gpu"]),
                name=str(g["name"]),
                executor=str(g["executor"]),
                share=float(g["leased_fraction"]),
                mode=None,
                weight=None,
                tenants=int(g["tenants"]),
                memory_used=int(g["memory_used"]),
                memory_total=int(g["total_memory"]),
                utilization=None if second is None else _utilization(first, second, g["gpu"]),
                scheduling=scheduling,
                reservation=None,
            )
        )
        for r in info.get("reservations", []):
            for d in r.get("devices", []):
                if d.get("gpu") == g["gpu"]:
                    view.processes += _processes(index, name, d, r)


def _run_gpus(
    view: SmiView, name: str, part: Any, first: dict[str, Any], second: dict[str, Any] | None
) -> None:
    """Inside a run: the GPUs of the run's reservation on this server, and its programs."""
    info = second or first
    server = info["server"]
    reservation = next(
        (r for r in info.get("reservations", []) if r.get("id") == part.reservation), None
    )
    if reservation is None or server.get("id") != part.server_id:
        why = (
            "the server has restarted since it was made"
            if server.get("id") != part.server_id
            else "it has been released, or has timed out"
        )
        view.unreachable.append(
            {"address": name, "error": f"reservation {part.reservation} is over: {why}"}
        )
        return
    devices = list(reservation.get("devices", []))
    wanted = [d.get("server_gpu") for d in part.devices]
    by_gpu = {d.get("gpu"): d for d in devices}
    if wanted and all(w in by_gpu for w in wanted):
        devices = [by_gpu[w] for w in wanted]  # the order the program numbers them in
    for d in devices:
        index = len(view.gpus)
        g = _gpu_by_index(info, int(d["gpu"])) or {}
        view.gpus.append(
            SmiGpu(
                index=index,
                server=name,
                server_gpu=int(d["gpu"]),
                name=str(g.get("name", "")),
                executor=str(g.get("executor", "")),
                share=float(d["fraction"]),
                mode=str(d.get("mode") or "") or None,
                weight=None if d.get("weight") is None else float(d["weight"]),
                tenants=int(g.get("tenants", 0)),
                memory_used=int(d.get("memory_used", 0)),
                memory_total=int(d["memory_limit"]),
                utilization=None if second is None else _utilization(first, second, d["gpu"]),
                scheduling=str(server.get("scheduling", "")),
                reservation=int(reservation["id"]),
            )
        )
        view.processes += _processes(index, name, d, reservation)


def collect_smi(args: argparse.Namespace) -> tuple[SmiView, int]:
    """What ``smi`` shows, and how many servers answered."""
    run = _run_lease(args)
    interval = max(0.0, float(getattr(args, "interval", 0.5) or 0.0))
    if run is not None:
        path, lease = run
        servers: tuple[Server, ...] = tuple(Server((part.address,)) for part in lease.servers)
        timeout = query_timeout(args)
    else:
        path, lease = None, None
        servers, _, timeout = pool_settings(args)
    answers = ask_all(servers, timeout, keep_open=True)
    views = [v for v, _ in answers]
    try:
        latest = _second_look(views, interval)
    finally:
        close_all(views)
    view = SmiView(path, interval)
    for position, ((server_view, name), second) in enumerate(zip(answers, latest, strict=True)):
        if not server_view.ok:
            view.unreachable.append(unreachable_entry(server_view, name))
        elif lease is None:
            _pool_gpus(view, name, server_view.info, second)
        else:
            _run_gpus(view, name, lease.servers[position], server_view.info, second)
    return view, sum(1 for v in views if v.ok)


def smi(args: argparse.Namespace) -> int:
    view, answered = collect_smi(args)
    warn_unreachable(view.unreachable)
    if args.json:
        print(json.dumps(view.to_json(), indent=2))
    else:
        print(smi_table(view))
    if not answered:
        no_server_error(len(view.unreachable))
        return EXIT_NO_SERVER
    return 0


# -- smi: the table ---------------------------------------------------------------------------------
def _fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` with a leading ``...``, as nvidia-smi cuts long names."""
    if len(text) <= width:
        return text
    return "..." + text[len(text) - width + 3 :] if width > 3 else text[:width]


def _fit_end(text: str, width: int) -> str:
    """``text`` cut to ``width`` with a trailing ``...``."""
    if len(text) <= width:
        return text
    return text[: width - 3] + "..." if width > 3 else text[:width]


def _cell(left: str, right: str, width: int) -> str:
    """One cell of ``width`` characters: a space, ``left`` ... ``right``, a space."""
    inner = width - 2
    right = _fit(right, inner)
    left = _fit_end(left, max(0, inner - len(right) - (1 if right else 0)))
    return " " + left + " " * (inner - len(left) - len(right)) + right + " "


def _row(*cells: tuple[str, str]) -> str:
    return "|" + "|".join(_cell(a, b, w) for (a, b), w in zip(cells, CELLS, strict=True)) + "|"


def _rule(char: str, left: str, right: str) -> str:
    return left + "+".join(char * w for w in CELLS) + right


def _line(text: str) -> str:
    return "| " + _fit_end(text, WIDTH - 4).ljust(WIDTH - 4) + " |"


BORDER = "+" + "-" * (WIDTH - 2) + "+"


def _memory_text(used: int, total: int) -> str:
    return f"{_mib(used, up=True)}MiB / {_mib(total):>6}MiB"


def _gpu_block(gpu: SmiGpu) -> list[str]:
    share = f"{gpu.share * 100:.0f}%"
    weight = "N/A" if gpu.weight is None else f"{gpu.weight:g}"
    util = "N/A" if gpu.utilization is None else f"{gpu.utilization:.0f}%"
    name_room = CELLS[0] - 2 - 5 - len(gpu.executor) - 1
    server_room = CELLS[1] - 2 - len(str(gpu.server_gpu)) - 1
    return [
        _row(
            (f"{gpu.index:>3}  " + _fit_end(gpu.name, name_room), gpu.executor),
            (_fit(gpu.server, server_room), str(gpu.server_gpu)),
            ("", str(gpu.tenants)),
        ),
        _row(
            (f"{share:>5}  {gpu.mode or 'N/A'}", weight),
            ("", _memory_text(gpu.memory_used, gpu.memory_total)),
            (f"{util:>7}", (gpu.scheduling or "N/A").capitalize()),
        ),
        _row(("", ""), ("", ""), ("", "N/A")),
        _rule("-", "+", "+"),
    ]


def _process_row(p: SmiProcess) -> str:
    """``|    0   N/A  N/A           86711      C   name ...             44568MiB |``"""
    memory = "N/A" if p.memory_used is None else f"{_mib(p.memory_used, up=True)}MiB"
    start = f"|{p.gpu:>5}   N/A  N/A{p.session:>16}{p.type:>7}   "
    end = f"{memory:>9} |"
    room = max(0, WIDTH - len(start) - len(end))
    return start + _fit(p.client, room).ljust(room) + end


def smi_table(view: SmiView) -> str:
    """The text of ``smi``: nvidia-smi 565's layout, 91 characters a line."""
    banner = f"bitfusion-net {__version__}  Protocol: {PROTOCOL_VERSION}"
    lines = [
        BORDER,
        _line(banner),
        _rule("-", "|", "+"),
        _row(("GPU  Name", "Executor"), ("Server", "Srv GPU"), ("", "Tenants")),
        _row(("Share  Mode", "Weight"), ("", "Memory-Usage"), ("GPU-Util", "Compute M.")),
        _row(("", ""), ("", ""), ("", "MIG M.")),
        _rule("=", "|", "|"),
    ]
    if view.gpus:
        for gpu in view.gpus:
            lines += _gpu_block(gpu)
    else:
        lines += [_line("No GPUs found"), BORDER]
    lines += [
        "",
        BORDER,
        _line("Processes:"),
        "|  GPU   GI   CI        PID   Type   Process name                              GPU Memory |",
        "|        ID   ID                                                               Usage      |",
        "|" + "=" * (WIDTH - 2) + "|",
    ]
    if view.processes:
        lines += [_process_row(p) for p in view.processes]
    else:
        lines.append(_line(" No running processes found"))
    lines.append(BORDER)
    for entry in view.unreachable:
        lines.append(f"Not answering: {entry['address']}: {entry['error']}")
    return "\n".join(lines)
