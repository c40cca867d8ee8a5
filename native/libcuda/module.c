/* Modules, libraries, kernels and launches (PROTOCOL.md section 6.2, section 7). */
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

/* -- modules and kernels -------------------------------------------------------------------- */

/* Send a module's image to the server (the lock-free part of loading). */
CUresult send_module(struct CUmod_st *m, const void *image, size_t size, int is_ptx) {
    CUresult r = device_alive(m->device);
    if (r)
        return r;
    if (size > bf_max_payload(m->device)) {
        bf_log(1, "a module image of %zu bytes is larger than the server's max_payload (%llu): "
                  "it cannot be loaded", size, (unsigned long long)bf_max_payload(m->device));
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    uint8_t buf[8], reply[16];
    size_t reply_n = 0;
    bf_out o = {buf, 0, sizeof buf, 0};
    out_device(&o, m->device);
    r = bf_call(m->device, OP_MODULE_LOAD, &o, image, size, NULL, 0, reply, &reply_n);
    if (r) {
        bf_log(1, "cuModuleLoadData: the server cannot load the module (%s): %s",
               bf_s.grants[m->device].executor, bf_last_error_text());
        return r;
    }
    bf_in in = {reply, reply_n, 0, 0};
    m->handle = in_u64(&in);
    if (!m->kernels) /* read while the image is at hand: the driver does not keep it */
        m->kernels = bf_image_kernels(image, size, is_ptx);
    return CUDA_SUCCESS;
}

/* A module object for `image` on `dev`; `lazy` keeps a copy of the image and sends it when a
   kernel of it is first asked for (cuLibraryLoadData: a library belongs to no context, and
   cudart loads every program's kernels that way at start, used or not). */
CUresult new_module(CUmodule *pmod, const void *image, int dev, int lazy) {
    if (!pmod || !image)
        return CUDA_ERROR_INVALID_VALUE;
    struct CUmod_st *m = new_handle(KIND_MODULE, sizeof *m);
    if (!m)
        return CUDA_ERROR_OUT_OF_MEMORY;
    *m = (struct CUmod_st){.magic = MAGIC_MODULE, .device = dev};
    if (strncmp(image, BUILTIN_IMAGE, sizeof BUILTIN_IMAGE) == 0) {
        *pmod = m; /* the built-in library is module 0, always loaded */
        return CUDA_SUCCESS;
    }
    size_t size = 0;
    int is_ptx = 0;
    image = bf_image(image, &size, &is_ptx);
    if (size == 0) {
        bury(KIND_MODULE, m);
        return CUDA_ERROR_INVALID_IMAGE;
    }
    CUresult r = CUDA_SUCCESS;
    Dl_info where;
    if (lazy && dladdr(image, &where) && where.dli_fname) {
        /* static data of a loaded program or library (cudart's fatbins): it stays as long as
           the library that registered it, so it is read when needed, not copied (PyTorch
           registers hundreds of megabytes of them) */
        m->pending = (uint8_t *)image;
        m->pending_n = size;
        m->pending_ptx = is_ptx;
    } else if (lazy) {
        m->pending = malloc(size);
        if (!m->pending) {
            bury(KIND_MODULE, m);
            return CUDA_ERROR_OUT_OF_MEMORY;
        }
        memcpy(m->pending, image, size);
        m->pending_n = size;
        m->pending_ptx = is_ptx;
        m->pending_owned = 1;
    } else {
        r = send_module(m, image, size, is_ptx);
    }
    if (r) {
        bury(KIND_MODULE, m);
        return r;
    }
    *pmod = m;
    return CUDA_SUCCESS;
}

/* A lazily loaded module reaches the server: on the current context's device, else device 0. */
CUresult ensure_loaded(struct CUmod_st *m) {
    if (!m->pending)
        return CUDA_SUCCESS;
    int dev;
    if (current_device(&dev) == CUDA_SUCCESS)
        m->device = dev;
    CUresult r = send_module(m, m->pending, m->pending_n, m->pending_ptx);
    if (r == CUDA_SUCCESS) {
        if (m->pending_owned)
            free(m->pending);
        m->pending = NULL;
    }
    return r;
}

CUresult bf_module_load(CUmodule *pmod, const void *image) {
    int dev;
    CUresult r = current_device(&dev);
    return r ? r : new_module(pmod, image, dev, 0);
}

CUresult bfpfn_cuModuleLoadData_v2000(CUmodule *pmod, const void *image) {
    return bf_module_load(pmod, image);
}

CUresult bfpfn_cuModuleLoadDataEx_v2010(CUmodule *pmod, const void *image, unsigned int n,
                                        CUjit_option *options, void **values) {
    (void)n, (void)options, (void)values; /* JIT options are the server driver's business */
    return bf_module_load(pmod, image);
}

CUresult bfpfn_cuModuleLoadFatBinary_v2000(CUmodule *pmod, const void *image) {
    return bf_module_load(pmod, image);
}

CUresult bfpfn_cuModuleLoad_v2000(CUmodule *pmod, const char *path) {
    if (!pmod || !path)
        return CUDA_ERROR_INVALID_VALUE;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return CUDA_ERROR_FILE_NOT_FOUND;
    struct stat st;
    char *data = NULL;
    CUresult r = CUDA_ERROR_FILE_NOT_FOUND;
    if (fstat(fd, &st) == 0 && (data = calloc(1, (size_t)st.st_size + 1)) != NULL) {
        size_t got = 0;
        while (got < (size_t)st.st_size) {
            ssize_t n = read(fd, data + got, (size_t)st.st_size - got);
            if (n <= 0)
                break;
            got += (size_t)n;
        }
        r = got == (size_t)st.st_size ? bf_module_load(pmod, data) : CUDA_ERROR_FILE_NOT_FOUND;
    }
    close(fd);
    free(data);
    return r;
}

CUresult bfpfn_cuModuleUnload_v2000(CUmodule m) {
    CUresult r = ready();
    if (r)
        return r;
    if (!m || m->magic != MAGIC_MODULE)
        return CUDA_ERROR_INVALID_HANDLE;
    free_owned_by(NULL, m); /* its globals leave the allocation table */
    free(m->kernels);
    int never_sent = m->pending != NULL;
    if (m->pending_owned)
        free(m->pending);
    for (struct CUfunc_st *f = m->functions, *next; f; f = next) {
        next = f->next;
        bury(KIND_FUNC, f);
    }
    int device = m->device;
    uint64_t handle = m->handle;
    bury(KIND_MODULE, m);
    if (handle == 0 || never_sent)
        return CUDA_SUCCESS; /* the built-ins stay loaded; a lazy library was never sent */
    return device_and_handle(OP_MODULE_UNLOAD, device, handle, 0, NULL, NULL);
}

CUresult bfpfn_cuModuleGetFunction_v2000(CUfunction *pf, CUmodule m, const char *name) {
    if (!pf || !name)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = ready();
    if (r)
        return r;
    if (!m || m->magic != MAGIC_MODULE)
        return CUDA_ERROR_INVALID_HANDLE;
    if ((r = ensure_loaded(m)))
        return r;
    char types[1024] = "";
    if (m->handle) {
        int found = m->kernels ? bf_kernel_arg_types(m->kernels, name, types, sizeof types) : -3;
        if (found == -1)
            return CUDA_ERROR_NOT_FOUND;
        if (found < 0) {
            bf_log(1, "cuModuleGetFunction(%s): %s", name,
                   found == -2 ? "a parameter of it has no protocol argument code (a struct "
                                 "passed by value)"
                               : "the agent found no kernel parameters it can read in this "
                                 "module's image (PTX, cubins, or a fatbin's uncompressed ones)");
            return CUDA_ERROR_NOT_SUPPORTED;
        }
    }
    struct CUfunc_st *f = new_handle(KIND_FUNC, sizeof *f);
    if (!f)
        return CUDA_ERROR_OUT_OF_MEMORY;
    uint8_t buf[2048 + sizeof types], reply[16 + sizeof types];
    size_t reply_n = 0;
    bf_out o = {buf, 0, sizeof buf, 0}; /* a longer name overflows it: INVALID_VALUE */
    out_device(&o, m->device);
    out_u64(&o, m->handle);
    out_bytes(&o, name, strlen(name));
    out_bytes(&o, types, strlen(types));
    r = bf_call(m->device, OP_GET_FUNCTION, &o, NULL, 0, NULL, 0, reply, &reply_n);
    if (r == CUDA_SUCCESS) {
        bf_in in = {reply, reply_n, 0, 0};
        f->handle = in_u64(&in);
        uint32_t n;
        const uint8_t *t = in_bytes(&in, &n);
        if (in.bad || n >= sizeof f->arg_types || strspn((const char *)t, ARG_CODES) < n)
            r = CUDA_ERROR_UNKNOWN;
        else
            memcpy(f->arg_types, t, n);
    }
    if (r) {
        bury(KIND_FUNC, f);
        return r;
    }
    f->magic = MAGIC_FUNC;
    f->device = m->device;
    f->module = m;
    pthread_mutex_lock(&state_lock);
    f->next = m->functions;
    m->functions = f;
    pthread_mutex_unlock(&state_lock);
    snprintf(f->name, sizeof f->name, "%s", name);
    *pf = f;
    return CUDA_SUCCESS;
}

CUresult bfpfn_cuModuleGetGlobal_v3020(CUdeviceptr_v2 *dptr, size_t *bytes, CUmodule m,
                                       const char *name) {
    if (!name)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = ready();
    if (r)
        return r;
    if (!m || m->magic != MAGIC_MODULE)
        return CUDA_ERROR_INVALID_HANDLE;
    if ((r = ensure_loaded(m)))
        return r;
    uint8_t buf[2048], reply[32];
    size_t reply_n = 0;
    bf_out o = {buf, 0, sizeof buf, 0};
    out_device(&o, m->device);
    out_u64(&o, m->handle);
    out_bytes(&o, name, strlen(name));
    r = bf_call(m->device, OP_MODULE_GET_GLOBAL, &o, NULL, 0, NULL, 0, reply, &reply_n);
    if (r)
        return r;
    bf_in in = {reply, reply_n, 0, 0};
    uint64_t raw = in_u64(&in), size = in_u64(&in), ptr;
    if (bf_from_server(m->device, raw, &ptr) < 0) {
        bf_log(1, "cuModuleGetGlobal(%s): the server %s placed it at an address the agent cannot "
                  "tell from another server's", name, bf_server_address(m->device));
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    bf_alloc known;
    if (!alloc_find(ptr, size, &known))
        alloc_add(ptr, size, m->device, NULL, m);
    if (dptr)
        *dptr = ptr;
    if (bytes)
        *bytes = size;
    return CUDA_SUCCESS;
}

CUresult bfpfn_cuModuleGetLoadingMode_v11070(CUmoduleLoadingMode *mode) {
    if (!mode)
        return CUDA_ERROR_INVALID_VALUE;
    *mode = CU_MODULE_EAGER_LOADING; /* a module is on the server once cuModuleLoad returns */
    return CUDA_SUCCESS;
}

CUresult live_function(CUfunction f) {
    CUresult r = ready();
    if (r)
        return r;
    if (!f || f->magic != MAGIC_FUNC)
        return CUDA_ERROR_INVALID_HANDLE;
    return device_alive(f->device);
}

/* Parameter i's offset and size as the compiler lays them out in the kernel's parameter buffer
   (each at its natural alignment). */
size_t param_layout(const char *types, size_t index, size_t *size) {
    size_t offset = 0;
    for (size_t i = 0; types[i]; i++) {
        size_t s = arg_size(types[i]);
        offset = (offset + s - 1) / s * s;
        if (i == index) {
            *size = s;
            return offset;
        }
        offset += s;
    }
    *size = 0;
    return offset;
}

CUresult bfpfn_cuFuncGetParamInfo_v12040(CUfunction f, size_t index, size_t *offset,
                                         size_t *size) {
    CUresult r = live_function(f);
    if (r)
        return r;
    if (index >= strlen(f->arg_types))
        return CUDA_ERROR_INVALID_VALUE;
    size_t s;
    size_t o = param_layout(f->arg_types, index, &s);
    if (offset)
        *offset = o;
    if (size)
        *size = s;
    return CUDA_SUCCESS;
}

/* A 64-bit argument of a launch on a lease over several servers (an address, or a number that
   may look like one: cubins give sizes only): an address in this server's window is moved back
   to the server's own (wire.c); one in an allocation of another server's device is refused, as
   GPUs of different servers cannot reach each other's memory (a real GPU would fault on it; the
   other server would take it for an address of its own). */
static CUresult launch_address(CUfunction f, int dev, size_t index, uint8_t *arg) {
    uint64_t v;
    memcpy(&v, arg, 8);
    bf_alloc a;
    if (alloc_find(v, 0, &a) && bf_server_of(a.device) != bf_server_of(dev)) {
        bf_log(1, "cuLaunchKernel(%s) on device %d: argument %zu is an address on device %d, "
                  "which is on another server: it cannot be reached from this one (copy the "
                  "data with cuMemcpyPeer)", f->name, dev, index, a.device);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (bf_address_server(v) == bf_server_of(dev)) {
        v = bf_to_server(dev, v);
        memcpy(arg, &v, 8);
    }
    return CUDA_SUCCESS;
}

CUresult bfpfn_cuLaunchKernel_v4000(CUfunction f, unsigned int gx, unsigned int gy,
                                    unsigned int gz, unsigned int bx, unsigned int by,
                                    unsigned int bz, unsigned int shared, CUstream s,
                                    void **params, void **extra) {
    CUresult r = live_function(f);
    if (r)
        return r;
    int dev;
    uint64_t stream;
    if ((r = resolve_stream(s, &dev, &stream)))
        return r;
    if (dev != f->device)
        return CUDA_ERROR_INVALID_HANDLE;
    if (!gx || !gy || !gz || !bx || !by || !bz)
        return CUDA_ERROR_INVALID_VALUE;
    size_t count = strlen(f->arg_types), packed = 0;
    for (size_t i = 0; i < count; i++)
        packed += arg_size(f->arg_types[i]);
    uint8_t args[8 * 1024];
    const uint8_t *buffer = NULL;
    size_t buffer_n = 0;
    if (params && extra)
        return CUDA_ERROR_INVALID_VALUE; /* one or the other, as the driver says */
    if (extra) {
        for (size_t i = 0; extra[i] != CU_LAUNCH_PARAM_END; i += 2) {
            if (extra[i] == CU_LAUNCH_PARAM_BUFFER_POINTER)
                buffer = extra[i + 1];
            else if (extra[i] == CU_LAUNCH_PARAM_BUFFER_SIZE)
                buffer_n = *(size_t *)extra[i + 1];
            else
                return CUDA_ERROR_INVALID_VALUE;
        }
        size_t last = 0;
        size_t end = count ? param_layout(f->arg_types, count - 1, &last) + last : 0;
        if (count && (!buffer || buffer_n < end))
            return CUDA_ERROR_INVALID_VALUE;
    } else if (count && !params) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    size_t at = 0;
    for (size_t i = 0; i < count; i++) { /* unpadded, in order (PROTOCOL.md section 7) */
        size_t size;
        size_t offset = param_layout(f->arg_types, i, &size);
        if (at + size > sizeof args)
            return CUDA_ERROR_INVALID_VALUE;
        memcpy(args + at, extra ? buffer + offset : params[i], size);
        if (size == 8 && f->arg_types[i] != 'd' && bf_s.conn_count > 1 &&
            (r = launch_address(f, dev, i, args + at)))
            return r;
        at += size;
    }
    uint8_t buf[64 + sizeof args];
    bf_out o = {buf, 0, sizeof buf, 0};
    out_device(&o, dev);
    out_u64(&o, f->handle);
    out_u32(&o, gx), out_u32(&o, gy), out_u32(&o, gz);
    out_u32(&o, bx), out_u32(&o, by), out_u32(&o, bz);
    out_u32(&o, shared);
    out_u64(&o, stream);
    out_bytes(&o, args, packed);
    return bf_post(dev, OP_LAUNCH, &o, NULL, 0);
}

CUresult bfpfn_cuFuncGetAttribute_v2020(int *value, CUfunction_attribute attrib, CUfunction f) {
    if (!value)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = live_function(f);
    if (r)
        return r;
    switch (attrib) { /* what the server does not report, the device's limits say */
    case CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK:
        *value = attribute(f->device, CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK);
        return CUDA_SUCCESS;
    case CU_FUNC_ATTRIBUTE_PTX_VERSION:
    case CU_FUNC_ATTRIBUTE_BINARY_VERSION:
        *value = attribute(f->device, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR) * 10 +
                 attribute(f->device, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR);
        return CUDA_SUCCESS;
    default:
        return CUDA_ERROR_NOT_SUPPORTED;
    }
}

CUresult bfpfn_cuFuncSetCacheConfig_v3000(CUfunction f, CUfunc_cache config) {
    (void)config; /* a preference the driver too may ignore */
    return live_function(f);
}

/* -- libraries (CUDA 12's context-independent modules) -------------------------------------- */
/* A library is a module, sent to the server when a kernel or global of it is first asked for
   (CUDA's lazy loading), on the device current then; a kernel is its function: the handles are
   the same objects (so a CUkernel passed to cuLaunchKernel, as CUDA 12 allows, launches). */
CUresult bfpfn_cuLibraryLoadData_v12000(CUlibrary *lib, const void *code, CUjit_option *jit,
                                        void **jit_values, unsigned int jit_n,
                                        CUlibraryOption *options, void **option_values,
                                        unsigned int option_n) {
    (void)jit, (void)jit_values, (void)jit_n, (void)options, (void)option_values, (void)option_n;
    if (!lib)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = ready();
    if (r)
        return r;
    int dev = 0;
    if (current_device(&dev) != CUDA_SUCCESS)
        dev = 0;
    CUmodule m;
    r = new_module(&m, code, dev, 1);
    if (r == CUDA_SUCCESS)
        *lib = (CUlibrary)m;
    return r;
}

CUresult bfpfn_cuLibraryUnload_v12000(CUlibrary lib) {
    return bfpfn_cuModuleUnload_v2000((CUmodule)lib);
}

CUresult bfpfn_cuLibraryGetModule_v12000(CUmodule *pmod, CUlibrary lib) {
    if (!pmod)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = ready();
    if (r)
        return r;
    CUmodule m = (CUmodule)lib;
    if (!m || m->magic != MAGIC_MODULE)
        return CUDA_ERROR_INVALID_HANDLE;
    *pmod = m;
    return CUDA_SUCCESS;
}

CUresult bfpfn_cuLibraryGetKernel_v12000(CUkernel *kernel, CUlibrary lib, const char *name) {
    if (!kernel)
        return CUDA_ERROR_INVALID_VALUE;
    CUfunction f;
    CUresult r = bfpfn_cuModuleGetFunction_v2000(&f, (CUmodule)lib, name);
    if (r == CUDA_SUCCESS)
        *kernel = (CUkernel)f;
    return r;
}

CUresult bfpfn_cuKernelGetFunction_v12000(CUfunction *pf, CUkernel kernel) {
    if (!pf)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = live_function((CUfunction)kernel);
    if (r == CUDA_SUCCESS)
        *pf = (CUfunction)kernel;
    return r;
}

CUresult bfpfn_cuKernelGetLibrary_v12050(CUlibrary *lib, CUkernel kernel) {
    if (!lib)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = live_function((CUfunction)kernel);
    if (r == CUDA_SUCCESS)
        *lib = (CUlibrary)((CUfunction)kernel)->module;
    return r;
}

CUresult bfpfn_cuKernelGetName_v12030(const char **name, CUkernel kernel) {
    if (!name)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = live_function((CUfunction)kernel);
    if (r == CUDA_SUCCESS)
        *name = ((CUfunction)kernel)->name;
    return r;
}

CUresult bfpfn_cuKernelGetParamInfo_v12040(CUkernel kernel, size_t index, size_t *offset,
                                           size_t *size) {
    return bfpfn_cuFuncGetParamInfo_v12040((CUfunction)kernel, index, offset, size);
}

CUresult bfpfn_cuLibraryGetGlobal_v12000(CUdeviceptr *dptr, size_t *bytes, CUlibrary lib,
                                         const char *name) {
    return bfpfn_cuModuleGetGlobal_v3020(dptr, bytes, (CUmodule)lib, name);
}

CUresult bfpfn_cuFuncGetName_v12030(const char **name, CUfunction f) {
    return bfpfn_cuKernelGetName_v12030(name, (CUkernel)f);
}


/* cuLaunchKernelEx: a cuLaunchKernel, for the attributes that change nothing on a server that
   runs one kernel at a time; others are not forwarded. */
CUresult bfpfn_cuLaunchKernelEx_v11060(const CUlaunchConfig *config, CUfunction f, void **params,
                                       void **extra) {
    if (!config)
        return CUDA_ERROR_INVALID_VALUE;
    for (unsigned i = 0; i < config->numAttrs; i++) {
        CUlaunchAttributeID id = config->attrs[i].id;
        if (id != CU_LAUNCH_ATTRIBUTE_IGNORE && id != CU_LAUNCH_ATTRIBUTE_PRIORITY &&
            id != CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION &&
            id != CU_LAUNCH_ATTRIBUTE_ACCESS_POLICY_WINDOW)
            return bf_not_forwarded("cuLaunchKernelEx with this launch attribute", (int)id, "");
    }
    return bfpfn_cuLaunchKernel_v4000(f, config->gridDimX, config->gridDimY, config->gridDimZ,
                                      config->blockDimX, config->blockDimY, config->blockDimZ,
                                      config->sharedMemBytes, config->hStream, params, extra);
}
