// Wan 3D RoPE pieces shared by every kernel that rotates keys (rope_append, compress_kv,
// gather_kv_rope): the one copy of the pair split, the inverse-frequency table and the rotation.
//
// Pairs are adjacent elements (x[2j], x[2j+1]); with c = D / 2 pairs, the first c - 2 (c / 3) turn by
// the temporal position, the next c / 3 by the row y, the last c / 3 by the column x. For an axis of
// d real dims, pair i of the axis has inverse frequency theta^(-2i/d), theta = 10000, built in fp64
// on the host (as relaxkv_kernels/geometry.py does) and rounded once to fp32; angles are
// position * inv_freq in fp32 and go through sincosf (full range reduction, no fast-math), so
// fractional positions (compressed tokens) and deltas of any sign are exact to fp32 rounding.
#pragma once

#include <cmath>

#include "common.cuh"

namespace relaxkv {

constexpr int kRopeMaxPairs = kMaxHeadDim / 2;
constexpr double kRopeTheta = 10000.0;

// The pair split and the fp32 inverse frequency of every pair. Passed by value (1 KiB of kernel parameters).
struct RopeFreqs {
    int n_t, n_h;  // temporal and height pairs; width takes the rest
    float inv_freq[kRopeMaxPairs];
};

// Wan inverse frequencies of the D / 2 pairs, axes (t, h, w) concatenated, fp64 -> fp32 once.
inline RopeFreqs wan_rope(int64_t head_dim) {
    const int c = int(head_dim / 2);
    RopeFreqs f{};
    f.n_t = c - 2 * (c / 3);
    f.n_h = c / 3;
    const int counts[3] = {f.n_t, f.n_h, c - f.n_t - f.n_h};
    int j = 0;
    for (int axis = 0; axis < 3; ++axis) {
        const double d = 2.0 * counts[axis];
        for (int i = 0; i < counts[axis]; ++i, ++j) f.inv_freq[j] = float(1.0 / std::pow(kRopeTheta, 2.0 * i / d));
    }
    return f;
}

// Rotation angle of pair j of a token at (t, y, x): t for the temporal pairs, y for the height pairs, x for the rest.
__device__ __forceinline__ float rope_angle(const RopeFreqs& f, int j, float t, float y, float x) {
    return (j < f.n_t ? t : j < f.n_t + f.n_h ? y : x) * f.inv_freq[j];
}

// (a, b) -> (a cos - b sin, a sin + b cos) for the first n (default all VEC / 2) pairs of x; cs[p] = (cos, sin).
template <int VEC>
__device__ __forceinline__ void rotate_pairs(float (&x)[VEC], const float2* cs, int n = VEC / 2) {
#pragma unroll
    for (int p = 0; p < VEC / 2; ++p) {
        if (p >= n) break;
        const float2 c = cs[p];
        const float a = x[2 * p], b = x[2 * p + 1];
        x[2 * p] = a * c.x - b * c.y;
        x[2 * p + 1] = a * c.y + b * c.x;
    }
}

}  // namespace relaxkv
