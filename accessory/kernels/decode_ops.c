/* The small operations between a decoder layer's matrix products, for decode steps on the CPU.
 *
 * A decode step of a small model spends more time in the ~40 torch operations between its matrix
 * products (norms, rotary, cache writes, attention, activations, residual adds; each a dispatch and
 * often an OpenMP fork) than in the products themselves. These functions do that work on float32
 * buffers the caller allocates once, so one layer costs a handful of calls.
 *
 * Layouts: activations are row-major (M, width) float32, M = batch rows, one token each. The KV
 * cache of one layer is (B, KV, L, hd) bf16 or float32 (accessory.model.layers.kv_cache), row m
 * of the batch is cache row m. Rotary tables are (n_positions, hd / 2) float32 cosines and sines.
 */
#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "common.h"

/* Eight cache values from element i of row (float32, or bf16 when BF16), as float32. */
static inline __attribute__((always_inline)) __m256 load_kv(const void *row, int64_t i, const int BF16) {
    if (BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + i))), 16));
    return _mm256_loadu_ps((const float *)row + i);
}

static inline __attribute__((always_inline)) float kv_at(const void *row, int64_t i, const int BF16) {
    return BF16 ? bf16_to_float(((const uint16_t *)row)[i]) : ((const float *)row)[i];
}

/* a . b over n values, b float32 or (BF16) bf16. */
static inline __attribute__((always_inline)) float dot(const float *a, const void *b, int64_t n, const int BF16) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load_kv(b, i, BF16), acc);
    float s = hsum8(acc);
    for (; i < n; ++i) s += a[i] * kv_at(b, i, BF16);
    return s;
}

/* out = x * rsqrt(mean(x^2) + eps) * weight, per row of D. weight_bf16: 1 when weight is bf16,
 * 0 when float32. out may equal x. */
void accessory_rmsnorm(const float *x, const void *weight, int weight_bf16, float *out,
                       int64_t M, int64_t D, float eps) {
    for (int64_t m = 0; m < M; ++m) {
        const float *xr = x + m * D;
        float *o = out + m * D;
        const float scale = 1.0f / sqrtf(dot(xr, xr, D, 0) / (float)D + eps);
        if (weight_bf16) {
            const uint16_t *w = (const uint16_t *)weight;
            for (int64_t i = 0; i < D; ++i) o[i] = xr[i] * scale * bf16_to_float(w[i]);
        } else {
            const float *w = (const float *)weight;
            for (int64_t i = 0; i < D; ++i) o[i] = xr[i] * scale * w[i];
        }
    }
}

/* h += y, n floats. */
void accessory_add(float *h, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) h[i] += y[i];
}

/* e^x for eight floats, about 1e-7 relative error over [-87.3, 88.3] (inputs outside are clamped, so
 * the results stay finite, which silu below relies on; NaN stays NaN): x = n ln2 + r, |r| <= ln2/2,
 * ln2 split in two parts so n ln2 is exact, e^r by the minimax polynomial of Cephes' expf, and 2^n
 * added to the exponent bits. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_set1_ps(88.3f), _mm256_max_ps(_mm256_set1_ps(-87.3f), x));  /* NaN: x */
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

/* out (M, F) = silu(gate) * up, where each row of gate_up (M, 2F) is [gate | up]. The scalar expf
 * this replaces took ~9 ns per element: 4% of a 16-stream step of the S shape. */
void accessory_silu_mul(const float *gate_up, float *out, int64_t M, int64_t F) {
    const int64_t F8 = F & ~(int64_t)7;
#pragma omp parallel for schedule(static) if (M * F > 32768)
    for (int64_t m = 0; m < M; ++m) {
        const float *g = gate_up + m * 2 * F, *u = g + F;
        float *o = out + m * F;
        for (int64_t i = 0; i < F8; i += 8) {
            const __m256 gv = _mm256_loadu_ps(g + i);
            const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            const __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i)));
        }
        for (int64_t i = F8; i < F; ++i) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

/* Rotate one head vector in place. interleaved: pairs (x[2i], x[2i+1]); else (x[i], x[i + hd/2]). */
static inline void rotate(float *x, const float *cos, const float *sin, int64_t hd, int interleaved) {
    const int64_t half = hd / 2;
    for (int64_t i = 0; i < half; ++i) {
        float *a = interleaved ? x + 2 * i : x + i;
        float *b = interleaved ? x + 2 * i + 1 : x + i + half;
        const float xa = *a, xb = *b;
        *a = xa * cos[i] - xb * sin[i];
        *b = xa * sin[i] + xb * cos[i];
    }
}

#define KEY_BLOCK 64 /* keys scored at once before the running softmax is rescaled */
#define MAX_GROUP 8  /* query heads of one cache head attended together */

/* q . K[j] for four keys (cache rows of hd values, hd a multiple of 8) into out[0..3]: four
 * independent chains of multiply-adds and one shared horizontal reduction. One key at a time, each
 * dot product waited on its own chain and its own reduction: ~45 cycles a key, most of a long
 * context's attention. */
static inline __attribute__((always_inline)) void dot4(const float *q, const void *K, int64_t hd, float *out,
                                                       const int BF16) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i < hd; i += 8) {
        const __m256 qv = _mm256_loadu_ps(q + i);
        a0 = _mm256_fmadd_ps(qv, load_kv(K, i, BF16), a0);
        a1 = _mm256_fmadd_ps(qv, load_kv(K, hd + i, BF16), a1);
        a2 = _mm256_fmadd_ps(qv, load_kv(K, 2 * hd + i, BF16), a2);
        a3 = _mm256_fmadd_ps(qv, load_kv(K, 3 * hd + i, BF16), a3);
    }
    /* lanes of hadd(hadd(a0, a1), hadd(a2, a3)): per 128-bit half, the partial sums of keys 0..3 */
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}

/* acc[0..hd) += sum_j p[j] V[j], over n value rows of hd values (HD: hd as a compile-time
 * constant, so the accumulators stay in registers; 0: any hd, through memory). */
static inline __attribute__((always_inline)) void weighted_values(const float *p, const void *V, int64_t n,
                                                                  int64_t hd, float *acc, const int HD,
                                                                  const int BF16) {
    if (HD) {
        __m256 a[HD / 8];
        for (int d = 0; d < HD / 8; ++d) a[d] = _mm256_loadu_ps(acc + 8 * d);
        for (int64_t j = 0; j < n; ++j) {
            const __m256 pj = _mm256_set1_ps(p[j]);
            for (int d = 0; d < HD / 8; ++d) a[d] = _mm256_fmadd_ps(pj, load_kv(V, j * HD + 8 * d, BF16), a[d]);
        }
        for (int d = 0; d < HD / 8; ++d) _mm256_storeu_ps(acc + 8 * d, a[d]);
        return;
    }
    for (int64_t j = 0; j < n; ++j) {
        const __m256 pj = _mm256_set1_ps(p[j]);
        int64_t d = 0;
        for (; d + 8 <= hd; d += 8)
            _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(pj, load_kv(V, j * hd + d, BF16), _mm256_loadu_ps(acc + d)));
        for (; d < hd; ++d) acc[d] += p[j] * kv_at(V, j * hd + d, BF16);
    }
}

/* One block of n scores (q.K[j]) into softmax weights: scaled, the running maximum raised to the
 * block's when it is higher (what was summed so far, running_sum and out[0..hd), rescaled to it),
 * then scores[j] = exp(score - max) added to running_sum. */
static inline __attribute__((always_inline)) void softmax_block(float *scores, int64_t n, float scale,
                                                                float *running_max, float *running_sum, float *out,
                                                                int64_t hd) {
    float block_max = -INFINITY;
    int64_t j;
    for (j = 0; j < n; ++j) {
        scores[j] *= scale;
        if (scores[j] > block_max) block_max = scores[j];
    }
    if (block_max > *running_max) {  /* rescale what was summed so far to the new maximum */
        const float factor = expf(*running_max - block_max);
        *running_sum *= factor;
        for (int64_t d = 0; d < hd; ++d) out[d] *= factor;
        *running_max = block_max;
    }
    /* the block's weights exp(score - max), eight at a time (a scalar expf was ~15 ns a key) */
    const __m256 top = _mm256_set1_ps(*running_max);
    __m256 sums = _mm256_setzero_ps();
    for (j = 0; j + 8 <= n; j += 8) {
        const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), top));
        _mm256_storeu_ps(scores + j, p);
        sums = _mm256_add_ps(sums, p);
    }
    *running_sum += hsum8(sums);
    for (; j < n; ++j) {
        scores[j] = expf(scores[j] - *running_max);
        *running_sum += scores[j];
    }
}

/* One query head over keys 0..n_keys-1 of one cache head: out = softmax(q.K^T * scale) V, by
 * blocks of keys with a running maximum (one pass over the cache). */
static inline __attribute__((always_inline)) void attend_head_kv(const float *q, const void *K, const void *V,
                                                                 int64_t n_keys, int64_t hd, float scale,
                                                                 float *out, const int BF16) {
    const int64_t size = BF16 ? 2 : 4;
    float running_max = -INFINITY, running_sum = 0.0f;
    for (int64_t d = 0; d < hd; ++d) out[d] = 0.0f;
    float scores[KEY_BLOCK];
    const int by4 = (hd & 7) == 0;
    for (int64_t j0 = 0; j0 < n_keys; j0 += KEY_BLOCK) {
        const int64_t n = n_keys - j0 < KEY_BLOCK ? n_keys - j0 : KEY_BLOCK;
        const char *Kb = (const char *)K + j0 * hd * size, *Vb = (const char *)V + j0 * hd * size;
        int64_t j = 0;
        if (by4)
            for (; j + 4 <= n; j += 4) dot4(q, Kb + j * hd * size, hd, scores + j, BF16);
        for (; j < n; ++j) scores[j] = dot(q, Kb + j * hd * size, hd, BF16);
        softmax_block(scores, n, scale, &running_max, &running_sum, out, hd);
        if (hd == 64) weighted_values(scores, Vb, n, hd, out, 64, BF16);
        else if (hd == 128) weighted_values(scores, Vb, n, hd, out, 128, BF16);
        else weighted_values(scores, Vb, n, hd, out, 0, BF16);
    }
    const float inv = 1.0f / running_sum;
    for (int64_t d = 0; d < hd; ++d) out[d] *= inv;
}

/* The same over a bf16 cache with AVX-512 (CPUs with AVX512-BF16; head sizes 64 and 128, as HD):
 * the scores by VDPBF16PS on the query rounded to bf16 (to nearest even, as a bf16 model's
 * projection returns it to torch; the products exact, their sums in float32), the weighted values
 * 16 at a time (the same float32 multiply-adds in the same order as weighted_values). Over the
 * AVX2 code's keys widened 8 at a time: XS's 16-row decode step 1.03-1.04x (benchmarks/README.md,
 * session 16), the attention a sixth of it. Query heads that share a cache head (grouped-query
 * attention: TinyLlama's 8 a cache head, SmolLM2's 3) are attended together, up to MAX_GROUP,
 * block by block: each block of keys and values is read from memory once for all of them, then
 * from L1, where each head used to stream the whole span itself (from L2 at best, from memory once
 * a span outgrew it). Every head's arithmetic is what it was alone, in the same order (outputs bit
 * for bit the same). S's cache (4 of 32 heads), one row: 1.12x the attention at 1000 keys, 1.81x
 * at 4000; 16 rows of ~40 keys 1.11x; XS (a cache head each) unchanged (benchmarks/README.md). */
#if defined(__clang__) ? __clang_major__ >= 11 : (defined(__GNUC__) && __GNUC__ >= 10)
#define HAVE_AVX512_ATTENTION 1
#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

static inline __attribute__((always_inline)) BF16_TARGET __m512 widen16(const uint16_t *v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)v)), 16));
}

static inline __attribute__((always_inline)) BF16_TARGET void attend_heads_avx512(
        const float *q, int nq, const uint16_t *K, const uint16_t *V, int64_t n_keys, float scale, float *out,
        const int HD) {
    /* per query head (its vectors HD apart in q and out): the query in bf16, the running maximum
     * and sum, and the weighted values so far (in memory between blocks, as the registers' copy
     * was around softmax_block) */
    __m512bh qb[MAX_GROUP][HD / 32];
    float running_max[MAX_GROUP], running_sum[MAX_GROUP], scores[KEY_BLOCK], sums[MAX_GROUP][HD];
    for (int i = 0; i < nq; ++i) {
        for (int c = 0; c < HD / 32; ++c)
            qb[i][c] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(q + i * HD + 32 * c + 16), _mm512_loadu_ps(q + i * HD + 32 * c));
        running_max[i] = -INFINITY;
        running_sum[i] = 0.0f;
        for (int d = 0; d < HD; ++d) sums[i][d] = 0.0f;
    }
    for (int64_t j0 = 0; j0 < n_keys; j0 += KEY_BLOCK) {
        const int64_t n = n_keys - j0 < KEY_BLOCK ? n_keys - j0 : KEY_BLOCK;
        const uint16_t *Kb = K + j0 * HD, *Vb = V + j0 * HD;
        for (int i = 0; i < nq; ++i) {  /* the block's keys and values in L1 after the first head */
            int64_t j = 0;
            for (; j + 4 <= n; j += 4) {  /* four keys' 16-lane sums, then one shared reduction */
                __m512 a[4];
                for (int t = 0; t < 4; ++t) {
                    a[t] = _mm512_setzero_ps();
                    for (int c = 0; c < HD / 32; ++c)
                        a[t] = _mm512_dpbf16_ps(a[t], (__m512bh)_mm512_loadu_si512(Kb + (j + t) * HD + 32 * c), qb[i][c]);
                }
                __m256 h[4];
                for (int t = 0; t < 4; ++t)
                    h[t] = _mm256_add_ps(_mm512_castps512_ps256(a[t]),
                                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[t]), 1)));
                const __m256 x = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
                _mm_storeu_ps(scores + j, _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1)));
            }
            for (; j < n; ++j) {
                __m512 a = _mm512_setzero_ps();
                for (int c = 0; c < HD / 32; ++c)
                    a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(Kb + j * HD + 32 * c), qb[i][c]);
                scores[j] = _mm512_reduce_add_ps(a);
            }
            softmax_block(scores, n, scale, &running_max[i], &running_sum[i], sums[i], HD);
            __m512 acc[HD / 16];
            for (int d = 0; d < HD / 16; ++d) acc[d] = _mm512_loadu_ps(sums[i] + 16 * d);
            for (j = 0; j < n; ++j) {
                const __m512 pj = _mm512_set1_ps(scores[j]);
                for (int d = 0; d < HD / 16; ++d) acc[d] = _mm512_fmadd_ps(pj, widen16(Vb + j * HD + 16 * d), acc[d]);
            }
            for (int d = 0; d < HD / 16; ++d) _mm512_storeu_ps(sums[i] + 16 * d, acc[d]);
        }
    }
    for (int i = 0; i < nq; ++i) {
        const __m512 inv = _mm512_set1_ps(1.0f / running_sum[i]);
        for (int d = 0; d < HD / 16; ++d) _mm512_storeu_ps(out + i * HD + 16 * d, _mm512_mul_ps(_mm512_loadu_ps(sums[i] + 16 * d), inv));
    }
}

BF16_TARGET static void attend_heads_avx512_64(const float *q, int nq, const uint16_t *K, const uint16_t *V,
                                               int64_t n, float scale, float *out) {
    attend_heads_avx512(q, nq, K, V, n, scale, out, 64);
}

BF16_TARGET static void attend_heads_avx512_128(const float *q, int nq, const uint16_t *K, const uint16_t *V,
                                                int64_t n, float scale, float *out) {
    attend_heads_avx512(q, nq, K, V, n, scale, out, 128);
}
#else  /* a compiler without AVX512-BF16 intrinsics: the AVX2 code only */
#define HAVE_AVX512_ATTENTION 0
#define attend_heads_avx512_64(q, nq, K, V, n, scale, out) attend_heads_each(q, nq, K, V, n, 64, scale, out, 1)
#define attend_heads_avx512_128(q, nq, K, V, n, scale, out) attend_heads_each(q, nq, K, V, n, 128, scale, out, 1)
#endif

/* Whether bf16 caches of head size 64 / 128 take attend_heads_avx512: -1 until first asked (then
 * where the CPU has AVX512-BF16), else as accessory_attention_avx512 last set it. */
static int attention_avx512 = -1;

/* Set whether they do (0 / 1; 1 counts only where the CPU has AVX512-BF16), or with -1 only ask;
 * returns the setting in force. kernels/decode.py sets it once (ACCESSORY_BF16_KERNEL=avx2 keeps
 * the AVX2 code), the tests to compare both. */
int accessory_attention_avx512(int on) {
    if (attention_avx512 < 0 || on >= 0)
        attention_avx512 = HAVE_AVX512_ATTENTION && (on != 0) && __builtin_cpu_supports("avx512bf16");
    return attention_avx512;
}

/* attend_head_kv for nq query heads one after another (hd apart in q and out). */
static void attend_heads_each(const float *q, int nq, const void *K, const void *V, int64_t n_keys, int64_t hd,
                              float scale, float *out, const int BF16) {
    for (int i = 0; i < nq; ++i) attend_head_kv(q + i * hd, K, V, n_keys, hd, scale, out + i * hd, BF16);
}

/* nq (<= MAX_GROUP) query heads of one cache head, their vectors hd apart in q and out. */
static void attend_heads(const float *q, int nq, const void *K, const void *V, int64_t n_keys, int64_t hd,
                         float scale, float *out, int kv_bf16, int avx512) {
    if (kv_bf16 && avx512 && hd == 64) attend_heads_avx512_64(q, nq, K, V, n_keys, scale, out);
    else if (kv_bf16 && avx512 && hd == 128) attend_heads_avx512_128(q, nq, K, V, n_keys, scale, out);
    else if (kv_bf16) attend_heads_each(q, nq, K, V, n_keys, hd, scale, out, 1);
    else attend_heads_each(q, nq, K, V, n_keys, hd, scale, out, 0);
}

/* The attention of one decode step, from the fused q|k|v projection to the per-head output.
 *
 * qkv (M, (H + 2 KV) hd): each row [q heads | k heads | v heads], rotated here in place.
 * positions (M): the position of row m's token; its key and value are written at that slot of
 * its cache row, and it attends to slots 0..position of that row. cache_rows (M): row m's cache
 * row, or NULL for row m (a decode step: one token a row). A prompt's tokens share their row, each
 * at its own position: every key and value is written before any query attends, so a chunk of a
 * prompt sees its own earlier tokens as the torch path does.
 * k_cache, v_cache: (B, KV, L, hd) with B >= M, bf16 when kv_bf16 (the new key and value rounded to
 * nearest even, as torch casts them) else float32. Query head h reads cache head h / (H / KV).
 * out (M, H hd). scale: usually 1 / sqrt(hd).
 */
void accessory_attend_step(float *qkv, const int64_t *positions, const float *cos_table, const float *sin_table,
                           int interleaved, void *k_cache, void *v_cache, int kv_bf16, float *out,
                           int64_t M, int64_t H, int64_t KV, int64_t hd, int64_t L, float scale,
                           const int64_t *cache_rows) {
    const int64_t width = (H + 2 * KV) * hd, half = hd / 2, n_rep = H / KV, size = kv_bf16 ? 2 : 4;
    /* the query heads of one cache head in chunks of at most MAX_GROUP, of even sizes */
    const int64_t chunks = (n_rep + MAX_GROUP - 1) / MAX_GROUP, per_chunk = (n_rep + chunks - 1) / chunks;
    /* Threads from a few thousand multiply-adds: in a decode step this cache has not been read
     * since the last token (the weights streamed since have evicted it), so even one stream's
     * short context is a cold read worth splitting; XS, one stream, 48 keys: 1.04-1.06x a step
     * against the former threshold of 65536 (alternating runs, benchmarks/README.md). */
    int64_t work = 0;
    for (int64_t m = 0; m < M; ++m) work += (positions[m] + 1) * H * hd;
    const int avx512 = accessory_attention_avx512(-1);
#pragma omp parallel if (work > 4096)
    {
        /* each query and key head rotated, and each key head's key and value written to the cache,
         * shared out too (every head is whole at the barrier ending this loop). One thread did it
         * before: 0.23 ms of a 10.5 ms XS step at 16 rows, its cache writes cold misses one after
         * another; shared, that attention alone from a cold cache 1.05-1.2x, the whole 16-row
         * step 0.99-1.04x (median 1.015x of five alternating runs, benchmarks/README.md). */
#pragma omp for schedule(static)
        for (int64_t task = 0; task < M * (H + KV); ++task) {
            const int64_t m = task / (H + KV), h = task % (H + KV), p = positions[m];
            float *row = qkv + m * width;
            rotate(row + h * hd, cos_table + p * half, sin_table + p * half, hd, interleaved);
            if (h < H) continue;
            const int64_t g = h - H, slot = (((cache_rows ? cache_rows[m] : m) * KV + g) * L + p) * hd;
            const float *k = row + h * hd, *v = row + (H + KV + g) * hd;
            if (kv_bf16) {
                uint16_t *ks = (uint16_t *)k_cache + slot, *vs = (uint16_t *)v_cache + slot;
                for (int64_t d = 0; d < hd; ++d) {
                    ks[d] = float_to_bf16(k[d]);
                    vs[d] = float_to_bf16(v[d]);
                }
            } else {
                memcpy((float *)k_cache + slot, k, hd * sizeof(float));
                memcpy((float *)v_cache + slot, v, hd * sizeof(float));
            }
        }
        /* a task: one row's query heads of one cache head (a chunk of them past MAX_GROUP), dealt
         * out in turn: a prompt's later tokens attend to more keys than its first ones
         * (XS, 500 tokens: the prefill 1.023x over halves in order; decode steps alike) */
#pragma omp for schedule(static, 1)
        for (int64_t task = 0; task < M * KV * chunks; ++task) {
            const int64_t m = task / (KV * chunks), g = task / chunks % KV, first = g * n_rep + task % chunks * per_chunk;
            const int64_t left = (g + 1) * n_rep - first;  /* the cache head's query heads from `first` on */
            const int nq = (int)(left < per_chunk ? left : per_chunk);
            const int64_t base = ((cache_rows ? cache_rows[m] : m) * KV + g) * L * hd * size;
            attend_heads(qkv + m * width + first * hd, nq, (const char *)k_cache + base, (const char *)v_cache + base,
                         positions[m] + 1, hd, scale, out + m * H * hd + first * hd, kv_bf16, avx512);
        }
    }
}

/* ------------------------------------------------------------------------- a whole step's layers */

/* The matrix products, from the libraries that hold them (gemv_bf16.c, gemv_bf16_panels.c,
 * gemv_quant.c): the caller passes their addresses, so each library stays one compiled file. */
typedef void (*gemv_bf16_fn)(const void *W, const float *x, float *scratch, float *y, int64_t M, int64_t O,
                             int64_t I);
typedef void (*gemv_int8_fn)(const void *W, const void *scale, const void *x, void *y, int dtype, float *scratch,
                             int64_t M, int64_t O, int64_t I);
typedef void (*gemv_q4_fn)(const void *P, const void *scale, const void *offset, int nf4, const void *x, void *y,
                           int dtype, float *scratch, int64_t M, int64_t O, int64_t I, int64_t G);
/* gemv_bf16_panels.c's accessory_quant_panels: packed weights expanded to bf16 16 rows at a time
 * for bf16 products (0, or -1 with nothing written). */
typedef int (*quant_panels_fn)(int kind, const void *W, const void *scale, const void *offset, const float *xf,
                               const uint16_t *xb, float *scratch, float *y, int64_t M, int64_t O, int64_t I,
                               int64_t G);

enum { PRODUCT_BF16 = 0, PRODUCT_INT8 = 1, PRODUCT_INT4 = 2, PRODUCT_NF4 = 3, PRODUCT_PANELS = 4 };

/* One weight matrix (O, I): bf16 weight (in rows, or in 16-row panels: gemv_bf16_panels.c), or
 * packed codes with their scales (and int4 offsets). Packed codes go through the step's
 * quant_panels from expand_from rows on (0: never), else through gemv_int8 / gemv_q4. */
typedef struct {
    int64_t kind, out_features, in_features, group_size;
    const void *weight, *scales, *offsets;
    int64_t expand_from;
} step_product;

/* One llama block: its four products and two RMS norms (float32 or bf16 weights). */
typedef struct {
    step_product qkv, wo, w13, w2;
    const void *attention_norm, *ffn_norm;
    int64_t attention_norm_bf16, ffn_norm_bf16;
    double attention_norm_eps, ffn_norm_eps;
} step_layer;

/* Everything one decode step reads and writes. The buffers are float32, rows (M) by: h, x, out
 * dim; qkv (H + 2 KV) hd; attn H hd; gate_up 2 F; act F; scratch as large as the largest product
 * asks. keys[l], values[l]: layer l's cache, (B, KV, L, hd), B above every row's cache row (M
 * rows, or the highest of cache_rows, a prompt's tokens sharing one: accessory_attend_step).
 * positions[m] must be below both L and n_rotary, the rows of the rotary tables.
 * Both ends are optional. With embedding (vocab_size rows of dim, bf16 when embedding_bf16, else
 * float32), h starts as the rows of tokens[0..M) instead of holding the inputs. With logits
 * (M, head.out_features), the last h is normed by final_norm and multiplied by head into it. */
typedef struct {
    const step_layer *layers;
    int64_t n_layers;
    void *const *keys;
    void *const *values;
    int64_t kv_bf16, interleaved;
    const int64_t *positions;
    const float *cos_table, *sin_table;
    int64_t n_rotary;
    float *h, *x, *qkv, *attn, *out, *gate_up, *act, *scratch;
    int64_t rows, dim, n_heads, n_kv_heads, head_dim, max_len;
    double scale;
    gemv_bf16_fn gemv_bf16;
    gemv_int8_fn gemv_int8;
    gemv_q4_fn gemv_q4;
    gemv_bf16_fn gemv_panels; /* accessory_packed_bf16_f32: the same arguments as gemv_bf16 */
    const void *embedding;
    int64_t embedding_bf16, vocab_size;
    const int64_t *tokens;
    const void *final_norm;
    int64_t final_norm_bf16;
    double final_norm_eps;
    step_product head;
    float *logits;
    const int64_t *cache_rows; /* row m's cache row (a prompt's tokens share one), or NULL for row m */
    quant_panels_fn quant_panels; /* NULL where the panel library does not run */
} decode_step;

/* The sizes and a few offsets of the structs above, for the Python side to check its ctypes
 * mirrors (kernels/decode.py) against before it fills one. */
void accessory_step_layout(int64_t *out) {
    out[0] = sizeof(step_product);
    out[1] = sizeof(step_layer);
    out[2] = sizeof(decode_step);
    out[3] = offsetof(step_layer, ffn_norm_eps);
    out[4] = offsetof(decode_step, scale);
    out[5] = offsetof(decode_step, head);
    out[6] = offsetof(decode_step, logits);
    out[7] = offsetof(decode_step, cache_rows);
    out[8] = offsetof(decode_step, quant_panels);
    out[9] = offsetof(step_product, expand_from);
}

/* Whether packed product p ran through quant_panels (from p->expand_from rows on, where it runs). */
static int expanded(const decode_step *s, const step_product *p, const float *x, float *y) {
    if (s->quant_panels == NULL || p->expand_from <= 0 || s->rows < p->expand_from) return 0;
    const int kind = p->kind == PRODUCT_INT8 ? 0 : (p->kind == PRODUCT_INT4 ? 1 : 2);
    return s->quant_panels(kind, p->weight, p->scales, p->offsets, x, NULL, s->scratch, y, s->rows, p->out_features,
                           p->in_features, p->group_size) == 0;
}

static void step_product_run(const decode_step *s, const step_product *p, const float *x, float *y) {
    switch (p->kind) {
    case PRODUCT_BF16:
        s->gemv_bf16(p->weight, x, s->scratch, y, s->rows, p->out_features, p->in_features);
        break;
    case PRODUCT_PANELS:
        s->gemv_panels(p->weight, x, s->scratch, y, s->rows, p->out_features, p->in_features);
        break;
    case PRODUCT_INT8:
        if (expanded(s, p, x, y)) break;
        s->gemv_int8(p->weight, p->scales, x, y, 0, s->scratch, s->rows, p->out_features, p->in_features);
        break;
    default:
        if (expanded(s, p, x, y)) break;
        s->gemv_q4(p->weight, p->scales, p->offsets, p->kind == PRODUCT_NF4, x, y, 0, s->scratch, s->rows,
                   p->out_features, p->in_features, p->group_size);
    }
}

/* One decode step, h updated in place (the residual stream in float32):
 *     [h = embedding[tokens]]
 *     per layer:  x = rmsnorm(h);  qkv = Wqkv x;  rotate q, k; write k, v to the cache; attend;
 *                 h += Wo attn;  x = rmsnorm(h);  gu = W13 x;  h += W2 (silu(gate) * up)
 *     [logits = head rmsnorm(h)]
 * One call instead of ten per layer from Python: between two products that stream megabytes of
 * weights, the interpreter's own code and data are out of the caches, and each call from Python
 * cost tens of microseconds (measured in benchmarks/README.md).
 * Returns 0, or -1 with nothing written when a position or a token id is out of range (the
 * caller's torch path then raises the error that explains it). */
int accessory_decode_step(const decode_step *s) {
    const int64_t M = s->rows, D = s->dim;
    for (int64_t m = 0; m < M; ++m)
        if (s->positions[m] < 0 || s->positions[m] >= s->max_len || s->positions[m] >= s->n_rotary) return -1;
    if (s->embedding) {
        for (int64_t m = 0; m < M; ++m)
            if (s->tokens[m] < 0 || s->tokens[m] >= s->vocab_size) return -1;
        for (int64_t m = 0; m < M; ++m) {
            float *row = s->h + m * D;
            if (s->embedding_bf16) {
                const uint16_t *e = (const uint16_t *)s->embedding + s->tokens[m] * D;
                for (int64_t i = 0; i < D; ++i) row[i] = bf16_to_float(e[i]);
            } else {
                memcpy(row, (const float *)s->embedding + s->tokens[m] * D, D * sizeof(float));
            }
        }
    }
    for (int64_t l = 0; l < s->n_layers; ++l) {
        const step_layer *layer = s->layers + l;
        accessory_rmsnorm(s->h, layer->attention_norm, (int)layer->attention_norm_bf16, s->x, M, D,
                          (float)layer->attention_norm_eps);
        step_product_run(s, &layer->qkv, s->x, s->qkv);
        accessory_attend_step(s->qkv, s->positions, s->cos_table, s->sin_table, (int)s->interleaved, s->keys[l],
                              s->values[l], (int)s->kv_bf16, s->attn, M, s->n_heads, s->n_kv_heads, s->head_dim,
                              s->max_len, (float)s->scale, s->cache_rows);
        step_product_run(s, &layer->wo, s->attn, s->out);
        accessory_add(s->h, s->out, M * D);
        accessory_rmsnorm(s->h, layer->ffn_norm, (int)layer->ffn_norm_bf16, s->x, M, D, (float)layer->ffn_norm_eps);
        step_product_run(s, &layer->w13, s->x, s->gate_up);
        accessory_silu_mul(s->gate_up, s->act, M, layer->w2.in_features);
        step_product_run(s, &layer->w2, s->act, s->out);
        accessory_add(s->h, s->out, M * D);
    }
    if (s->logits) {
        accessory_rmsnorm(s->h, s->final_norm, (int)s->final_norm_bf16, s->x, M, D, (float)s->final_norm_eps);
        step_product_run(s, &s->head, s->x, s->logits);
    }
    return 0;
}

/* out[m] = the index of the largest of row m's n floats, the first one on ties, as torch.argmax
 * picks (a NaN counts as the largest: the first NaN's index). torch's own took ~650 us for 16 rows
 * of 32000 logits on 2 threads, ~2% of a 16-stream XS step. */
void accessory_argmax_rows(const float *x, int64_t M, int64_t n, int64_t *out) {
#pragma omp parallel for schedule(static) if (M * n > 65536)
    for (int64_t m = 0; m < M; ++m) {
        const float *row = x + m * n;
        const int64_t n8 = n & ~(int64_t)7;
        if (n <= 0) {
            out[m] = 0;
            continue;
        }
        __m256 top = _mm256_set1_ps(-INFINITY);
        int nan = 0;
        for (int64_t i = 0; i < n8; i += 8) {
            const __m256 v = _mm256_loadu_ps(row + i);
            nan |= _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            top = _mm256_max_ps(top, v);
        }
        float best = -INFINITY;
        float lanes[8];
        _mm256_storeu_ps(lanes, top);
        for (int j = 0; j < 8; ++j) best = lanes[j] > best ? lanes[j] : best;
        for (int64_t i = n8; i < n; ++i) {
            if (row[i] != row[i]) nan = 1;
            else if (row[i] > best) best = row[i];
        }
        int64_t index = 0;
        if (nan) {
            while (row[index] == row[index]) ++index;
        } else {  /* the first block holding the maximum, then its first element equal to it */
            const __m256 want = _mm256_set1_ps(best);
            int64_t i = 0;
            for (; i < n8; i += 8)
                if (_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + i), want, _CMP_EQ_OQ))) break;
            while (row[i] != best) ++i;
            index = i;
        }
        out[m] = index;
    }
}
