/* Memory: allocations, page-locked host memory, pointer attributes, copies in every direction
 * and memsets (PROTOCOL.md section 6.1). */
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

/* -- memory --------------------------------------------------------------------------------- */
CUresult bfpfn_cuMemAlloc_v3020(CUdeviceptr_v2 *dptr, size_t bytesize) {
    if (!dptr)
        return CUDA_ERROR_INVALID_VALUE;
    int dev;
    CUresult r = current_device(&dev);
    if (r)
        return r;
    if (bytesize == 0)
        return CUDA_ERROR_INVALID_VALUE;
    uint8_t buf[16], reply[16];
    size_t reply_n = 0;
    bf_out o = {buf, 0, sizeof buf, 0};
    out_device(&o, dev);
    out_u64(&o, bytesize);
    r = bf_call(dev, OP_MEM_ALLOC, &o, NULL, 0, NULL, 0, reply, &reply_n);
    if (r)
        return r;
    bf_in in = {reply, reply_n, 0, 0};
    uint64_t ptr;
    if (bf_from_server(dev, in_u64(&in), &ptr) < 0) {
        bf_log(1, "cuMemAlloc: the server %s placed an allocation at an address the agent cannot "
                  "tell from another server's", bf_server_address(dev));
        bf_in again = {reply, reply_n, 0, 0};
        uint64_t raw = in_u64(&again);
        uint8_t fbuf[16];
        bf_out f = {fbuf, 0, sizeof fbuf, 0};
        out_device(&f, dev);
        out_u64(&f, raw);
        bf_post(dev, OP_MEM_FREE, &f, NULL, 0);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    alloc_add(ptr, bytesize, dev, current(), NULL);
    *dptr = ptr;
    return CUDA_SUCCESS;
}

CUresult bfpfn_cuMemAllocPitch_v3020(CUdeviceptr_v2 *dptr, size_t *pitch, size_t width,
                                     size_t height, unsigned int element) {
    if (!pitch || (element != 4 && element != 8 && element != 16) || !width || !height)
        return CUDA_ERROR_INVALID_VALUE;
    size_t rounded = (width + 511) / 512 * 512; /* the texture pitch alignment */
    CUresult r = bfpfn_cuMemAlloc_v3020(dptr, rounded * height);
    if (r == CUDA_SUCCESS)
        *pitch = rounded;
    return r;
}

CUresult bfpfn_cuMemFree_v3020(CUdeviceptr_v2 dptr) {
    CUresult r = ready();
    if (r)
        return r;
    if (dptr == 0)
        return CUDA_SUCCESS;
    bf_alloc a;
    if (!alloc_remove(dptr, &a))
        return CUDA_ERROR_INVALID_VALUE;
    return post_free(a.device, dptr); /* DEVICE_UNAVAILABLE if its server has gone */
}

CUresult bfpfn_cuMemGetInfo_v3020(size_t *free_bytes, size_t *total) {
    int dev;
    CUresult r = current_device(&dev);
    if (r)
        return r;
    uint8_t buf[8], reply[16];
    size_t reply_n = 0;
    bf_out o = {buf, 0, sizeof buf, 0};
    out_device(&o, dev);
    r = bf_call(dev, OP_MEM_GET_INFO, &o, NULL, 0, NULL, 0, reply, &reply_n);
    if (r)
        return r;
    bf_in in = {reply, reply_n, 0, 0};
    uint64_t f = in_u64(&in), t = in_u64(&in);
    if (free_bytes)
        *free_bytes = f;
    if (total)
        *total = t;
    return CUDA_SUCCESS;
}

CUresult bfpfn_cuMemGetAddressRange_v3020(CUdeviceptr_v2 *base, size_t *size, CUdeviceptr_v2 p) {
    CUresult r = ready();
    if (r)
        return r;
    bf_alloc a;
    if (!alloc_find(p, 0, &a))
        return CUDA_ERROR_NOT_FOUND;
    if (base)
        *base = a.base;
    if (size)
        *size = a.size;
    return CUDA_SUCCESS;
}

/* Host memory is this machine's: page-locked allocations are page-aligned local memory (the
   copies they feed cross the network either way). */
CUresult host_alloc(void **pp, size_t size, unsigned flags) {
    if (!pp)
        return CUDA_ERROR_INVALID_VALUE;
    int dev;
    CUresult r = current_device(&dev);
    if (r)
        return r;
    if (flags & CU_MEMHOSTALLOC_DEVICEMAP)
        return CUDA_ERROR_NOT_SUPPORTED; /* a remote GPU cannot map this machine's memory */
    void *p = NULL;
    if (posix_memalign(&p, 4096, size ? size : 1) != 0)
        return CUDA_ERROR_OUT_OF_MEMORY;
    pthread_mutex_lock(&state_lock);
    if (host_n == host_cap) {
        size_t cap = host_cap ? host_cap * 2 : 16;
        bf_host *grown = realloc(hosts, cap * sizeof *grown);
        if (!grown) {
            pthread_mutex_unlock(&state_lock);
            free(p);
            return CUDA_ERROR_OUT_OF_MEMORY;
        }
        hosts = grown;
        host_cap = cap;
    }
    hosts[host_n++] = (bf_host){p, size, flags};
    pthread_mutex_unlock(&state_lock);
    *pp = p;
    return CUDA_SUCCESS;
}

CUresult bfpfn_cuMemAllocHost_v3020(void **pp, size_t size) { return host_alloc(pp, size, 0); }
CUresult bfpfn_cuMemHostAlloc_v2020(void **pp, size_t size, unsigned int flags) {
    return host_alloc(pp, size, flags);
}

CUresult bfpfn_cuMemFreeHost_v2000(void *p) {
    CUresult r = ready();
    if (r)
        return r;
    pthread_mutex_lock(&state_lock);
    for (size_t i = 0; i < host_n; i++)
        if (hosts[i].p == p) {
            hosts[i] = hosts[--host_n];
            pthread_mutex_unlock(&state_lock);
            free(p);
            return CUDA_SUCCESS;
        }
    pthread_mutex_unlock(&state_lock);
    return CUDA_ERROR_INVALID_VALUE;
}

CUresult bfpfn_cuMemHostGetFlags_v2030(unsigned int *flags, void *p) {
    if (!flags)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = ready();
    if (r)
        return r;
    pthread_mutex_lock(&state_lock);
    bf_host *h = host_find(p);
    if (h)
        *flags = h->flags;
    pthread_mutex_unlock(&state_lock);
    return h ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

/* Registering memory would pin it for DMA; the copies read it with send() either way. */
CUresult bfpfn_cuMemHostRegister_v6050(void *p, size_t size, unsigned int flags) {
    if (!p || !size)
        return CUDA_ERROR_INVALID_VALUE;
    if (flags & CU_MEMHOSTREGISTER_DEVICEMAP)
        return CUDA_ERROR_NOT_SUPPORTED;
    return ready();
}
CUresult bfpfn_cuMemHostRegister_v4000(void *p, size_t size, unsigned int flags) {
    return bfpfn_cuMemHostRegister_v6050(p, size, flags);
}
CUresult bfpfn_cuMemHostUnregister_v4000(void *p) {
    if (!p)
        return CUDA_ERROR_INVALID_VALUE;
    return ready();
}

CUresult pointer_attribute(void *data, CUpointer_attribute attribute, CUdeviceptr_v2 p,
                                  int lenient) {
    bf_alloc a;
    int device = alloc_find(p, 0, &a);
    pthread_mutex_lock(&state_lock);
    bf_host *h = device ? NULL : host_find((const void *)(uintptr_t)p);
    bf_host host = h ? *h : (bf_host){0};
    pthread_mutex_unlock(&state_lock);
    if (!device && !h) {
        if (!lenient)
            return CUDA_ERROR_INVALID_VALUE;
        /* cuPointerGetAttributes: not a CUDA pointer, so every attribute is its "none" */
        switch (attribute) {
        case CU_POINTER_ATTRIBUTE_CONTEXT: *(CUcontext *)data = NULL; break;
        case CU_POINTER_ATTRIBUTE_MEMORY_TYPE: *(unsigned *)data = 0; break;
        case CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL: *(int *)data = -2; break;
        case CU_POINTER_ATTRIBUTE_DEVICE_POINTER:
        case CU_POINTER_ATTRIBUTE_HOST_POINTER: *(void **)data = NULL; break;
        case CU_POINTER_ATTRIBUTE_BUFFER_ID:
        case CU_POINTER_ATTRIBUTE_RANGE_START_ADDR:
        case CU_POINTER_ATTRIBUTE_RANGE_SIZE: *(unsigned long long *)data = 0; break;
        default: *(int *)data = 0; break;
        }
        return CUDA_SUCCESS;
    }
    switch (attribute) {
    case CU_POINTER_ATTRIBUTE_CONTEXT:
        *(CUcontext *)data = device ? a.ctx : current();
        return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_MEMORY_TYPE:
        *(unsigned *)data = device ? CU_MEMORYTYPE_DEVICE : CU_MEMORYTYPE_HOST;
        return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_DEVICE_POINTER:
        if (!device)
            return CUDA_ERROR_INVALID_VALUE; /* host memory is not mapped into the device */
        *(CUdeviceptr *)data = p;
        return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_HOST_POINTER:
        if (device)
            return CUDA_ERROR_INVALID_VALUE; /* device memory is not mapped into the host */
        *(void **)data = (void *)(uintptr_t)p;
        return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_BUFFER_ID:
        *(unsigned long long *)data = device ? a.base : (unsigned long long)(uintptr_t)host.p;
        return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_IS_MANAGED:
    case CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE:
    case CU_POINTER_ATTRIBUTE_IS_GPU_DIRECT_RDMA_CAPABLE:
        *(int *)data = 0;
        return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_SYNC_MEMOPS:
    case CU_POINTER_ATTRIBUTE_MAPPED:
        *(int *)data = 1;
        return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL:
        *(int *)data = device ? a.device : (current() ? current()->device : 0);
        return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_RANGE_START_ADDR:
        *(CUdeviceptr *)data = device ? a.base : (CUdeviceptr)(uintptr_t)host.p;
        return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_RANGE_SIZE:
        *(size_t *)data = device ? a.size : host.size;
        return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES:
        *(unsigned long long *)data = 0;
        return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_ACCESS_FLAGS:
        *(unsigned *)data = CU_POINTER_ATTRIBUTE_ACCESS_FLAG_READWRITE;
        return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_MEMPOOL_HANDLE:
        *(void **)data = NULL;
        return CUDA_SUCCESS;
    default:
        return CUDA_ERROR_INVALID_VALUE;
    }
}

CUresult bfpfn_cuPointerGetAttribute_v4000(void *data, CUpointer_attribute attribute,
                                           CUdeviceptr_v2 p) {
    if (!data)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = ready();
    return r ? r : pointer_attribute(data, attribute, p, 0);
}

CUresult bfpfn_cuPointerGetAttributes_v7000(unsigned int n, CUpointer_attribute *attributes,
                                            void **data, CUdeviceptr_v2 p) {
    if (!attributes || !data)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = ready();
    if (r)
        return r;
    for (unsigned i = 0; i < n; i++) {
        if (!data[i])
            return CUDA_ERROR_INVALID_VALUE;
        r = pointer_attribute(data[i], attributes[i], p, 1);
        if (r == CUDA_ERROR_INVALID_VALUE && attributes[i] <= CU_POINTER_ATTRIBUTE_MEMPOOL_HANDLE)
            *(void **)data[i] = NULL; /* an attribute this pointer has no value for */
        else if (r)
            return r;
    }
    return CUDA_SUCCESS;
}

/* -- copies and memsets --------------------------------------------------------------------- */
/* The allocation a device range lies in; the driver calls a range outside every allocation an
   invalid value, and says so at once (so does the agent, without asking the server). */
CUresult device_range(uint64_t p, uint64_t n, int *device) {
    bf_alloc a;
    if (!alloc_find(p, n, &a))
        return CUDA_ERROR_INVALID_VALUE;
    *device = a.device;
    return device_alive(a.device);
}

/* The server stream of a copy or memset on `device` (the pointer's). The NULL stream,
   CU_STREAM_LEGACY and CU_STREAM_PER_THREAD are that device's default stream, whichever context
   is current (or none): the pointer says which GPU, as unified addressing does. */
CUresult copy_stream(CUstream s, int device, uint64_t *handle) {
    if (s == NULL || s == CU_STREAM_LEGACY || s == CU_STREAM_PER_THREAD) {
        *handle = 0;
        return CUDA_SUCCESS;
    }
    int stream_device = device;
    CUresult r = resolve_stream(s, &stream_device, handle);
    if (r)
        return r;
    if (stream_device != device)
        return CUDA_ERROR_INVALID_HANDLE; /* a stream of another leased GPU */
    return CUDA_SUCCESS;
}

CUresult htod(CUdeviceptr_v2 dst, const void *src, size_t n, CUstream s) {
    CUresult r = ready();
    if (r || n == 0)
        return r;
    if (!src)
        return CUDA_ERROR_INVALID_VALUE;
    int dev;
    uint64_t stream;
    if ((r = device_range(dst, n, &dev)) || (r = copy_stream(s, dev, &stream)))
        return r;
    for (size_t done = 0; done < n;) {
        size_t piece = n - done < bf_max_payload(dev) ? n - done : (size_t)bf_max_payload(dev);
        uint8_t buf[32];
        bf_out o = {buf, 0, sizeof buf, 0};
        out_device(&o, dev);
        out_dptr(&o, dev, dst + done);
        out_u64(&o, stream);
        if ((r = bf_post(dev, OP_MEMCPY_HTOD, &o, (const char *)src + done, piece)))
            return r;
        done += piece;
    }
    return CUDA_SUCCESS;
}

CUresult dtoh(void *dst, CUdeviceptr_v2 src, size_t n, CUstream s) {
    CUresult r = ready();
    if (r || n == 0)
        return r;
    if (!dst)
        return CUDA_ERROR_INVALID_VALUE;
    int dev;
    uint64_t stream;
    if ((r = device_range(src, n, &dev)) || (r = copy_stream(s, dev, &stream)))
        return r;
    for (size_t done = 0; done < n;) {
        size_t piece = n - done < bf_max_payload(dev) ? n - done : (size_t)bf_max_payload(dev);
        uint8_t buf[32];
        bf_out o = {buf, 0, sizeof buf, 0};
        out_device(&o, dev);
        out_dptr(&o, dev, src + done);
        out_u64(&o, piece);
        out_u64(&o, stream);
        if ((r = bf_call(dev, OP_MEMCPY_DTOH, &o, NULL, 0, (char *)dst + done, piece, NULL, NULL)))
            return r;
        done += piece;
    }
    return CUDA_SUCCESS;
}

/* A copy between two leased GPUs: the bytes come to this host and go out again, in chunks of
   the smaller max_payload of the two servers (at most PEER_CHUNK), as Session.memcpy_peer does.
   Each chunk is read (a reply, so the source's earlier work has run) and then posted to the
   destination (no reply, in order on its connection). It is finished on the source when it
   returns, and on the destination as any copy from the host is. `s`, when it is a stream of one
   of the two devices, is synchronised first, so the copy comes after its earlier work. */
#define PEER_CHUNK (8u << 20)
CUresult peer_copy(CUdeviceptr_v2 dst, int ddev, CUdeviceptr_v2 src, int sdev, size_t n,
                   CUstream s) {
    if (s && s != CU_STREAM_LEGACY && s != CU_STREAM_PER_THREAD) {
        int sd;
        uint64_t handle;
        CUresult r = resolve_stream(s, &sd, &handle);
        if (r)
            return r;
        if (sd != ddev && sd != sdev)
            return CUDA_ERROR_INVALID_HANDLE;
        if ((r = device_and_handle(OP_STREAM_SYNCHRONIZE, sd, handle, 1, NULL, NULL)))
            return r; /* the stream's earlier work comes first */
    }
    size_t chunk = bf_max_payload(sdev) < bf_max_payload(ddev) ? bf_max_payload(sdev)
                                                               : bf_max_payload(ddev);
    if (chunk > PEER_CHUNK)
        chunk = PEER_CHUNK;
    if (chunk > n)
        chunk = n;
    void *bounce = malloc(chunk);
    if (!bounce)
        return CUDA_ERROR_OUT_OF_MEMORY;
    CUresult r = CUDA_SUCCESS;
    for (size_t done = 0; done < n && r == CUDA_SUCCESS; done += chunk) {
        size_t piece = n - done < chunk ? n - done : chunk;
        r = dtoh(bounce, src + done, piece, NULL);
        if (r == CUDA_SUCCESS)
            r = htod(dst + done, bounce, piece, NULL);
    }
    free(bounce);
    return r;
}

CUresult dtod(CUdeviceptr_v2 dst, CUdeviceptr_v2 src, size_t n, CUstream s) {
    CUresult r = ready();
    if (r || n == 0)
        return r;
    int ddev, sdev;
    uint64_t stream;
    if ((r = device_range(dst, n, &ddev)) || (r = device_range(src, n, &sdev)))
        return r;
    if (ddev != sdev) /* two leased GPUs, on one server or on two: through this host */
        return peer_copy(dst, ddev, src, sdev, n, s);
    if ((r = copy_stream(s, ddev, &stream)))
        return r;
    uint8_t buf[40];
    bf_out o = {buf, 0, sizeof buf, 0};
    out_device(&o, ddev);
    out_dptr(&o, ddev, dst);
    out_dptr(&o, ddev, src);
    out_u64(&o, n);
    out_u64(&o, stream);
    return bf_post(ddev, OP_MEMCPY_DTOD, &o, NULL, 0);
}

CUresult bfpfn_cuMemcpyHtoD_v3020(CUdeviceptr_v2 dst, const void *src, size_t n) {
    return htod(dst, src, n, NULL);
}
CUresult bfpfn_cuMemcpyDtoH_v3020(void *dst, CUdeviceptr_v2 src, size_t n) {
    return dtoh(dst, src, n, NULL);
}
CUresult bfpfn_cuMemcpyDtoD_v3020(CUdeviceptr_v2 dst, CUdeviceptr_v2 src, size_t n) {
    return dtod(dst, src, n, NULL);
}
CUresult bfpfn_cuMemcpyHtoDAsync_v3020(CUdeviceptr_v2 dst, const void *src, size_t n, CUstream s) {
    return htod(dst, src, n, s);
}
CUresult bfpfn_cuMemcpyDtoHAsync_v3020(void *dst, CUdeviceptr_v2 src, size_t n, CUstream s) {
    return dtoh(dst, src, n, s); /* finished on return: an asynchronous copy may finish early */
}
CUresult bfpfn_cuMemcpyDtoDAsync_v3020(CUdeviceptr_v2 dst, CUdeviceptr_v2 src, size_t n,
                                       CUstream s) {
    return dtod(dst, src, n, s);
}

/* cuMemcpy with unified addressing: the allocation table says which side each pointer is on
   (the server's addresses lie at 2^57 and up, where no host address is). */
CUresult unified_copy(CUdeviceptr_v2 dst, CUdeviceptr_v2 src, size_t n, CUstream s) {
    CUresult r = ready();
    if (r || n == 0)
        return r;
    bf_alloc a;
    int dst_dev = alloc_find(dst, 0, &a), src_dev = alloc_find(src, 0, &a);
    if (dst_dev && src_dev)
        return dtod(dst, src, n, s);
    if (dst_dev)
        return htod(dst, (const void *)(uintptr_t)src, n, s);
    if (src_dev)
        return dtoh((void *)(uintptr_t)dst, src, n, s);
    if (s && s != CU_STREAM_LEGACY && s != CU_STREAM_PER_THREAD) {
        uint64_t handle;
        int dev;
        if ((r = resolve_stream(s, &dev, &handle)))
            return r;
    }
    memmove((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, n); /* host to host */
    return CUDA_SUCCESS;
}

/* cuMemcpyPeer: the contexts name the devices, the allocation table must agree. */
CUresult bfpfn_cuMemcpyPeerAsync_v4000(CUdeviceptr_v2 dst, CUcontext dst_ctx, CUdeviceptr_v2 src,
                                       CUcontext src_ctx, size_t n, CUstream s) {
    CUresult r = ready();
    if (r)
        return r;
    if (!live_ctx(dst_ctx) || !live_ctx(src_ctx))
        return CUDA_ERROR_INVALID_CONTEXT;
    if (n == 0)
        return CUDA_SUCCESS;
    int ddev, sdev;
    if ((r = device_range(dst, n, &ddev)) || (r = device_range(src, n, &sdev)))
        return r;
    if (ddev != dst_ctx->device || sdev != src_ctx->device)
        return CUDA_ERROR_INVALID_VALUE;
    return dtod(dst, src, n, s);
}

CUresult bfpfn_cuMemcpyPeer_v4000(CUdeviceptr_v2 dst, CUcontext dst_ctx, CUdeviceptr_v2 src,
                                  CUcontext src_ctx, size_t n) {
    return bfpfn_cuMemcpyPeerAsync_v4000(dst, dst_ctx, src, src_ctx, n, NULL);
}

CUresult bfpfn_cuMemcpy_v4000(CUdeviceptr_v2 dst, CUdeviceptr_v2 src, size_t n) {
    return unified_copy(dst, src, n, NULL);
}
CUresult bfpfn_cuMemcpyAsync_v4000(CUdeviceptr_v2 dst, CUdeviceptr_v2 src, size_t n, CUstream s) {
    return unified_copy(dst, src, n, s);
}

CUresult memset_items(CUdeviceptr_v2 p, unsigned value, size_t count, int itemsize,
                             CUstream s) {
    CUresult r = ready();
    if (r || count == 0)
        return r;
    if (p % (uint64_t)itemsize)
        return CUDA_ERROR_INVALID_VALUE;
    int dev;
    uint64_t stream;
    if ((r = device_range(p, (uint64_t)count * (uint64_t)itemsize, &dev)) ||
        (r = copy_stream(s, dev, &stream)))
        return r;
    uint8_t buf[40];
    bf_out o = {buf, 0, sizeof buf, 0};
    out_device(&o, dev);
    out_u8(&o, (uint8_t)itemsize);
    out_u32(&o, value);
    out_dptr(&o, dev, p);
    out_u64(&o, count);
    out_u64(&o, stream);
    return bf_post(dev, OP_MEMSET, &o, NULL, 0);
}

CUresult bfpfn_cuMemsetD8_v3020(CUdeviceptr_v2 p, unsigned char v, size_t n) {
    return memset_items(p, v, n, 1, NULL);
}
CUresult bfpfn_cuMemsetD16_v3020(CUdeviceptr_v2 p, unsigned short v, size_t n) {
    return memset_items(p, v, n, 2, NULL);
}
CUresult bfpfn_cuMemsetD32_v3020(CUdeviceptr_v2 p, unsigned int v, size_t n) {
    return memset_items(p, v, n, 4, NULL);
}
CUresult bfpfn_cuMemsetD8Async_v3020(CUdeviceptr_v2 p, unsigned char v, size_t n, CUstream s) {
    return memset_items(p, v, n, 1, s);
}
CUresult bfpfn_cuMemsetD16Async_v3020(CUdeviceptr_v2 p, unsigned short v, size_t n, CUstream s) {
    return memset_items(p, v, n, 2, s);
}
CUresult bfpfn_cuMemsetD32Async_v3020(CUdeviceptr_v2 p, unsigned int v, size_t n, CUstream s) {
    return memset_items(p, v, n, 4, s);
}
