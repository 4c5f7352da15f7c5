/* Matrix-vector products with bf16 weights for small batches on x86-64 (AVX2 + FMA).
 *
 * y[m, o] = sum_i x[m, i] * W[o, i] for m < M (M small: decode steps of one or a few streams),
 * W row-major (O, I) in bfloat16, x and y in bfloat16, accumulation in float32.
 *
 * Decoding is bound by reading W once per token; torch's generic bf16 path reads it at a fraction
 * of the memory bandwidth. Here each W row is streamed once, converted to float32 by a 16-bit
 * shift, and applied to every x row while it is in L1. Rows are spread over OpenMP threads (the
 * same libgomp torch uses, so no second thread pool competes for the cores).
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "common.h"

/* Weight bytes are software-prefetched this far ahead of the loads, one cache line per 64 bytes:
 * on the 2-core AVX2 machine of benchmarks/README.md this read matrices larger than the caches
 * 5-12% faster at two threads than the hardware prefetchers alone (1 KB measured best of
 * 1, 2 and 4 KB for one activation row). */
#define PREFETCH_BYTES 1024
#define PREFETCH(address) _mm_prefetch((const char *)(address) + PREFETCH_BYTES, _MM_HINT_T0)

/* Blocks of 16 activations reordered as [0-3, 8-11, 4-7, 12-15]: the order in which unpacking
 * 16 bf16 weights against zeros (per 128-bit lane) yields them as two float32 vectors. Elements
 * past the last whole block of 32 keep their order. */
static void reorder_activations(const float *x, float *xp, int64_t M, int64_t I) {
    const int64_t I32 = I & ~(int64_t)31;
    for (int64_t m = 0; m < M; ++m) {
        const float *src = x + m * I;
        float *dst = xp + m * I;
        for (int64_t i = 0; i < I32; i += 16) {
            memcpy(dst + i, src + i, 4 * sizeof(float));
            memcpy(dst + i + 4, src + i + 8, 4 * sizeof(float));
            memcpy(dst + i + 8, src + i + 4, 4 * sizeof(float));
            memcpy(dst + i + 12, src + i + 12, 4 * sizeof(float));
        }
        memcpy(dst + I32, src + I32, (I - I32) * sizeof(float));
    }
}

/* One weight row against `mt` activation rows (reordered); `mt` is a compile-time constant at
 * every call site, so the row loop unrolls. sums[j] receives row j's dot product. */
static inline __attribute__((always_inline)) void bf16_tile(const uint16_t *w, const float *xp, int64_t I,
                                                            const int mt, float *sums) {
    const int64_t I32 = I & ~(int64_t)31;
    const __m256i zero = _mm256_setzero_si256();
    __m256 acc[4][2];
    for (int j = 0; j < mt; ++j) { acc[j][0] = _mm256_setzero_ps(); acc[j][1] = _mm256_setzero_ps(); }
    for (int64_t i = 0; i < I32; i += 32) {
        PREFETCH(w + i);
        const __m256i r0 = _mm256_loadu_si256((const __m256i *)(w + i));
        const __m256i r1 = _mm256_loadu_si256((const __m256i *)(w + i + 16));
        const __m256 w0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, r0));
        const __m256 w1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, r0));
        const __m256 w2 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, r1));
        const __m256 w3 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, r1));
        for (int j = 0; j < mt; ++j) {
            const float *xr = xp + j * I + i;
            acc[j][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[j][0]);
            acc[j][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc[j][1]);
            acc[j][0] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xr + 16), acc[j][0]);
            acc[j][1] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xr + 24), acc[j][1]);
        }
    }
    for (int j = 0; j < mt; ++j) {
        float s = hsum8(_mm256_add_ps(acc[j][0], acc[j][1]));
        const float *xr = xp + j * I;
        for (int64_t k = I32; k < I; ++k) s += bf16_to_float(w[k]) * xr[k];
        sums[j] = s;
    }
}

/* Two weight rows against `mt` activation rows (a compile-time constant): each activation
 * vector loaded is used twice, which lets batched steps (several streams) run closer to the
 * FMA units' rate than one row at a time does. */
static inline __attribute__((always_inline)) void bf16_tile_pair(const uint16_t *wa, const uint16_t *wb,
                                                                 const float *xp, int64_t I, const int mt,
                                                                 float *sums_a, float *sums_b) {
    const int64_t I32 = I & ~(int64_t)31;
    const __m256i zero = _mm256_setzero_si256();
    __m256 acc_a[4], acc_b[4];
    for (int j = 0; j < mt; ++j) { acc_a[j] = _mm256_setzero_ps(); acc_b[j] = _mm256_setzero_ps(); }
    for (int64_t i = 0; i < I32; i += 16) {
        if (!(i & 31)) {
            PREFETCH(wa + i);
            PREFETCH(wb + i);
        }
        const __m256i ra = _mm256_loadu_si256((const __m256i *)(wa + i));
        const __m256i rb = _mm256_loadu_si256((const __m256i *)(wb + i));
        const __m256 a0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, ra));
        const __m256 a1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, ra));
        const __m256 b0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, rb));
        const __m256 b1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, rb));
        for (int j = 0; j < mt; ++j) {
            const __m256 x0 = _mm256_loadu_ps(xp + j * I + i), x1 = _mm256_loadu_ps(xp + j * I + i + 8);
            acc_a[j] = _mm256_fmadd_ps(a0, x0, acc_a[j]);
            acc_b[j] = _mm256_fmadd_ps(b0, x0, acc_b[j]);
            acc_a[j] = _mm256_fmadd_ps(a1, x1, acc_a[j]);
            acc_b[j] = _mm256_fmadd_ps(b1, x1, acc_b[j]);
        }
    }
    for (int j = 0; j < mt; ++j) {
        float sa = hsum8(acc_a[j]), sb = hsum8(acc_b[j]);
        const float *xr = xp + j * I;
        for (int64_t k = I32; k < I; ++k) {
            sa += bf16_to_float(wa[k]) * xr[k];
            sb += bf16_to_float(wb[k]) * xr[k];
        }
        sums_a[j] = sa;
        sums_b[j] = sb;
    }
}

static inline void store_sums(uint16_t *y, float *y_f32, int64_t O, int64_t o, int64_t m0, int64_t mt,
                              const float *sums) {
    for (int64_t j = 0; j < mt; ++j) {
        if (y) y[(m0 + j) * O + o] = float_to_bf16(sums[j]);
        else y_f32[(m0 + j) * O + o] = sums[j];
    }
}

/* xp: (M, I) activations in float32, reordered by reorder_activations. */
static void rows_kernel(const uint16_t *W, const float *xp, uint16_t *y, float *y_f32,
                        int64_t M, int64_t O, int64_t I, int64_t o_begin, int64_t o_end) {
    float sums[4], sums_b[4];
    int64_t o = o_begin;
    if (M > 4) {  /* weight rows in pairs: measured 1.3-1.6x faster at 16 rows, slower at 4 */
        for (; o + 1 < o_end; o += 2) {
            const uint16_t *wa = W + o * I, *wb = wa + I;
            for (int64_t m0 = 0; m0 < M; m0 += 4) {
                const int64_t mt = (M - m0) < 4 ? (M - m0) : 4;
                const float *x = xp + m0 * I;
                switch (mt) {
                    case 1: bf16_tile_pair(wa, wb, x, I, 1, sums, sums_b); break;
                    case 2: bf16_tile_pair(wa, wb, x, I, 2, sums, sums_b); break;
                    case 3: bf16_tile_pair(wa, wb, x, I, 3, sums, sums_b); break;
                    default: bf16_tile_pair(wa, wb, x, I, 4, sums, sums_b); break;
                }
                store_sums(y, y_f32, O, o, m0, mt, sums);
                store_sums(y, y_f32, O, o + 1, m0, mt, sums_b);
            }
        }
    }
    for (; o < o_end; ++o) {
        const uint16_t *w = W + o * I;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int64_t mt = (M - m0) < 4 ? (M - m0) : 4;
            const float *x = xp + m0 * I;
            switch (mt) {
                case 1: bf16_tile(w, x, I, 1, sums); break;
                case 2: bf16_tile(w, x, I, 2, sums); break;
                case 3: bf16_tile(w, x, I, 3, sums); break;
                default: bf16_tile(w, x, I, 4, sums); break;
            }
            store_sums(y, y_f32, O, o, m0, mt, sums);
        }
    }
}

static void gemv_rows(const uint16_t *W, const float *xp, uint16_t *y, float *y_f32,
                      int64_t M, int64_t O, int64_t I) {
    const int64_t block = 16;  /* rows per task: small enough to balance, big enough to amortise */
    const int64_t n_blocks = (O + block - 1) / block;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < n_blocks; ++b) {
        int64_t o_end = (b + 1) * block < O ? (b + 1) * block : O;
        rows_kernel(W, xp, y, y_f32, M, O, I, b * block, o_end);
    }
}

/* y (M, O) bf16 (or y_f32 float32 when y is NULL) = x (M, I) bf16 @ W(O, I)^T.
 * scratch: 2 * M * I floats. */
void accessory_gemv_bf16(const uint16_t *W, const uint16_t *x, float *scratch, uint16_t *y, float *y_f32,
                         int64_t M, int64_t O, int64_t I) {
    float *x_f32 = scratch + M * I;
    for (int64_t k = 0; k < M * I; ++k) x_f32[k] = bf16_to_float(x[k]);
    reorder_activations(x_f32, scratch, M, I);
    gemv_rows(W, scratch, y, y_f32, M, O, I);
}

/* y_f32 (M, O) = x_f32 (M, I) @ W(O, I)^T, activations in float32 (the decode path's buffers).
 * scratch: M * I floats. */
void accessory_gemv_bf16_f32(const uint16_t *W, const float *x_f32, float *scratch, float *y_f32,
                             int64_t M, int64_t O, int64_t I) {
    reorder_activations(x_f32, scratch, M, I);
    gemv_rows(W, scratch, NULL, y_f32, M, O, I);
}
