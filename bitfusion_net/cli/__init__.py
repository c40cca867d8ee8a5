"""The ``bitfusion-net`` command (also ``python -m bitfusion_net``): what a Bitfusion user types.

    bitfusion-net run -n 1 -p 0.25 -- python train.py
    bitfusion-net request_gpus -n 2 -m 8GiB --idle-timeout 30m     then   release_gpus -f FILE
    bitfusion-net list_gpus | smi | health | version                 (each takes --json)

Exit status: ``run`` exits with its command's status; our own failures use the codes below
(sysexits.h), each with a message saying what was asked, what is free where, and what to try.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from ..protocol import PROTOCOL_VERSION, BitfusionError, CapacityError, InvalidValueError
from ..units import parse_duration, parse_size
from . import logline

if TYPE_CHECKING:
    from ..client.lease import ReservationFile
    from .reserve import Held

EXIT_USAGE = 64  # the command line is wrong
EXIT_DATA = 65  # a reservation file cannot be used
EXIT_NO_SERVER = 68  # no server of the pool answered
EXIT_NO_CAPACITY = 69  # the pool has no room for the request (after --wait)
EXIT_SOFTWARE = 70  # a bug of ours, or a server's unexpected error
EXIT_CONFIG = 78  # no servers configured, or a configuration file is wrong
EXIT_CODES = {
    EXIT_USAGE: "the command line is wrong",
    EXIT_DATA: "a reservation file cannot be read or used",
    EXIT_NO_SERVER: "no server of the pool answered",
    EXIT_NO_CAPACITY: "the pool has no room for the request (within --wait)",
    EXIT_SOFTWARE: "an unexpected error (a bug: please report it)",
    EXIT_CONFIG: "no servers are configured, or a configuration file is wrong",
}

DEFAULT_REQUEST_IDLE_TIMEOUT = 30 * 60.0  # request_gpus: a forgotten reservation frees itself


class Failure(Exception):
    """A failure of ours: its message is printed and ``run`` exits with ``code``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # exit 64, not argparse's 2
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


# -- argument types ---------------------------------------------------------------------------------
def _memory(text: str) -> int:
    """``-m``: a bare number is MiB, as in Bitfusion (``-m 8000``); units work too (``8GiB``)."""
    try:
        value = parse_size(text + "MiB" if text.strip().replace(".", "", 1).isdigit() else text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError("memory must be positive")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a fraction of a GPU is in (0, 1], got {value:g}")
    return value


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _gpus(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"the number of GPUs is a whole number >= 1, got {text!r}")
    return int(text)


def _weight(text: str) -> float:
    value = _fraction_like(text)
    if not 0 < value <= 1000:
        raise argparse.ArgumentTypeError(f"weight must be in (0, 1000], got {value:g}")
    return value


def _fraction_like(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


# -- the parser -------------------------------------------------------------------------------------
def _pool_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("servers")
    group.add_argument(
        "--servers",
        "-s",
        metavar="FILE",
        help="a servers.conf file (default: ~/.bitfusion-net/servers.conf, then "
        "/etc/bitfusion-net/servers.conf; $BITFUSION_NET_SERVERS overrides them)",
    )
    group.add_argument(
        "--server_list",
        "--server-list",
        "-l",
        dest="server_list",
        metavar="HOST:PORT,...",
        help="the servers to use, instead of any file",
    )
    group.add_argument(
        "--timeout",
        type=_duration,
        default=None,
        metavar="DURATION",
        help="how long each server has to answer before it is skipped (default 2s, or "
        "query_timeout in client.yaml)",
    )


def _sizing_options(parser: argparse.ArgumentParser, idle_help: str) -> None:
    parser.add_argument("-n", "--num_gpus", dest="gpus", type=_gpus, default=1, metavar="N",
                        help="how many GPUs (default 1); on one server if one has room, else "
                        "across several")  # fmt: skip
    size = parser.add_mutually_exclusive_group()
    size.add_argument("-p", "--partial", dest="fraction", type=_fraction, metavar="FRACTION",
                      help="the fraction of each GPU, 0.05..1 (its memory and compute share; "
                      "default 1)")  # fmt: skip
    size.add_argument("-m", "--memory", dest="memory", type=_memory, metavar="SIZE",
                      help="the memory of each GPU instead: MiB when bare (-m 8000, as Bitfusion), "
                      "or with a unit (-m 8GiB)")  # fmt: skip
    parser.add_argument("--mode", choices=["share", "cap"], default=None,
                        help="share: at least the fraction's share of each GPU's time, more when "
                        "it is idle (default); cap: never more than the fraction")  # fmt: skip
    parser.add_argument("--weight", type=_weight, default=None, metavar="W",
                        help="compute weight apart from the fraction")  # fmt: skip
    parser.add_argument("--filter", dest="filters", action="append", default=[],
                        metavar="KEY=VALUE", help="only servers and GPUs that match (repeatable): "
                        "server.addr, server.hostname, device.name, device.phy-memory>=MIB, ...")  # fmt: skip
    parser.add_argument("--wait", type=_duration, default=None, metavar="DURATION",
                        help="wait that long for capacity, asking again every 0.5 s (default 0: "
                        "fail at once)")  # fmt: skip
    parser.add_argument("--idle-timeout", "--idle_timeout", dest="idle_timeout",
                        type=_duration, default=None, metavar="DURATION", help=idle_help)  # fmt: skip
    _pool_options(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bitfusion-net",
        description="Use GPUs of a pool of bitfusion-net servers, whole or in fractions, from a "
        "machine without one. Exit status: run's is its command's; ours: "
        + "; ".join(f"{code} {text}" for code, text in EXIT_CODES.items())
        + ".",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    run = commands.add_parser(
        "run",
        help="reserve GPUs, run a command on them, release them when it ends",
        description="Reserve GPUs, run CMD with the reservation in its environment "
        "(BITFUSION_NET_LEASE: bitfusion_net.connect() with no arguments uses it), and release "
        "them when CMD ends. Exits with CMD's status; SIGINT, SIGTERM and SIGHUP are passed on.",
    )
    _sizing_options(run, "release the GPUs if no call reaches them for that long (default: "
                    "the server's maximum, 24h unless its operator set another)")  # fmt: skip
    run.add_argument("--reservation", "-f", metavar="FILE",
                     help="run on GPUs already reserved with request_gpus (not released after)")  # fmt: skip
    run.add_argument("--pycuda", action=argparse.BooleanOptionalAction, default=True,
                     help="let Python programs written for PyCUDA run unchanged: 'import pycuda' "
                     "finds bitfusion-net's PyCUDA-compatible layer first (PYTHONPATH); "
                     "--no-pycuda leaves PYTHONPATH alone (default: on)")  # fmt: skip
    run.add_argument("--agent", action=argparse.BooleanOptionalAction, default=True,
                     help="let CUDA driver-API programs (cuda-python, C with cuda.h) run "
                     "unchanged: libcuda.so.1 is bitfusion-net's agent (LD_LIBRARY_PATH; built "
                     "on first use, docs/AGENT.md); --no-agent leaves it alone (default: on)")  # fmt: skip
    run.add_argument("command_line", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...")

    request = commands.add_parser(
        "request_gpus",
        help="reserve GPUs that outlive one command",
        description="Reserve GPUs until release_gpus, or until no call reaches them for the "
        "idle timeout. Writes a reservation file (mode 0600: its secret is the right to use the "
        "GPUs) and says where; with --shell prints 'export BITFUSION_NET_LEASE=FILE' for eval.",
    )
    _sizing_options(request, "release the GPUs if no call reaches them for that long (default "
                    "30m, or idle_timeout in client.yaml; 0: the server's maximum)")  # fmt: skip
    request.add_argument("--file", "-f", metavar="FILE", help="where to write the reservation file")
    request.add_argument("--shell", action="store_true",
                         help="print an export line for eval: eval $(bitfusion-net request_gpus ...)")  # fmt: skip

    release = commands.add_parser("release_gpus", help="end a reservation from request_gpus")
    release.add_argument("-f", "--file", dest="file", metavar="FILE", default=None,
                         help="the reservation file (default: $BITFUSION_NET_LEASE)")  # fmt: skip

    for name, text in (
        ("list_gpus", "every GPU of every server: what is leased, what is free"),
        ("smi", "an nvidia-smi-like table of your GPUs (inside a run: the run's)"),
        ("health", "check the path to every server: versions, round trip, MTU, limits, clocks"),
    ):
        listing = commands.add_parser(name, help=text, description=text)
        _pool_options(listing)
        listing.add_argument("--json", action="store_true", help="print JSON instead of text")
        if name == "smi":
            listing.add_argument("--interval", type=_duration, default=0.5, metavar="DURATION",
                                 help="utilisation is measured over this interval (default 0.5s)")  # fmt: skip
        if name == "health":
            listing.add_argument("--samples", type=_gpus, default=200, metavar="N",
                                 help="round trips timed per server (default 200)")  # fmt: skip

    version = commands.add_parser("version", help="the client's version and protocol")
    version.add_argument("--json", action="store_true")
    return parser


# -- entry point ------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "run": _run,
        "request_gpus": _request_gpus,
        "release_gpus": _release_gpus,
        "list_gpus": _list_gpus,
        "smi": _smi,
        "health": _health,
        "version": _version,
    }
    try:
        return handlers[args.command](args)
    except Failure as failure:
        logline.error(str(failure))
        return failure.code
    except KeyboardInterrupt:
        return 130


def _version(args: argparse.Namespace) -> int:
    from .. import __version__

    if args.json:
        import json

        print(json.dumps({"version": __version__, "protocol": PROTOCOL_VERSION}))
    else:
        print(f"bitfusion-net {__version__} (wire protocol {PROTOCOL_VERSION})")
    return 0


# -- reserving ---------------------------------------------------------------------------------------
def _reserve(args: argparse.Namespace, hold: bool, default_idle: float) -> Held:
    """Reserve what the command line asks for, with the configured defaults; ``Failure`` with
    the right exit code if it cannot be."""
    from ..client.session import program_name
    from .config import ConfigError, find_servers, load_client_config
    from .placement import Ask, Filter, FilterError, NoRoom
    from .reserve import NoServer, reserve

    try:
        config = load_client_config()
        pool = find_servers(args.servers, args.server_list)
    except ConfigError as exc:
        raise Failure(EXIT_CONFIG, str(exc)) from None
    try:
        filters = [Filter.parse(text) for text in args.filters]
    except FilterError as exc:
        raise Failure(EXIT_USAGE, str(exc)) from None
    memory = args.memory or 0
    idle = args.idle_timeout
    if idle is None:
        idle = config.idle_timeout if config.idle_timeout is not None else default_idle
    try:
        return reserve(
            Ask(args.gpus, 0.0 if memory else (args.fraction or 1.0), memory),
            pool,
            filters,
            mode=args.mode or config.mode,
            weight=args.weight,
            hold=hold,
            idle_timeout=idle,
            wait=args.wait if args.wait is not None else config.wait,
            query_timeout=args.timeout or config.query_timeout,
            client_name=program_name(f"bitfusion-net {args.command}"),
            tls=config.tls,
            token=config.token,
        )
    except NoServer as exc:
        raise Failure(
            EXIT_NO_SERVER, f"{exc}; check the servers are running (bitfusion-net health)"
        ) from None
    except NoRoom as exc:
        hint = "try fewer GPUs or a smaller -p/-m, wait for capacity with --wait 5m, or see bitfusion-net list_gpus"
        raise Failure(EXIT_NO_CAPACITY, f"{exc}; {hint}") from None
    except InvalidValueError as exc:
        raise Failure(EXIT_USAGE, f"a server refused the request: {exc.message}") from None
    except CapacityError as exc:
        raise Failure(EXIT_NO_CAPACITY, str(exc)) from None
    except BitfusionError as exc:
        raise Failure(EXIT_SOFTWARE, f"unexpected error from a server: {exc}") from None


def _announce_lock(lease: ReservationFile, path: str) -> None:
    from .reserve import partial_memory

    logline.plain("Requested resources:")
    logline.plain(
        "Server List: " + ", ".join(s.address.removeprefix("tcp://") for s in lease.servers)
    )
    granted = max((s.idle_timeout for s in lease.servers), default=0.0)
    # Bitfusion's line, in minutes; 0 means none, so a short timeout is not rounded to it
    logline.plain(f"Client idle timeout: {granted / 60:.4g} min")
    logline.info(
        f"Locked {lease.gpus} GPUs with partial memory {partial_memory(lease):g}, "
        f"configuration saved to '{path}'"
    )


def _new_lease_path() -> str:
    import tempfile

    fd, path = tempfile.mkstemp(prefix="bitfusion-net-", suffix=".json")
    os.close(fd)
    return path


def _run(args: argparse.Namespace) -> int:
    from ..client.lease import LEASE_ENV, ReservationFile
    from . import child

    command = list(args.command_line)
    if command[:1] == ["--"]:
        command = command[1:]
    if len(command) == 1 and " " in command[0].strip():
        command = ["/bin/sh", "-c", command[0]]  # Bitfusion's quoted form: run -n 1 "cmd args"
    if not command:
        raise Failure(
            EXIT_USAGE,
            "run: give the command after --, e.g. bitfusion-net run -n 1 -- python train.py",
        )
    if args.reservation:
        try:
            lease = ReservationFile.load(args.reservation)
        except InvalidValueError as exc:
            raise Failure(EXIT_DATA, exc.message) from None
        logline.info(
            f"Running client command '{child.describe(command)}' on {lease.gpus} GPUs of reservation '{args.reservation}'"
        )
        return _start(
            command, {LEASE_ENV: str(Path(args.reservation).resolve())}, args.pycuda, args.agent
        )
    held = _reserve(args, hold=True, default_idle=0.0)
    path = _new_lease_path()
    try:
        held.lease.save(path)
        _announce_lock(held.lease, path)
        logline.info(
            f"Running client command '{child.describe(command)}' on {held.lease.gpus} GPUs, "
            "with the following servers:"
        )
        for part in held.lease.servers:
            host, _, port = part.address.removeprefix("tcp://").rpartition(":")
            logline.info(f"{host} {port} {part.server_id} {part.server_version}")
        return _start(command, {LEASE_ENV: path}, args.pycuda, args.agent)
    finally:
        logline.info(f"Releasing GPUs from config file '{path}'...")
        held.close()  # the reservations end with their connections (and their last program)
        Path(path).unlink(missing_ok=True)
        logline.info(
            f"Released GPUs on {len(held.lease.servers)} servers and removed generated config "
            f"file '{path}'"
        )


def _start(command: list[str], extra_env: dict[str, str], pycuda: bool, agent: bool) -> int:
    from . import child

    if pycuda:
        from ..pycuda_compat import python_path

        extra_env["PYTHONPATH"] = python_path(os.environ.get("PYTHONPATH", ""))
    if agent:
        from . import agent as cuda_agent

        try:
            extra_env.update(
                cuda_agent.agent_environment(cuda_agent.agent_library_dir(), os.environ)
            )
        except cuda_agent.AgentUnavailable as exc:  # Python-level layers still work without it
            logline.warn(f"CUDA driver-API programs will not reach the GPUs: {exc}")
    try:
        return child.run_command(command, child.environment_with(extra_env))
    except OSError as exc:
        logline.error(f"cannot run '{command[0]}': {exc.strerror or exc}")
        return child.exit_status_for(exc)


def _request_gpus(args: argparse.Namespace) -> int:
    from ..client.lease import LEASE_ENV

    held = _reserve(args, hold=False, default_idle=DEFAULT_REQUEST_IDLE_TIMEOUT)
    path = args.file or _new_lease_path()
    try:
        held.lease.save(path)
    except OSError as exc:
        _release_parts(held.lease)
        held.close()
        raise Failure(
            EXIT_DATA, f"cannot write the reservation file {path!r}: {exc.strerror or exc}"
        ) from None
    held.close()  # the reservations outlive these connections
    _announce_lock(held.lease, path)
    if args.shell:
        import shlex

        print(f"export {LEASE_ENV}={shlex.quote(str(Path(path).resolve()))}")
    return 0


def _release_parts(lease: ReservationFile) -> list[str]:
    """Release every part of ``lease``; returns what could not be released, and why."""
    from ..protocol import LeaseEndedError
    from ..protocol import messages as m
    from .config import Server
    from .control import ControlConnection, configured_credentials

    problems = []
    tls, token = configured_credentials()
    for part in lease.servers:
        try:
            connection = ControlConnection.open(
                Server((part.address,)), 5.0, tls, lease.token or token
            )
        except BitfusionError as exc:
            problems.append(f"{part.address}: {exc.message}")
            continue
        try:
            server_id = connection.info(m.INFO_BRIEF)["server"].get("id")
            if server_id != part.server_id:
                logline.warn(
                    f"{part.address.removeprefix('tcp://')}: the server restarted since the "
                    "reservation was made; its GPUs were released then"
                )
                continue
            connection.release(part.reservation, part.secret)
        except (LeaseEndedError, InvalidValueError) as exc:
            logline.warn(f"{part.address.removeprefix('tcp://')}: already over: {exc.message}")
        except BitfusionError as exc:
            problems.append(f"{part.address}: {exc.message}")
        finally:
            connection.close()
    return problems


def _release_gpus(args: argparse.Namespace) -> int:
    from ..client.lease import LEASE_ENV, ReservationFile

    path = args.file or os.environ.get(LEASE_ENV)
    if not path:
        raise Failure(
            EXIT_USAGE, f"release_gpus: give the reservation file with -f FILE (or set {LEASE_ENV})"
        )
    try:
        lease = ReservationFile.load(path)
    except InvalidValueError as exc:
        raise Failure(EXIT_DATA, exc.message) from None
    logline.info(f"Releasing GPUs from config file '{path}'...")
    problems = _release_parts(lease)
    if problems:
        raise Failure(
            EXIT_NO_SERVER,
            "could not release on: " + "; ".join(problems) + f"; '{path}' is kept, try again",
        )
    Path(path).unlink(missing_ok=True)
    logline.info(f"Released GPUs on {len(lease.servers)} servers and removed config file '{path}'")
    return 0


# -- listings ----------------------------------------------------------------------------------------
def _list_gpus(args: argparse.Namespace) -> int:
    from .listing import list_gpus

    return list_gpus(args)


def _smi(args: argparse.Namespace) -> int:
    from .listing import smi

    return smi(args)


def _health(args: argparse.Namespace) -> int:
    from .health import health

    return health(args)
