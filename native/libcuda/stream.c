/* Streams, events and the stream-capture queries (PROTOCOL.md section 6.3). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "darkapi.h"
#include "driver.h"
#include "images.h"

/* -- streams -------------------------------------------------------------------------------- */
CUresult handle_call(uint8_t op, int dev, uint64_t *handle) {
    uint8_t buf[8], reply[16];
    size_t reply_n = 0;
    bf_out o = {buf, 0, sizeof buf, 0};
    out_device(&o, dev);
    CUresult r = bf_call(dev, op, &o, NULL, 0, NULL, 0, reply, &reply_n);
    if (r == CUDA_SUCCESS) {
        bf_in in = {reply, reply_n, 0, 0};
        *handle = in_u64(&in);
    }
    return r;
}

CUresult device_and_handle(uint8_t op, int dev, uint64_t handle, int with_reply,
                                  uint8_t *reply, size_t *reply_n) {
    uint8_t buf[16];
    bf_out o = {buf, 0, sizeof buf, 0};
    out_device(&o, dev);
    out_u64(&o, handle);
    return with_reply ? bf_call(dev, op, &o, NULL, 0, NULL, 0, reply, reply_n)
                      : bf_post(dev, op, &o, NULL, 0);
}

CUresult bfpfn_cuStreamCreateWithPriority_v5050(CUstream *ph, unsigned int flags, int priority) {
    if (!ph)
        return CUDA_ERROR_INVALID_VALUE;
    int dev;
    CUresult r = current_device(&dev);
    if (r)
        return r;
    struct CUstream_st *s = new_handle(KIND_STREAM, sizeof *s);
    if (!s)
        return CUDA_ERROR_OUT_OF_MEMORY;
    uint64_t handle;
    if ((r = handle_call(OP_STREAM_CREATE, dev, &handle))) {
        bury(KIND_STREAM, s);
        return r;
    }
    *s = (struct CUstream_st){MAGIC_STREAM, dev, handle, flags, priority > 0 ? 0 : priority,
                              current()};
    s->priority = 0; /* one priority on the server (cuCtxGetStreamPriorityRange says [0, 0]) */
    *ph = s;
    return CUDA_SUCCESS;
}

CUresult bfpfn_cuStreamCreate_v2000(CUstream *ph, unsigned int flags) {
    return bfpfn_cuStreamCreateWithPriority_v5050(ph, flags, 0);
}

CUresult bfpfn_cuStreamDestroy_v4000(CUstream s) {
    CUresult r = ready();
    if (r)
        return r;
    if (!s || s == CU_STREAM_LEGACY || s == CU_STREAM_PER_THREAD || s->magic != MAGIC_STREAM)
        return CUDA_ERROR_INVALID_HANDLE;
    int device = s->device;
    uint64_t handle = s->handle;
    bury(KIND_STREAM, s);
    return device_and_handle(OP_STREAM_DESTROY, device, handle, 0, NULL, NULL);
}

CUresult bfpfn_cuStreamSynchronize_v2000(CUstream s) {
    int dev;
    uint64_t handle;
    CUresult r = resolve_stream(s, &dev, &handle);
    return r ? r : device_and_handle(OP_STREAM_SYNCHRONIZE, dev, handle, 1, NULL, NULL);
}

CUresult bfpfn_cuStreamQuery_v2000(CUstream s) {
    int dev;
    uint64_t handle;
    CUresult r = resolve_stream(s, &dev, &handle);
    if (r)
        return r;
    uint8_t reply[8];
    size_t reply_n = 0;
    r = device_and_handle(OP_STREAM_QUERY, dev, handle, 1, reply, &reply_n);
    if (r)
        return r;
    return reply_n == 1 && reply[0] ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}

CUresult bfpfn_cuStreamWaitEvent_v3020(CUstream s, CUevent e, unsigned int flags) {
    (void)flags;
    int dev;
    uint64_t handle;
    CUresult r = resolve_stream(s, &dev, &handle);
    if (r)
        return r;
    if (!e || e->magic != MAGIC_EVENT)
        return CUDA_ERROR_INVALID_HANDLE;
    if (e->device != dev) { /* another GPU's event: wait for it here, which orders the same */
        uint8_t none[8];
        size_t none_n;
        return device_and_handle(OP_EVENT_SYNCHRONIZE, e->device, e->handle, 1, none, &none_n);
    }
    uint8_t buf[24];
    bf_out o = {buf, 0, sizeof buf, 0};
    out_device(&o, dev);
    out_u64(&o, handle);
    out_u64(&o, e->handle);
    return bf_post(dev, OP_STREAM_WAIT_EVENT, &o, NULL, 0);
}

CUresult bfpfn_cuStreamGetFlags_v5050(CUstream s, unsigned int *flags) {
    if (!flags)
        return CUDA_ERROR_INVALID_VALUE;
    int dev;
    uint64_t handle;
    CUresult r = resolve_stream(s, &dev, &handle);
    if (r == CUDA_SUCCESS)
        *flags = handle ? s->flags : 0;
    return r;
}

CUresult bfpfn_cuStreamGetPriority_v5050(CUstream s, int *priority) {
    if (!priority)
        return CUDA_ERROR_INVALID_VALUE;
    int dev;
    uint64_t handle;
    CUresult r = resolve_stream(s, &dev, &handle);
    if (r == CUDA_SUCCESS)
        *priority = 0;
    return r;
}

CUresult bfpfn_cuStreamGetCtx_v9020(CUstream s, CUcontext *pctx) {
    if (!pctx)
        return CUDA_ERROR_INVALID_VALUE;
    int dev;
    uint64_t handle;
    CUresult r = resolve_stream(s, &dev, &handle);
    if (r == CUDA_SUCCESS)
        *pctx = handle ? s->ctx : current();
    return r;
}

CUresult bfpfn_cuStreamGetCtx_v12050(CUstream s, CUcontext *pctx, CUgreenCtx *green) {
    if (green)
        *green = NULL;
    return bfpfn_cuStreamGetCtx_v9020(s, pctx);
}

CUresult bfpfn_cuStreamGetDevice_v12080(CUstream s, CUdevice *device) {
    if (!device)
        return CUDA_ERROR_INVALID_VALUE;
    int dev;
    uint64_t handle;
    CUresult r = resolve_stream(s, &dev, &handle);
    if (r == CUDA_SUCCESS)
        *device = dev;
    return r;
}

CUresult bfpfn_cuStreamGetId_v12000(CUstream s, unsigned long long *id) {
    if (!id)
        return CUDA_ERROR_INVALID_VALUE;
    int dev;
    uint64_t handle;
    CUresult r = resolve_stream(s, &dev, &handle);
    if (r == CUDA_SUCCESS)
        *id = handle;
    return r;
}

/* A host function on a stream runs once the stream's earlier work has finished: here, on the
   calling thread, right after a stream synchronisation (a schedule CUDA allows). */
CUresult bfpfn_cuLaunchHostFunc_v10000(CUstream s, CUhostFn fn, void *data) {
    if (!fn)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = bfpfn_cuStreamSynchronize_v2000(s);
    if (r == CUDA_SUCCESS)
        fn(data);
    return r;
}

CUresult bfpfn_cuStreamAddCallback_v5000(CUstream s, CUstreamCallback fn, void *data,
                                         unsigned int flags) {
    if (!fn || flags != 0)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = bfpfn_cuStreamSynchronize_v2000(s);
    fn(s, r, data);
    return CUDA_SUCCESS;
}

/* -- events --------------------------------------------------------------------------------- */
CUresult bfpfn_cuEventCreate_v2000(CUevent *ph, unsigned int flags) {
    if (!ph)
        return CUDA_ERROR_INVALID_VALUE;
    int dev;
    CUresult r = current_device(&dev);
    if (r)
        return r;
    if (flags & CU_EVENT_INTERPROCESS)
        return CUDA_ERROR_NOT_SUPPORTED;
    struct CUevent_st *e = new_handle(KIND_EVENT, sizeof *e);
    if (!e)
        return CUDA_ERROR_OUT_OF_MEMORY;
    uint64_t handle;
    if ((r = handle_call(OP_EVENT_CREATE, dev, &handle))) {
        bury(KIND_EVENT, e);
        return r;
    }
    *e = (struct CUevent_st){MAGIC_EVENT, dev, handle, flags};
    *ph = e;
    return CUDA_SUCCESS;
}

CUresult live_event(CUevent e) {
    CUresult r = ready();
    if (r)
        return r;
    if (!e || e->magic != MAGIC_EVENT)
        return CUDA_ERROR_INVALID_HANDLE;
    return device_alive(e->device);
}

CUresult bfpfn_cuEventDestroy_v4000(CUevent e) {
    CUresult r = live_event(e);
    if (r)
        return r;
    int device = e->device;
    uint64_t handle = e->handle;
    bury(KIND_EVENT, e);
    return device_and_handle(OP_EVENT_DESTROY, device, handle, 0, NULL, NULL);
}

CUresult bfpfn_cuEventRecord_v2000(CUevent e, CUstream s) {
    CUresult r = live_event(e);
    if (r)
        return r;
    int dev;
    uint64_t handle;
    if ((r = resolve_stream(s, &dev, &handle)))
        return r;
    if (dev != e->device)
        return CUDA_ERROR_INVALID_HANDLE; /* as the driver: the event's context is not the stream's */
    uint8_t buf[24];
    bf_out o = {buf, 0, sizeof buf, 0};
    out_device(&o, dev);
    out_u64(&o, e->handle);
    out_u64(&o, handle);
    return bf_post(dev, OP_EVENT_RECORD, &o, NULL, 0);
}

CUresult bfpfn_cuEventRecordWithFlags_v11010(CUevent e, CUstream s, unsigned int flags) {
    if (flags & ~(unsigned)CU_EVENT_RECORD_EXTERNAL)
        return CUDA_ERROR_INVALID_VALUE;
    return bfpfn_cuEventRecord_v2000(e, s);
}

CUresult bfpfn_cuEventQuery_v2000(CUevent e) {
    CUresult r = live_event(e);
    if (r)
        return r;
    uint8_t reply[8];
    size_t reply_n = 0;
    r = device_and_handle(OP_EVENT_QUERY, e->device, e->handle, 1, reply, &reply_n);
    if (r)
        return r;
    return reply_n == 1 && reply[0] ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}

CUresult bfpfn_cuEventSynchronize_v2000(CUevent e) {
    CUresult r = live_event(e);
    return r ? r : device_and_handle(OP_EVENT_SYNCHRONIZE, e->device, e->handle, 1, NULL, NULL);
}

CUresult bfpfn_cuEventElapsedTime_v12080(float *ms, CUevent start, CUevent end) {
    if (!ms)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = live_event(start);
    if (r || (r = live_event(end)))
        return r;
    if ((start->flags | end->flags) & CU_EVENT_DISABLE_TIMING || start->device != end->device)
        return CUDA_ERROR_INVALID_HANDLE;
    uint8_t buf[24], reply[16];
    size_t reply_n = 0;
    bf_out o = {buf, 0, sizeof buf, 0};
    out_device(&o, start->device);
    out_u64(&o, start->handle);
    out_u64(&o, end->handle);
    r = bf_call(start->device, OP_EVENT_ELAPSED, &o, NULL, 0, NULL, 0, reply, &reply_n);
    if (r)
        return r;
    bf_in in = {reply, reply_n, 0, 0};
    *ms = (float)in_f64(&in);
    return CUDA_SUCCESS;
}

CUresult bfpfn_cuEventElapsedTime_v2000(float *ms, CUevent start, CUevent end) {
    return bfpfn_cuEventElapsedTime_v12080(ms, start, end);
}


/* -- stream capture: the agent forwards no capture (cuStreamBeginCapture is not forwarded), so
   no stream is ever capturing, which is what these answer ---------------------------------- */
CUresult bfpfn_cuStreamIsCapturing_v10000(CUstream s, CUstreamCaptureStatus *status) {
    if (!status)
        return CUDA_ERROR_INVALID_VALUE;
    int dev;
    uint64_t handle;
    CUresult r = resolve_stream(s, &dev, &handle);
    if (r == CUDA_SUCCESS)
        *status = CU_STREAM_CAPTURE_STATUS_NONE;
    return r;
}

CUresult bfpfn_cuStreamGetCaptureInfo_v10010(CUstream s, CUstreamCaptureStatus *status,
                                             cuuint64_t *id) {
    (void)id; /* defined only while capturing */
    return bfpfn_cuStreamIsCapturing_v10000(s, status);
}

CUresult bfpfn_cuStreamGetCaptureInfo_v11030(CUstream s, CUstreamCaptureStatus *status,
                                             cuuint64_t *id, CUgraph *graph,
                                             const CUgraphNode **deps, size_t *n) {
    (void)id, (void)graph, (void)deps, (void)n;
    return bfpfn_cuStreamIsCapturing_v10000(s, status);
}

CUresult bfpfn_cuStreamGetCaptureInfo_v12030(CUstream s, CUstreamCaptureStatus *status,
                                             cuuint64_t *id, CUgraph *graph,
                                             const CUgraphNode **deps,
                                             const CUgraphEdgeData **edges, size_t *n) {
    (void)id, (void)graph, (void)deps, (void)edges, (void)n;
    return bfpfn_cuStreamIsCapturing_v10000(s, status);
}

CUresult bfpfn_cuThreadExchangeStreamCaptureMode_v10010(CUstreamCaptureMode *mode) {
    if (!mode)
        return CUDA_ERROR_INVALID_VALUE;
    /* the mode only matters while a capture is under way, which never happens here */
    static __thread CUstreamCaptureMode current_mode = CU_STREAM_CAPTURE_MODE_GLOBAL;
    CUstreamCaptureMode old = current_mode;
    current_mode = *mode;
    *mode = old;
    return CUDA_SUCCESS;
}

/* Driver log callbacks: registered and kept; the agent has no driver log of its own to pass
   them, so they are never called (the server's messages go to stderr instead). */
CUresult bfpfn_cuLogsRegisterCallback_v12090(CUlogsCallback fn, void *data,
                                             CUlogsCallbackHandle *handle) {
    (void)data;
    if (!fn || !handle)
        return CUDA_ERROR_INVALID_VALUE;
    static int token;
    *handle = (CUlogsCallbackHandle)&token;
    return CUDA_SUCCESS;
}

CUresult bfpfn_cuLogsUnregisterCallback_v12090(CUlogsCallbackHandle handle) {
    return handle ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}
