/* Dense float32 kernels of the engine (engine.c): the products of float layers and of dequantized tiles, and the
 * vector pieces of attention and the MLP. One table per ISA (dense.c), chosen with the LUT kernels' ISA code. */
#ifndef CMPQ_DENSE_H
#define CMPQ_DENSE_H
#include "cmpq_kernels.h"

/* tokens per GEMM micro-tile: the engine pads its token buffers to a multiple of it (zero rows) */
#define GEMM_TOKENS 6
/* weight rows per GEMM strip: one tile of cols x STRIP floats per thread */
#define STRIP 64

typedef struct {
    /* y[r] = W[r, :] . x for rows [r0, r1) of a row-major (rows, cols) weight */
    void (*gemv)(const float *W, int64_t cols, const float *x, float *y, int64_t r0, int64_t r1);
    /* C[t, r] = sum_i A[t, i] B[i, r] for t < n (a multiple of GEMM_TOKENS) and r < nr (<= STRIP): A (n, k) with
     * row stride lda, B a (k, STRIP) tile (row stride ldb), C with row stride ldc */
    void (*gemm)(const float *A, int64_t lda, int64_t n, const float *B, int64_t ldb, int64_t k, int64_t nr,
                 float *C, int64_t ldc);
    /* y[r] = sum_i a[i] B[i, r] for r < nr (<= STRIP), i < k: one token's row times a (k, nr) tile */
    void (*vecmat)(const float *a, int64_t k, const float *B, int64_t ldb, int64_t nr, float *y);
    /* x = exp(x - m) in place; returns their sum */
    float (*exp_sum)(float *x, int64_t n, float m);
    /* g = silu(g) * u */
    void (*silu_mul)(float *g, const float *u, int64_t n);
} dense_kernels_t;

CMPQ_HIDDEN const dense_kernels_t *dense_kernels_for(int isa);

#endif /* CMPQ_DENSE_H */
