"""Dispatch: what each request becomes on the device, and how its result becomes the reply.

One table, keyed by the request's class; whether a request has a reply at all, and whether it
may be answered on the event loop, is its opcode's rule (``protocol.rules``), not restated here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from executors import Executor, Tenant

from ..protocol import Reply, Request
from ..protocol import messages as m

# The device operation, and how its result becomes (reply, payload); None for no-reply requests.
ToReply = Callable[[Any], tuple[Reply, memoryview | None]]
Work = tuple[Callable[[], Any], ToReply | None]
Handler = Callable[[Executor, Tenant, Any, memoryview | None], Work]

_EMPTY = memoryview(b"")


def _done(_result: Any) -> tuple[Reply, None]:
    return m.Done(), None


def _handle(result: int) -> tuple[Reply, None]:
    return m.HandleReply(result), None


def _query(done: bool) -> tuple[Reply, None]:
    return m.QueryReply(1 if done else 0), None


def _launch(e: Executor, t: Tenant, msg: m.Launch, payload: memoryview | None) -> Work:
    return (
        lambda: t.launch(msg.function, msg.grid, msg.block, msg.shared_mem, msg.stream, msg.args)
    ), None


def _mem_alloc(e: Executor, t: Tenant, msg: m.MemAlloc, payload: memoryview | None) -> Work:
    return (lambda: t.mem_alloc(msg.nbytes)), lambda r: (m.MemAllocReply(r), None)


def _mem_free(e: Executor, t: Tenant, msg: m.MemFree, payload: memoryview | None) -> Work:
    return (lambda: t.mem_free(msg.ptr)), None


def _mem_get_info(e: Executor, t: Tenant, msg: m.MemGetInfo, payload: memoryview | None) -> Work:
    return t.mem_get_info, lambda r: (m.MemGetInfoReply(*r), None)


def _htod(e: Executor, t: Tenant, msg: m.MemcpyHtoD, payload: memoryview | None) -> Work:
    data = payload if payload is not None else _EMPTY  # an empty copy is a no-op
    return (lambda: t.memcpy_htod(msg.dst, data, msg.stream)), None


def _dtoh(e: Executor, t: Tenant, msg: m.MemcpyDtoH, payload: memoryview | None) -> Work:
    def copy_out() -> memoryview:
        buffer = t.staging_buffer(msg.nbytes)
        try:
            t.memcpy_dtoh(buffer, msg.src, msg.stream)
        except BaseException:
            t.return_staging(buffer)  # a refused copy must not keep the buffer from reuse
            raise
        return buffer

    return copy_out, lambda r: (m.MemcpyDtoHReply(), r)


def _dtod(e: Executor, t: Tenant, msg: m.MemcpyDtoD, payload: memoryview | None) -> Work:
    return (lambda: t.memcpy_dtod(msg.dst, msg.src, msg.nbytes, msg.stream)), None


def _memset(e: Executor, t: Tenant, msg: m.Memset, payload: memoryview | None) -> Work:
    return (lambda: t.memset(msg.ptr, msg.value, msg.itemsize, msg.count, msg.stream)), None


def _synchronize(e: Executor, t: Tenant, msg: m.Synchronize, payload: memoryview | None) -> Work:
    return t.synchronize, _done


def _stats(e: Executor, t: Tenant, msg: m.TenantStats, payload: memoryview | None) -> Work:
    def reply(u: Any) -> tuple[Reply, None]:
        return (
            m.TenantStatsReply(
                round(u.device_time * 1e9),
                round(u.queue_wait * 1e9),
                u.operations,
                u.kernels,
                u.memory_used,
                u.memory_high_water,
            ),
            None,
        )

    return (lambda: e.usage(t)), reply


def _attributes(e: Executor, t: Tenant, msg: m.DeviceAttributes, p: memoryview | None) -> Work:
    return t.device_attributes, lambda r: (m.DeviceAttributesReply.from_dict(r), None)


def _module_load(e: Executor, t: Tenant, msg: m.ModuleLoad, payload: memoryview | None) -> Work:
    image = bytes(payload) if payload is not None else b""
    return (lambda: t.module_load(image)), lambda r: (m.ModuleLoadReply(r), None)


def _module_unload(
    e: Executor, t: Tenant, msg: m.ModuleUnload, payload: memoryview | None
) -> Work:
    return (lambda: t.module_unload(msg.module)), None


def _get_function(e: Executor, t: Tenant, msg: m.GetFunction, payload: memoryview | None) -> Work:
    return (lambda: t.get_function(msg.module, msg.name, msg.arg_types or None)), lambda r: (
        m.GetFunctionReply(r.handle, r.arg_types),
        None,
    )


def _get_global(e: Executor, t: Tenant, msg: m.ModuleGetGlobal, p: memoryview | None) -> Work:
    return (lambda: t.module_get_global(msg.module, msg.name)), lambda r: (
        m.ModuleGetGlobalReply(*r),
        None,
    )


def _stream_create(e: Executor, t: Tenant, msg: m.StreamCreate, p: memoryview | None) -> Work:
    return t.stream_create, _handle


def _stream_destroy(e: Executor, t: Tenant, msg: m.StreamDestroy, p: memoryview | None) -> Work:
    return (lambda: t.stream_destroy(msg.stream)), None


def _stream_sync(e: Executor, t: Tenant, msg: m.StreamSynchronize, p: memoryview | None) -> Work:
    return (lambda: t.stream_synchronize(msg.stream)), _done


def _stream_query(e: Executor, t: Tenant, msg: m.StreamQuery, p: memoryview | None) -> Work:
    return (lambda: t.stream_query(msg.stream)), _query


def _stream_wait(e: Executor, t: Tenant, msg: m.StreamWaitEvent, p: memoryview | None) -> Work:
    return (lambda: t.stream_wait_event(msg.stream, msg.event)), None


def _event_create(e: Executor, t: Tenant, msg: m.EventCreate, p: memoryview | None) -> Work:
    return t.event_create, _handle


def _event_destroy(e: Executor, t: Tenant, msg: m.EventDestroy, p: memoryview | None) -> Work:
    return (lambda: t.event_destroy(msg.event)), None


def _event_record(e: Executor, t: Tenant, msg: m.EventRecord, p: memoryview | None) -> Work:
    return (lambda: t.event_record(msg.event, msg.stream)), None


def _event_sync(e: Executor, t: Tenant, msg: m.EventSynchronize, p: memoryview | None) -> Work:
    return (lambda: t.event_synchronize(msg.event)), _done


def _event_elapsed(e: Executor, t: Tenant, msg: m.EventElapsed, p: memoryview | None) -> Work:
    return (lambda: t.event_elapsed_ms(msg.start, msg.end)), lambda r: (
        m.EventElapsedReply(r),
        None,
    )


def _event_query(e: Executor, t: Tenant, msg: m.EventQuery, p: memoryview | None) -> Work:
    return (lambda: t.event_query(msg.event)), _query


DISPATCH: dict[type[Request], Handler] = {
    m.Launch: _launch,
    m.MemAlloc: _mem_alloc,
    m.MemFree: _mem_free,
    m.MemGetInfo: _mem_get_info,
    m.MemcpyHtoD: _htod,
    m.MemcpyDtoH: _dtoh,
    m.MemcpyDtoD: _dtod,
    m.Memset: _memset,
    m.Synchronize: _synchronize,
    m.TenantStats: _stats,
    m.DeviceAttributes: _attributes,
    m.ModuleLoad: _module_load,
    m.ModuleUnload: _module_unload,
    m.GetFunction: _get_function,
    m.ModuleGetGlobal: _get_global,
    m.StreamCreate: _stream_create,
    m.StreamDestroy: _stream_destroy,
    m.StreamSynchronize: _stream_sync,
    m.StreamQuery: _stream_query,
    m.StreamWaitEvent: _stream_wait,
    m.EventCreate: _event_create,
    m.EventDestroy: _event_destroy,
    m.EventRecord: _event_record,
    m.EventSynchronize: _event_sync,
    m.EventElapsed: _event_elapsed,
    m.EventQuery: _event_query,
}
