// The built-in kernel library (module 0): the CUDA C twins of executors/builtins.py.
//
// Each kernel has the name, the argument types and the results of its NumPy twin; the docstrings
// there are the specification. The conventions that keep the twins equal:
//
// - float data is float32, matrices are row-major, sizes are int32 (int64 for busy's time).
// - Launch geometry never changes a result: every kernel walks its range with a grid-stride loop
//   over all threads of all blocks (any grid and block shape covers all of it), or, where a result
//   needs one cooperating group (reduce_sum), only the first block works and the others return.
// - Rounding follows NumPy where it can be matched exactly: saxpy multiplies and adds with two
//   roundings (no fused multiply-add), as NumPy's a*x then +y does. gemm, softmax and reduce_sum
//   add in a different order than NumPy and agree to float32 rounding, not bit for bit.
// - Negative sizes are refused by the executor before launch (InvalidValue), and so are pointers
//   outside the tenant's allocations (KernelFault), exactly as on the NumPy device: these kernels
//   can assume valid, 4-byte-aligned arguments. A size of 0 addresses no memory at all (pointers
//   may then be null).
// - No kernel uses dynamic shared memory: the executor launches them with none, whatever the
//   client asked for (the NumPy twins ignore it too).
//
// Compiled by executors/cuda_build.py with nvcc for the GPU's own architecture (cached). On machines
// without a GPU the test suite compiles it to PTX, and also runs it on the CPU under a small
// emulation of CUDA's execution model (tests/executors/cuda_host/) against the NumPy twins, so a
// mistake here fails CI rather than a later GPU run.

#include <cstdint>

namespace {

// This thread's index among all threads of the launch, and how many there are, in 64 bits so that
// ranges near 2^31 elements cannot overflow. Blocks and grids may be 1-, 2- or 3-dimensional.
__device__ __forceinline__ unsigned long long block_threads() {
    return (unsigned long long)blockDim.x * blockDim.y * blockDim.z;
}

__device__ __forceinline__ unsigned long long thread_in_block() {
    return threadIdx.x + (unsigned long long)blockDim.x * (threadIdx.y + (unsigned long long)blockDim.y * threadIdx.z);
}

__device__ __forceinline__ unsigned long long global_thread() {
    unsigned long long block = blockIdx.x + (unsigned long long)gridDim.x * (blockIdx.y + (unsigned long long)gridDim.y * blockIdx.z);
    return block * block_threads() + thread_in_block();
}

__device__ __forceinline__ unsigned long long total_threads() {
    return (unsigned long long)gridDim.x * gridDim.y * gridDim.z * block_threads();
}

__device__ __forceinline__ bool first_block() {
    return blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0;
}

// The GPU's nanosecond clock. The test suite's CPU emulation of these kernels
// (tests/executors/cuda_host/) defines its own, on the host's clock.
#ifndef BITFUSION_HOST_EMULATION
__device__ __forceinline__ unsigned long long now_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
#endif

constexpr int kMaxBlockThreads = 1024;  // CUDA's limit on threads per block

}  // namespace

// saxpy(n, a, x, y): y[i] = a*x[i] + y[i]. x and y may be the same buffer.
extern "C" __global__ void saxpy(int n, float a, const float* x, float* y) {
    for (unsigned long long i = global_thread(); i < (unsigned long long)n; i += total_threads()) {
        y[i] = __fadd_rn(__fmul_rn(a, x[i]), y[i]);
    }
}

// fill(n, value, out): out[i] = value.
extern "C" __global__ void fill(int n, float value, float* out) {
    for (unsigned long long i = global_thread(); i < (unsigned long long)n; i += total_threads()) {
        out[i] = value;
    }
}

// gemm(m, n, k, alpha, A, B, beta, C): C = alpha*(A@B) + beta*C, A m*k, B k*n, C m*n, row-major.
// C is not read when beta == 0 (BLAS semantics: it may hold NaN bit patterns), and A and B are
// not read when k == 0. One thread per element of C.
extern "C" __global__ void gemm(int m, int n, int k, float alpha, const float* A, const float* B,
                                float beta, float* C) {
    if (m <= 0 || n <= 0) {
        return;
    }
    const unsigned long long count = (unsigned long long)m * n;
    for (unsigned long long e = global_thread(); e < count; e += total_threads()) {
        if (k <= 0) {  // A@B is an empty sum: only beta*C is left (alpha*0 could be NaN)
            C[e] = beta == 0.0f ? 0.0f : __fmul_rn(beta, C[e]);
            continue;
        }
        const unsigned long long row = e / n, col = e % n;
        float product = 0.0f;
        for (int p = 0; p < k; ++p) {
            product = fmaf(A[row * k + p], B[(unsigned long long)p * n + col], product);
        }
        const float scaled = __fmul_rn(alpha, product);
        C[e] = beta == 0.0f ? scaled : __fadd_rn(__fmul_rn(beta, C[e]), scaled);
    }
}

// relu(n, x, y): y[i] = max(x[i], 0); NaN becomes 0 (fmaxf returns the non-NaN operand).
extern "C" __global__ void relu(int n, const float* x, float* y) {
    for (unsigned long long i = global_thread(); i < (unsigned long long)n; i += total_threads()) {
        y[i] = fmaxf(x[i], 0.0f);
    }
}

// softmax(rows, cols, x, y): row-wise softmax, max-subtracted so exp() cannot overflow. One thread
// per row; the row maximum is read before y is written, so x == y works. Sums in double, as the
// NumPy twin does.
extern "C" __global__ void softmax(int rows, int cols, const float* x, float* y) {
    if (cols <= 0) {  // empty rows: nothing to read (x may be null) and nothing to write
        return;
    }
    for (unsigned long long r = global_thread(); r < (unsigned long long)rows; r += total_threads()) {
        const float* in = x + r * cols;
        float* out = y + r * cols;
        float row_max = in[0];
        for (int c = 1; c < cols; ++c) {
            row_max = fmaxf(row_max, in[c]);
        }
        double sum = 0.0;
        for (int c = 0; c < cols; ++c) {
            const float e = expf(in[c] - row_max);
            out[c] = e;
            sum += e;
        }
        const float total = (float)sum;
        for (int c = 0; c < cols; ++c) {
            out[c] = __fdiv_rn(out[c], total);
        }
    }
}

// reduce_sum(n, x, out): out[0] = sum(x), accumulated in double. The first block does the work so
// that any geometry gives the whole sum without a second kernel; other blocks return at once.
extern "C" __global__ void reduce_sum(int n, const float* x, float* out) {
    __shared__ double partial[kMaxBlockThreads];
    if (n <= 0 || !first_block()) {  // an empty sum writes nothing, as the NumPy twin
        return;
    }
    const unsigned long long tid = thread_in_block(), threads = block_threads();
    double sum = 0.0;
    for (unsigned long long i = tid; i < (unsigned long long)n; i += threads) {
        sum += x[i];
    }
    partial[tid] = sum;
    __syncthreads();
    // Pairwise tree over any block size (not only powers of two): at each step a thread whose
    // index is a multiple of 2*stride adds the partial stride places after it, if there is one.
    for (unsigned long long stride = 1; stride < threads; stride *= 2) {
        if (tid % (2 * stride) == 0 && tid + stride < threads) {
            partial[tid] += partial[tid + stride];
        }
        __syncthreads();
    }
    if (tid == 0) {
        out[0] = (float)partial[0];
    }
}

// busy(microseconds): occupy the device for that long (for scheduler tests). One thread spins on
// the GPU's global nanosecond timer until its deadline, and that is enough to hold the device,
// since a GPU runs one context's kernels at a time; the others return at once, so no launch
// geometry can stretch the time (extra waves of blocks would each spin again). The executor
// refuses more than 10 s (BUSY_MAX_US in builtins.py).
extern "C" __global__ void busy(long long microseconds) {
    if (!first_block() || thread_in_block() != 0) {
        return;
    }
    const unsigned long long deadline = now_ns() + (unsigned long long)microseconds * 1000ull;
    while (now_ns() < deadline) {
    }
}
