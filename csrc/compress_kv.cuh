// compress_kv: PackForcing 2x4x4 pooling of a block's K and V into compressed pool rows (relaxkv_kernels/memory/pack.py).
// Contract (formula, shapes, dtypes): relaxkv_kernels.ops.compress_kv; what follows is how the kernels compute it.
//
// Compressed token c = (tc, yc, xc) of the (frames/2, height/4, width/4) grid, window tokens
// n = (2tc + dt) * F + (4yc + dy) * width + 4xc + dx, dt < 2, dy, dx < 4:
//   pk = mean_n k[b, n, h]   pv = mean_n v[b, n, h]                                   (fp32)
//   k_pool[b, row0 + slot * Nc + c, h] = rope(pk) at (t0 + 2tc + 0.5, 4yc + 1.5, 4xc + 1.5)
//   v_pool[b, row0 + slot * Nc + c, h] = pv
//   mean_key[b, slot, h]               = mean_c pk                                    (fp32)
// slot = block_slot[0] and t0 are read on the device (no host sync); an out-of-range slot writes
// nothing (validated in Python).
//
// Kernel 1, grid (Nc, B), block (D / VEC, HB): one compressed token per block, threadIdx.x owns VEC
// adjacent dims (16-byte loads), threadIdx.y walks the heads; the 32 window rows of k and v are
// summed in registers, the cos/sin of the thread's VEC / 2 pairs computed once for all heads. pk
// also goes to a workspace ws[b, c, h, :] (fp32), which kernel 2 (grid (ceil(H*D / 256), B)) sums over
// c in a fixed order: mean_key is deterministic, no atomics.
//
// FP8 pools (k_scale.ptr != 0; relaxkv_kernels/ops/fp8.py): the same kernel with pool type P = uint8_t writes each
// row and head as e4m3 codes and one fp32 scale, quantized from the fp32 rope(pk) and pv, which needs the row's amax
// over all D, spread over the blockDim.x lanes of a head row (which may straddle warps: D / VEC is any number up
// to 256). Each lane leaves its partial amax of K and V in shared memory, and after a block barrier reads its
// row's blockDim.x partials (D = 128 bf16: 16). The barriers need every thread: all run ceil(H / blockDim.y)
// rounds of heads, a thread past the heads with no memory access. Codes are stored one byte each (2 code bytes
// written per 64 K and V elements read: stores are under 2% of the traffic); mean_key is unchanged.
#pragma once

#include <type_traits>

#include "rope.cuh"

namespace relaxkv {

constexpr int kPoolT = 2, kPoolY = 4, kPoolX = 4;  // window (t, y, x)
constexpr int kCompressThreads = 256;
constexpr int kMeanKeyThreads = 256;

struct CompressParams {
    Rows k, v;                // [B, frames * F, H, D]
    Rows k_pool, v_pool;      // [B, n_rows, H, D]: T, or uint8_t e4m3 codes (FP8 pools)
    Rows k_scale, v_scale;    // FP8 pools: fp32 scales [B, n_rows, H] (at(b, row, h)); ptr 0 otherwise
    float* mean_key;          // [B, n_blocks, H, D], strides m_s
    float* ws;                // [B, Nc, H, D] pooled pre-RoPE keys
    const int64_t* block_slot;  // [1]
    const int64_t* t0;          // [1]
    int64_t frame_tokens, width;
    int64_t n_y, n_x, n_c;  // compressed grid: rows, columns, tokens (n_t * n_y * n_x)
    int64_t row0;
    int64_t n_slots;         // valid slots: min(mean_key blocks, (n_rows - row0) / Nc)
    int heads, head_dim;
    Strides4 m_s;
};

// sk, sv (zero on entry) = the means of k and v over the 2x4x4 window of corner token n00 (compressed token c),
// head h, dims d0 .. d0 + VEC - 1; the pre-RoPE sk also goes to ws[b, c, h] for mean_key.
template <typename V>
__device__ __forceinline__ void pool_window(const CompressParams& p, int64_t b, int64_t c, int64_t n00, int h,
                                            int d0, float (&sk)[V::N], float (&sv)[V::N]) {
    using T = typename V::T;
    constexpr int VEC = V::N;
    constexpr float kInvWindow = 1.f / (kPoolT * kPoolY * kPoolX);
#pragma unroll
    for (int dt = 0; dt < kPoolT; ++dt) {
#pragma unroll
        for (int dy = 0; dy < kPoolY; ++dy) {
#pragma unroll
            for (int dx = 0; dx < kPoolX; ++dx) {
                const int64_t n = n00 + dt * p.frame_tokens + dy * p.width + dx;
                float xk[VEC], xv[VEC];
                V::load(p.k.at<const T>(b, n, h) + d0, xk);
                V::load(p.v.at<const T>(b, n, h) + d0, xv);
#pragma unroll
                for (int e = 0; e < VEC; ++e) sk[e] += xk[e], sv[e] += xv[e];
            }
        }
    }
    float* w = p.ws + ((b * p.n_c + c) * p.heads + h) * p.head_dim + d0;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
        sk[e] *= kInvWindow;
        sv[e] *= kInvWindow;
        w[e] = sk[e];  // pre-RoPE, for mean_key
    }
}

// FP8 pools: the codes of this thread's VEC dims d0.. of row `row`, head h of k_pool (rotated key sk) and v_pool
// (value sv), and the row's scales, each from the row's amax over D (layout at the top). Every thread of the
// block calls it; `live` false (past the heads): only the barriers. Amax as int bits of |x| (non-negative floats
// order as their bits, a NaN above all): NaN-propagating like torch's amax.
template <typename T, int VEC>
__device__ __forceinline__ void store_fp8_rows(const CompressParams& p, int64_t b, int64_t row, int h, bool live,
                                               int d0, const float (&sk)[VEC], const float (&sv)[VEC]) {
    extern __shared__ int compress_amax[];  // [2][blockDim.y * blockDim.x]: K, then V partials
    const int threads = blockDim.x * blockDim.y, mine = threadIdx.y * blockDim.x;  // this head row's partials
    int k_bits = 0, v_bits = 0;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
        k_bits = max(k_bits, __float_as_int(fabsf(sk[e])));
        v_bits = max(v_bits, __float_as_int(fabsf(sv[e])));
    }
    compress_amax[mine + threadIdx.x] = k_bits;
    compress_amax[threads + mine + threadIdx.x] = v_bits;
    __syncthreads();
    for (int l = 0; l < int(blockDim.x); ++l) {
        k_bits = max(k_bits, compress_amax[mine + l]);
        v_bits = max(v_bits, compress_amax[threads + mine + l]);
    }
    __syncthreads();  // every partial read before the next round writes
    if (!live) return;
    float k_inv, v_inv;
    const float k_scale = fp8_scale(__int_as_float(k_bits), &k_inv);
    const float v_scale = fp8_scale(__int_as_float(v_bits), &v_inv);
    uint8_t* k_codes = p.k_pool.at<uint8_t>(b, row, h) + d0;
    uint8_t* v_codes = p.v_pool.at<uint8_t>(b, row, h) + d0;
    const float k_limit = fp8_limit<T>(k_inv);  // codes finite in T
#pragma unroll
    for (int e = 0; e < VEC; ++e) k_codes[e] = fp8_encode(sk[e] * k_inv, k_limit);
    const float v_limit = fp8_limit<T>(v_inv);
#pragma unroll
    for (int e = 0; e < VEC; ++e) v_codes[e] = fp8_encode(sv[e] * v_inv, v_limit);
    if (threadIdx.x == 0) {
        *p.k_scale.at<float>(b, row, h) = k_scale;
        *p.v_scale.at<float>(b, row, h) = v_scale;
    }
}

// Blocks per SM the register allocation must allow: unconstrained (0) for pools of T; 1 for FP8 pools, where
// ptxas otherwise aims at 2 blocks (128 registers) and spills the window loads.
template <typename P>
constexpr int kCompressMinBlocks = std::is_same_v<P, uint8_t> ? 1 : 0;

// P: the pools' element type, T or uint8_t (FP8 pools: e4m3 codes).
template <typename V, typename P>
__global__ void __launch_bounds__(kCompressThreads, kCompressMinBlocks<P>)
    compress_kv_kernel(const CompressParams p, const RopeFreqs freqs) {
    using T = typename V::T;
    constexpr int VEC = V::N;
    constexpr bool FP8 = std::is_same_v<P, uint8_t>;
    const int64_t slot = *p.block_slot;
    if (slot < 0 || slot >= p.n_slots) return;
    const int64_t c = blockIdx.x, b = blockIdx.y;
    const int64_t tc = c / (p.n_y * p.n_x), yc = (c / p.n_x) % p.n_y, xc = c % p.n_x;
    const int d0 = threadIdx.x * VEC;

    // window centre (the temporal one in fp64: an absolute position)
    const double t = double(*p.t0 + kPoolT * tc) + 0.5 * (kPoolT - 1);
    const float y = float(kPoolY * yc) + 0.5f * (kPoolY - 1), x = float(kPoolX * xc) + 0.5f * (kPoolX - 1);
    float2 cs[VEC / 2];
#pragma unroll
    for (int i = 0; i < VEC / 2; ++i) cs[i] = rope_cos_sin(freqs, d0 / 2 + i, t, y, x);

    const int64_t n00 = kPoolT * tc * p.frame_tokens + kPoolY * yc * p.width + kPoolX * xc;  // window corner
    const int64_t row = p.row0 + slot * p.n_c + c;
    for (int h0 = 0; h0 < p.heads; h0 += blockDim.y) {
        const int h = h0 + threadIdx.y;
        if (!FP8 && h >= p.heads) break;
        const bool live = h < p.heads;  // always true without FP8
        float sk[VEC] = {}, sv[VEC] = {};
        if (live) pool_window<V>(p, b, c, n00, h, d0, sk, sv);
        rotate_pairs<VEC>(sk, cs);
        if constexpr (FP8) {
            store_fp8_rows<T, VEC>(p, b, row, h, live, d0, sk, sv);
        } else {
            V::store(p.k_pool.at<T>(b, row, h) + d0, sk);
            V::store(p.v_pool.at<T>(b, row, h) + d0, sv);
        }
    }
}

// mean_key[b, slot, h, d] = (1 / Nc) sum_c ws[b, c, h, d]; thread e = h * D + d.
__global__ void __launch_bounds__(kMeanKeyThreads) compress_mean_key_kernel(const CompressParams p) {
    const int64_t slot = *p.block_slot;
    if (slot < 0 || slot >= p.n_slots) return;
    const int64_t hd = int64_t(p.heads) * p.head_dim;
    const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, b = blockIdx.y;
    if (e >= hd) return;
    const float* w = p.ws + b * p.n_c * hd + e;
    float s = 0.f;
    for (int64_t c = 0; c < p.n_c; ++c) s += w[c * hd];
    const int64_t h = e / p.head_dim, d = e - h * p.head_dim;
    p.mean_key[b * p.m_s[0] + slot * p.m_s[1] + h * p.m_s[2] + d * p.m_s[3]] = s / float(p.n_c);
}

}  // namespace relaxkv
