"""The token store: a real SQLite file, tokens hashed, expiry and revocation; its CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bitfusion_net.server.tokens import TOKEN_FILE, TokenError, TokenStore


def test_a_token_checks_until_it_expires_or_is_revoked(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    token, record = store.create("alice", max_gpus=2, max_memory=2**30, expires_in=60, now=1000.0)
    checked = store.check(token, now=1030.0)
    assert (checked.user, checked.max_gpus, checked.max_memory) == ("alice", 2, 2**30)
    with pytest.raises(TokenError, match="expired at"):
        store.check(token, now=1060.0)
    other, _ = store.create("bob")
    store.revoke(other.split("_")[1])
    with pytest.raises(TokenError, match="of bob was revoked"):
        store.check(other)
    with pytest.raises(TokenError, match="already revoked"):
        store.revoke(other)  # the whole token works too


@pytest.mark.parametrize(
    "bad",
    ["", "hello", "bfnet_0123456789abcdef_short", "bfnet_zzzz_" + "a" * 43],
)
def test_malformed_tokens_are_refused_without_a_lookup(tmp_path: Path, bad: str) -> None:
    with pytest.raises(TokenError, match="not a bitfusion-net token"):
        TokenStore(tmp_path).check(bad)


def test_a_wrong_secret_and_an_unknown_id_read_the_same(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    token, record = store.create("alice")
    wrong_secret = token[:-1] + ("A" if token[-1] != "A" else "B")
    unknown_id = "bfnet_" + "0" * 16 + token[-44:]
    messages = set()
    for bad in (wrong_secret, unknown_id):
        with pytest.raises(TokenError) as caught:
            store.check(bad)
        messages.add(str(caught.value))
    assert messages == {"unknown token"}


def test_the_store_keeps_no_secret_and_only_its_owner_may_read_it(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    token, _ = store.create("alice")
    secret = token.split("_", 2)[2]  # bfnet_<id>_<secret>; the secret itself may hold "_"
    assert len(secret) == 43
    raw = (tmp_path / TOKEN_FILE).read_bytes()
    assert secret.encode() not in raw and b"alice" in raw
    assert (tmp_path / TOKEN_FILE).stat().st_mode & 0o777 == 0o600


def test_bad_terms_are_refused(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    for kwargs in ({"max_gpus": -1}, {"max_fraction": -0.5}, {"expires_in": 0}):
        with pytest.raises(ValueError):
            store.create("alice", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="user name"):
        store.create("alice smith")


def test_the_token_command_creates_lists_and_revokes(tmp_path: Path) -> None:
    env = {**os.environ, "BITFUSION_NET_STATE_DIR": str(tmp_path)}

    def token(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bitfusion_net.server", "token", *args],
            env=env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    made = token("create", "--user", "alice", "--max-gpus", "2", "--max-memory", "40GiB",
                 "--max-fraction", "1.5", "--expires", "90d")  # fmt: skip
    assert made.returncode == 0, made.stderr
    text = made.stdout.strip()
    assert TokenStore(tmp_path).check(text).max_fraction == 1.5
    listed = token("list", "--json")
    (entry,) = json.loads(listed.stdout)
    assert entry["user"] == "alice" and entry["state"] == "live"
    assert text.split("_", 2)[2] not in listed.stdout  # never the secret (which may hold "_")
    table = token("list").stdout
    assert "alice" in table and "40 GiB" in table
    assert token("revoke", entry["id"]).returncode == 0
    assert json.loads(token("list", "--json").stdout)[0]["state"] == "revoked"
    assert token("revoke", "0" * 16).returncode == 65
    assert token("create").returncode == 64  # --user is required


def test_a_client_bundle_unpacks_into_a_working_client_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tarfile

    from bitfusion_net.cli.config import find_servers, load_client_config
    from bitfusion_net.server.token_admin import main

    monkeypatch.setenv("BITFUSION_NET_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("BITFUSION_NET_TOKEN", raising=False)
    monkeypatch.delenv("BITFUSION_NET_SERVERS", raising=False)
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n...\n-----END CERTIFICATE-----\n")
    bundle = tmp_path / "bob.tar.gz"
    argv = ["create", "--user", "bob", "--bundle", str(bundle), "--server", "tls://gpu1:7000",
            "--server", "gpu2:7000", "--ca", str(ca)]  # fmt: skip
    assert main(argv) == 0
    assert bundle.stat().st_mode & 0o777 == 0o600
    home = tmp_path / "home"
    with tarfile.open(bundle) as archive:
        archive.extractall(home / ".bitfusion-net", filter="data")
    monkeypatch.setenv("HOME", str(home))
    config = load_client_config()
    assert TokenStore(tmp_path / "state").check(config.token).user == "bob"
    assert config.tls is not None and Path(str(config.tls.ca_file)).read_text() == ca.read_text()
    assert [s.addresses for s in find_servers(None, None).servers] == [
        ("tls://gpu1:7000",),
        ("tcp://gpu2:7000",),
    ]
