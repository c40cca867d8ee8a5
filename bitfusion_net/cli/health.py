"""``health``: check the path from this client to every server of the pool.

One line per check, ``[PASS]``, ``[WARN]`` or ``[FAIL]``, then the check's name, the server
it is about (if any) and what was found:

- ``client version``: this client's version and wire protocol;
- ``open files``: the soft ``RLIMIT_NOFILE`` (WARN under 4096: every server and every GPU
  connection takes a descriptor);
- ``servers``: how many are configured, and where the list came from;
- per server: ``reachable`` (FAIL when it did not answer; its other checks are then skipped),
  ``version`` (PASS when the same as the client's, WARN when it differs, FAIL when the wire
  protocol differs), ``executor`` (FAIL with no GPUs, WARN on the NumPy reference device,
  which is not a GPU), ``round trip`` (p50 and p99 of ``--samples`` brief SERVER_INFO queries on
  one connection, each a full request and reply through the client library; WARN when the p50
  is over the 50 us Bitfusion asks of a network), ``clock`` (the server's clock against the
  midpoint of the fastest query: WARN over 1 s, FAIL over 60 s, as leases' idle timeouts and
  logs are read across hosts), ``MTU`` (the route's MTU, from ``IP_MTU`` on a connected UDP
  socket, which sends nothing: WARN under 1500).

``--json`` prints a list of ``{"status", "check", "detail", "server", "values"}`` (``server``
is null for the client's own checks; ``values`` holds the numbers measured, if any).

Exit status: 0 when no check failed; 1 when any did; 68 (``EXIT_NO_SERVER``) when no server
answered; 78 (``EXIT_CONFIG``) when no servers are configured or a configuration file is wrong.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import platform
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .. import __version__
from ..protocol import PROTOCOL_VERSION, BitfusionError
from ..protocol import messages as m
from ..transport import parse_address
from . import EXIT_NO_SERVER
from .control import ControlConnection, ServerView
from .listing import ask_all, close_all, pool_settings

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
EXIT_FAILED = 1

ROUND_TRIP_TARGET_S = 50e-6  # what Bitfusion asks of the network between clients and servers
MIN_MTU = 1500
ADVISED_MTU = 4096  # FlexDirect's health checks advise 4096..9000
MIN_OPEN_FILES = 4096
CLOCK_WARN_S = 1.0
CLOCK_FAIL_S = 60.0
NUMPY_EXECUTOR = "numpy"

# Linux <netinet/in.h>: the path MTU of a connected socket (getsockopt only).
IP_MTU = getattr(socket, "IP_MTU", 14)
IPV6_MTU = getattr(socket, "IPV6_MTU", 24)


@dataclass
class Check:
    status: str  # PASS, WARN or FAIL
    check: str
    detail: str
    server: str | None = None  # HOST:PORT, or None for the client's own checks
    values: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        where = f" {self.server}" if self.server else ""
        return f"[{self.status}] {self.check}{where}: {self.detail}"

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "check": self.check,
            "detail": self.detail,
            "server": self.server,
            "values": self.values,
        }


# -- the client's own checks ------------------------------------------------------------------------
def check_client() -> Check:
    return Check(
        PASS,
        "client version",
        f"bitfusion-net {__version__}, wire protocol {PROTOCOL_VERSION}, Python "
        f"{platform.python_version()} on {platform.system() or sys.platform}",
        values={"version": __version__, "protocol": PROTOCOL_VERSION},
    )


def check_open_files() -> Check:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError) as exc:
        return Check(WARN, "open files", f"cannot read the open-file limit: {exc}")

    def text(limit: int) -> str:
        return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)

    values = {"soft": soft, "hard": hard}
    if soft != resource.RLIM_INFINITY and soft < MIN_OPEN_FILES:
        return Check(
            WARN,
            "open files",
            f"limit {text(soft)} (hard {text(hard)}), under {MIN_OPEN_FILES}: every server and "
            f"GPU connection takes one; raise it (ulimit -n {MIN_OPEN_FILES}, or nofile in "
            "/etc/security/limits.conf)",
            values=values,
        )
    return Check(PASS, "open files", f"limit {text(soft)} (hard {text(hard)})", values=values)


# -- per server -------------------------------------------------------------------------------------
def check_version(name: str, server: dict[str, Any]) -> Check:
    version, protocol = str(server.get("version", "?")), server.get("protocol")
    values = {"version": version, "protocol": protocol}
    if protocol != PROTOCOL_VERSION:
        return Check(
            FAIL,
            "version",
            f"server {version} speaks wire protocol {protocol}, this client {PROTOCOL_VERSION}: "
            "upgrade the older side",
            name,
            values,
        )
    if version != __version__:
        return Check(
            WARN,
            "version",
            f"server {version}, client {__version__} (same wire protocol {protocol})",
            name,
            values,
        )
    return Check(
        PASS, "version", f"{version}, wire protocol {protocol}, as the client", name, values
    )


def check_executor(name: str, info: dict[str, Any]) -> Check:
    gpus = list(info.get("gpus", []))
    executor = str(info.get("server", {}).get("executor", ""))
    if not gpus:
        return Check(FAIL, "executor", "the server offers no GPUs", name, {"gpus": 0})
    names = sorted({str(g.get("name", "?")) for g in gpus})
    kinds = sorted({str(g.get("executor") or executor) for g in gpus})
    values = {"gpus": len(gpus), "executor": executor, "names": names}
    what = f"{len(gpus)} GPU(s), {', '.join(names)} ({', '.join(kinds)} executor)"
    if NUMPY_EXECUTOR in kinds:
        return Check(
            WARN,
            "executor",
            f"{what}: the NumPy reference device, not a GPU (start the server with "
            "--executor pycuda on a GPU host)",
            name,
            values,
        )
    return Check(PASS, "executor", what, name, values)


@dataclass
class Timing:
    round_trips: list[float]  # seconds
    skew: float | None  # the server's clock less ours, from the fastest query
    error: str = ""


WARM_UP = 5  # queries not counted: the first ones pay for imports, caches and buffers


def time_queries(connection: ControlConnection, samples: int) -> Timing:
    """``samples`` brief SERVER_INFO queries one after another on one connection (after a few
    not counted)."""
    round_trips: list[float] = []
    best, skew = float("inf"), None
    for number in range(-min(WARM_UP, samples), samples):
        wall = time.time()
        start = time.perf_counter()
        try:
            info = connection.info(m.INFO_BRIEF)
        except BitfusionError as exc:
            return Timing(round_trips, skew, exc.message)
        took = time.perf_counter() - start
        if number < 0:
            continue
        round_trips.append(took)
        server_time = info.get("server", {}).get("time")
        if took < best and isinstance(server_time, (int, float)):
            best, skew = took, float(server_time) - (wall + took / 2)
    return Timing(round_trips, skew)


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} us"


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` in 0..1)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(round(fraction * len(ordered), 9))))
    return ordered[rank - 1]


def is_loopback(address: str) -> bool:
    try:
        host = parse_address(address).host
        return ipaddress.ip_address(host).is_loopback or host == "localhost"
    except ValueError:
        return False


def check_round_trip(name: str, timing: Timing, loopback: bool = False) -> Check:
    if not timing.round_trips:
        return Check(FAIL, "round trip", f"no query answered: {timing.error}", name)
    p50 = statistics.median(timing.round_trips)
    p99 = percentile(timing.round_trips, 0.99)
    values = {
        "p50_us": round(p50 * 1e6, 1),
        "p99_us": round(p99 * 1e6, 1),
        "samples": len(timing.round_trips),
    }
    detail = (
        f"p50 {_us(p50)}, p99 {_us(p99)} over {len(timing.round_trips)} queries "
        f"(target: p50 <= {_us(ROUND_TRIP_TARGET_S)})"
    )
    if timing.error:
        return Check(
            FAIL,
            "round trip",
            f"{detail}; then the connection failed: {timing.error}",
            name,
            values,
        )
    if p50 > ROUND_TRIP_TARGET_S:
        advice = (
            "on loopback this is the client's and the server's own time, not a network's"
            if loopback
            else "calls that wait for a reply will be slow: use a faster or closer network"
        )
        return Check(WARN, "round trip", f"{detail}: {advice}", name, values)
    return Check(PASS, "round trip", detail, name, values)


def check_clock(name: str, timing: Timing) -> Check | None:
    if timing.skew is None:
        return None
    skew = timing.skew
    values = {"skew_s": round(skew, 6)}
    side = "ahead of" if skew > 0 else "behind"
    amount = f"{abs(skew):.3f} s" if abs(skew) >= 1 else f"{abs(skew) * 1e3:.1f} ms"
    detail = f"the server's clock is {amount} {side} this client's"
    if abs(skew) > CLOCK_FAIL_S:
        return Check(FAIL, "clock", f"{detail}: synchronise both with NTP", name, values)
    if abs(skew) > CLOCK_WARN_S:
        return Check(WARN, "clock", f"{detail}: synchronise both with NTP", name, values)
    return Check(PASS, "clock", detail, name, values)


def route_mtu(address: str) -> int:
    """The MTU of the route to ``address`` (``tcp://HOST:PORT``): ``IP_MTU`` of a UDP socket
    connected there (connecting a UDP socket sends nothing). Raises OSError or ValueError."""
    target = parse_address(address)
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        target.host, target.port, type=socket.SOCK_DGRAM
    )[0]
    with socket.socket(family, kind, proto) as probe:
        probe.connect(sockaddr)
        if family == socket.AF_INET6:
            return int(probe.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU))
        return int(probe.getsockopt(socket.IPPROTO_IP, IP_MTU))


def check_mtu(name: str, address: str) -> Check:
    try:
        mtu = route_mtu(address)
    except (OSError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or exc
        return Check(WARN, "MTU", f"cannot read the route's MTU on this system: {why}", name)
    values = {"mtu": mtu}
    if mtu < MIN_MTU:
        return Check(
            WARN,
            "MTU",
            f"{mtu} bytes, under {MIN_MTU}: large copies take many more packets; raise the "
            f"interfaces' MTU ({ADVISED_MTU}..9000 advised)",
            name,
            values,
        )
    advice = "" if mtu >= ADVISED_MTU else f" ({ADVISED_MTU}..9000 helps large copies)"
    return Check(PASS, "MTU", f"{mtu} bytes{advice}", name, values)


def check_server(view: ServerView, name: str, samples: int) -> list[Check]:
    if not view.ok:
        return [Check(FAIL, "reachable", view.error.removeprefix(f"tcp://{name}: "), name)]
    checks = [
        Check(
            PASS,
            "reachable",
            f"answered in {view.round_trip * 1e3:.1f} ms (connect and full SERVER_INFO)",
            name,
            {"seconds": round(view.round_trip, 6)},
        ),
        check_version(name, view.info.get("server", {})),
        check_executor(name, view.info),
    ]
    if view.connection is not None:
        timing = time_queries(view.connection, samples)
        checks.append(check_round_trip(name, timing, is_loopback(view.connection.address)))
        clock = check_clock(name, timing)
        if clock is not None:
            checks.append(clock)
        checks.append(check_mtu(name, view.connection.address))
    return checks


# -- the command ------------------------------------------------------------------------------------
def run_checks(args: argparse.Namespace) -> tuple[list[Check], int]:
    """Every check, and how many servers answered."""
    servers, source, timeout = pool_settings(args)
    checks = [check_client(), check_open_files()]
    checks.append(
        Check(
            PASS,
            "servers",
            f"{len(servers)} configured (from {source})",
            None,
            {"count": len(servers), "source": source},
        )  # fmt: skip
    )
    answers = ask_all(servers, timeout, keep_open=True)
    try:
        # One server after another: timing several at once would measure this process's
        # threads more than the network.
        for view, name in answers:
            checks += check_server(view, name, max(1, int(getattr(args, "samples", 200))))
    finally:
        close_all([view for view, _ in answers])
    return checks, sum(1 for view, _ in answers if view.ok)


def health(args: argparse.Namespace) -> int:
    checks, answered = run_checks(args)
    if args.json:
        print(json.dumps([c.to_json() for c in checks], indent=2))
    else:
        for check in checks:
            print(check.line())
    if not answered:
        return EXIT_NO_SERVER
    return EXIT_FAILED if any(c.status == FAIL for c in checks) else 0
