/* Int8-table kernel for AVX-512 with VBMI and VNNI (one token; the definition of int8 tables: cmpq_kernels.h).
 *
 * A 64-byte vpermb table holds 64 / 2^w columns, and per 16 rows x 4 columns (64 weights) the loop does one
 * vpermb spreading the codes (rows 2q and 2q + 1 of the 4 columns, w bytes, to 64-bit lane q), one vpmultishiftqb
 * (one code per byte), one vpternlogd (mask and column slot), one vpermb look-up and one vpdpbusd (each row's 4
 * values summed into its int32 lane): about 1.3 instructions per 16 weights against 3 for float tables
 * (benchmarks/microbench/int8_tables.c). Its codes (codes8, made by cmpq/kernels/native.py, pack_quads): per 16-row
 * group, for each run of width w <= 4 in stored order, ceil(n / 4) quads of 8 w bytes, column c of a quad and row
 * r at bits (4 r + c) w; `stride8` bytes per group, plus 64 bytes of padding at the end. Columns wider than 4 bits
 * go through the float-table segments of avx512.h. x86 only. */
#include "avx512.h"

#ifdef CMPQ_X86
/* int8 tables and scales of blocks [b0, b1) of run k's blocks (first stored column a, n columns, width w) */
T512I void build_int8_run(const layer_t *L, const float *x, const float *amax, int64_t a, int64_t n, int w,
                          int8_t *T8, float *scales, int64_t b0, int64_t b1) {
    const int entries = 1 << w;
    for (int64_t b = b0; b < b1; ++b) {
        int64_t first, m;
        const float top = int8_block_top(L, x, amax, a, n, b, &first, &m);
        const float inv = top > 0.0f ? 127.0f / top : 0.0f;
        scales[b] = top / 127.0f;
        int8_t *t = T8 + b * int8_block_bytes(w, 2);
        const __mmask16 lanes = (__mmask16)((1u << entries) - 1);
        const __m512 vinv = _mm512_set1_ps(inv);
        const __m512i hi = _mm512_set1_epi32(127), lo = _mm512_set1_epi32(-127);
        for (int64_t s = 0; s < INT8_BLOCK; ++s) {
            if (s >= m) {
                memset(t + s * entries, 0, (size_t)entries);
                continue;
            }
            const __m512 prod = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, L->codebooks + L->cb_offset[first + s]),
                                              _mm512_set1_ps(x[L->order[first + s]]));
            /* nearest, ties to even (the MXCSR default), as torch.round in the reference */
            const __m512i q = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(prod, vinv)), hi), lo);
            _mm512_mask_cvtepi32_storeu_epi8(t + s * entries, lanes, q);
        }
    }
}

/* One run of n columns of width W <= 4 for NG groups: p8 at the run's codes in the first group (stride8 bytes per
 * group), T8 / scales at the run's first block. */
T512I static inline AI void seg_int8(const int8_t *T8, const float *scales, int64_t n, const uint8_t *p8,
                                     int64_t stride8, __m512 acc[8], const int NG, const int W) {
    uint8_t spread[64], shift[64], slot[64];
    for (int q = 0; q < 8; ++q)
        for (int b = 0; b < 8; ++b) spread[8 * q + b] = (uint8_t)(q * W + (b < W ? b : 0));
    for (int r = 0; r < GROUP; ++r)
        for (int c = 0; c < 4; ++c) {
            shift[4 * r + c] = (uint8_t)(((r & 1) * 4 + c) * W);
            slot[4 * r + c] = (uint8_t)(c << W);
        }
    const __m512i vspread = _mm512_loadu_si512(spread), vshift = _mm512_loadu_si512(shift);
    const __m512i vslot = _mm512_loadu_si512(slot), mask = _mm512_set1_epi8((char)((1 << W) - 1));
    const __m512i ones = _mm512_set1_epi8(1);
    const int per_table = 16 >> W;  /* quads per 64-byte table register */
    const int64_t quads = (n + 3) / 4;
    for (int64_t q0 = 0, b = 0; q0 < quads; q0 += INT8_BLOCK / 4, ++b) {
        __m512i sum[4];
#pragma GCC unroll 4
        for (int j = 0; j < NG; ++j) sum[j] = _mm512_setzero_si512();
        const int64_t q1 = q0 + INT8_BLOCK / 4 < quads ? q0 + INT8_BLOCK / 4 : quads;
        for (int64_t q = q0; q < q1; ++q) {
            const int64_t in_block = q - q0;
            const __m512i table = _mm512_loadu_si512(T8 + b * int8_block_bytes(W, 2) + (in_block / per_table) * 64);
            const __m512i vs = _mm512_add_epi8(vslot, _mm512_set1_epi8((char)((in_block % per_table) * (4 << W))));
            const uint8_t *p = p8 + q * 8 * W;
#pragma GCC unroll 4
            for (int j = 0; j < NG; ++j) {
                const __m512i codes = _mm512_permutexvar_epi8(vspread, _mm512_loadu_si512(p + j * stride8));
                /* (code & mask) | slot: A = codes, B = mask, C = slot -> (A & B) | C = 0xEA */
                const __m512i idx = _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(vshift, codes), mask, vs, 0xEA);
                sum[j] = _mm512_dpbusd_epi32(sum[j], ones, _mm512_permutexvar_epi8(idx, table));
            }
        }
        const __m512 s = _mm512_set1_ps(scales[b]);
#pragma GCC unroll 4
        for (int j = 0; j < NG; ++j) acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[j]), s, acc[j]);
    }
}

/* groups [g, g + NG), one token: narrow runs from int8 tables, wider ones from the float tables T */
T512I static inline AI void gemv1_int8(const layer_t *L, const int8_view_t *V, const float *T, float *y, int64_t g,
                                       const int NG) {
    __m512 acc[8];
#pragma GCC unroll 4
    for (int j = 0; j < NG; ++j) acc[j] = _mm512_setzero_ps();
    const uint16_t *p = L->codes + g * L->words;
    const uint8_t *p8 = V->codes8 + g * V->stride8;
    for (int64_t k = 0; k < L->nruns; ++k) {
        const int64_t i = L->run[k], n = L->run[k + 1] - i;
        const int w = L->widths[i];
        const int8_t *t8 = V->T8 + V->t8off[k];
        const float *sc = V->scales + V->boff[k];
        const uint8_t *q8 = p8 + V->c8off[k];
        const float *t = T + L->toff[i];
        switch (w) {
            case 1: seg_int8(t8, sc, n, q8, V->stride8, acc, NG, 1); p += n; break;
            case 2: seg_int8(t8, sc, n, q8, V->stride8, acc, NG, 2); p += 2 * n; break;
            case 3: seg_int8(t8, sc, n, q8, V->stride8, acc, NG, 3); p += 3 * n; break;
            case 4: seg_int8(t8, sc, n, q8, V->stride8, acc, NG, 4); p += 4 * n; break;
            case 5: p = seg512(t, n, p, L->words, acc, NG, 5); break;
            case 6: p = seg512(t, n, p, L->words, acc, NG, 6); break;
            case 7: p = seg512(t, n, p, L->words, acc, NG, 7); break;
            default: p = seg512(t, n, p, L->words, acc, NG, 8); break;
        }
    }
    for (int j = 0; j < NG; ++j) _mm512_mask_storeu_ps(y + (g + j) * GROUP, rows_mask(L, g + j), acc[j]);
}

T512I void gemv_int8_groups(const layer_t *L, const int8_view_t *V, const float *T, float *y, int64_t g,
                            int64_t g1) {
    for (; g + 4 <= g1; g += 4) gemv1_int8(L, V, T, y, g, 4);
    for (; g < g1; ++g) gemv1_int8(L, V, T, y, g, 1);
}
#endif
