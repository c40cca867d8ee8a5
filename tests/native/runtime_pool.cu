// A CUDA runtime program (`nvcc -cudart shared`) on a lease of two GPUs on two servers:
// NVIDIA's runtime sees both (its integrity check hashes each device's UUID and PCI location),
// works on each after cudaSetDevice, and copies between them with cudaMemcpyPeer.
// tests/native/test_agent.py runs it under `bitfusion-net run -n 2`; each step prints
// "ok STEP" or "FAIL STEP: error".
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
#define CHECK(name, cond)                                                                      \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            printf("FAIL %s: %s\n", name, #cond);                                              \
            return 1;                                                                          \
        }                                                                                      \
    } while (0)

int main(void) {
    int count = 0;
    STEP("cudaGetDeviceCount", cudaGetDeviceCount(&count));
    CHECK("cudaGetDeviceCount", count == 2);
    cudaDeviceProp prop[2];
    STEP("cudaGetDeviceProperties", cudaGetDeviceProperties(&prop[0], 0));
    STEP("cudaGetDeviceProperties", cudaGetDeviceProperties(&prop[1], 1));
    CHECK("cudaGetDeviceProperties", strcmp(prop[1].name, "NumPy reference device") == 0);
    CHECK("cudaGetDeviceProperties", memcmp(&prop[0].uuid, &prop[1].uuid, 16) != 0);
    CHECK("cudaGetDeviceProperties", prop[0].pciDomainID != prop[1].pciDomainID);
    int can = -1;
    STEP("cudaDeviceCanAccessPeer", cudaDeviceCanAccessPeer(&can, 0, 1));
    CHECK("cudaDeviceCanAccessPeer", can == 0);
    enum { N = (3 << 20) + 5 };
    static unsigned char src[N], dst[N];
    for (int i = 0; i < N; i++)
        src[i] = (unsigned char)(i * 7 + 1);
    void *p[2];
    for (int d = 0; d < 2; d++) {
        STEP("cudaSetDevice", cudaSetDevice(d));
        STEP("cudaMalloc", cudaMalloc(&p[d], N));
        STEP("cudaMemset", cudaMemset(p[d], 0, N));
        cudaPointerAttributes attributes;
        STEP("cudaPointerGetAttributes", cudaPointerGetAttributes(&attributes, p[d]));
        CHECK("cudaPointerGetAttributes", attributes.device == d);
    }
    STEP("cudaSetDevice", cudaSetDevice(0));
    STEP("cudaMemcpy HtoD", cudaMemcpy(p[0], src, N, cudaMemcpyHostToDevice));
    STEP("cudaMemcpyPeer", cudaMemcpyPeer(p[1], 1, p[0], 0, N));
    STEP("cudaSetDevice", cudaSetDevice(1));
    STEP("cudaMemcpy DtoH", cudaMemcpy(dst, p[1], N, cudaMemcpyDeviceToHost));
    CHECK("cudaMemcpyPeer", memcmp(src, dst, N) == 0);
    STEP("cudaDeviceSynchronize", cudaDeviceSynchronize());
    for (int d = 0; d < 2; d++) {
        STEP("cudaSetDevice", cudaSetDevice(d));
        STEP("cudaFree", cudaFree(p[d]));
    }
    printf("ALL OK\n");
    return 0;
}
