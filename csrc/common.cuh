// Shared helpers of the relaxkv CUDA launchers and kernels: errors that become Python exceptions, the one
// dtype / access-width dispatch, 16-byte vector accesses, strided row views. No torch headers (README, Building).
//
// pybind11 translates std::runtime_error into RuntimeError and std::invalid_argument into ValueError, so a
// launcher only has to throw. Launchers check what keeps the launch valid and memory-safe (grid and block
// limits, shared memory, rows that would be written out of bounds); everything else is validated once, in
// the public Python ops.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <stdexcept>
#include <string>

#include "launchers.h"

namespace relaxkv {

constexpr int64_t kMaxGridX = INT32_MAX;    // gridDim.x limit
constexpr int64_t kMaxGridYZ = 65535;       // gridDim.y / gridDim.z limit
constexpr size_t kMaxSmem = 48 * 1024;      // dynamic shared memory without the opt-in attribute
constexpr int kMaxHeadDim = 512;            // every kernel's per-head arrays are sized for this

// Throws std::runtime_error("relaxkv <op>: <what> failed: <cuda error>") when err != cudaSuccess.
inline void check_cuda(cudaError_t err, const char* op, const char* what) {
    if (err != cudaSuccess) {
        std::ostringstream msg;
        msg << "relaxkv " << op << ": " << what << " failed: " << cudaGetErrorName(err) << " ("
            << cudaGetErrorString(err) << ")";
        throw std::runtime_error(msg.str());
    }
}

// Raise after a kernel launch if the launch itself failed (bad configuration, no kernel image for
// this GPU, ...). Asynchronous faults surface at the next synchronising call, as with any CUDA op.
#define RELAXKV_CHECK_LAUNCH(op) ::relaxkv::check_cuda(cudaGetLastError(), (op), "kernel launch")

// Throws std::invalid_argument (Python ValueError) with the op name when cond is false.
#define RELAXKV_CHECK_ARG(op, cond, message)                                    \
    do {                                                                        \
        if (!(cond)) {                                                          \
            std::ostringstream relaxkv_msg_;                                    \
            relaxkv_msg_ << "relaxkv " << (op) << ": " << message;              \
            throw std::invalid_argument(relaxkv_msg_.str());                    \
        }                                                                       \
    } while (0)

// lo <= value <= hi, else ValueError "<name>: expected lo .. hi, got value" (launch limits, row ranges).
inline void check_range(const char* op, const char* name, int64_t value, int64_t lo, int64_t hi) {
    RELAXKV_CHECK_ARG(op, value >= lo && value <= hi, name << ": expected " << lo << " .. " << hi << ", got " << value);
}

// An even head_dim in [2, kMaxHeadDim]: the pair loops and the fixed-size per-pair tables rely on it.
inline void check_head_dim(const char* op, int64_t head_dim) {
    RELAXKV_CHECK_ARG(op, head_dim >= 2 && head_dim % 2 == 0 && head_dim <= kMaxHeadDim,
                      "head_dim: expected an even number in [2, " << kMaxHeadDim << "], got " << head_dim);
}

// Every launcher calls this first: a clear error instead of a launch failure on CPU-only hosts.
inline void require_device(const char* op) {
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess || n == 0) {
        cudaGetLastError();
        std::ostringstream msg;
        msg << "relaxkv " << op << ": no CUDA device available (cudaGetDeviceCount: "
            << (err != cudaSuccess ? cudaGetErrorString(err) : "0 devices") << ")";
        throw std::runtime_error(msg.str());
    }
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// fp32 <-> storage type; math is always fp32, stores round to nearest even.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// Quiet NaN: what a kernel writes into an output row it has no valid source for.
__device__ __forceinline__ float nan_f32() { return __int_as_float(0x7fc00000); }

// FP8 pools (relaxkv_kernels/ops/fp8.py): e4m3fn codes, one power-of-two fp32 scale per row and head. The
// scale of a row whose largest magnitude is amax: 2^(E - 8) for amax = f * 2^E with f <= 1.75 (448 = 1.75 * 2^8),
// else 2^(E - 7), the exponent clamped to [-126, 127]; *inv gets 1 / scale (exact: powers of two).
__device__ __forceinline__ float fp8_scale(float amax, float* inv) {
    const int bits = __float_as_int(amax);
    int e = ((bits >> 23) & 0xFF) - 135 + ((bits & 0x7FFFFF) > 0x600000 ? 1 : 0);
    e = e < -126 ? -126 : (e > 127 ? 127 : e);
    *inv = __int_as_float((127 - e) << 23);
    return __int_as_float((e + 127) << 23);
}

// The largest finite value of the compute type T rounded down to 3 mantissa bits (an e4m3 mantissa): 1.875 * 2^127
// for fp32 and bf16, 1.875 * 2^15 for fp16 (relaxkv_kernels/ops/fp8.py: fp8_room).
template <typename T>
__device__ __forceinline__ float finite_max_e4m3();
template <>
__device__ __forceinline__ float finite_max_e4m3<float>() { return 3.19014719e38f; }
template <>
__device__ __forceinline__ float finite_max_e4m3<__half>() { return 61440.0f; }
template <>
__device__ __forceinline__ float finite_max_e4m3<__nv_bfloat16>() { return 3.19014719e38f; }

// The largest e4m3 value whose product with a row's scale (1 / inv, a power of two) is finite in T, at most 448:
// finite_max_e4m3<T>() * inv (exact; inf past fp32, which the min takes to 448). A row in T's top binade would
// otherwise round up past T's largest finite value (65000 in fp16: 253.9 * 2^8 rounds to 256 * 2^8, inf);
// ops/fp8.py's fp8_limit.
template <typename T>
__device__ __forceinline__ float fp8_limit(float inv) {
    return fminf(finite_max_e4m3<T>() * inv, 448.0f);
}

// The e4m3fn code of y clamped to [-limit, limit] (limit <= 448, fp8_limit), rounded to nearest even, from the bits
// (the same codes as torch and the Triton kernels on every device): normal codes round the fp32 mantissa to 3 bits
// and re-bias the exponent; below 2^-6 the code is round(|y| * 2^9), to nearest even; NaN gives the NaN code.
__device__ __forceinline__ uint8_t fp8_encode(float y, float limit) {
    const int bits = __float_as_int(y);
    int a = bits & 0x7FFFFFFF;
    if (a <= 0x7F800000) a = min(a, __float_as_int(limit));  // |y| clamped; a NaN stays one
    int code;
    if (a > 0x7F800000) {
        code = 0x7F;
    } else if (a >= 0x3C800000) {  // 2^-6, e4m3's smallest normal
        code = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3);
    } else {
        code = int(rintf(fabsf(y) * 512.0f));  // rintf: to nearest even
    }
    return uint8_t(code | ((bits >> 24) & 0x80));
}

// The value of an e4m3fn code (the NaN codes 0x7F and 0xFF decode to NaN).
__device__ __forceinline__ float fp8_decode(uint8_t c) {
    const int mag = c & 0x7F;
    float x;
    if (mag == 0x7F)
        x = nan_f32();
    else if (mag >= 8)
        x = __int_as_float((mag << 20) + (120 << 23));
    else
        x = float(mag) * 0.001953125f;  // subnormal: mag * 2^-9
    return (c & 0x80) ? -x : x;
}

// A [B, N, H, D] tensor as the kernels see it: base address and the element strides of B, N and H; D is
// contiguous (the Python wrappers copy read-only inputs whose last stride is not 1).
struct Rows {
    uintptr_t ptr;
    int64_t sb, sn, sh;

    Rows() = default;
    Rows(uintptr_t p, const Strides3& s) : ptr(p), sb(s[0]), sn(s[1]), sh(s[2]) {}

    template <typename T>
    __device__ __forceinline__ T* at(int64_t b, int64_t n, int64_t h = 0) const {
        return reinterpret_cast<T*>(ptr) + b * sb + n * sn + h * sh;
    }
};

#ifndef __CUDACC__
// The CPU emulation of tests/cuda_emu (g++) has no store intrinsics: a plain 16-byte store there.
inline void __stwb(uint4* p, uint4 v) { *p = v; }
#endif

// How a kernel moves N adjacent elements of T: one 16-byte access (WIDE, N = 16 / sizeof(T); the launcher
// checked with wide_ok that every base address and stride allows it) or N = 2 element accesses (any
// alignment). Raw is the N elements as stored: loading several Raw before converting any keeps more
// loads in flight in fewer registers. 16-byte stores go through __stwb: st.global.wb, PTX's default store
// cache operation, which ptxas 13 encodes as STG.E.128.STRONG.SM (a plain uint4 assignment gives the weak
// STG.E.128, but in gather_kv_rope nvcc split it into 4- and 2-byte stores).
template <typename T_, bool WIDE>
struct Vec {
    using T = T_;
    static constexpr int N = WIDE ? int(16 / sizeof(T)) : 2;
    struct alignas(WIDE ? 16 : alignof(T)) Raw {
        T e[N];
    };

    __device__ static __forceinline__ Raw load(const T* __restrict__ p) {
        Raw r;
        if constexpr (WIDE) {
            *reinterpret_cast<uint4*>(&r) = __ldg(reinterpret_cast<const uint4*>(p));
        } else {
#pragma unroll
            for (int i = 0; i < N; ++i) r.e[i] = p[i];
        }
        return r;
    }
    __device__ static __forceinline__ void store(T* __restrict__ p, const Raw& r) {
        if constexpr (WIDE) {
            __stwb(reinterpret_cast<uint4*>(p), *reinterpret_cast<const uint4*>(&r));
        } else {
#pragma unroll
            for (int i = 0; i < N; ++i) p[i] = r.e[i];
        }
    }
    __device__ static __forceinline__ void unpack(const Raw& r, float (&x)[N]) {
#pragma unroll
        for (int i = 0; i < N; ++i) x[i] = to_float(r.e[i]);
    }
    __device__ static __forceinline__ Raw pack(const float (&x)[N]) {
        Raw r;
#pragma unroll
        for (int i = 0; i < N; ++i) r.e[i] = from_float<T>(x[i]);
        return r;
    }
    __device__ static __forceinline__ void load(const T* __restrict__ p, float (&x)[N]) { unpack(load(p), x); }
    __device__ static __forceinline__ void store(T* __restrict__ p, const float (&x)[N]) { store(p, pack(x)); }
    __device__ static __forceinline__ void copy(T* __restrict__ dst, const T* __restrict__ src) {
        store(dst, load(src));
    }
};

inline int64_t dtype_bytes(int dtype) { return dtype == kFloat32 ? 4 : 2; }

// Whether accesses of n elements of elem_bytes each fit every tensor of `rows`: each base address a multiple of
// n * elem_bytes bytes, each stride a multiple of n elements.
inline bool rows_aligned(int64_t n, int64_t elem_bytes, std::initializer_list<Rows> rows) {
    bool ok = true;
    for (const Rows& r : rows)
        ok = ok && r.ptr % (n * elem_bytes) == 0 && r.sb % n == 0 && r.sn % n == 0 && r.sh % n == 0;
    return ok;
}

// Whether 16-byte accesses fit every tensor of `rows`: head_dim, each base address and each stride a
// multiple of 16 bytes.
inline bool wide_ok(int dtype, int64_t head_dim, std::initializer_list<Rows> rows) {
    const int64_t per16 = 16 / dtype_bytes(dtype);
    return head_dim % per16 == 0 && rows_aligned(per16, dtype_bytes(dtype), rows);
}

// Whether a launcher's pools are FP8 (uint8_t e4m3 codes): their fp32 scales given (non-null). ValueError when only
// one of the two is.
inline bool fp8_pools(const char* op, uintptr_t k_scale, uintptr_t v_scale) {
    const bool fp8 = k_scale != 0;
    RELAXKV_CHECK_ARG(op, fp8 == (v_scale != 0), "k_scale, v_scale: expected both (FP8 pools) or neither, got "
                                                     << (fp8 ? "k_scale only" : "v_scale only"));
    return fp8;
}

template <typename T>
struct TypeTag {
    using type = T;
};

// The one dtype switch of the launchers: launch(Vec<T, wide>{}) with T the element type of `dtype`
// (launchers.h DType); ValueError for an unknown code.
template <typename F>
void dispatch_vec(const char* op, int dtype, bool wide, F&& launch) {
    const auto with = [&](auto tag) {
        using T = typename decltype(tag)::type;
        if (wide)
            launch(Vec<T, true>{});
        else
            launch(Vec<T, false>{});
    };
    switch (dtype) {
        case kFloat32: return with(TypeTag<float>{});
        case kFloat16: return with(TypeTag<__half>{});
        case kBFloat16: return with(TypeTag<__nv_bfloat16>{});
    }
    RELAXKV_CHECK_ARG(op, false, "dtype code: expected 0 (float32), 1 (float16) or 2 (bfloat16), got " << dtype);
}

// Sum over the 32 lanes of a warp (every lane gets the result).
template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

}  // namespace relaxkv
