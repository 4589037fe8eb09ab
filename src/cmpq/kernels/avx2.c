/* AVX2 (+FMA) float-table kernels: the tables (for AVX-512 too), the LUT-GEMV for 1..8 tokens and tile
 * dequantization.
 *
 * 8 rows per vector; vpermps holds 8 entries. One broadcast 32-bit load and one vpsrlvd decode 8 codes of up to
 * 4 bits (a vpshufb first above 4 bits); the look-up is one in-lane vpermilps on 4 entries up to 2 bits, one
 * vpermps at 3 (tables repeated to 16 entries for one token, so narrow columns need no mask either), two and a
 * blend at 4 bits, a tree of them at 5 and 6, a gather above. x86 only. */
#include "avx2.h"

#ifdef CMPQ_X86
/* build_tables with 8 entries per instruction: each column's first 8 entries (2^w of them repeated below 3 bits,
 * one vpermps of the codebook) times x, stored once or twice; wider columns in steps of 8. The scalar loop stored
 * one float at a time and took 17% of a call on 576x576 at 3 bits. Reads up to 8 floats past a codebook (the
 * caller pads the codebooks by 16). */
T256 void build_tables256(const layer_t *L, const float *x, int64_t batch, float *T, int64_t tsize, int64_t i0,
                          int64_t i1) {
    for (int64_t b = 0; b < batch; ++b) {
        const float *xb = x + b * L->cols;
        float *Tb = T + b * tsize;
        for (int64_t i = i0; i < i1; ++i) {
            const int w = L->widths[i];
            const int64_t n = (int64_t)1 << w, slots = L->repeat ? table_slots(w) : n;
            const float *cb = L->codebooks + L->cb_offset[i];
            float *t = Tb + L->toff[i];
            const __m256 xv = _mm256_set1_ps(xb[L->order[i]]);
            if (n < 8) {
                const __m256i repeat = _mm256_and_si256(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                                        _mm256_set1_epi32((int)n - 1));
                const __m256 v = _mm256_mul_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(cb), repeat), xv);
                if (slots >= 8) {
                    for (int64_t c = 0; c < slots; c += 8) _mm256_storeu_ps(t + c, v);
                } else {  /* compact table of 2 or 4 entries */
                    float tmp[8];
                    _mm256_storeu_ps(tmp, v);
                    memcpy(t, tmp, sizeof(float) * (size_t)slots);
                }
            } else {
                for (int64_t c = 0; c < n; c += 8) _mm256_storeu_ps(t + c, _mm256_mul_ps(_mm256_loadu_ps(cb + c), xv));
                for (int64_t c = n; c < slots; c += 8) _mm256_storeu_ps(t + c, _mm256_mul_ps(_mm256_loadu_ps(cb + (c & (n - 1))), xv));
            }
        }
    }
}

/* One segment of n stored columns of width W, for `halves` 8-row halves from half h0 (half h: rows 8h.. of the pass,
 * codes at p + (h / 2) * words) and B tokens (B * halves <= 8 accumulators; W, B and halves compile-time constants,
 * so every branch folds away). Each column's codes are decoded once per half for all tokens, and each token's table
 * is read once per half. Per 8 weights and token: one look-up (lookup256) and one add; per 8 weights: one broadcast
 * load and one vpsrlvd (and a vpshufb above 4 bits). One token reads tables repeated to 16 entries (no index mask
 * at 1 and 2 bits, and one layout for every ISA); batches read tables of 2^w entries and mask. */
T256 static inline AI const uint16_t *seg256(const float *t, int64_t tsize, int64_t n, const uint16_t *p,
                                             int64_t words, int h0, __m256 acc[8], const int B, const int halves,
                                             const int W) {
    const __m256i shifts = shifts256(W), bytes = W > 4 && W < 8 ? bytes256(W) : _mm256_setzero_si256();
    const __m256i low = _mm256_set1_epi32((1 << W) - 1);
    const int64_t step = B == 1 ? table_slots(W) : 1 << W;
    __m256 a[8];  /* a local copy stays in registers (stores through acc might alias the tables) */
#pragma GCC unroll 8
    for (int k = 0; k < B * halves; ++k) a[k] = acc[k];
    for (int64_t i = 0; i < n; ++i, t += step, p += W)
#pragma GCC unroll 8
        for (int k = 0; k < halves; ++k) {
            const int h = h0 + k;
            __m256i idx = decode256(p + (h >> 1) * words, W, h & 1, shifts, bytes);
            if (B > 1 && W < 3) idx = _mm256_and_si256(idx, low);
#pragma GCC unroll 8
            for (int b = 0; b < B; ++b) a[k * B + b] = _mm256_add_ps(a[k * B + b], lookup256(t + b * tsize, idx, W));
        }
#pragma GCC unroll 8
    for (int k = 0; k < B * halves; ++k) acc[k] = a[k];
    return p;
}

/* One function per (tokens, halves, width), each register-allocated on its own: inlined into one function, the
 * blend trees of wide columns pushed every width's accumulators to the stack. Passes: one token, 8 halves (4 groups,
 * each table read once per 64 rows) or 2 (a last group); 2..4 tokens, 2 halves; 5..8 tokens, 1. */
#define SEG256(B, H, W)                                                                                         \
    T256 static __attribute__((noinline)) const uint16_t *seg256_##B##_##H##_##W(                               \
        const float *t, int64_t tsize, int64_t n, const uint16_t *p, int64_t words, int h0, __m256 *acc) {      \
        return seg256(t, tsize, n, p, words, h0, acc, B, H, W);                                                 \
    }
#define SEG256_WIDTHS(B, H) SEG256(B, H, 1) SEG256(B, H, 2) SEG256(B, H, 3) SEG256(B, H, 4) SEG256(B, H, 5)        \
    SEG256(B, H, 6) SEG256(B, H, 7) SEG256(B, H, 8)                                                             \
    CMPQ_HIDDEN const seg256_fn seg256_##B##_##H[9] = {NULL, seg256_##B##_##H##_1, seg256_##B##_##H##_2,         \
        seg256_##B##_##H##_3, seg256_##B##_##H##_4, seg256_##B##_##H##_5, seg256_##B##_##H##_6,                  \
        seg256_##B##_##H##_7, seg256_##B##_##H##_8};
SEG256_WIDTHS(1, 8)
SEG256_WIDTHS(1, 2)
SEG256_WIDTHS(2, 2)
SEG256_WIDTHS(3, 2)
SEG256_WIDTHS(4, 2)
SEG256_WIDTHS(5, 1)
SEG256_WIDTHS(6, 1)
SEG256_WIDTHS(7, 1)
SEG256_WIDTHS(8, 1)

/* `halves` halves from half h0 of group g (rows 16 g + 8 h0 ..) for `batch` tokens, with the instances `seg` */
T256 static void pass256(const layer_t *L, const float *T, int64_t tsize, int64_t batch, float *y, int64_t g, int h0,
                         int halves, const seg256_fn *seg) {
    __m256 acc[8];
    for (int k = 0; k < 8; ++k) acc[k] = _mm256_setzero_ps();
    const uint16_t *p = L->codes + g * L->words;
    for (int64_t k = 0; k < L->nruns; ++k) {  /* runs of equal width */
        const int64_t i = L->run[k];
        p = seg[L->widths[i]](T + L->toff[i], tsize, L->run[k + 1] - i, p, L->words, h0, acc);
    }
    for (int k = 0; k < halves; ++k)
        for (int64_t b = 0; b < batch; ++b)
            store_rows256(y + b * L->rows, g * GROUP + 8 * (h0 + k), L->rows, acc[k * batch + b]);
}

T256 void gemv_avx2(const layer_t *L, const float *T, int64_t tsize, int64_t batch, float *y, int64_t g0,
                    int64_t g1) {
    static const seg256_fn *batched[MAX_BATCH + 1] = {NULL, NULL, seg256_2_2, seg256_3_2, seg256_4_2, seg256_5_1,
                                                      seg256_6_1, seg256_7_1, seg256_8_1};
    int64_t g = g0;
    if (batch == 1) {
        for (; g + 4 <= g1; g += 4) pass256(L, T, tsize, 1, y, g, 0, 8, seg256_1_8);
        for (; g < g1; ++g) pass256(L, T, tsize, 1, y, g, 0, 2, seg256_1_2);
        return;
    }
    const int halves = batch <= 4 ? 2 : 1;
    for (; g < g1; ++g)
        for (int h = 0; h < 2; h += halves) pass256(L, T, tsize, batch, y, g, h, halves, batched[batch]);
}

/* 8 values (fewer at the end of the layer: `left`) of a tile at element e, float32 or bfloat16 */
T256 static inline void store256(void *out, int bf16, int64_t e, __m256 v, int64_t left) {
    if (bf16) {
        __m256i u = _mm256_castps_si256(v);
        const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
        const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
        if (left >= 8) {
            _mm_storeu_si128((__m128i *)((uint16_t *)out + e), packed);
        } else {
            uint16_t tmp[8];
            _mm_storeu_si128((__m128i *)tmp, packed);
            memcpy((uint16_t *)out + e, tmp, sizeof(uint16_t) * (size_t)left);
        }
    } else if (left >= 8) {
        _mm256_storeu_ps((float *)out + e, v);
    } else {
        float tmp[8];
        _mm256_storeu_ps(tmp, v);
        memcpy((float *)out + e, tmp, sizeof(float) * (size_t)left);
    }
}

T256 void dequant_avx2(const layer_t *L, void *out, int64_t ld, int64_t rbase, int bf16, int64_t g0,
                       int64_t g1) {
    int64_t woff = 0;
    for (int64_t i = 0; i < L->cols; ++i) {
        const int w = L->widths[i];
        const float *cb = L->codebooks + L->cb_offset[i];
        const __m256i shifts = shifts256(w), bytes = bytes256(w), low = _mm256_set1_epi32((1 << w) - 1);
        for (int64_t g = g0; g < g1; ++g)
            for (int half = 0; half < 2; ++half) {
                const int64_t r = g * GROUP + 8 * half, left = L->rows - r;
                if (left <= 0) break;
                const __m256i idx = _mm256_and_si256(decode256(L->codes + g * L->words + woff, w, half, shifts, bytes), low);
                store256(out, bf16, i * ld + r - rbase, lookup256(cb, idx, w), left);
            }
        woff += w;
    }
}
#endif
