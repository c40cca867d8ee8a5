"""Event loop choice: uvloop when it is installed, the standard loop otherwise."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """The fastest event loop available (uvloop), falling back to asyncio's own."""
    try:
        import uvloop
    except ImportError:
        log.info("uvloop is not installed; using the standard asyncio event loop")
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def new_event_loop() -> asyncio.AbstractEventLoop:
    return loop_factory()()
