// CPU emulation of the bf16 storage type: conversions only, round to nearest even, NaN kept quiet.
#pragma once
#include <bit>
#include <cstdint>

struct __nv_bfloat16 {
    uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) { return std::bit_cast<float>(uint32_t(h.bits) << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float x) {
    const uint32_t u = std::bit_cast<uint32_t>(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x0040u)};
    return {uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
