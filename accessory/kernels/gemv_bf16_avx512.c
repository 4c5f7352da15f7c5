/* Products with bf16 weights on CPUs with AVX512-BF16 (Zen 4 and later, Cooper Lake, Sapphire
 * Rapids and later): the same entry points as gemv_bf16.c, which kernels/linear.py and the native
 * decode step load in its place on such CPUs.
 *
 * y[m, o] = sum_i x[m, i] * W[o, i] for m < M, W row-major (O, I) in bfloat16. VDPBF16PS multiplies
 * 16 pairs of bf16 numbers and adds each pair's two products to a float32 lane: 32 multiply-adds an
 * instruction, with no widening of the weights (gemv_bf16.c spends an integer operation on that for
 * every two FMAs). The lanes run along the inputs: a tile of R weight rows x A activation rows keeps
 * R x A accumulators of 16 lanes each, loads R + A vectors of 32 inputs each step, and sums each
 * accumulator's lanes at the end (sixteen accumulators at once, in one tree of shuffles).
 *
 * The activations are multiplied as bf16: bf16 inputs as they come, float32 inputs (the native
 * decode step's buffers) rounded to nearest even first, as torch's bf16 products round them (one
 * row too: gemv_bf16.c keeps it in float32, but its row form reads this CPU's memory slower). Each
 * product is exact in float32; the sums are float32 (denormal products count as zero: VDPBF16PS
 * flushes them).
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "common.h"

/* Weight rows per tile (R) and activation rows per tile (A): 16 accumulators, 4 + 1 vectors in
 * flight, 21 of the 32 vector registers. */
#define TILE_W 4
#define TILE_X 4
/* Rows of W per OpenMP task: each task's groups of TILE_W rows meet every activation row while
 * they are in L1 (4 rows of up to 4096 inputs) or L2. */
#define BLOCK_ROWS 16

/* From three rows, each group of TILE_W weight rows prefetches the rows of the group this many
 * groups on into L2 while it is multiplied. Measured on the 2-core Zen 4 machine of
 * benchmarks/README.md, XS and S shapes at 16 rows, weights not in cache: 1.6-2.2x faster than
 * without (the first tile of each group waited on memory), one, two and four groups ahead alike
 * within the noise. */
#ifndef PREFETCH_GROUPS
#define PREFETCH_GROUPS 2
#endif
/* Rows of more than CHUNKED_FROM inputs go in chunks of about K_CHUNK (see rows_block), for up to
 * MAX_PARTIAL_TILES activation tiles (64 rows). A group of 4 such rows (45 KB at 5632 inputs, S's
 * w2) and a tile of activations no longer both fit in L1, so every tile read both from L2.
 * Measured on the 2-core Zen 4 of benchmarks/README.md, 16 rows, 2048 x 5632 weights not in
 * cache: one thread 155 against 127 GFLOP/s, two 253 against 221 (chunks of 2048: 144 / 254; of
 * 768: 151); 8 rows 1.09x, 4 rows 1.05x, 64 rows 0.97x (noise); rows of 2048 inputs in chunks of
 * 1024 0.98x, hence unchunked. Whole S decode, 16 streams: 123.9 against 119.0 tok/s. */
#ifndef K_CHUNK
#define K_CHUNK 1024
#endif
#ifndef CHUNKED_FROM
#define CHUNKED_FROM 2048
#endif
#define MAX_PARTIAL_TILES 16

static inline __m512bh load_bh(const uint16_t *p) { return (__m512bh)_mm512_loadu_si512((const void *)p); }

static inline __m512bh load_bh_tail(const uint16_t *p, __mmask32 mask) {
    return (__m512bh)_mm512_maskz_loadu_epi16(mask, (const void *)p);
}

/* `r_count` weight rows (w, stride I) against `a_count` activation rows (x, stride I), both
 * compile-time constants at every call, over the inputs k0..k1-1. The accumulators start from
 * `partial` when `resume` (else from zero) and go back there unless `finish`, which sums their
 * lanes into out[r * TILE_X + a] instead. While it runs, `next_rows` rows at `next` (stride I)
 * are fetched into L2 over the same inputs. */
static inline __attribute__((always_inline)) void tile(const uint16_t *w, const uint16_t *x, int64_t I, int64_t k0,
                                                       int64_t k1, const int r_count, const int a_count,
                                                       const uint16_t *next, int next_rows, __m512 *partial,
                                                       int resume, int finish, float *out) {
    __m512 acc[TILE_W][TILE_X];
    for (int r = 0; r < r_count; ++r)
        for (int a = 0; a < a_count; ++a)
            acc[r][a] = resume ? _mm512_load_ps((const float *)(partial + r * TILE_X + a)) : _mm512_setzero_ps();
    const int64_t k32 = k0 + ((k1 - k0) & ~(int64_t)31);
    for (int64_t i = k0; i < k32; i += 32) {
        __m512bh wv[TILE_W];
        for (int k = 0; k < next_rows; ++k) _mm_prefetch((const char *)(next + k * I + i), _MM_HINT_T1);
        for (int r = 0; r < r_count; ++r) wv[r] = load_bh(w + r * I + i);
        for (int a = 0; a < a_count; ++a) {
            const __m512bh xv = load_bh(x + a * I + i);
            for (int r = 0; r < r_count; ++r) acc[r][a] = _mm512_dpbf16_ps(acc[r][a], wv[r], xv);
        }
    }
    if (k32 < k1) {
        const __mmask32 mask = (__mmask32)((1ull << (k1 - k32)) - 1);
        __m512bh wv[TILE_W];
        for (int r = 0; r < r_count; ++r) wv[r] = load_bh_tail(w + r * I + k32, mask);
        for (int a = 0; a < a_count; ++a) {
            const __m512bh xv = load_bh_tail(x + a * I + k32, mask);
            for (int r = 0; r < r_count; ++r) acc[r][a] = _mm512_dpbf16_ps(acc[r][a], wv[r], xv);
        }
    }
    if (!finish) {
        for (int r = 0; r < r_count; ++r)
            for (int a = 0; a < a_count; ++a) _mm512_store_ps((float *)(partial + r * TILE_X + a), acc[r][a]);
        return;
    }
    __m512 v[16];
    for (int k = 0; k < 16; ++k) v[k] = _mm512_setzero_ps();
    for (int r = 0; r < r_count; ++r)
        for (int a = 0; a < a_count; ++a) v[r * TILE_X + a] = acc[r][a];
    _mm512_storeu_ps(out, sum_lanes16(v));
}

/* One or two activation rows (a decode step of one or two streams, bound by reading W): one
 * weight row at a time, four accumulators per activation row across the inputs, so each thread
 * reads one sequential stream, with the line ROW_PREFETCH_BYTES further on in that stream fetched
 * into L2 (not L1) four lines an iteration. Measured on the 2-core Zen 4 machine of
 * benchmarks/README.md, one row over S's decode matrices, weights not in cache, medians of 25
 * interleaved rounds: 1.10-1.25x gemv_bf16.c's row form (float32 activations, which reads this
 * CPU's memory at 0.75-0.9x a plain read) and level with a plain read; into L1 instead, or 0.5-1 KB
 * ahead, 0.8-0.95x; the same form without the prefetch 0.9-1.0x. Whole decode runs in one process,
 * the step's product swapped: S 16.7 against 12.3 tok/s, XS 118.3 against 115.1. Two rows (no
 * prefetch: 0.9x with it on XS): 1.1-1.5x gemv_bf16.c and four weight rows at a time. `end` is one
 * past W's last byte: nothing past it is named. */
#define ROW_PREFETCH_BYTES 2048

static inline __attribute__((always_inline)) void row_tile(const uint16_t *w, const uint16_t *x, int64_t I,
                                                           const int a_count, uintptr_t end, float *out) {
    __m512 acc[2][4];
    for (int a = 0; a < a_count; ++a)
        for (int k = 0; k < 4; ++k) acc[a][k] = _mm512_setzero_ps();
    const int64_t I128 = I & ~(int64_t)127;
    int64_t i = 0;
    for (; i < I128; i += 128) {
        const uintptr_t ahead = (uintptr_t)(w + i) + ROW_PREFETCH_BYTES;
        if (a_count == 1 && ahead + 256 <= end)
            for (int k = 0; k < 4; ++k) _mm_prefetch((const char *)(ahead + 64 * k), _MM_HINT_T1);
        __m512bh wv[4];
        for (int k = 0; k < 4; ++k) wv[k] = load_bh(w + i + 32 * k);
        for (int a = 0; a < a_count; ++a)
            for (int k = 0; k < 4; ++k) acc[a][k] = _mm512_dpbf16_ps(acc[a][k], wv[k], load_bh(x + a * I + i + 32 * k));
    }
    for (; i < I; i += 32) {
        const __mmask32 mask = I - i >= 32 ? (__mmask32)~0u : (__mmask32)((1ull << (I - i)) - 1);
        const __m512bh wv = load_bh_tail(w + i, mask);
        for (int a = 0; a < a_count; ++a)
            acc[a][0] = _mm512_dpbf16_ps(acc[a][0], wv, load_bh_tail(x + a * I + i, mask));
    }
    for (int a = 0; a < a_count; ++a)
        out[a] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[a][0], acc[a][1]),
                                                    _mm512_add_ps(acc[a][2], acc[a][3])));
}

#define TILE_ARGS next, next_rows, partial + t * TILE_W * TILE_X, c > 0, c == chunks - 1, out
#define TILE_ROWS_X(r, n) \
    switch (n) { case 1: tile(w, x, I, k0, k1, r, 1, TILE_ARGS); break; case 2: tile(w, x, I, k0, k1, r, 2, TILE_ARGS); break; \
                 case 3: tile(w, x, I, k0, k1, r, 3, TILE_ARGS); break; default: tile(w, x, I, k0, k1, r, 4, TILE_ARGS); break; }

/* Weight rows o_begin..o_end-1 against all M activation rows (bf16, stride I). */
static void rows_block(const uint16_t *W, const uint16_t *xb, uint16_t *y, float *y_f32, int64_t M, int64_t O,
                       int64_t I, int64_t o_begin, int64_t o_end) {
    float out[16];
    if (M <= 2) {
        const uintptr_t end = (uintptr_t)(W + O * I);
        for (int64_t o = o_begin; o < o_end; ++o) {
            if (M == 1) row_tile(W + o * I, xb, I, 1, end, out);
            else row_tile(W + o * I, xb, I, 2, end, out);
            store_sums(y, y_f32, O, o, 0, M, out);
        }
        return;
    }
    const int64_t tiles = (M + TILE_X - 1) / TILE_X;
    /* Rows longer than K_CHUNK inputs go in chunks, each group of weight rows meeting every
     * activation tile over one chunk before the next (the tiles' accumulators kept in `partial`
     * between chunks), so the group's chunk is read from L1 by every tile after the first. */
    const int64_t chunks = tiles <= MAX_PARTIAL_TILES && I > CHUNKED_FROM ? (I + K_CHUNK - 1) / K_CHUNK : 1;
    const int64_t chunk = ((I + chunks - 1) / chunks + 31) & ~(int64_t)31;
    __m512 partial[MAX_PARTIAL_TILES * TILE_W * TILE_X] __attribute__((aligned(64)));
    for (int64_t o = o_begin; o < o_end;) {
        const int r_count = o_end - o >= TILE_W ? TILE_W : 1;
        const uint16_t *w = W + o * I;
        for (int64_t c = 0; c < chunks; ++c) {
            const int64_t k0 = c * chunk, k1 = c == chunks - 1 ? I : k0 + chunk;
            for (int64_t m0 = 0, t = 0; m0 < M; m0 += TILE_X, ++t) {
                const int64_t a_count = M - m0 < TILE_X ? M - m0 : TILE_X;
                const uint16_t *x = xb + m0 * I;
                /* While this group meets the activations, the group PREFETCH_GROUPS further on
                 * comes into L2, its rows shared out over the tiles: the first tile alone would
                 * leave the next group's start waiting on memory. */
                const int64_t first = t * TILE_W / tiles, last = (t + 1) * TILE_W / tiles;
                const int64_t ahead = o + PREFETCH_GROUPS * TILE_W + first;
                const uint16_t *next = ahead < O ? W + ahead * I : NULL;
                const int next_rows = (int)((O - ahead < last - first ? O - ahead : last - first));
                if (r_count == TILE_W) { TILE_ROWS_X(TILE_W, a_count) } else { TILE_ROWS_X(1, a_count) }
                if (c == chunks - 1)
                    for (int r = 0; r < r_count; ++r) store_sums(y, y_f32, O, o + r, m0, a_count, out + r * TILE_X);
            }
        }
        o += r_count;
    }
}

static void gemv(const uint16_t *W, const uint16_t *xb, uint16_t *y, float *y_f32, int64_t M, int64_t O, int64_t I) {
    const int64_t n_blocks = (O + BLOCK_ROWS - 1) / BLOCK_ROWS;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < n_blocks; ++b) {
        const int64_t o_end = (b + 1) * BLOCK_ROWS < O ? (b + 1) * BLOCK_ROWS : O;
        rows_block(W, xb, y, y_f32, M, O, I, b * BLOCK_ROWS, o_end);
    }
}

/* Float32 scratch the entry points need for M activation rows of I features (the float32 inputs
 * rounded to bf16 live there: M * I halves, in floats). */
int64_t accessory_gemv_bf16_scratch_floats(int64_t M, int64_t I) {
    return (M * I + 1) / 2 + 16;
}

/* y (M, O) bf16 (or y_f32 float32 when y is NULL) = x (M, I) bf16 @ W(O, I)^T. */
void accessory_gemv_bf16(const uint16_t *W, const uint16_t *x, float *scratch, uint16_t *y, float *y_f32,
                         int64_t M, int64_t O, int64_t I) {
    (void)scratch;
    gemv(W, x, y, y_f32, M, O, I);
}

/* y_f32 (M, O) = x_f32 (M, I) @ W(O, I)^T, the activations rounded to bf16 first. */
void accessory_gemv_bf16_f32(const uint16_t *W, const float *x_f32, float *scratch, float *y_f32,
                             int64_t M, int64_t O, int64_t I) {
    uint16_t *xb = (uint16_t *)scratch;
    const int64_t n = M * I, n32 = n & ~(int64_t)31;
    for (int64_t k = 0; k < n32; k += 32) {
        const __m512bh pair = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x_f32 + k + 16), _mm512_loadu_ps(x_f32 + k));
        _mm512_storeu_si512((void *)(xb + k), (__m512i)pair);
    }
    for (int64_t k = n32; k < n; ++k) xb[k] = float_to_bf16(x_f32[k]);
    gemv(W, xb, NULL, y_f32, M, O, I);
}
