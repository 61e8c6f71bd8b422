// gather_kv_rope: K (temporal delta-rotated) and V of a segment table, gathered into contiguous
// Contract (formula, shapes, dtypes): relaxkv_kernels.ops.gather_kv_rope; what follows is how the kernels compute it.
// [B, total, H, D] tensors for a dense attention kernel (the "gather" implementation of
// sparse_kv_attention).
//
//   out row r of batch element b lies in segment s with end[s-1] <= r < end[s], end = inclusive
//   prefix sum of max(length, 0) (zero-length segments are skipped by construction), and reads pool
//   row start[s] + r - end[s-1]:
//   k[b, r, h] = R_t(delta[s]) k_pool[b, row, h]     (temporal pairs only; other dims copied)
//   v[b, r, h] = v_pool[b, row, h]
//
// FP8 pools (k_scale set): a pool row is its e4m3 codes times the fp32 scale of its row and head
// (common.cuh fp8_decode), rotated in fp32 and rounded once to T, the outputs' dtype: the cache stages its
// FP8 memory into a bf16 window this way, reading 1 byte per element where a bf16 pool reads 2.
//
// Grid (ceil(total / kGatherRows), B), block kGatherThreads. The block loads its batch element's
// table into shared memory, warp 0 scans the lengths (shuffles, 32 segments per step), each of the
// kGatherRows rows finds its segment by binary search, the cos/sin of the rows' temporal pairs are
// computed once per row by the whole block (not per head: 12x fewer sincosf at Wan shapes), then the threads stream
// (row, head, 16-byte vector) items: 192 vectors of K and V per row for bf16 H = 12, D = 128 (FP8 pools:
// 96 items of 16 codes, one 16-byte load each, stored as two 16-byte vectors of bf16).
// A row the table does not cover (table total < total, or a source row outside the pool) is an
// error the host cannot see without a sync: its output row is written as NaN, nothing is read,
// nothing is written outside [B, total, H, D].
#pragma once

#include <type_traits>

#include "rope.cuh"

namespace relaxkv {

constexpr int kGatherRows = 16;
constexpr int kGatherThreads = 256;

struct GatherParams {
    Rows k_pool, v_pool;    // [B, n_rows, H, D]: elements of T, or e4m3 codes
    Rows k_scale, v_scale;  // FP8 pools: fp32 [B, n_rows, H] (Rows without D); ptr 0 otherwise
    const int32_t* seg;     // [B, n_seg, 3], strides seg_s
    void* k;                // [B, total, H, D], rows contiguous within a batch element, batch stride o_sb
    void* v;
    int64_t total;
    int64_t n_rows;
    int n_seg, heads, head_dim;
    Strides3 seg_s;
    int64_t o_sb;  // batch stride of k and v (a window's memory part is a slice of a larger buffer)
};

// How an FP8 pool's codes are read when the outputs are stored as Vec<T, WIDE>: Vec<uint8_t, WIDE>, 16 codes
// per 16-byte load (2 at any alignment).
template <typename V>
struct CodesOf;
template <typename T, bool WIDE>
struct CodesOf<Vec<T, WIDE>> {
    using type = Vec<uint8_t, WIDE>;
};

// The N values (fp32) of N codes of an FP8 pool row whose scale is `scale`.
template <typename P>
__device__ __forceinline__ void fp8_values(const typename P::Raw& codes, float scale, float (&x)[P::N]) {
#pragma unroll
    for (int j = 0; j < P::N; ++j) x[j] = fp8_decode(codes.e[j]) * scale;
}

// x[0 .. N) to dst as N / V::N vectors of V (N a multiple of V::N).
template <typename V, int N>
__device__ __forceinline__ void store_values(typename V::T* dst, const float (&x)[N]) {
#pragma unroll
    for (int j = 0; j < N; j += V::N) {
        float part[V::N];
#pragma unroll
        for (int i = 0; i < V::N; ++i) part[i] = x[j + i];
        V::store(dst + j, part);
    }
}

// Dynamic shared memory: end [n_seg] int64, src [kGatherRows] int64, cos/sin [kGatherRows, n_t]
// float2, start [n_seg], delta [n_seg], row_delta [kGatherRows] int32.
// V: how output rows (T) are stored. P: how pool rows are read, items of P::N elements: V itself for pools of
// T, CodesOf<V> for FP8 pools.
template <typename V, typename P>
__global__ void __launch_bounds__(kGatherThreads)
    gather_kv_rope_kernel(const GatherParams p, const RopeFreqs freqs) {
    using T = typename V::T;
    constexpr bool FP8 = std::is_same_v<typename P::T, uint8_t>;
    constexpr int VEC = P::N;
    extern __shared__ int64_t smem_i64[];
    const int S = p.n_seg, n_t = freqs.n_t;
    int64_t* end = smem_i64;
    int64_t* src = end + S;
    float2* cs = reinterpret_cast<float2*>(src + kGatherRows);
    int32_t* start = reinterpret_cast<int32_t*>(cs + kGatherRows * n_t);
    int32_t* delta = start + S;
    int32_t* row_delta = delta + S;
    const int64_t b = blockIdx.y, r0 = int64_t(blockIdx.x) * kGatherRows;
    const int tid = threadIdx.x;

    const int32_t* seg = p.seg + b * p.seg_s[0];
    for (int s = tid; s < S; s += blockDim.x) {
        start[s] = seg[s * p.seg_s[1]];
        end[s] = max(seg[s * p.seg_s[1] + p.seg_s[2]], 0);
        delta[s] = seg[s * p.seg_s[1] + 2 * p.seg_s[2]];
    }
    __syncthreads();
    if (tid < 32) {  // inclusive scan of the lengths, 32 at a time, carry across steps
        int64_t carry = 0;
        for (int s0 = 0; s0 < S; s0 += 32) {
            const int s = s0 + tid;
            int64_t x = s < S ? end[s] : 0;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int64_t y = __shfl_up_sync(0xffffffffu, x, o);
                if (tid >= o) x += y;
            }
            if (s < S) end[s] = carry + x;
            carry += __shfl_sync(0xffffffffu, x, 31);
        }
    }
    __syncthreads();

    // per row: source pool row (-1: not covered, NaN row; -2: beyond total, nothing) and its delta
    if (tid < kGatherRows) {
        const int64_t r = r0 + tid;
        int64_t row = -2;
        int32_t dl = 0;
        if (r < p.total) {
            int lo = 0, hi = S;  // first s with end[s] > r
            while (lo < hi) {
                const int mid = (lo + hi) / 2;
                if (end[mid] > r) hi = mid; else lo = mid + 1;
            }
            row = -1;
            if (lo < S) {
                const int64_t begin = lo ? end[lo - 1] : 0;
                const int64_t cand = int64_t(start[lo]) + (r - begin);
                if (cand >= 0 && cand < p.n_rows) row = cand, dl = delta[lo];
            }
        }
        src[tid] = row;
        row_delta[tid] = dl;
    }
    __syncthreads();
    for (int e = tid; e < kGatherRows * n_t; e += blockDim.x) {  // [R, n_t] cos/sin, shared by all heads
        const int i = e / n_t, j = e - i * n_t;
        cs[e] = rope_cos_sin(freqs, j, double(row_delta[i]), 0.f, 0.f);  // a temporal pair: reduced in fp64
    }
    __syncthreads();

    const int DV = p.head_dim / VEC, H = p.heads;
    const int per_row = H * DV;
    T* k_out = static_cast<T*>(p.k) + b * p.o_sb + r0 * per_row * VEC;
    T* v_out = static_cast<T*>(p.v) + b * p.o_sb + r0 * per_row * VEC;
    for (int e = tid; e < kGatherRows * per_row; e += blockDim.x) {
        const int i = e / per_row, rem = e - i * per_row, h = rem / DV, d0 = (rem - h * DV) * VEC;
        const int64_t row = src[i];
        if (row == -2) continue;
        T* ko = k_out + int64_t(e) * VEC;  // rows are contiguous: item e is element e * VEC of the tile
        T* vo = v_out + int64_t(e) * VEC;
        float x[VEC];
        if (row < 0) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) x[j] = nan_f32();
            store_values<V>(ko, x);
            store_values<V>(vo, x);
            continue;
        }
        if constexpr (FP8) {  // both rows' codes and scales in flight before any decode
            const typename P::Raw kc = P::load(p.k_pool.at<const uint8_t>(b, row, h) + d0);
            const typename P::Raw vc = P::load(p.v_pool.at<const uint8_t>(b, row, h) + d0);
            const float ks = __ldg(p.k_scale.at<const float>(b, row, h));
            const float vs = __ldg(p.v_scale.at<const float>(b, row, h));
            fp8_values<P>(kc, ks, x);
            if (d0 < 2 * n_t) rotate_pairs<VEC>(x, cs + i * n_t + d0 / 2, n_t - d0 / 2);
            store_values<V>(ko, x);
            fp8_values<P>(vc, vs, x);
            store_values<V>(vo, x);
        } else {
            const T* kp = p.k_pool.at<const T>(b, row, h) + d0;
            if (d0 < 2 * n_t) {  // vector touches the temporal pairs: rotate those, copy the rest
                V::load(kp, x);
                rotate_pairs<VEC>(x, cs + i * n_t + d0 / 2, n_t - d0 / 2);  // the temporal pairs among them
                V::store(ko, x);
            } else {
                V::copy(ko, kp);
            }
            V::copy(vo, p.v_pool.at<const T>(b, row, h) + d0);
        }
    }
}

}  // namespace relaxkv
