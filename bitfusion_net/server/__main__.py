"""``python -m bitfusion_net.server``: share this host's GPUs over the network."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from executors import EXECUTOR_KINDS, GpuUnavailable

from ..transport import ServerTls, loop_factory
from ..units import parse_duration, parse_size
from .server import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_IDLE_TIMEOUT,
    DEFAULT_STALL_TIMEOUT,
    Server,
)
from .tokens import default_state_dir

# While a device worker thread runs Python, the event loop waits up to the switch interval for
# the GIL at each hand-off. Measured on a 2-core VM beside a client flooding launches
# (perf/flood.py), a neighbour's small call had p99 13 ms at Python's default 5 ms, 5.6 ms at
# 2 ms and 4.4-5.4 ms at 1 ms; but more hand-offs cost pipelined launches (perf/latency.py,
# blocking API): 59-62 k/s at 5 ms, 46-57 k/s at 2 ms, 41-45 k/s at 1 ms. 2 ms is the middle.
GIL_SWITCH_INTERVAL_S = 0.002

log = logging.getLogger("bitfusion_net.server")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bitfusion_net.server",
        description=(
            "Share this host's GPUs, whole or in fractions down to 1/20, with bitfusion-net "
            "clients over TCP. Prints 'listening on tcp://HOST:PORT' on stdout when ready; "
            "SIGINT or SIGTERM shut it down cleanly, releasing every lease; SIGUSR1 logs every "
            "tenant's lease (fraction, mode, weight) and usage (device time, queue wait, memory). "
            "With --manage it also serves health, Prometheus metrics, a JSON API and dashboards, "
            "and prints 'management on http://HOST:PORT' next. "
            "'bitfusion-server token --help' manages the tokens of users; "
            "'bitfusion-server status --help' reads a running server's state."
        ),
    )
    parser.add_argument(
        "--listen",
        action="append",
        default=None,
        metavar="tcp://HOST:PORT",
        help="address to accept clients on: tcp://, tls:// (with --tls-cert) or rdma:// (RDMA "
        "set up over TCP to that port; needs pyverbs and a device, docs/RDMA.md); repeat it to "
        "serve several at once (a 'listening on' line each); port 0 picks a free port "
        "(default: tcp://127.0.0.1:0)",
    )
    parser.add_argument(
        "--executor",
        default="auto",
        choices=list(EXECUTOR_KINDS),
        help="what runs the work: 'pycuda' is this host's NVIDIA GPUs (needs the [gpu] extra "
        "and a driver), 'numpy' the embedded NumPy reference device, a GPU-like device for "
        "machines without one; 'auto' picks PyCUDA when a GPU is usable and says so on start-up "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--gpus",
        type=int,
        default=None,
        metavar="N",
        help="number of devices to share (default: every GPU, or one NumPy device)",
    )
    parser.add_argument(
        "--gpu-memory",
        default=None,
        type=_size,
        metavar="SIZE",
        help="memory of each NumPy device (default: 16GiB), or the most of each real GPU's "
        "memory offered to tenants (default: its free memory less a headroom), e.g. 1GiB",
    )
    parser.add_argument(
        "--min-fraction",
        type=float,
        default=0.05,
        metavar="F",
        help="smallest slice of a GPU a client may lease (default: %(default)s, i.e. 1/20)",
    )
    parser.add_argument(
        "--max-payload",
        type=_size,
        default="64MiB",
        metavar="SIZE",
        help="largest bulk payload in one frame; clients split larger copies (default: 64MiB)",
    )
    parser.add_argument(
        "--scheduling",
        default="fair",
        choices=["fair", "fifo"],
        help="how each GPU's time is shared between its tenants: 'fair' is weighted fair "
        "time-slicing on measured device time (a tenant gets at least its fraction whenever it "
        "has work); 'fifo' is arrival order, for comparison (default: %(default)s)",
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=DEFAULT_STALL_TIMEOUT,
        metavar="SECONDS",
        help="close a connection stalled that long in the middle of a frame, or connected "
        "without its HELLO (default: %(default)s)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="refuse connections beyond this many with a CAPACITY error (default: %(default)s)",
    )
    parser.add_argument(
        "--max-idle-timeout",
        type=_duration,
        default=DEFAULT_MAX_IDLE_TIMEOUT,
        metavar="DURATION",
        help="the longest a reservation may sit idle (no call on any of its connections) before "
        "it is released; clients may ask for less, and asking for none gets this; 0: no bound "
        "(default: 24h)",
    )
    parser.add_argument(
        "--state-dir",
        default=None,
        metavar="DIR",
        help="the server's state directory: with a token store there (bitfusion-server token "
        "create), every client needs a token and its user's quotas hold "
        f"(default: {default_state_dir()})",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="without tokens, accept anyone on an address other than loopback (logged as a "
        "warning): anyone who can reach the port can use every GPU",
    )
    parser.add_argument(
        "--tls-cert",
        default=None,
        metavar="FILE",
        help="serve TLS only, with this certificate (PEM; with --tls-key)",
    )
    parser.add_argument("--tls-key", default=None, metavar="FILE", help="the certificate's key")
    parser.add_argument(
        "--tls-client-ca",
        default=None,
        metavar="FILE",
        help="mutual TLS: clients must present a certificate signed by this CA",
    )
    parser.add_argument(
        "--manage",
        default=None,
        metavar="http://HOST:PORT",
        help="serve the management endpoint there: /healthz, /readyz, /metrics (Prometheus, "
        "dcgm-exporter names), /api/v1/ (JSON) and the dashboards at /; it may be another "
        "interface than --listen; port 0 picks a free port; https:// with --tls-cert "
        "(docs/OBSERVABILITY.md)",
    )
    parser.add_argument(
        "--pool",
        action="append",
        default=[],
        metavar="URL",
        help="the management URL of another server of this pool, for the dashboards' cluster "
        "view (repeat for each)",
    )
    parser.add_argument(
        "--manage-open-metrics",
        action="store_true",
        help="serve /metrics without a token even when the server has tokens (the JSON API "
        "and dashboards still need an operator's token)",
    )
    parser.add_argument(
        "--gil-switch-interval",
        type=float,
        default=GIL_SWITCH_INTERVAL_S,
        metavar="SECONDS",
        help="how long the event loop may wait for Python's GIL while a device worker thread "
        "holds it (sys.setswitchinterval; Python's own default is 0.005; default: %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging verbosity on stderr (default: %(default)s)",
    )
    return parser


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


async def serve(args: argparse.Namespace) -> None:
    listens = args.listen or ["tcp://127.0.0.1:0"]
    server = Server(
        listen=listens[0],
        also_listen=listens[1:],
        executor=args.executor,
        gpus=args.gpus,
        gpu_memory=args.gpu_memory,
        min_fraction=args.min_fraction,
        max_payload=args.max_payload,
        scheduling=args.scheduling,
        stall_timeout=args.stall_timeout,
        max_connections=args.max_connections,
        max_idle_timeout=args.max_idle_timeout,
        tls=ServerTls(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None,
        state_dir=args.state_dir or default_state_dir(),
        insecure=args.insecure,
        manage=args.manage,
        manage_pool=args.pool,
        open_metrics=args.manage_open_metrics,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        loop.add_signal_handler(signal.SIGUSR1, lambda: log.info("tenants:\n%s", server.report()))
        for address in server.addresses:
            print(f"listening on {address}", flush=True)
        if args.manage:
            print(f"management on {server.manage_address}", flush=True)
        await stop.wait()
        log.info("shutting down")


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["token"]:  # bitfusion-server token create | list | revoke
        from .token_admin import main as token_main

        return token_main(arguments[1:])
    if arguments[:1] == ["status"]:  # bitfusion-server status --manage URL
        from .status import main as status_main

        return status_main(arguments[1:])
    parser = build_parser()
    args = parser.parse_args(arguments)
    if args.gpus is not None and args.gpus < 1:
        parser.error("--gpus must be at least 1")
    if not args.stall_timeout > 0:
        parser.error("--stall-timeout must be positive")
    if args.max_connections < 1:
        parser.error("--max-connections must be at least 1")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")
    if args.manage is None and (args.pool or args.manage_open_metrics):
        parser.error("--pool and --manage-open-metrics need --manage")
    if not args.gil_switch_interval > 0:
        parser.error("--gil-switch-interval must be positive")
    sys.setswitchinterval(args.gil_switch_interval)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(serve(args))
    except GpuUnavailable as exc:
        print(
            f"error: --executor {args.executor} needs a usable NVIDIA GPU: {exc}", file=sys.stderr
        )
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
