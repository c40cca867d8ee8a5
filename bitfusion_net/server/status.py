"""``bitfusion-server status``: what a running server holds, read from its management endpoint's
JSON API (the same documents the dashboards read).

    bitfusion-server status --manage http://gpu-host:9400 [--token T] [--json]

Exit status: 0 when the server's health checks pass (or only warn), 1 when one fails, 69 when
the endpoint cannot be reached, 77 when it refuses the token.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from ..units import format_size

EXIT_FAILING = 1
EXIT_UNAVAILABLE = 69
EXIT_NO_PERMISSION = 77
TIMEOUT_S = 10.0
DOCUMENTS = ("server", "health", "gpus", "leases")


class StatusError(Exception):
    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitfusion-server status",
        description="Show a running server's health, GPUs and leases, from its management "
        "endpoint (python -m bitfusion_net.server --manage ...).",
    )
    parser.add_argument(
        "--manage",
        default=os.environ.get("BITFUSION_NET_MANAGE", "http://127.0.0.1:9400"),
        metavar="URL",
        help="the management endpoint (default: $BITFUSION_NET_MANAGE, else %(default)s)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("BITFUSION_NET_TOKEN"),
        help="an operator's token, if the server has tokens (default: $BITFUSION_NET_TOKEN)",
    )
    parser.add_argument("--ca", default=None, metavar="FILE", help="CA to verify https:// with")
    parser.add_argument("--json", action="store_true", help="print the documents as JSON")
    return parser


def fetch(base: str, name: str, token: str | None, ca: str | None) -> dict[str, Any]:
    """One ``/api/v1/`` document; ``StatusError`` saying what went wrong."""
    request = urllib.request.Request(f"{base.rstrip('/')}/api/v1/{name}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    context = ssl.create_default_context(cafile=ca) if base.startswith("https:") else None
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S, context=context) as answer:
            document: dict[str, Any] = json.load(answer)
            return document
    except urllib.error.HTTPError as exc:
        try:
            text = json.load(exc).get("error", exc.reason)
        except ValueError:
            text = exc.reason
        status = EXIT_NO_PERMISSION if exc.code in (401, 403) else EXIT_UNAVAILABLE
        raise StatusError(f"{base} answered {exc.code}: {text}", status) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusError(f"cannot read {base}: {reason}", EXIT_UNAVAILABLE) from None


def render(documents: dict[str, dict[str, Any]]) -> str:
    server = documents["server"]["server"]
    health = documents["health"]
    lines = [
        f"server {server['hostname']} ({server['address']}), bitfusion-net {server['version']}, "
        f"{server['executor']} executor, {server['scheduling']} scheduling, up "
        f"{server['uptime']:.0f} s, {server['connections']} connection(s)",
        f"health: {health['status']}",
    ]
    lines += [f"  {c['status']:4}  {c['name']}: {c['detail']}" for c in health["checks"]]
    lines.append(
        "GPU  NAME                          LEASED  MEMORY USED / TOTAL        UTIL  TENANTS"
    )
    for gpu in documents["gpus"]["gpus"]:
        util = "-" if gpu["utilisation"] is None else f"{gpu['utilisation'] * 100:3.0f}%"
        memory = f"{format_size(gpu['memory_used'])} / {format_size(gpu['total_memory'])}"
        lines.append(
            f"{gpu['gpu']:<4} {gpu['name'][:29]:<29} {gpu['leased_fraction']:>6.2f}  "
            f"{memory:<25} {util:>5}  {gpu['tenants']}"
        )
    leases = documents["leases"]["leases"]
    lines.append(f"leases: {len(leases)}")
    for lease in leases:
        devices = ", ".join(
            f"gpu{d['gpu']}@{d['fraction']:g} {format_size(d['memory_used'])}"
            f"/{format_size(d['memory_limit'])}"
            for d in lease["devices"]
        )
        who = lease["user"] or lease["client"] or "-"
        lines.append(
            f"  {lease['id']:>5}  {who:<16} {devices}  held by {lease['held_by']}, "
            f"idle {lease['idle_for']:.0f} s, {len(lease['sessions'])} program(s)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        documents = {name: fetch(args.manage, name, args.token, args.ca) for name in DOCUMENTS}
    except StatusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_status
    print(json.dumps(documents, indent=2) if args.json else render(documents))
    return EXIT_FAILING if documents["health"]["status"] == "fail" else 0
