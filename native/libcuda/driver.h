/* What the agent's CUDA driver-API modules share (state.c, device.c, context.c, memory.c,
 * stream.c, module.c): the handles' layouts, the state only this process knows, and the helpers
 * every call uses. Internal: nothing here is exported from libcuda.so.1 (-fvisibility=hidden).
 *
 * Each bfpfn_* function of those modules is the entry point of one (name, version) of
 * cudaTypedefs.h, defined with the prototype entry_points.h gives it; the generated
 * entry_points.c exports it under the driver's symbol names and hands it out from
 * cuGetProcAddress. What the server holds (allocations, streams, events, modules, functions) is
 * named by its handles; what only this process can know (contexts, the current-context stack of
 * each thread, which allocation an address belongs to, page-locked host memory) is kept here and
 * answered without a round trip (docs/AGENT.md lists every call and how).
 */
#ifndef BF_DRIVER_H
#define BF_DRIVER_H

#include "agent.h"

#define MAGIC_CTX 0x62666378u    /* "bfcx" */
#define MAGIC_STREAM 0x62667374u /* "bfst" */
#define MAGIC_EVENT 0x62666576u  /* "bfev" */
#define MAGIC_MODULE 0x62666d6fu /* "bfmo" */
#define MAGIC_FUNC 0x62666675u   /* "bffu" */
#define MAGIC_DEAD 0xdeadbeefu

/* The image cuModuleLoadData takes for the server's built-in kernel library (module 0), so a
   driver-API program can launch the built-ins (saxpy, fill, ...) on any executor. */
#define BUILTIN_IMAGE "bitfusion-net:builtin"

struct CUctx_st {
    uint32_t magic;
    int device;
    int primary;
    unsigned flags;
    unsigned long long id;
    size_t limits[16];
};
struct CUstream_st {
    uint32_t magic;
    int device;
    uint64_t handle;
    unsigned flags;
    int priority;
    struct CUctx_st *ctx;
};
struct CUevent_st {
    uint32_t magic;
    int device;
    uint64_t handle;
    unsigned flags;
};
struct CUmod_st {
    uint32_t magic;
    int device;
    uint64_t handle;
    char *kernels; /* its kernels' argument types, read from its image (images.h) */
    struct CUfunc_st *functions;
    uint8_t *pending; /* a library's image, not sent to the server yet */
    size_t pending_n;
    int pending_ptx;
    int pending_owned; /* a copy of ours (else the program's static data) */
};
struct CUfunc_st {
    uint32_t magic;
    int device;
    uint64_t handle;
    struct CUmod_st *module;
    struct CUfunc_st *next; /* the module's other functions: they die with it */
    char arg_types[1024];
    char name[256];
};

#define ARG_CODES "bBhHiIqQfdP"
static inline size_t arg_size(char code) {
    switch (code) {
    case 'b': case 'B': return 1;
    case 'h': case 'H': return 2;
    case 'i': case 'I': case 'f': return 4;
    default: return 8;
    }
}

/* Each thread's context stack, as the driver keeps it (a context is current per thread). */
#define CTX_STACK 64

typedef struct {
    uint64_t base, size;
    int device;
    struct CUctx_st *ctx; /* freed with it (NULL: a module global, freed with its module) */
    struct CUmod_st *module;
} bf_alloc;

typedef struct {
    void *p;
    size_t size;
    unsigned flags;
} bf_host;

enum { KIND_CTX, KIND_STREAM, KIND_EVENT, KIND_MODULE, KIND_FUNC, KINDS };

extern pthread_mutex_t state_lock;
extern int initialized;
extern struct CUctx_st primary[BF_MAX_DEVICES];
extern int primary_refs[BF_MAX_DEVICES];
extern unsigned long long next_ctx_id;
extern __thread struct CUctx_st *ctx_stack[CTX_STACK];
extern __thread int ctx_depth;
extern bf_alloc *allocs;
extern size_t alloc_n, alloc_cap;
extern bf_host *hosts;
extern size_t host_n, host_cap;
extern void **graveyard[KINDS];
extern size_t grave_n[KINDS], grave_cap[KINDS];

void bury(int kind, void *handle);
void *new_handle(int kind, size_t size);
struct CUctx_st *current(void);
CUresult ready(void);
CUresult device_alive(int dev);
int live_ctx(struct CUctx_st *c);
CUresult current_device(int *device);
CUresult valid_device(CUdevice dev);
CUresult resolve_stream(CUstream s, int *device, uint64_t *handle);
size_t alloc_lower(uint64_t p);
void alloc_add(uint64_t base, uint64_t size, int device, struct CUctx_st *ctx,
                      struct CUmod_st *module);
int alloc_find(uint64_t p, uint64_t n, bf_alloc *out);
int alloc_remove(uint64_t base, bf_alloc *out);
CUresult post_free(int device, uint64_t ptr);
void free_owned_by(struct CUctx_st *ctx, struct CUmod_st *module);
bf_host *host_find(const void *p);
CUresult load_attributes(int dev);
int attribute(int dev, int which);
void device_uuid(int dev, CUuuid *uuid);
void push_ctx(struct CUctx_st *c);
void forget_ctx(struct CUctx_st *c);
CUresult primary_release(CUdevice_v1 dev);
CUresult primary_set_flags(CUdevice_v1 dev, unsigned int flags);
CUresult primary_reset(CUdevice_v1 dev);
CUresult ctx_create(CUcontext *pctx, unsigned int flags, CUdevice dev);
CUresult synchronize(int dev);
CUresult host_alloc(void **pp, size_t size, unsigned flags);
CUresult pointer_attribute(void *data, CUpointer_attribute attribute, CUdeviceptr_v2 p,
                                  int lenient);
CUresult device_range(uint64_t p, uint64_t n, int *device);
CUresult copy_stream(CUstream s, int device, uint64_t *handle);
CUresult htod(CUdeviceptr_v2 dst, const void *src, size_t n, CUstream s);
CUresult dtoh(void *dst, CUdeviceptr_v2 src, size_t n, CUstream s);
CUresult dtod(CUdeviceptr_v2 dst, CUdeviceptr_v2 src, size_t n, CUstream s);
CUresult peer_copy(CUdeviceptr_v2 dst, int ddev, CUdeviceptr_v2 src, int sdev, size_t n,
                   CUstream s);
CUresult unified_copy(CUdeviceptr_v2 dst, CUdeviceptr_v2 src, size_t n, CUstream s);
CUresult memset_items(CUdeviceptr_v2 p, unsigned value, size_t count, int itemsize,
                             CUstream s);
CUresult handle_call(uint8_t op, int dev, uint64_t *handle);
CUresult device_and_handle(uint8_t op, int dev, uint64_t handle, int with_reply,
                                  uint8_t *reply, size_t *reply_n);
CUresult live_event(CUevent e);
CUresult send_module(struct CUmod_st *m, const void *image, size_t size, int is_ptx);
CUresult new_module(CUmodule *pmod, const void *image, int dev, int lazy);
CUresult ensure_loaded(struct CUmod_st *m);
CUresult live_function(CUfunction f);
size_t param_layout(const char *types, size_t index, size_t *size);

#endif
