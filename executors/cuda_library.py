"""The built-in kernel library on one GPU: compiled by nvcc at start-up, test-loaded, shared.

It is built on a thread of its own beside the server's start-up, rather than on the worker when a
tenant first asks for a built-in (which would hold the GPU up for everyone while nvcc runs).
Machine code for the GPU's own architecture is tried first; if the driver refuses it (an nvcc
newer than the driver), portable PTX, which the driver compiles itself.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from .cuda_build import BUILTINS_SOURCE, PORTABLE_PTX_ARCH, builtins_image, compile_cuda
from .errors import DeviceError, Unsupported

log = logging.getLogger(__name__)

JOIN_S = 60.0  # how long closing waits for the start-up build


class BuiltinLibrary:
    """The library's image for one GPU, built once; ``image()`` waits for the build."""

    def __init__(
        self,
        cuda: Any,
        primary: Any,
        primary_lock: threading.Lock,
        compute_capability: tuple[int, int],
        index: int,
    ) -> None:
        self._cuda = cuda  # pycuda.driver
        self._primary = primary  # the GPU's primary context, where images are test-loaded
        self._primary_lock = primary_lock  # the executor releases the primary context under it
        self._compute_capability = compute_capability
        self._index = index
        self._image: bytes | None = None
        self._error: str | None = None
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._prepare, name=f"nvcc-gpu{index}", daemon=True)
        self._thread.start()

    def _prepare(self) -> None:
        try:
            self.image()
        except Unsupported:
            pass  # logged; a tenant asking for a built-in gets the reason

    def image(self) -> bytes:
        """The built-in library compiled for this GPU (by nvcc, cached) and known to load;
        ``Unsupported`` saying why if that cannot be done here."""
        with self._lock:
            if self._image is None and self._error is None:
                try:
                    self._image = self._loadable()
                except Exception as exc:  # noqa: BLE001 - any failure: say it, once, to all
                    self._error = str(exc)
                    if not self._closing.is_set():
                        log.error(
                            "the built-in kernels are unavailable on GPU %d: %s", self._index, exc
                        )
            if self._image is None:
                raise Unsupported(
                    f"the built-in kernels could not be built for this GPU: {self._error}"
                )
            return self._image

    def _loadable(self) -> bytes:
        image = builtins_image(self._compute_capability)
        if self._driver_loads(image):
            return image
        portable = compile_cuda(BUILTINS_SOURCE, "ptx", PORTABLE_PTX_ARCH)
        if image != portable and self._driver_loads(portable):
            return portable
        raise DeviceError("the GPU driver refuses the built-in library (is it older than nvcc?)")

    def _driver_loads(self, image: bytes) -> bool:
        cuda = self._cuda
        with self._primary_lock:
            if self._closing.is_set():
                raise DeviceError("the device is shutting down")
            self._primary.push()  # balanced by the pop below: the worker's stack is unchanged
            try:
                module = cuda.module_from_buffer(image)
                del module  # unloaded here, while its context is current on this thread
                return True
            except cuda.Error as exc:
                log.warning("GPU %d: the driver refused a built-in image: %s", self._index, exc)
                return False
            finally:
                cuda.Context.pop()

    def close(self) -> None:
        """Stop a build in progress from test-loading again, and wait for it (nvcc is bounded;
        its cache makes this quick after a first run) before the primary context goes."""
        self._closing.set()
        self._thread.join(timeout=JOIN_S)
