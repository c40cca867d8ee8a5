// scale_rows: y[r][c] = alpha * scale[r] * x[r][c] for a row-major rows x cols float32 matrix,
// i.e. y = alpha * diag(scale) @ x (per-row scaling, as in row normalisation or LayerNorm's
// final step). One thread per element; the grid-stride loop lets any launch geometry cover any
// size, so a client can pick a small grid without changing the result.
extern "C" __global__ void scale_rows(int rows, int cols, float alpha, const float *scale,
                                      const float *x, float *y)
{
    // 64-bit indices: rows * cols may exceed 2^31 even though each dimension fits in an int.
    const long long n = (long long)rows * cols;
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        y[i] = alpha * scale[i / cols] * x[i];
    }
}
