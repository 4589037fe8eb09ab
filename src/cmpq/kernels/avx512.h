/* AVX-512 (F+BW+VBMI) primitives shared by avx512.c (float tables) and int8_avx512.c (whose wider columns use the
 * float-table segments): decoding a 64-bit window of codes into 16 table indices, and the look-ups. All static
 * inline: each file inlines them into its own loops with compile-time widths. x86 only. */
#ifndef CMPQ_AVX512_H
#define CMPQ_AVX512_H
#include "cmpq_kernels.h"

#ifdef CMPQ_X86

/* multishift control: the low byte of dword lane r takes 8 bits from row r's offset in its 64-bit window
 * (rows 0..7: window at byte 0; rows 8..15: window at byte w, or the same window when 16 rows fit in it) */
T512 static inline __m512i ctrl512(int w) {
    uint8_t c[64] = {0};
    for (int r = 0; r < GROUP; ++r) c[4 * r] = (uint8_t)(w <= 4 ? r * w : (r & 7) * w);
    return _mm512_loadu_si512(c);
}

T512 static inline __m512i window512(const uint16_t *p, int w) {
    if (w <= 4) return _mm512_set1_epi64((long long)load64(p));
    const __m256i lo = _mm256_set1_epi64x((long long)load64(p));
    const __m256i hi = _mm256_set1_epi64x((long long)load64((const uint8_t *)p + w));
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

/* 16 table indices (code in the low w bits of each dword; higher bits are other rows' bits) */
T512 static inline __m512i decode512(const uint16_t *p, int w, __m512i ctrl) {
    return _mm512_multishift_epi64_epi8(ctrl, window512(p, w));
}

/* 16 look-ups of table t (2^w entries) at idx */
T512 static inline __m512 lookup512(const float *t, __m512i idx, int w) {
    if (w < 4) return _mm512_permutexvar_ps(_mm512_and_si512(idx, _mm512_set1_epi32((1 << w) - 1)),
                                            _mm512_loadu_ps(t));
    if (w == 4) return _mm512_permutexvar_ps(idx, _mm512_loadu_ps(t));
    __m512 parts[8];
    const int blocks = 1 << (w - 5);
    for (int j = 0; j < blocks; ++j)
        parts[j] = _mm512_permutex2var_ps(_mm512_loadu_ps(t + 32 * j), idx, _mm512_loadu_ps(t + 32 * j + 16));
    for (int k = 5, n = blocks; k < w; ++k, n >>= 1) {  /* bit k picks the upper half of 2^(k+1) entries */
        const __mmask16 upper = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(1 << k));
        for (int j = 0; j < n / 2; ++j) parts[j] = _mm512_mask_mov_ps(parts[2 * j], upper, parts[2 * j + 1]);
    }
    return parts[0];
}

/* a table of 2^w entries (w <= 4) in one register, repeated to 16 entries by the broadcast load itself */
T512 static inline __m512 table512(const float *t, int w) {
    if (w == 1) {
        double pair;
        memcpy(&pair, t, sizeof(pair));
        return _mm512_castpd_ps(_mm512_set1_pd(pair));
    }
    if (w == 2) return _mm512_broadcast_f32x4(_mm_loadu_ps(t));
    if (w == 3) return _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd((const double *)t)));
    return _mm512_loadu_ps(t);
}

/* 16 look-ups in a table of 2^w entries without masking the index below 4 bits (the broadcast repeats it) */
T512 static inline __m512 lookup_repeated512(const float *t, __m512i idx, int w) {
    return w <= 4 ? _mm512_permutexvar_ps(idx, table512(t, w)) : lookup512(t, idx, w);
}

/* lanes of group g that hold rows of the layer (all 16 but in a partial last group) */
static inline __mmask16 rows_mask(const layer_t *L, int64_t g) {
    const int64_t left = L->rows - g * GROUP;
    return left >= GROUP ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}
/* Batch 1, NG 16-row groups per pass, one segment of columns of the same width W (both compile-time constants, so
 * every branch folds away): the column's table is loaded once per pass. Per 16 weights: one window load, one
 * vpmultishiftqb, one vpermps (vpermi2ps above 4 bits), one add. */
T512 static inline AI const uint16_t *seg512(const float *t, int64_t n, const uint16_t *p, int64_t words,
                                             __m512 acc[8], const int NG, const int W) {
    const __m512i ctrl = ctrl512(W);
    for (int64_t i = 0; i < n; ++i, t += 1 << W, p += W)
#pragma GCC unroll 8
        for (int j = 0; j < NG; ++j)
            acc[j] = _mm512_add_ps(acc[j], lookup_repeated512(t, decode512(p + j * words, W, ctrl), W));
    return p;
}
#endif

#endif /* CMPQ_AVX512_H */
