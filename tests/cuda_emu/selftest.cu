// Self-test of the CUDA emulation (tests/cuda_emu/test_emulator.py): `selftest CASE` runs one case's launches,
// then prints cudaGetLastError() (name and message), cudaGetLastError() once more, and the case's result.
// Host vectors stand in for device memory: the emulated kernels run in this process.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr unsigned kFull = 0xffffffffu;

template <typename T>
std::string join(const std::vector<T>& v) {
    std::ostringstream out;
    out.precision(17);
    for (const T& x : v) out << x << " ";
    return out.str();
}

// ------------------------------------------------------------------------------ semantics

// Each thread writes its indices and the launch dimensions at its global id, and counts itself.
__global__ void indices_kernel(int* out, float* writes) {
    const unsigned block = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    const unsigned tid = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    const unsigned rec[12] = {blockIdx.x,  blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z,
                              gridDim.x,   gridDim.y,  gridDim.z,  blockDim.x,  blockDim.y,  blockDim.z};
    for (int i = 0; i < 12; ++i) out[12 * (block * blockDim.x * blockDim.y * blockDim.z + tid) + i] = int(rec[i]);
    atomicAdd(writes, 1.0f);
}

// Tree sum of THREADS values per block through dynamic shared memory.
template <typename T, int THREADS>
__global__ void block_sum_kernel(const T* x, T* out) {
    extern __shared__ float partial[];
    const int t = threadIdx.x;
    partial[t] = x[blockIdx.x * THREADS + t];
    __syncthreads();
    for (int s = THREADS / 2; s > 0; s >>= 1) {
        if (t < s) partial[t] += partial[t + s];
        __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = partial[0];
}

__global__ void warp_sum_kernel(const float* x, float* out) {
    const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    float v = x[i];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
    out[i] = v;
}

// Inclusive scan of each warp's 64-bit values.
__global__ void scan_kernel(const int64_t* x, int64_t* out) {
    const int lane = threadIdx.x % 32;
    int64_t v = x[threadIdx.x];
    for (int o = 1; o < 32; o <<= 1) {
        const int64_t y = __shfl_up_sync(kFull, v, o);
        if (lane >= o) v += y;
    }
    out[threadIdx.x] = v;
}

// Rows of out: from lane 5, from lane 31 - lane, from lane + 33 (source lanes wrap modulo 32).
__global__ void shfl_kernel(const double* x, double* out) {
    const int lane = threadIdx.x;
    out[lane] = __shfl_sync(kFull, x[lane], 5);
    out[32 + lane] = __shfl_sync(kFull, x[lane], 31 - lane);
    out[64 + lane] = __shfl_sync(kFull, x[lane], lane + 33);
}

__global__ void shfl_up_down_kernel(const double* x, double* out) {
    const int lane = threadIdx.x;
    out[lane] = __shfl_up_sync(kFull, x[lane], 3);
    out[32 + lane] = __shfl_down_sync(kFull, x[lane], 3);
}

__global__ void atomic_kernel(float* total, float* old) {
    old[blockIdx.x * blockDim.x + threadIdx.x] = atomicAdd(total, 1.0f);
}

// Threads outside [lo, hi) return at once; the others rotate values through shared memory twice.
__global__ void early_exit_kernel(int lo, int hi, int* out) {
    extern __shared__ int ring[];
    const int n = hi - lo, k = int(threadIdx.x) - lo;
    if (k < 0 || k >= n) return;
    ring[k] = k;
    __syncthreads();
    const int v = ring[(k + 1) % n];
    __syncthreads();
    ring[k] = 10 * v;
    __syncthreads();
    out[threadIdx.x] = ring[(k + 1) % n];
}

// Reads shared memory before writing it: every block must see the 0xff poison, not the last block's zeros.
__global__ void repoison_kernel(int32_t* out) {
    extern __shared__ alignas(16) int32_t bits[];
    out[blockIdx.x * blockDim.x + threadIdx.x] = bits[threadIdx.x];
    __syncthreads();
    bits[threadIdx.x] = 0;
}

// A race: each thread reads its neighbour's shared-memory write with no barrier in between.
__global__ void missing_barrier_kernel(int32_t* out) {
    extern __shared__ int32_t slots[];
    const unsigned t = threadIdx.x;
    slots[t] = int32_t(t);
    out[blockIdx.x * blockDim.x + t] = slots[(t + 1) % blockDim.x];
}

// ------------------------------------------------------------------------------ errors

__global__ void divergent_kernel(int* out) {
    if (threadIdx.x < 16) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1;
}

__global__ void partial_mask_kernel(float* out) {
    float v = float(threadIdx.x);
    if (threadIdx.x < 16) v = __shfl_xor_sync(0x0000ffffu, v, 1);
    out[threadIdx.x] = v;
}

__global__ void width_kernel(float* out) { out[threadIdx.x] = __shfl_xor_sync(kFull, float(threadIdx.x), 1, 16); }

// Lane 31 returns while lanes 0..30 wait for it in a shuffle (threads run in order until they wait).
__global__ void lane_exit_kernel(float* out) {
    if (threadIdx.x == 31) return;
    out[threadIdx.x] = __shfl_xor_sync(kFull, float(threadIdx.x), 1);
}

// Lanes 0..15 wait at __syncthreads() for lanes 16..31, which wait in a shuffle for lanes 0..15.
__global__ void hang_kernel(float* out) {
    float v = float(threadIdx.x);
    if (threadIdx.x < 16) {
        __syncthreads();
    } else {
        v = __shfl_xor_sync(kFull, v, 1);
    }
    out[threadIdx.x] = v;
}

// Launched with one float of shared memory per thread but the last.
__global__ void overrun_kernel() {
    extern __shared__ float buf[];
    buf[threadIdx.x] = 1.0f;
}

__device__ int g_ran = 0;
__global__ void ran_kernel() { g_ran = 1; }

__global__ void throw_kernel(int* out) {
    if (threadIdx.x == 5) throw std::runtime_error("thrown by thread 5");
    __syncthreads();
    out[threadIdx.x] = 1;
}

__global__ void throw_int_kernel() {
    if (threadIdx.x == 3) throw 42;
}

// ------------------------------------------------------------------------------ cases

std::string indices() {
    std::vector<int> out(3 * 2 * 2 * 8 * 5 * 12, -1);
    float writes = 0;
    indices_kernel<<<dim3(3, 2, 2), dim3(8, 5)>>>(out.data(), &writes);
    return join(out) + std::to_string(writes);
}

std::string block_sum() {
    std::vector<float> x(3 * 256), out(3, -1);
    for (size_t i = 0; i < x.size(); ++i) x[i] = float(i);
    cudaStream_t stream = nullptr;
    block_sum_kernel<float, 256><<<dim3(3), 256, 256 * sizeof(float), stream>>>(x.data(), out.data());
    return join(out);
}

std::string warp_sum() {
    std::vector<float> x(128), out(128, -1);
    for (size_t i = 0; i < x.size(); ++i) x[i] = float(i);
    warp_sum_kernel<<<2, 64>>>(x.data(), out.data());
    return join(out);
}

std::string shfl_up_scan() {
    std::vector<int64_t> x(64), out(64, -1);
    for (size_t i = 0; i < x.size(); ++i) x[i] = (int64_t(i + 1) << 32) + int64_t(i);
    scan_kernel<<<1, 64>>>(x.data(), out.data());
    return join(out);
}

std::vector<double> lanes() {
    std::vector<double> x(32);
    for (int i = 0; i < 32; ++i) x[i] = 1.5 * i + 0.25;
    return x;
}

std::string shfl() {
    const std::vector<double> x = lanes();
    std::vector<double> out(3 * 32, -1);
    shfl_kernel<<<1, 32>>>(x.data(), out.data());
    return join(out);
}

std::string shfl_up_down() {
    const std::vector<double> x = lanes();
    std::vector<double> out(2 * 32, -1);
    shfl_up_down_kernel<<<1, 32>>>(x.data(), out.data());
    return join(out);
}

std::string atomic_add() {
    float total = 0;
    std::vector<float> old(4 * 256, -1);
    atomic_kernel<<<4, 256>>>(&total, old.data());
    return std::to_string(total) + " " + join(old);
}

std::string early_exit(int lo, int hi) {
    std::vector<int> out(64, -1);
    early_exit_kernel<<<1, 64, (hi - lo) * sizeof(int)>>>(lo, hi, out.data());
    return join(out);
}

std::string smem_repoison() {
    std::vector<int32_t> out(3 * 32, 0);
    repoison_kernel<<<3, 32, 32 * sizeof(int32_t)>>>(out.data());
    return join(out);
}

std::string missing_barrier() {
    std::vector<int32_t> out(2 * 32, 0);
    missing_barrier_kernel<<<2, 32, 32 * sizeof(int32_t)>>>(out.data());
    return join(out);
}

// A failed launch leaves nothing behind: the next one runs normally.
std::string recover() {
    std::vector<int> sink(32);
    divergent_kernel<<<1, 32>>>(sink.data());
    const std::string first = cudaGetErrorName(cudaGetLastError());
    return first + " " + warp_sum();
}

std::string ran_after(dim3 grid, dim3 block, size_t smem) {
    g_ran = 0;
    ran_kernel<<<grid, block, smem>>>();
    return std::to_string(g_ran);
}

// An error stays until it is read: a later successful launch does not clear it.
std::string error_persists() {
    ran_kernel<<<1, 2048>>>();
    return ran_after(1, 32, 0);
}

const std::map<std::string, std::function<std::string()>> kCases = {
    {"indices", indices},
    {"block_sum", block_sum},
    {"warp_sum", warp_sum},
    {"shfl_up_scan", shfl_up_scan},
    {"shfl", shfl},
    {"shfl_up_down", shfl_up_down},
    {"atomic_add", atomic_add},
    {"early_exit_high", [] { return early_exit(0, 40); }},
    {"early_exit_low", [] { return early_exit(24, 64); }},
    {"smem_repoison", smem_repoison},
    {"missing_barrier", missing_barrier},
    {"recover", recover},
    {"error_persists", error_persists},
    {"divergent_sync", [] {
         std::vector<int> out(32);
         divergent_kernel<<<1, 32>>>(out.data());
         return std::string();
     }},
    {"partial_warp", [] {
         std::vector<float> x(48), out(48);
         warp_sum_kernel<<<1, 48>>>(x.data(), out.data());
         return std::string();
     }},
    {"partial_mask", [] {
         std::vector<float> out(32);
         partial_mask_kernel<<<1, 32>>>(out.data());
         return std::string();
     }},
    {"shfl_width", [] {
         std::vector<float> out(32);
         width_kernel<<<1, 32>>>(out.data());
         return std::string();
     }},
    {"lane_exit", [] {
         std::vector<float> out(32);
         lane_exit_kernel<<<1, 32>>>(out.data());
         return std::string();
     }},
    {"hang", [] {
         std::vector<float> out(32);
         hang_kernel<<<1, 32>>>(out.data());
         return std::string();
     }},
    {"smem_overrun", [] {
         overrun_kernel<<<2, 32, 31 * sizeof(float)>>>();
         return std::string();
     }},
    {"config_threads", [] { return ran_after(1, 2048, 0); }},
    {"config_grid_y", [] { return ran_after(dim3(1, 65536), 32, 0); }},
    {"config_smem", [] { return ran_after(1, 32, 227 * 1024 + 1); }},
    {"exception", [] {
         std::vector<int> out(64);
         throw_kernel<<<1, 64>>>(out.data());
         return std::string();
     }},
    {"exception_not_std", [] {
         throw_int_kernel<<<1, 32>>>();
         return std::string();
     }},
};

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2 || !kCases.count(argv[1])) {
        std::fprintf(stderr, "usage: %s CASE\n", argv[0]);
        return 2;
    }
    const std::string result = kCases.at(argv[1])();
    const cudaError_t err = cudaGetLastError();
    std::printf("error: %s\nmessage: %s\n", cudaGetErrorName(err), cudaGetErrorString(err));
    std::printf("after: %s\nresult: %s\n", cudaGetErrorName(cudaGetLastError()), result.c_str());
    return 0;
}
