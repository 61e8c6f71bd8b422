// relax_select: Relax Forcing history selection (relaxkv_kernels/memory/relax.py), one launch of B tiny blocks.
// Contract (formula, shapes, dtypes): relaxkv_kernels.ops.relax_select; what follows is how the kernels compute it.
//
//   p_x     = x / max(||x||, eps)               (sink / tail: x = mean of their frames' proto rows)
//   r[b, c] = <p_{cand c}, p_sink> - lam * <p_{cand c}, p_tail>     (a term dropped when S or T = 0)
//   the H_sel best candidates of r[b] (or of r[0] when batch0), in memory order, ->
//   seg[b, seg_index + j] = (slot * F, F, target_pos[j] - slot_pos[slot])   (delta 0: contiguous)
//
// Grid (B), block kRelaxThreads: frame means in fp32 (as the reference), norms and dots in fp64 with
// warp shuffles, one warp per candidate; every block recomputes batch element 0's scores itself when
// batch0 (no cross-block dependency). Slots outside [0, n_slots) read as zero rows: validated in
// Python, never dereferenced.
#pragma once

#include "select.cuh"

namespace relaxkv {

constexpr int kRelaxThreads = 128;

struct RelaxSelectParams {
    const float* proto;         // [B, n_slots, D], strides p_s
    const int64_t* slot_pos;    // [n_slots]
    const int64_t* sink_slots;  // [S]
    const int64_t* tail_slots;  // [T]
    const int64_t* cand_slots;  // [C']
    const int64_t* target_pos;  // [H_sel]
    int32_t* seg;               // [B, n_seg, 3], strides seg_s
    float* scores;              // [B, C']
    int64_t n_slots;
    int64_t frame_tokens;
    int n_sink, n_tail, n_cand, n_sel, head_dim, seg_index;
    double lam;
    double eps;  // prototype normalisation: x / max(||x||, eps) (relaxkv_kernels/geometry.py PROTO_EPS)
    bool batch0;
    bool contiguous;
    Strides3 p_s, seg_s;
};

__device__ __forceinline__ float proto_at(const RelaxSelectParams& p, int64_t b, int64_t slot, int d) {
    if (slot < 0 || slot >= p.n_slots) return 0.f;
    return p.proto[b * p.p_s[0] + slot * p.p_s[1] + d * p.p_s[2]];
}

// out[c] = r[b, c] for every candidate; mean_s / mean_t: shared [D] scratch.
__device__ inline void relax_scores(const RelaxSelectParams& p, int64_t b, float* mean_s, float* mean_t,
                                    float* out) {
    const int D = p.head_dim;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float s = 0.f, t = 0.f;
        for (int i = 0; i < p.n_sink; ++i) s += proto_at(p, b, p.sink_slots[i], d);
        for (int i = 0; i < p.n_tail; ++i) t += proto_at(p, b, p.tail_slots[i], d);
        mean_s[d] = p.n_sink ? s / float(p.n_sink) : 0.f;
        mean_t[d] = p.n_tail ? t / float(p.n_tail) : 0.f;
    }
    __syncthreads();
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
    // every warp takes the two set norms itself: D / 32 loads, no block-wide reduction
    double ss = 0.0, tt = 0.0;
    for (int d = lane; d < D; d += 32) {
        ss += double(mean_s[d]) * mean_s[d];
        tt += double(mean_t[d]) * mean_t[d];
    }
    const double ns = fmax(sqrt(warp_sum(ss)), p.eps), nt = fmax(sqrt(warp_sum(tt)), p.eps);
    for (int c = warp; c < p.n_cand; c += n_warps) {
        const int64_t slot = p.cand_slots[c];
        double xx = 0.0, xs = 0.0, xt = 0.0;
        for (int d = lane; d < D; d += 32) {
            const double x = proto_at(p, b, slot, d);
            xx += x * x;
            xs += x * mean_s[d];
            xt += x * mean_t[d];
        }
        xx = warp_sum(xx), xs = warp_sum(xs), xt = warp_sum(xt);
        const double nx = fmax(sqrt(xx), p.eps);
        double r = 0.0;
        if (p.n_sink) r += xs / (nx * ns);
        if (p.n_tail) r -= p.lam * (xt / (nx * nt));
        if (lane == 0) out[c] = float(r);
    }
    __syncthreads();  // out complete; mean_s / mean_t free again
}

// Dynamic shared memory: mean_s [D], mean_t [D], own [C'], pick [C'] fp32; flag [C'], picked [C'] int.
__global__ void __launch_bounds__(kRelaxThreads) relax_select_kernel(const RelaxSelectParams p) {
    extern __shared__ float smem_f[];
    const int64_t b = blockIdx.x;
    const int C = p.n_cand;
    float* mean_s = smem_f;
    float* mean_t = mean_s + p.head_dim;
    float* own = mean_t + p.head_dim;
    float* pick = own + C;
    int* flag = reinterpret_cast<int*>(pick + C);
    int* picked = flag + C;

    relax_scores(p, b, mean_s, mean_t, own);
    for (int c = threadIdx.x; c < C; c += blockDim.x) p.scores[b * C + c] = own[c];
    const float* decide = own;
    if (p.batch0 && b != 0) {  // uniform over the block
        relax_scores(p, 0, mean_s, mean_t, pick);
        decide = pick;
    }
    block_top_k_in_order(decide, C, p.n_sel, flag, picked);

    for (int j = threadIdx.x; j < p.n_sel; j += blockDim.x) {
        const int64_t slot = p.cand_slots[picked[j]];
        const int64_t delta = p.contiguous || slot < 0 || slot >= p.n_slots ? 0 : p.target_pos[j] - p.slot_pos[slot];
        write_seg_row(p.seg, p.seg_s, b, p.seg_index + j, slot * p.frame_tokens, p.frame_tokens, delta);
    }
}

}  // namespace relaxkv
