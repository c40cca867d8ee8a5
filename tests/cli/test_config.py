"""Where the client finds its servers: Bitfusion's servers.conf, the environment, the flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitfusion_net.cli.config import (
    SERVERS_ENV,
    ConfigError,
    find_servers,
    load_client_config,
    read_servers_file,
)
from bitfusion_net.units import parse_duration

BITFUSION_SERVERS_CONF = """\
servers:
- addresses:
  - 10.202.122.248:56001
  reachable: true
- addresses: [10.202.122.249:56001, 192.168.0.9:56001]
"""


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(SERVERS_ENV, raising=False)
    return tmp_path


def test_a_bitfusion_servers_conf_reads_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "servers.conf"
    path.write_text(BITFUSION_SERVERS_CONF)
    pool = read_servers_file(path)
    assert [s.addresses for s in pool.servers] == [
        ("tcp://10.202.122.248:56001",),
        ("tcp://10.202.122.249:56001", "tcp://192.168.0.9:56001"),
    ]


def test_the_users_file_is_found_and_the_environment_and_flags_override_it(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (home / ".bitfusion-net").mkdir()
    (home / ".bitfusion-net" / "servers.conf").write_text("servers:\n- addresses: [h:1]\n")
    assert find_servers(None, None).servers[0].addresses == ("tcp://h:1",)
    monkeypatch.setenv(SERVERS_ENV, "e1:2,e2:3")
    assert [s.name for s in find_servers(None, None).servers] == ["e1:2", "e2:3"]
    assert [s.name for s in find_servers(None, "f:4").servers] == ["f:4"]


def test_no_servers_anywhere_says_where_it_looked(home: Path) -> None:
    with pytest.raises(ConfigError, match=r"no servers configured: write .*servers.conf"):
        find_servers(None, None)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("servers: []\n", "expected 'servers:'"),
        ("servers:\n- reachable: true\n", "no 'addresses'"),
        ("servers:\n- addresses: [nohostport]\n", "not HOST:PORT"),
        ("servers: [\n", "not valid YAML"),
    ],
)
def test_broken_servers_files_say_what_is_wrong(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "servers.conf"
    path.write_text(text)
    with pytest.raises(ConfigError, match=reason):
        read_servers_file(path)


def test_client_defaults_come_from_client_yaml(home: Path) -> None:
    assert load_client_config().mode == "share"
    (home / ".bitfusion-net").mkdir()
    (home / ".bitfusion-net" / "client.yaml").write_text(
        "mode: cap\nidle_timeout: 2m30s\nwait: 10\n"
    )
    config = load_client_config()
    assert (config.mode, config.idle_timeout, config.wait) == ("cap", 150.0, 10.0)
    (home / ".bitfusion-net" / "client.yaml").write_text("colour: red\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_client_config()


@pytest.mark.parametrize(
    ("text", "seconds"), [("30", 30.0), ("2m30s", 150.0), ("1h", 3600.0), ("250ms", 0.25)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "5x", "-1", "inf", "1m x"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)
