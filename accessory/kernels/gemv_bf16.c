/* Products with bf16 weights on x86-64 (AVX2 + FMA): decode steps and prompt-sized inputs.
 *
 * y[m, o] = sum_i x[m, i] * W[o, i] for m < M, W row-major (O, I) in bfloat16, x and y in bfloat16
 * (or float32, the decode step's buffers), accumulation in float32.
 *
 * Decoding (M of one to a few streams) is bound by reading W once per token; torch's generic bf16
 * path reads it at a fraction of the memory bandwidth. Here each W row is streamed once, converted
 * to float32 by a 16-bit shift, and applied to every x row while it is in L1. From OUTER_MIN_ROWS
 * rows (many streams, or a prompt) the work is bound by arithmetic instead and takes the
 * outer-product form further down. Rows of W are spread over OpenMP threads (the same libgomp
 * torch uses, so no second thread pool competes for the cores).
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

/* xp: (M, I) activations in float32, reordered by reorder_activations. */
static void rows_kernel(const uint16_t *W, const float *xp, uint16_t *y, float *y_f32,
                        int64_t M, int64_t O, int64_t I, int64_t o_begin, int64_t o_end) {
    float sums[4], sums_b[4];
    int64_t o = o_begin;
    if (M > 4) {  /* weight rows in pairs (5 rows here): measured 1.3-1.6x faster at 16 rows, slower at 4 */
        for (; o + 1 < o_end; o += 2) {
            const uint16_t *wa = W + o * I, *wb = wa + I;
            for (int64_t m0 = 0; m0 < M; m0 += 4) {
                const int64_t mt = (M - m0) < 4 ? (M - m0) : 4;
                const float *x = xp + m0 * I;
#define PAIR_TILE(n) bf16_tile_pair(wa, wb, x, I, n, sums, sums_b)
                WITH_CONSTANT_ROWS(mt, PAIR_TILE)
#undef PAIR_TILE
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
#define ROW_TILE(n) bf16_tile(w, x, I, n, sums)
            WITH_CONSTANT_ROWS(mt, ROW_TILE)
#undef ROW_TILE
            store_sums(y, y_f32, O, o, m0, mt, sums);
        }
    }
}

/* From OUTER_MIN_ROWS rows (several streams decoding at once, or a prompt) the product is bound by
 * arithmetic, not by reading W, so it takes the outer-product form: the activations are transposed
 * once, in chunks of 8 rows (up to 8 rows) or 16 (more), into xt[i][chunk] (rows past M zero),
 * and each weight is broadcast and multiplied into a chunk's sums at once (one or two 8-lane
 * vectors). Weights come in pairs: one 32-bit broadcast holds w[i] and w[i+1], and a shift or a
 * mask turns it into either as float32. A group of weight rows (4 for 16-row chunks, 8 for 8-row
 * ones: 8 accumulators either way) shares each loaded activation vector.
 * Measured on the AVX2 machine of benchmarks/README.md against the row form below (weight rows in
 * pairs, 4 activation rows at a time), weights not in cache, four XS and S shapes: 0.88-1.13x at
 * 5 rows, 0.98-1.23x at 6, 1.14-1.49x at 7, 1.3-1.46x at 8 (8-row chunks); 0.97-1.25x at 9,
 * 1.0-1.29x at 10, 1.12-1.53x at 11-12 (16-row chunks, partly padding); 1.1-1.35x at 14-16
 * (measured before the prefetch below). Up to 5 rows the row form stays: bound by reading W, it is
 * the faster up to 4 rows, and at 5 neither form won on every shape. */
#define OUTER_MIN_ROWS 6
#define CHUNK_8_MAX_ROWS 8

/* The outer form spends ~4 cycles per input on a group of weight rows, too long for the hardware
 * prefetchers to keep their streams ahead, and the near prefetch of the row form (1 KB ahead) does
 * not reach the next group's first kilobyte. So while a group is multiplied, the next group's rows
 * (the same columns, a group further on) are fetched into L2, a line per 32 weights. Measured on
 * the machine of benchmarks/README.md, 16 rows against weights not in cache: 1.23-1.38x faster on
 * XS shapes (768 inputs: short rows, the streams restart often), 1.0-1.2x on S shapes, 1.0-1.05x
 * at 128 rows; into L1 instead, or half or twice a group ahead, measured slower. */
#define PREFETCH_NEXT_GROUP(address) _mm_prefetch((const char *)(address), _MM_HINT_T1)

static inline int64_t chunk_rows(int64_t M) { return M <= CHUNK_8_MAX_ROWS ? 8 : 16; }

/* x (M, I) -> xt, chunks of `chunk` rows each transposed to [I][chunk] (rows past M zero). */
static void transpose_chunks(const uint16_t *x_bf16, const float *x_f32, float *xt, int64_t M, int64_t I,
                             int64_t chunk) {
    const int64_t n = (M + chunk - 1) / chunk * I;
#pragma omp for schedule(static)
    for (int64_t k = 0; k < n; ++k) {
        const int64_t c = k / I, i = k % I, m0 = c * chunk, rows = M - m0 < chunk ? M - m0 : chunk;
        float *d = xt + k * chunk;
        int64_t m = 0;
        if (x_bf16) for (; m < rows; ++m) d[m] = bf16_to_float(x_bf16[(m0 + m) * I + i]);
        else for (; m < rows; ++m) d[m] = x_f32[(m0 + m) * I + i];
        for (; m < chunk; ++m) d[m] = 0.f;
    }
}

/* `r_count` (a compile-time constant at each call, at most 4) weight rows against a chunk of 16
 * transposed rows: out[r * 16 + m] receives row m's product with weight row r. */
static inline __attribute__((always_inline)) void outer_tile16(const uint16_t *w, int64_t I, const float *xt,
                                                               const int r_count, float *out) {
    const __m256i high_half = _mm256_set1_epi32((int)0xffff0000u);
    const int64_t I2 = I & ~(int64_t)1;
    __m256 acc[4][2];
    for (int r = 0; r < r_count; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t i = 0; i < I2; i += 2) {
        const __m256 x00 = _mm256_load_ps(xt + i * 16), x01 = _mm256_load_ps(xt + i * 16 + 8);
        const __m256 x10 = _mm256_load_ps(xt + i * 16 + 16), x11 = _mm256_load_ps(xt + i * 16 + 24);
        for (int r = 0; r < r_count; ++r) {
            if (!(i & 31)) PREFETCH_NEXT_GROUP(w + (r + 4) * I + i);
            int32_t pair;
            memcpy(&pair, w + r * I + i, 4);
            const __m256i both = _mm256_set1_epi32(pair);
            const __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(both, 16));
            const __m256 w1 = _mm256_castsi256_ps(_mm256_and_si256(both, high_half));
            acc[r][0] = _mm256_fmadd_ps(w0, x00, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(w0, x01, acc[r][1]);
            acc[r][0] = _mm256_fmadd_ps(w1, x10, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(w1, x11, acc[r][1]);
        }
    }
    if (I & 1) {
        const __m256 x0 = _mm256_load_ps(xt + I2 * 16), x1 = _mm256_load_ps(xt + I2 * 16 + 8);
        for (int r = 0; r < r_count; ++r) {
            const __m256 w0 = _mm256_set1_ps(bf16_to_float(w[r * I + I2]));
            acc[r][0] = _mm256_fmadd_ps(w0, x0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(w0, x1, acc[r][1]);
        }
    }
    for (int r = 0; r < r_count; ++r) {
        _mm256_storeu_ps(out + r * 16, acc[r][0]);
        _mm256_storeu_ps(out + r * 16 + 8, acc[r][1]);
    }
}

/* The same against a chunk of 8 rows, `r_count` at most 8: out[r * 8 + m]. Written out apart from
 * the 16-row tile: one function for both widths made the compiler spill an accumulator in the
 * 16-row loop (0.6x). */
static inline __attribute__((always_inline)) void outer_tile8(const uint16_t *w, int64_t I, const float *xt,
                                                              const int r_count, float *out) {
    const __m256i high_half = _mm256_set1_epi32((int)0xffff0000u);
    const int64_t I2 = I & ~(int64_t)1;
    __m256 acc[8];
    for (int r = 0; r < r_count; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t i = 0; i < I2; i += 2) {
        const __m256 x0 = _mm256_load_ps(xt + i * 8), x1 = _mm256_load_ps(xt + i * 8 + 8);
        for (int r = 0; r < r_count; ++r) {
            if (!(i & 31)) PREFETCH_NEXT_GROUP(w + (r + 8) * I + i);
            int32_t pair;
            memcpy(&pair, w + r * I + i, 4);
            const __m256i both = _mm256_set1_epi32(pair);
            acc[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(both, 16)), x0, acc[r]);
            acc[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(both, high_half)), x1, acc[r]);
        }
    }
    if (I & 1)
        for (int r = 0; r < r_count; ++r)
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(bf16_to_float(w[r * I + I2])), _mm256_load_ps(xt + I2 * 8),
                                     acc[r]);
    for (int r = 0; r < r_count; ++r) _mm256_storeu_ps(out + r * 8, acc[r]);
}

/* Weight rows o_begin..o_end-1 against one chunk of CHUNK (8 or 16, a compile-time constant) rows,
 * M of them real: in groups of 64 / CHUNK weight rows (8 accumulators), the remainder one at a
 * time. Each width gets a function of its own below, so each compiles with one tile only. */
static inline __attribute__((always_inline)) void outer_rows(const uint16_t *W, const float *xt, uint16_t *y,
                                                             float *y_f32, int64_t M, int64_t O, int64_t I,
                                                             int64_t o_begin, int64_t o_end, const int CHUNK) {
    const int64_t group = 64 / CHUNK;
    float out[64];
    for (int64_t o = o_begin; o < o_end;) {
        const int64_t r_count = o_end - o >= group ? group : 1;
        if (CHUNK == 8) {
            if (r_count == 8) outer_tile8(W + o * I, I, xt, 8, out);
            else outer_tile8(W + o * I, I, xt, 1, out);
        } else {
            if (r_count == 4) outer_tile16(W + o * I, I, xt, 4, out);
            else outer_tile16(W + o * I, I, xt, 1, out);
        }
        for (int64_t r = 0; r < r_count; ++r) store_sums(y, y_f32, O, o + r, 0, M, out + r * CHUNK);
        o += r_count;
    }
}

static void outer_rows16(const uint16_t *W, const float *xt, uint16_t *y, float *y_f32, int64_t M, int64_t O,
                         int64_t I, int64_t o_begin, int64_t o_end) {
    outer_rows(W, xt, y, y_f32, M, O, I, o_begin, o_end, 16);
}

static void outer_rows8(const uint16_t *W, const float *xt, uint16_t *y, float *y_f32, int64_t M, int64_t O,
                        int64_t I, int64_t o_begin, int64_t o_end) {
    outer_rows(W, xt, y, y_f32, M, O, I, o_begin, o_end, 8);
}

/* The outer-product form over all of W; x_bf16 or x_f32 is the input, xt needs chunk_rows(M) * I
 * floats per chunk, 32-byte aligned. Each task's block of weight rows (16 rows: 64 KB at 2048
 * inputs) stays in cache while every chunk of activations passes over it, so W is read from
 * memory once however many rows come in. */
static void gemv_rows_outer(const uint16_t *W, const uint16_t *x_bf16, const float *x_f32, float *xt, uint16_t *y,
                            float *y_f32, int64_t M, int64_t O, int64_t I) {
    const int64_t block = 16, chunk = chunk_rows(M);
    const int64_t n_blocks = (O + block - 1) / block;
#pragma omp parallel
    {
        transpose_chunks(x_bf16, x_f32, xt, M, I, chunk);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < n_blocks; ++b) {
            const int64_t o_end = (b + 1) * block < O ? (b + 1) * block : O;
            for (int64_t m0 = 0; m0 < M; m0 += chunk) {
                uint16_t *yc = y ? y + m0 * O : NULL;
                float *yc_f32 = y ? NULL : y_f32 + m0 * O;
                /* (the row counts bounded by a constant: told only "at most chunk", the compiler
                 * allocated the 16-row tile's registers worse, copies in its loop, 6-10% slower) */
                if (chunk == 8)
                    outer_rows8(W, xt + m0 * I, yc, yc_f32, M - m0 < 8 ? M - m0 : 8, O, I, b * block, o_end);
                else
                    outer_rows16(W, xt + m0 * I, yc, yc_f32, M - m0 < 16 ? M - m0 : 16, O, I, b * block, o_end);
            }
        }
    }
}

static float *aligned32(float *p) { return (float *)(((uintptr_t)p + 31) & ~(uintptr_t)31); }

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

/* Float32 scratch the two entry points below need for M activation rows of I features. */
int64_t accessory_gemv_bf16_scratch_floats(int64_t M, int64_t I) {
    const int64_t chunk = chunk_rows(M);
    return M >= OUTER_MIN_ROWS ? (M + chunk - 1) / chunk * chunk * I + 8 : 2 * M * I;
}

/* y (M, O) bf16 (or y_f32 float32 when y is NULL) = x (M, I) bf16 @ W(O, I)^T. */
void accessory_gemv_bf16(const uint16_t *W, const uint16_t *x, float *scratch, uint16_t *y, float *y_f32,
                         int64_t M, int64_t O, int64_t I) {
    if (M >= OUTER_MIN_ROWS) {
        gemv_rows_outer(W, x, NULL, aligned32(scratch), y, y_f32, M, O, I);
        return;
    }
    float *x_f32 = scratch + M * I;
    for (int64_t k = 0; k < M * I; ++k) x_f32[k] = bf16_to_float(x[k]);
    reorder_activations(x_f32, scratch, M, I);
    gemv_rows(W, scratch, y, y_f32, M, O, I);
}

/* y_f32 (M, O) = x_f32 (M, I) @ W(O, I)^T, activations in float32 (the decode path's buffers). */
void accessory_gemv_bf16_f32(const uint16_t *W, const float *x_f32, float *scratch, float *y_f32,
                             int64_t M, int64_t O, int64_t I) {
    if (M >= OUTER_MIN_ROWS) {
        gemv_rows_outer(W, NULL, x_f32, aligned32(scratch), NULL, y_f32, M, O, I);
        return;
    }
    reorder_activations(x_f32, scratch, M, I);
    gemv_rows(W, scratch, NULL, y_f32, M, O, I);
}
