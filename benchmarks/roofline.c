/* The machine's own limits, for benchmarks/roofline.py: how fast two threads read memory, and how
 * many float32 multiply-adds the AVX2 FMA units retire, with nothing else in the loop. */
#include <immintrin.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Sum of n bytes (a multiple of 64) read as 256-bit loads by every OpenMP thread over its static
 * share, each line prefetched 1 KB ahead when `prefetch` is set (as gemv_bf16.c's one-row form
 * prefetches its weights; gemv_bf16_avx512.c's leaves them to the hardware prefetchers). */
double roofline_read(const uint8_t *p, int64_t n, int prefetch) {
    double total = 0;
#pragma omp parallel reduction(+ : total)
    {
        __m256i acc = _mm256_setzero_si256();
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; i += 64) {
            if (prefetch) _mm_prefetch((const char *)p + i + 1024, _MM_HINT_T0);
            acc = _mm256_add_epi32(acc, _mm256_loadu_si256((const __m256i *)(p + i)));
            acc = _mm256_add_epi32(acc, _mm256_loadu_si256((const __m256i *)(p + i + 32)));
        }
        int32_t lanes[8];
        _mm256_storeu_si256((__m256i *)lanes, acc);
        for (int k = 0; k < 8; ++k) total += lanes[k];
    }
    return total;
}

/* The number of threads of the enclosing parallel region (1 without OpenMP). */
static int team_size(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* `iters` rounds of 12 independent 8-lane FMAs per thread, in registers. The accumulators start
 * apart, so the compiler cannot merge them; their sum is returned so none is dropped. Returns the
 * sum; the caller counts iters * 12 * 8 * 2 FLOPs per thread. */
double roofline_fma(int64_t iters, float a, float b, int *threads) {
    double total = 0;
    int used = 1;
#pragma omp parallel reduction(+ : total)
    {
#pragma omp single
        used = team_size();
        const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
        __m256 acc[12];
        for (int k = 0; k < 12; ++k) acc[k] = _mm256_set1_ps(0.001f * (float)(k + 1));
        for (int64_t i = 0; i < iters; ++i)
            for (int k = 0; k < 12; ++k) acc[k] = _mm256_fmadd_ps(acc[k], va, vb);
        float lanes[8];
        __m256 sum = acc[0];
        for (int k = 1; k < 12; ++k) sum = _mm256_add_ps(sum, acc[k]);
        _mm256_storeu_ps(lanes, sum);
        for (int k = 0; k < 8; ++k) total += lanes[k];
    }
    *threads = used;
    return total;
}

/* The same with AVX512-BF16's dot products (32 bf16 multiply-adds each, into 16 float32 lanes):
 * the peak of accessory/kernels/gemv_bf16_avx512.c. Built for that instruction set whatever the
 * file's flags; call it only where the CPU has it. The caller counts iters * 12 * 32 * 2 FLOPs
 * per thread. */
__attribute__((target("avx512f,avx512bw,avx512bf16"))) double roofline_dpbf16(int64_t iters, int *threads) {
    double total = 0;
    int used = 1;
#pragma omp parallel reduction(+ : total)
    {
#pragma omp single
        used = team_size();
        const __m512bh one = (__m512bh)_mm512_set1_epi16(0x3f80), tiny = (__m512bh)_mm512_set1_epi16(0x3a83);
        __m512 acc[12];
        for (int k = 0; k < 12; ++k) acc[k] = _mm512_set1_ps(0.001f * (float)(k + 1));
        for (int64_t i = 0; i < iters; ++i)
            for (int k = 0; k < 12; ++k) acc[k] = _mm512_dpbf16_ps(acc[k], one, tiny);
        __m512 sum = acc[0];
        for (int k = 1; k < 12; ++k) sum = _mm512_add_ps(sum, acc[k]);
        total += _mm512_reduce_add_ps(sum);
    }
    *threads = used;
    return total;
}
