/* cuGetProcAddress: the entry-point table, searched by base name, version and stream flavour.
 *
 * Callers (cudart, cuda-python) ask for base names ("cuMemAlloc", never "cuMemAlloc_v2") with
 * the CUDA version whose ABI they were built against, often with a NULL status pointer: the
 * answer is the newest entry point of that name whose version is at most the one asked for,
 * its per-thread-default-stream flavour when the flags ask for one. Every name of
 * cudaTypedefs.h has an entry point; the ones the agent does not forward log their name once
 * and return CUDA_ERROR_NOT_SUPPORTED (a NULL pointer would make cudart and cuda-python give
 * up on the whole library).
 */
#include <stdlib.h>
#include <string.h>

#include "agent.h"

CUresult bf_not_forwarded(const char *name, int version, const char *flavour) {
    /* Logged once per name: a program that polls a call must not flood its stderr. */
    static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
    static const char *seen[1024];
    static int seen_n;
    pthread_mutex_lock(&lock);
    int known = 0;
    for (int i = 0; i < seen_n && !known; i++)
        known = seen[i] == name;
    if (!known && seen_n < 1024)
        seen[seen_n++] = name;
    pthread_mutex_unlock(&lock);
    if (!known)
        bf_log(1, "%s (version %d%s) is not forwarded by the agent: CUDA_ERROR_NOT_SUPPORTED",
               name, version, flavour);
    return CUDA_ERROR_NOT_SUPPORTED;
}

static CUresult lookup(const char *symbol, void **pfn, int version, cuuint64_t flags,
                       CUdriverProcAddressQueryResult *status) {
    if (status)
        *status = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
    if (!symbol || !pfn)
        return CUDA_ERROR_INVALID_VALUE;
    *pfn = NULL;
    int per_thread = (flags & CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM) != 0;
    const bf_entry_point *plain = NULL, *flavoured = NULL;
    int named = 0;
    for (int i = 0; i < bf_entry_point_count; i++) {
        const bf_entry_point *e = &bf_entry_points[i];
        if (strcmp(e->name, symbol) != 0)
            continue;
        named = 1;
        if (e->version > version)
            continue;
        const bf_entry_point **slot = e->flavour ? &flavoured : &plain;
        if (!*slot || (*slot)->version < e->version)
            *slot = e;
    }
    const bf_entry_point *chosen = per_thread && flavoured ? flavoured : plain;
    bf_log(3, "cuGetProcAddress(%s, %d, flags %llu): %s", symbol, version,
           (unsigned long long)flags, chosen ? "found" : named ? "version too old" : "unknown");
    if (!chosen) {
        if (named && status)
            *status = CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT;
        return CUDA_ERROR_NOT_FOUND;
    }
    *pfn = chosen->fn;
    if (status)
        *status = CU_GET_PROC_ADDRESS_SUCCESS;
    return CUDA_SUCCESS;
}

CUresult bfpfn_cuGetProcAddress_v12000(const char *symbol, void **pfn, int version,
                                       cuuint64_t flags, CUdriverProcAddressQueryResult *status) {
    return lookup(symbol, pfn, version, flags, status);
}

CUresult bfpfn_cuGetProcAddress_v11030(const char *symbol, void **pfn, int version,
                                       cuuint64_t flags) {
    return lookup(symbol, pfn, version, flags, NULL);
}

