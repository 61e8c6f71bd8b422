// rope_append: the fused cache write path (README, Design: a chunk): one launch, two with prototypes.
//
//   q_rot[b, n]              = rope(q[b, n])       at (frame_pos[u], y, x), n = u * F + y * W + x
//   k_cache[b, slot_u*F + i] = rope(k[b, u*F + i]) at the same positions, slot_u = frame_slot[u]
//   v_cache[b, slot_u*F + i] = v[b, u*F + i]
//   proto[b, slot_u]         = mean over the F tokens and H heads of the pre-RoPE k of frame u (fp32)
//
// Wan 3D RoPE (rope.cuh): angle = position * inv_freq[j] in fp32 (inv_freq rounded to fp32 from the host's
// fp64 table), sincosf, rotation in fp32, one rounding on store.
//
// Work split: grid (ceil(F / R), U, B), block (D / N, R) = 128 threads. A block owns R tokens of one frame
// (a tile never crosses a frame); thread (x, y) owns dims x*N .. x*N+N-1 of token y of the tile, in every
// head (and the dims 128 N further on when D / N > 128: element accesses with D > 256). It computes the cos/sin of its N/2 pairs once and applies them to all H heads of q and of k: one
// sincosf per (token, pair), in registers (no shared memory, no barrier). A warp reads
// 32 * 16 B = 512 contiguous bytes per load (bf16, D = 128: two tokens' 256-byte head rows). Heads go
// kHeadsInFlight at a time: the thread issues the 16-byte loads of q, k and v of those heads before it
// converts or stores anything, so 3 * kHeadsInFlight * 16 = 96 bytes per thread are in flight.
//
// Predicted at Wan shapes (B = 1, U = 3, F = 1560, H = 12, D = 128, bf16), not measured: 3 reads and 3
// writes of 4680 x 12 x 128 x 2 B = 6 x 14.4 MB = 86 MB per call; floor 29 us at 3 TB/s, 4.3 ms per chunk
// of 150 calls. Grid 195 x 3 = 585 blocks (R = 8): all resident at once on 132 SMs, since
// __launch_bounds__(128, 5) keeps 5 blocks per SM (<= 96 registers; ptxas 13.0: 94 for bf16), so there is no
// second, latency-bound partial wave; ~570 threads per SM x 96 B = ~55 KB of loads in flight per SM
// against the ~23 KB Little's law asks for 3 TB/s at ~1 us of loaded DRAM latency (3e12 B/s x 1e-6 s /
// 132 SMs). Compute: 4 sincosf per thread (300k per call), 6 FLOP per rotated pair.
//
// Prototypes (optional): each thread sums its pre-RoPE k over its heads, the block adds its R tokens in
// shared memory in a fixed order into one [D] row ws[b, u, tile], and rope_append_proto_kernel sums the
// tiles in order: deterministic, no atomics. Without proto: no sums, no shared memory, no second launch.
#pragma once

#include "rope.cuh"

namespace relaxkv {

constexpr int kRopeThreads = 128;
constexpr int kHeadsInFlight = 2;  // heads whose q, k, v loads a thread issues before its first store

struct RopeAppendParams {
    // tensors
    Rows q, k, v, q_rot;           // [B, U*F, H, D]
    Rows k_cache, v_cache;         // [B, n_rows, H, D]
    float* proto;                  // [B, n_slots, D] (strides p_sb, p_ss, 1); nullptr: no prototypes
    float* ws;                     // [B, U, tiles, D] per-tile partial sums of the pre-RoPE keys
    const int64_t* frame_slot;     // [U]
    const int64_t* frame_pos;      // [U]
    // sizes
    int64_t frame_tokens;          // F = height * width
    int64_t width;
    int64_t n_slots;
    int64_t p_sb, p_ss;
    int heads, head_dim;
    float inv_count;               // 1 / (F * H)
};

// Dims d0 .. d0 + N - 1 of token `tok` of frame u, in every head: q_rot, k_cache and v_cache rows written,
// the pre-RoPE keys added to acc.
template <typename V>
__device__ __forceinline__ void rope_append_dims(const RopeAppendParams& p, const RopeFreqs& freqs, int64_t b,
                                                 int64_t u, int64_t tok, int d0, float (&acc)[V::N]) {
    using T = typename V::T;
    constexpr int N = V::N;
    const int H = p.heads;
    const int64_t slot = p.frame_slot[u];
    const bool slot_ok = slot >= 0 && slot < p.n_slots;  // validated in Python; never write out of bounds
    const int64_t y = tok / p.width;
    const float t = float(p.frame_pos[u]);
    float2 cs[N / 2];  // (cos, sin) of this thread's pairs: one sincosf each for all heads of q and k
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
        float s, c;
        sincosf(rope_angle(freqs, d0 / 2 + i, t, float(y), float(tok - y * p.width)), &s, &c);
        cs[i] = make_float2(c, s);
    }
    const int64_t n = u * p.frame_tokens + tok, row = slot * p.frame_tokens + tok;
    const T* q = p.q.at<const T>(b, n) + d0;
    const T* k = p.k.at<const T>(b, n) + d0;
    const T* v = p.v.at<const T>(b, n) + d0;
    T* q_rot = p.q_rot.at<T>(b, n) + d0;
    T* k_cache = p.k_cache.at<T>(b, row) + d0;
    T* v_cache = p.v_cache.at<T>(b, row) + d0;
    for (int h0 = 0; h0 < H; h0 += kHeadsInFlight) {
        typename V::Raw rq[kHeadsInFlight], rk[kHeadsInFlight], rv[kHeadsInFlight];
#pragma unroll
        for (int i = 0; i < kHeadsInFlight; ++i) {  // every load first: 3 * kHeadsInFlight in flight
            const int64_t h = h0 + i;
            if (h < H) {
                rq[i] = V::load(q + h * p.q.sh);
                rk[i] = V::load(k + h * p.k.sh);
                rv[i] = V::load(v + h * p.v.sh);
            }
        }
#pragma unroll
        for (int i = 0; i < kHeadsInFlight; ++i) {
            const int64_t h = h0 + i;
            if (h >= H) break;
            float x[N];
            V::unpack(rq[i], x);
            rotate_pairs<N>(x, cs);
            V::store(q_rot + h * p.q_rot.sh, x);
            V::unpack(rk[i], x);
#pragma unroll
            for (int e = 0; e < N; ++e) acc[e] += x[e];
            if (slot_ok) {
                rotate_pairs<N>(x, cs);
                V::store(k_cache + h * p.k_cache.sh, x);
                V::store(v_cache + h * p.v_cache.sh, rv[i]);
            }
        }
    }
}

// Dynamic shared memory (proto only): [R, D] fp32 per-token sums of the pre-RoPE keys over heads.
template <typename V>
__global__ void __launch_bounds__(kRopeThreads, 5)
    rope_append_kernel(const RopeAppendParams p, const RopeFreqs freqs) {
    constexpr int N = V::N;
    extern __shared__ float part[];
    const int64_t u = blockIdx.y, b = blockIdx.z;
    const int64_t tok = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;  // token of frame u
    for (int d0 = threadIdx.x * N; d0 < p.head_dim; d0 += blockDim.x * N) {  // once unless D / N > kRopeThreads
        float acc[N] = {};
        if (tok < p.frame_tokens) rope_append_dims<V>(p, freqs, b, u, tok, d0, acc);
        if (p.proto != nullptr) {
#pragma unroll
            for (int e = 0; e < N; ++e) part[threadIdx.y * p.head_dim + d0 + e] = acc[e];
        }
    }
    if (p.proto == nullptr) return;  // uniform over the grid: no thread reaches the barrier below

    // [R, D] per-token sums -> one [D] row per tile, tokens in order
    __syncthreads();
    float* ws = p.ws + ((b * gridDim.y + u) * gridDim.x + blockIdx.x) * p.head_dim;
    for (int d = threadIdx.y * blockDim.x + threadIdx.x; d < p.head_dim; d += blockDim.x * blockDim.y) {
        float s = 0.f;
        for (int r = 0; r < int(blockDim.y); ++r) s += part[r * p.head_dim + d];
        ws[d] = s;
    }
}

// proto[b, frame_slot[u]] = (sum of the n_tiles rows ws[b, u, :], in order) / (F * H). Grid (U, B).
__global__ void rope_append_proto_kernel(const RopeAppendParams p, int64_t n_tiles) {
    const int64_t u = blockIdx.x, b = blockIdx.y;
    const int64_t slot = p.frame_slot[u];
    if (slot < 0 || slot >= p.n_slots) return;
    const float* ws = p.ws + (b * gridDim.x + u) * n_tiles * p.head_dim;
    float* row = p.proto + b * p.p_sb + slot * p.p_ss;
    for (int d = threadIdx.x; d < p.head_dim; d += blockDim.x) {
        float s = 0.f;
        for (int64_t t = 0; t < n_tiles; ++t) s += ws[t * p.head_dim + d];
        row[d] = s * p.inv_count;
    }
}

}  // namespace relaxkv
