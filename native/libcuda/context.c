/* Primary and created contexts, and each thread's context stack: local bookkeeping over the
 * device's lease (a context's memory is freed with it, as the driver frees it). */
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

/* -- contexts ------------------------------------------------------------------------------- */
void push_ctx(struct CUctx_st *c) {
    if (ctx_depth < CTX_STACK)
        ctx_stack[ctx_depth++] = c;
}

void forget_ctx(struct CUctx_st *c) { /* off this thread's stack, wherever it is */
    int w = 0;
    for (int i = 0; i < ctx_depth; i++)
        if (ctx_stack[i] != c)
            ctx_stack[w++] = ctx_stack[i];
    ctx_depth = w;
}

CUresult bfpfn_cuDevicePrimaryCtxRetain_v7000(CUcontext *pctx, CUdevice_v1 dev) {
    if (!pctx)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = valid_device(dev);
    if (r)
        return r;
    pthread_mutex_lock(&state_lock);
    primary_refs[dev]++;
    pthread_mutex_unlock(&state_lock);
    *pctx = &primary[dev];
    return CUDA_SUCCESS;
}

CUresult primary_release(CUdevice_v1 dev) {
    CUresult r = valid_device(dev);
    if (r)
        return r;
    pthread_mutex_lock(&state_lock);
    int refs = primary_refs[dev];
    if (refs > 0)
        primary_refs[dev]--;
    pthread_mutex_unlock(&state_lock);
    if (refs <= 0)
        return CUDA_ERROR_INVALID_CONTEXT;
    if (refs == 1) { /* the last release destroys it */
        bf_context_gone(&primary[dev]);
        free_owned_by(&primary[dev], NULL);
    }
    return CUDA_SUCCESS;
}

CUresult bfpfn_cuDevicePrimaryCtxRelease_v11000(CUdevice_v1 dev) { return primary_release(dev); }
CUresult bfpfn_cuDevicePrimaryCtxRelease_v7000(CUdevice_v1 dev) { return primary_release(dev); }

CUresult primary_set_flags(CUdevice_v1 dev, unsigned int flags) {
    CUresult r = valid_device(dev);
    if (r)
        return r;
    primary[dev].flags = flags;
    return CUDA_SUCCESS;
}
CUresult bfpfn_cuDevicePrimaryCtxSetFlags_v11000(CUdevice_v1 dev, unsigned int flags) {
    return primary_set_flags(dev, flags);
}
CUresult bfpfn_cuDevicePrimaryCtxSetFlags_v7000(CUdevice_v1 dev, unsigned int flags) {
    return primary_set_flags(dev, flags);
}

CUresult bfpfn_cuDevicePrimaryCtxGetState_v7000(CUdevice_v1 dev, unsigned int *flags, int *active) {
    if (!flags || !active)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = valid_device(dev);
    if (r)
        return r;
    *flags = primary[dev].flags;
    *active = primary_refs[dev] > 0;
    return CUDA_SUCCESS;
}

CUresult primary_reset(CUdevice_v1 dev) {
    CUresult r = valid_device(dev);
    if (r)
        return r;
    bf_context_gone(&primary[dev]);
    free_owned_by(&primary[dev], NULL);
    pthread_mutex_lock(&state_lock);
    primary_refs[dev] = 0;
    pthread_mutex_unlock(&state_lock);
    return CUDA_SUCCESS;
}
CUresult bfpfn_cuDevicePrimaryCtxReset_v11000(CUdevice_v1 dev) { return primary_reset(dev); }
CUresult bfpfn_cuDevicePrimaryCtxReset_v7000(CUdevice_v1 dev) { return primary_reset(dev); }

CUresult ctx_create(CUcontext *pctx, unsigned int flags, CUdevice dev) {
    if (!pctx)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = valid_device(dev);
    if (r)
        return r;
    struct CUctx_st *c = new_handle(KIND_CTX, sizeof *c);
    if (!c)
        return CUDA_ERROR_OUT_OF_MEMORY;
    pthread_mutex_lock(&state_lock);
    *c = (struct CUctx_st){.magic = MAGIC_CTX, .device = dev, .flags = flags, .id = next_ctx_id++};
    pthread_mutex_unlock(&state_lock);
    push_ctx(c);
    *pctx = c;
    return CUDA_SUCCESS;
}

CUresult bfpfn_cuCtxCreate_v3020(CUcontext *pctx, unsigned int flags, CUdevice_v1 dev) {
    return ctx_create(pctx, flags, dev);
}
CUresult bfpfn_cuCtxCreate_v11040(CUcontext *pctx, CUexecAffinityParam *params, int n,
                                  unsigned int flags, CUdevice_v1 dev) {
    if (params && n > 0)
        return CUDA_ERROR_NOT_SUPPORTED; /* no SM partitions on a leased GPU */
    return ctx_create(pctx, flags, dev);
}
CUresult bfpfn_cuCtxCreate_v12050(CUcontext *pctx, CUctxCreateParams *params, unsigned int flags,
                                  CUdevice dev) {
    if (params && (params->execAffinityParams || params->numExecAffinityParams ||
                   params->cigParams))
        return CUDA_ERROR_NOT_SUPPORTED;
    return ctx_create(pctx, flags, dev);
}

CUresult bfpfn_cuCtxDestroy_v4000(CUcontext ctx) {
    CUresult r = ready();
    if (r)
        return r;
    if (!ctx || ctx->magic != MAGIC_CTX || ctx->primary)
        return CUDA_ERROR_INVALID_CONTEXT;
    bf_context_gone(ctx);
    free_owned_by(ctx, NULL);
    forget_ctx(ctx);
    bury(KIND_CTX, ctx);
    return CUDA_SUCCESS;
}

CUresult bfpfn_cuCtxPushCurrent_v4000(CUcontext ctx) {
    CUresult r = ready();
    if (r)
        return r;
    if (!live_ctx(ctx))
        return CUDA_ERROR_INVALID_CONTEXT;
    if (ctx_depth == CTX_STACK)
        return CUDA_ERROR_OUT_OF_MEMORY;
    push_ctx(ctx);
    return CUDA_SUCCESS;
}

CUresult bfpfn_cuCtxPopCurrent_v4000(CUcontext *pctx) {
    CUresult r = ready();
    if (r)
        return r;
    if (!ctx_depth)
        return CUDA_ERROR_INVALID_CONTEXT;
    struct CUctx_st *c = ctx_stack[--ctx_depth];
    if (pctx)
        *pctx = c;
    return CUDA_SUCCESS;
}

CUresult bfpfn_cuCtxGetCurrent_v4000(CUcontext *pctx) {
    if (!pctx)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = ready();
    if (r)
        return r;
    *pctx = current();
    return CUDA_SUCCESS;
}

CUresult bfpfn_cuCtxSetCurrent_v4000(CUcontext ctx) {
    CUresult r = ready();
    if (r)
        return r;
    if (ctx == NULL) { /* unbinds: the stack's top is removed */
        if (ctx_depth)
            ctx_depth--;
        return CUDA_SUCCESS;
    }
    if (!live_ctx(ctx))
        return CUDA_ERROR_INVALID_CONTEXT;
    if (ctx_depth)
        ctx_stack[ctx_depth - 1] = ctx;
    else
        push_ctx(ctx);
    return CUDA_SUCCESS;
}

CUresult bfpfn_cuCtxGetDevice_v2000(CUdevice_v1 *device) {
    if (!device)
        return CUDA_ERROR_INVALID_VALUE;
    int dev;
    CUresult r = current_device(&dev);
    if (r == CUDA_SUCCESS)
        *device = dev;
    return r;
}

CUresult bfpfn_cuCtxGetDevice_v13000(CUdevice *device, CUcontext ctx) {
    if (!ctx)
        return bfpfn_cuCtxGetDevice_v2000(device);
    if (!device)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = ready();
    if (r)
        return r;
    if (!live_ctx(ctx))
        return CUDA_ERROR_INVALID_CONTEXT;
    *device = ctx->device;
    return CUDA_SUCCESS;
}

CUresult synchronize(int dev) {
    uint8_t buf[8];
    bf_out o = {buf, 0, sizeof buf, 0};
    out_device(&o, dev);
    return bf_call(dev, OP_SYNCHRONIZE, &o, NULL, 0, NULL, 0, NULL, NULL);
}

CUresult bfpfn_cuCtxSynchronize_v2000(void) {
    int dev;
    CUresult r = current_device(&dev);
    return r ? r : synchronize(dev);
}

CUresult bfpfn_cuCtxSynchronize_v13000(CUcontext ctx) {
    if (!ctx)
        return bfpfn_cuCtxSynchronize_v2000();
    CUresult r = ready();
    if (r)
        return r;
    return live_ctx(ctx) ? synchronize(ctx->device) : CUDA_ERROR_INVALID_CONTEXT;
}

CUresult bfpfn_cuCtxGetFlags_v7000(unsigned int *flags) {
    if (!flags)
        return CUDA_ERROR_INVALID_VALUE;
    int dev;
    CUresult r = current_device(&dev);
    if (r == CUDA_SUCCESS)
        *flags = current()->flags;
    return r;
}

CUresult bfpfn_cuCtxSetFlags_v12010(unsigned int flags) {
    int dev;
    CUresult r = current_device(&dev);
    if (r == CUDA_SUCCESS)
        current()->flags = flags;
    return r;
}

CUresult bfpfn_cuCtxGetId_v12000(CUcontext ctx, unsigned long long *id) {
    if (!id)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = ready();
    if (r)
        return r;
    if (!ctx)
        ctx = current();
    if (!live_ctx(ctx))
        return CUDA_ERROR_INVALID_CONTEXT;
    *id = ctx->id;
    return CUDA_SUCCESS;
}

CUresult bfpfn_cuCtxGetApiVersion_v3020(CUcontext ctx, unsigned int *version) {
    if (!version)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = ready();
    if (r)
        return r;
    if (!ctx)
        ctx = current();
    if (!live_ctx(ctx))
        return CUDA_ERROR_INVALID_CONTEXT;
    *version = 3020; /* what the driver reports for a context made through the v2 API */
    return CUDA_SUCCESS;
}

CUresult bfpfn_cuCtxGetStreamPriorityRange_v5050(int *least, int *greatest) {
    int dev;
    CUresult r = current_device(&dev);
    if (r)
        return r;
    /* the server runs every stream at one priority: the range is [0, 0] */
    if (least)
        *least = 0;
    if (greatest)
        *greatest = 0;
    return CUDA_SUCCESS;
}

/* Limits are kept per context and reported back; the server applies none of them (its
   executors have their own fixed stack and heap sizes). */
static const size_t default_limits[16] = {
    [CU_LIMIT_STACK_SIZE] = 1024,
    [CU_LIMIT_PRINTF_FIFO_SIZE] = 1 << 20,
    [CU_LIMIT_MALLOC_HEAP_SIZE] = 8 << 20,
    [CU_LIMIT_DEV_RUNTIME_SYNC_DEPTH] = 2,
    [CU_LIMIT_DEV_RUNTIME_PENDING_LAUNCH_COUNT] = 2048,
    [CU_LIMIT_MAX_L2_FETCH_GRANULARITY] = 128,
};

CUresult bfpfn_cuCtxGetLimit_v3010(size_t *value, CUlimit limit) {
    if (!value || (unsigned)limit >= 16)
        return CUDA_ERROR_INVALID_VALUE;
    int dev;
    CUresult r = current_device(&dev);
    if (r)
        return r;
    size_t mine = current()->limits[limit];
    *value = mine ? mine : default_limits[limit];
    return CUDA_SUCCESS;
}

CUresult bfpfn_cuCtxSetLimit_v3010(CUlimit limit, size_t value) {
    if ((unsigned)limit >= 16)
        return CUDA_ERROR_INVALID_VALUE;
    int dev;
    CUresult r = current_device(&dev);
    if (r)
        return r;
    current()->limits[limit] = value;
    return CUDA_SUCCESS;
}

CUresult bfpfn_cuCtxGetCacheConfig_v3020(CUfunc_cache *config) {
    if (!config)
        return CUDA_ERROR_INVALID_VALUE;
    int dev;
    CUresult r = current_device(&dev);
    if (r == CUDA_SUCCESS)
        *config = CU_FUNC_CACHE_PREFER_NONE;
    return r;
}

CUresult bfpfn_cuCtxSetCacheConfig_v3020(CUfunc_cache config) {
    (void)config; /* a preference, which the driver too may ignore */
    int dev;
    return current_device(&dev);
}
