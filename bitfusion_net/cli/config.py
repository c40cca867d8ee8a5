"""Where the client finds its servers and its defaults.

The servers file is Bitfusion's ``servers.conf``: YAML, ``servers:`` a list of entries, each with
``addresses: [HOST:PORT, ...]`` (one server, reachable at any of those addresses; other keys, such
as Bitfusion 3.5's ``reachable:``, are ignored), so a Bitfusion user's file works unchanged. It is
looked for in ``~/.bitfusion-net/`` and then ``/etc/bitfusion-net/``; the user's wins.
``BITFUSION_NET_SERVERS`` (``HOST:PORT,HOST:PORT``) overrides the file, and ``--servers FILE`` or
``--server_list`` override both. Beside it, ``client.yaml`` holds defaults for ``run`` and
``request_gpus`` (``mode``, ``idle_timeout``, ``wait``, ``query_timeout``) and the client's
credentials: ``token`` (``$BITFUSION_NET_TOKEN`` wins), and for TLS ``tls_ca``, ``tls_cert``,
``tls_key`` (PEM files). Addresses may say ``tls://HOST:PORT``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..client.session import TOKEN_ENV
from ..transport import ClientTls
from ..units import parse_duration

SERVERS_ENV = "BITFUSION_NET_SERVERS"
CLIENT_KEYS = (
    "mode",
    "idle_timeout",
    "wait",
    "query_timeout",
    "token",
    "tls_ca",
    "tls_cert",
    "tls_key",
)
SERVERS_FILE = "servers.conf"
CLIENT_FILE = "client.yaml"


def config_dirs() -> list[Path]:
    """Where configuration is looked for, the first found winning."""
    return [Path.home() / ".bitfusion-net", Path("/etc/bitfusion-net")]


class ConfigError(Exception):
    """A configuration file or value that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class Server:
    """One server of the pool: the addresses it answers on, in the order to try them."""

    addresses: tuple[str, ...]  # tcp://HOST:PORT

    @property
    def name(self) -> str:
        return self.addresses[0].removeprefix("tcp://").removeprefix("tls://")


@dataclass(frozen=True)
class ServerList:
    servers: tuple[Server, ...]
    source: str  # where the list came from, for messages


def _address(text: str, where: str) -> str:
    text = str(text).strip()
    scheme = "tls://" if text.startswith("tls://") else "tcp://"
    bare = text.removeprefix("tcp://").removeprefix("tls://")
    host, sep, port = bare.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}: {text!r} is not HOST:PORT")
    return f"{scheme}{bare}"


def parse_server_list(text: str, where: str) -> ServerList:
    """``HOST:PORT,HOST:PORT`` (``--server_list``, ``BITFUSION_NET_SERVERS``)."""
    entries = [item for item in text.replace(" ", ",").split(",") if item]
    if not entries:
        raise ConfigError(f"{where} names no server")
    return ServerList(tuple(Server((_address(e, where),)) for e in entries), where)


def read_servers_file(path: Path) -> ServerList:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    entries = data.get("servers") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(
            f"{path}: expected 'servers:' with a list of entries, each with "
            "'addresses: [HOST:PORT, ...]'"
        )
    servers = []
    for number, entry in enumerate(entries, 1):
        addresses = entry.get("addresses") if isinstance(entry, dict) else None
        if isinstance(addresses, str):
            addresses = [addresses]
        if not isinstance(addresses, list) or not addresses:
            raise ConfigError(f"{path}: server entry {number} has no 'addresses' list")
        where = f"{path}, server entry {number}"
        servers.append(Server(tuple(_address(a, where) for a in addresses)))
    return ServerList(tuple(servers), str(path))


def find_servers(servers_file: str | None, server_list: str | None) -> ServerList:
    """The pool to use: ``--server_list``, ``--servers FILE``, ``$BITFUSION_NET_SERVERS``, or
    the first ``servers.conf`` found; ``ConfigError`` when there is none."""
    if server_list:
        return parse_server_list(server_list, "--server_list")
    if servers_file:
        return read_servers_file(Path(servers_file))
    if os.environ.get(SERVERS_ENV):
        return parse_server_list(os.environ[SERVERS_ENV], SERVERS_ENV)
    for directory in config_dirs():
        path = directory / SERVERS_FILE
        if path.exists():
            return read_servers_file(path)
    looked = " or ".join(str(d / SERVERS_FILE) for d in config_dirs())
    raise ConfigError(
        f"no servers configured: write {looked} ('servers:' then '- addresses: [HOST:PORT]' per "
        f"server), set {SERVERS_ENV}=HOST:PORT,..., or pass --server_list HOST:PORT"
    )


@dataclass(frozen=True)
class ClientConfig:
    """Defaults of ``run`` and ``request_gpus`` (the command line overrides each)."""

    mode: str = "share"
    idle_timeout: float | None = None  # seconds; None: the command's own default
    wait: float = 0.0  # seconds to wait for capacity
    query_timeout: float = 2.0  # seconds a server has to answer before it is skipped
    token: str = ""  # presented to servers that use tokens
    tls: ClientTls | None = None  # CA, certificate and key for TLS servers
    source: str = "built-in defaults"


def load_client_config() -> ClientConfig:
    config = ClientConfig()
    for directory in config_dirs():
        path = directory / CLIENT_FILE
        if path.exists():
            config = _read_client_config(path)
            break
    token = os.environ.get(TOKEN_ENV)
    return dataclasses.replace(config, token=token) if token else config


def _read_client_config(path: Path) -> ClientConfig:
    try:
        data: Any = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected keys mode, idle_timeout, wait, query_timeout")
    unknown = sorted(set(data) - set(CLIENT_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}")
    mode = str(data.get("mode", "share"))
    if mode not in ("share", "cap"):
        raise ConfigError(f"{path}: mode must be share or cap, got {mode!r}")
    tls_files = {
        key: os.path.expanduser(str(value)) if (value := data.get(f"tls_{key}")) else None
        for key in ("ca", "cert", "key")
    }
    tls = None
    if any(tls_files.values()):
        tls = ClientTls(
            ca_file=tls_files["ca"], cert_file=tls_files["cert"], key_file=tls_files["key"]
        )
    try:
        idle = data.get("idle_timeout")
        return ClientConfig(
            mode=mode,
            idle_timeout=None if idle is None else parse_duration(idle),
            wait=parse_duration(data.get("wait", 0)),
            query_timeout=parse_duration(data.get("query_timeout", 2.0)) or 2.0,
            token=str(data.get("token") or ""),
            tls=tls,
            source=str(path),
        )
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
