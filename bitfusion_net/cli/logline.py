"""Log lines in Bitfusion's shape, ``[INFO] 2026-12-01T08:00:00Z message``, on stderr (the
program's own output keeps stdout), so scripts that read Bitfusion's logs keep working."""

from __future__ import annotations

import sys
import time


def timestamp() -> str:
    """Now, RFC 3339 in UTC to the second, as Bitfusion writes it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _line(level: str, message: str) -> None:
    print(f"[{level}] {timestamp()} {message}", file=sys.stderr, flush=True)


def info(message: str) -> None:
    _line("INFO", message)


def warn(message: str) -> None:
    _line("WARN", message)


def error(message: str) -> None:
    _line("ERROR", message)


def plain(message: str) -> None:
    """A line without the prefix (Bitfusion's "Requested resources:" block)."""
    print(message, file=sys.stderr, flush=True)
