"""``bitfusion-server token create | list | revoke``: the operator's tokens, on the server host.

    bitfusion-server token create --user alice --max-gpus 2 --max-memory 40GiB \\
        --max-fraction 1.5 --expires 90d          # prints the token, once
    bitfusion-server token create --user bob --bundle bob.tar.gz \\
        --server tls://gpu1:7000 --server tls://gpu2:7000 --ca ca.pem   # a client bundle
    bitfusion-server token list [--json]
    bitfusion-server token revoke ID

The store is ``tokens.sqlite3`` in the state directory (``--state-dir``, else
``$BITFUSION_NET_STATE_DIR``, else ``~/.local/state/bitfusion-net``), the one the server uses.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import NoReturn

from ..units import format_size, parse_duration, parse_size
from .tokens import TokenError, TokenStore, default_state_dir

EXIT_USAGE = 64
EXIT_NO_TOKEN = 65


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError("a token must expire after a positive time")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bitfusion-server token", description="Manage this server's tokens.")
    parser.add_argument(
        "--state-dir",
        default=None,
        metavar="DIR",
        help=f"where tokens.sqlite3 is (default: {default_state_dir()})",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    create = commands.add_parser("create", help="make a token for a user; prints it once")
    create.add_argument("--user", required=True, help="whose token it is (quotas are per user)")
    create.add_argument("--max-gpus", type=int, default=None, metavar="N",
                        help="GPUs the user may hold at once (default: no limit)")  # fmt: skip
    create.add_argument("--max-memory", type=_size, default=None, metavar="SIZE",
                        help="GPU memory the user may hold at once, e.g. 40GiB")  # fmt: skip
    create.add_argument("--max-fraction", type=float, default=None, metavar="F",
                        help="sum of the fractions of GPUs the user may hold, e.g. 1.5")  # fmt: skip
    create.add_argument("--expires", type=_duration, default=None, metavar="DURATION",
                        help="valid for this long, e.g. 90d (default: until revoked)")  # fmt: skip
    create.add_argument("--operator", action="store_true",
                        help="the token may also read the management endpoint's API, metrics "
                        "and dashboards (docs/OBSERVABILITY.md)")  # fmt: skip
    create.add_argument("--bundle", default=None, metavar="FILE",
                        help="also write a client bundle (tar.gz: client.yaml with the token, "
                        "servers.conf, ca.crt) to unpack into the user's ~/.bitfusion-net/")  # fmt: skip
    create.add_argument("--server", dest="servers", action="append", default=[],
                        metavar="ADDRESS", help="a server for the bundle's servers.conf (repeat)")  # fmt: skip
    create.add_argument("--ca", default=None, metavar="FILE",
                        help="the CA certificate (PEM) the bundle's clients verify servers with")  # fmt: skip
    listing = commands.add_parser("list", help="every token: user, limits, state (no secrets)")
    listing.add_argument("--json", action="store_true")
    revoke = commands.add_parser("revoke", help="revoke a token by its id")
    revoke.add_argument("id", help="the token's id (from list), or the whole token")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    store = TokenStore(args.state_dir or default_state_dir())
    try:
        if args.command == "create":
            token, record = store.create(
                args.user,
                max_gpus=args.max_gpus,
                max_memory=args.max_memory,
                max_fraction=args.max_fraction,
                expires_in=args.expires,
                operator=args.operator,
            )
            print(token)
            if args.bundle:
                write_bundle(args.bundle, token, args.servers, args.ca)
                print(f"client bundle written to {args.bundle} (mode 0600)", file=sys.stderr)
            print(
                f"token {record.id} for {record.user} created in {store.path}; it is shown only "
                "now: give it to the user (it cannot be read back)",
                file=sys.stderr,
            )
        elif args.command == "list":
            _list(store, args.json)
        else:
            record = store.revoke(args.id)
            print(f"revoked token {record.id} of {record.user}", file=sys.stderr)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TokenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_TOKEN
    return 0


def write_bundle(path: str, token: str, servers: list[str], ca_file: str | None) -> None:
    """A tar.gz of what a client needs, laid out as ``~/.bitfusion-net/``: ``client.yaml``
    (the token, and ``tls_ca`` when there is a CA), ``servers.conf``, ``ca.crt`` (as Bitfusion's
    token bundle holds ``client.yaml``, ``servers.conf`` and ``ca.crt``). Readable by its
    owner only: it holds the token."""
    import io
    import os
    import tarfile

    import yaml

    client: dict[str, str] = {"token": token}
    files: dict[str, bytes] = {}
    if ca_file:
        files["ca.crt"] = Path(ca_file).read_bytes()
        client["tls_ca"] = "~/.bitfusion-net/ca.crt"
    files["client.yaml"] = yaml.safe_dump(client).encode()
    if servers:
        files["servers.conf"] = yaml.safe_dump(
            {"servers": [{"addresses": [s]} for s in servers]}
        ).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out, tarfile.open(fileobj=out, mode="w:gz") as bundle:
        for name, data in files.items():
            entry = tarfile.TarInfo(name)
            entry.size, entry.mode, entry.mtime = len(data), 0o600, int(time.time())
            bundle.addfile(entry, io.BytesIO(data))


def _list(store: TokenStore, as_json: bool) -> None:
    now = time.time()
    records = store.records() if store.path.exists() else []
    if as_json:
        print(json.dumps([{**asdict(r), "state": r.state(now)} for r in records], indent=2))
        return

    def stamp(seconds: float | None) -> str:
        return "-" if seconds is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(seconds))

    rows = [
        ("ID", "USER", "ROLE", "STATE", "MAX GPUS", "MAX MEMORY", "MAX FRACTION", "CREATED", "EXPIRES")
    ]
    for r in records:
        rows.append(
            (
                r.id,
                r.user,
                "operator" if r.operator else "user",
                r.state(now),
                "-" if r.max_gpus is None else str(r.max_gpus),
                "-" if r.max_memory is None else format_size(r.max_memory),
                "-" if r.max_fraction is None else f"{r.max_fraction:g}",
                stamp(r.created),
                stamp(r.expires),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    if not records:
        print(f"(no tokens in {store.path})")
