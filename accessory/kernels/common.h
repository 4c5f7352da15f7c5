/* Helpers shared by the kernels of this folder. Each .c file is compiled on its own; the build
 * hash in kernels/__init__.py covers this header too, so a change here rebuilds them all. */
#ifndef ACCESSORY_KERNELS_COMMON_H
#define ACCESSORY_KERNELS_COMMON_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

/* The sum of the eight lanes. */
static inline float hsum8(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

/* CALL(n) with n = mt (1..4 activation rows) as a compile-time constant, so a tile's loops over
 * its rows unroll and its accumulators stay in registers. */
#define WITH_CONSTANT_ROWS(mt, CALL) \
    switch (mt) { case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; default: CALL(4); break; }

static inline float bf16_to_float(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, NaN kept quiet */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#endif
