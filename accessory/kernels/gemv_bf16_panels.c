/* bf16 products over weights stored in 16-row panels (CPUs with AVX512-BF16); kernels/panels.py
 * holds the layout and calls these.
 *
 * Layout ("panels of 16"): W (O, I) row-major becomes ceil(O / 16) panels; panel b holds rows
 * 16b..16b+15 as I2 = ceil(I / 2) input pairs, pair p being 16 x 2 bf16 (row r's W[16b + r, 2p]
 * and W[16b + r, 2p + 1]): one 64-byte line, one VDPBF16PS operand, whose 16 float32 lanes are
 * 16 output rows. Rows past O and the input past I are zeros. A panel is one contiguous stream of
 * I2 lines, so a thread reads its share of W front to back in one sequential stream, which the
 * core's own prefetchers follow.
 *
 * y[m, o] = sum_i x[m, i] * W[o, i]: the activations are rounded to bf16 (as torch's bf16 product
 * rounds them) and laid out in groups of up to 16 rows the same way, pair p of a group of n rows
 * being n x 2 bf16; each pair of a weight panel meets each activation row's pair as a broadcast,
 * with one accumulator of 16 output lanes per activation row: no horizontal sums.
 *
 * Why: over the row-major layout (gemv_bf16_avx512.c) a tile reads four weight rows at once, four
 * streams a page apart, and at 16 activation rows the products wait on memory (S's q/k/v matrix:
 * 215-246 GFLOP/s from memory against 271-374 with the same weights in L3). Measured on the 2-core
 * Zen 4 of benchmarks/README.md (benchmarks/panels.py and harnesses like it), S's decode matrices,
 * weights not in cache, against gemv_bf16_avx512.c: 16 rows 1.24-1.46x, 2-8 rows 1.14-1.34x, one
 * row 1.03-1.09x, 32-128 rows 0.99-1.08x; XS's (768 inputs) 0.95-1.20x. Products are exact
 * in float32, sums in float32 (VDPBF16PS flushes denormal products to zero).
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "common.h"

#define PANEL 16

static inline int64_t pairs_of(int64_t I) { return (I + 1) / 2; }

/* Where input i of row r sits in a run of pairs of n rows each (a weight panel: n = 16; an
 * activation group: n = its rows). */
static inline int64_t pair_slot(int64_t i, int64_t r, int64_t n) { return ((i >> 1) * n + r) * 2 + (i & 1); }

/* bf16 elements of one panel (or of one full group of 16 activation rows): I2 lines of 16 x 2. */
static inline int64_t panel_size(int64_t I2) { return I2 * 2 * PANEL; }

void accessory_pack_bf16(const uint16_t *W, uint16_t *P, int64_t O, int64_t I) {
    const int64_t I2 = pairs_of(I), panels = (O + PANEL - 1) / PANEL;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < panels; ++b) {
        uint16_t *panel = P + b * panel_size(I2);
        for (int r = 0; r < PANEL; ++r) {
            const int64_t o = b * PANEL + r;
            for (int64_t i = 0; i < 2 * I2; ++i) panel[pair_slot(i, r, PANEL)] = o < O && i < I ? W[o * I + i] : 0;
        }
    }
}

void accessory_unpack_bf16(const uint16_t *P, uint16_t *W, int64_t O, int64_t I) {
    const int64_t I2 = pairs_of(I);
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < O; ++o) {
        const uint16_t *panel = P + (o / PANEL) * panel_size(I2);
        for (int64_t i = 0; i < I; ++i) W[o * I + i] = panel[pair_slot(i, o % PANEL, PANEL)];
    }
}

/* Float32 scratch the products need for M activation rows of I features: their bf16 groups, one
 * float per row and pair. */
int64_t accessory_packed_bf16_scratch_floats(int64_t M, int64_t I) {
    return M * pairs_of(I);
}

/* Activation rows m0..m0+rows-1 (float32 xf or bf16 xb, the other NULL) as one group: pair p =
 * rows x 2 bf16 (an odd I's last pair ends in a zero). */
static void group_rows(const float *xf, const uint16_t *xb, uint16_t *g, int64_t I, int64_t m0, int rows) {
    const int64_t I2 = pairs_of(I);
    for (int a = 0; a < rows; ++a)
        for (int64_t i = 0; i < 2 * I2; ++i) {
            const int64_t at = (m0 + a) * I + i;
            g[pair_slot(i, a, rows)] = i >= I ? 0 : (xf ? float_to_bf16(xf[at]) : xb[at]);
        }
}

/* acc += wv . (the pair at `at`, broadcast to the 16 lanes), the broadcast folded into the
 * instruction's memory operand ({1to16}): compilers emit a separate VPBROADCASTD for the intrinsic
 * form, an extra operation per VDPBF16PS that cost 5-10% (S's q/k/v at 4-512 rows, 2 threads:
 * 187 -> 200 GFLOP/s at 16 rows, 333 -> 361 at 128, 352 -> 374 at 512). */
#define DPBF16_BROADCAST(acc, wv, at) \
    __asm__("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(wv), "m"(*(const uint32_t *)(at)))

#ifndef PANEL_PREFETCH_BYTES
#define PANEL_PREFETCH_BYTES 16384
#endif

/* One weight panel against `rows` activation rows of group g (a compile-time constant at every
 * call): `rows` accumulators, times `sets` interleaved over the pairs where rows are few, so
 * consecutive VDPBF16PS never wait on each other; the 16 sums of row a go to out[a * ldo], the
 * first o_count of them. From 8 rows on, the line PANEL_PREFETCH_BYTES on in the stream is fetched
 * into L2 (never past `end`): 16 rows 1.2-1.5x faster than without (8 KB ahead 1.2x, 4 KB 1.07x);
 * one row reads faster without (the core's prefetchers follow the stream: 1.2x). */
static inline __attribute__((always_inline)) void panel_rows(const uint16_t *w, const uint16_t *g, int64_t I2,
                                                             const int rows, uintptr_t end, float *out, int64_t ldo,
                                                             int64_t o_count) {
    enum { SETS_MAX = 4 };
    const int sets = rows >= 4 ? 1 : (rows >= 2 ? 2 : 4);
    __m512 acc[SETS_MAX][PANEL];
    for (int s = 0; s < sets; ++s)
        for (int a = 0; a < rows; ++a) acc[s][a] = _mm512_setzero_ps();
    const uint32_t *gp = (const uint32_t *)g;
    const int prefetch = rows >= 8;
    int64_t p = 0;
    for (; p + sets <= I2; p += sets) {
        for (int s = 0; s < sets; ++s) {
            const uint16_t *line = w + (p + s) * 2 * PANEL;
            if (prefetch && (uintptr_t)line + PANEL_PREFETCH_BYTES + 64 <= end)
                _mm_prefetch((const char *)line + PANEL_PREFETCH_BYTES, _MM_HINT_T1);
            const __m512bh wv = (__m512bh)_mm512_loadu_si512((const void *)line);
            for (int a = 0; a < rows; ++a)
                DPBF16_BROADCAST(acc[s][a], wv, gp + (p + s) * rows + a);
        }
    }
    for (; p < I2; ++p) {
        const __m512bh wv = (__m512bh)_mm512_loadu_si512((const void *)(w + p * 2 * PANEL));
        for (int a = 0; a < rows; ++a) DPBF16_BROADCAST(acc[0][a], wv, gp + p * rows + a);
    }
    const __mmask16 keep = o_count >= PANEL ? (__mmask16)0xffff : (__mmask16)((1u << o_count) - 1);
    for (int a = 0; a < rows; ++a) {
        __m512 sum = acc[0][a];
        for (int s = 1; s < sets; ++s) sum = _mm512_add_ps(sum, acc[s][a]);
        _mm512_mask_storeu_ps(out + a * ldo, keep, sum);
    }
}

#define PANEL_CASE(n) case n: panel_rows(w, g, I2, n, end, out, O, o_count); break;

/* Groups of activation rows each weight panel meets while it is in L2 (a prompt's rows go in
 * chunks of this many groups: the chunk's activations, 128 rows, stay in L2/L3 while every panel
 * passes, and the weights are read once per chunk). */
#define GROUPS_PER_CHUNK 8

/* Rows of y_f32 (M, O) for the activation groups q0..q1-1 (laid out by group_rows) against every
 * panel, the panels shared out over the threads. */
static void chunk_product(const uint16_t *P, const uint16_t *groups, float *y, int64_t M, int64_t O, int64_t I,
                          int64_t q0, int64_t q1) {
    const int64_t I2 = pairs_of(I), panels = (O + PANEL - 1) / PANEL;
    const uintptr_t end = (uintptr_t)(P + panels * panel_size(I2));
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < panels; ++b) {
        const uint16_t *w = P + b * panel_size(I2);
        const int64_t o_count = O - b * PANEL < PANEL ? O - b * PANEL : PANEL;
        for (int64_t q = q0; q < q1; ++q) {
            const uint16_t *g = groups + q * panel_size(I2);
            float *out = y + q * PANEL * O + b * PANEL;
            const int64_t rows = M - q * PANEL < PANEL ? M - q * PANEL : PANEL;
            switch (rows) {
                PANEL_CASE(1) PANEL_CASE(2) PANEL_CASE(3) PANEL_CASE(4) PANEL_CASE(5) PANEL_CASE(6) PANEL_CASE(7)
                PANEL_CASE(8) PANEL_CASE(9) PANEL_CASE(10) PANEL_CASE(11) PANEL_CASE(12) PANEL_CASE(13)
                PANEL_CASE(14) PANEL_CASE(15) default: panel_rows(w, g, I2, 16, end, out, O, o_count); break;
            }
        }
    }
}

/* y_f32 (M, O) = x (M, I) @ W^T, W as panels (P): x float32 (xf) or bf16 (xb), the other NULL. The
 * rows are grouped (scratch), then go through chunk_product GROUPS_PER_CHUNK groups at a time. */
static void grouped_product(const uint16_t *P, const float *xf, const uint16_t *xb, float *scratch, float *y,
                            int64_t M, int64_t O, int64_t I) {
    uint16_t *groups = (uint16_t *)scratch;
    const int64_t n_groups = (M + PANEL - 1) / PANEL, group_elements = panel_size(pairs_of(I));
    for (int64_t q = 0; q < n_groups; ++q)
        group_rows(xf, xb, groups + q * group_elements, I, q * PANEL, (int)(M - q * PANEL < PANEL ? M - q * PANEL : PANEL));
    for (int64_t q0 = 0; q0 < n_groups; q0 += GROUPS_PER_CHUNK)
        chunk_product(P, groups, y, M, O, I, q0, q0 + GROUPS_PER_CHUNK < n_groups ? q0 + GROUPS_PER_CHUNK : n_groups);
}
/* y_f32 (M, O) = x_f32 (M, I) @ W^T, W as panels (P), the activations rounded to bf16 first. */
void accessory_packed_bf16_f32(const uint16_t *P, const float *x, float *scratch, float *y, int64_t M, int64_t O,
                               int64_t I) {
    grouped_product(P, x, NULL, scratch, y, M, O, I);
}

/* y_f32 (M, O) = x (M, I) bf16 @ W^T, W as panels (P). */
void accessory_packed_bf16(const uint16_t *P, const uint16_t *x, float *scratch, float *y, int64_t M, int64_t O,
                           int64_t I) {
    grouped_product(P, NULL, x, scratch, y, M, O, I);
}
