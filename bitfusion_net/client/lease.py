"""A reservation as the client holds it: the reservation file that ``bitfusion-net run`` and
``request_gpus`` write, and that ``connect()`` with no address reads (``BITFUSION_NET_LEASE``).

The file names, for each server of the reservation, its address, the server's instance id, the
reservation's id and secret, and the GPUs it holds there. The secret lets anyone who has the file
use and release the GPUs, so the file is written readable by its owner only (mode 0600) and the
secret is never printed or logged.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..protocol import InvalidValueError

LEASE_ENV = "BITFUSION_NET_LEASE"  # the path of the reservation file a program uses
FORMAT = "bitfusion-net reservation 1"


@dataclass(frozen=True)
class ServerReservation:
    """The part of a reservation on one server."""

    address: str  # tcp://HOST:PORT
    server_id: str  # the server's instance id when the reservation was made
    reservation: int
    secret: bytes
    idle_timeout: float  # seconds granted; 0: no idle release
    devices: list[dict[str, Any]] = field(default_factory=list)  # the grants, for listings
    server_version: str = ""  # the server's bitfusion-net version, for logs

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["secret"] = self.secret.hex()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServerReservation:
        return cls(
            address=str(data["address"]),
            server_id=str(data["server_id"]),
            reservation=int(data["reservation"]),
            secret=bytes.fromhex(data["secret"]),
            idle_timeout=float(data.get("idle_timeout", 0.0)),
            devices=list(data.get("devices", [])),
            server_version=str(data.get("server_version", "")),
        )


@dataclass(frozen=True)
class ReservationFile:
    """A whole reservation: its parts on each server, in the order of the session's devices
    (the devices of the first server are 0..k-1, the next server's follow)."""

    servers: list[ServerReservation]
    created: str = ""  # RFC 3339, UTC
    client: str = ""
    token: str = ""  # the token it was made with, which its programs present too
    tls_files: dict[str, str] = field(default_factory=dict)  # ca/cert/key PEM paths, for TLS

    @property
    def gpus(self) -> int:
        return sum(len(server.devices) for server in self.servers)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "created": self.created,
                "client": self.client,
                "token": self.token,
                "tls_files": self.tls_files,
                "servers": [server.to_json() for server in self.servers],
            },
            indent=2,
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the file atomically, readable by its owner only."""
        target = Path(path)
        fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(self.to_json() + "\n")
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ReservationFile:
        """Read a reservation file; ``InvalidValueError`` says what is wrong with it."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidValueError(
                f"cannot read the reservation file {str(path)!r}: {exc.strerror or exc}"
            ) from None
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise ValueError(f"its format is {data.get('format')!r}, not {FORMAT!r}")
            servers = [ServerReservation.from_json(entry) for entry in data["servers"]]
            if not servers:
                raise ValueError("it names no server")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidValueError(
                f"{str(path)!r} is not a bitfusion-net reservation file: {exc}"
            ) from None
        return cls(
            servers,
            str(data.get("created", "")),
            str(data.get("client", "")),
            str(data.get("token", "")),
            {str(k): str(v) for k, v in dict(data.get("tls_files") or {}).items()},
        )


def lease_from_environment() -> tuple[str, ReservationFile]:
    """The reservation file named by ``BITFUSION_NET_LEASE`` and its path; without it,
    ``InvalidValueError`` saying how to get one."""
    path = os.environ.get(LEASE_ENV)
    if not path:
        raise InvalidValueError(
            "connect() was given no address and no reservation: pass an address "
            "(connect('tcp://HOST:PORT', ...)), run the program under "
            "'bitfusion-net run -n 1 -p 0.5 -- CMD', or reserve GPUs with "
            f"'eval $(bitfusion-net request_gpus -n 1 -p 0.5 --shell)', which sets {LEASE_ENV}"
        )
    return path, ReservationFile.load(path)
