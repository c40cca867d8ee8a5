// Kernels whose parameter layouts tests/native/test_agent.py reads back from the images nvcc
// makes of them (cubin, fatbin, PTX) through the agent's image reader.
struct pair {
    float a, b;
};
extern "C" __global__ void saxpy(int n, float a, const float *x, float *y) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        y[i] = a * x[i] + y[i];
}
extern "C" __global__ void mixed(char c, short s, double d, long long q, int *p) {
    if (p)
        *p = c + s + (int)d + (int)q;
}
extern "C" __global__ void by_value(pair v, float *out) { *out = v.a + v.b; }
__global__ void noargs() {}
