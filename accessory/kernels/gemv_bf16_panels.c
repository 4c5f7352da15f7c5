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

/* v[k] (16 lanes of 32 bits) becomes lane k of every vector: a 16 x 16 transpose of 32-bit
 * elements in four rounds of in-lane unpacks and 128-bit shuffles (64 shuffles). It is its own
 * inverse: pack, unpack and group_block all use it (a 32-bit element is one row's pair). */
static inline void transpose16x16_epi32(__m512i v[16]) {
    __m512i t[16];
    for (int k = 0; k < 8; ++k) { /* per 128-bit lane: [a0 b0 a1 b1], [a2 b2 a3 b3] */
        t[2 * k] = _mm512_unpacklo_epi32(v[2 * k], v[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_epi32(v[2 * k], v[2 * k + 1]);
    }
    for (int k = 0; k < 4; ++k) { /* v[4k + m], lane L: rows 4k..4k+3 of column 4L + m */
        v[4 * k] = _mm512_unpacklo_epi64(t[4 * k], t[4 * k + 2]);
        v[4 * k + 1] = _mm512_unpackhi_epi64(t[4 * k], t[4 * k + 2]);
        v[4 * k + 2] = _mm512_unpacklo_epi64(t[4 * k + 1], t[4 * k + 3]);
        v[4 * k + 3] = _mm512_unpackhi_epi64(t[4 * k + 1], t[4 * k + 3]);
    }
    for (int m = 0; m < 4; ++m) { /* t[m]: lanes 0, 2 of rows 0-3, 4-7; t[4 + m]: lanes 1, 3; 8-15 likewise */
        t[m] = _mm512_shuffle_i32x4(v[m], v[4 + m], _MM_SHUFFLE(2, 0, 2, 0));
        t[4 + m] = _mm512_shuffle_i32x4(v[m], v[4 + m], _MM_SHUFFLE(3, 1, 3, 1));
        t[8 + m] = _mm512_shuffle_i32x4(v[8 + m], v[12 + m], _MM_SHUFFLE(2, 0, 2, 0));
        t[12 + m] = _mm512_shuffle_i32x4(v[8 + m], v[12 + m], _MM_SHUFFLE(3, 1, 3, 1));
    }
    for (int m = 0; m < 4; ++m) { /* column c = 4L + m gathers lane L of rows 0-3, 4-7, 8-11, 12-15 */
        v[m] = _mm512_shuffle_i32x4(t[m], t[8 + m], _MM_SHUFFLE(2, 0, 2, 0));
        v[8 + m] = _mm512_shuffle_i32x4(t[m], t[8 + m], _MM_SHUFFLE(3, 1, 3, 1));
        v[4 + m] = _mm512_shuffle_i32x4(t[4 + m], t[12 + m], _MM_SHUFFLE(2, 0, 2, 0));
        v[12 + m] = _mm512_shuffle_i32x4(t[4 + m], t[12 + m], _MM_SHUFFLE(3, 1, 3, 1));
    }
}

/* Whether pack / unpack write their output (`bytes`, from `to`) with streaming stores, past the
 * caches: outputs of 8 MiB and more, 64-byte aligned. Without, each line written is read first:
 * S's four matrices, 2 threads, pack 10.3-12.1 -> 19.1-23.6 GB/s, unpack 10.8-13.4 -> 23.4-23.9;
 * at 1-5 MiB (2 MB L2s, 32 MB L3) plain stores are faster (28-32 against 22-24 GB/s). */
static inline int streamed(int64_t bytes, const void *to) { return bytes >= (8 << 20) && !((uintptr_t)to & 63); }

/* The mask of the first n (0..32) 16-bit elements, or 32-bit ones (n 0..16). */
static inline __mmask32 first_words(int64_t n) { return n >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << n) - 1); }
static inline __mmask16 first_dwords(int64_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }

/* The panels of W: per panel, blocks of 16 pairs (32 inputs): the 16 rows' 64 bytes (rows past O
 * zeros, a short last block loaded under a mask, so inputs past I are zeros) transposed into the
 * block's 16 lines (streamed() decides the stores). Panels shared out over the threads.
 * Bit-identical to the scalar loop it replaced (W[o, i] to pair_slot(i, o % 16, 16)). Weight bytes
 * per second, 2 threads, the output already allocated (medians of 9-11 interleaved rounds, two
 * runs): S's qkv 2.7-2.9 -> 23.6 GB/s, w13 3.0-4.2 -> 19.1-19.8, w2 3.1-3.3 -> 22.3-28.8, head
 * 3.0-4.3 -> 16.4-20.2. Into a fresh torch.empty of more than 32 MiB (w13, head: glibc maps new
 * pages) the first touch of each page costs more than the rest: 1.3-1.5 -> 1.8-2.1 GB/s. */
void accessory_pack_bf16(const uint16_t *W, uint16_t *P, int64_t O, int64_t I) {
    const int64_t I2 = pairs_of(I), panels = (O + PANEL - 1) / PANEL;
    const int stream = streamed(panels * panel_size(I2) * 2, P);
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < panels; ++b) {
        uint16_t *panel = P + b * panel_size(I2);
        const int64_t o0 = b * PANEL, rows = O - o0 < PANEL ? O - o0 : PANEL;
        for (int64_t p0 = 0; p0 < I2; p0 += PANEL) {
            const int64_t n = I - 2 * p0, lines = I2 - p0 < PANEL ? I2 - p0 : PANEL;
            const uint16_t *src = W + o0 * I + 2 * p0;
            __m512i v[PANEL];
            if (n >= 2 * PANEL && rows == PANEL) {
                for (int r = 0; r < PANEL; ++r) v[r] = _mm512_loadu_si512((const void *)(src + r * I));
            } else {
                const __mmask32 keep = first_words(n);
                for (int r = 0; r < PANEL; ++r)
                    v[r] = r < rows ? _mm512_maskz_loadu_epi16(keep, src + r * I) : _mm512_setzero_si512();
            }
            transpose16x16_epi32(v);
            if (stream && lines == PANEL)
                for (int j = 0; j < PANEL; ++j) _mm512_stream_si512((void *)(panel + (p0 + j) * 2 * PANEL), v[j]);
            else
                for (int j = 0; j < lines; ++j) _mm512_storeu_si512((void *)(panel + (p0 + j) * 2 * PANEL), v[j]);
        }
        if (stream) _mm_sfence();
    }
}

/* W back from its panels: per panel, blocks of 16 lines transposed into the 16 rows' 32 inputs,
 * stored under a mask where the block ends past I or the rows past O (only W's O x I elements are
 * written; streamed() where I is a multiple of 32). The rows shared out over the threads 16 at a
 * time (a panel each). Bit-identical to the scalar loop it replaced. Measured as pack: S's qkv
 * 3.4-3.7 -> 23.9-24.5 GB/s, w13 3.3-4.6 -> 23.8-24.0, w2 3.7-4.0 -> 23.8-33.4, head 3.7-5.2 ->
 * 18.6-23.4; into a fresh torch.empty of more than 32 MiB 1.3-1.5 -> 1.7-2.0. */
void accessory_unpack_bf16(const uint16_t *P, uint16_t *W, int64_t O, int64_t I) {
    const int64_t I2 = pairs_of(I), panels = (O + PANEL - 1) / PANEL;
    const int stream = I % (2 * PANEL) == 0 && streamed(O * I * 2, W); /* then every row's blocks are aligned */
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < panels; ++b) {
        const uint16_t *panel = P + b * panel_size(I2);
        const int64_t o0 = b * PANEL, rows = O - o0 < PANEL ? O - o0 : PANEL;
        for (int64_t p0 = 0; p0 < I2; p0 += PANEL) {
            const int64_t n = I - 2 * p0, lines = I2 - p0 < PANEL ? I2 - p0 : PANEL;
            uint16_t *dst = W + o0 * I + 2 * p0;
            __m512i v[PANEL];
            for (int j = 0; j < PANEL; ++j) /* lines past I2: zeros, never stored */
                v[j] = j < lines ? _mm512_loadu_si512((const void *)(panel + (p0 + j) * 2 * PANEL))
                                 : _mm512_setzero_si512();
            transpose16x16_epi32(v);
            if (stream) {
                for (int r = 0; r < rows; ++r) _mm512_stream_si512((void *)(dst + r * I), v[r]);
            } else if (n >= 2 * PANEL) {
                for (int r = 0; r < rows; ++r) _mm512_storeu_si512((void *)(dst + r * I), v[r]);
            } else {
                const __mmask32 keep = first_words(n);
                for (int r = 0; r < rows; ++r) _mm512_mask_storeu_epi16(dst + r * I, keep, v[r]);
            }
        }
        if (stream) _mm_sfence();
    }
}

/* Float32 scratch the products need for M activation rows of I features: their bf16 groups, one
 * float per row and pair. */
int64_t accessory_packed_bf16_scratch_floats(int64_t M, int64_t I) {
    return M * pairs_of(I);
}

/* float_to_bf16 (common.h) on 32 floats, n (0..32) of them read from x and zeros after: word k of
 * the result is bf16(x[k]), so 32-bit lane p is the pair x[2p], x[2p + 1]. The same integer
 * arithmetic as float_to_bf16, bit for bit (VCVTNE2PS2BF16 would flush denormals to zero). */
static inline __m512i bf16_pairs(const float *x, int64_t n) {
    const __m512i idx = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33,
                                         31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    __m512i u[2];
    if (n >= 32) {
        u[0] = _mm512_loadu_si512((const void *)x);
        u[1] = _mm512_loadu_si512((const void *)(x + 16));
    } else {
        u[0] = _mm512_maskz_loadu_epi32(first_dwords(n), x);
        u[1] = n > 16 ? _mm512_maskz_loadu_epi32(first_dwords(n - 16), x + 16) : _mm512_setzero_si512();
    }
    for (int h = 0; h < 2; ++h) { /* the bf16 in the upper 16 bits */
        const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u[h], _mm512_set1_epi32(0x7fffffff)),
                                                      _mm512_set1_epi32(0x7f800000));
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u[h], 16), _mm512_set1_epi32(1));
        const __m512i rounded = _mm512_add_epi32(u[h], _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
        u[h] = _mm512_mask_or_epi32(rounded, nan, u[h], _mm512_set1_epi32(0x00400000));
    }
    return _mm512_permutex2var_epi16(u[0], idx, u[1]); /* the upper halves, in order */
}

/* Block p0..p0+15 of the pairs of activation rows m0..m0+rows-1 (float32 xf or bf16 xb, the other
 * NULL) as one group g: pair p = rows x 2 bf16 (an odd I's last pair ends in a zero); the blocks
 * of all groups make the whole grouping, shared out over the threads. Each row's 32 inputs
 * (rounded as float_to_bf16 does, or copied; zeros past I) as 16 pairs, the rows (zeros past
 * `rows`) transposed into the block's 16 pairs of the group, stored under a mask of `rows` lanes
 * (one row: no transpose). Bit-identical to the scalar loop it replaced. 1024 rows of 2048 inputs
 * against 16 outputs (nearly all grouping): float32 3.6 -> 0.87 ms, bf16 2.5 -> 0.70 ms; S's qkv
 * (2 threads, medians of 11): 1024 rows 31.4 -> 28.4 ms float32, 27.5 -> 26.1 ms bf16; 512 rows
 * best 14.2 -> 13.2 ms float32, median 14.8 -> 14.1 ms bf16. */
static void group_block(const float *xf, const uint16_t *xb, uint16_t *g, int64_t I, int64_t m0, int rows,
                        int64_t p0) {
    const int64_t I2 = pairs_of(I), n = I - 2 * p0, lines = I2 - p0 < PANEL ? I2 - p0 : PANEL;
    uint32_t *g32 = (uint32_t *)g;
    __m512i v[PANEL];
    for (int a = 0; a < PANEL; ++a) {
        const int64_t at = (m0 + a) * I + 2 * p0;
        if (a >= rows) v[a] = _mm512_setzero_si512();
        else if (xf) v[a] = bf16_pairs(xf + at, n);
        else v[a] = n >= 2 * PANEL ? _mm512_loadu_si512((const void *)(xb + at))
                                   : _mm512_maskz_loadu_epi16(first_words(n), xb + at);
    }
    if (rows == 1) {
        _mm512_mask_storeu_epi32(g32 + p0, first_dwords(lines), v[0]);
        return;
    }
    transpose16x16_epi32(v);
    for (int j = 0; j < lines; ++j) {
        if (rows == PANEL) _mm512_storeu_si512((void *)(g32 + (p0 + j) * PANEL), v[j]);
        else _mm512_mask_storeu_epi32(g32 + (p0 + j) * rows, first_dwords(rows), v[j]);
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

/* Rows of y_f32 (M, O) for the activation groups q0..q1-1 (laid out by group_block) against every
 * panel, the panels shared out over the threads of the enclosing parallel region. */
static void chunk_product(const uint16_t *P, const uint16_t *groups, float *y, int64_t M, int64_t O, int64_t I,
                          int64_t q0, int64_t q1) {
    const int64_t I2 = pairs_of(I), panels = (O + PANEL - 1) / PANEL;
    const uintptr_t end = (uintptr_t)(P + panels * panel_size(I2));
#pragma omp for schedule(static)
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
 * rows are grouped (scratch), then go through chunk_product GROUPS_PER_CHUNK groups at a time, all
 * in one parallel region: the threads share the grouping's blocks too. Grouped by one thread
 * before the region, a 16-stream XS step spent ~6% of its time there and waiting on it (perf). */
static void grouped_product(const uint16_t *P, const float *xf, const uint16_t *xb, float *scratch, float *y,
                            int64_t M, int64_t O, int64_t I) {
    uint16_t *groups = (uint16_t *)scratch;
    const int64_t n_groups = (M + PANEL - 1) / PANEL, group_elements = panel_size(pairs_of(I));
    const int64_t blocks = (pairs_of(I) + PANEL - 1) / PANEL;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n_groups * blocks; ++t) {
            const int64_t q = t / blocks;
            group_block(xf, xb, groups + q * group_elements, I, q * PANEL,
                        (int)(M - q * PANEL < PANEL ? M - q * PANEL : PANEL), (t % blocks) * PANEL);
        }  /* (each omp for ends in a barrier: every group is whole before a panel meets it) */
        for (int64_t q0 = 0; q0 < n_groups; q0 += GROUPS_PER_CHUNK)
            chunk_product(P, groups, y, M, O, I, q0, q0 + GROUPS_PER_CHUNK < n_groups ? q0 + GROUPS_PER_CHUNK : n_groups);
    }
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

/* ---------------------------------------------------------------- packed int8 / int4 / nf4 weights
 *
 * Products of many activation rows (a prompt's tokens, a large batch) with weights stored packed
 * as quant/formats.py lays them out (int8: codes (O, I) and one float32 scale per row; int4: two
 * codes a byte per block of 32 inputs, fp16 scale and offset per group of G; nf4: the same codes,
 * fp16 absmax scale per group). Each thread expands 16 weight rows at a time to bf16, row-major,
 * into a buffer of its own, which stays in L1/L2 while every activation group (grouped as for the
 * panel products: 16 rows' pairs a 64-byte line) meets it: the activation line is the vector and
 * each weight row's pair a broadcast (VDPBF16PS's memory operand), 16 accumulators of 16 activation
 * rows each, one per weight row, transposed once at the end. So the expansion (~7 operations per
 * 32 inputs of a row) is shared by all the rows, where gemv_quant_avx512.c's integer products pay
 * their per-block scaling for each row. (Expanding into the panel layout instead, weights the
 * vector, cost a 16 x 16 transpose per 16 lines: 1.06-1.30x slower at 32 and 64 rows.) The values
 * are quant/formats.py's dequantize, rounded to bf16 as torch's bf16 product of the expanded matrix
 * rounds them (int4: q * scale + offset, a multiply then an add in float32; nf4: level * scale);
 * int8 codes are exact in bf16 and their row scale multiplies the float32 sums instead. */

#include <pthread.h>
#include <stdlib.h>

enum { QUANT_INT8 = 0, QUANT_INT4 = 1, QUANT_NF4 = 2 };

static const float NF4_TABLE[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f};

/* Each thread's expansion buffer, grown as needed and freed when the thread ends. */
static pthread_key_t buffer_key;
static pthread_once_t buffer_key_once = PTHREAD_ONCE_INIT;
typedef struct { uint16_t *data; int64_t capacity; } expansion_buffer;

static void free_expansion_buffer(void *p) {
    expansion_buffer *b = (expansion_buffer *)p;
    free(b->data);
    free(b);
}

static void make_buffer_key(void) { pthread_key_create(&buffer_key, free_expansion_buffer); }

/* This thread's buffer of at least `elements` bf16 (64-byte aligned), or NULL without memory. */
static uint16_t *thread_buffer(int64_t elements) {
    pthread_once(&buffer_key_once, make_buffer_key);
    expansion_buffer *b = (expansion_buffer *)pthread_getspecific(buffer_key);
    if (b == NULL) {
        b = (expansion_buffer *)calloc(1, sizeof(expansion_buffer));
        if (b == NULL || pthread_setspecific(buffer_key, b) != 0) {
            free(b);
            return NULL;
        }
    }
    if (b->capacity < elements) {
        const size_t bytes = ((size_t)elements * 2 + 63) & ~(size_t)63;
        uint16_t *data = (uint16_t *)aligned_alloc(64, bytes);
        if (data == NULL) return NULL;
        free(b->data);
        b->data = data;
        b->capacity = elements;
    }
    return b->data;
}

/* 32 floats (lo: inputs 0-15, hi: 16-31) as 32 bf16, 32-bit lane p the pair 2p, 2p + 1. */
static inline __m512i bf16_of(__m512 lo, __m512 hi) { return (__m512i)_mm512_cvtne2ps_pbh(hi, lo); }

/* Inputs i0 .. i0 + 31 of weight row o expanded to bf16 (zeros past I); 4-bit: its group's fp16
 * scale and offset at *s16, *z16 (I a multiple of G, G of 32: whole blocks of 16 bytes). */
static inline __attribute__((always_inline)) __m512i expand_block(const int kind, const void *W, const uint16_t *s16,
                                                                   const uint16_t *z16, int64_t o, int64_t I,
                                                                   int64_t i0, __m512 levels) {
    if (kind == QUANT_INT8) {
        const int8_t *q = (const int8_t *)W + o * I + i0;
        const int64_t n = I - i0;
        const __m256i b = n >= 32 ? _mm256_loadu_si256((const __m256i *)q)
                                  : _mm256_maskz_loadu_epi8((__mmask32)((1u << n) - 1), q);
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
        return bf16_of(lo, hi);
    }
    /* 4-bit: the group's 16 values as bf16 (a table), then each code looks its value up */
    const uint8_t *packed = (const uint8_t *)W + o * (I / 2) + i0 / 2;
    const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)packed));
    const __m512i codes = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(bytes, _mm256_set1_epi16(15))),
                                             _mm256_srli_epi16(bytes, 4), 1); /* word k: input k's code */
    const __m512 s = _mm512_set1_ps(_cvtsh_ss(*s16));
    const __m512 values = kind == QUANT_INT4 ? _mm512_add_ps(_mm512_mul_ps(levels, s), _mm512_set1_ps(_cvtsh_ss(*z16)))
                                             : _mm512_mul_ps(levels, s);
    const __m512i table = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(values));
    return _mm512_permutexvar_epi16(codes, table);
}

/* Rows 16b .. 16b + 15 of the packed matrix expanded to bf16 into `buf`, row r at buf + r * stride
 * (stride: I rounded up to 32, and a cache line more, see accessory_quant_panels), for a
 * compile-time `kind`; rows past O zeros. */
static inline __attribute__((always_inline)) void expand_rows_of(const int kind, const void *W, const void *scales,
                                                                  const void *offsets, uint16_t *buf, int64_t stride,
                                                                  int64_t b, int64_t O, int64_t I, int64_t G) {
    const int64_t o0 = b * PANEL, rows = O - o0 < PANEL ? O - o0 : PANEL;
    const int64_t n_groups = kind == QUANT_INT8 ? 1 : I / G, span = kind == QUANT_INT8 ? I : G;
    /* the codes' values before their scale: nf4's levels, int4's 0..15 */
    const __m512 levels = kind == QUANT_NF4 ? _mm512_loadu_ps(NF4_TABLE)
                                            : _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t o = o0 + r;
        uint16_t *dst = buf + r * stride;
        for (int64_t g = 0; g < n_groups; ++g) {
            const int64_t at = o * n_groups + g; /* (4-bit: the group's scale and offset) */
            const uint16_t *s16 = kind == QUANT_INT8 ? NULL : (const uint16_t *)scales + at;
            const uint16_t *z16 = kind == QUANT_INT4 ? (const uint16_t *)offsets + at : NULL;
            for (int64_t i0 = g * span; i0 < (g + 1) * span; i0 += 32)
                _mm512_store_si512((void *)(dst + i0), expand_block(kind, W, s16, z16, o, I, i0, levels));
        }
    }
    for (int64_t r = rows; r < PANEL; ++r) memset(buf + r * stride, 0, (size_t)stride * sizeof(uint16_t));
}

static void expand_rows(int kind, const void *W, const void *scales, const void *offsets, uint16_t *buf,
                        int64_t stride, int64_t b, int64_t O, int64_t I, int64_t G) {
    switch (kind) {
    case QUANT_INT8: expand_rows_of(QUANT_INT8, W, scales, offsets, buf, stride, b, O, I, G); break;
    case QUANT_INT4: expand_rows_of(QUANT_INT4, W, scales, offsets, buf, stride, b, O, I, G); break;
    default: expand_rows_of(QUANT_NF4, W, scales, offsets, buf, stride, b, O, I, G); break;
    }
}

/* The 16 expanded weight rows in `buf` against `rows` (a compile-time constant) activation rows of
 * group g: out[m * ldo + r] = the sum for activation row m and weight row r (times row_scale[r]
 * when given), the first o_count of r stored. */
static inline __attribute__((always_inline)) void expanded_rows(const uint16_t *buf, int64_t stride, const uint16_t *g,
                                                                 int64_t I2, const int rows, float *out, int64_t ldo,
                                                                 int64_t o_count, const float *row_scale) {
    __m512 acc[PANEL];
    for (int r = 0; r < PANEL; ++r) acc[r] = _mm512_setzero_ps();
    const uint32_t *gp = (const uint32_t *)g, *wp = (const uint32_t *)buf;
    const int64_t pairs_per_row = stride / 2;
    for (int64_t p = 0; p < I2; ++p) {
        const __m512bh line = rows == PANEL ? (__m512bh)_mm512_loadu_si512((const void *)(gp + p * PANEL))
                                            : (__m512bh)_mm512_maskz_loadu_epi32(first_dwords(rows), gp + p * rows);
        for (int r = 0; r < PANEL; ++r) DPBF16_BROADCAST(acc[r], line, wp + r * pairs_per_row + p);
    }
    __m512i sums[PANEL]; /* acc[r] lane m -> sums[m] lane r */
    for (int r = 0; r < PANEL; ++r) sums[r] = _mm512_castps_si512(acc[r]);
    transpose16x16_epi32(sums);
    const __mmask16 keep = first_dwords(o_count);
    const __m512 scale = row_scale ? _mm512_maskz_loadu_ps(keep, row_scale) : _mm512_set1_ps(1.0f);
    for (int m = 0; m < rows; ++m)
        _mm512_mask_storeu_ps(out + m * ldo, keep, _mm512_mul_ps(_mm512_castsi512_ps(sums[m]), scale));
}

#define EXPANDED_CASE(n) case n: expanded_rows(buf, stride, g, I2, n, out, O, o_count, row_scale); break;

/* The codes of rows 16b .. 16b + 15 (one contiguous run) and their 4-bit scales and offsets fetched
 * into L2: issued before the products of the 16 rows before them, they arrive while those run (every layer's matrices
 * from memory, against none: int8 at 32 rows 1.07x S, 1.10x XS; 64 rows and the 4-bit kinds
 * 0.97-1.03x). */
static void fetch_rows(int kind, const void *W, const void *scales, const void *offsets, int64_t b, int64_t O,
                        int64_t I, int64_t G) {
    const int64_t o0 = b * PANEL, rows = O - o0 < PANEL ? O - o0 : PANEL;
    if (rows <= 0) return;
    const int64_t row_bytes = kind == QUANT_INT8 ? I : I / 2;
    const char *codes = (const char *)W + o0 * row_bytes;
    for (int64_t at = 0; at < rows * row_bytes; at += 64) _mm_prefetch(codes + at, _MM_HINT_T1);
    if (kind != QUANT_INT8) {
        const int64_t group_bytes = (I / G) * 2;
        for (int64_t at = 0; at < rows * group_bytes; at += 64) {
            _mm_prefetch((const char *)scales + o0 * group_bytes + at, _MM_HINT_T1);
            if (offsets) _mm_prefetch((const char *)offsets + o0 * group_bytes + at, _MM_HINT_T1);
        }
    }
}

/* y_f32 (M, O) = x (M, I) @ W^T for packed W (kind: QUANT_*; G the 4-bit group size), x float32
 * (xf, rounded to bf16) or bf16 (xb), the other NULL. scratch: accessory_packed_bf16_scratch_floats(M,
 * I) floats. The rows go GROUPS_PER_CHUNK groups at a time, each 16 weight rows expanded once per
 * chunk.
 * Returns 0, or -1 with y unwritten where a thread's expansion buffer cannot be allocated (the
 * caller then takes its other kernel). */
int accessory_quant_panels(int kind, const void *W, const void *scales, const void *offsets, const float *xf,
                           const uint16_t *xb, float *scratch, float *y, int64_t M, int64_t O, int64_t I, int64_t G) {
    uint16_t *groups = (uint16_t *)scratch;
    const int64_t I2 = pairs_of(I), n_groups = (M + PANEL - 1) / PANEL, group_elements = panel_size(I2);
    const int64_t blocks = (I2 + PANEL - 1) / PANEL, panels = (O + PANEL - 1) / PANEL;
    /* each expanded row a cache line longer than its inputs: at a multiple of 4 KiB (S's 2048
     * inputs) the 16 rows' pairs fell in one L1 set, and the products ran 0.52-0.65x as fast */
    const int64_t stride = (I + 31) / 32 * 32 + 32;
    int failed = 0;
#pragma omp parallel
    {
        uint16_t *buf = thread_buffer(PANEL * stride);
        if (buf == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n_groups * blocks; ++t) {
            const int64_t q = t / blocks;
            group_block(xf, xb, groups + q * group_elements, I, q * PANEL,
                        (int)(M - q * PANEL < PANEL ? M - q * PANEL : PANEL), (t % blocks) * PANEL);
        }  /* (a barrier: every group is whole, and `failed` seen by all) */
        int give_up;
#pragma omp atomic read
        give_up = failed;
        for (int64_t q0 = 0; q0 < n_groups && !give_up; q0 += GROUPS_PER_CHUNK) {
            const int64_t q1 = q0 + GROUPS_PER_CHUNK < n_groups ? q0 + GROUPS_PER_CHUNK : n_groups;
#pragma omp for schedule(static)
            for (int64_t b = 0; b < panels; ++b) {
                expand_rows(kind, W, scales, offsets, buf, stride, b, O, I, G);
                fetch_rows(kind, W, scales, offsets, b + 1, O, I, G);
                const int64_t o_count = O - b * PANEL < PANEL ? O - b * PANEL : PANEL;
                const float *row_scale = kind == QUANT_INT8 ? (const float *)scales + b * PANEL : NULL;
                for (int64_t q = q0; q < q1; ++q) {
                    const uint16_t *g = groups + q * group_elements;
                    float *out = y + q * PANEL * O + b * PANEL;
                    switch (M - q * PANEL < PANEL ? M - q * PANEL : PANEL) {
                        EXPANDED_CASE(1) EXPANDED_CASE(2) EXPANDED_CASE(3) EXPANDED_CASE(4) EXPANDED_CASE(5)
                        EXPANDED_CASE(6) EXPANDED_CASE(7) EXPANDED_CASE(8) EXPANDED_CASE(9) EXPANDED_CASE(10)
                        EXPANDED_CASE(11) EXPANDED_CASE(12) EXPANDED_CASE(13) EXPANDED_CASE(14) EXPANDED_CASE(15)
                        default: expanded_rows(buf, stride, g, I2, PANEL, out, O, o_count, row_scale); break;
                    }
                }
            }
        }
    }
    return failed ? -1 : 0;
}
