// Shared helpers of the relaxkv CUDA launchers: error checks that become Python exceptions,
// dtype codes, element conversions. No torch headers (see DESIGN.md section 2).
//
// pybind11 translates std::runtime_error into RuntimeError and std::invalid_argument into
// ValueError, so a launcher only has to throw.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#include "launchers.h"

namespace relaxkv {

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

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Quiet NaN: what a kernel writes into an output row it has no valid source for.
__device__ __forceinline__ float nan_f32() { return __int_as_float(0x7fc00000); }

// VEC elements at ptr -> fp32. VECTOR: one 16-byte load (host checked the alignment).
template <typename T, int VEC, bool VECTOR>
__device__ __forceinline__ void load_vec(const T* __restrict__ ptr, float (&x)[VEC]) {
    if constexpr (VECTOR) {
        static_assert(sizeof(T) * VEC == 16, "a vector access is 16 bytes");
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(ptr));
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int i = 0; i < VEC; ++i) x[i] = to_float(e[i]);
    } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) x[i] = to_float(ptr[i]);
    }
}

template <typename T, int VEC, bool VECTOR>
__device__ __forceinline__ void store_vec(T* __restrict__ ptr, const float (&x)[VEC]) {
    if constexpr (VECTOR) {
        uint4 raw;
        T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
        for (int i = 0; i < VEC; ++i) e[i] = from_float<T>(x[i]);
        *reinterpret_cast<uint4*>(ptr) = raw;
    } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) ptr[i] = from_float<T>(x[i]);
    }
}

template <typename T, int VEC, bool VECTOR>
__device__ __forceinline__ void copy_vec(T* __restrict__ dst, const T* __restrict__ src) {
    if constexpr (VECTOR) {
        *reinterpret_cast<uint4*>(dst) = __ldg(reinterpret_cast<const uint4*>(src));
    } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) dst[i] = src[i];
    }
}

// Sum over the 32 lanes of a warp (every lane gets the result).
template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

}  // namespace relaxkv
