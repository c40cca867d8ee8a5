"""The device worker's stack of CUDA contexts: which tenant's context is current on it.

PyCUDA keeps a context stack per thread; the worker switches between its tenants' contexts on
every operation, so it tracks what it pushed, switches only when the context changes, and leaves
nothing current when it ends (PyCUDA aborts the process if a thread ends with a context current).
Used on the worker thread only.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class ContextStack:
    """The contexts this thread pushed, bottom first."""

    def __init__(self, cuda: Any) -> None:
        self._cuda = cuda  # pycuda.driver
        self._stack: list[Any] = []

    def make_current(self, context: Any) -> None:
        """Make ``context`` the current context, switching only when it is not."""
        if self._stack and self._stack[-1] is context:
            return
        self.clear()
        context.push()
        self._stack.append(context)

    def clear(self) -> None:
        """Leave no context current."""
        while self._stack:
            self._cuda.Context.pop()
            self._stack.pop()

    def pushed(self, context: Any) -> None:
        """Note that ``context`` was pushed by CUDA itself (``make_context`` does)."""
        self._stack.append(context)

    def destroy(self, context: Any) -> None:
        """Destroy a tenant's context, whatever its state, and leave none of ours current."""
        try:
            self.make_current(context)
            self._cuda.Context.pop()
            self._stack.pop()
        except Exception:  # noqa: BLE001 - a lost context may refuse; detaching still frees it
            log.debug("popping a context failed", exc_info=True)
        try:
            context.detach()
        except Exception:  # noqa: BLE001 - nothing more can be done; say so
            log.warning("destroying a tenant's CUDA context failed", exc_info=True)
