// A CUDA runtime program with a kernel of its own (built with `nvcc -cudart shared`): on the
// NumPy reference device, which runs only the built-in kernels, its launch must fail cleanly
// (cudaErrorNotSupported at cudaGetLastError), and the program must go on working.
#include <cuda_runtime.h>
#include <stdio.h>

__global__ void scale(float *x, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        x[i] *= a;
}

int main(void) {
    float *p = NULL;
    printf("cudaMalloc %s\n", cudaGetErrorName(cudaMalloc(&p, 1024 * sizeof(float))));
    scale<<<4, 256>>>(p, 2.0f, 1024);
    printf("launch %s\n", cudaGetErrorName(cudaGetLastError()));
    printf("cudaDeviceSynchronize %s\n", cudaGetErrorName(cudaDeviceSynchronize()));
    float host[4] = {0};
    printf("cudaMemcpy %s\n",
           cudaGetErrorName(cudaMemcpy(host, p, sizeof host, cudaMemcpyDeviceToHost)));
    printf("cudaFree %s\n", cudaGetErrorName(cudaFree(p)));
    return 0;
}
