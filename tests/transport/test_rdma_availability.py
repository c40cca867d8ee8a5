"""Where RDMA cannot be used, the pyverbs binding says which of the three things is missing:
pyverbs, rdma-core libraries it can load, or a device. This machine has none of them (no RDMA
in the kernel), so the first case is real here; the other two are staged with stand-in modules
that fail exactly as the real ones do (an ImportError from the loader, an empty device list)."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import types
from collections.abc import Sequence

import pytest

from bitfusion_net.transport.verbs import pyverbs_backend
from bitfusion_net.transport.verbs.pyverbs_backend import PyverbsProvider, RdmaUnavailable


class _RefuseLoading(importlib.abc.MetaPathFinder):
    """``import pyverbs.device`` fails as it does when libibverbs is older than pyverbs."""

    def find_spec(self, name: str, path: Sequence[str] | None, target: object = None) -> None:
        if name == "pyverbs.device":
            raise ImportError(
                "/usr/lib/x86_64-linux-gnu/libibverbs.so.1: version `IBVERBS_1.14' not found "
                "(required by pyverbs/device.cpython-311-x86_64-linux-gnu.so)"
            )
        return None


def _fake_pyverbs(monkeypatch: pytest.MonkeyPatch, devices: list[bytes]) -> None:
    package = types.ModuleType("pyverbs")
    package.__path__ = []  # a package, so pyverbs.device can be its submodule
    device = types.ModuleType("pyverbs.device")
    device.get_device_list = lambda: [types.SimpleNamespace(name=n) for n in devices]  # type: ignore[attr-defined]
    package.device = device  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pyverbs", package)
    monkeypatch.setitem(sys.modules, "pyverbs.device", device)


def test_without_pyverbs_the_reason_says_how_to_install_it() -> None:
    if "pyverbs" in sys.modules or importlib.util.find_spec("pyverbs") is not None:
        pytest.skip("pyverbs is installed here: this case needs a machine without it")
    reason = pyverbs_backend.unavailable()
    assert reason is not None and "pyverbs is not installed" in reason
    assert "bitfusion-net[rdma]" in reason
    with pytest.raises(RdmaUnavailable, match="not installed"):
        PyverbsProvider()


def test_rdma_core_libraries_pyverbs_cannot_load_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    package = types.ModuleType("pyverbs")
    package.__path__ = []
    monkeypatch.setitem(sys.modules, "pyverbs", package)
    monkeypatch.delitem(sys.modules, "pyverbs.device", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_RefuseLoading(), *sys.meta_path])
    reason = pyverbs_backend.unavailable()
    assert reason is not None and "cannot load the rdma-core libraries" in reason
    assert "IBVERBS_1.14" in reason  # the loader's own words, for the operator


def test_no_device_is_its_own_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_pyverbs(monkeypatch, [])
    reason = pyverbs_backend.unavailable()
    assert reason is not None and "no RDMA device" in reason and "ibv_devinfo" in reason
    with pytest.raises(RdmaUnavailable, match="no RDMA device"):
        PyverbsProvider()


def test_with_a_device_rdma_is_available(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_pyverbs(monkeypatch, [b"vmw_pvrdma0"])
    assert pyverbs_backend.unavailable() is None
    assert PyverbsProvider().devices() == ["vmw_pvrdma0"]
