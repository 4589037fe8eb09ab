/* AVX-512 (F+BW+VBMI) float-table kernels: the LUT-GEMV for 1..8 tokens and tile dequantization.
 *
 * One vpmultishiftqb turns a 64-bit window of codes into 16 table indices (rows 0..7 start at bit 0, rows 8..15
 * at byte w), and vpermps looks the 16 values up in one register (widths above 4 bits use vpermi2ps on 32 entries
 * and blend on the higher bits). For one token, a column narrower than 4 bits keeps its table of 2^w entries and
 * loads it with a broadcast (vbroadcastsd / f32x4 / f64x4), which repeats the entries to 16 in the register
 * (T[c] = T[c mod 2^w]), so that the look-up needs no mask of the decoded index: the bits above the code only pick
 * a copy (dropping the AND measured 1.3x faster per 16 weights at 3 bits on Zen 4; broadcasting compact tables
 * instead of storing them repeated, half the table bytes, 1.04x). Batches mask (the mask is shared by their
 * tokens). Tables are built by build_tables256 (avx2.c). x86 only. */
#include "avx512.h"

#ifdef CMPQ_X86
/* batch 1, groups [g, g + NG) */
T512 static inline AI void gemv1_512(const layer_t *L, const float *T, float *y, int64_t g, const int NG) {
    __m512 acc[8];
#pragma GCC unroll 8
    for (int j = 0; j < NG; ++j) acc[j] = _mm512_setzero_ps();
    const uint16_t *p = L->codes + g * L->words;
    for (int64_t k = 0; k < L->nruns; ++k) {  /* runs of equal width */
        const int64_t i = L->run[k], n = L->run[k + 1] - i;
        const float *t = T + L->toff[i];
        switch (L->widths[i]) {
            case 1: p = seg512(t, n, p, L->words, acc, NG, 1); break;
            case 2: p = seg512(t, n, p, L->words, acc, NG, 2); break;
            case 3: p = seg512(t, n, p, L->words, acc, NG, 3); break;
            case 4: p = seg512(t, n, p, L->words, acc, NG, 4); break;
            case 5: p = seg512(t, n, p, L->words, acc, NG, 5); break;
            case 6: p = seg512(t, n, p, L->words, acc, NG, 6); break;
            case 7: p = seg512(t, n, p, L->words, acc, NG, 7); break;
            default: p = seg512(t, n, p, L->words, acc, NG, 8); break;
        }
    }
    for (int j = 0; j < NG; ++j) _mm512_mask_storeu_ps(y + (g + j) * GROUP, rows_mask(L, g + j), acc[j]);
}

/* batch 1 from group g: passes of 8 groups (each column's table loaded once per 128 rows: 5% faster than 4 on
 * 11008x4096), then of 4; returns the first group left over */
T512 static int64_t gemv1_passes512(const layer_t *L, const float *T, float *y, int64_t g, int64_t g1) {
    for (; g + 8 <= g1; g += 8) gemv1_512(L, T, y, g, 8);
    for (; g + 4 <= g1; g += 4) gemv1_512(L, T, y, g, 4);
    return g;
}

/* Batch 2..8: NG groups per pass and B tokens, both compile-time constants (B * NG <= 16 accumulators stay in
 * registers): each column's codes are decoded once per group for all B tokens, and each token's table is loaded
 * once for the NG groups. */
T512 static inline AI const uint16_t *segb512(const float *t, int64_t tsize, int64_t n, const uint16_t *p,
                                              int64_t words, __m512 acc[MAX_BATCH][4], const int B, const int NG,
                                              const int W) {
    const __m512i ctrl = ctrl512(W), low = _mm512_set1_epi32((1 << W) - 1);
    for (int64_t i = 0; i < n; ++i, t += 1 << W, p += W) {
        __m512i idx[4];
#pragma GCC unroll 4
        for (int j = 0; j < NG; ++j) {
            idx[j] = decode512(p + j * words, W, ctrl);
            if (W < 4) idx[j] = _mm512_and_si512(idx[j], low);
        }
#pragma GCC unroll 8
        for (int b = 0; b < B; ++b) {
            if (W <= 4) {
                const __m512 table = _mm512_loadu_ps(t + b * tsize);
#pragma GCC unroll 4
                for (int j = 0; j < NG; ++j) acc[b][j] = _mm512_add_ps(acc[b][j], _mm512_permutexvar_ps(idx[j], table));
            } else {
#pragma GCC unroll 4
                for (int j = 0; j < NG; ++j) acc[b][j] = _mm512_add_ps(acc[b][j], lookup512(t + b * tsize, idx[j], W));
            }
        }
    }
    return p;
}

/* groups [g, g + NG) for B tokens */
T512 static inline AI void gemvb512(const layer_t *L, const float *T, int64_t tsize, float *y, int64_t g, const int B,
                                    const int NG) {
    __m512 acc[MAX_BATCH][4];
#pragma GCC unroll 8
    for (int b = 0; b < B; ++b)
#pragma GCC unroll 4
        for (int j = 0; j < NG; ++j) acc[b][j] = _mm512_setzero_ps();
    const uint16_t *p = L->codes + g * L->words;
    for (int64_t k = 0; k < L->nruns; ++k) {
        const int64_t i = L->run[k], n = L->run[k + 1] - i;
        const int w = L->widths[i];
        const float *t = T + L->toff[i];
        switch (w) {
            case 1: p = segb512(t, tsize, n, p, L->words, acc, B, NG, 1); break;
            case 2: p = segb512(t, tsize, n, p, L->words, acc, B, NG, 2); break;
            case 3: p = segb512(t, tsize, n, p, L->words, acc, B, NG, 3); break;
            case 4: p = segb512(t, tsize, n, p, L->words, acc, B, NG, 4); break;
            case 5: p = segb512(t, tsize, n, p, L->words, acc, B, NG, 5); break;
            case 6: p = segb512(t, tsize, n, p, L->words, acc, B, NG, 6); break;
            case 7: p = segb512(t, tsize, n, p, L->words, acc, B, NG, 7); break;
            default: p = segb512(t, tsize, n, p, L->words, acc, B, NG, 8); break;
        }
    }
    for (int j = 0; j < NG; ++j)
        for (int b = 0; b < B; ++b)
            _mm512_mask_storeu_ps(y + b * L->rows + (g + j) * GROUP, rows_mask(L, g + j), acc[b][j]);
}

#define DEF_GEMVB512(B, NG)                                                                                     \
    T512 static int64_t gemvb512_##B(const layer_t *L, const float *T, int64_t tsize, float *y, int64_t g,       \
                                     int64_t g1) {                                                              \
        for (; g + NG <= g1; g += NG) gemvb512(L, T, tsize, y, g, B, NG);                                        \
        return g;                                                                                               \
    }
DEF_GEMVB512(2, 4)
DEF_GEMVB512(3, 4)
DEF_GEMVB512(4, 4)
DEF_GEMVB512(5, 2)
DEF_GEMVB512(6, 2)
DEF_GEMVB512(7, 2)
DEF_GEMVB512(8, 2)

T512 void gemv_avx512(const layer_t *L, const float *T, int64_t tsize, int64_t batch, float *y, int64_t g0,
                      int64_t g1) {
    int64_t g = g0;
    switch (batch) {  /* full passes of the batched path; leftover groups go through the generic loop below */
        case 2: g = gemvb512_2(L, T, tsize, y, g, g1); break;
        case 3: g = gemvb512_3(L, T, tsize, y, g, g1); break;
        case 4: g = gemvb512_4(L, T, tsize, y, g, g1); break;
        case 5: g = gemvb512_5(L, T, tsize, y, g, g1); break;
        case 6: g = gemvb512_6(L, T, tsize, y, g, g1); break;
        case 7: g = gemvb512_7(L, T, tsize, y, g, g1); break;
        case 8: g = gemvb512_8(L, T, tsize, y, g, g1); break;
        default: break;
    }
    if (batch == 1) g = gemv1_passes512(L, T, y, g, g1);
    __m512i ctrls[9];
    for (int w = 1; w <= 8; ++w) ctrls[w] = ctrl512(w);
    for (; g < g1; ++g) {
        __m512 acc[MAX_BATCH];
        for (int64_t b = 0; b < batch; ++b) acc[b] = _mm512_setzero_ps();
        const uint16_t *p = L->codes + g * L->words;
        for (int64_t i = 0; i < L->cols; ++i) {
            const int w = L->widths[i];
            const __m512i idx = decode512(p, w, ctrls[w]);
            for (int64_t b = 0; b < batch; ++b)
                acc[b] = _mm512_add_ps(acc[b], lookup512(T + b * tsize + L->toff[i], idx, w));
            p += w;
        }
        for (int64_t b = 0; b < batch; ++b) _mm512_mask_storeu_ps(y + b * L->rows + g * GROUP, rows_mask(L, g), acc[b]);
    }
}

/* ---- tile dequantization (prefill) ---- */

/* 16 values of a tile at element e (lanes m), float32 or bfloat16 (round to nearest even, as bf16_bits) */
T512 static inline void store512(void *out, int bf16, int64_t e, __m512 v, __mmask16 m) {
    if (bf16) {
        __m512i u = _mm512_castps_si512(v);
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        u = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
        _mm512_mask_cvtepi32_storeu_epi16((uint16_t *)out + e, m, u);
    } else {
        _mm512_mask_storeu_ps((float *)out + e, m, v);
    }
}

/* one segment of n stored columns of width W, groups [g0, g1) */
T512 static inline AI void dequant_seg512(const layer_t *L, const float *cb, int64_t n, int64_t woff, int64_t i0,
                                          void *out, int64_t ld, int64_t rbase, int bf16, int64_t g0, int64_t g1,
                                          const int W) {
    const __m512i ctrl = ctrl512(W);
    for (int64_t i = i0; i < i0 + n; ++i, cb += 1 << W, woff += W)
        for (int64_t g = g0; g < g1; ++g) {
            store512(out, bf16, i * ld + g * GROUP - rbase,
                     lookup512(cb, decode512(L->codes + g * L->words + woff, W, ctrl), W), rows_mask(L, g));
        }
}

T512 void dequant_avx512(const layer_t *L, void *out, int64_t ld, int64_t rbase, int bf16, int64_t g0,
                         int64_t g1) {
    int64_t woff = 0;
    for (int64_t k = 0; k < L->nruns; ++k) {
        const int64_t i = L->run[k], n = L->run[k + 1] - i;
        const int w = L->widths[i];
        const float *cb = L->codebooks + L->cb_offset[i];
        switch (w) {
            case 1: dequant_seg512(L, cb, n, woff, i, out, ld, rbase, bf16, g0, g1, 1); break;
            case 2: dequant_seg512(L, cb, n, woff, i, out, ld, rbase, bf16, g0, g1, 2); break;
            case 3: dequant_seg512(L, cb, n, woff, i, out, ld, rbase, bf16, g0, g1, 3); break;
            case 4: dequant_seg512(L, cb, n, woff, i, out, ld, rbase, bf16, g0, g1, 4); break;
            case 5: dequant_seg512(L, cb, n, woff, i, out, ld, rbase, bf16, g0, g1, 5); break;
            case 6: dequant_seg512(L, cb, n, woff, i, out, ld, rbase, bf16, g0, g1, 6); break;
            case 7: dequant_seg512(L, cb, n, woff, i, out, ld, rbase, bf16, g0, g1, 7); break;
            default: dequant_seg512(L, cb, n, woff, i, out, ld, rbase, bf16, g0, g1, 8); break;
        }
        woff += n * w;
    }
}
#endif
