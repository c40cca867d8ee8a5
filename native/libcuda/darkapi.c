/* The private tables NVIDIA's runtime (libcudart) asks the driver for with cuGetExportTable
 * before it initialises (docs/AGENT.md, "NVIDIA's runtime"). Their identities and slot layouts
 * are not published by NVIDIA; what the agent provides follows what vosen/ZLUDA's dark_api
 * documents (names, UUIDs, the slots cudart calls, the integrity check's inputs). A slot no
 * caller has been seen to use is NULL, as in those tables.
 *
 * The integrity check is HMAC-MD2 (RFC 2104 over RFC 1319, a 16-byte key) of the driver version,
 * the caller's version and time, the process and thread, the tables' addresses and each
 * device's UUID and PCI location: cudart computes the same and refuses a driver whose answer
 * differs.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "agent.h"
#include "darkapi.h"

#define SIZE_OF(n) ((void *)(uintptr_t)(sizeof(void *) * (n)))

/* -- CUDART_INTERFACE ------------------------------------------------------------------------ */
static CUresult get_module_from_cubin(CUmodule *module, const void *fatbinc_wrapper) {
    if (!module || !fatbinc_wrapper)
        return CUDA_ERROR_INVALID_VALUE;
    return bf_module_load(module, fatbinc_wrapper);
}

/* The device's primary context for cudart, which makes it current and uses it without a
   cuDevicePrimaryCtxRetain of its own: the agent retains it for cudart, for the process's
   life (cudaDeviceReset resets it through cuDevicePrimaryCtxReset). */
static CUresult primary_context(CUcontext *pctx, CUdevice dev) {
    if (!pctx)
        return CUDA_ERROR_INVALID_VALUE;
    return bfpfn_cuDevicePrimaryCtxRetain_v7000(pctx, dev);
}

static CUresult get_module_from_cubin_ext1(CUmodule *module, const void *fatbinc_wrapper,
                                           void *arg3, void *arg4, unsigned arg5) {
    if (arg3 || arg4 || arg5)
        return CUDA_ERROR_NOT_SUPPORTED;
    return get_module_from_cubin(module, fatbinc_wrapper);
}

static void cudart_fn7(size_t arg) { (void)arg; }

static CUresult get_module_from_cubin_ext2(const void *fatbin, CUmodule *module, void *arg3,
                                           void *arg4, unsigned arg5) {
    if (arg3 || arg4 || arg5)
        return CUDA_ERROR_NOT_SUPPORTED;
    return get_module_from_cubin(module, fatbin);
}

static CUresult load_compilers(void) { return CUDA_SUCCESS; } /* JIT happens on the server */

static const void *cudart_interface[13] = {
    SIZE_OF(13), (void *)get_module_from_cubin, (void *)primary_context, NULL, NULL, NULL,
    (void *)get_module_from_cubin_ext1, (void *)cudart_fn7, (void *)get_module_from_cubin_ext2,
    NULL, NULL, NULL, (void *)load_compilers,
};

/* -- TOOLS_TLS, TOOLS_RUNTIME_CALLBACK_HOOKS: buffers the tools interface shares ------------- */
static const void *tools_tls[4] = {SIZE_OF(4)};

static uint32_t hooks_buffer1[1024], hooks_buffer2[14];
static void hooks_fn2(void **ptr, size_t *size) {
    *ptr = hooks_buffer1;
    *size = sizeof hooks_buffer1 / sizeof hooks_buffer1[0];
}
static void hooks_fn6(void **ptr, size_t *size) {
    *ptr = hooks_buffer2;
    *size = sizeof hooks_buffer2 / sizeof hooks_buffer2[0];
}
static const void *tools_runtime_callback_hooks[7] = {
    SIZE_OF(7), NULL, (void *)hooks_fn2, NULL, NULL, NULL, (void *)hooks_fn6,
};

/* -- CONTEXT_LOCAL_STORAGE: cudart's state per context ---------------------------------------- */
typedef void (*cls_dtor)(CUcontext, void *, void *);
typedef struct {
    CUcontext ctx;
    void *key, *value;
    cls_dtor dtor;
} cls_entry;
static pthread_mutex_t cls_lock = PTHREAD_MUTEX_INITIALIZER;
static cls_entry *cls;
static size_t cls_n, cls_cap;

static CUresult context_or_current(CUcontext *ctx) {
    if (*ctx)
        return CUDA_SUCCESS;
    CUresult r = bfpfn_cuCtxGetCurrent_v4000(ctx);
    return r ? r : *ctx ? CUDA_SUCCESS : CUDA_ERROR_INVALID_CONTEXT;
}

static CUresult cls_put(CUcontext ctx, void *key, void *value, cls_dtor dtor) {
    CUresult r = context_or_current(&ctx);
    if (r)
        return r;
    pthread_mutex_lock(&cls_lock);
    for (size_t i = 0; i < cls_n; i++)
        if (cls[i].ctx == ctx && cls[i].key == key) {
            cls[i].value = value;
            cls[i].dtor = dtor;
            pthread_mutex_unlock(&cls_lock);
            return CUDA_SUCCESS;
        }
    if (cls_n == cls_cap) {
        size_t cap = cls_cap ? cls_cap * 2 : 16;
        cls_entry *grown = realloc(cls, cap * sizeof *grown);
        if (!grown) {
            pthread_mutex_unlock(&cls_lock);
            return CUDA_ERROR_OUT_OF_MEMORY;
        }
        cls = grown;
        cls_cap = cap;
    }
    cls[cls_n++] = (cls_entry){ctx, key, value, dtor};
    pthread_mutex_unlock(&cls_lock);
    return CUDA_SUCCESS;
}

static CUresult cls_delete(CUcontext ctx, void *key) {
    CUresult r = context_or_current(&ctx);
    if (r)
        return r;
    pthread_mutex_lock(&cls_lock);
    for (size_t i = 0; i < cls_n; i++)
        if (cls[i].ctx == ctx && cls[i].key == key) {
            cls[i] = cls[--cls_n];
            break;
        }
    pthread_mutex_unlock(&cls_lock);
    return CUDA_SUCCESS;
}

static CUresult cls_get(void **value, CUcontext ctx, void *key) {
    if (!value)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = context_or_current(&ctx);
    if (r)
        return r;
    r = CUDA_ERROR_INVALID_HANDLE; /* nothing stored: cudart then creates its state */
    pthread_mutex_lock(&cls_lock);
    for (size_t i = 0; i < cls_n; i++)
        if (cls[i].ctx == ctx && cls[i].key == key) {
            *value = cls[i].value;
            r = CUDA_SUCCESS;
            break;
        }
    pthread_mutex_unlock(&cls_lock);
    return r;
}

void bf_context_gone(CUcontext ctx) {
    for (;;) {
        cls_entry gone = {0};
        pthread_mutex_lock(&cls_lock);
        for (size_t i = 0; i < cls_n; i++)
            if (cls[i].ctx == ctx) {
                gone = cls[i];
                cls[i] = cls[--cls_n];
                break;
            }
        pthread_mutex_unlock(&cls_lock);
        if (!gone.ctx)
            return;
        if (gone.dtor) /* outside the lock: it may call back into the tables */
            gone.dtor(ctx, gone.key, gone.value);
    }
}

static const void *context_local_storage[4] = {(void *)cls_put, (void *)cls_delete,
                                               (void *)cls_get, NULL};

/* -- CTX_CREATE_BYPASS, HEAP_ACCESS, DEVICE_EXTENDED_RT: present, not forwarded --------------- */
static CUresult ctx_create_bypass(CUcontext *pctx, unsigned flags, CUdevice dev) {
    (void)pctx, (void)flags, (void)dev;
    return bf_not_forwarded("CTX_CREATE_BYPASS slot 1", 0, "");
}
static const void *ctx_create_bypass_table[2] = {SIZE_OF(2), (void *)ctx_create_bypass};

static CUresult heap_alloc(const void **record, size_t a, size_t b) {
    (void)record, (void)a, (void)b;
    return bf_not_forwarded("HEAP_ACCESS slot 1", 0, "");
}
static CUresult heap_free(const void *record, size_t *a) {
    (void)record, (void)a;
    return bf_not_forwarded("HEAP_ACCESS slot 2", 0, "");
}
static const void *heap_access[3] = {SIZE_OF(3), (void *)heap_alloc, (void *)heap_free};

static CUresult device_attribute_ext(CUdevice dev, unsigned attribute, int unknown,
                                     size_t result[2]) {
    (void)dev, (void)attribute, (void)unknown, (void)result;
    return bf_not_forwarded("DEVICE_EXTENDED_RT slot 5", 0, "");
}
static CUresult device_something(unsigned char *result, CUdevice dev) {
    (void)result, (void)dev;
    return bf_not_forwarded("DEVICE_EXTENDED_RT slot 13", 0, "");
}
static const void *device_extended_rt[26] = {
    [0] = SIZE_OF(26), [5] = (void *)device_attribute_ext, [13] = (void *)device_something,
};

/* -- CONTEXT_CHECKS --------------------------------------------------------------------------- */
static CUresult context_check(CUcontext ctx, uint32_t *result1, const void **result2) {
    (void)ctx, (void)result2;
    if (result1)
        *result1 = 0; /* no context of ours has the flags it checks for */
    return CUDA_SUCCESS;
}
static uint32_t check_fn3(void) { return 0; }
static const void *context_checks[4] = {SIZE_OF(4), NULL, (void *)context_check,
                                        (void *)check_fn3};

/* -- INTEGRITY_CHECK: HMAC-MD2 ---------------------------------------------------------------- */
/* RFC 1319's S-box: a permutation of 0..255 built from the digits of pi. */
static const uint8_t MD2_S[256] = {
    41,  46,  67,  201, 162, 216, 124, 1,   61,  54,  84,  161, 236, 240, 6,   19,  98,  167,
    5,   243, 192, 199, 115, 140, 152, 147, 43,  217, 188, 76,  130, 202, 30,  155, 87,  60,
    253, 212, 224, 22,  103, 66,  111, 24,  138, 23,  229, 18,  190, 78,  196, 214, 218, 158,
    222, 73,  160, 251, 245, 142, 187, 47,  238, 122, 169, 104, 121, 145, 21,  178, 7,   63,
    148, 194, 16,  137, 11,  34,  95,  33,  128, 127, 93,  154, 90,  144, 50,  39,  53,  62,
    204, 231, 191, 247, 151, 3,   255, 25,  48,  179, 72,  165, 181, 209, 215, 94,  146, 42,
    172, 86,  170, 198, 79,  184, 56,  210, 150, 164, 125, 182, 118, 252, 107, 226, 156, 116,
    4,   241, 69,  157, 112, 89,  100, 113, 135, 32,  134, 91,  207, 101, 230, 45,  168, 2,
    27,  96,  37,  173, 174, 176, 185, 246, 28,  70,  97,  105, 52,  64,  126, 15,  85,  71,
    163, 35,  221, 81,  175, 58,  195, 92,  249, 206, 186, 197, 234, 38,  44,  83,  13,  110,
    133, 40,  132, 9,   211, 223, 205, 244, 65,  129, 77,  82,  106, 220, 55,  200, 108, 193,
    171, 250, 36,  225, 123, 8,   12,  189, 177, 74,  120, 136, 149, 139, 227, 99,  232, 109,
    233, 203, 213, 254, 59,  0,   29,  57,  242, 239, 183, 14,  102, 88,  208, 228, 166, 119,
    114, 248, 235, 117, 75,  10,  49,  68,  80,  180, 143, 237, 31,  26,  219, 153, 141, 51,
    159, 17,  131, 20,
};

typedef struct {
    uint8_t x[48], checksum[16], block[16];
    uint8_t last; /* the checksum's running byte L */
    unsigned n;   /* bytes in `block` */
} md2;

static void md2_compress(md2 *m) {
    for (int i = 0; i < 16; i++) {
        m->x[16 + i] = m->block[i];
        m->x[32 + i] = m->block[i] ^ m->x[i];
    }
    uint8_t t = 0;
    for (int j = 0; j < 18; j++) {
        for (int k = 0; k < 48; k++)
            t = m->x[k] ^= MD2_S[t];
        t = (uint8_t)(t + j);
    }
}

static void md2_update(md2 *m, const void *data, size_t n) {
    const uint8_t *p = data;
    for (size_t i = 0; i < n; i++) {
        m->block[m->n] = p[i];
        m->last = m->checksum[m->n] ^= MD2_S[p[i] ^ m->last];
        if (++m->n == 16) {
            md2_compress(m);
            m->n = 0;
        }
    }
}

static void md2_final(md2 *m, uint8_t digest[16]) {
    uint8_t pad[16], checksum[16];
    unsigned count = 16 - m->n;
    memset(pad, (int)count, count);
    md2_update(m, pad, count);
    memcpy(checksum, m->checksum, 16);
    md2_update(m, checksum, 16);
    memcpy(digest, m->x, 16);
}

static const uint8_t INTEGRITY_KEY[16] = {0x14, 0x6A, 0xDD, 0xAE, 0x53, 0xA9, 0xA7, 0x52,
                                          0xAA, 0x08, 0x41, 0x36, 0x0B, 0xF5, 0x5A, 0x9F};

static void hmac_md2_start(md2 *m, uint8_t mask) {
    uint8_t pad[16];
    memset(m, 0, sizeof *m);
    for (int i = 0; i < 16; i++)
        pad[i] = INTEGRITY_KEY[i] ^ mask;
    md2_update(m, pad, 16);
}

static CUresult integrity_check(uint32_t version, uint64_t unix_seconds, uint64_t result[2]);
static const void *integrity_check_table[3] = {SIZE_OF(3), (void *)integrity_check, NULL};

static CUresult integrity_check(uint32_t version, uint64_t unix_seconds, uint64_t result[2]) {
    if (!result)
        return CUDA_ERROR_INVALID_VALUE;
    if (version % 10 == 0 || version % 10 == 1) { /* answered with constants, not hashed */
        result[0] = version % 10 ? 0x1841181C03CB675Cull : 0x3341181C03CB675Cull;
        result[1] = 0x8ED383AA1F4CD1E8ull;
        return CUDA_SUCCESS;
    }
    int driver = 0, count = 0;
    bfpfn_cuDriverGetVersion_v2020(&driver);
    CUresult r = bfpfn_cuDeviceGetCount_v2000(&count);
    if (r)
        return r;
    struct { /* 48 bytes, no padding: hashed as it lies in memory */
        uint32_t driver_version, version, process, thread;
        const void *cudart_table, *integrity_table, *function;
        uint64_t unix_seconds;
    } mixin = {(uint32_t)driver, version, (uint32_t)getpid(), (uint32_t)pthread_self(),
               cudart_interface, integrity_check_table, integrity_check_table[1], unix_seconds};
    _Static_assert(sizeof mixin == 48, "the hashed record has no padding");
    md2 m;
    hmac_md2_start(&m, 0x36);
    md2_update(&m, &mixin, sizeof mixin);
    for (int dev = 0; dev < count; dev++) {
        struct { /* 28 bytes, no padding */
            CUuuid uuid;
            int32_t domain, bus, device;
        } info;
        _Static_assert(sizeof info == 28, "the hashed record has no padding");
        if ((r = bfpfn_cuDeviceGetUuid_v11040(&info.uuid, dev)) ||
            (r = bfpfn_cuDeviceGetAttribute_v2000(&info.domain, CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID, dev)) ||
            (r = bfpfn_cuDeviceGetAttribute_v2000(&info.bus, CU_DEVICE_ATTRIBUTE_PCI_BUS_ID, dev)) ||
            (r = bfpfn_cuDeviceGetAttribute_v2000(&info.device, CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID, dev)))
            return r;
        md2_update(&m, &info, sizeof info);
    }
    uint8_t inner[16], outer[16];
    md2_final(&m, inner);
    hmac_md2_start(&m, 0x5c);
    md2_update(&m, inner, 16);
    md2_final(&m, outer);
    memcpy(result, outer, 16);
    return CUDA_SUCCESS;
}

/* -- the lookup ------------------------------------------------------------------------------- */
static const struct {
    const char *name;
    unsigned char uuid[16];
    const void *const *table;
} tables[] = {
    {"CUDART_INTERFACE", {0x6b, 0xd5, 0xfb, 0x6c, 0x5b, 0xf4, 0xe7, 0x4a, 0x89, 0x87, 0xd9, 0x39, 0x12, 0xfd, 0x9d, 0xf9}, cudart_interface},
    {"TOOLS_TLS", {0x42, 0xd8, 0x5a, 0x81, 0x23, 0xf6, 0xcb, 0x47, 0x82, 0x98, 0xf6, 0xe7, 0x8a, 0x3a, 0xec, 0xdc}, tools_tls},
    {"TOOLS_RUNTIME_CALLBACK_HOOKS", {0xa0, 0x94, 0x79, 0x8c, 0x2e, 0x74, 0x2e, 0x74, 0x93, 0xf2, 0x08, 0x00, 0x20, 0x0c, 0x0a, 0x66}, tools_runtime_callback_hooks},
    {"CONTEXT_LOCAL_STORAGE", {0xc6, 0x93, 0x33, 0x6e, 0x11, 0x21, 0xdf, 0x11, 0xa8, 0xc3, 0x68, 0xf3, 0x55, 0xd8, 0x95, 0x93}, context_local_storage},
    {"CTX_CREATE_BYPASS", {0x0c, 0xa5, 0x0b, 0x8c, 0x10, 0x04, 0x92, 0x9a, 0x89, 0xa7, 0xd0, 0xdf, 0x10, 0xe7, 0x72, 0x86}, ctx_create_bypass_table},
    {"HEAP_ACCESS", {0x19, 0x5b, 0xcb, 0xf4, 0xd6, 0x7d, 0x02, 0x4a, 0xac, 0xc5, 0x1d, 0x29, 0xce, 0xa6, 0x31, 0xae}, heap_access},
    {"DEVICE_EXTENDED_RT", {0xb1, 0x05, 0x41, 0xe1, 0xf7, 0xc7, 0xc7, 0x4a, 0x9f, 0x64, 0xf2, 0x23, 0xbe, 0x99, 0xf1, 0xe2}, device_extended_rt},
    {"INTEGRITY_CHECK", {0xd4, 0x08, 0x20, 0x55, 0xbd, 0xe6, 0x70, 0x4b, 0x8d, 0x34, 0xba, 0x12, 0x3c, 0x66, 0xe1, 0xf2}, integrity_check_table},
    {"CONTEXT_CHECKS", {0x26, 0x3e, 0x88, 0x60, 0x7c, 0xd2, 0x61, 0x43, 0x92, 0xf6, 0xbb, 0xd5, 0x00, 0x6d, 0xfa, 0x7e}, context_checks},
};

CUresult bfpfn_cuGetExportTable_v3000(const void **table, const CUuuid *id) {
    if (!table || !id)
        return CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; i < sizeof tables / sizeof tables[0]; i++)
        if (memcmp(tables[i].uuid, id->bytes, 16) == 0) {
            bf_log(2, "cuGetExportTable(%s)", tables[i].name);
            *table = tables[i].table;
            return CUDA_SUCCESS;
        }
    const unsigned char *b = (const unsigned char *)id->bytes;
    bf_log(2, "cuGetExportTable(%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x): "
              "a table the agent does not know: CUDA_ERROR_NOT_SUPPORTED",
           b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
           b[14], b[15]);
    *table = NULL;
    return CUDA_ERROR_NOT_SUPPORTED;
}
