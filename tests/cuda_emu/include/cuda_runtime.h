// CPU emulation of the CUDA execution model, for running csrc/ kernels on a machine without a GPU.
//
// tests/cuda_emu/emulator.py compiles the csrc/ sources with g++ against this directory instead of the CUDA
// toolkit headers, after two textual rewrites: `kernel<<<grid, block, smem, stream>>>(args)` becomes
// `::relaxkv_emu::Launch(grid, block, smem, stream).run(kernel, args)` and
// `extern __shared__ T name[];` becomes `T* name = ::relaxkv_emu::dynamic_shared<T>();`.
//
// Every CUDA thread of a block is a fiber (ucontext) of the calling OS thread; blocks run one after the
// other. A fiber runs until it reaches a barrier or exits, so the emulation is deterministic; odd blocks
// run their threads in reverse order, so that a missing barrier shows as a wrong result in one of the
// two orders. What is emulated, and checked:
//   - threadIdx / blockIdx / blockDim / gridDim;
//   - __syncthreads(): a block barrier that exited threads leave; all arrivals of one phase must come
//     from the same call site (a divergent barrier is an error);
//   - __shfl_{xor,up,down,}_sync with a full mask and width 32: a warp barrier; every lane of a full
//     warp must take part (a shuffle in a partial warp, or with a lane that exited, is an error);
//   - a hang (threads waiting at a barrier nobody else will reach) is reported at once, with where;
//   - dynamic shared memory: filled with 0xff (NaN / -1) at every block start, with a guard after the
//     requested size that must be intact at every block end;
//   - launch configuration limits (1024 threads, 65535 in grid y/z, 227 KiB of shared memory);
//   - an exception thrown inside a kernel fails the launch.
// A failed launch is reported through cudaGetLastError(), as a real launch failure would be. Built with
// -fsanitize=address (tests/run_emulated_asan.sh), every out-of-bounds access is also reported.
//
// What it cannot show: timing, memory coalescing, the GPU memory model (fibers switch only at barriers:
// a race without a barrier shows only if one of the two orders exposes it), alignment faults of vector
// accesses. Those need the GPU tests (tests/ops/test_<op>.py on a device, tests/run_compute_sanitizer.sh).
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

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
inline constexpr size_t kSmemGuard = 64;
inline constexpr size_t kGuardPage = 4096;
#if defined(__SANITIZE_ADDRESS__)
inline constexpr size_t kStack = 1 << 20;  // AddressSanitizer's redzones need the room
#else
inline constexpr size_t kStack = 256 << 10;
#endif

// Thrown inside a CUDA thread once its launch has failed; caught at the thread's top.
struct Abort {};

struct Fiber;

// A barrier for `expected` threads (a block's __syncthreads, or a warp's shuffles); Block::drop() removes
// a thread that exited. Every arrival of a phase must come from the same call site (Block::wait).
struct Barrier {
    unsigned expected = 0, arrived = 0;
    const char* file = "";
    int line = 0;
    std::vector<Fiber*> waiters;

    void reset(unsigned n) {
        expected = n;
        arrived = 0;
        waiters.clear();
    }
};

struct Fiber {
    ucontext_t ctx;
    void* stack = nullptr;
#if defined(__SANITIZE_ADDRESS__)
    void* fake = nullptr;
#endif
    bool done = false, waiting = false;
    unsigned linear = 0;
    dim3 thread;
};

struct Warp {
    Barrier bar;
    unsigned size = 0;
    alignas(16) unsigned char slot[kWarp][16];
};

// One launch: its CUDA threads as fibers (ucontext), run by the calling OS thread one block at a time.
// A fiber runs until it waits at a barrier or exits; a barrier's last arrival makes its waiters
// runnable again. No fiber runnable and some not done: a hang, reported with where they wait.
struct Block {
    dim3 block;  // blockIdx of the block being run
    unsigned threads = 0;
    std::vector<Fiber> fibers;
    std::vector<std::unique_ptr<Warp>> warps;
    Barrier sync;                     // __syncthreads
    std::vector<unsigned char> smem;  // dynamic shared memory + guard
    size_t smem_bytes = 0;
    std::function<void()> body;       // the kernel with its arguments
    ucontext_t scheduler;
    Fiber* current = nullptr;
    bool failed = false;
    std::string error;
#if defined(__SANITIZE_ADDRESS__)
    void* main_fake = nullptr;  // AddressSanitizer's bookkeeping of the stack switches
    const void* main_bottom = nullptr;
    size_t main_size = 0;
#endif

    void fail(const std::string& what) {
        if (!failed) error = what;
        failed = true;
    }

    // Wait at `bar` (the current fiber); throws Abort when the launch failed meanwhile.
    void wait(Barrier& bar, const char* what, const char* file, int line) {
        if (bar.arrived == 0) {
            bar.file = file;
            bar.line = line;
        } else if (bar.line != line || std::strcmp(bar.file, file) != 0) {
            std::ostringstream msg;
            msg << "divergent " << what << ": " << file << ":" << line << " and " << bar.file << ":" << bar.line
                << " in the same phase";
            fail(msg.str());
            throw Abort{};
        }
        if (++bar.arrived == bar.expected) {
            release(bar);
            return;
        }
        Fiber* self = current;
        self->waiting = true;
        bar.waiters.push_back(self);
        yield();
        if (failed) throw Abort{};
    }

    // Returns whether other threads were waiting in `bar` when this one left it.
    bool drop(Barrier& bar) {
        --bar.expected;
        const bool waited = bar.arrived > 0;
        if (waited && bar.arrived == bar.expected) release(bar);
        return waited;
    }

    void release(Barrier& bar) {
        for (Fiber* f : bar.waiters) f->waiting = false;
        bar.waiters.clear();
        bar.arrived = 0;
    }

    Warp& warp_of(const Fiber& f) { return *warps[f.linear / kWarp]; }

    // scheduler -> fiber f, until it waits or exits
    void enter(Fiber& f) {
#if defined(__SANITIZE_ADDRESS__)
        __sanitizer_start_switch_fiber(&main_fake, f.stack, kStack);
#endif
        swapcontext(&scheduler, &f.ctx);
#if defined(__SANITIZE_ADDRESS__)
        __sanitizer_finish_switch_fiber(main_fake, nullptr, nullptr);
#endif
    }

    // current fiber -> scheduler; returns when the scheduler enters it again
    void yield() {
        Fiber* self = current;
#if defined(__SANITIZE_ADDRESS__)
        __sanitizer_start_switch_fiber(&self->fake, main_bottom, main_size);
#endif
        swapcontext(&self->ctx, &scheduler);
#if defined(__SANITIZE_ADDRESS__)
        __sanitizer_finish_switch_fiber(self->fake, &main_bottom, &main_size);
#endif
    }
};

inline thread_local Block* t_state = nullptr;
inline thread_local dim3 t_thread, t_block, t_block_dim, t_grid_dim;

inline cudaError_t g_last_error = cudaSuccess;
inline std::string g_last_message;

inline void set_error(cudaError_t err, const std::string& msg) {
    g_last_error = err;
    g_last_message = msg;
}

template <typename T>
T* dynamic_shared() {
    return reinterpret_cast<T*>(t_state->smem.data());
}

inline void fiber_main() {
    Block& st = *t_state;
    Fiber& self = *st.current;
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(nullptr, &st.main_bottom, &st.main_size);  // learns the scheduler's stack
#endif
    try {
        try {
            st.body();
        } catch (const Abort&) {
            throw;
        } catch (const std::exception& e) {
            st.fail(std::string("exception in a kernel: ") + e.what());
            throw Abort{};
        } catch (...) {
            st.fail("exception in a kernel (not a std::exception)");
            throw Abort{};
        }
        st.drop(st.sync);  // this thread has exited the kernel
        if (st.drop(st.warp_of(self).bar)) st.fail("a lane exited while the rest of its warp waited in a shuffle");
    } catch (const Abort&) {
    }
    self.done = true;
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_start_switch_fiber(nullptr, st.main_bottom, st.main_size);  // nullptr: this fiber is finished
#endif
    setcontext(&st.scheduler);
}

// ------------------------------------------------------------------------------------ launches

class Launch {
  public:
    Launch(dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) : grid_(grid), block_(block), smem_(smem) {}

    template <typename... P, typename... A>
    void run(void (*kernel)(P...), A&&... args) {
        std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
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

        Block st;
        st.threads = unsigned(threads);
        st.smem_bytes = smem_;
        st.smem.resize(smem_ + kSmemGuard);
        st.body = [&] { std::apply(kernel, params); };
        st.fibers.resize(st.threads);
        for (unsigned w = 0; w * kWarp < st.threads; ++w) st.warps.push_back(std::make_unique<Warp>());
        for (unsigned t = 0; t < st.threads; ++t) {
            Fiber& f = st.fibers[t];
            f.linear = t;
            f.thread = dim3(t % block_.x, (t / block_.x) % block_.y, t / (block_.x * block_.y));
            // the stack grows down onto a PROT_NONE guard page: an overflow faults instead of corrupting
            void* map = mmap(nullptr, kGuardPage + kStack, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (map == MAP_FAILED || mprotect(map, kGuardPage, PROT_NONE) != 0) {
                if (map != MAP_FAILED) munmap(map, kGuardPage + kStack);
                st.fail("cannot map a fiber stack");
                break;
            }
            f.stack = static_cast<char*>(map) + kGuardPage;
        }
        Block* outer = t_state;
        t_state = &st;
        t_block_dim = block_;
        t_grid_dim = grid_;
        const uint64_t n_blocks = uint64_t(grid_.x) * grid_.y * grid_.z;
        for (uint64_t blk = 0; blk < n_blocks && !st.failed; ++blk) {
            st.block = dim3(unsigned(blk % grid_.x), unsigned((blk / grid_.x) % grid_.y),
                            unsigned(blk / (uint64_t(grid_.x) * grid_.y)));
            run_block(st, blk % 2 == 1);
        }
        t_state = outer;
        for (Fiber& f : st.fibers)
            if (f.stack) munmap(static_cast<char*>(f.stack) - kGuardPage, kGuardPage + kStack);
        if (st.failed) set_error(cudaErrorLaunchFailure, "emulated kernel failed: " + st.error);
    }

  private:
    // Runs one block. Odd blocks schedule their threads in reverse order: a read of another thread's
    // shared-memory write with no barrier between them then sees the poison in one of the two orders.
    static void run_block(Block& st, bool reverse) {
        st.sync.reset(st.threads);
        for (size_t w = 0; w < st.warps.size(); ++w) {
            st.warps[w]->size = std::min<unsigned>(kWarp, st.threads - unsigned(w) * kWarp);
            st.warps[w]->bar.reset(st.warps[w]->size);
        }
        std::fill(st.smem.begin(), st.smem.begin() + st.smem_bytes, 0xff);
        std::fill(st.smem.begin() + st.smem_bytes, st.smem.end(), 0xa5);
        for (Fiber& f : st.fibers) {
            f.done = f.waiting = false;
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = f.stack;
            f.ctx.uc_stack.ss_size = kStack;
            f.ctx.uc_link = nullptr;
            makecontext(&f.ctx, fiber_main, 0);
        }
        t_block = st.block;
        for (;;) {
            bool ran = false, all_done = true;
            for (unsigned i = 0; i < st.threads; ++i) {
                Fiber& f = st.fibers[reverse ? st.threads - 1 - i : i];
                if (f.done) continue;
                all_done = false;
                if (f.waiting) continue;
                ran = true;
                st.current = &f;
                t_thread = f.thread;
                st.enter(f);
                if (st.failed) return;
            }
            if (all_done) break;
            if (!ran) {
                st.fail(hang_report(st));
                return;
            }
        }
        if (!std::all_of(st.smem.begin() + st.smem_bytes, st.smem.end(), [](unsigned char c) { return c == 0xa5; })) {
            std::ostringstream msg;
            msg << "block (" << st.block.x << ", " << st.block.y << ", " << st.block.z << ") wrote past its "
                << st.smem_bytes << " bytes of dynamic shared memory";
            st.fail(msg.str());
        }
    }

    static std::string hang_report(const Block& st) {
        std::ostringstream msg;
        msg << "hang in block (" << st.block.x << ", " << st.block.y << ", " << st.block.z << "): ";
        if (st.sync.arrived)
            msg << st.sync.arrived << " of " << st.sync.expected << " threads wait at __syncthreads() "
                << st.sync.file << ":" << st.sync.line << "; ";
        for (size_t w = 0; w < st.warps.size(); ++w) {
            const Barrier& b = st.warps[w]->bar;
            if (b.arrived)
                msg << "warp " << w << ": " << b.arrived << " of " << b.expected << " lanes wait at " << b.file << ":"
                    << b.line << "; ";
        }
        return msg.str();
    }

    dim3 grid_, block_;
    size_t smem_;
};

// ------------------------------------------------------------------------------------- warps

template <typename T, typename Src>
T exchange(unsigned mask, T v, int width, Src src_of, const char* file, int line) {
    static_assert(sizeof(T) <= 16 && std::is_trivially_copyable_v<T>, "a shuffled value is at most 16 bytes");
    Block& st = *t_state;
    Fiber& self = *st.current;
    Warp& w = st.warp_of(self);
    if (mask != 0xffffffffu || width != int(kWarp) || w.size != kWarp || w.bar.expected != kWarp) {
        std::ostringstream msg;
        msg << "warp shuffle at " << file << ":" << line << " needs a full warp of 32 active lanes, mask 0xffffffff"
            << " and width 32 (warp of " << w.size << " lanes, " << w.bar.expected << " active, mask 0x"
            << std::hex << mask << std::dec << ", width " << width << ")";
        st.fail(msg.str());
        throw Abort{};
    }
    const int lane = int(self.linear % kWarp);
    std::memcpy(w.slot[lane], &v, sizeof(T));
    st.wait(w.bar, "warp shuffle", file, line);
    const int src = src_of(lane);
    T out = v;
    if (src >= 0 && src < int(kWarp)) std::memcpy(&out, w.slot[src], sizeof(T));
    st.wait(w.bar, "warp shuffle", file, line);  // slots free again
    return out;
}

inline void syncthreads(const char* file, int line) { t_state->wait(t_state->sync, "__syncthreads()", file, line); }

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
// a source lane outside [0, 32) wraps modulo 32, as on the GPU
#define __shfl_sync(mask, v, src_lane, ...) \
    ::relaxkv_emu::exchange((mask), (v), ::relaxkv_emu::width_of(__VA_ARGS__), \
                            [&](int) { return int(src_lane) & int(::relaxkv_emu::kWarp - 1); }, __FILE__, __LINE__)

namespace relaxkv_emu {
constexpr int width_of(int width = int(kWarp)) { return width; }
}  // namespace relaxkv_emu

// ---------------------------------------------------------------------------- device functions

template <typename T>
inline T __ldg(const T* ptr) {
    return *ptr;
}

inline float atomicAdd(float* address, float value) {  // fibers switch only at barriers: no other thread runs
    const float old = *address;
    *address = old + value;
    return old;
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
    return relaxkv_emu::g_last_message.c_str();
}
