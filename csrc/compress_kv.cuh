// compress_kv: PackForcing 2x4x4 pooling of a block's K and V into compressed pool rows (relaxkv_kernels/memory/pack.py).
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
#pragma once

#include "rope.cuh"

namespace relaxkv {

constexpr int kPoolT = 2, kPoolY = 4, kPoolX = 4;  // window (t, y, x)
constexpr int kCompressThreads = 256;
constexpr int kMeanKeyThreads = 256;

struct CompressParams {
    Rows k, v;                // [B, frames * F, H, D]
    Rows k_pool, v_pool;      // [B, n_rows, H, D]
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

template <typename V>
__global__ void __launch_bounds__(kCompressThreads)
    compress_kv_kernel(const CompressParams p, const RopeFreqs freqs) {
    using T = typename V::T;
    constexpr int VEC = V::N;
    const int64_t slot = *p.block_slot;
    if (slot < 0 || slot >= p.n_slots) return;
    const int64_t c = blockIdx.x, b = blockIdx.y;
    const int64_t tc = c / (p.n_y * p.n_x), yc = (c / p.n_x) % p.n_y, xc = c % p.n_x;
    const int d0 = threadIdx.x * VEC;

    // window centre; t0 + 2tc + 0.5 is exact in fp32 for |t0| < 2^22
    const float t = float(*p.t0 + kPoolT * tc) + 0.5f * (kPoolT - 1);
    const float y = float(kPoolY * yc) + 0.5f * (kPoolY - 1), x = float(kPoolX * xc) + 0.5f * (kPoolX - 1);
    float2 cs[VEC / 2];
#pragma unroll
    for (int i = 0; i < VEC / 2; ++i) {
        const int j = d0 / 2 + i;
        float s, co;
        sincosf(rope_angle(freqs, j, t, y, x), &s, &co);
        cs[i] = make_float2(co, s);
    }

    const int64_t n00 = kPoolT * tc * p.frame_tokens + kPoolY * yc * p.width + kPoolX * xc;  // window corner
    const int64_t row = p.row0 + slot * p.n_c + c;
    constexpr float kInvWindow = 1.f / (kPoolT * kPoolY * kPoolX);
    for (int h = threadIdx.y; h < p.heads; h += blockDim.y) {
        float sk[VEC], sv[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) sk[e] = sv[e] = 0.f;
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
        rotate_pairs<VEC>(sk, cs);
        V::store(p.k_pool.at<T>(b, row, h) + d0, sk);
        V::store(p.v_pool.at<T>(b, row, h) + d0, sv);
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
