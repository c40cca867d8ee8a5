"""The device worker: the one thread that submits work to a device, in arrival order.

Arrival order (FIFO across tenants) is the queueing discipline for now; weighted fair time-slicing
replaces the queue, not this interface.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from .base import Completion, DeferredError, Executor, Tenant
from .errors import DeviceError

log = logging.getLogger(__name__)

_STOP = object()


class DeviceWorker:
    """A thread that runs submitted operations one at a time and applies the sticky-error rule."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stopped = False  # set, under the lock, once nothing more will be taken off the queue
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(
        self,
        tenant: Tenant,
        op: Callable[[], Any],
        wants_reply: bool,
        tag: int,
        on_done: Completion | None,
    ) -> None:
        with self._lock:
            if not self._stopped:
                self._queue.put((tenant, op, wants_reply, tag, on_done))
                return
        if on_done is not None:
            on_done(None, DeviceError("the device has shut down"))

    def stop(self, timeout: float | None = None) -> None:
        """Run what is queued, then stop; later submissions fail with ``DeviceError``."""
        self._queue.put(_STOP)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            self._execute(*item)
        # Whoever submitted after stop() still waits for an answer: give each one.
        with self._lock:
            self._stopped = True
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP and item[4] is not None:
                item[4](None, DeviceError("the device has shut down"))

    @staticmethod
    def _execute(
        tenant: Tenant,
        op: Callable[[], Any],
        wants_reply: bool,
        tag: int,
        on_done: Completion | None,
    ) -> None:
        result: Any = None
        error: BaseException | None = None
        failure = tenant.take_async_failure() if wants_reply else None
        if failure is not None:
            error = DeferredError(failure)
        else:
            try:
                result = op()
            except Exception as exc:  # noqa: BLE001 - the tenant's error, never the worker's
                if not wants_reply:
                    tenant.record_async_failure(exc, tag)
                error = exc
        if on_done is not None:
            try:
                on_done(result, error)
            except Exception:  # a broken callback must not stop the device for everyone
                log.exception("completion callback failed")


class WorkerExecutor(Executor):
    """An executor whose device work runs on one ``DeviceWorker`` thread."""

    def __init__(self, worker_name: str) -> None:
        self._worker = DeviceWorker(worker_name)
        self._tenants: set[Tenant] = set()
        self._tenants_lock = threading.Lock()

    def _register(self, tenant: Tenant) -> Tenant:
        with self._tenants_lock:
            self._tenants.add(tenant)
        return tenant

    def submit(
        self,
        tenant: Tenant,
        op: Callable[[], Any],
        *,
        wants_reply: bool,
        tag: int = 0,
        on_done: Completion | None = None,
    ) -> None:
        self._worker.submit(tenant, op, wants_reply, tag, on_done)

    def close_tenant(self, tenant: Tenant, on_done: Callable[[], None] | None = None) -> None:
        def release() -> None:
            with self._tenants_lock:
                if tenant not in self._tenants:
                    return
                self._tenants.discard(tenant)
            try:
                tenant.release()
            except Exception:  # noqa: BLE001 - release must not raise; if it does, say so
                log.exception("releasing a tenant failed")
            finally:
                self._tenant_released(tenant)

        def finished(_result: Any, _error: BaseException | None) -> None:
            # An error here can only be the worker refusing work after close(), which has
            # released every tenant itself.
            if on_done is not None:
                on_done()

        # Submitted without a reply, so a sticky error still pending on the tenant cannot stop it.
        self._worker.submit(tenant, release, False, 0, finished)

    def _tenant_released(self, tenant: Tenant) -> None:
        """Hook for subclasses: give the tenant's share of the device back."""

    def close(self) -> None:
        with self._tenants_lock:
            remaining = list(self._tenants)
        for tenant in remaining:
            self.close_tenant(tenant)
        self._worker.stop()
