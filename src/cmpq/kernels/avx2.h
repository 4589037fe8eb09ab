/* AVX2 (+FMA) primitives shared by avx2.c (float tables) and int8_avx2.c (whose wider columns use avx2.c's
 * float-table segments): 8 rows at a time (rows 8h..8h+7 of a group start at byte h*w); vpermps holds 8 entries.
 * x86 only. */
#ifndef CMPQ_AVX2_H
#define CMPQ_AVX2_H
#include "cmpq_kernels.h"

#ifdef CMPQ_X86
/* shift of each of the 8 rows' codes: r*w within one 32-bit window (w <= 4), else (r*w) mod 8 after the byte
 * shuffle of `bytes256` */
T256 static inline __m256i shifts256(int w) {
    int32_t s[8];
    for (int r = 0; r < 8; ++r) s[r] = w <= 4 ? r * w : (r * w) & 7;
    return _mm256_loadu_si256((const __m256i *)s);
}

/* vpshufb control (w > 4): dword lane r takes the byte holding the start of row r's code and, when the code
 * crosses into it, the next byte; the other bytes are zeroed (indices never pass byte 7 of the 64-bit window) */
T256 static inline __m256i bytes256(int w) {
    int8_t c[32];
    for (int r = 0; r < 8; ++r) {
        const int bit = r * w, lane = 4 * r;
        c[lane] = (int8_t)(bit >> 3);
        c[lane + 1] = (bit & 7) + w > 8 ? (int8_t)((bit >> 3) + 1) : (int8_t)-128;
        c[lane + 2] = c[lane + 3] = (int8_t)-128;
    }
    return _mm256_loadu_si256((const __m256i *)c);
}

/* the 8 codes of rows 8h..8h+7 in the w words at p, one per dword lane, in its low w bits (the bits above may hold
 * other rows' bits: the look-ups read only the low w bits, or mask) */
T256 static inline AI __m256i decode256(const uint16_t *p, int w, int half, __m256i shifts, __m256i bytes) {
    const uint8_t *q = (const uint8_t *)p + half * w;
    if (w <= 4) return _mm256_srlv_epi32(_mm256_set1_epi32((int)load32(q)), shifts);
    if (w == 8) return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q));
    return _mm256_srlv_epi32(_mm256_shuffle_epi8(_mm256_set1_epi64x((long long)load64(q)), bytes), shifts);
}

/* 8 look-ups of a table of 2^w entries (no mask: entries past 2^w are never picked for w >= 3; narrower
 * columns need their index masked or a table repeated to 4 entries) */
T256 static inline AI __m256 lookup256(const float *t, __m256i idx, int w) {
    /* up to 2 bits: the first 4 entries in both 128-bit lanes and the in-lane vpermilps on the index's low 2 bits
     * (on Zen 3 several per cycle; the lane-crossing vpermps, one) */
    if (w <= 2) return _mm256_permutevar_ps(_mm256_broadcast_ps((const __m128 *)t), idx);
    if (w == 3) return _mm256_permutevar8x32_ps(_mm256_loadu_ps(t), idx);
    if (w == 4)  /* bit 3, moved to the sign bit, picks the upper 8 entries */
        return _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(t), idx),
                                _mm256_permutevar8x32_ps(_mm256_loadu_ps(t + 8), idx),
                                _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    if (w <= 6) {  /* 2^(w-3) blocks of 8 entries, then a tree of blends on bits 3.. (faster than a gather here) */
        __m256 parts[8];
        const int blocks = 1 << (w - 3);
        for (int j = 0; j < blocks; ++j) parts[j] = _mm256_permutevar8x32_ps(_mm256_loadu_ps(t + 8 * j), idx);
        for (int k = 3, n = blocks; k < w; ++k, n >>= 1) {
            const __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 31 - k));  /* bit k in the sign bit */
            for (int j = 0; j < n / 2; ++j) parts[j] = _mm256_blendv_ps(parts[2 * j], parts[2 * j + 1], upper);
        }
        return parts[0];
    }
    return _mm256_i32gather_ps(t, _mm256_and_si256(idx, _mm256_set1_epi32((1 << w) - 1)), 4);
}

/* rows [r, r + 8) of y, fewer at the end of the layer */
T256 static inline void store_rows256(float *y, int64_t r, int64_t rows, __m256 v) {
    if (r + 8 <= rows) {
        _mm256_storeu_ps(y + r, v);
    } else if (r < rows) {
        float tmp[8];
        _mm256_storeu_ps(tmp, v);
        memcpy(y + r, tmp, sizeof(float) * (size_t)(rows - r));
    }
}

/* one segment of n stored columns of one width (seg256 in avx2.c, one instance per tokens, halves and width) */
typedef const uint16_t *(*seg256_fn)(const float *, int64_t, int64_t, const uint16_t *, int64_t, int, __m256 *);
/* the one-token instances by width: 8 halves (4 groups) and 2 halves (1 group) per pass */
CMPQ_HIDDEN extern const seg256_fn seg256_1_8[9], seg256_1_2[9];
#endif

#endif /* CMPQ_AVX2_H */
