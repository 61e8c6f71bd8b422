// Top-k of a small score vector inside one thread block, shared by relax_select and mid_select.
//
// Order (the references' top_in_order): finite scores first, higher first, ties to the lower index; then
// the non-finite ones (NaN, +-inf) by index, so a non-finite score is never chosen over a finite one. The
// k winners are then listed by index (memory / time order), which is the order their segment rows are
// written in.
#pragma once

#include <cfloat>

#include "common.cuh"

namespace relaxkv {

// Whether entry (a, ia) comes before entry (b, ib) in that order.
__device__ __forceinline__ bool ranks_before(float a, int ia, float b, int ib) {
    const bool fa = fabsf(a) <= FLT_MAX, fb = fabsf(b) <= FLT_MAX;  // finite: false for NaN and +-inf
    if (fa != fb) return fa;
    if (fa && a != b) return a > b;
    return ia < ib;
}

// picked[0 .. k-1] = indices of the k best of score[0 .. n-1] (shared memory), ascending.
// flag: shared int [n] scratch. Every thread of the block calls this (it synchronises).
// O(n^2 / threads): n is a handful of candidates / mid blocks.
__device__ inline void block_top_k_in_order(const float* score, int n, int k, int* flag, int* picked) {
    for (int c = threadIdx.x; c < n; c += blockDim.x) {
        int rank = 0;
        for (int o = 0; o < n; ++o) rank += ranks_before(score[o], o, score[c], c);
        flag[c] = rank < k;
    }
    __syncthreads();
    for (int c = threadIdx.x; c < n; c += blockDim.x) {
        if (!flag[c]) continue;
        int j = 0;
        for (int o = 0; o < c; ++o) j += flag[o];
        picked[j] = c;
    }
    __syncthreads();
}

// Row i of batch element b of a segment table seg [B, n_seg, 3] (element strides s) = (start, length, delta).
__device__ inline void write_seg_row(int32_t* seg, const Strides3& s, int64_t b, int64_t i, int64_t start,
                                     int64_t length, int64_t delta) {
    int32_t* row = seg + b * s[0] + i * s[1];
    row[0] = int32_t(start);
    row[s[2]] = int32_t(length);
    row[2 * s[2]] = int32_t(delta);
}

}  // namespace relaxkv
