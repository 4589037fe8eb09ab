/* Throughput of the batch-1 LUT-GEMV's per-16-weight instructions on their own, in cycles, to see the floor of
 * any loop built from them: vpmultishiftqb (decode 16 codes), vpermps (look 16 values up), vaddps (accumulate),
 * vpsrld (the shift a "sliced" layout would decode with), alone and mixed. Eight independent copies per step,
 * no loads and no dependencies between steps except each vaddps on its own accumulator (8 chains). Cycles are
 * derived from a dependent chain of scalar adds (1 per cycle), timed first.
 * Build and run (AVX-512 with VBMI):
 *   gcc -O3 experiments/op_throughput.c -o /tmp/op_throughput && /tmp/op_throughput */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define R8(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#define DECL(k) __m512 v##k; __m512i w##k; __m512 a##k = _mm512_set1_ps(k);
#define PERM(k) __asm__ volatile("vpermps %1, %2, %0" : "=v"(v##k) : "v"(table), "v"(idx));
#define MS(k) __asm__ volatile("vpmultishiftqb %1, %2, %0" : "=v"(w##k) : "v"(ctrl), "v"(idx));
#define ADD(k) __asm__ volatile("vaddps %1, %0, %0" : "+v"(a##k) : "v"(table));
#define SRL(k) __asm__ volatile("vpsrld $3, %1, %0" : "=v"(w##k) : "v"(idx));
#define PM(k) PERM(k) MS(k)
#define PA(k) PERM(k) ADD(k)
#define PMA(k) PERM(k) MS(k) ADD(k)
#define PSA(k) PERM(k) SRL(k) ADD(k)
#define RUN(name, BODY)                                                                                          \
    {                                                                                                            \
        const double t0 = now();                                                                                 \
        for (long i = 0; i < steps; ++i) { R8(BODY) }                                                           \
        printf("%-32s %.3f cycles per 16 weights\n", name, (now() - t0) * ghz * 1e9 / (steps * 8.0));           \
    }

__attribute__((target("avx512f,avx512bw,avx512vbmi"))) int main(void) {
    const long chain = 1000000000, steps = 100000000;
    long a = 0;
    double t0 = now();
    for (long i = 0; i < chain; ++i) __asm__ volatile("add $1, %0" : "+r"(a));
    const double ghz = chain / (now() - t0) / 1e9;
    printf("clock from a scalar add chain: %.2f GHz\n", ghz);
    R8(DECL)
    const __m512i idx = _mm512_set1_epi32(3), ctrl = _mm512_set1_epi8(3);
    const __m512 table = _mm512_set1_ps(1.0f);
    RUN("vpermps (look-up)", PERM)
    RUN("vpmultishiftqb (decode)", MS)
    RUN("vaddps (accumulate)", ADD)
    RUN("vpsrld (sliced decode)", SRL)
    RUN("look-up + decode", PM)
    RUN("look-up + accumulate", PA)
    RUN("look-up + decode + accumulate", PMA)
    RUN("look-up + shift + accumulate", PSA)
    float s = 0;
#define SUM(k) s += v##k[0] + w##k[0] + a##k[0];
    R8(SUM)
    return (int)s & 0;
}
