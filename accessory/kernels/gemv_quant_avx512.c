/* Products with int8 and int4 weights on CPUs with AVX512-VNNI (Ice Lake, Zen 4 and later): the
 * same entry points and formats as gemv_quant.c, which kernels/quant.py and the native decode step
 * load in its place on such CPUs (the expansion for prompt-sized products stays its own).
 *
 * The arithmetic is gemv_quant.c's: activations quantized to int8 per block of 32 (one float step
 * each, rounded the same way), integer dot products per block, scaled and summed in float32. What
 * changes is the instruction: VPDPBUSD multiplies 64 unsigned bytes by 64 signed ones and adds
 * each group of four products to a 32-bit lane, exact, where AVX2 needs four instructions per 32
 * bytes (VPMADDUBSW, whose 16-bit sums can saturate, then VPMADDWD) and gemv_quant.c two more to
 * move int8 weights' signs onto the activations.
 *
 *   int8: two blocks a vector. The activations are stored as unsigned codes xq + 128, and each
 *         weight vector's sum * 128 (one more VPDPBUSD, shared by every activation row) is taken
 *         off the lanes.
 *   int4: four blocks a 64-byte load. The codes are unsigned already: a 16-byte block holds code j
 *         in byte j's low nibble and code j + 16 in its high one, so the load's low nibbles are
 *         codes 0-15 of each block and its high nibbles codes 16-31; the activations are stored in
 *         that order, and two VPDPBUSD leave each block's sum in four lanes. Its fp16 scales are
 *         widened in the loop, four a time (widening them beforehand, one scalar at a time, cost
 *         more than the products at one row).
 *
 * Tiles of TILE_W weight rows x TILE_X activation rows keep TILE_W * TILE_X accumulators of 16
 * lanes, whose lanes are summed at the end by one shuffle tree (common.h's sum_lanes16); int4's
 * offsets' term goes into the same accumulators, sixteen groups a vector. One int8 activation row
 * takes gemv_quant.c's row form (AVX2_ROWS below), one int4 row a form of its own (vnni_int4_row).
 * nf4 keeps gemv_quant.c's float32 arithmetic with its 16 levels in one register (nf4_tile_avx512):
 * XS one stream 1.6-1.75x, four streams 1.4-1.6x, SmolLM2 one stream 1.2-1.6x over the AVX2 form.
 *
 * Measured on the 2-core Zen 4 of benchmarks/README.md, whole decode runs of the S shape in one
 * process against gemv_quant.c (benchmarks/README.md has the runs): 2 streams int8 1.08x, int4
 * 1.46x; 3-4 streams 1.3-1.5x; 16 streams 1.7-2.0x. One layer's products alone, weights in
 * cache: 2.2-2.4x (int8) and 1.7-1.8x (int4) at 16 and 64 rows.
 */
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

#include "common.h"

/* gemv_quant.c's kernels under other names: the expansion (accessory_dequantize, which keeps its
 * name) is served by them, and its helpers (load_activations, store, half_to_float, NF4_LEVELS,
 * PREFETCH, quantize_activations, stage_int8_activations, group_sums, group_shift_of,
 * FOR_ROW_TASKS) by its static functions. */
#define accessory_gemv_int8 avx2_gemv_int8
#define accessory_gemv_q4 avx2_gemv_q4
#include "gemv_quant.c"
#undef accessory_gemv_int8
#undef accessory_gemv_q4

#define TILE_W 4
#define TILE_X 4

/* Each group of TILE_W weight rows fetches the group this many groups on into L2 while it is
 * multiplied (as gemv_bf16_avx512.c does from three rows; here from two). */
#ifndef PREFETCH_GROUPS
#define PREFETCH_GROUPS 2
#endif
/* One int8 activation row (a single stream's decode step, bound by reading the weights) takes
 * gemv_quant.c's row form: in whole decode runs of the S shape it was level with these tiles; from
 * two rows the tiles are faster (1.08x at two streams; 1.3-1.5x at three and four). One int4 row
 * takes vnni_int4_row below. */
#define AVX2_ROWS 1
/* vnni_int4_row fetches the packed stream this far ahead into L2 (a line per quad of blocks). */
#define ROW_PREFETCH_BYTES 8192

/* Lanes from two consecutive floats d[0], d[1] (blocks k and k+1) by `pattern` (indices 0 and 1). */
static inline __m512 vnni_pair_lanes(const float *d, __m512i pattern) {
    return _mm512_permutexvar_ps(pattern, _mm512_zextps128_ps512(_mm_castpd_ps(_mm_load_sd((const double *)d))));
}

/* The same for a last, odd block: d[0] only (lanes of block k + 1 are zero). */
static inline __m512 vnni_single_lanes(const float *d, __m512i pattern) {
    return _mm512_permutexvar_ps(pattern, _mm512_zextps128_ps512(_mm_load_ss(d)));
}

/* Lane patterns: which of two blocks each 32-bit lane's four bytes belong to. */
static inline __m512i vnni_int8_pattern(void) { return _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0); }

/* out[r * TILE_X + a] = the sum of acc[r][a]'s lanes, for the tile's r_count x a_count accumulators. */
static inline __attribute__((always_inline)) void vnni_store_sums(__m512 acc[TILE_W][TILE_X], const int r_count,
                                                                  const int a_count, float *out) {
    __m512 v[16];
    for (int q = 0; q < 16; ++q) v[q] = _mm512_setzero_ps();
    for (int r = 0; r < r_count; ++r)
        for (int a = 0; a < a_count; ++a) v[r * TILE_X + a] = acc[r][a];
    float sums[16];
    _mm512_storeu_ps(sums, sum_lanes16(v));
    for (int r = 0; r < r_count; ++r)
        for (int a = 0; a < a_count; ++a) out[r * TILE_X + a] = sums[r * TILE_X + a];
}

/* ------------------------------------------------------------------------------------------ int8 */

/* `r_count` int8 weight rows (w, stride I) against `a_count` activation rows (xu: unsigned codes,
 * stride I; dx: steps, stride n_blocks), both compile-time constants at every call. out[r *
 * TILE_X + a]: the sums over the I / 32 whole blocks, before the rows' scales. */
static inline __attribute__((always_inline)) void vnni_int8_tile(const int8_t *w, const uint8_t *xu, const float *dx,
                                                                 int64_t I, int64_t n_blocks, const int r_count,
                                                                 const int a_count, const int8_t *next, int next_rows,
                                                                 float *out) {
    const __m512i pattern = vnni_int8_pattern(), bias = _mm512_set1_epi8((char)0x80), zero = _mm512_setzero_si512();
    __m512 acc[TILE_W][TILE_X];
    for (int r = 0; r < r_count; ++r)
        for (int a = 0; a < a_count; ++a) acc[r][a] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 2 <= n_blocks; k += 2) {
        __m512i wv[TILE_W], base[TILE_W];
        for (int q = 0; q < next_rows; ++q) _mm_prefetch((const char *)(next + q * I + k * 32), _MM_HINT_T1);
        for (int r = 0; r < r_count; ++r) {
            wv[r] = _mm512_loadu_si512((const void *)(w + r * I + k * 32));
            base[r] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, bias, wv[r])); /* -128 * sum w */
        }
        for (int a = 0; a < a_count; ++a) {
            const __m512i xv = _mm512_loadu_si512((const void *)(xu + a * I + k * 32));
            const __m512 d = vnni_pair_lanes(dx + a * n_blocks + k, pattern);
            for (int r = 0; r < r_count; ++r)
                acc[r][a] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(base[r], xv, wv[r])), d, acc[r][a]);
        }
    }
    if (k < n_blocks) { /* one block left: the upper half of every vector is zero */
        const __mmask64 half = 0xFFFFFFFFull;
        __m512i wv[TILE_W], base[TILE_W];
        for (int r = 0; r < r_count; ++r) {
            wv[r] = _mm512_maskz_loadu_epi8(half, (const void *)(w + r * I + k * 32));
            base[r] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, bias, wv[r]));
        }
        for (int a = 0; a < a_count; ++a) {
            const __m512i xv = _mm512_maskz_loadu_epi8(half, (const void *)(xu + a * I + k * 32));
            const __m512 d = vnni_single_lanes(dx + a * n_blocks + k, pattern);
            for (int r = 0; r < r_count; ++r)
                acc[r][a] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(base[r], xv, wv[r])), d, acc[r][a]);
        }
    }
    vnni_store_sums(acc, r_count, a_count, out);
}

#define TILE_CASES(TILE, r) \
    switch (a_count) { case 1: TILE(r, 1); break; case 2: TILE(r, 2); break; case 3: TILE(r, 3); break; default: TILE(r, 4); break; }

/* The first of the rows of the group PREFETCH_GROUPS on that activation tile t (of tiles) fetches,
 * and their number in *count (0, and row o itself, past the matrix's end). */
static inline int64_t vnni_prefetch_rows(int64_t o, int64_t O, int64_t t, int64_t tiles, int *count) {
    const int64_t first = t * TILE_W / tiles, last = (t + 1) * TILE_W / tiles;
    const int64_t ahead = o + PREFETCH_GROUPS * TILE_W + first;
    *count = ahead >= O ? 0 : (int)(O - ahead < last - first ? O - ahead : last - first);
    return *count ? ahead : o;
}

static void int8_rows_vnni(const int8_t *W, const float *scale, const uint8_t *xu, const float *dx, const float *x,
                           void *y, int dtype, int64_t M, int64_t O, int64_t I, int64_t o_begin, int64_t o_end) {
    const int64_t n_blocks = I / 32, tiles = (M + TILE_X - 1) / TILE_X;
    float out[TILE_W * TILE_X];
    for (int64_t o = o_begin; o < o_end;) {
        const int r_count = o_end - o >= TILE_W ? TILE_W : 1;
        const int8_t *w = W + o * I;
        for (int64_t m0 = 0, t = 0; m0 < M; m0 += TILE_X, ++t) {
            const int a_count = M - m0 < TILE_X ? (int)(M - m0) : TILE_X;
            int next_rows;
            const int8_t *next = W + vnni_prefetch_rows(o, O, t, tiles, &next_rows) * I;
#define INT8_TILE(r, n) vnni_int8_tile(w, xu + m0 * I, dx + m0 * n_blocks, I, n_blocks, r, n, next, next_rows, out)
            if (r_count == TILE_W) { TILE_CASES(INT8_TILE, TILE_W) } else { TILE_CASES(INT8_TILE, 1) }
#undef INT8_TILE
            for (int r = 0; r < r_count; ++r)
                for (int a = 0; a < a_count; ++a) {
                    float sum = out[r * TILE_X + a];
                    const float *xr = x + (m0 + a) * I;
                    for (int64_t i = n_blocks * 32; i < I; ++i) sum += (float)w[r * I + i] * xr[i];
                    store(y, dtype, (m0 + a) * O + o + r, sum * scale[o + r]);
                }
        }
        o += r_count;
    }
}

/* ------------------------------------------------------------------------------------------ int4 */

/* Four blocks (64 packed bytes) at a time: the low nibbles of the 64 bytes are codes 0-15 of each
 * block, the high nibbles codes 16-31; the activations are stored to match (vnni_quad_layout), so
 * that two VPDPBUSD leave each block's sum in four lanes: lanes 4j..4j+3 for block j. */
static inline __m512i vnni_low_codes(__m512i raw) { return _mm512_and_si512(raw, _mm512_set1_epi8(0x0F)); }
static inline __m512i vnni_high_codes(__m512i raw) {
    return _mm512_and_si512(_mm512_srli_epi16(raw, 4), _mm512_set1_epi8(0x0F));
}

/* Lanes 4j..4j+3 = v[j] for the `count` (1-4) floats at v; the lanes of missing blocks are zero. */
static inline __m512 vnni_quad_lanes(const float *v, int count) {
    const __m512i pattern = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const __m128 four = count == 4 ? _mm_loadu_ps(v) : _mm_maskz_loadu_ps((__mmask8)((1u << count) - 1), v);
    return _mm512_permutexvar_ps(pattern, _mm512_zextps128_ps512(four));
}

/* `r_count` int4 weight rows (p, stride I / 2; s16, z: their fp16 scales and offsets per group of
 * 32 << shift inputs, stride n_groups) against `a_count` activation rows (xq: codes in the quad layout,
 * stride xs; dx: steps, stride n_blocks; xsum: exact sums per group, stride n_groups), both
 * compile-time constants at every call. out[r * TILE_X + a]: the whole product, offsets' term in. */
static inline __attribute__((always_inline)) void vnni_int4_tile(const uint8_t *p, const uint16_t *s16, const uint16_t *z,
                                                                 const int8_t *xq, int64_t xs, const float *dx,
                                                                 const float *xsum, int64_t I, int64_t n_blocks,
                                                                 int64_t n_groups, int shift, const int r_count, const int a_count,
                                                                 const uint8_t *next, int next_rows, float *out) {
    const __m512i zero = _mm512_setzero_si512();
    /* lanes 4j..4j+3 (block k + j) take the scale of group (k >> shift) + (j >> shift) */
    const __m512i scale_lanes = _mm512_srli_epi32(_mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0), shift);
    const int64_t stride = I / 2;
    __m512 acc[TILE_W][TILE_X];
    for (int r = 0; r < r_count; ++r)
        for (int a = 0; a < a_count; ++a) acc[r][a] = _mm512_setzero_ps();
    for (int64_t k = 0; k < n_blocks; k += 4) {
        const int count = n_blocks - k >= 4 ? 4 : (int)(n_blocks - k);
        const __mmask64 bytes = count == 4 ? ~(__mmask64)0 : (((__mmask64)1 << (16 * count)) - 1);
        const __mmask8 scales = (__mmask8)((1u << (((count - 1) >> shift) + 1)) - 1);
        __m512i lo[TILE_W], hi[TILE_W];
        __m512 sv[TILE_W];
        for (int q = 0; q < next_rows; ++q) _mm_prefetch((const char *)(next + q * stride + k * 16), _MM_HINT_T1);
        for (int r = 0; r < r_count; ++r) {
            const __m512i raw = _mm512_maskz_loadu_epi8(bytes, (const void *)(p + r * stride + k * 16));
            lo[r] = vnni_low_codes(raw);
            hi[r] = vnni_high_codes(raw);
            const __m128i halves = _mm_maskz_loadu_epi16(scales, (const void *)(s16 + r * n_groups + (k >> shift)));
            sv[r] = _mm512_permutexvar_ps(scale_lanes, _mm512_zextps128_ps512(_mm_cvtph_ps(halves)));
        }
        for (int a = 0; a < a_count; ++a) {
            const int8_t *x = xq + a * xs + k * 32;
            const __m512i xlo = _mm512_loadu_si512((const void *)x), xhi = _mm512_loadu_si512((const void *)(x + 64));
            const __m512 d = vnni_quad_lanes(dx + a * n_blocks + k, count);
            for (int r = 0; r < r_count; ++r) {
                const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo[r], xlo), hi[r], xhi);
                acc[r][a] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(sv[r], d), acc[r][a]);
            }
        }
    }
    /* + sum_g offset[g] * xsum[g], sixteen groups a lane-vector at a time */
    for (int64_t g = 0; g < n_groups; g += 16) {
        const __mmask16 mask = n_groups - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n_groups - g)) - 1);
        __m512 zr[TILE_W];
        for (int r = 0; r < r_count; ++r)
            zr[r] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, (const void *)(z + r * n_groups + g)));
        for (int a = 0; a < a_count; ++a) {
            const __m512 sums = _mm512_maskz_loadu_ps(mask, xsum + a * n_groups + g);
            for (int r = 0; r < r_count; ++r) acc[r][a] = _mm512_fmadd_ps(zr[r], sums, acc[r][a]);
        }
    }
    vnni_store_sums(acc, r_count, a_count, out);
}

static void int4_rows_vnni(const uint8_t *P, const uint16_t *scale, const uint16_t *offset, const int8_t *xq,
                           int64_t xs, const float *dx, const float *xsum, void *y, int dtype, int64_t M, int64_t O,
                           int64_t I, int64_t G, int64_t o_begin, int64_t o_end) {
    const int64_t n_groups = I / G, n_blocks = I / 32, tiles = (M + TILE_X - 1) / TILE_X;
    const int group_shift = group_shift_of(G);
    float out[TILE_W * TILE_X];
    for (int64_t o = o_begin; o < o_end;) {
        const int r_count = o_end - o >= TILE_W ? TILE_W : 1;
        const uint8_t *p = P + o * (I / 2);
        const uint16_t *s16 = scale + o * n_groups, *z = offset + o * n_groups;
        for (int64_t m0 = 0, t = 0; m0 < M; m0 += TILE_X, ++t) {
            const int a_count = M - m0 < TILE_X ? (int)(M - m0) : TILE_X;
            int next_rows;
            const uint8_t *next = P + vnni_prefetch_rows(o, O, t, tiles, &next_rows) * (I / 2);
#define INT4_TILE(r, n) vnni_int4_tile(p, s16, z, xq + m0 * xs, xs, dx + m0 * n_blocks, xsum + m0 * n_groups, I, \
                                       n_blocks, n_groups, group_shift, r, n, next, next_rows, out)
            if (r_count == TILE_W) { TILE_CASES(INT4_TILE, TILE_W) } else { TILE_CASES(INT4_TILE, 1) }
#undef INT4_TILE
            for (int r = 0; r < r_count; ++r)
                for (int a = 0; a < a_count; ++a) store(y, dtype, (m0 + a) * O + o + r, out[r * TILE_X + a]);
        }
        o += r_count;
    }
}

/* One int4 weight row (p; s16: its fp16 scales per group of 32 << shift inputs) against one
 * activation row (xq in the quad layout, dx its steps): vnni_int4_tile's arithmetic for a single
 * pair of rows, with none of its per-step masks and no tree of sixteen sums (whole quads in one
 * loop, two accumulators; a last partial quad block by block), and the line `ahead` + the
 * quad's offset fetched into L2 when `ahead` is not NULL. The sum without the offsets' term.
 * Measured on the 2-core Zen 4 of benchmarks/README.md over S's int4 matrices, one activation
 * row, against gemv_quant.c's row form: 24.3-25.8 against 23.3 GB/s (20.2-22.4 against 20.2 in
 * a slower minute), XS's 17.9 against 15.1; a 1 x 1 vnni_int4_tile 20.4-20.9; the prefetch 1, 2,
 * 4 or 8 KB ahead 24.5 / 24.3 / 24.9 / 25.8 (XS 16.1 / 16.0 / 16.8 / 17.9), none 19.7. */
static inline float vnni_int4_row(const uint8_t *p, const uint16_t *s16, const int8_t *xq, const float *dx,
                                  int64_t n_blocks, int shift, const uint8_t *ahead) {
    const __m512i nibbles = _mm512_set1_epi8(0x0F), zero = _mm512_setzero_si512();
    const __m512i block_lanes = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const __m512i scale_lanes = _mm512_srli_epi32(block_lanes, shift);
    const __mmask8 scales = (__mmask8)((1u << ((3 >> shift) + 1)) - 1);
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    const int64_t whole = n_blocks & ~(int64_t)3;
    for (int64_t k = 0; k < whole; k += 4) {
        if (ahead) _mm_prefetch((const char *)(ahead + k * 16), _MM_HINT_T1);
        const __m512i raw = _mm512_loadu_si512((const void *)(p + k * 16));
        const __m512i lo = _mm512_and_si512(raw, nibbles), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nibbles);
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, _mm512_loadu_si512((const void *)(xq + k * 32))),
                                                hi, _mm512_loadu_si512((const void *)(xq + k * 32 + 64)));
        const __m128 halves = _mm_cvtph_ps(_mm_maskz_loadu_epi16(scales, (const void *)(s16 + (k >> shift))));
        const __m512 s = _mm512_permutexvar_ps(scale_lanes, _mm512_castps128_ps512(halves));
        const __m512 d = _mm512_permutexvar_ps(block_lanes, _mm512_castps128_ps512(_mm_loadu_ps(dx + k)));
        acc[(k >> 2) & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s, d), acc[(k >> 2) & 1]);
    }
    const int64_t rest = n_blocks - whole;
    if (rest) {  /* a last partial quad (1-3 blocks): its bytes, scales and steps loaded under masks,
                  * the missing blocks' lanes zero (their activation codes are zero in the quad layout) */
        const __m512i raw = _mm512_maskz_loadu_epi8(((__mmask64)1 << (rest * 16)) - 1, (const void *)(p + whole * 16));
        const __m512i lo = _mm512_and_si512(raw, nibbles), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nibbles);
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, _mm512_loadu_si512((const void *)(xq + whole * 32))),
                                                hi, _mm512_loadu_si512((const void *)(xq + whole * 32 + 64)));
        const __mmask8 used = (__mmask8)((1u << (((rest - 1) >> shift) + 1)) - 1);
        const __m128 halves = _mm_cvtph_ps(_mm_maskz_loadu_epi16(used, (const void *)(s16 + (whole >> shift))));
        const __m512 s = _mm512_permutexvar_ps(scale_lanes, _mm512_castps128_ps512(halves));
        const __m128 steps = _mm_maskz_loadu_ps((__mmask8)((1u << rest) - 1), dx + whole);
        const __m512 d = _mm512_permutexvar_ps(block_lanes, _mm512_castps128_ps512(steps));
        acc[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s, d), acc[0]);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
}

static void int4_row_vnni(const uint8_t *P, const uint16_t *scale, const uint16_t *offset, const int8_t *xq,
                          const float *dx, const float *xsum, void *y, int dtype, int64_t O, int64_t I, int64_t G,
                          int64_t o_begin, int64_t o_end) {
    const int64_t n_groups = I / G, n_blocks = I / 32, stride = I / 2;
    const int group_shift = group_shift_of(G);
    const uintptr_t end = (uintptr_t)(P + O * stride);
    for (int64_t o = o_begin; o < o_end; ++o) {
        const uint8_t *p = P + o * stride;
        const uintptr_t ahead = (uintptr_t)p + ROW_PREFETCH_BYTES; /* (an address past the matrix is not named) */
        const float sum = vnni_int4_row(p, scale + o * n_groups, xq, dx, n_blocks, group_shift,
                                        ahead + (uintptr_t)stride <= end ? (const uint8_t *)ahead : NULL);
        store(y, dtype, o, sum + int4_offset_term(offset + o * n_groups, xsum, n_groups));
    }
}

/* One activation row's int8 block codes in the order vnni_int4_tile multiplies them: per four
 * blocks, codes 0-15 of each, then codes 16-31 of each; missing blocks of a last quad are zero
 * (the row's stride is I rounded up to 128: the caller's buffer has room). */
static void vnni_quad_layout(const int8_t *xq, int8_t *out, int64_t n_blocks) {
    for (int64_t k = 0; k < n_blocks; k += 4) {
        int8_t *o = out + k * 32;
        memset(o, 0, 128);
        for (int64_t j = 0; j < 4 && k + j < n_blocks; ++j) {
            memcpy(o + 16 * j, xq + (k + j) * 32, 16);
            memcpy(o + 64 + 16 * j, xq + (k + j) * 32 + 16, 16);
        }
    }
}

/* ------------------------------------------------------------------------------------------- nf4 */

/* One nf4 weight row against `mt` float32 activation rows (a compile-time constant): gemv_quant.c's
 * nf4_tile with all 16 levels in one register, so a block's 32 codes become weights by two
 * VPERMPS (16 lanes each) where AVX2 needs eight permutes and four blends; per group of G inputs
 * the sums in float32, times its scale. out[j]: row j's product. */
static inline __attribute__((always_inline)) void nf4_tile_avx512(const uint8_t *p, const uint16_t *s, const float *x,
                                                                  int64_t I, int64_t G, int64_t m0, float *out,
                                                                  const int mt) {
    const int64_t n_groups = I / G, blocks_per_group = G / 32;
    const __m128i low_nibbles = _mm_set1_epi8(0x0F);
    const __m512 levels = _mm512_loadu_ps(NF4_LEVELS);
    __m512 total[TILE];
    for (int j = 0; j < mt; ++j) total[j] = _mm512_setzero_ps();
    for (int64_t g = 0; g < n_groups; ++g) {
        __m512 acc[TILE][2];
        for (int j = 0; j < mt; ++j) acc[j][0] = acc[j][1] = _mm512_setzero_ps();
        for (int64_t b = 0; b < blocks_per_group; ++b) {
            const int64_t block = g * blocks_per_group + b;
            if (!(block & 3)) PREFETCH(p + block * 16);
            const __m128i raw = _mm_loadu_si128((const __m128i *)(p + block * 16));
            const __m512 w0 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, low_nibbles)), levels);
            const __m512 w1 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), low_nibbles)),
                                                    levels);
            for (int j = 0; j < mt; ++j) {
                const float *xr = x + (m0 + j) * I + block * 32;
                acc[j][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), acc[j][0]);
                acc[j][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), acc[j][1]);
            }
        }
        const __m512 group_scale = _mm512_set1_ps(half_to_float(s[g]));
        for (int j = 0; j < mt; ++j)
            total[j] = _mm512_fmadd_ps(group_scale, _mm512_add_ps(acc[j][0], acc[j][1]), total[j]);
    }
    for (int j = 0; j < mt; ++j) out[j] = _mm512_reduce_add_ps(total[j]);
}

DEFINE_NF4_ROWS(nf4_rows_avx512, nf4_tile_avx512)

/* ------------------------------------------------------------------------------------------ entry points */

/* y (M, O) = x (M, I) @ W^T with int8 W (one row: gemv_quant.c's). scratch: as gemv_quant.c's
 * (kernels/quant.py). */
void accessory_gemv_int8(const int8_t *W, const float *scale, const void *x, void *y, int dtype,
                         float *scratch, int64_t M, int64_t O, int64_t I) {
    if (M <= AVX2_ROWS) {
        avx2_gemv_int8(W, scale, x, y, dtype, scratch, M, O, I);
        return;
    }
    const uint8_t *xu = (const uint8_t *)stage_int8_activations(x, dtype, scratch, M, I, 1);
    const float *x_f32 = scratch, *dx = scratch + M * I;
#define INT8_ROWS(begin, end) int8_rows_vnni(W, scale, xu, dx, x_f32, y, dtype, M, O, I, begin, end)
    FOR_ROW_TASKS(O, INT8_ROWS);
#undef INT8_ROWS
}

/* y (M, O) = x (M, I) @ W^T with 4-bit W (nf4: gemv_quant.c's). scratch: as gemv_quant.c's plus
 * 24 floats per row (each row's codes padded to a multiple of 128; kernels/quant.py). */
void accessory_gemv_q4(const uint8_t *P, const uint16_t *scale, const uint16_t *offset, int nf4,
                       const void *x, void *y, int dtype, float *scratch,
                       int64_t M, int64_t O, int64_t I, int64_t G) {
    if (nf4) {
        load_activations(x, dtype, scratch, M * I);
#define NF4_ROWS(begin, end) nf4_rows_avx512(P, scale, scratch, y, dtype, M, O, I, G, begin, end)
        FOR_ROW_TASKS(O, NF4_ROWS);
#undef NF4_ROWS
        return;
    }
    const int64_t n_groups = I / G, n_blocks = I / 32, stride = (I + 127) & ~(int64_t)127;
    float *x_f32 = scratch, *xsum = scratch + M * I, *dx = xsum + M * n_groups;
    int8_t *xq = (int8_t *)(dx + M * n_blocks), staged[I];
    load_activations(x, dtype, x_f32, M * I);
    group_sums(x_f32, xsum, M * I, G);
    for (int64_t m = 0; m < M; ++m) {
        quantize_activations(x_f32 + m * I, staged, dx + m * n_blocks, n_blocks);
        vnni_quad_layout(staged, xq + m * stride, n_blocks);
    }
#define INT4_ROW(begin, end) int4_row_vnni(P, scale, offset, xq, dx, xsum, y, dtype, O, I, G, begin, end)
#define INT4_ROWS(begin, end) int4_rows_vnni(P, scale, offset, xq, stride, dx, xsum, y, dtype, M, O, I, G, begin, end)
    if (M == 1) FOR_ROW_TASKS(O, INT4_ROW);
    else FOR_ROW_TASKS(O, INT4_ROWS);
#undef INT4_ROW
#undef INT4_ROWS
}
