/* Dense float32 kernels of the engine, per ISA (portable C, AVX2 + FMA, AVX-512F): GEMV of float layers (decode),
 * a register-blocked GEMM over transposed tiles (prefill: the tiles are dequantized CMPQ rows or transposed float
 * rows, STRIP rows wide; attention's scores and weighted values too), one token's row times a tile, exp and SiLU.
 *
 * exp is Cephes' single-precision polynomial after reduction by ln 2 (about 1 ulp), the same on every ISA; the
 * scalar tails use libm's expf. SiLU is g / (1 + exp(-g)), as torch computes it. */
#include "dense.h"

#include <math.h>

/* ---- portable ---- */

static void gemv_c(const float *W, int64_t cols, const float *x, float *y, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
        const float *w = W + r * cols;
        float s = 0.0f;
        for (int64_t c = 0; c < cols; ++c) s += w[c] * x[c];
        y[r] = s;
    }
}

static void gemm_c(const float *A, int64_t lda, int64_t n, const float *B, int64_t ldb, int64_t k, int64_t nr,
                   float *C, int64_t ldc) {
    for (int64_t t = 0; t < n; ++t) {
        float *c = C + t * ldc;
        for (int64_t r = 0; r < nr; ++r) c[r] = 0.0f;
        for (int64_t i = 0; i < k; ++i) {
            const float a = A[t * lda + i];
            const float *b = B + i * ldb;
            for (int64_t r = 0; r < nr; ++r) c[r] += a * b[r];
        }
    }
}

static void vecmat_c(const float *a, int64_t k, const float *B, int64_t ldb, int64_t nr, float *y) {
    for (int64_t r = 0; r < nr; ++r) y[r] = 0.0f;
    for (int64_t i = 0; i < k; ++i)
        for (int64_t r = 0; r < nr; ++r) y[r] += a[i] * B[i * ldb + r];
}

static float exp_sum_c(float *x, int64_t n, float m) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; ++i) s += (x[i] = expf(x[i] - m));
    return s;
}

static void silu_mul_c(float *g, const float *u, int64_t n) {
    for (int64_t i = 0; i < n; ++i) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

static const dense_kernels_t portable_dense = {gemv_c, gemm_c, vecmat_c, exp_sum_c, silu_mul_c};

#ifdef CMPQ_X86
#define EXP_HI 88.0f
#define EXP_LO -87.0f
#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693359375f
#define LN2_LO -2.12194440e-4f
#define P0 1.9875691500E-4f
#define P1 1.3981999507E-3f
#define P2 8.3334519073E-3f
#define P3 4.1665795894E-2f
#define P4 1.6666665459E-1f
#define P5 5.0000001201E-1f

/* ---- AVX2 + FMA ---- */

T256 static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(EXP_HI)), _mm256_set1_ps(EXP_LO));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    __m256 p = _mm256_set1_ps(P0);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P5));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

T256 static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* lanes [0, n) of a ymm mask */
T256 static inline __m256i lanes256(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

T256 static void gemv256(const float *W, int64_t cols, const float *x, float *y, int64_t r0, int64_t r1) {
    const int64_t full = cols & ~(int64_t)7;
    const __m256i tail = lanes256(cols - full);
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
        const float *w = W + r * cols;
        __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t c = 0; c < full; c += 8) {
            const __m256 xv = _mm256_loadu_ps(x + c);
            for (int j = 0; j < 4; ++j) a[j] = _mm256_fmadd_ps(_mm256_loadu_ps(w + j * cols + c), xv, a[j]);
        }
        if (full < cols) {
            const __m256 xv = _mm256_maskload_ps(x + full, tail);
            for (int j = 0; j < 4; ++j)
                a[j] = _mm256_fmadd_ps(_mm256_maskload_ps(w + j * cols + full, tail), xv, a[j]);
        }
        for (int j = 0; j < 4; ++j) y[r + j] = hsum256(a[j]);
    }
    for (; r < r1; ++r) {
        const float *w = W + r * cols;
        __m256 a = _mm256_setzero_ps();
        for (int64_t c = 0; c < full; c += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(w + c), _mm256_loadu_ps(x + c), a);
        if (full < cols) a = _mm256_fmadd_ps(_mm256_maskload_ps(w + full, tail), _mm256_maskload_ps(x + full, tail), a);
        y[r] = hsum256(a);
    }
}

/* 6 tokens x NV * 8 rows from column 0 of B: 12 accumulators at most */
T256 static inline AI void micro256(const float *A, int64_t lda, const float *B, int64_t ldb, int64_t k, float *C,
                                    int64_t ldc, int64_t nr, const int NV) {
    __m256 acc[GEMM_TOKENS][2];
    for (int t = 0; t < GEMM_TOKENS; ++t)
        for (int v = 0; v < NV; ++v) acc[t][v] = _mm256_setzero_ps();
    for (int64_t i = 0; i < k; ++i) {
        __m256 b[2];
        for (int v = 0; v < NV; ++v) b[v] = _mm256_loadu_ps(B + i * ldb + 8 * v);
        for (int t = 0; t < GEMM_TOKENS; ++t) {
            const __m256 a = _mm256_broadcast_ss(A + t * lda + i);
            for (int v = 0; v < NV; ++v) acc[t][v] = _mm256_fmadd_ps(a, b[v], acc[t][v]);
        }
    }
    for (int v = 0; v < NV; ++v) {
        const __m256i m = lanes256(nr - 8 * v);
        for (int t = 0; t < GEMM_TOKENS; ++t) _mm256_maskstore_ps(C + t * ldc + 8 * v, m, acc[t][v]);
    }
}

T256 static void gemm256(const float *A, int64_t lda, int64_t n, const float *B, int64_t ldb, int64_t k, int64_t nr,
                         float *C, int64_t ldc) {
    for (int64_t r = 0; r < nr; r += 16) {
        const int64_t left = nr - r;
        for (int64_t t = 0; t < n; t += GEMM_TOKENS) {
            if (left > 8) micro256(A + t * lda, lda, B + r, ldb, k, C + t * ldc + r, ldc, left, 2);
            else micro256(A + t * lda, lda, B + r, ldb, k, C + t * ldc + r, ldc, left, 1);
        }
    }
}

T256 static void vecmat256(const float *a, int64_t k, const float *B, int64_t ldb, int64_t nr, float *y) {
    for (int64_t r = 0; r < nr; r += 32) {
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        const int64_t nv = nr - r >= 32 ? 4 : (nr - r + 7) / 8;
        for (int64_t i = 0; i < k; ++i) {
            const __m256 av = _mm256_broadcast_ss(a + i);
            for (int64_t v = 0; v < nv; ++v)
                acc[v] = _mm256_fmadd_ps(av, _mm256_loadu_ps(B + i * ldb + r + 8 * v), acc[v]);
        }
        for (int64_t v = 0; v < nv; ++v) _mm256_maskstore_ps(y + r + 8 * v, lanes256(nr - r - 8 * v), acc[v]);
    }
}

T256 static float exp_sum256(float *x, int64_t n, float m) {
    const __m256 mv = _mm256_set1_ps(m);
    __m256 s = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv));
        _mm256_storeu_ps(x + i, e);
        s = _mm256_add_ps(s, e);
    }
    float total = hsum256(s);
    for (; i < n; ++i) total += (x[i] = expf(x[i] - m));
    return total;
}

T256 static void silu_mul256(float *g, const float *u, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, exp256(_mm256_sub_ps(zero, gv))));
        _mm256_storeu_ps(g + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
    }
    for (; i < n; ++i) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

static const dense_kernels_t avx2_dense = {gemv256, gemm256, vecmat256, exp_sum256, silu_mul256};

/* ---- AVX-512F ---- */
#define T512F __attribute__((target("avx512f")))

T512F static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(EXP_HI)), _mm512_set1_ps(EXP_LO));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    __m512 p = _mm512_set1_ps(P0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P5));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

static inline __mmask16 lanes512(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

T512F static void gemv512(const float *W, int64_t cols, const float *x, float *y, int64_t r0, int64_t r1) {
    const int64_t full = cols & ~(int64_t)15;
    const __mmask16 tail = lanes512(cols - full);
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
        const float *w = W + r * cols;
        __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t c = 0; c < full; c += 16) {
            const __m512 xv = _mm512_loadu_ps(x + c);
            for (int j = 0; j < 4; ++j) a[j] = _mm512_fmadd_ps(_mm512_loadu_ps(w + j * cols + c), xv, a[j]);
        }
        if (full < cols) {
            const __m512 xv = _mm512_maskz_loadu_ps(tail, x + full);
            for (int j = 0; j < 4; ++j)
                a[j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w + j * cols + full), xv, a[j]);
        }
        for (int j = 0; j < 4; ++j) y[r + j] = _mm512_reduce_add_ps(a[j]);
    }
    for (; r < r1; ++r) {
        const float *w = W + r * cols;
        __m512 a = _mm512_setzero_ps();
        for (int64_t c = 0; c < full; c += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(w + c), _mm512_loadu_ps(x + c), a);
        if (full < cols)
            a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, w + full), _mm512_maskz_loadu_ps(tail, x + full), a);
        y[r] = _mm512_reduce_add_ps(a);
    }
}

/* 6 tokens x NV * 16 rows: 24 accumulators at most, B loaded once per column for the 6 tokens */
T512F static inline AI void micro512(const float *A, int64_t lda, const float *B, int64_t ldb, int64_t k, float *C,
                                     int64_t ldc, int64_t nr, const int NV) {
    __m512 acc[GEMM_TOKENS][4];
    for (int t = 0; t < GEMM_TOKENS; ++t)
        for (int v = 0; v < NV; ++v) acc[t][v] = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; ++i) {
        __m512 b[4];
        for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(B + i * ldb + 16 * v);
        for (int t = 0; t < GEMM_TOKENS; ++t) {
            const __m512 a = _mm512_set1_ps(A[t * lda + i]);
            for (int v = 0; v < NV; ++v) acc[t][v] = _mm512_fmadd_ps(a, b[v], acc[t][v]);
        }
    }
    for (int v = 0; v < NV; ++v) {
        const __mmask16 m = lanes512(nr - 16 * v);
        for (int t = 0; t < GEMM_TOKENS; ++t) _mm512_mask_storeu_ps(C + t * ldc + 16 * v, m, acc[t][v]);
    }
}

T512F static void gemm512(const float *A, int64_t lda, int64_t n, const float *B, int64_t ldb, int64_t k, int64_t nr,
                          float *C, int64_t ldc) {
    const int64_t nv = (nr + 15) / 16;
    for (int64_t t = 0; t < n; t += GEMM_TOKENS) {
        const float *a = A + t * lda;
        float *c = C + t * ldc;
        switch (nv) {
            case 4: micro512(a, lda, B, ldb, k, c, ldc, nr, 4); break;
            case 3: micro512(a, lda, B, ldb, k, c, ldc, nr, 3); break;
            case 2: micro512(a, lda, B, ldb, k, c, ldc, nr, 2); break;
            default: micro512(a, lda, B, ldb, k, c, ldc, nr, 1); break;
        }
    }
}

T512F static void vecmat512(const float *a, int64_t k, const float *B, int64_t ldb, int64_t nr, float *y) {
    for (int64_t r = 0; r < nr; r += 64) {
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        const int64_t nv = nr - r >= 64 ? 4 : (nr - r + 15) / 16;
        for (int64_t i = 0; i < k; ++i) {
            const __m512 av = _mm512_set1_ps(a[i]);
            for (int64_t v = 0; v < nv; ++v)
                acc[v] = _mm512_fmadd_ps(av, _mm512_loadu_ps(B + i * ldb + r + 16 * v), acc[v]);
        }
        for (int64_t v = 0; v < nv; ++v) _mm512_mask_storeu_ps(y + r + 16 * v, lanes512(nr - r - 16 * v), acc[v]);
    }
}

T512F static float exp_sum512(float *x, int64_t n, float m) {
    const __m512 mv = _mm512_set1_ps(m);
    __m512 s = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = lanes512(n - i);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), mv));
        _mm512_mask_storeu_ps(x + i, k, e);
        s = _mm512_add_ps(s, _mm512_maskz_mov_ps(k, e));
    }
    return _mm512_reduce_add_ps(s);
}

T512F static void silu_mul512(float *g, const float *u, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = lanes512(n - i);
        const __m512 gv = _mm512_maskz_loadu_ps(k, g + i);
        const __m512 s = _mm512_div_ps(gv, _mm512_add_ps(one, exp512(_mm512_sub_ps(zero, gv))));
        _mm512_mask_storeu_ps(g + i, k, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(k, u + i)));
    }
}

static const dense_kernels_t avx512_dense = {gemv512, gemm512, vecmat512, exp_sum512, silu_mul512};
#endif

/* the dense kernels that go with LUT ISA code `isa` (-1: the best), NULL where this CPU lacks it */
const dense_kernels_t *dense_kernels_for(int isa) {
    if (isa < 0) isa = cmpq_best_isa();
    if (!cmpq_isa_supported(isa)) return NULL;
#ifdef CMPQ_X86
    if (isa == 2) return &avx512_dense;
    if (isa == 1) return &avx2_dense;
#endif
    return &portable_dense;
}
