"""The client library: lease remote GPUs and drive them (async API and blocking twins)."""

from .blocking import (
    SyncEvent,
    SyncFunction,
    SyncModule,
    SyncRemoteDevice,
    SyncSession,
    SyncStream,
    connect_sync,
)
from .calls import DevicePtr, TenantStats
from .device import Event, Function, Module, RemoteDevice, Stream
from .session import Session, connect

__all__ = [
    "DevicePtr", "Event", "Function", "Module", "RemoteDevice", "Session", "Stream", "SyncEvent",
    "SyncFunction", "SyncModule", "SyncRemoteDevice", "SyncSession", "SyncStream", "TenantStats",
    "connect", "connect_sync",
]  # fmt: skip
