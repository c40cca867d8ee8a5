// Runs CUDA C kernels on the CPU, for tests on machines without a GPU.
//
// A launch runs its blocks one after another; the threads of a block run as real threads, so that
// __syncthreads() is a real barrier and __shared__ memory (a static, one block at a time) is
// shared by exactly the threads of one block. Arithmetic follows the CUDA intrinsics' IEEE
// definitions (__fadd_rn is a correctly rounded add, ...); compile with -ffp-contract=off so the
// host does not fuse what the device would not. This emulates the execution model only as far as
// the built-in kernels use it: no warps, no atomics, no memory model beyond the barrier.
//
// The kernel file is included with BITFUSION_HOST_EMULATION defined (see KERNELS below), and
// each of its kernels is reachable by name through bf_launch(), with parameters passed as
// cuLaunchKernel passes them: an array of pointers to each argument's value.

#include <barrier>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
static std::barrier<>* block_barrier = nullptr;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

inline void __syncthreads() { block_barrier->arrive_and_wait(); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }

unsigned long long now_ns() {
    using namespace std::chrono;
    return duration_cast<nanoseconds>(steady_clock::now().time_since_epoch()).count();
}

#define BITFUSION_HOST_EMULATION 1
#include KERNELS

namespace {

using Launcher = std::function<void(void**)>;

template <typename... Args, std::size_t... I>
void call(void (*kernel)(Args...), void** params, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_reference_t<Args>*>(params[I])...);
}

template <typename... Args>
Launcher launcher(void (*kernel)(Args...)) {
    return [kernel](void** params) { call(kernel, params, std::index_sequence_for<Args...>{}); };
}

std::map<std::string, Launcher>& kernels() {
    static std::map<std::string, Launcher> table = {
        {"saxpy", launcher(saxpy)}, {"fill", launcher(fill)},
        {"gemm", launcher(gemm)},   {"relu", launcher(relu)},
        {"softmax", launcher(softmax)}, {"reduce_sum", launcher(reduce_sum)},
        {"busy", launcher(busy)},
    };
    return table;
}

}  // namespace

// Returns 0, or -1 for an unknown kernel name.
extern "C" int bf_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                         unsigned by, unsigned bz, void** params) {
    auto found = kernels().find(name);
    if (found == kernels().end()) {
        return -1;
    }
    gridDim = {gx, gy, gz};
    blockDim = {bx, by, bz};
    const unsigned threads = bx * by * bz;
    for (unsigned z = 0; z < gz; ++z) {
        for (unsigned y = 0; y < gy; ++y) {
            for (unsigned x = 0; x < gx; ++x) {
                std::barrier<> barrier(threads);
                block_barrier = &barrier;
                std::vector<std::thread> block;
                block.reserve(threads);
                for (unsigned t = 0; t < threads; ++t) {
                    block.emplace_back([&, t, x, y, z] {
                        blockIdx = {x, y, z};
                        threadIdx = {t % bx, (t / bx) % by, t / (bx * by)};
                        found->second(params);
                    });
                }
                for (auto& thread : block) {
                    thread.join();
                }
            }
        }
    }
    return 0;
}
