/* Int8-table kernel for AVX2 (one token; also AVX-512 CPUs without VNNI; the definition of int8 tables:
 * cmpq_kernels.h). The same integers as the AVX-512 kernel.
 *
 * A 16-byte vpshufb table holds a pair of columns of up to 3 bits (8 entries each) or one column of 4 bits.
 * Codes are nibbles (codes8, made by cmpq/kernels/native.py, pack_nibbles): per group and run, quads of 4 columns
 * in 32 bytes; byte k holds row 8 (k / 16) + (k % 16) / 2, its low nibble the quad's column k % 2 and its high
 * nibble column 2 + k % 2; below 4 bits the second column of a pair is stored as code + 8 (its half of the pair's
 * table). Per 64 weights: vpand, vpsrlw, vpand (both nibbles), then per pair one vpshufb, one vpmaddubsw (the
 * pair summed per row into int16) and one vpaddw (4 bits: two vpshufb on indices masked by bit 7, merged by
 * vpor); a block's int16 sums (at most 32 x 127) are widened and scaled once per block. Columns wider than 4 bits
 * go through avx2.c's float-table segments. x86 only. */
#include "avx2.h"

#ifdef CMPQ_X86
/* AVX2 tables of blocks [b0, b1) of a run (first stored column a, n columns, width w <= 4): per block 32 columns
 * of 8 bytes below 4 bits (pair p's table is bytes 16 p .. 16 p + 15: column 2 p, then 2 p + 1) or of 16 bytes
 * at 4 bits; entries past 2^w and columns past n are 0. The same integers as build_int8_run: the same float
 * products, scale and rounding (nearest, ties to even). */
T256 void build_int8_run256(const layer_t *L, const float *x, const float *amax, int64_t a, int64_t n, int w,
                            int8_t *T8, float *scales, int64_t b0, int64_t b1) {
    const int entries = 1 << w, slots = w < 4 ? 8 : 16;
    int32_t lane[8];
    for (int k = 0; k < 8; ++k) lane[k] = k < entries ? -1 : 0;
    const __m256i valid = _mm256_loadu_si256((const __m256i *)lane);
    const __m256i hi = _mm256_set1_epi32(127), lo = _mm256_set1_epi32(-127);
    for (int64_t b = b0; b < b1; ++b) {
        int64_t first, m;
        const float top = int8_block_top(L, x, amax, a, n, b, &first, &m);
        const __m256 vinv = _mm256_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
        scales[b] = top / 127.0f;
        int8_t *t = T8 + b * int8_block_bytes(w, 1);
        memset(t + m * slots, 0, (size_t)((INT8_BLOCK - m) * slots));
        for (int64_t s = 0; s < m; ++s) {
            const float *cb = L->codebooks + L->cb_offset[first + s];
            const __m256 xv = _mm256_set1_ps(x[L->order[first + s]]);
            for (int h = 0; h < slots; h += 8) {
                const __m256 entry = h == 0 ? _mm256_maskload_ps(cb, valid) : _mm256_loadu_ps(cb + 8);
                const __m256i q = _mm256_max_epi32(_mm256_min_epi32(
                    _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_mul_ps(entry, xv), vinv)), hi), lo);
                const __m256i q16 = _mm256_packs_epi32(q, q), q8 = _mm256_packs_epi16(q16, q16);
                /* bytes 0..3 of each 128-bit lane hold entries 0..3 and 4..7 */
                _mm_storel_epi64((__m128i *)(t + s * slots + h),
                                 _mm_unpacklo_epi32(_mm256_castsi256_si128(q8), _mm256_extracti128_si256(q8, 1)));
            }
        }
    }
}

/* One run of n columns of width W <= 4 for NG groups with AVX2 int8 tables (layout above): p8 at the run's codes
 * in the first group, T8 / scales at the run's first block; acc holds 2 NG halves (8 rows each). */
T256 static inline AI void seg_int8_256(const int8_t *T8, const float *scales, int64_t n, const uint8_t *p8,
                                        int64_t stride8, __m256 *acc, const int NG, const int W) {
    const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi8(1);
    const __m256i odd = _mm256_set1_epi16((short)0x8000), even = _mm256_set1_epi16(0x0080); /* bit 7: zero out */
    const int64_t quads = (n + 3) / 4, block_bytes = int8_block_bytes(W, 1);
    for (int64_t q0 = 0, b = 0; q0 < quads; q0 += INT8_BLOCK / 4, ++b) {
        __m256i sum[4];
#pragma GCC unroll 4
        for (int j = 0; j < NG; ++j) sum[j] = _mm256_setzero_si256();
        const int64_t q1 = q0 + INT8_BLOCK / 4 < quads ? q0 + INT8_BLOCK / 4 : quads;
        const int8_t *tb = T8 + b * block_bytes;
        for (int64_t q = q0; q < q1; ++q) {
            const int8_t *t = tb + (q - q0) * (W < 4 ? 32 : 64);
            const uint8_t *p = p8 + q * 32;
            if (W < 4) {
                const __m256i t01 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)t));
                const __m256i t23 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(t + 16)));
#pragma GCC unroll 4
                for (int j = 0; j < NG; ++j) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(p + j * stride8));
                    const __m256i lo = _mm256_and_si256(v, nibble);
                    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
                    sum[j] = _mm256_add_epi16(sum[j], _mm256_maddubs_epi16(ones, _mm256_shuffle_epi8(t01, lo)));
                    sum[j] = _mm256_add_epi16(sum[j], _mm256_maddubs_epi16(ones, _mm256_shuffle_epi8(t23, hi)));
                }
            } else {
                __m256i tc[4];
                for (int c = 0; c < 4; ++c)
                    tc[c] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(t + 16 * c)));
#pragma GCC unroll 4
                for (int j = 0; j < NG; ++j) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(p + j * stride8));
                    const __m256i lo = _mm256_and_si256(v, nibble);
                    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
                    const __m256i l = _mm256_or_si256(_mm256_shuffle_epi8(tc[0], _mm256_or_si256(lo, odd)),
                                                      _mm256_shuffle_epi8(tc[1], _mm256_or_si256(lo, even)));
                    const __m256i h = _mm256_or_si256(_mm256_shuffle_epi8(tc[2], _mm256_or_si256(hi, odd)),
                                                      _mm256_shuffle_epi8(tc[3], _mm256_or_si256(hi, even)));
                    sum[j] = _mm256_add_epi16(sum[j], _mm256_maddubs_epi16(ones, l));
                    sum[j] = _mm256_add_epi16(sum[j], _mm256_maddubs_epi16(ones, h));
                }
            }
        }
        const __m256 sc = _mm256_set1_ps(scales[b]);
#pragma GCC unroll 4
        for (int j = 0; j < NG; ++j) {
            const __m256i r0 = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(sum[j]));      /* rows 0..7 */
            const __m256i r1 = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(sum[j], 1)); /* rows 8..15 */
            acc[2 * j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(r0), sc, acc[2 * j]);
            acc[2 * j + 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(r1), sc, acc[2 * j + 1]);
        }
    }
}

typedef void (*seg_int8_256_fn)(const int8_t *, const float *, int64_t, const uint8_t *, int64_t, __m256 *);
#define SEG_INT8_256(NG, W)                                                                                     \
    T256 static __attribute__((noinline)) void seg_int8_256_##NG##_##W(                                         \
        const int8_t *T8, const float *scales, int64_t n, const uint8_t *p8, int64_t stride8, __m256 *acc) {    \
        seg_int8_256(T8, scales, n, p8, stride8, acc, NG, W);                                                   \
    }
#define SEG_INT8_256_WIDTHS(NG) SEG_INT8_256(NG, 1) SEG_INT8_256(NG, 2) SEG_INT8_256(NG, 3) SEG_INT8_256(NG, 4)     \
    static const seg_int8_256_fn seg_int8_256_##NG[5] = {NULL, seg_int8_256_##NG##_1, seg_int8_256_##NG##_2,      \
                                                         seg_int8_256_##NG##_3, seg_int8_256_##NG##_4};
SEG_INT8_256_WIDTHS(4)
SEG_INT8_256_WIDTHS(1)

/* AVX2: groups [g, g + NG), NG = 4 or 1, one token; wider runs through the float segments of gemv_avx2 */
T256 static void gemv1_int8_256(const layer_t *L, const int8_view_t *V, const float *T, float *y, int64_t g,
                                const int NG) {
    __m256 acc[8];
    for (int k = 0; k < 8; ++k) acc[k] = _mm256_setzero_ps();
    const seg_int8_256_fn *narrow = NG == 4 ? seg_int8_256_4 : seg_int8_256_1;
    const seg256_fn *wide = NG == 4 ? seg256_1_8 : seg256_1_2;
    const uint16_t *p = L->codes + g * L->words;
    const uint8_t *p8 = V->codes8 + g * V->stride8;
    for (int64_t k = 0; k < L->nruns; ++k) {
        const int64_t i = L->run[k], n = L->run[k + 1] - i;
        const int w = L->widths[i];
        if (w <= INT8_MAX_W) {
            narrow[w](V->T8 + V->t8off[k], V->scales + V->boff[k], n, p8 + V->c8off[k], V->stride8, acc);
            p += (int64_t)w * n;
        } else {
            p = wide[w](T + L->toff[i], 0, n, p, L->words, 0, acc);
        }
    }
    for (int k = 0; k < 2 * NG; ++k) store_rows256(y, g * GROUP + 8 * k, L->rows, acc[k]);
}

T256 void gemv_int8_groups256(const layer_t *L, const int8_view_t *V, const float *T, float *y, int64_t g,
                              int64_t g1) {
    for (; g + 4 <= g1; g += 4) gemv1_int8_256(L, V, T, y, g, 4);
    for (; g < g1; ++g) gemv1_int8_256(L, V, T, y, g, 1);
}
#endif
