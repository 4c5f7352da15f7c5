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

/* Sums of weight row o against activation rows m0..m0+mt-1 into y (M, O) as bf16, or into y_f32
 * as float32 when y is NULL. */
static inline void store_sums(uint16_t *y, float *y_f32, int64_t O, int64_t o, int64_t m0, int64_t mt,
                              const float *sums) {
    for (int64_t j = 0; j < mt; ++j) {
        if (y) y[(m0 + j) * O + o] = float_to_bf16(sums[j]);
        else y_f32[(m0 + j) * O + o] = sums[j];
    }
}

#ifdef __AVX512F__
/* Lane k of the result is the sum of v[k]'s 16 lanes. */
static inline __m512 sum_lanes16(const __m512 v[16]) {
    __m512 s[8], u[4], w[2];
    for (int k = 0; k < 8; ++k) /* per 128-bit chunk: [a0+a2, b0+b2, a1+a3, b1+b3] */
        s[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
    for (int k = 0; k < 4; ++k) /* per chunk: one partial sum each of four vectors, in order */
        u[k] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * k], s[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(s[2 * k], s[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int k = 0; k < 2; ++k) /* chunks: [u0 c0+c1, u0 c2+c3, u1 c0+c1, u1 c2+c3] */
        w[k] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * k], u[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(u[2 * k], u[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
}
#endif

#endif
