// rope_append: the fused cache write path (README, Design: a chunk): one launch, two with prototypes.
// Contract (formula, shapes, dtypes): relaxkv_kernels.ops.rope_append; what follows is how the kernels compute it.
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
//
// FP8 caches (k_scale.ptr != 0; relaxkv_kernels/ops/fp8.py): rope_append_fp8_kernel, the same work with each
// written (row, head) of K (the fp32 rotation) and V quantized to e4m3 codes and one fp32 scale, which needs
// the row's amax over all D before its first code. A token's L lanes (a power of two <= 32: adjacent lanes
// of one warp) own its head rows, lane l dims (c * L + l) * N .. + N - 1 of chunk c < C, and reduce the amax
// with log2(L) xor shuffles that stay inside the L-lane group. C = 1 (L = D / N rounded up to a power of
// two) when a warp covers D in one access per lane: 16-byte accesses up to D = 128 (fp32) / 256 (fp16, bf16),
// element accesses up to D = 64; Wan's D = 128 in bf16 gets L = 16, R = 8 as above, 2 x 4 shuffles per head
// row. Larger D takes element accesses in C = kFp8Chunks chunks with the smallest L that covers D (16-byte
// chunks would spill). Shuffles need every lane of the warp, so the lanes of tokens past the frame and past D
// take part with amax 0 and skip every memory access. Pass 1 over a head row rotates q and k and takes the
// maxima, pass 2 rotates k again from the same loaded bits (C = 1: still in registers; else loaded again, an L1
// hit) and stores N codes per access (8 bytes per 16-byte load of bf16); the group's lane 0 stores the scales.
// ptxas 13.0, sm_90a: 96 registers for fp16 with C = 1 (5 blocks per SM as above); bf16 with C = 1 and the chunked
// element kernels take up to 128 under __launch_bounds__(128, 4), without spills (kFp8MinBlocks).
#pragma once

#include <type_traits>

#include "rope.cuh"

namespace relaxkv {

constexpr int kRopeThreads = 128;
constexpr int kHeadsInFlight = 2;  // heads whose q, k, v loads a thread issues before its first store
constexpr int kFp8Lanes = 32;      // most lanes of one token's head rows in rope_append_fp8_kernel: one warp

constexpr int kFp8Chunks = kMaxHeadDim / (kFp8Lanes * 2);  // element-pair chunks per lane beyond one warp's D

struct RopeAppendParams {
    // tensors
    Rows q, k, v, q_rot;           // [B, U*F, H, D]
    Rows k_cache, v_cache;         // [B, n_rows, H, D]: T, or uint8_t e4m3 codes (FP8 caches)
    Rows k_scale, v_scale;         // FP8 caches: fp32 [B, n_rows, H] (at<float>(b, row, h)); ptr 0 otherwise
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

// A thread's rows of token `tok` of frame u from dim d of head 0: q, k, v and q_rot at chunk row u * F + tok, the
// caches (elements C: T, or uint8_t e4m3 codes) at pool row `row`.
template <typename T, typename C>
struct TokenRows {
    const T *q, *k, *v;
    T* q_rot;
    C *k_cache, *v_cache;
};

template <typename T, typename C>
__device__ __forceinline__ TokenRows<T, C> token_rows(const RopeAppendParams& p, int64_t b, int64_t u, int64_t tok,
                                                      int64_t row, int d) {
    const int64_t n = u * p.frame_tokens + tok;
    return {p.q.at<const T>(b, n) + d, p.k.at<const T>(b, n) + d, p.v.at<const T>(b, n) + d,
            p.q_rot.at<T>(b, n) + d, p.k_cache.at<C>(b, row) + d, p.v_cache.at<C>(b, row) + d};
}

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
    const double t = double(p.frame_pos[u]);
    float2 cs[N / 2];  // (cos, sin) of this thread's pairs: one sincosf each for all heads of q and k
#pragma unroll
    for (int i = 0; i < N / 2; ++i) cs[i] = rope_cos_sin(freqs, d0 / 2 + i, t, float(y), float(tok - y * p.width));
    auto [q, k, v, q_rot, k_cache, v_cache] = token_rows<T, T>(p, b, u, tok, slot * p.frame_tokens + tok, d0);
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

// Largest |x| over the `lanes` adjacent lanes of a token (a power of two <= 32; every lane of the warp calls it):
// xor offsets below `lanes` stay inside each aligned group of `lanes` lanes.
__device__ __forceinline__ float lane_group_max(float a, int lanes) {
    for (int o = lanes / 2; o > 0; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
    return a;
}

// The e4m3 codes of x * inv (N of them, finite in T: fp8_limit) in one N-byte store (WIDE: the launcher checked the
// caches' alignment) or N byte stores.
template <typename T, int N, bool WIDE>
__device__ __forceinline__ void store_codes(uint8_t* __restrict__ p, const float (&x)[N], float inv) {
    struct alignas(WIDE ? N : 1) Codes {
        uint8_t c[N];
    } r;
#pragma unroll
    for (int e = 0; e < N; ++e) r.c[e] = fp8_encode(x[e] * inv, fp8_limit<T>(inv));
    *reinterpret_cast<Codes*>(p) = r;
}

// FP8 caches: token `tok` of frame u in every head (the FP8 form of rope_append_dims; layout at the top). Lane
// `lane` of the token's `lanes` owns dims d0 = (c * lanes + lane) * N .. d0 + N - 1 of chunk c < C. Every lane
// of the warp calls it (the amax shuffles); `live` false (a token past the frame) or d0 >= D: no memory access,
// amax 0. q_rot rows written, K (fp32 rotation) and V quantized into the cache codes and scales, the pre-RoPE keys
// added to acc.
template <typename V, int C>
__device__ __forceinline__ void rope_append_row_fp8(const RopeAppendParams& p, const RopeFreqs& freqs, int64_t b,
                                                    int64_t u, int64_t tok, bool live, int lane, int lanes,
                                                    float (&acc)[C][V::N]) {
    using T = typename V::T;
    constexpr int N = V::N;
    constexpr bool WIDE = N * sizeof(T) == 16;  // the 16-byte instantiation
    constexpr int kHeads = C < kHeadsInFlight ? kHeadsInFlight / C : 1;  // kHeadsInFlight (head, chunk) loads
    const int H = p.heads;
    const int64_t slot = p.frame_slot[u];
    const bool slot_ok = slot >= 0 && slot < p.n_slots;  // uniform over the block (one frame u)
    const int64_t y = tok / p.width;
    const double t = double(p.frame_pos[u]);
    bool in[C];
    float2 cs[C][N / 2];  // (cos, sin) of this thread's pairs, for all heads; (1, 0) where it has none
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const int d0 = (c * lanes + lane) * N;
        in[c] = live && d0 < p.head_dim;
#pragma unroll
        for (int i = 0; i < N / 2; ++i)
            cs[c][i] = in[c] ? rope_cos_sin(freqs, d0 / 2 + i, t, float(y), float(tok - y * p.width))
                             : make_float2(1.f, 0.f);
    }
    const int64_t row = slot * p.frame_tokens + tok;
    auto [q, k, v, q_rot, k_codes, v_codes] = token_rows<T, uint8_t>(p, b, u, tok, row, lane * N);
    const int step = lanes * N;  // dims from one chunk to the next
    for (int h0 = 0; h0 < H; h0 += kHeads) {
        typename V::Raw rq[kHeads][C], rk[kHeads][C], rv[kHeads][C];
#pragma unroll
        for (int i = 0; i < kHeads; ++i) {  // every load first: 3 * kHeads * C in flight
            const int64_t h = h0 + i;
#pragma unroll
            for (int c = 0; c < C; ++c) {
                if (h < H && in[c]) {
                    rq[i][c] = V::load(q + h * p.q.sh + c * step);
                    rk[i][c] = V::load(k + h * p.k.sh + c * step);
                    rv[i][c] = V::load(v + h * p.v.sh + c * step);
                }
            }
        }
#pragma unroll
        for (int i = 0; i < kHeads; ++i) {
            const int64_t h = h0 + i;
            if (h >= H) break;  // uniform over the block
            float k_amax = 0.f, v_amax = 0.f;  // pass 1: q_rot, the proto sums and the row maxima
#pragma unroll
            for (int c = 0; c < C; ++c) {
                if (!in[c]) continue;
                float x[N];
                V::unpack(rq[i][c], x);
                rotate_pairs<N>(x, cs[c]);
                V::store(q_rot + h * p.q_rot.sh + c * step, x);
                V::unpack(rk[i][c], x);
#pragma unroll
                for (int e = 0; e < N; ++e) acc[c][e] += x[e];
                rotate_pairs<N>(x, cs[c]);
#pragma unroll
                for (int e = 0; e < N; ++e) k_amax = fmaxf(k_amax, fabsf(x[e]));
                V::unpack(rv[i][c], x);
#pragma unroll
                for (int e = 0; e < N; ++e) v_amax = fmaxf(v_amax, fabsf(x[e]));
            }
            if (!slot_ok) continue;
            float k_inv, v_inv;
            const float k_scale = fp8_scale(lane_group_max(k_amax, lanes), &k_inv);
            const float v_scale = fp8_scale(lane_group_max(v_amax, lanes), &v_inv);
            if (live && lane == 0) {
                *p.k_scale.at<float>(b, row, h) = k_scale;
                *p.v_scale.at<float>(b, row, h) = v_scale;
            }
#pragma unroll
            for (int c = 0; c < C; ++c) {  // pass 2: K rotated again from the same bits (same fp32 result), codes
                if (!in[c]) continue;
                typename V::Raw kb = rk[i][c], vb = rv[i][c];
                if constexpr (C > 1) {  // registers: the bits were let go after pass 1, loaded again (L1 hits)
                    kb = V::load(k + h * p.k.sh + c * step);
                    vb = V::load(v + h * p.v.sh + c * step);
                }
                float x[N];
                V::unpack(kb, x);
                rotate_pairs<N>(x, cs[c]);
                store_codes<T, N, WIDE>(k_codes + h * p.k_cache.sh + c * step, x, k_inv);
                V::unpack(vb, x);
                store_codes<T, N, WIDE>(v_codes + h * p.v_cache.sh + c * step, x, v_inv);
            }
        }
    }
}

// [R, D] per-token sums of the pre-RoPE keys in `part` -> one [D] row ws[b, u, tile], tokens in order. Every
// thread of the block calls it (a barrier).
__device__ __forceinline__ void rope_append_tile_sum(const RopeAppendParams& p, const float* part) {
    __syncthreads();
    float* ws = p.ws + ((int64_t(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x) * p.head_dim;
    for (int d = threadIdx.y * blockDim.x + threadIdx.x; d < p.head_dim; d += blockDim.x * blockDim.y) {
        float s = 0.f;
        for (int r = 0; r < int(blockDim.y); ++r) s += part[r * p.head_dim + d];
        ws[d] = s;
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
    rope_append_tile_sum(p, part);
}

// Blocks per SM the FP8 kernel's registers must allow: 5 (<= 96 registers) for one chunk per lane, except bf16,
// whose 16-byte path needs 4 (<= 128: at 96 the clamp that keeps codes finite in T spills 4 bytes); 4 for chunks.
template <typename V, int C>
constexpr int kFp8MinBlocks = C == 1 && !std::is_same_v<typename V::T, __nv_bfloat16> ? 5 : 4;

// FP8 caches: rope_append_kernel's work with quantized K / V rows; block (L, R = kRopeThreads / L), C chunks/lane.
template <typename V, int C>
__global__ void __launch_bounds__(kRopeThreads, kFp8MinBlocks<V, C>)
    rope_append_fp8_kernel(const RopeAppendParams p, const RopeFreqs freqs) {
    constexpr int N = V::N;
    extern __shared__ float part[];
    const int64_t u = blockIdx.y, b = blockIdx.z;
    const int64_t tok = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;  // token of frame u
    float acc[C][N] = {};
    rope_append_row_fp8<V, C>(p, freqs, b, u, tok, tok < p.frame_tokens, threadIdx.x, blockDim.x, acc);
    if (p.proto == nullptr) return;  // uniform over the grid: no thread reaches the barrier below
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const int d0 = (c * blockDim.x + threadIdx.x) * N;
        if (d0 >= p.head_dim) continue;
#pragma unroll
        for (int e = 0; e < N; ++e) part[threadIdx.y * p.head_dim + d0 + e] = acc[c][e];
    }
    rope_append_tile_sum(p, part);
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
