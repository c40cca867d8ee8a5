"""Which device, port, GID and path MTU an RDMA end uses (``DeviceSettings``): read from the
environment with a wrong value named, checked against the device before a server starts, and
the path MTU of a connection the smaller of both ends' (on the verbs simulator)."""

from __future__ import annotations

import pytest

from bitfusion_net.transport.rdma_ring import (
    PROVIDER_ENV,
    DeviceSettings,
    RingConfig,
    RingEnd,
    connect_to,
    hello,
    read_hello,
)
from bitfusion_net.transport.verbs import Fabric, SimulatedProvider
from bitfusion_net.transport.verbs.simulator import GID_TABLE_SIZE


def test_the_defaults_are_the_first_device_port_1_gid_0_and_mtu_1024(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("DEVICE", "PORT", "GID_INDEX", "MTU"):
        monkeypatch.delenv(f"{PROVIDER_ENV}_{name}", raising=False)
    assert DeviceSettings.from_environment() == DeviceSettings(None, 1, 0, 1024)


def test_the_environment_chooses_device_port_gid_and_mtu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(f"{PROVIDER_ENV}_DEVICE", "mlx5_1")
    monkeypatch.setenv(f"{PROVIDER_ENV}_PORT", "2")
    monkeypatch.setenv(f"{PROVIDER_ENV}_GID_INDEX", "3")
    monkeypatch.setenv(f"{PROVIDER_ENV}_MTU", "4096")
    assert DeviceSettings.from_environment() == DeviceSettings("mlx5_1", 2, 3, 4096)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("GID_INDEX", "three", "GID_INDEX='three' is not a number"),
        ("MTU", "1500", "must be one of"),
        ("PORT", "0", "port counts from 1"),
    ],
)
def test_a_wrong_value_is_refused_saying_which(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(f"{PROVIDER_ENV}_{variable}", value)
    with pytest.raises(ValueError, match=message):
        DeviceSettings.from_environment()


def test_check_names_a_missing_device_or_gid() -> None:
    provider = SimulatedProvider(Fabric(devices=("sim0",)))
    DeviceSettings().check(provider)
    DeviceSettings("sim0", gid_index=GID_TABLE_SIZE - 1).check(provider)
    with pytest.raises(ConnectionError, match=r"no RDMA device 'mlx5_0'.*_DEVICE"):
        DeviceSettings("mlx5_0").check(provider)
    with pytest.raises(ConnectionError, match=r"no GID index 99.*_GID_INDEX"):
        DeviceSettings(gid_index=99).check(provider)
    with pytest.raises(ConnectionError, match=r"no port 2"):
        DeviceSettings(port=2).check(provider)


def test_a_connection_uses_the_smaller_path_mtu_of_its_ends() -> None:
    provider, config = SimulatedProvider(Fabric(devices=("sim0", "sim1"))), RingConfig()
    big = RingEnd(provider, DeviceSettings("sim0", path_mtu=4096), config)
    small = RingEnd(provider, DeviceSettings("sim1", path_mtu=2048), config)
    try:
        big_hello, small_hello = hello(big, config, 1), hello(small, config, 2)
        connect_to(big, config, read_hello(small_hello, config))
        connect_to(small, config, read_hello(big_hello, config))
        assert big.qp.path_mtu == small.qp.path_mtu == 2048  # type: ignore[attr-defined]
    finally:
        big.close()
        small.close()


def test_a_malformed_hello_is_a_reset_not_a_crash() -> None:
    provider, config = SimulatedProvider(Fabric(devices=("sim0", "sim1"))), RingConfig()
    end, peer = (RingEnd(provider, DeviceSettings(name), config) for name in ("sim0", "sim1"))
    try:
        good = read_hello(hello(peer, config, 7), config)
        for broken in ({"qpn": "x"}, {"ring": [1]}, {"mtu": 1000}, {"gid": "zz"}):
            with pytest.raises(ConnectionResetError, match="malformed RDMA hello"):
                connect_to(end, config, good | broken)
        with pytest.raises(ConnectionRefusedError, match="differs"):
            read_hello(hello(peer, RingConfig(slots=8), 7), config)
        with pytest.raises(ConnectionResetError, match="closed"):
            read_hello(b'{"qpn": 1', config)
    finally:
        end.close()
        peer.close()
