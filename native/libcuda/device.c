/* cuInit, the driver version, error names, and the devices of the lease (their names, memory
 * and attributes, from the grants and one DEVICE_ATTRIBUTES per device). */
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

/* -- init, version, errors ------------------------------------------------------------------ */
CUresult bfpfn_cuInit_v2000(unsigned int flags) {
    if (flags != 0)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = bf_connect();
    if (r == CUDA_SUCCESS) {
        pthread_mutex_lock(&state_lock);
        if (!initialized) {
            for (int d = 0; d < BF_MAX_DEVICES; d++)
                primary[d] = (struct CUctx_st){.magic = MAGIC_CTX, .device = d, .primary = 1,
                                               .id = next_ctx_id++};
            initialized = 1;
        }
        pthread_mutex_unlock(&state_lock);
    }
    return r;
}

CUresult bfpfn_cuDriverGetVersion_v2020(int *version) {
    if (!version)
        return CUDA_ERROR_INVALID_VALUE;
    *version = CUDA_VERSION; /* the toolkit the agent was built with: cudart wants >= its own */
    return CUDA_SUCCESS;
}

CUresult bfpfn_cuGetErrorName_v6000(CUresult error, const char **name) {
    if (!name)
        return CUDA_ERROR_INVALID_VALUE;
    for (int i = 0; i < bf_error_name_count; i++)
        if (bf_error_names[i].code == (int)error) {
            *name = bf_error_names[i].name;
            return CUDA_SUCCESS;
        }
    *name = NULL;
    return CUDA_ERROR_INVALID_VALUE;
}

CUresult bfpfn_cuGetErrorString_v6000(CUresult error, const char **text) {
    if (!text)
        return CUDA_ERROR_INVALID_VALUE;
    for (int i = 0; i < bf_error_name_count; i++)
        if (bf_error_names[i].code == (int)error) {
            *text = bf_error_names[i].text;
            return CUDA_SUCCESS;
        }
    *text = NULL;
    return CUDA_ERROR_INVALID_VALUE;
}

/* -- devices -------------------------------------------------------------------------------- */
CUresult bfpfn_cuDeviceGetCount_v2000(int *count) {
    if (!count)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = ready();
    if (r)
        return r;
    *count = bf_s.device_count;
    return CUDA_SUCCESS;
}

CUresult bfpfn_cuDeviceGet_v2000(CUdevice_v1 *device, int ordinal) {
    if (!device)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = valid_device(ordinal);
    if (r)
        return r;
    *device = ordinal;
    return CUDA_SUCCESS;
}

CUresult bfpfn_cuDeviceGetName_v2000(char *name, int len, CUdevice_v1 dev) {
    if (!name || len <= 0)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = valid_device(dev);
    if (r)
        return r;
    snprintf(name, (size_t)len, "%s", bf_s.grants[dev].name);
    return CUDA_SUCCESS;
}

CUresult bfpfn_cuDeviceTotalMem_v3020(size_t *bytes, CUdevice_v1 dev) {
    if (!bytes)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = valid_device(dev);
    if (r)
        return r;
    *bytes = bf_s.grants[dev].memory_limit; /* the lease's memory is the device the program has */
    return CUDA_SUCCESS;
}

/* The attributes, fetched from the server once per device (they never change). */
CUresult load_attributes(int dev) {
    bf_grant *g = &bf_s.grants[dev];
    if (g->attributes_known)
        return CUDA_SUCCESS;
    uint8_t buf[8];
    uint8_t *reply = malloc(BF_MAX_METADATA);
    size_t reply_n = 0;
    if (!reply)
        return CUDA_ERROR_OUT_OF_MEMORY;
    bf_out o = {buf, 0, sizeof buf, 0};
    out_device(&o, dev);
    CUresult r = bf_call(dev, OP_DEVICE_ATTRIBUTES, &o, NULL, 0, NULL, 0, reply, &reply_n);
    pthread_mutex_lock(&state_lock); /* two threads may have asked: one fills the table */
    if (r == CUDA_SUCCESS && !g->attributes_known) {
        bf_in in = {reply, reply_n, 0, 0};
        uint32_t n;
        const uint8_t *records = in_bytes(&in, &n);
        int count = (int)(sizeof g->attributes / sizeof g->attributes[0]);
        for (int i = 0; i < count; i++)
            g->attributes[i] = 0; /* what the driver reports for a feature a device lacks */
        for (uint32_t at = 0; records && at + 8 <= n; at += 8) {
            uint32_t attribute;
            int32_t value;
            memcpy(&attribute, records + at, 4);
            memcpy(&value, records + at + 4, 4);
            if (attribute < (uint32_t)count)
                g->attributes[attribute] = value;
        }
        /* GPUs of different servers may sit at the same PCI address on their own hosts: the
           k-th server's (from 0) are moved to PCI domain + 0x10000 * k, so no two leased GPUs
           share a bus id (cuDeviceGetByPCIBusId, cudart's device table) */
        g->attributes[CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID] += 0x10000 * bf_server_of(dev);
        g->attributes_known = 1;
    }
    pthread_mutex_unlock(&state_lock);
    free(reply);
    return r;
}

int attribute(int dev, int which) {
    return load_attributes(dev) == CUDA_SUCCESS ? bf_s.grants[dev].attributes[which] : 0;
}

CUresult bfpfn_cuDeviceGetAttribute_v2000(int *value, CUdevice_attribute attrib, CUdevice_v1 dev) {
    if (!value)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = valid_device(dev);
    if (r)
        return r;
    if ((int)attrib <= 0 || attrib >= CU_DEVICE_ATTRIBUTE_MAX ||
        (size_t)attrib >= sizeof bf_s.grants[0].attributes / sizeof(int))
        return CUDA_ERROR_INVALID_VALUE;
    r = load_attributes(dev);
    if (r)
        return r;
    *value = bf_s.grants[dev].attributes[attrib];
    return CUDA_SUCCESS;
}

CUresult bfpfn_cuDeviceComputeCapability_v2000(int *major, int *minor, CUdevice_v1 dev) {
    if (!major || !minor)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = valid_device(dev);
    if (r)
        return r;
    *major = attribute(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR);
    *minor = attribute(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR);
    return CUDA_SUCCESS;
}

CUresult bfpfn_cuDeviceGetProperties_v2000(CUdevprop_v1 *p, CUdevice_v1 dev) {
    if (!p)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = valid_device(dev);
    if (r)
        return r;
    p->maxThreadsPerBlock = attribute(dev, CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK);
    for (int i = 0; i < 3; i++) {
        p->maxThreadsDim[i] = attribute(dev, CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X + i);
        p->maxGridSize[i] = attribute(dev, CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X + i);
    }
    p->sharedMemPerBlock = attribute(dev, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK);
    p->totalConstantMemory = attribute(dev, CU_DEVICE_ATTRIBUTE_TOTAL_CONSTANT_MEMORY);
    p->SIMDWidth = attribute(dev, CU_DEVICE_ATTRIBUTE_WARP_SIZE);
    p->memPitch = attribute(dev, CU_DEVICE_ATTRIBUTE_MAX_PITCH);
    p->regsPerBlock = attribute(dev, CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK);
    p->clockRate = attribute(dev, CU_DEVICE_ATTRIBUTE_CLOCK_RATE);
    p->textureAlign = attribute(dev, CU_DEVICE_ATTRIBUTE_TEXTURE_ALIGNMENT);
    return CUDA_SUCCESS;
}

/* A stable UUID per leased GPU: its server's instance id and GPU number, hashed (FNV-1a). The
   server has no UUID query; this one is the same for every call and process of the lease, and
   differs between the GPUs of different servers. */
void device_uuid(int dev, CUuuid *uuid) {
    uint64_t h[2] = {0xcbf29ce484222325ull, 0x84222325cbf29ce4ull};
    for (int k = 0; k < 2; k++) {
        for (const char *p = bf_server_id(dev); *p; p++)
            h[k] = (h[k] ^ (uint8_t)*p) * 0x100000001b3ull;
        h[k] = (h[k] ^ bf_s.grants[dev].server_gpu ^ (uint64_t)k << 32) * 0x100000001b3ull;
    }
    memcpy(uuid->bytes, h, 16);
}

CUresult bfpfn_cuDeviceGetUuid_v9020(CUuuid *uuid, CUdevice_v1 dev) {
    if (!uuid)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = valid_device(dev);
    if (r)
        return r;
    device_uuid(dev, uuid);
    return CUDA_SUCCESS;
}

CUresult bfpfn_cuDeviceGetUuid_v11040(CUuuid *uuid, CUdevice_v1 dev) {
    return bfpfn_cuDeviceGetUuid_v9020(uuid, dev);
}

CUresult bfpfn_cuDeviceGetPCIBusId_v4010(char *bus, int len, CUdevice_v1 dev) {
    if (!bus || len <= 0)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = valid_device(dev);
    if (r)
        return r;
    snprintf(bus, (size_t)len, "%08x:%02x:%02x.0", attribute(dev, CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID),
             attribute(dev, CU_DEVICE_ATTRIBUTE_PCI_BUS_ID),
             attribute(dev, CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID));
    return CUDA_SUCCESS;
}

CUresult bfpfn_cuDeviceGetByPCIBusId_v4010(CUdevice_v1 *dev, const char *bus) {
    if (!dev || !bus)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = ready();
    if (r)
        return r;
    for (int d = 0; d < bf_s.device_count; d++) {
        char mine[32];
        if (bfpfn_cuDeviceGetPCIBusId_v4010(mine, sizeof mine, d) != CUDA_SUCCESS)
            continue; /* a device whose server has gone */
        unsigned a, b, c, x, y, z;
        if (sscanf(bus, "%x:%x:%x", &a, &b, &c) == 3 && sscanf(mine, "%x:%x:%x", &x, &y, &z) == 3 &&
            a == x && b == y && c == z) {
            *dev = d;
            return CUDA_SUCCESS;
        }
    }
    return CUDA_ERROR_INVALID_DEVICE;
}

CUresult bfpfn_cuDeviceCanAccessPeer_v4000(int *can, CUdevice_v1 dev, CUdevice_v1 peer) {
    if (!can)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = valid_device(dev);
    if (r || (r = valid_device(peer)))
        return r;
    *can = 0; /* leased GPUs are apart from each other: no peer access */
    return CUDA_SUCCESS;
}
