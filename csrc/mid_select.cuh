// mid_select: PackForcing mid-block top-k (relaxkv_kernels/memory/pack.py), two launches.
// Contract (formula, shapes, dtypes): relaxkv_kernels.ops.mid_select; what follows is how the kernels compute it.
//
//   qsum[b, h]  = sum_{i < Nsq} q[b, i * q_stride, h]              (h < H/2, fp32)
//   s_{b,m}     = Nc / (sqrt(D) * H/2) * sum_{h < H/2} qsum[b, h] . mean_key[b, mid_slots[m], h]
//               = |Sq| * Nc * mean_{h<H/2} qbar_b . kbar_{b,m} / sqrt(D)   (bilinear identity)
//   batch_mean: the mean over (b, h < H/2) instead (factor Nc / (sqrt(D) * B * H/2)), the same for every b
//   sample b's k = target_pos.numel() best blocks, in time (mid_slots) order ->
//   seg[b, seg_index + j] = (row0 + slot * Nc, Nc, target_pos[j] - block_pos[slot])
//
// Kernel 1, grid (n_split, H/2, B), block (D / VEC, R): a split of the subsampled tokens of one
// (b, h), 16-byte loads, fp32 partial sums reduced over the R row lanes in shared memory, written
// to ws[b, h, split, :]. Kernel 2, one block per sample (one block for all with batch_mean): its
// samples' partials -> qsum (fixed order: deterministic, and a sample's score does not depend on the
// batch it runs in), one warp per mid block for the dot products, the top-k in shared memory, the
// segment rows of its samples.
#pragma once

#include "select.cuh"

namespace relaxkv {

constexpr int kMidQsumThreads = 256;
constexpr int kMidSelectThreads = 256;

struct MidSelectParams {
    Rows q;                     // [B, Nq, H, D]
    const float* mean_key;      // [B, n_blocks, H, D], strides k_s
    const int64_t* mid_slots;   // [M]
    const int64_t* block_pos;   // [n_blocks]
    const int64_t* target_pos;  // [k]
    int32_t* seg;               // [B, n_seg, 3], strides seg_s
    float* scores;              // [B, M]
    float* ws;                  // [B, H/2, n_split, D] partial sums, then [B, H/2, D] qsum
    int64_t n_sub;              // |Sq| = ceil(Nq / q_stride)
    int64_t q_stride;
    int64_t n_blocks;           // mean_key rows (archive slots)
    int64_t row0;
    int64_t block_tokens;
    int batch, half_heads, head_dim, n_split, n_mid, n_sel, seg_index;
    bool batch_mean;            // one block scores the mean over the batch and writes every sample's rows
    float factor;               // Nc / (sqrt(D) * H/2), batch_mean: Nc / (sqrt(D) * B * H/2)
    Strides4 k_s;
    Strides3 seg_s;
};

// Dynamic shared memory: [R, D] fp32 partials.
template <typename V>
__global__ void __launch_bounds__(kMidQsumThreads) mid_select_qsum_kernel(const MidSelectParams p) {
    using T = typename V::T;
    constexpr int VEC = V::N;
    extern __shared__ float part[];
    const int tx = threadIdx.x, ty = threadIdx.y, n_lanes = blockDim.y;
    const int D = p.head_dim, d0 = tx * VEC;
    const int split = blockIdx.x;
    const int64_t h = blockIdx.y, b = blockIdx.z;
    const int64_t per_split = ceil_div(p.n_sub, p.n_split);
    const int64_t i0 = split * per_split, i1 = min(p.n_sub, i0 + per_split);
    const T* q = p.q.at<const T>(b, 0, h) + d0;

    float acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = 0.f;
    for (int64_t i = i0 + ty; i < i1; i += n_lanes) {
        float x[VEC];
        V::load(q + i * p.q_stride * p.q.sn, x);
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] += x[e];
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) part[ty * D + d0 + e] = acc[e];
    __syncthreads();
    float* out = p.ws + ((b * p.half_heads + h) * p.n_split + split) * D;
    for (int d = ty * blockDim.x + tx; d < D; d += blockDim.x * n_lanes) {
        float s = 0.f;
        for (int l = 0; l < n_lanes; ++l) s += part[l * D + d];
        out[d] = s;
    }
}

// Grid (B) (batch_mean: 1). Dynamic shared memory: scores [M] fp32, flag [M], picked [M] int.
__global__ void __launch_bounds__(kMidSelectThreads) mid_select_kernel(const MidSelectParams p) {
    extern __shared__ float score[];
    int* flag = reinterpret_cast<int*>(score + p.n_mid);
    int* picked = flag + p.n_mid;
    const int D = p.head_dim, HH = p.half_heads;
    const int b0 = p.batch_mean ? 0 : int(blockIdx.x), n_b = p.batch_mean ? p.batch : 1;  // this block's samples
    const int64_t e0 = int64_t(b0) * HH * D, n_e = int64_t(n_b) * HH * D;  // their (b, h, d) entries
    // qsum [B, H/2, D] after the partials; each block writes and reads only its samples' entries (plain loads)
    float* qsum = p.ws + int64_t(p.batch) * HH * D * p.n_split + e0;

    for (int64_t e = threadIdx.x; e < n_e; e += blockDim.x) {
        const int64_t bh = (e0 + e) / D, d = (e0 + e) - bh * D;
        const float* part = p.ws + bh * p.n_split * D + d;
        float s = 0.f;
        for (int i = 0; i < p.n_split; ++i) s += part[i * D];
        qsum[e] = s;
    }
    __syncthreads();

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
    for (int m = warp; m < p.n_mid; m += n_warps) {
        const int64_t slot = p.mid_slots[m];
        float acc = 0.f;
        if (slot >= 0 && slot < p.n_blocks) {  // uniform over the warp
            for (int64_t e = lane; e < n_e; e += 32) {
                const int64_t bh = (e0 + e) / D, d = (e0 + e) - bh * D, b = bh / HH, h = bh - b * HH;
                acc += qsum[e] * p.mean_key[b * p.k_s[0] + slot * p.k_s[1] + h * p.k_s[2] + d * p.k_s[3]];
            }
        }
        acc = warp_sum(acc);
        if (lane == 0) {
            score[m] = acc * p.factor;
            for (int b = b0; b < b0 + n_b; ++b) p.scores[int64_t(b) * p.n_mid + m] = acc * p.factor;
        }
    }
    __syncthreads();
    block_top_k_in_order(score, p.n_mid, p.n_sel, flag, picked);

    for (int e = threadIdx.x; e < n_b * p.n_sel; e += blockDim.x) {
        const int b = b0 + e / p.n_sel, j = e % p.n_sel;
        const int64_t slot = p.mid_slots[picked[j]];
        const bool ok = slot >= 0 && slot < p.n_blocks;
        write_seg_row(p.seg, p.seg_s, b, p.seg_index + j, p.row0 + (ok ? slot : 0) * p.block_tokens,
                      ok ? p.block_tokens : 0,  // an invalid slot attends to nothing
                      ok ? p.target_pos[j] - p.block_pos[slot] : 0);
    }
}

}  // namespace relaxkv
