// CPU emulation of the CUDA execution model, for running csrc/ kernels on a machine without a GPU.
//
// tests/cuda_emulator.py compiles the csrc/ sources with g++ against this directory instead of the CUDA
// toolkit headers, after two textual rewrites: `kernel<<<grid, block, smem, stream>>>(args)` becomes
// `::relaxkv_emu::Launch(grid, block, smem, stream).run(kernel, args)` and
// `extern __shared__ T name[];` becomes `T* name = ::relaxkv_emu::dynamic_shared<T>();`.
//
// Every CUDA thread of a launch is an OS thread; blocks run one after the other, so shared memory is
// one buffer per launch. What is emulated, and checked:
//   - threadIdx / blockIdx / blockDim / gridDim;
//   - __syncthreads(): a block barrier that exited threads leave; all arrivals of one phase must come
//     from the same call site (a divergent barrier is an error, not a hang);
//   - __shfl_{xor,up,down,}_sync with a full mask and width 32: a warp barrier; every lane of a full
//     warp must take part (a shuffle in a partial warp or after a lane exited is an error);
//   - dynamic shared memory: filled with 0xff (NaN / -1) at every block start, with a guard after the
//     requested size that must be intact at every block end;
//   - launch configuration limits (1024 threads, 65535 in grid y/z, 227 KiB of shared memory);
//   - a barrier nobody completes within 60 s is reported as a hang.
// A failed launch is reported through cudaGetLastError(), as a real launch failure would be.
//
// What it cannot show: timing, memory coalescing, the GPU memory model (this is sequentially
// consistent under mutexes), alignment faults of vector accesses, races between warps without a
// barrier. Those need the GPU tests (tests/test_cuda_ops.py on a device).
#pragma once

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

// ---------------------------------------------------------------------------------------- types

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct float2 {
    float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};

enum cudaError_t {
    cudaSuccess = 0,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorLaunchFailure = 719,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace relaxkv_emu {

// ------------------------------------------------------------------------------- launch state

inline constexpr unsigned kWarp = 32;
inline constexpr auto kHang = std::chrono::seconds(60);
inline constexpr size_t kSmemGuard = 64;

// Thrown in every thread of a launch once it has failed; caught at the thread's top.
struct Abort {};

struct LaunchState {
    std::atomic<bool> failed{false};
    std::mutex m;
    std::string error;

    void fail(const std::string& what) {
        std::lock_guard<std::mutex> lk(m);
        if (!failed.exchange(true)) error = what;
    }
};

// A barrier for `expected` threads. drop() removes a thread (it exited). Every arrival of a phase
// must come from the same call site.
class Barrier {
  public:
    void reset(unsigned n) {
        expected_ = n;
        arrived_ = 0;
    }
    unsigned expected() {
        std::lock_guard<std::mutex> lk(m_);
        return expected_;
    }

    void wait(LaunchState& launch, const char* what, const char* file, int line) {
        std::unique_lock<std::mutex> lk(m_);
        if (arrived_ == 0) {
            file_ = file;
            line_ = line;
        } else if (line_ != line || std::strcmp(file_, file) != 0) {
            std::ostringstream msg;
            msg << "divergent " << what << ": " << file << ":" << line << " and " << file_ << ":" << line_
                << " in the same phase";
            launch.fail(msg.str());
            cv_.notify_all();
            throw Abort{};
        }
        if (++arrived_ == expected_) {
            release();
            return;
        }
        const uint64_t phase = phase_;
        const auto deadline = std::chrono::steady_clock::now() + kHang;
        while (phase_ == phase) {
            if (launch.failed) throw Abort{};
            if (cv_.wait_until(lk, std::min(deadline, std::chrono::steady_clock::now() +
                                                          std::chrono::milliseconds(20))) ==
                    std::cv_status::timeout &&
                std::chrono::steady_clock::now() >= deadline) {
                std::ostringstream msg;
                msg << what << " at " << file << ":" << line << " never completed (" << arrived_ << " of "
                    << expected_ << " threads arrived)";
                launch.fail(msg.str());
                throw Abort{};
            }
        }
    }

    // Returns whether other threads were waiting in the barrier when this one left.
    bool drop() {
        std::lock_guard<std::mutex> lk(m_);
        --expected_;
        const bool waited = arrived_ > 0;
        if (waited && arrived_ == expected_) release();
        return waited;
    }

  private:
    void release() {
        arrived_ = 0;
        ++phase_;
        cv_.notify_all();
    }

    std::mutex m_;
    std::condition_variable cv_;
    unsigned expected_ = 0, arrived_ = 0;
    uint64_t phase_ = 0;
    const char* file_ = "";
    int line_ = 0;
};

struct Warp {
    Barrier bar;
    unsigned size = 0;
    alignas(16) unsigned char slot[kWarp][16];
};

struct Block {
    LaunchState launch;
    Barrier sync;                 // __syncthreads
    Barrier done;                 // end of a block: every thread, never dropped
    std::vector<std::unique_ptr<Warp>> warps;
    std::vector<unsigned char> smem;  // dynamic shared memory + guard
    size_t smem_bytes = 0;
    unsigned threads = 0;

    void start_block() {  // by one thread, while no other thread runs
        sync.reset(threads);
        for (size_t w = 0; w < warps.size(); ++w) {
            warps[w]->size = std::min<unsigned>(kWarp, threads - unsigned(w) * kWarp);
            warps[w]->bar.reset(warps[w]->size);
        }
        std::fill(smem.begin(), smem.begin() + smem_bytes, 0xff);
        std::fill(smem.begin() + smem_bytes, smem.end(), 0xa5);
    }
    bool guard_intact() const {
        return std::all_of(smem.begin() + smem_bytes, smem.end(), [](unsigned char c) { return c == 0xa5; });
    }
};

inline thread_local dim3 t_thread, t_block, t_block_dim, t_grid_dim;
inline thread_local unsigned t_linear = 0;
inline thread_local Block* t_state = nullptr;

inline cudaError_t g_last_error = cudaSuccess;
inline std::string g_last_message;
inline std::mutex g_error_mutex;

inline void set_error(cudaError_t err, const std::string& msg) {
    std::lock_guard<std::mutex> lk(g_error_mutex);
    g_last_error = err;
    g_last_message = msg;
}

template <typename T>
T* dynamic_shared() {
    return reinterpret_cast<T*>(t_state->smem.data());
}

// ------------------------------------------------------------------------------------ launches

class Launch {
  public:
    Launch(dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) : grid_(grid), block_(block), smem_(smem) {}

    template <typename... P, typename... A>
    void run(void (*kernel)(P...), A&&... args) {
        const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
        const uint64_t threads = uint64_t(block_.x) * block_.y * block_.z;
        std::ostringstream bad;
        if (threads == 0 || threads > 1024 || block_.z > 64)
            bad << "block " << block_.x << "x" << block_.y << "x" << block_.z << " (at most 1024 threads, z <= 64)";
        else if (grid_.x == 0 || grid_.y == 0 || grid_.z == 0 || grid_.y > 65535 || grid_.z > 65535)
            bad << "grid " << grid_.x << "x" << grid_.y << "x" << grid_.z << " (y, z <= 65535, none 0)";
        else if (smem_ > 227 * 1024)
            bad << smem_ << " bytes of dynamic shared memory (at most 227 KiB)";
        if (!bad.str().empty()) {
            set_error(cudaErrorInvalidConfiguration, "invalid launch configuration: " + bad.str());
            return;
        }

        Block state;
        state.threads = unsigned(threads);
        for (unsigned w = 0; w * kWarp < state.threads; ++w) state.warps.push_back(std::make_unique<Warp>());
        state.smem_bytes = smem_;
        state.smem.resize(smem_ + kSmemGuard);
        state.done.reset(state.threads);
        state.start_block();
        const uint64_t n_blocks = uint64_t(grid_.x) * grid_.y * grid_.z;

        std::vector<std::thread> pool;
        pool.reserve(state.threads);
        for (unsigned t = 0; t < state.threads; ++t)
            pool.emplace_back([&, t] { thread_main(kernel, params, state, n_blocks, t); });
        for (auto& th : pool) th.join();
        if (state.launch.failed) set_error(cudaErrorLaunchFailure, "emulated kernel failed: " + state.launch.error);
    }

  private:
    template <typename K, typename Tuple>
    void thread_main(K kernel, const Tuple& params, Block& state, uint64_t n_blocks, unsigned t) {
        t_state = &state;
        t_linear = t;
        t_block_dim = block_;
        t_grid_dim = grid_;
        t_thread = dim3(t % block_.x, (t / block_.x) % block_.y, t / (block_.x * block_.y));
        Warp& warp = *state.warps[t / kWarp];
        try {
            for (uint64_t blk = 0; blk < n_blocks; ++blk) {
                t_block = dim3(unsigned(blk % grid_.x), unsigned((blk / grid_.x) % grid_.y),
                               unsigned(blk / (uint64_t(grid_.x) * grid_.y)));
                try {
                    std::apply(kernel, params);
                } catch (const Abort&) {
                    throw;
                } catch (const std::exception& e) {
                    state.launch.fail(e.what());
                    throw Abort{};
                }
                state.sync.drop();  // this thread has exited the kernel
                if (warp.bar.drop()) {
                    state.launch.fail("a lane exited while the rest of its warp waited in a shuffle");
                    throw Abort{};
                }
                end_block(state, blk, n_blocks);
            }
        } catch (const Abort&) {
        }
        t_state = nullptr;
    }

    // The last thread to finish a block checks the shared-memory guard and sets up the next block.
    void end_block(Block& state, uint64_t blk, uint64_t n_blocks) {
        static constexpr char kSite[] = "end of block";
        if (t_linear == 0) {
            // thread 0 waits for the others, then resets while they wait on the second phase
            state.done.wait(state.launch, kSite, kSite, 0);
            if (!state.guard_intact()) {
                std::ostringstream msg;
                msg << "block (" << t_block.x << ", " << t_block.y << ", " << t_block.z
                    << ") wrote past its " << state.smem_bytes << " bytes of dynamic shared memory";
                state.launch.fail(msg.str());
                throw Abort{};
            }
            if (blk + 1 < n_blocks) state.start_block();
            state.done.wait(state.launch, kSite, kSite, 1);
        } else {
            state.done.wait(state.launch, kSite, kSite, 0);
            state.done.wait(state.launch, kSite, kSite, 1);
        }
    }

    dim3 grid_, block_;
    size_t smem_;
};

// ------------------------------------------------------------------------------------- warps

template <typename T, typename Src>
T exchange(unsigned mask, T v, int width, Src src_of, const char* file, int line) {
    static_assert(sizeof(T) <= 16 && std::is_trivially_copyable_v<T>, "a shuffled value is at most 16 bytes");
    Block& state = *t_state;
    Warp& w = *state.warps[t_linear / kWarp];
    if (mask != 0xffffffffu || width != int(kWarp) || w.size != kWarp || w.bar.expected() != kWarp) {
        std::ostringstream msg;
        msg << "warp shuffle at " << file << ":" << line << " needs a full warp of 32 active lanes, mask 0xffffffff"
            << " and width 32 (warp of " << w.size << " lanes, " << w.bar.expected() << " active, mask 0x"
            << std::hex << mask << std::dec << ", width " << width << ")";
        state.launch.fail(msg.str());
        throw Abort{};
    }
    const int lane = int(t_linear % kWarp);
    std::memcpy(w.slot[lane], &v, sizeof(T));
    w.bar.wait(state.launch, "warp shuffle", file, line);
    const int src = src_of(lane);
    T out = v;
    if (src >= 0 && src < int(kWarp)) std::memcpy(&out, w.slot[src], sizeof(T));
    w.bar.wait(state.launch, "warp shuffle", file, line);  // slots free again
    return out;
}

inline void syncthreads(const char* file, int line) {
    t_state->sync.wait(t_state->launch, "__syncthreads()", file, line);
}

}  // namespace relaxkv_emu

#define threadIdx (::relaxkv_emu::t_thread)
#define blockIdx (::relaxkv_emu::t_block)
#define blockDim (::relaxkv_emu::t_block_dim)
#define gridDim (::relaxkv_emu::t_grid_dim)
#define warpSize 32

#define __syncthreads() ::relaxkv_emu::syncthreads(__FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, lane_mask, ...) \
    ::relaxkv_emu::exchange((mask), (v), ::relaxkv_emu::width_of(__VA_ARGS__), \
                            [&](int l) { return l ^ int(lane_mask); }, __FILE__, __LINE__)
#define __shfl_up_sync(mask, v, delta, ...) \
    ::relaxkv_emu::exchange((mask), (v), ::relaxkv_emu::width_of(__VA_ARGS__), \
                            [&](int l) { return l - int(delta); }, __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, delta, ...) \
    ::relaxkv_emu::exchange((mask), (v), ::relaxkv_emu::width_of(__VA_ARGS__), \
                            [&](int l) { return l + int(delta); }, __FILE__, __LINE__)
#define __shfl_sync(mask, v, src_lane, ...) \
    ::relaxkv_emu::exchange((mask), (v), ::relaxkv_emu::width_of(__VA_ARGS__), \
                            [&](int) { return int(src_lane); }, __FILE__, __LINE__)

namespace relaxkv_emu {
constexpr int width_of(int width = int(kWarp)) { return width; }
}  // namespace relaxkv_emu

// ---------------------------------------------------------------------------- device functions

template <typename T>
inline T __ldg(const T* ptr) {
    return *ptr;
}

inline float atomicAdd(float* address, float value) {
    return std::atomic_ref<float>(*address).fetch_add(value);
}

using std::isnan;

inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }

template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
    return b < a ? b : a;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
    return a < b ? b : a;
}

// ------------------------------------------------------------------------------- runtime API

inline cudaError_t cudaGetDeviceCount(int* count) {
    *count = 1;  // the emulated device
    return cudaSuccess;
}

inline cudaError_t cudaGetLastError() {
    std::lock_guard<std::mutex> lk(relaxkv_emu::g_error_mutex);
    const cudaError_t err = relaxkv_emu::g_last_error;
    relaxkv_emu::g_last_error = cudaSuccess;
    return err;
}

inline const char* cudaGetErrorName(cudaError_t err) {
    switch (err) {
        case cudaSuccess: return "cudaSuccess";
        case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
        default: return "cudaErrorLaunchFailure";
    }
}

// The message of the last failed launch (an emulator diagnosis rather than the CUDA wording).
inline const char* cudaGetErrorString(cudaError_t err) {
    if (err == cudaSuccess) return "no error";
    thread_local std::string copy;
    std::lock_guard<std::mutex> lk(relaxkv_emu::g_error_mutex);
    copy = relaxkv_emu::g_last_message;
    return copy.c_str();
}
