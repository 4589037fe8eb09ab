/* Microbenchmark of the batch-1 LUT-GEMV inner loop on its own (no tables to build, no outliers, no Python), to
 * see what bounds it. A 3-bit layer of 11008 x 4096 in the row-packed layout of the kernels (16-row groups, a
 * 48-bit window per column), four groups per pass, one float32 accumulator per group. Variants:
 *   mask      decode (vpmultishiftqb), AND with 7, vpermps on an 8-entry table, add   (an earlier loop)
 *   repeated  decode, vpermps on the table repeated to 16 entries (no AND), add       (the loop the kernels use)
 *   bf16      two groups per vector of 32 bf16 indices: decode, vpermw on a bf16 table repeated to 32 entries,
 *             two vdpbf16ps into even/odd-row accumulators, 8 accumulators (an approximate alternative)
 *   bcst      as repeated, the window's broadcast load folded into vpmultishiftqb ({1to8} memory operand)
 *   decode    load, decode, add (no look-up: the cost of the rest)
 *   load      load, add (the floor)
 * Build and run (AVX-512 with VBMI and BF16 needed):
 *   gcc -O3 -fopenmp experiments/lut_loop.c -o /tmp/lut_loop && /tmp/lut_loop
 * Prints the best of 100 runs per variant, at 1 and 2 threads, in ns per 16 weights and GB/s of codes. */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define T512 __attribute__((target("avx512f,avx512bw,avx512vbmi,avx512bf16")))
#define COLS 4096
#define GROUPS 688 /* 11008 rows */
#define W 3
enum { MASK, REPEATED, BF16, DECODE, LOAD, BCST, VARIANTS };
static const char *NAMES[] = {"mask", "repeated", "bf16", "decode", "load", "bcst"};

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* control bytes: row r's code starts at bit r * W of the window; `stride` bytes per index lane */
T512 static __m512i control(int stride) {
    uint8_t c[64] = {0};
    for (int r = 0; r < 64 / stride; ++r) c[stride * r] = (uint8_t)((r & 15) * W);
    return _mm512_loadu_si512(c);
}

static inline uint64_t load64(const uint16_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

T512 static inline __attribute__((always_inline)) void pass(const uint16_t *p, const float *T, const uint16_t *Tb,
                                                            float *y, const int variant) {
    const int64_t words = (int64_t)W * COLS;
    const __m512i ctrl = control(4), ctrlw = control(2), low = _mm512_set1_epi32(7);
    const __m512i ones_even = _mm512_set1_epi32(0x00003F80), ones_odd = _mm512_set1_epi32(0x3F800000);
    __m512 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm512_setzero_ps();
    if (variant == BF16) {  /* two columns per step, each into its own 4 accumulators (vdpbf16ps latency) */
        for (int64_t i = 0; i < COLS; i += 2, p += 2 * W)
            for (int h = 0; h < 2; ++h) {
                const __m512i table = _mm512_loadu_si512(Tb + 32 * ((i + h) & 2047));
                for (int j = 0; j < 4; j += 2) {
                    const __m512i win = _mm512_mask_set1_epi64(_mm512_set1_epi64((long long)load64(p + h * W + j * words)),
                                                               0xF0, (long long)load64(p + h * W + (j + 1) * words));
                    const __m512i v = _mm512_permutexvar_epi16(_mm512_multishift_epi64_epi8(ctrlw, win), table);
                    acc[4 * h + j] = _mm512_dpbf16_ps(acc[4 * h + j], (__m512bh)v, (__m512bh)ones_even);
                    acc[4 * h + j + 1] = _mm512_dpbf16_ps(acc[4 * h + j + 1], (__m512bh)v, (__m512bh)ones_odd);
                }
            }
        for (int j = 0; j < 4; ++j) _mm512_storeu_ps(y + 16 * j, _mm512_add_ps(acc[j], acc[j + 4]));
        return;
    }
    for (int64_t i = 0; i < COLS; ++i, p += W) {
        const __m512 table = _mm512_loadu_ps(T + 16 * (i & 1023));
        for (int j = 0; j < 4; ++j) {
            const __m512i win = _mm512_set1_epi64((long long)load64(p + j * words));
            __m512 v;
            if (variant == MASK) v = _mm512_permutexvar_ps(_mm512_and_si512(_mm512_multishift_epi64_epi8(ctrl, win), low), table);
            else if (variant == REPEATED) v = _mm512_permutexvar_ps(_mm512_multishift_epi64_epi8(ctrl, win), table);
            else if (variant == BCST) {
                __m512i idx;
                __asm__("vpmultishiftqb %2%{1to8%}, %1, %0" : "=v"(idx) : "v"(ctrl), "m"(*(const uint64_t *)(p + j * words)));
                v = _mm512_permutexvar_ps(idx, table);
            }
            else if (variant == DECODE) v = _mm512_castsi512_ps(_mm512_multishift_epi64_epi8(ctrl, win));
            else v = _mm512_castsi512_ps(win);
            acc[j] = _mm512_add_ps(acc[j], v);
        }
    }
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(y + 16 * j, _mm512_add_ps(acc[j], acc[j + 4]));
}

#define RUN(V)                                                                                                     \
    T512 __attribute__((noinline)) static void run_##V(const uint16_t *codes, const float *T, const uint16_t *Tb, \
                                                       float *y, int threads) {                                   \
        _Pragma("omp parallel for num_threads(threads) schedule(static)") for (int g = 0; g < GROUPS; g += 4)      \
            pass(codes + (int64_t)g * W * COLS, T, Tb, y + 16 * g, V);                                             \
    }
RUN(MASK)
RUN(REPEATED)
RUN(BF16)
RUN(DECODE)
RUN(LOAD)
RUN(BCST)
typedef void (*run_t)(const uint16_t *, const float *, const uint16_t *, float *, int);
static const run_t RUNS[] = {run_MASK, run_REPEATED, run_BF16, run_DECODE, run_LOAD, run_BCST};

int main(void) {
    const size_t n = (size_t)GROUPS * W * COLS + 8;
    uint16_t *codes = malloc(n * 2), *Tb = malloc(2048 * 32 * 2);
    float *T = malloc(1024 * 16 * 4), *y = malloc(GROUPS * 16 * 4);
    srand(1);
    for (size_t i = 0; i < n; ++i) codes[i] = (uint16_t)rand();
    for (int i = 0; i < 1024 * 16; ++i) T[i] = (float)(i % 8) * 0.001f;
    for (int i = 0; i < 2048 * 32; ++i) Tb[i] = (uint16_t)(0x3A80 + i % 8);
    for (int threads = 1; threads <= 2; ++threads)
        for (int v = 0; v < VARIANTS; ++v) {
            double best = 1e9;
            for (int rep = 0; rep < 100; ++rep) {
                const double t0 = now();
                RUNS[v](codes, T, Tb, y, threads);
                const double dt = now() - t0;
                if (dt < best) best = dt;
            }
            printf("%d thread(s) %-9s %.3f ms  %.3f ns per 16 weights per thread  %.1f GB/s of codes\n", threads,
                   NAMES[v], best * 1e3, best * threads / ((double)GROUPS * COLS) * 1e9, n * 2 / best / 1e9);
        }
    return (int)y[0] & 0;
}
