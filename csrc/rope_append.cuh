// rope_append: the fused cache write path (DESIGN.md section 5), one launch per call.
//
//   q_rot[b, n]              = rope(q[b, n])       at (frame_pos[u], y, x), n = u * F + y * W + x
//   k_cache[b, slot_u*F + i] = rope(k[b, u*F + i]) at the same positions, slot_u = frame_slot[u]
//   v_cache[b, slot_u*F + i] = v[b, u*F + i]
//   proto[b, slot_u]         = mean over the F tokens and H heads of the pre-RoPE k of frame u (fp32)
//
// Wan 3D RoPE: adjacent pairs (x[2j], x[2j+1]); the first n_t pairs rotate by the temporal position,
// the next n_h by y, the rest by x; angle = position * inv_freq[j] in fp32 (inv_freq rounded to fp32
// from the host's fp64 table), sincosf, rotation in fp32, one rounding on store.
//
// Grid (tiles of TILE tokens, U frames, B): a tile never crosses a frame, so each block adds one
// [D] partial sum into one proto row. Block (D / VEC, R): threadIdx.x owns VEC adjacent dims of a
// (token, head) row, threadIdx.y walks the rows; a warp reads 2 rows = 512 contiguous bytes for
// bf16 D = 128. The cos/sin of the tile's tokens are computed once into shared memory and reused
// by all H heads of q and k (12x fewer sincosf at Wan shapes).
#pragma once

#include "rope.cuh"

namespace relaxkv {

constexpr int kRopeTileTokens = 8;  // tokens per block: 585 blocks per Wan chunk (U = 3, F = 1560)
constexpr int kRopeBlockThreads = 256;

struct RopeAppendParams {
    // pointers
    const void* q;
    const void* k;
    const void* v;
    void* q_rot;
    void* k_cache;
    void* v_cache;
    float* proto;  // nullptr: no prototypes
    const int64_t* frame_slot;
    const int64_t* frame_pos;
    // sizes
    int64_t frame_tokens;  // F = height * width
    int64_t width;
    int64_t n_slots;
    int heads;
    int head_dim;
    int n_t_pairs;  // temporal pairs
    int n_h_pairs;  // height pairs
    float inv_count;  // 1 / (F * H)
    // strides, in elements ([B, N, H] of q/k/v/q_rot/caches, [B, slot] of proto)
    int64_t q_sb, q_sn, q_sh;
    int64_t k_sb, k_sn, k_sh;
    int64_t v_sb, v_sn, v_sh;
    int64_t o_sb, o_sn, o_sh;
    int64_t kc_sb, kc_sn, kc_sh;
    int64_t vc_sb, vc_sn, vc_sh;
    int64_t p_sb, p_ss;
    int64_t slot_stride, pos_stride;
};

// proto[b, frame_slot[u], :] = 0 for every (u, b); runs on the launcher's stream just before
// rope_append_kernel, which then adds fp32 partial means with atomicAdd.
__global__ void rope_append_zero_proto_kernel(const RopeAppendParams p) {
    const int64_t u = blockIdx.x, b = blockIdx.y;
    const int64_t slot = p.frame_slot[u * p.slot_stride];
    if (slot < 0 || slot >= p.n_slots) return;  // validated in Python; never write out of bounds
    float* row = p.proto + b * p.p_sb + slot * p.p_ss;
    for (int d = threadIdx.x; d < p.head_dim; d += blockDim.x) row[d] = 0.f;
}

// Dynamic shared memory: cos/sin [TILE, D/2] float2, then per-row-lane partial sums [R, D] fp32.
template <typename T, int VEC, bool VECTOR>
__global__ void __launch_bounds__(kRopeBlockThreads)
    rope_append_kernel(const RopeAppendParams p, const RopeFreqs freqs) {
    extern __shared__ float2 smem[];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int n_lanes = blockDim.y;                                   // R
    const int tid = ty * blockDim.x + tx, n_threads = blockDim.x * blockDim.y;
    const int D = p.head_dim, half = D / 2, H = p.heads;
    const int64_t u = blockIdx.y, b = blockIdx.z;
    const int64_t F = p.frame_tokens;
    const int64_t tok0 = int64_t(blockIdx.x) * kRopeTileTokens;        // first token of the tile in its frame
    const int n_tok = int(min(int64_t(kRopeTileTokens), F - tok0));
    const int64_t slot = p.frame_slot[u * p.slot_stride];
    const bool slot_ok = slot >= 0 && slot < p.n_slots;                // uniform over the block
    const float t = float(p.frame_pos[u * p.pos_stride]);

    float2* cs = smem;                                                  // [TILE, D/2]
    float* part = reinterpret_cast<float*>(smem + kRopeTileTokens * half);  // [R, D]

    for (int e = tid; e < n_tok * half; e += n_threads) {
        const int i = e / half, j = e - i * half;
        const int64_t tok = tok0 + i;
        const float pos =
            rope_axis_position(j, p.n_t_pairs, p.n_h_pairs, t, float(tok / p.width), float(tok % p.width));
        float s, c;
        sincosf(pos * freqs.inv_freq[j], &s, &c);
        cs[e] = make_float2(c, s);
    }
    __syncthreads();

    const T* q = static_cast<const T*>(p.q);
    const T* k = static_cast<const T*>(p.k);
    const T* v = static_cast<const T*>(p.v);
    T* q_rot = static_cast<T*>(p.q_rot);
    T* k_cache = static_cast<T*>(p.k_cache);
    T* v_cache = static_cast<T*>(p.v_cache);
    const int d0 = tx * VEC;
    float acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = 0.f;

    for (int r = ty; r < n_tok * H; r += n_lanes) {
        const int i = r / H, h = r - i * H;
        const int64_t n = u * F + tok0 + i;      // token row of q/k/v
        const int64_t row = slot * F + tok0 + i;  // cache row
        const float2* csr = cs + i * half + d0 / 2;
        float x[VEC];

        load_vec<T, VEC, VECTOR>(q + b * p.q_sb + n * p.q_sn + h * p.q_sh + d0, x);
        rotate_pairs<VEC>(x, csr);
        store_vec<T, VEC, VECTOR>(q_rot + b * p.o_sb + n * p.o_sn + h * p.o_sh + d0, x);

        load_vec<T, VEC, VECTOR>(k + b * p.k_sb + n * p.k_sn + h * p.k_sh + d0, x);
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] += x[e];  // pre-RoPE key
        if (slot_ok) {
            rotate_pairs<VEC>(x, csr);
            store_vec<T, VEC, VECTOR>(k_cache + b * p.kc_sb + row * p.kc_sn + h * p.kc_sh + d0, x);
            copy_vec<T, VEC, VECTOR>(v_cache + b * p.vc_sb + row * p.vc_sn + h * p.vc_sh + d0,
                                     v + b * p.v_sb + n * p.v_sn + h * p.v_sh + d0);
        }
    }
    if (!slot_ok || p.proto == nullptr) return;  // uniform: no thread of this block reaches the barrier below

    // [R, D] partials -> one [D] sum -> D atomics into proto (fp32 atomics: the summation order
    // varies between runs, ~1e-7 relative noise, no other nondeterminism).
#pragma unroll
    for (int e = 0; e < VEC; ++e) part[ty * D + d0 + e] = acc[e];
    __syncthreads();
    float* proto_row = p.proto + b * p.p_sb + slot * p.p_ss;
    for (int d = tid; d < D; d += n_threads) {
        float s = 0.f;
        for (int l = 0; l < n_lanes; ++l) s += part[l * D + d];
        atomicAdd(proto_row + d, s * p.inv_count);
    }
}

}  // namespace relaxkv
