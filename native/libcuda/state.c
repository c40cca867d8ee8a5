/* The agent's process-local state: which contexts exist and which is current on each
 * thread, which allocation an address belongs to, page-locked host memory, and destroyed
 * handles kept for reuse (docs/AGENT.md, "How calls travel"). */
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

/* -- state ---------------------------------------------------------------------------------- */
pthread_mutex_t state_lock = PTHREAD_MUTEX_INITIALIZER;
int initialized;
struct CUctx_st primary[BF_MAX_DEVICES];
int primary_refs[BF_MAX_DEVICES];
unsigned long long next_ctx_id = 1;

__thread struct CUctx_st *ctx_stack[CTX_STACK];
__thread int ctx_depth;

bf_alloc *allocs; /* sorted by base */
size_t alloc_n, alloc_cap;

bf_host *hosts;
size_t host_n, host_cap;

/* Destroyed handles are kept, marked dead, and reused by the next create of their kind: a
   program that uses a stale handle gets CUDA_ERROR_INVALID_HANDLE/_CONTEXT (until the memory is
   reused, as with the driver's own handles) instead of a use after free, and memory stays
   bounded by the most handles alive at once. */
void **graveyard[KINDS];
size_t grave_n[KINDS], grave_cap[KINDS];

void bury(int kind, void *handle) {
    *(uint32_t *)handle = MAGIC_DEAD;
    pthread_mutex_lock(&state_lock);
    if (grave_n[kind] == grave_cap[kind]) {
        size_t cap = grave_cap[kind] ? grave_cap[kind] * 2 : 16;
        void **grown = realloc(graveyard[kind], cap * sizeof *grown);
        if (!grown) {
            pthread_mutex_unlock(&state_lock);
            return; /* kept but not reusable: a leak of one handle, not a crash */
        }
        graveyard[kind] = grown;
        grave_cap[kind] = cap;
    }
    graveyard[kind][grave_n[kind]++] = handle;
    pthread_mutex_unlock(&state_lock);
}

void *new_handle(int kind, size_t size) {
    void *handle = NULL;
    pthread_mutex_lock(&state_lock);
    if (grave_n[kind])
        handle = graveyard[kind][--grave_n[kind]];
    pthread_mutex_unlock(&state_lock);
    if (handle)
        memset(handle, 0, size);
    else
        handle = calloc(1, size);
    return handle;
}

struct CUctx_st *current(void) { return ctx_depth ? ctx_stack[ctx_depth - 1] : NULL; }

/* Initialised, with a server left. A lost server fails the calls on its own devices (each
   checks its device below); calls on no device in particular fail once every server is lost. */
CUresult ready(void) {
    if (!initialized)
        return CUDA_ERROR_NOT_INITIALIZED;
    if (bf_all_lost())
        return CUDA_ERROR_DEVICE_UNAVAILABLE;
    return CUDA_SUCCESS;
}

/* A call on device `dev`, whose server may have gone. */
CUresult device_alive(int dev) {
    return bf_device_lost(dev) ? CUDA_ERROR_DEVICE_UNAVAILABLE : CUDA_SUCCESS;
}

int live_ctx(struct CUctx_st *c) {
    if (!c || c->magic != MAGIC_CTX)
        return 0;
    return !c->primary || primary_refs[c->device] > 0;
}

/* The device of the calling thread's current context. */
CUresult current_device(int *device) {
    CUresult r = ready();
    if (r)
        return r;
    struct CUctx_st *c = current();
    if (!live_ctx(c))
        return CUDA_ERROR_INVALID_CONTEXT;
    *device = c->device;
    return device_alive(c->device);
}

CUresult valid_device(CUdevice dev) {
    CUresult r = ready();
    if (r)
        return r;
    return dev < 0 || dev >= bf_s.device_count ? CUDA_ERROR_INVALID_DEVICE : device_alive(dev);
}

/* The server's stream for `s` and its device. The NULL stream, CU_STREAM_LEGACY and
   CU_STREAM_PER_THREAD are the current context's default stream (server stream 0). */
CUresult resolve_stream(CUstream s, int *device, uint64_t *handle) {
    if (s == NULL || s == CU_STREAM_LEGACY || s == CU_STREAM_PER_THREAD) {
        *handle = 0;
        return current_device(device);
    }
    CUresult r = ready();
    if (r)
        return r;
    if (s->magic != MAGIC_STREAM)
        return CUDA_ERROR_INVALID_HANDLE;
    *device = s->device;
    *handle = s->handle;
    return device_alive(s->device);
}

/* -- the allocation table ------------------------------------------------------------------- */
size_t alloc_lower(uint64_t p) { /* first index with base > p */
    size_t lo = 0, hi = alloc_n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (allocs[mid].base <= p)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

void alloc_add(uint64_t base, uint64_t size, int device, struct CUctx_st *ctx,
                      struct CUmod_st *module) {
    pthread_mutex_lock(&state_lock);
    if (alloc_n == alloc_cap) {
        size_t cap = alloc_cap ? alloc_cap * 2 : 64;
        bf_alloc *grown = realloc(allocs, cap * sizeof *grown);
        if (!grown) {
            pthread_mutex_unlock(&state_lock);
            return; /* the allocation works; the table just does not know it */
        }
        allocs = grown;
        alloc_cap = cap;
    }
    size_t at = alloc_lower(base);
    memmove(allocs + at + 1, allocs + at, (alloc_n - at) * sizeof *allocs);
    allocs[at] = (bf_alloc){base, size, device, ctx, module};
    alloc_n++;
    pthread_mutex_unlock(&state_lock);
}

/* The allocation holding [p, p+n), copied out; 0 if there is none. */
int alloc_find(uint64_t p, uint64_t n, bf_alloc *out) {
    pthread_mutex_lock(&state_lock);
    size_t at = alloc_lower(p);
    int found = 0;
    if (at > 0) {
        bf_alloc *a = &allocs[at - 1];
        uint64_t end = a->base + (a->size ? a->size : 1);
        if (p >= a->base && p < end && n <= a->base + a->size - p) {
            *out = *a;
            found = 1;
        }
    }
    pthread_mutex_unlock(&state_lock);
    return found;
}

int alloc_remove(uint64_t base, bf_alloc *out) {
    pthread_mutex_lock(&state_lock);
    size_t at = alloc_lower(base);
    int found = at > 0 && allocs[at - 1].base == base && allocs[at - 1].module == NULL;
    if (found) {
        *out = allocs[at - 1];
        memmove(allocs + at - 1, allocs + at, (alloc_n - at) * sizeof *allocs);
        alloc_n--;
    }
    pthread_mutex_unlock(&state_lock);
    return found;
}

CUresult post_free(int device, uint64_t ptr) {
    uint8_t buf[16];
    bf_out o = {buf, 0, sizeof buf, 0};
    out_device(&o, device);
    out_dptr(&o, device, ptr);
    return bf_post(device, OP_MEM_FREE, &o, NULL, 0);
}

/* A context's memory goes with it, as the driver frees it when the context is destroyed. */
void free_owned_by(struct CUctx_st *ctx, struct CUmod_st *module) {
    for (;;) {
        bf_alloc victim;
        int found = 0;
        pthread_mutex_lock(&state_lock);
        for (size_t i = 0; i < alloc_n; i++) {
            if ((ctx && allocs[i].ctx == ctx) || (module && allocs[i].module == module)) {
                victim = allocs[i];
                memmove(allocs + i, allocs + i + 1, (alloc_n - i - 1) * sizeof *allocs);
                alloc_n--;
                found = 1;
                break;
            }
        }
        pthread_mutex_unlock(&state_lock);
        if (!found)
            return;
        if (!victim.module)
            post_free(victim.device, victim.base);
    }
}

bf_host *host_find(const void *p) {
    for (size_t i = 0; i < host_n; i++) {
        const char *base = hosts[i].p;
        if ((const char *)p >= base && (const char *)p < base + hosts[i].size)
            return &hosts[i];
    }
    return NULL;
}
