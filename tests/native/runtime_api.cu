// A CUDA runtime program built with `nvcc -cudart shared`: NVIDIA's libcudart.so, which asks the
// driver (here: the agent) for its private export tables before it does anything else.
// tests/native/test_agent.py runs it through the agent and reports how far it gets; each step
// prints "ok STEP" or "FAIL STEP: error".
#include <cuda_runtime.h>
#include <stdio.h>
#include <string.h>

#define STEP(name, call)                                                                       \
    do {                                                                                       \
        cudaError_t e_ = (call);                                                               \
        if (e_ != cudaSuccess) {                                                               \
            printf("FAIL %s: %s (%s)\n", name, cudaGetErrorName(e_), cudaGetErrorString(e_));  \
            return 1;                                                                          \
        }                                                                                      \
        printf("ok %s\n", name);                                                               \
        fflush(stdout);                                                                        \
    } while (0)

int main(void) {
    int count = 0;
    STEP("cudaGetDeviceCount", cudaGetDeviceCount(&count));
    if (count != 1) {
        printf("FAIL cudaGetDeviceCount: %d devices\n", count);
        return 1;
    }
    cudaDeviceProp prop;
    STEP("cudaGetDeviceProperties", cudaGetDeviceProperties(&prop, 0));
    if (strcmp(prop.name, "NumPy reference device") != 0 || prop.major != 8) {
        printf("FAIL cudaGetDeviceProperties: %s %d.%d\n", prop.name, prop.major, prop.minor);
        return 1;
    }
    size_t free_bytes = 0, total = 0;
    STEP("cudaMemGetInfo", cudaMemGetInfo(&free_bytes, &total));
    if (total != (size_t)512 << 20) {
        printf("FAIL cudaMemGetInfo: total %zu\n", total);
        return 1;
    }
    enum { N = 1 << 20 };
    static unsigned char src[N], dst[N];
    for (int i = 0; i < N; i++)
        src[i] = (unsigned char)(i * 13 + 1);
    void *p = NULL;
    STEP("cudaMalloc", cudaMalloc(&p, N));
    STEP("cudaMemcpy HtoD", cudaMemcpy(p, src, N, cudaMemcpyHostToDevice));
    STEP("cudaMemcpy DtoH", cudaMemcpy(dst, p, N, cudaMemcpyDeviceToHost));
    if (memcmp(src, dst, N) != 0) {
        printf("FAIL cudaMemcpy: the data came back different\n");
        return 1;
    }
    STEP("cudaMemset", cudaMemset(p, 0x5a, 4096));
    STEP("cudaDeviceSynchronize", cudaDeviceSynchronize());
    cudaStream_t stream;
    cudaEvent_t start, end;
    STEP("cudaStreamCreate", cudaStreamCreate(&stream));
    STEP("cudaEventCreate", cudaEventCreate(&start));
    STEP("cudaEventCreate", cudaEventCreate(&end));
    STEP("cudaEventRecord", cudaEventRecord(start, stream));
    STEP("cudaMemcpyAsync", cudaMemcpyAsync(dst, p, 4096, cudaMemcpyDeviceToHost, stream));
    STEP("cudaEventRecord", cudaEventRecord(end, stream));
    STEP("cudaStreamSynchronize", cudaStreamSynchronize(stream));
    for (int i = 0; i < 4096; i++)
        if (dst[i] != 0x5a) {
            printf("FAIL cudaMemset: byte %d is %d\n", i, dst[i]);
            return 1;
        }
    float ms = -1;
    STEP("cudaEventElapsedTime", cudaEventElapsedTime(&ms, start, end));
    cudaPointerAttributes attributes;
    STEP("cudaPointerGetAttributes", cudaPointerGetAttributes(&attributes, p));
    if (attributes.type != cudaMemoryTypeDevice || attributes.device != 0) {
        printf("FAIL cudaPointerGetAttributes: type %d device %d\n", attributes.type,
               attributes.device);
        return 1;
    }
    STEP("cudaEventDestroy", cudaEventDestroy(start));
    STEP("cudaEventDestroy", cudaEventDestroy(end));
    STEP("cudaStreamDestroy", cudaStreamDestroy(stream));
    STEP("cudaFree", cudaFree(p));
    STEP("cudaDeviceReset", cudaDeviceReset());
    printf("ALL OK\n");
    return 0;
}
