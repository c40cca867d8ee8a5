/* A driver-API program that knows nothing of bitfusion-net: it includes cuda.h, links against
 * libcuda.so.1, and checks what the driver answers. tests/native/test_agent.py builds it with
 * gcc and runs it against a NumPy-device server through the agent.
 *
 *   driver_api all     every check below, in order
 *   driver_api lost    a session whose server goes away mid-program (the test kills it when
 *                      the program prints "waiting"): every later call is DEVICE_UNAVAILABLE
 *   driver_api pool    a lease of two GPUs on two servers: both are devices of this program,
 *                      each working as one alone does, copies between them, per-server sticky
 *                      errors, both driven from two threads at once
 *   driver_api pool-lost
 *                      the same lease; the program prints "waiting" and the lease file's path,
 *                      the test kills one server and writes "go DEVICE" (the dead one): its
 *                      calls are DEVICE_UNAVAILABLE, the other device keeps working
 */
#include <cuda.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int failures;

#define EXPECT(call, want)                                                                    \
    do {                                                                                      \
        CUresult got_ = (call);                                                               \
        if (got_ != (want)) {                                                                 \
            const char *name_ = NULL;                                                         \
            cuGetErrorName(got_, &name_);                                                     \
            fprintf(stderr, "FAIL %s:%d %s = %d (%s), wanted %d\n", __FILE__, __LINE__,       \
                    #call, (int)got_, name_ ? name_ : "?", (int)(want));                      \
            failures++;                                                                       \
        }                                                                                     \
    } while (0)
#define OK(call) EXPECT(call, CUDA_SUCCESS)
#define TRUE(cond)                                                                            \
    do {                                                                                      \
        if (!(cond)) {                                                                        \
            fprintf(stderr, "FAIL %s:%d %s\n", __FILE__, __LINE__, #cond);                    \
            failures++;                                                                       \
        }                                                                                     \
    } while (0)

static void devices(void) {
    int version = 0, count = 0, value = 0, major = 0, minor = 0;
    char name[128] = "";
    size_t total = 0;
    CUdevice dev;
    OK(cuDriverGetVersion(&version));
    TRUE(version >= 12000);
    OK(cuDeviceGetCount(&count));
    TRUE(count == 1);
    OK(cuDeviceGet(&dev, 0));
    EXPECT(cuDeviceGet(&dev, 1), CUDA_ERROR_INVALID_DEVICE);
    OK(cuDeviceGet(&dev, 0));
    OK(cuDeviceGetName(name, sizeof name, dev));
    TRUE(strcmp(name, "NumPy reference device") == 0);
    OK(cuDeviceTotalMem(&total, dev));
    TRUE(total == 512u << 20); /* half of the test server's 1 GiB: the lease, not the GPU */
    OK(cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev));
    OK(cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev));
    TRUE(major == 8 && minor == 0);
    OK(cuDeviceGetAttribute(&value, CU_DEVICE_ATTRIBUTE_WARP_SIZE, dev));
    TRUE(value == 32);
    OK(cuDeviceGetAttribute(&value, CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING, dev));
    TRUE(value == 1);
    EXPECT(cuDeviceGetAttribute(&value, CU_DEVICE_ATTRIBUTE_MAX, dev), CUDA_ERROR_INVALID_VALUE);
    CUuuid a, b;
    OK(cuDeviceGetUuid(&a, dev));
    OK(cuDeviceGetUuid(&b, dev));
    TRUE(memcmp(a.bytes, b.bytes, 16) == 0);
    char bus[32];
    OK(cuDeviceGetPCIBusId(bus, sizeof bus, dev));
    CUdevice again = -1;
    OK(cuDeviceGetByPCIBusId(&again, bus));
    TRUE(again == dev);
    const char *text = NULL;
    OK(cuGetErrorName(CUDA_ERROR_INVALID_VALUE, &text));
    TRUE(text && strcmp(text, "CUDA_ERROR_INVALID_VALUE") == 0);
    OK(cuGetErrorString(CUDA_ERROR_OUT_OF_MEMORY, &text));
    TRUE(text && strlen(text) > 5);
    EXPECT(cuGetErrorName((CUresult)12345, &text), CUDA_ERROR_INVALID_VALUE);
    printf("ok devices\n");
}

static CUcontext contexts(void) {
    CUdevice dev;
    CUcontext primary, created, current, popped;
    unsigned flags;
    int active;
    OK(cuDeviceGet(&dev, 0));
    OK(cuCtxGetCurrent(&current));
    TRUE(current == NULL);
    CUdeviceptr p;
    EXPECT(cuMemAlloc(&p, 16), CUDA_ERROR_INVALID_CONTEXT);
    OK(cuDevicePrimaryCtxGetState(dev, &flags, &active));
    TRUE(active == 0);
    OK(cuDevicePrimaryCtxRetain(&primary, dev));
    OK(cuDevicePrimaryCtxGetState(dev, &flags, &active));
    TRUE(active == 1);
    OK(cuCtxSetCurrent(primary));
    OK(cuCtxGetCurrent(&current));
    TRUE(current == primary);
    OK(cuCtxCreate(&created, NULL, 0, dev));
    OK(cuCtxGetCurrent(&current));
    TRUE(current == created);
    CUdevice got = -1;
    OK(cuCtxGetDevice(&got));
    TRUE(got == dev);
    OK(cuCtxPopCurrent(&popped));
    TRUE(popped == created);
    OK(cuCtxGetCurrent(&current));
    TRUE(current == primary);
    OK(cuCtxPushCurrent(created));
    /* memory of a destroyed context is freed with it */
    OK(cuMemAlloc(&p, 4096));
    OK(cuCtxDestroy(created));
    OK(cuCtxGetCurrent(&current));
    TRUE(current == primary);
    EXPECT(cuMemFree(p), CUDA_ERROR_INVALID_VALUE);
    EXPECT(cuCtxPushCurrent(created), CUDA_ERROR_INVALID_CONTEXT);
    OK(cuCtxSynchronize());
    printf("ok contexts\n");
    return primary;
}

static void memory(void) {
    size_t free_bytes = 0, total = 0, size = 0;
    OK(cuMemGetInfo(&free_bytes, &total));
    TRUE(total == 512u << 20 && free_bytes <= total);
    CUdeviceptr p, q, base;
    OK(cuMemAlloc(&p, 1 << 20));
    size_t after = 0;
    OK(cuMemGetInfo(&after, &total));
    TRUE(after == free_bytes - (1 << 20));
    OK(cuMemGetAddressRange(&base, &size, p + 100));
    TRUE(base == p && size == 1 << 20);
    unsigned memtype = 0;
    OK(cuPointerGetAttribute(&memtype, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, p + 8));
    TRUE(memtype == CU_MEMORYTYPE_DEVICE);
    int ordinal = -1;
    OK(cuPointerGetAttribute(&ordinal, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, p));
    TRUE(ordinal == 0);
    int local = 0;
    EXPECT(cuPointerGetAttribute(&memtype, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, (CUdeviceptr)&local),
           CUDA_ERROR_INVALID_VALUE);
    CUmemorytype types[1] = {0};
    CUpointer_attribute which[1] = {CU_POINTER_ATTRIBUTE_MEMORY_TYPE};
    void *data[1] = {types};
    OK(cuPointerGetAttributes(1, which, data, (CUdeviceptr)&local));
    TRUE(types[0] == 0);
    EXPECT(cuMemAlloc(&q, (size_t)1 << 40), CUDA_ERROR_OUT_OF_MEMORY); /* past the lease */
    EXPECT(cuMemFree(p + 8), CUDA_ERROR_INVALID_VALUE);
    void *host = NULL;
    OK(cuMemAllocHost(&host, 8192));
    TRUE(host && ((uintptr_t)host & 4095) == 0);
    OK(cuPointerGetAttribute(&memtype, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, (CUdeviceptr)host));
    TRUE(memtype == CU_MEMORYTYPE_HOST);
    OK(cuMemFreeHost(host));
    OK(cuMemFree(p));
    OK(cuMemGetInfo(&after, &total));
    TRUE(after == free_bytes);
    printf("ok memory\n");
}

static void copies(void) {
    enum { N = 3 << 20 }; /* more than one max_payload of the test server (1 MiB) */
    unsigned char *src = malloc(N), *dst = malloc(N);
    for (size_t i = 0; i < N; i++)
        src[i] = (unsigned char)(i * 7 + 3);
    CUdeviceptr a, b;
    OK(cuMemAlloc(&a, N));
    OK(cuMemAlloc(&b, N));
    OK(cuMemcpyHtoD(a, src, N));
    OK(cuMemcpyDtoD(b, a, N));
    memset(dst, 0, N);
    OK(cuMemcpyDtoH(dst, b, N));
    TRUE(memcmp(src, dst, N) == 0);
    /* unified: cuMemcpy tells the sides apart by address */
    memset(dst, 0, N);
    OK(cuMemcpy(b + 1, (CUdeviceptr)src, 1000));
    OK(cuMemcpy((CUdeviceptr)dst, b + 1, 1000));
    TRUE(memcmp(src, dst, 1000) == 0);
    EXPECT(cuMemcpyHtoD(a + N - 10, src, 11), CUDA_ERROR_INVALID_VALUE); /* past its end */
    EXPECT(cuMemcpyDtoH(dst, 0x1234, 4), CUDA_ERROR_INVALID_VALUE);
    /* asynchronous copies on a stream */
    CUstream s;
    OK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    OK(cuMemcpyHtoDAsync(a, src + 5, 4096, s));
    OK(cuMemcpyDtoDAsync(b, a, 4096, s));
    memset(dst, 0, 4096);
    OK(cuMemcpyDtoHAsync(dst, b, 4096, s));
    OK(cuStreamSynchronize(s));
    TRUE(memcmp(src + 5, dst, 4096) == 0);
    OK(cuMemcpyAsync((CUdeviceptr)dst, a, 16, s));
    OK(cuStreamDestroy(s));
    OK(cuMemFree(a));
    OK(cuMemFree(b));
    free(src);
    free(dst);
    printf("ok copies\n");
}

static void memsets(void) {
    CUdeviceptr p;
    unsigned char bytes[64];
    unsigned short halves[32];
    unsigned words[16];
    OK(cuMemAlloc(&p, 64));
    OK(cuMemsetD8(p, 0xab, 64));
    OK(cuMemcpyDtoH(bytes, p, 64));
    for (int i = 0; i < 64; i++)
        TRUE(bytes[i] == 0xab);
    OK(cuMemsetD16(p, 0x1234, 32));
    OK(cuMemcpyDtoH(halves, p, 64));
    for (int i = 0; i < 32; i++)
        TRUE(halves[i] == 0x1234);
    OK(cuMemsetD32Async(p, 0xdeadbeef, 16, NULL));
    OK(cuMemcpyDtoH(words, p, 64));
    for (int i = 0; i < 16; i++)
        TRUE(words[i] == 0xdeadbeef);
    OK(cuMemsetD8Async(p + 1, 0, 2, CU_STREAM_PER_THREAD));
    OK(cuMemsetD16Async(p + 4, 7, 2, CU_STREAM_LEGACY));
    OK(cuMemcpyDtoH(bytes, p, 8));
    TRUE(bytes[0] == 0xef && bytes[1] == 0 && bytes[2] == 0 && bytes[4] == 7 && bytes[5] == 0);
    EXPECT(cuMemsetD16(p + 1, 0, 1), CUDA_ERROR_INVALID_VALUE); /* misaligned */
    EXPECT(cuMemsetD32(p, 0, 17), CUDA_ERROR_INVALID_VALUE);   /* past its end */
    OK(cuMemFree(p));
    printf("ok memsets\n");
}

static void streams_and_events(void) {
    CUstream s;
    CUevent start, end, untimed;
    float ms = -1;
    OK(cuStreamCreate(&s, 0));
    OK(cuEventCreate(&start, CU_EVENT_DEFAULT));
    OK(cuEventCreate(&end, CU_EVENT_BLOCKING_SYNC));
    OK(cuEventCreate(&untimed, CU_EVENT_DISABLE_TIMING));
    CUdeviceptr p;
    OK(cuMemAlloc(&p, 1 << 16));
    OK(cuEventRecord(start, s));
    OK(cuMemsetD32Async(p, 1, 1 << 14, s));
    OK(cuEventRecord(end, s));
    OK(cuStreamWaitEvent(NULL, end, 0));
    OK(cuEventSynchronize(end));
    OK(cuEventQuery(end));
    OK(cuStreamQuery(s));
    OK(cuEventElapsedTime(&ms, start, end));
    TRUE(ms >= 0);
    OK(cuEventRecord(untimed, s));
    EXPECT(cuEventElapsedTime(&ms, start, untimed), CUDA_ERROR_INVALID_HANDLE);
    unsigned flags = 99;
    OK(cuStreamGetFlags(s, &flags));
    TRUE(flags == 0);
    CUcontext ctx = NULL, current = NULL;
    OK(cuStreamGetCtx(s, &ctx));
    OK(cuCtxGetCurrent(&current));
    TRUE(ctx == current);
    OK(cuEventDestroy(start));
    OK(cuEventDestroy(end));
    OK(cuEventDestroy(untimed));
    OK(cuStreamSynchronize(s));
    OK(cuStreamDestroy(s));
    EXPECT(cuStreamSynchronize(s), CUDA_ERROR_INVALID_HANDLE);
    OK(cuMemFree(p));
    printf("ok streams and events\n");
}

static void modules(void) {
    /* PTX: the NumPy device cannot run it, and says so */
    const char *ptx = ".version 8.0\n.target sm_80\n.address_size 64\n"
                      ".visible .entry scale(.param .u64 p, .param .f32 a, .param .u32 n)\n"
                      "{\n ret;\n}\n";
    CUmodule m;
    EXPECT(cuModuleLoadData(&m, ptx), CUDA_ERROR_NOT_SUPPORTED);
    /* the server's built-in kernels (module 0), launched both ways cuLaunchKernel takes */
    OK(cuModuleLoadData(&m, "bitfusion-net:builtin"));
    CUfunction saxpy;
    OK(cuModuleGetFunction(&saxpy, m, "saxpy"));
    EXPECT(cuModuleGetFunction(&saxpy, m, "no_such_kernel"), CUDA_ERROR_NOT_FOUND);
    OK(cuModuleGetFunction(&saxpy, m, "saxpy"));
    size_t offset = 0, size = 0;
    OK(cuFuncGetParamInfo(saxpy, 2, &offset, &size));
    TRUE(offset == 8 && size == 8); /* saxpy(int n, float a, float *x, float *y) */
    EXPECT(cuFuncGetParamInfo(saxpy, 4, &offset, &size), CUDA_ERROR_INVALID_VALUE);
    enum { N = 1000 };
    float x[N], y[N], out[N];
    for (int i = 0; i < N; i++)
        x[i] = (float)i, y[i] = 1.0f;
    CUdeviceptr dx, dy;
    OK(cuMemAlloc(&dx, sizeof x));
    OK(cuMemAlloc(&dy, sizeof y));
    OK(cuMemcpyHtoD(dx, x, sizeof x));
    OK(cuMemcpyHtoD(dy, y, sizeof y));
    int n = N;
    float a = 2.0f;
    void *params[] = {&n, &a, &dx, &dy};
    OK(cuLaunchKernel(saxpy, (N + 255) / 256, 1, 1, 256, 1, 1, 0, NULL, params, NULL));
    OK(cuMemcpyDtoH(out, dy, sizeof out));
    for (int i = 0; i < N; i++)
        TRUE(out[i] == 2.0f * (float)i + 1.0f);
    struct { int n; float a; CUdeviceptr x, y; } packed = {N, 0.5f, dx, dy};
    size_t packed_size = sizeof packed;
    void *extra[] = {CU_LAUNCH_PARAM_BUFFER_POINTER, &packed, CU_LAUNCH_PARAM_BUFFER_SIZE,
                     &packed_size, CU_LAUNCH_PARAM_END};
    OK(cuLaunchKernel(saxpy, (N + 255) / 256, 1, 1, 256, 1, 1, 0, NULL, NULL, extra));
    OK(cuMemcpyDtoH(out, dy, sizeof out));
    for (int i = 0; i < N; i++)
        TRUE(out[i] == 2.5f * (float)i + 1.0f);
    /* a launch that fails on the server is reported at the next synchronising call */
    int too_many = N * 1000;
    void *bad[] = {&too_many, &a, &dx, &dy};
    OK(cuLaunchKernel(saxpy, 1, 1, 1, 1, 1, 1, 0, NULL, bad, NULL));
    CUresult sticky = cuCtxSynchronize();
    TRUE(sticky != CUDA_SUCCESS && sticky != CUDA_ERROR_DEVICE_UNAVAILABLE);
    OK(cuCtxSynchronize()); /* reported once, as the driver reports an asynchronous error */
    OK(cuModuleUnload(m));
    OK(cuMemFree(dx));
    OK(cuMemFree(dy));
    printf("ok modules\n");
}

/* Contexts are current per thread: a new thread has none until it sets one. */
static void *other_thread(void *primary) {
    CUcontext current = (CUcontext)1;
    CUdevice dev = -1;
    CUdeviceptr p;
    OK(cuCtxGetCurrent(&current));
    TRUE(current == NULL);
    EXPECT(cuCtxGetDevice(&dev), CUDA_ERROR_INVALID_CONTEXT);
    EXPECT(cuMemAlloc(&p, 64), CUDA_ERROR_INVALID_CONTEXT);
    OK(cuCtxSetCurrent((CUcontext)primary));
    OK(cuCtxGetDevice(&dev));
    TRUE(dev == 0);
    OK(cuMemAlloc(&p, 64));
    OK(cuMemsetD8(p, 1, 64));
    OK(cuMemFree(p));
    return NULL;
}

static void threads(CUcontext primary) {
    pthread_t t;
    TRUE(pthread_create(&t, NULL, other_thread, primary) == 0);
    pthread_join(t, NULL);
    CUcontext current = NULL;
    OK(cuCtxGetCurrent(&current));
    TRUE(current == primary); /* the other thread's choice is its own */
    printf("ok threads\n");
}

static void proc_address(void) {
    void *fn = NULL;
    CUdriverProcAddressQueryResult status;
    OK(cuGetProcAddress("cuMemAlloc", &fn, 12000, CU_GET_PROC_ADDRESS_DEFAULT, NULL));
    TRUE(fn != NULL);
    CUdeviceptr p = 0;
    OK(((CUresult(*)(CUdeviceptr *, size_t))fn)(&p, 64));
    OK(cuMemFree(p));
    OK(cuGetProcAddress("cuGraphCreate", &fn, 12000, 0, &status)); /* not forwarded, not NULL */
    TRUE(fn != NULL && status == CU_GET_PROC_ADDRESS_SUCCESS);
    EXPECT(((CUresult(*)(CUgraph *, unsigned))fn)(NULL, 0), CUDA_ERROR_NOT_SUPPORTED);
    EXPECT(cuGetProcAddress("cuNoSuchCall", &fn, 12000, 0, &status), CUDA_ERROR_NOT_FOUND);
    TRUE(fn == NULL && status == CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND);
    OK(cuGetProcAddress("cuMemcpyHtoD", &fn, 12000, CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM,
                        &status));
    TRUE(fn != NULL);
    EXPECT(cuGetProcAddress("cuMemAlloc", &fn, 1000, 0, &status), CUDA_ERROR_NOT_FOUND);
    TRUE(status == CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT);
    printf("ok cuGetProcAddress\n");
}


/* -- a lease over two servers -------------------------------------------------------------- */
enum { POOL_DEVICES = 2 };
static CUcontext pool_ctx[POOL_DEVICES];
static CUfunction pool_saxpy[POOL_DEVICES];

/* What one GPU alone does, on device `dev` (its context current on the calling thread):
   memory, copies over several payloads, memsets, a stream and events, the built-in saxpy. */
static void one_device(int dev, int round) {
    enum { N = 3 << 20, K = 4096 };
    size_t free_bytes = 0, total = 0, limit = 0;
    OK(cuMemGetInfo(&free_bytes, &total));
    OK(cuDeviceTotalMem(&limit, dev));
    TRUE(total == limit && free_bytes <= total);
    unsigned char *src = malloc(N), *dst = malloc(N);
    for (size_t i = 0; i < N; i++)
        src[i] = (unsigned char)(i * 13 + (size_t)dev * 5 + (size_t)round);
    CUdeviceptr a, b;
    OK(cuMemAlloc(&a, N));
    OK(cuMemAlloc(&b, N));
    int ordinal = -1;
    OK(cuPointerGetAttribute(&ordinal, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, a));
    TRUE(ordinal == dev);
    OK(cuMemcpyHtoD(a, src, N));
    OK(cuMemcpyDtoD(b, a, N));
    memset(dst, 0, N);
    OK(cuMemcpyDtoH(dst, b, N));
    TRUE(memcmp(src, dst, N) == 0);
    OK(cuMemsetD32(b, 0x01020304u + (unsigned)dev, N / 4));
    OK(cuMemcpyDtoH(dst, b, 16));
    unsigned words[4];
    memcpy(words, dst, sizeof words);
    TRUE(words[0] == 0x01020304u + (unsigned)dev && words[3] == words[0]);
    CUstream s;
    CUevent e;
    OK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    OK(cuEventCreate(&e, 0));
    OK(cuMemcpyHtoDAsync(a, src + 7, K, s));
    OK(cuEventRecord(e, s));
    OK(cuEventSynchronize(e));
    OK(cuMemcpyDtoHAsync(dst, a, K, s));
    OK(cuStreamSynchronize(s));
    TRUE(memcmp(src + 7, dst, K) == 0);
    CUdevice sdev = -1;
    OK(cuStreamGetDevice(s, &sdev));
    TRUE(sdev == dev);
    float x[K], y[K], out[K];
    for (int i = 0; i < K; i++)
        x[i] = (float)i, y[i] = (float)(dev + 1);
    OK(cuMemcpyHtoD(a, x, sizeof x));
    OK(cuMemcpyHtoD(b, y, sizeof y));
    int n = K;
    float alpha = (float)(dev + 2);
    void *params[] = {&n, &alpha, &a, &b};
    OK(cuLaunchKernel(pool_saxpy[dev], K / 256, 1, 1, 256, 1, 1, 0, s, params, NULL));
    OK(cuMemcpyDtoHAsync(out, b, sizeof out, s));
    for (int i = 0; i < K; i++)
        TRUE(out[i] == alpha * (float)i + (float)(dev + 1));
    OK(cuEventDestroy(e));
    OK(cuStreamDestroy(s));
    OK(cuMemFree(a));
    OK(cuMemFree(b));
    free(src);
    free(dst);
}

static void *pool_thread(void *arg) {
    int dev = (int)(intptr_t)arg;
    OK(cuCtxSetCurrent(pool_ctx[dev]));
    for (int round = 0; round < 3; round++)
        one_device(dev, round);
    return NULL;
}

static void pool_open(void) {
    int count = 0;
    OK(cuDeviceGetCount(&count));
    TRUE(count == POOL_DEVICES);
    for (int dev = 0; dev < POOL_DEVICES; dev++) {
        CUmodule m;
        OK(cuDevicePrimaryCtxRetain(&pool_ctx[dev], dev));
        OK(cuCtxSetCurrent(pool_ctx[dev]));
        OK(cuModuleLoadData(&m, "bitfusion-net:builtin"));
        OK(cuModuleGetFunction(&pool_saxpy[dev], m, "saxpy"));
    }
}

static void pool(void) {
    pool_open();
    /* two devices, told apart */
    char name[2][128], bus[2][32];
    CUuuid uuid[2];
    for (int dev = 0; dev < POOL_DEVICES; dev++) {
        OK(cuDeviceGetName(name[dev], sizeof name[dev], dev));
        TRUE(strcmp(name[dev], "NumPy reference device") == 0);
        OK(cuDeviceGetUuid(&uuid[dev], dev));
        OK(cuDeviceGetPCIBusId(bus[dev], sizeof bus[dev], dev));
        CUdevice again = -1;
        OK(cuDeviceGetByPCIBusId(&again, bus[dev]));
        TRUE(again == dev);
        int value = 0;
        OK(cuDeviceGetAttribute(&value, CU_DEVICE_ATTRIBUTE_WARP_SIZE, dev));
        TRUE(value == 32);
    }
    TRUE(memcmp(uuid[0].bytes, uuid[1].bytes, 16) != 0);
    TRUE(strcmp(bus[0], bus[1]) != 0);
    CUdevice dev = -1;
    EXPECT(cuDeviceGet(&dev, POOL_DEVICES), CUDA_ERROR_INVALID_DEVICE);
    int can = -1;
    OK(cuDeviceCanAccessPeer(&can, 0, 1));
    TRUE(can == 0);
    OK(cuDeviceCanAccessPeer(&can, 1, 0));
    TRUE(can == 0);
    printf("ok pool devices\n");

    /* each alone */
    for (int d = 0; d < POOL_DEVICES; d++) {
        OK(cuCtxSetCurrent(pool_ctx[d]));
        OK(cuCtxGetDevice(&dev));
        TRUE(dev == d);
        one_device(d, 0);
    }
    printf("ok pool each device\n");

    /* between them: through this host, in chunks (more than one max_payload of 1 MiB) */
    enum { N = (3 << 20) + 123 };
    unsigned char *src = malloc(N), *dst = malloc(N);
    for (size_t i = 0; i < N; i++)
        src[i] = (unsigned char)(i * 31 + 1);
    CUdeviceptr on[POOL_DEVICES], other[POOL_DEVICES];
    for (int d = 0; d < POOL_DEVICES; d++) {
        OK(cuCtxSetCurrent(pool_ctx[d]));
        OK(cuMemAlloc(&on[d], N));
        OK(cuMemAlloc(&other[d], N));
        OK(cuMemsetD8(on[d], 0, N));
    }
    OK(cuMemcpyHtoD(on[0], src, N));
    OK(cuMemcpyDtoD(on[1], on[0], N)); /* 0 -> 1, with device 1's context current */
    memset(dst, 0, N);
    OK(cuMemcpyDtoH(dst, on[1], N));
    TRUE(memcmp(src, dst, N) == 0);
    OK(cuMemcpyPeer(other[0] + 1, pool_ctx[0], on[1], pool_ctx[1], N - 1)); /* 1 -> 0 */
    memset(dst, 0, N);
    OK(cuMemcpyDtoH(dst, other[0] + 1, N - 1));
    TRUE(memcmp(src, dst, N - 1) == 0);
    OK(cuMemcpy(other[1], other[0] + 1, 1000)); /* unified: 0 -> 1 */
    memset(dst, 0, 1000);
    OK(cuMemcpyDtoH(dst, other[1], 1000));
    TRUE(memcmp(src, dst, 1000) == 0);
    EXPECT(cuMemcpyPeer(other[0], pool_ctx[1], on[1], pool_ctx[1], 16), CUDA_ERROR_INVALID_VALUE);
    /* a device's streams, events and kernels are its own */
    CUstream s1;
    CUevent e1;
    OK(cuCtxSetCurrent(pool_ctx[1]));
    OK(cuStreamCreate(&s1, 0));
    OK(cuEventCreate(&e1, 0));
    OK(cuCtxSetCurrent(pool_ctx[0]));
    EXPECT(cuMemcpyHtoDAsync(on[0], src, 16, s1), CUDA_ERROR_INVALID_HANDLE);
    int n = 16;
    float alpha = 1.0f;
    void *params[] = {&n, &alpha, &on[1], &other[1]};
    EXPECT(cuLaunchKernel(pool_saxpy[1], 1, 1, 1, 16, 1, 1, 0, NULL, params, NULL),
           CUDA_ERROR_INVALID_HANDLE); /* device 1's kernel, device 0's context */
    void *across[] = {&n, &alpha, &on[0], &other[1]};
    EXPECT(cuLaunchKernel(pool_saxpy[0], 1, 1, 1, 16, 1, 1, 0, NULL, across, NULL),
           CUDA_ERROR_INVALID_VALUE); /* device 1's memory cannot be reached from device 0 */
    EXPECT(cuEventRecord(e1, NULL), CUDA_ERROR_INVALID_HANDLE);
    OK(cuEventRecord(e1, s1));
    OK(cuStreamWaitEvent(NULL, e1, 0)); /* device 0 waits for device 1's event */
    OK(cuEventDestroy(e1));
    OK(cuStreamDestroy(s1));
    for (int d = 0; d < POOL_DEVICES; d++) {
        OK(cuMemFree(on[d]));
        OK(cuMemFree(other[d]));
    }
    free(src);
    free(dst);
    printf("ok pool copies\n");

    /* an asynchronous error is its server's: reported at the next synchronising call there,
       and nowhere else */
    CUdeviceptr p;
    OK(cuCtxSetCurrent(pool_ctx[0]));
    OK(cuMemAlloc(&p, 64));
    int too_many = 1 << 24;
    void *bad[] = {&too_many, &alpha, &p, &p};
    OK(cuLaunchKernel(pool_saxpy[0], 1, 1, 1, 1, 1, 1, 0, NULL, bad, NULL));
    OK(cuCtxSetCurrent(pool_ctx[1]));
    OK(cuCtxSynchronize());
    OK(cuCtxSetCurrent(pool_ctx[0]));
    CUresult sticky = cuCtxSynchronize();
    TRUE(sticky != CUDA_SUCCESS && sticky != CUDA_ERROR_DEVICE_UNAVAILABLE);
    OK(cuCtxSynchronize());
    OK(cuMemFree(p));
    size_t free0 = 0, total0 = 0, free1 = 0, total1 = 0;
    OK(cuMemAlloc(&p, 1 << 20)); /* on device 0: device 1's free memory does not change */
    OK(cuMemGetInfo(&free0, &total0));
    OK(cuCtxSetCurrent(pool_ctx[1]));
    OK(cuMemGetInfo(&free1, &total1));
    TRUE(free1 == total1 && free0 == total0 - (1 << 20));
    OK(cuMemFree(p));
    printf("ok pool sticky errors\n");

    /* both at once, from two threads */
    pthread_t t[POOL_DEVICES];
    for (int d = 0; d < POOL_DEVICES; d++)
        TRUE(pthread_create(&t[d], NULL, pool_thread, (void *)(intptr_t)d) == 0);
    for (int d = 0; d < POOL_DEVICES; d++)
        pthread_join(t[d], NULL);
    printf("ok pool threads\n");
}

/* One server is killed under the program: its device's calls fail, the other's do not. */
static int pool_lost(void) {
    enum { N = 4096 };
    pool_open();
    CUdeviceptr p[POOL_DEVICES];
    for (int d = 0; d < POOL_DEVICES; d++) {
        OK(cuCtxSetCurrent(pool_ctx[d]));
        OK(cuMemAlloc(&p[d], N));
        OK(cuMemsetD8(p[d], (unsigned char)(d + 1), N));
    }
    const char *lease = getenv("BITFUSION_NET_LEASE");
    printf("waiting %s\n", lease ? lease : "-");
    fflush(stdout);
    char line[32];
    int dead = -1;
    if (!fgets(line, sizeof line, stdin) || sscanf(line, "go %d", &dead) != 1 || dead < 0 ||
        dead >= POOL_DEVICES)
        return 2;
    int alive = 1 - dead;
    unsigned char buf[N];
    /* the dead device: DEVICE_UNAVAILABLE, at once, for every call on it */
    OK(cuCtxSetCurrent(pool_ctx[dead]));
    EXPECT(cuMemcpyDtoH(buf, p[dead], N), CUDA_ERROR_DEVICE_UNAVAILABLE);
    EXPECT(cuMemcpyHtoD(p[dead], buf, N), CUDA_ERROR_DEVICE_UNAVAILABLE);
    CUdeviceptr q;
    EXPECT(cuMemAlloc(&q, 64), CUDA_ERROR_DEVICE_UNAVAILABLE);
    EXPECT(cuCtxSynchronize(), CUDA_ERROR_DEVICE_UNAVAILABLE);
    EXPECT(cuMemsetD8(p[dead], 0, N), CUDA_ERROR_DEVICE_UNAVAILABLE);
    size_t f, t;
    EXPECT(cuMemGetInfo(&f, &t), CUDA_ERROR_DEVICE_UNAVAILABLE);
    char name[64];
    EXPECT(cuDeviceGetName(name, sizeof name, dead), CUDA_ERROR_DEVICE_UNAVAILABLE);
    int n = 16;
    float alpha = 1.0f;
    void *params[] = {&n, &alpha, &p[dead], &p[dead]};
    EXPECT(cuLaunchKernel(pool_saxpy[dead], 1, 1, 1, 16, 1, 1, 0, NULL, params, NULL),
           CUDA_ERROR_DEVICE_UNAVAILABLE);
    /* between the two: the dead side fails the copy */
    EXPECT(cuMemcpyDtoD(p[alive], p[dead], N), CUDA_ERROR_DEVICE_UNAVAILABLE);
    EXPECT(cuMemcpyDtoD(p[dead], p[alive], N), CUDA_ERROR_DEVICE_UNAVAILABLE);
    /* the living device: what was there is there, and everything still works */
    int count = 0;
    OK(cuDeviceGetCount(&count));
    TRUE(count == POOL_DEVICES);
    OK(cuDeviceGetName(name, sizeof name, alive));
    OK(cuCtxSetCurrent(pool_ctx[alive]));
    OK(cuMemcpyDtoH(buf, p[alive], N));
    TRUE(buf[0] == alive + 1 && buf[N - 1] == alive + 1);
    one_device(alive, 1);
    OK(cuCtxSynchronize());
    OK(cuMemFree(p[alive]));
    printf("ok pool lost\n");
    return failures ? 1 : 0;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "all";
    CUdevice dev;
    EXPECT(cuDeviceGet(&dev, 0), CUDA_ERROR_NOT_INITIALIZED);
    OK(cuInit(0));
    if (strcmp(mode, "lost") == 0) {
        CUcontext ctx;
        CUdeviceptr p;
        OK(cuDevicePrimaryCtxRetain(&ctx, 0));
        OK(cuCtxSetCurrent(ctx));
        OK(cuMemAlloc(&p, 64));
        printf("waiting\n");
        fflush(stdout);
        char line[16];
        if (!fgets(line, sizeof line, stdin)) /* the test kills the server, then writes a line */
            return 2;
        unsigned char buf[64] = {0};
        EXPECT(cuMemcpyDtoH(buf, p, 64), CUDA_ERROR_DEVICE_UNAVAILABLE);
        EXPECT(cuMemcpyHtoD(p, buf, 64), CUDA_ERROR_DEVICE_UNAVAILABLE);
        EXPECT(cuMemAlloc(&p, 64), CUDA_ERROR_DEVICE_UNAVAILABLE);
        EXPECT(cuCtxSynchronize(), CUDA_ERROR_DEVICE_UNAVAILABLE);
        printf("ok lost\n");
        return failures ? 1 : 0;
    }
    if (strcmp(mode, "pool") == 0) {
        pool();
        printf(failures ? "FAILED %d\n" : "ALL OK\n", failures);
        return failures ? 1 : 0;
    }
    if (strcmp(mode, "pool-lost") == 0)
        return pool_lost();
    devices();
    CUcontext primary = contexts();
    memory();
    copies();
    memsets();
    streams_and_events();
    modules();
    threads(primary);
    proc_address();
    printf(failures ? "FAILED %d\n" : "ALL OK\n", failures);
    return failures ? 1 : 0;
}
