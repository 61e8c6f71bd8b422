// CPU emulation of the fp16 storage type: conversions only, round to nearest even (GCC's _Float16).
#pragma once
#include <cstdint>
#include <cstring>

struct __half {
    uint16_t bits;
};

inline float __half2float(__half h) {
    _Float16 f;
    std::memcpy(&f, &h.bits, sizeof(f));
    return float(f);
}

inline __half __float2half_rn(float x) {
    const _Float16 f = static_cast<_Float16>(x);
    __half h;
    std::memcpy(&h.bits, &f, sizeof(f));
    return h;
}
