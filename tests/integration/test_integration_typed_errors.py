"""Whatever a program passes to a public call, only typed errors come out and nothing leaks.

Random arguments (integers far outside every wire range, floats, strings, None, buffers of the
wrong kind) go to every call of a real session. Each call either works or raises a
``BitfusionError``; afterwards no request is left waiting for a reply, and the session still
answers. Sticky errors of no-reply calls are drained with ``synchronize()`` (a typed error too).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bitfusion_net as bf

anything = st.one_of(
    st.integers(-(2**70), 2**70),
    st.integers(-3, 70_000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.none(),
    st.booleans(),
    st.text(max_size=5),
    st.binary(max_size=8),
    st.lists(st.integers(-5, 2**33), max_size=4),
)


@contextmanager
def server_thread() -> Iterator[str]:
    loop = asyncio.new_event_loop()
    server = bf.Server("tcp://127.0.0.1:0", gpu_memory="256MiB")
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
        yield server.address
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture(scope="module")
def session() -> Iterator[bf.SyncSession]:
    with server_thread() as address, bf.connect_sync(address, fraction=0.5) as opened:
        yield opened


def calls(device: bf.SyncRemoteDevice, fill: bf.SyncFunction) -> dict[str, Callable[..., Any]]:
    return {
        "mem_alloc": lambda a, b, c, d: device.mem_alloc(a),
        "mem_free": lambda a, b, c, d: device.mem_free(a),
        "memcpy_htod": lambda a, b, c, d: device.memcpy_htod(a, b),
        "memcpy_dtoh": lambda a, b, c, d: device.memcpy_dtoh(b, a),
        "memcpy_dtod": lambda a, b, c, d: device.memcpy_dtod(a, b, c),
        "memset_d8": lambda a, b, c, d: device.memset_d8(a, b, c),
        "memset_d16": lambda a, b, c, d: device.memset_d16(a, b, c),
        "memset_d32": lambda a, b, c, d: device.memset_d32(a, b, c),
        "launch": lambda a, b, c, d: fill.launch(a, b, c, shared_mem=d),
        "launch_args": lambda a, b, c, d: fill.launch(1, 1, [a, b, c]),
        "builtin": lambda a, b, c, d: device.builtin(a),
        "module_load": lambda a, b, c, d: device.module_load(a),
        "get_global": lambda a, b, c, d: bf.SyncModule(device, 0).get_global(a),
    }


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    name=st.sampled_from(
        ["mem_alloc", "mem_free", "memcpy_htod", "memcpy_dtoh", "memcpy_dtod", "memset_d8",
         "memset_d16", "memset_d32", "launch", "launch_args", "builtin", "module_load",
         "get_global"]
    ),  # fmt: skip
    args=st.tuples(anything, anything, anything, anything),
)
def test_random_arguments_raise_only_typed_errors(
    session: bf.SyncSession, name: str, args: tuple[Any, Any, Any, Any]
) -> None:
    device = session.devices[0]
    fill = device.builtin("fill")
    connection = device._driver.connection
    try:
        calls(device, fill)[name](*args)
    except bf.BitfusionError:
        pass
    try:
        device.synchronize()  # reports a sticky error of a no-reply call, typed
    except bf.BitfusionError as exc:
        assert exc.deferred_from is not None
    assert connection.waiting == 0
    assert not session.closed
    free, total = device.mem_get_info()
    assert 0 <= free <= total


def test_a_buffer_that_is_not_one_is_a_typed_error(session: bf.SyncSession) -> None:
    device = session.devices[0]
    ptr = device.mem_alloc(16)
    for bad in (object(), 3.5, "text", np.zeros((4, 4), np.float32)[:, 1]):
        with pytest.raises(bf.InvalidValueError):
            device.memcpy_htod(ptr, bad)
    with pytest.raises(bf.InvalidValueError):
        device.memcpy_dtoh(b"read-only", ptr)
    device.mem_free(ptr)
    device.synchronize()
