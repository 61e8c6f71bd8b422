// Wan 3D RoPE pieces shared by every kernel that rotates keys (rope_append, compress_kv,
// gather_kv_rope): the one copy of the pair split, the inverse-frequency table and the rotation.
//
// Pairs are adjacent elements (x[2j], x[2j+1]); with c = D / 2 pairs, the first c - 2 (c / 3) turn by
// the temporal position, the next c / 3 by the row y, the last c / 3 by the column x. For an axis of
// d real dims, pair i of the axis has inverse frequency theta^(-2i/d), theta = 10000, built in fp64
// on the host (as relaxkv_kernels/geometry.py does) and rounded once to fp32; angles are
// position * inv_freq in fp32 and go through sincosf (full range reduction, no fast-math), so
// fractional positions (compressed tokens) and deltas of any sign are exact to fp32 rounding. Temporal
// angles at absolute positions (rope_cos_sin: append, compression) take the fp64 table and are reduced in
// fp64 first: in fp32 a frame at position 10^5 turns 3e-3 rad off (the table's and the product's rounding).
#pragma once

#include <cmath>

#include "common.cuh"

namespace relaxkv {

constexpr int kRopeMaxPairs = kMaxHeadDim / 2;
constexpr double kRopeTheta = 10000.0;

// The pair split and the inverse frequency of every pair, fp32, and fp64 for the temporal pairs (at most
// kRopeMaxPairs / 3 + 2). Passed by value (1.4 KiB of kernel parameters).
struct RopeFreqs {
    int n_t, n_h;  // temporal and height pairs; width takes the rest
    float inv_freq[kRopeMaxPairs];
    double inv_freq_t[kRopeMaxPairs / 3 + 2];
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
        for (int i = 0; i < counts[axis]; ++i, ++j) {
            const double inv = 1.0 / std::pow(kRopeTheta, 2.0 * i / d);
            f.inv_freq[j] = float(inv);
            if (axis == 0) f.inv_freq_t[i] = inv;
        }
    }
    return f;
}

// (cos, sin) of pair j of a token at (t, y, x): t (an absolute position, fp64) for the temporal pairs, reduced to
// [-pi, pi] in fp64 (2 pi in two parts: k * 2 pi exact to fp64 rounding up to positions of 2^40); y for the height
// pairs, x for the rest, in fp32.
__device__ __forceinline__ float2 rope_cos_sin(const RopeFreqs& f, int j, double t, float y, float x) {
    float angle;
    if (j < f.n_t) {
        const double a = t * f.inv_freq_t[j];
        const double k = rint(a * 0.15915494309189535);
        angle = float(fma(-k, 2.4492935982947064e-16, fma(-k, 6.283185307179586, a)));  // 2 pi = hi + lo
    } else {
        angle = (j < f.n_t + f.n_h ? y : x) * f.inv_freq[j];
    }
    float s, c;
    sincosf(angle, &s, &c);
    return make_float2(c, s);
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
