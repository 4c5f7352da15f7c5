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

static inline __m256 bf16x8_to_f32(const uint16_t *p) {
    __m128i raw = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, NaN kept quiet */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* x_f32: (M, I) float32 copy of the activations, prepared once per call by the caller below. */
static void rows_kernel(const uint16_t *W, const float *x_f32, uint16_t *y, float *y_f32,
                        int64_t M, int64_t O, int64_t I, int64_t o_begin, int64_t o_end) {
    const int64_t I32 = I & ~(int64_t)31;
    for (int64_t o = o_begin; o < o_end; ++o) {
        const uint16_t *w = W + o * I;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int64_t mt = (M - m0) < 4 ? (M - m0) : 4;
            __m256 acc[4][2];
            for (int j = 0; j < 4; ++j) { acc[j][0] = _mm256_setzero_ps(); acc[j][1] = _mm256_setzero_ps(); }
            int64_t i = 0;
            for (; i < I32; i += 32) {
                __m256 w0 = bf16x8_to_f32(w + i), w1 = bf16x8_to_f32(w + i + 8);
                __m256 w2 = bf16x8_to_f32(w + i + 16), w3 = bf16x8_to_f32(w + i + 24);
                for (int64_t j = 0; j < mt; ++j) {
                    const float *xr = x_f32 + (m0 + j) * I + i;
                    acc[j][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[j][0]);
                    acc[j][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc[j][1]);
                    acc[j][0] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xr + 16), acc[j][0]);
                    acc[j][1] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xr + 24), acc[j][1]);
                }
            }
            for (int64_t j = 0; j < mt; ++j) {
                float s = hsum(_mm256_add_ps(acc[j][0], acc[j][1]));
                const float *xr = x_f32 + (m0 + j) * I;
                for (int64_t k = i; k < I; ++k) {
                    uint32_t u = (uint32_t)w[k] << 16;
                    float wf;
                    memcpy(&wf, &u, 4);
                    s += wf * xr[k];
                }
                if (y) y[(m0 + j) * O + o] = f32_to_bf16(s);
                else y_f32[(m0 + j) * O + o] = s;
            }
        }
    }
}

/* y (M, O) bf16 (or y_f32 float32 when y is NULL) = x (M, I) bf16 @ W(O, I)^T.
 * x_f32 is caller-provided scratch of M * I floats. */
void accessory_gemv_bf16(const uint16_t *W, const uint16_t *x, float *x_f32, uint16_t *y, float *y_f32,
                         int64_t M, int64_t O, int64_t I) {
    for (int64_t k = 0; k < M * I; ++k) {
        uint32_t u = (uint32_t)x[k] << 16;
        memcpy(&x_f32[k], &u, 4);
    }
    const int64_t block = 16;  /* rows per task: small enough to balance, big enough to amortise */
    const int64_t n_blocks = (O + block - 1) / block;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < n_blocks; ++b) {
        int64_t o_end = (b + 1) * block < O ? (b + 1) * block : O;
        rows_kernel(W, x_f32, y, y_f32, M, O, I, b * block, o_end);
    }
}
