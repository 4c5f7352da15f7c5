/* Matrix-vector products with quantized weights for small batches on x86-64 (AVX2 + FMA + F16C).
 *
 * y[m, o] = sum_i x[m, i] * w(o, i) for m < M (a few decode streams), accumulated in float32, where
 * the weight matrix (O, I) is stored in one of the formats of accessory/quant/formats.py:
 *
 *   int8: q (O, I) int8, scale (O) float32;                       w = q * scale[o]
 *   int4: packed (O, I/2) uint8, scale and offset (O, I/G) fp16; w = q * scale[o, g] + offset[o, g]
 *   nf4:  packed (O, I/2) uint8, scale (O, I/G) fp16;            w = NF4[q] * scale[o, g]
 *
 * 4-bit codes are packed per block of 32 inputs: byte j (0..15) holds code j in its low nibble and
 * code j + 16 in its high nibble. G is a multiple of 32.
 *
 * Decoding reads every weight once per token, so these loops are built to stream the packed bytes
 * and apply each block to every activation row while it is in registers; nothing is ever
 * dequantized to memory. int8 and int4 multiply their integer codes with the activations
 * quantized to int8 per block of 32 (one float step per block, as llama.cpp's Q8 activations),
 * summed by integer multiply-adds; nf4 expands its levels to float32. Rows are spread over OpenMP
 * threads (torch's libgomp, so no second thread pool competes for the cores).
 */
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

#include "common.h"

#define TILE 4 /* activation rows handled per pass over a weight row (WITH_CONSTANT_ROWS's 1..4) */

/* Weight bytes are software-prefetched this far ahead of the loads (one cache line per 64
 * bytes): decoding streams matrices far larger than the caches, and on the 2-core AVX2 machine
 * of benchmarks/README.md this measured 1.2-1.4x per matrix for one thread, 1.1-1.2x for two,
 * over the hardware prefetchers alone. */
#define PREFETCH_BYTES 2048
#define PREFETCH(address) _mm_prefetch((const char *)(address) + PREFETCH_BYTES, _MM_HINT_T0)

static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

/* Activation and result element types. */
enum { F32 = 0, BF16 = 1, F16 = 2 };

static void load_activations(const void *x, int dtype, float *x_f32, int64_t n) {
    if (dtype == F32) {
        memcpy(x_f32, x, (size_t)n * sizeof(float));
    } else if (dtype == BF16) {
        const uint16_t *s = (const uint16_t *)x;
        for (int64_t k = 0; k < n; ++k) x_f32[k] = bf16_to_float(s[k]);
    } else {
        const uint16_t *s = (const uint16_t *)x;
        for (int64_t k = 0; k < n; ++k) x_f32[k] = half_to_float(s[k]);
    }
}

static inline void store(void *y, int dtype, int64_t index, float value) {
    if (dtype == F32) ((float *)y)[index] = value;
    else if (dtype == BF16) ((uint16_t *)y)[index] = float_to_bf16(value);
    else ((uint16_t *)y)[index] = _cvtss_sh(value, _MM_FROUND_TO_NEAREST_INT);
}

/* ------------------------------------------------------------------------------------------ 4-bit */

/* The 16 NF4 levels (QLoRA's normal-float table), split for two 8-lane permutes. */
static const float NF4_LEVELS[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

/* 8 codes (low bytes of `codes`) to their 8 NF4 levels: two 8-lane table permutes, picked by
 * the code's high bit. */
static inline __m256 nf4_levels8(__m128i codes, __m256 lut_lo, __m256 lut_hi) {
    __m256i idx = _mm256_cvtepu8_epi32(codes);
    __m256 lo = _mm256_permutevar8x32_ps(lut_lo, idx);
    __m256 hi = _mm256_permutevar8x32_ps(lut_hi, idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

/* One nf4 weight row against `mt` activation rows (float32; a compile-time constant). */
static inline __attribute__((always_inline)) void nf4_tile(const uint8_t *p, const uint16_t *s, const float *x,
                                                           int64_t I, int64_t G, int64_t m0, float *out,
                                                           const int mt) {
    const int64_t n_groups = I / G, blocks_per_group = G / 32;
    const __m128i low_nibbles = _mm_set1_epi8(0x0F);
    const __m256 lut_lo = _mm256_loadu_ps(NF4_LEVELS), lut_hi = _mm256_loadu_ps(NF4_LEVELS + 8);
    __m256 total[TILE];
    for (int j = 0; j < mt; ++j) total[j] = _mm256_setzero_ps();
    for (int64_t g = 0; g < n_groups; ++g) {
        __m256 acc[TILE][2];
        for (int j = 0; j < mt; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
        for (int64_t b = 0; b < blocks_per_group; ++b) {
            const int64_t block = g * blocks_per_group + b;
            if (!(block & 3)) PREFETCH(p + block * 16);
            __m128i raw = _mm_loadu_si128((const __m128i *)(p + block * 16));
            __m128i lo = _mm_and_si128(raw, low_nibbles);
            __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low_nibbles);
            __m256 w0 = nf4_levels8(lo, lut_lo, lut_hi);
            __m256 w1 = nf4_levels8(_mm_srli_si128(lo, 8), lut_lo, lut_hi);
            __m256 w2 = nf4_levels8(hi, lut_lo, lut_hi);
            __m256 w3 = nf4_levels8(_mm_srli_si128(hi, 8), lut_lo, lut_hi);
            for (int j = 0; j < mt; ++j) {
                const float *xr = x + (m0 + j) * I + block * 32;
                acc[j][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[j][0]);
                acc[j][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc[j][1]);
                acc[j][0] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xr + 16), acc[j][0]);
                acc[j][1] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xr + 24), acc[j][1]);
            }
        }
        const __m256 group_scale = _mm256_set1_ps(half_to_float(s[g]));
        for (int j = 0; j < mt; ++j)
            total[j] = _mm256_fmadd_ps(group_scale, _mm256_add_ps(acc[j][0], acc[j][1]), total[j]);
    }
    for (int j = 0; j < mt; ++j) out[j] = hsum8(total[j]);
}

/* Defines `name`, the nf4 weight rows o_begin..o_end against the M activation rows through `tile`
 * (nf4_tile's signature), TILE rows at a time; gemv_quant_avx512.c defines its own with its tile. */
#define DEFINE_NF4_ROWS(name, tile)                                                                 \
    static void name(const uint8_t *P, const uint16_t *scale, const float *x, void *y, int dtype,   \
                     int64_t M, int64_t O, int64_t I, int64_t G, int64_t o_begin, int64_t o_end) {  \
        for (int64_t o = o_begin; o < o_end; ++o) {                                                 \
            const uint8_t *p = P + o * (I / 2);                                                     \
            const uint16_t *s = scale + o * (I / G);                                                \
            for (int64_t m0 = 0; m0 < M; m0 += TILE) {                                              \
                const int mt = (M - m0) < TILE ? (int)(M - m0) : TILE;                              \
                float out[TILE];                                                                    \
                switch (mt) {                                                                       \
                    case 1: tile(p, s, x, I, G, m0, out, 1); break;                                 \
                    case 2: tile(p, s, x, I, G, m0, out, 2); break;                                 \
                    case 3: tile(p, s, x, I, G, m0, out, 3); break;                                 \
                    default: tile(p, s, x, I, G, m0, out, 4); break;                                \
                }                                                                                   \
                for (int j = 0; j < mt; ++j) store(y, dtype, (m0 + j) * O + o, out[j]);            \
            }                                                                                       \
        }                                                                                           \
    }

DEFINE_NF4_ROWS(nf4_rows, nf4_tile)

/* int4 codes against activations quantized to int8 per block of 32 (xq, one float step dx per
 * block): the products are summed with integer multiply-adds, four times fewer instructions
 * than expanding each code to float, which is what keeps the 4-bit path at the memory's pace.
 * sum_i w_i x_i = scale * sum_blocks dx * sum_i q_i xq_i + offset * sum_i x_i (xsum, exact). */
static inline __attribute__((always_inline)) __m256 int4_block_dot(__m256i codes, const int8_t *xq) {
    const __m256i xv = _mm256_loadu_si256((const __m256i *)xq);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(codes, xv), _mm256_set1_epi16(1)));
}

static inline __attribute__((always_inline)) __m256i int4_block_codes(const uint8_t *packed) {
    /* bytes 0..15: codes 0..15 (low nibbles), bytes 16..31: codes 16..31 (high nibbles) */
    const __m128i raw = _mm_loadu_si128((const __m128i *)packed);
    return _mm256_and_si256(_mm256_insertf128_si256(_mm256_castsi128_si256(raw), _mm_srli_epi16(raw, 4), 1),
                            _mm256_set1_epi8(0x0F));
}

/* One weight row against `mt` activation rows (a compile-time constant at every call site).
 * sd[j * n_blocks + k]: the row's scale for block k times activation row j's step for it.
 * One activation row spreads the blocks over four accumulators, two rows over two each, so
 * enough products are in flight to hide the FMA latency. Returns the sums without the offset
 * term in out[j]. (Measured against two weight rows sharing each activation load, and against
 * 64 codes per 32-byte load: neither was faster on matrices larger than the caches.) */
static inline __attribute__((always_inline)) void int4_tile(const uint8_t *p, const float *sd, const int8_t *xq,
                                                            int64_t I, int64_t n_blocks, int64_t m0, float *out,
                                                            const int mt) {
    const int unroll = mt == 1 ? 4 : mt == 2 ? 2 : 1;
    __m256 acc[TILE][4];
    for (int j = 0; j < mt; ++j)
        for (int u = 0; u < 4; ++u) acc[j][u] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + unroll <= n_blocks; k += unroll) {
        if (!(k & 3)) PREFETCH(p + k * 16); /* one cache line per 64 bytes */
        __m256i c[4];
        for (int u = 0; u < unroll; ++u) c[u] = int4_block_codes(p + (k + u) * 16);
        for (int j = 0; j < mt; ++j) {
            const int8_t *xr = xq + (m0 + j) * I + k * 32;
            const float *d = sd + j * n_blocks + k;
            for (int u = 0; u < unroll; ++u)
                acc[j][u] = _mm256_fmadd_ps(int4_block_dot(c[u], xr + 32 * u), _mm256_broadcast_ss(d + u), acc[j][u]);
        }
    }
    for (; k < n_blocks; ++k) {
        const __m256i c = int4_block_codes(p + k * 16);
        for (int j = 0; j < mt; ++j)
            acc[j][0] = _mm256_fmadd_ps(int4_block_dot(c, xq + (m0 + j) * I + k * 32),
                                        _mm256_broadcast_ss(sd + j * n_blocks + k), acc[j][0]);
    }
    for (int j = 0; j < mt; ++j)
        out[j] = hsum8(_mm256_add_ps(_mm256_add_ps(acc[j][0], acc[j][1]), _mm256_add_ps(acc[j][2], acc[j][3])));
}

/* sum_g offset[g] * xsum[g] over a row's groups, eight fp16 offsets at a time (F16C). */
static inline float int4_offset_term(const uint16_t *z, const float *xs, int64_t n_groups) {
    __m256 sum = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= n_groups; g += 8)
        sum = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(z + g))), _mm256_loadu_ps(xs + g), sum);
    float total = hsum8(sum);
    for (; g < n_groups; ++g) total += half_to_float(z[g]) * xs[g];
    return total;
}

/* A row's fp16 group scales in float32, one per block of 32 (a group spans 1 << group_shift
 * blocks), times the block steps of activation rows m0..m0+mt-1: sd[j * n_blocks + k].
 * s: room for n_blocks floats. */
static void int4_scale_products(const uint16_t *s16, const float *dx, int group_shift, int64_t n_blocks,
                                int64_t m0, int mt, float *s, float *sd) {
    const int64_t n_groups = n_blocks >> group_shift;
    int64_t g = 0;
    for (; g + 8 <= n_groups; g += 8)
        _mm256_storeu_ps(s + g, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s16 + g))));
    for (; g < n_groups; ++g) s[g] = half_to_float(s16[g]);
    if (group_shift) /* spread in place, from the end, to one scale per block */
        for (int64_t k = n_blocks - 1; k > 0; --k) s[k] = s[k >> group_shift];
    for (int j = 0; j < mt; ++j) {
        const float *d = dx + (m0 + j) * n_blocks;
        float *out = sd + j * n_blocks;
        int64_t k = 0;
        for (; k + 8 <= n_blocks; k += 8)
            _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_loadu_ps(s + k), _mm256_loadu_ps(d + k)));
        for (; k < n_blocks; ++k) out[k] = s[k] * d[k];
    }
}

/* log2(G / 32): a group of G inputs spans 1 << shift blocks of 32 (G is 32 << k: kernels/quant.py's
 * takes_scheme sends other sizes to the expansion). */
static inline int group_shift_of(int64_t G) {
    int shift = 0;
    while ((32 << shift) < G) ++shift;
    return shift;
}

static void int4_rows(const uint8_t *P, const uint16_t *scale, const uint16_t *offset, const int8_t *xq,
                      const float *dx, const float *xsum, void *y, int dtype,
                      int64_t M, int64_t O, int64_t I, int64_t G, int64_t o_begin, int64_t o_end) {
    const int64_t n_groups = I / G, n_blocks = I / 32;
    const int group_shift = group_shift_of(G);
    float s[n_blocks], sd[TILE * n_blocks];
    for (int64_t o = o_begin; o < o_end; ++o) {
        const uint8_t *p = P + o * (I / 2);
        for (int64_t m0 = 0; m0 < M; m0 += TILE) {
            const int mt = (M - m0) < TILE ? (int)(M - m0) : TILE;
            int4_scale_products(scale + o * n_groups, dx, group_shift, n_blocks, m0, mt, s, sd);
            float out[TILE];
#define INT4_TILE(n) int4_tile(p, sd, xq, I, n_blocks, m0, out, n)
            WITH_CONSTANT_ROWS(mt, INT4_TILE)
#undef INT4_TILE
            for (int j = 0; j < mt; ++j)
                store(y, dtype, (m0 + j) * O + o,
                      out[j] + int4_offset_term(offset + o * n_groups, xsum + (m0 + j) * n_groups, n_groups));
        }
    }
}

/* Each block of 32 activations as int8 codes and one float step: the step amax / 127, the codes
 * x * (127 / amax) rounded to nearest even (0 for an all-zero block). Eight lanes at a time: the
 * conversion rounds as lrintf does in the default rounding mode, so the codes are the scalar
 * loop's, bit for bit; that loop called libm's lrintf per value and took 1.8 us of an XS-sized
 * (576 inputs) product's 8.5, 6.4 us at 2048 inputs, once per activation row before the
 * product's threads start. A NaN is passed over by the maximum as the scalar comparison did. */
static void quantize_activations(const float *x, int8_t *xq, float *dx, int64_t n_blocks) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
        const float *v = x + blk * 32;
        __m256 q[4], top = _mm256_setzero_ps();
        for (int c = 0; c < 4; ++c) {
            q[c] = _mm256_loadu_ps(v + 8 * c);
            top = _mm256_max_ps(_mm256_and_ps(q[c], magnitude), top); /* a NaN lane keeps `top` */
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1)));
        const float inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
        dx[blk] = amax / 127.0f;
        __m256i n[4];
        for (int c = 0; c < 4; ++c) n[c] = _mm256_cvtps_epi32(_mm256_mul_ps(q[c], _mm256_set1_ps(inverse)));
        /* packs work per 128-bit half: [0 1 4 5 | 2 3 6 7] quarters of eight codes, put back in order */
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3]));
        _mm256_storeu_si256((__m256i *)(xq + blk * 32), _mm256_permutevar8x32_epi32(bytes, order));
    }
}

/* ------------------------------------------------------------------------------------------ int8 */

/* int8 weights against activations quantized to int8 per block of 32, as the int4 path:
 * maddubs multiplies unsigned by signed bytes, so |w| meets x carrying w's sign. Pairs of
 * products (at most 2 * 127 * 127) fit its int16 sums. Half the instructions per weight byte of
 * expanding the weights to float32, which kept one thread below the memory's pace. */
static inline __attribute__((always_inline)) __m256 int8_block_dot(__m256i w, const int8_t *xq) {
    const __m256i x = _mm256_loadu_si256((const __m256i *)xq);
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

/* One weight row against `mt` activation rows (a compile-time constant at every call site):
 * blocks of 32 through int8_block_dot, scaled by each block's activation step; the I % 32 inputs
 * past the last block in float32 (x). Returns the row's sums, before its scale, in out[j]. */
static inline __attribute__((always_inline)) void int8_tile(const int8_t *w, const int8_t *xq, const float *dx,
                                                            const float *x, int64_t I, int64_t m0, float *out,
                                                            const int mt) {
    const int unroll = mt == 1 ? 4 : mt == 2 ? 2 : 1;
    const int64_t n_blocks = I / 32;
    __m256 acc[TILE][4];
    for (int j = 0; j < mt; ++j)
        for (int u = 0; u < 4; ++u) acc[j][u] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + unroll <= n_blocks; k += unroll) {
        __m256i c[4];
        for (int u = 0; u < unroll; ++u) {
            if (!((k + u) & 1)) PREFETCH(w + (k + u) * 32); /* one cache line per 64 bytes */
            c[u] = _mm256_loadu_si256((const __m256i *)(w + (k + u) * 32));
        }
        for (int j = 0; j < mt; ++j) {
            const int8_t *xr = xq + (m0 + j) * I + k * 32;
            const float *d = dx + (m0 + j) * n_blocks + k;
            for (int u = 0; u < unroll; ++u)
                acc[j][u] = _mm256_fmadd_ps(int8_block_dot(c[u], xr + 32 * u), _mm256_broadcast_ss(d + u), acc[j][u]);
        }
    }
    for (; k < n_blocks; ++k) {
        const __m256i c = _mm256_loadu_si256((const __m256i *)(w + k * 32));
        for (int j = 0; j < mt; ++j)
            acc[j][0] = _mm256_fmadd_ps(int8_block_dot(c, xq + (m0 + j) * I + k * 32),
                                        _mm256_broadcast_ss(dx + (m0 + j) * n_blocks + k), acc[j][0]);
    }
    for (int j = 0; j < mt; ++j) {
        float sum = hsum8(_mm256_add_ps(_mm256_add_ps(acc[j][0], acc[j][1]), _mm256_add_ps(acc[j][2], acc[j][3])));
        const float *xr = x + (m0 + j) * I;
        for (int64_t i = n_blocks * 32; i < I; ++i) sum += (float)w[i] * xr[i];
        out[j] = sum;
    }
}

static void int8_rows(const int8_t *W, const float *scale, const int8_t *xq, const float *dx, const float *x,
                      void *y, int dtype, int64_t M, int64_t O, int64_t I, int64_t o_begin, int64_t o_end) {
    for (int64_t o = o_begin; o < o_end; ++o) {
        const int8_t *w = W + o * I;
        for (int64_t m0 = 0; m0 < M; m0 += TILE) {
            const int mt = (M - m0) < TILE ? (int)(M - m0) : TILE;
            float out[TILE];
#define INT8_TILE(n) int8_tile(w, xq, dx, x, I, m0, out, n)
            WITH_CONSTANT_ROWS(mt, INT8_TILE)
#undef INT8_TILE
            for (int j = 0; j < mt; ++j) store(y, dtype, (m0 + j) * O + o, out[j] * scale[o]);
        }
    }
}

/* ------------------------------------------------------------------------------------------ entry points */

#define ROWS_PER_TASK 16 /* small enough to balance two threads, big enough to amortise a task */

/* CALL(o_begin, o_end) for the weight rows in tasks of ROWS_PER_TASK, spread over OpenMP threads. */
#define FOR_ROW_TASKS(O, CALL)                                                                  \
    do {                                                                                        \
        const int64_t n_tasks_ = ((O) + ROWS_PER_TASK - 1) / ROWS_PER_TASK;                     \
        _Pragma("omp parallel for schedule(static)")                                            \
        for (int64_t t_ = 0; t_ < n_tasks_; ++t_)                                               \
            CALL(t_ * ROWS_PER_TASK, (t_ + 1) * ROWS_PER_TASK < (O) ? (t_ + 1) * ROWS_PER_TASK : (O)); \
    } while (0)

/* The int8 products' activations, staged in scratch: x in float32 (M * I floats), each block of 32's
 * step (M * (I / 32) floats), then its codes (M * I bytes; with `biased`, as unsigned codes + 128,
 * for gemv_quant_avx512.c). Returns the codes. */
static int8_t *stage_int8_activations(const void *x, int dtype, float *scratch, int64_t M, int64_t I, int biased) {
    const int64_t n_blocks = I / 32;
    float *x_f32 = scratch, *dx = scratch + M * I;
    int8_t *xq = (int8_t *)(dx + M * n_blocks);
    load_activations(x, dtype, x_f32, M * I);
    for (int64_t m = 0; m < M; ++m) {
        quantize_activations(x_f32 + m * I, xq + m * I, dx + m * n_blocks, n_blocks);
        if (biased)
            for (int64_t k = 0; k < n_blocks * 32; ++k) xq[m * I + k] = (int8_t)((uint8_t)xq[m * I + k] ^ 0x80u);
    }
    return xq;
}

/* xsum[g] = the exact float32 sum of x's g-th run of G values (n of them: the int4 offsets' term
 * multiplies each group's offset by its activations' sum). */
static void group_sums(const float *x, float *xsum, int64_t n, int64_t G) {
    for (int64_t g = 0; g < n / G; ++g) {
        float s = 0.0f;
        for (int64_t k = 0; k < G; ++k) s += x[g * G + k];
        xsum[g] = s;
    }
}

/* y (M, O) = x (M, I) @ W^T with int8 W. scratch: M * I + M * (I / 32) + M * I / 4 + 1 floats. */
void accessory_gemv_int8(const int8_t *W, const float *scale, const void *x, void *y, int dtype,
                         float *scratch, int64_t M, int64_t O, int64_t I) {
    const int8_t *xq = stage_int8_activations(x, dtype, scratch, M, I, 0);
    const float *x_f32 = scratch, *dx = scratch + M * I;
#define INT8_ROWS(begin, end) int8_rows(W, scale, xq, dx, x_f32, y, dtype, M, O, I, begin, end)
    FOR_ROW_TASKS(O, INT8_ROWS);
#undef INT8_ROWS
}

/* y (M, O) = x (M, I) @ W^T with 4-bit W: nf4 levels (nf4 = 1, offset unused) or int4 codes.
 * scratch: M * I + M * I / G + M * I / 32 + M * I / 4 floats. */
void accessory_gemv_q4(const uint8_t *P, const uint16_t *scale, const uint16_t *offset, int nf4,
                       const void *x, void *y, int dtype, float *scratch,
                       int64_t M, int64_t O, int64_t I, int64_t G) {
    float *x_f32 = scratch, *xsum = scratch + M * I, *dx = xsum + M * (I / G);
    int8_t *xq = (int8_t *)(dx + M * (I / 32));
    load_activations(x, dtype, x_f32, M * I);
    if (!nf4) {
        group_sums(x_f32, xsum, M * I, G);
        quantize_activations(x_f32, xq, dx, M * (I / 32));
    }
#define Q4_ROWS(begin, end) (!nf4 ? int4_rows(P, scale, offset, xq, dx, xsum, y, dtype, M, O, I, G, begin, end) \
                                 : nf4_rows(P, scale, x_f32, y, dtype, M, O, I, G, begin, end))
    FOR_ROW_TASKS(O, Q4_ROWS);
#undef Q4_ROWS
}

/* out (O, I) float32 = the weight the packed rows stand for (kind 0: int8, 1: int4, 2: nf4), with
 * the arithmetic of accessory/quant/formats.py's dequantize: q * scale for int8, q * scale +
 * offset for int4 (a product, then a sum: no fused multiply-add), NF4[q] * scale for nf4. Used by
 * prompt-sized products, which multiply a few MB of rows at a time with torch's float32 product;
 * expanding them with torch's element-wise operations took a third of an int4 prefill. */
void accessory_dequantize(const void *packed, const void *scale, const uint16_t *offset, int kind, float *out,
                          int64_t O, int64_t I, int64_t G) {
    const int64_t n_groups = kind == 0 ? 1 : I / G;
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < O; ++o) {
        float *row = out + o * I;
        if (kind == 0) {
            const int8_t *q = (const int8_t *)packed + o * I;
            const float s = ((const float *)scale)[o];
            for (int64_t i = 0; i < I; ++i) row[i] = (float)q[i] * s;
            continue;
        }
        const uint8_t *p = (const uint8_t *)packed + o * (I / 2);
        const uint16_t *s16 = (const uint16_t *)scale + o * n_groups;
        for (int64_t g = 0; g < n_groups; ++g) {
            const float s = half_to_float(s16[g]);
            const float z = kind == 1 ? half_to_float(offset[o * n_groups + g]) : 0.0f;
            for (int64_t b = g * G; b < (g + 1) * G; b += 32) {  /* a block of 32: 16 bytes, two codes each */
                const uint8_t *bytes = p + b / 2;
                float *dst = row + b;
                if (kind == 1) {
                    for (int j = 0; j < 16; ++j) {
                        dst[j] = (float)(bytes[j] & 15) * s + z;
                        dst[j + 16] = (float)(bytes[j] >> 4) * s + z;
                    }
                } else {
                    for (int j = 0; j < 16; ++j) {
                        dst[j] = NF4_LEVELS[bytes[j] & 15] * s;
                        dst[j + 16] = NF4_LEVELS[bytes[j] >> 4] * s;
                    }
                }
            }
        }
    }
}
