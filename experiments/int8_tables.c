/* Would int8 look-up tables get the batch-1 LUT-GEMV past the instruction bound of exact float tables? The loop
 * alone, 3 bits, 11008 x 4096, against the shipped float loop and a memory copy, in one process.
 *
 * float   the shipped loop: per 16 weights one 64-bit window broadcast, vpmultishiftqb, vpermps on the column's
 *         table (8 floats repeated by the broadcast), vaddps; 8 groups of 16 rows per pass.
 * int8    tables of int8 values, 8 columns of 8 entries in one 64-byte register; per 16 rows x 4 columns (64
 *         weights): one 64-byte load of the 24 code bytes, vpermb spreading row pairs' 3 bytes to their 64-bit
 *         lane, vpmultishiftqb to one code per byte, vpternlogd adding the column's slot (8 x column), vpermb
 *         looking 64 values up, vpdpbusd summing each row's 4 values into its int32 lane; every 32 columns the
 *         int32 sums are converted and scaled into float accumulators (one scale per 32 columns). The codes
 *         are tight: row r, column c of a 16 x 4 tile at bits (4 r + c) * 3, so rows 2q and 2q + 1 are bytes
 *         3q .. 3q + 2.
 * Both read the same 16.9 MB of codes. The int8 variant approximates each product C_j[c] x_j to 8 bits of its
 * block's largest: what it costs in accuracy is not measured here.
 * Build and run (AVX-512 with VBMI and VNNI):
 *   gcc -O3 -fopenmp experiments/int8_tables.c -o /tmp/int8_tables && /tmp/int8_tables
 * Prints medians of 51 runs at 1 and 2 threads: ms, ns per 16 weights per thread, GB/s of codes, and the
 * fraction of a 256 MB copy by as many threads (read + write counted) timed right after. */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define T512 __attribute__((target("avx512f,avx512bw,avx512vbmi,avx512vnni")))
#define COLS 4096
#define GROUPS 688 /* 11008 rows */
#define W 3
#define CODE_BYTES ((size_t)GROUPS * COLS * 16 * W / 8)
#define RUNS 51

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int cmp(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static inline uint64_t load64(const void *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

/* ---- float: the shipped layout (per group, per column a 48-bit window of 16 codes), 8 groups per pass ---- */
T512 static void float_pass(const uint8_t *codes, const float *T, float *y, int64_t g) {
    uint8_t c[64] = {0};
    for (int r = 0; r < 16; ++r) c[4 * r] = (uint8_t)(r * W);
    const __m512i ctrl = _mm512_loadu_si512(c);
    const int64_t stride = (int64_t)COLS * W * 2; /* bytes per group */
    const uint8_t *p = codes + g * stride;
    __m512 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < COLS; ++i, p += 2 * W) {
        const __m512 table = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd((const double *)(T + 8 * i))));
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) {
            const __m512i idx = _mm512_multishift_epi64_epi8(ctrl, _mm512_set1_epi64((long long)load64(p + j * stride)));
            acc[j] = _mm512_add_ps(acc[j], _mm512_permutexvar_ps(idx, table));
        }
    }
    for (int j = 0; j < 8; ++j) _mm512_storeu_ps(y + 16 * (g + j), acc[j]);
}

/* ---- int8: per group, per quad of 4 columns 24 bytes; 4 groups per pass ---- */
#define NG 4
T512 static void int8_pass(const uint8_t *codes, const int8_t *Tq, const float *scale, float *y, int64_t g) {
    uint8_t spread[64], shift[64], slot_lo[64], slot_hi[64];
    for (int q = 0; q < 8; ++q)
        for (int b = 0; b < 8; ++b) spread[8 * q + b] = (uint8_t)(3 * q + (b < 3 ? b : 0));
    for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 4; ++c) {
            shift[4 * r + c] = (uint8_t)((((r & 1) * 4 + c) * W));
            slot_lo[4 * r + c] = (uint8_t)(8 * c);       /* columns 0..3 of the table register */
            slot_hi[4 * r + c] = (uint8_t)(8 * (c + 4)); /* columns 4..7 */
        }
    const __m512i vspread = _mm512_loadu_si512(spread), vshift = _mm512_loadu_si512(shift);
    const __m512i vlo = _mm512_loadu_si512(slot_lo), vhi = _mm512_loadu_si512(slot_hi);
    const __m512i seven = _mm512_set1_epi8(7), ones = _mm512_set1_epi8(1);
    const int64_t stride = (int64_t)COLS * W * 2; /* bytes per group */
    const uint8_t *p = codes + g * stride;
    __m512 acc[NG];
    for (int j = 0; j < NG; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t blk = 0; blk < COLS / 32; ++blk) { /* 32 columns share one scale: 4 table registers */
        __m512i sum[NG];
        for (int j = 0; j < NG; ++j) sum[j] = _mm512_setzero_si512();
        for (int t = 0; t < 4; ++t, p += 48) {
            const __m512i table = _mm512_loadu_si512(Tq + 64 * (blk * 4 + t));
#pragma GCC unroll 4
            for (int j = 0; j < NG; ++j) {
                const __m512i raw = _mm512_loadu_si512(p + j * stride);        /* quads 2t, 2t + 1: 48 bytes */
                const __m512i lo = _mm512_permutexvar_epi8(vspread, raw);
                const __m512i hi = _mm512_permutexvar_epi8(_mm512_add_epi8(vspread, _mm512_set1_epi8(24)), raw);
                /* (code & 7) | slot, one vpternlogd: A = code byte, B = 7, C = slot -> (A & B) | C = 0xEA */
                const __m512i ilo = _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(vshift, lo), seven, vlo, 0xEA);
                const __m512i ihi = _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(vshift, hi), seven, vhi, 0xEA);
                sum[j] = _mm512_dpbusd_epi32(sum[j], ones, _mm512_permutexvar_epi8(ilo, table));
                sum[j] = _mm512_dpbusd_epi32(sum[j], ones, _mm512_permutexvar_epi8(ihi, table));
            }
        }
        const __m512 s = _mm512_set1_ps(scale[blk]);
        for (int j = 0; j < NG; ++j) acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[j]), s, acc[j]);
    }
    for (int j = 0; j < NG; ++j) _mm512_storeu_ps(y + 16 * (g + j), acc[j]);
}

/* median of 5 copies of 256 MB by `threads` threads, each copying its contiguous share */
static double copy_gbps(int threads) {
    const size_t n = 256u << 20, share = n / threads;
    char *a = malloc(n), *b = malloc(n);
    memset(a, 1, n);
    memset(b, 2, n);
    double best[5];
    for (int k = 0; k < 5; ++k) {
        const double t0 = now();
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int i = 0; i < threads; ++i) memcpy(b + i * share, a + i * share, share);
        best[k] = 2.0 * n / (now() - t0) / 1e9;
    }
    free(a);
    free(b);
    qsort(best, 5, sizeof(double), cmp);
    return best[2];
}

int main(void) {
    uint8_t *codes = malloc(CODE_BYTES + 128);
    float *T = malloc(sizeof(float) * 8 * COLS), *y = malloc(sizeof(float) * 16 * GROUPS);
    int8_t *Tq = malloc(8 * COLS);
    float *scale = malloc(sizeof(float) * COLS / 32);
    srand(1);
    for (size_t i = 0; i < CODE_BYTES + 128; ++i) codes[i] = (uint8_t)rand();
    for (int i = 0; i < 8 * COLS; ++i) {
        T[i] = (float)(i % 8) * 0.001f;
        Tq[i] = (int8_t)(i % 8 - 4);
    }
    for (int i = 0; i < COLS / 32; ++i) scale[i] = 0.01f;
    for (int threads = 1; threads <= 2; ++threads) {
        for (int v = 0; v < 2; ++v) {
            double t[RUNS];
            for (int rep = 0; rep < RUNS; ++rep) {
                const double t0 = now();
                if (v == 0) {
#pragma omp parallel for num_threads(threads) schedule(static)
                    for (int g = 0; g < GROUPS; g += 8) float_pass(codes, T, y, g);
                } else {
#pragma omp parallel for num_threads(threads) schedule(static)
                    for (int g = 0; g < GROUPS; g += NG) int8_pass(codes, Tq, scale, y, g);
                }
                t[rep] = now() - t0;
            }
            qsort(t, RUNS, sizeof(double), cmp);
            const double med = t[RUNS / 2], copy = copy_gbps(threads);
            printf("%d thread(s) %-5s %.3f ms  %.3f ns per 16 weights per thread  %.1f GB/s of codes  %.0f%% of copy (%.1f GB/s)\n",
                   threads, v ? "int8" : "float", med * 1e3, med * threads / ((double)GROUPS * COLS) * 1e9,
                   CODE_BYTES / med / 1e9, 100.0 * CODE_BYTES / med / 1e9 / copy, copy);
        }
    }
    return (int)y[0] & 0;
}
