/* Mixed-precision LUT kernels for packed CMPQ layers (see cmpq/packed/cmpq_layer.py and codes.py for the format).
 *
 * A layer stores, per group of 16 output rows and per stored column i (columns sorted by width), w_i words of
 * 16 bits holding the 16 codes as one little-endian bit string (row r at bits [r*w, r*w + w)). Stored column i
 * is original input column order[i] and has the codebook codebooks[cb_offset[i] .. + 2^w_i]. The caller pads
 * the code array by 8 bytes: the SIMD paths read whole 64-bit windows.
 *
 * lut_gemv (decode, batch 1..8): tables T_b[i][c] = codebook_i[c] * x_b[order[i]] are built once per call;
 * each output is then a sum of table look-ups. For one token on AVX-512, a column narrower than 4 bits keeps its
 * table of 2^w entries and loads it with a broadcast (vbroadcastsd / f32x4 / f64x4), which repeats the entries
 * to 16 in the register (T[c] = T[c mod 2^w]), so that the look-up needs no mask of the decoded index: the bits
 * above the code only pick a copy (dropping the AND measured 1.3x faster per 16 weights at 3 bits on Zen 4;
 * broadcasting compact tables instead of storing them repeated, half the table bytes, 1.04x). Batches mask (the
 * mask is shared by their tokens). AVX-512 (with VBMI): one vpmultishiftqb turns a
 * 64-bit window of codes into 16 table indices (rows 0..7 start at bit 0, rows 8..15 at byte w), and vpermps
 * looks the 16 values up in one register (widths above 4 bits use vpermi2ps on 32 entries and blend on the
 * higher bits).
 * AVX2 (8 rows per vector; vpermps holds 8 entries): one broadcast 32-bit load and one vpsrlvd decode 8 codes of
 * up to 4 bits (a vpshufb first above 4 bits); the look-up is one in-lane vpermilps on 4 entries up to 2 bits,
 * one vpermps at 3 (tables repeated to 16 entries for one token, so narrow columns need no mask either), two and a
 * blend at 4 bits, a tree of them at 5 and 6, a gather above.
 * Sparse outliers (CSR, delta = value minus the codebook value they replace) are added per row; batches of 2..8
 * share each decoded window across their tokens. dequant_tile (prefill): tiles of rows of the weight, transposed
 * and in stored column order, float32 or bfloat16, for a dense matmul.
 *
 * Runtime dispatch: isa 2 = AVX-512 (F+BW+VBMI), 1 = AVX2, 0 = portable C; -1 picks the best this CPU supports.
 * No Python or torch headers: called through ctypes with raw pointers.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#define CMPQ_X86 1
#include <immintrin.h>
#endif

#define GROUP 16
#define MAX_BATCH 8

typedef struct {
    int64_t rows, cols, groups, words;      /* words: uint16 words per 16-row group (sum of widths) */
    const uint16_t *codes;                   /* (groups, words), row-packed, + 8 bytes of padding */
    const int32_t *order;                    /* (cols) stored column -> original column */
    const uint8_t *widths;                   /* (cols) width of each stored column */
    const float *codebooks;                  /* flat, stored order */
    const int64_t *cb_offset;                /* (cols) */
    const int64_t *toff;                     /* (cols) column i's table in the call's tables */
    int repeat;                              /* tables repeated to 16 entries (toff = table_offset), else 2^w */
    const int32_t *orow, *ocol;              /* outliers CSR: (rows + 1), (nnz) original columns */
    const float *odelta;                     /* (nnz) value - codebook value */
    const float *bias;                       /* (rows) or NULL */
    int64_t nruns;                           /* runs of equal width: columns [run[k], run[k + 1]) */
    int64_t *run;                            /* found once per call (stored columns are sorted: <= 8 runs) */
} layer_t;

int cmpq_isa_supported(int isa) {
#ifdef CMPQ_X86
    __builtin_cpu_init();
    if (isa == 2)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vbmi");
    if (isa == 1) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    return isa == 0;
}

int cmpq_best_isa(void) {
    for (int isa = 2; isa > 0; --isa)
        if (cmpq_isa_supported(isa)) return isa;
    return 0;
}

/* entries of a repeated table: 2^w, repeated up to 16 */
static inline int64_t table_slots(int w) { return w < 4 ? 16 : (int64_t)1 << w; }

/* ---- tables of columns [i0, i1): T[b * tsize + toff[i] + c] = codebooks[cb_offset[i] + c mod 2^w] * x[b, order[i]]
 * for c below 2^w (or below 16 when repeated) ---- */
static void build_tables(const layer_t *L, const float *x, int64_t batch, float *T, int64_t tsize, int64_t i0,
                         int64_t i1) {
    for (int64_t b = 0; b < batch; ++b) {
        const float *xb = x + b * L->cols;
        float *Tb = T + b * tsize;
        for (int64_t i = i0; i < i1; ++i) {
            const int64_t n = (int64_t)1 << L->widths[i], slots = L->repeat ? table_slots(L->widths[i]) : n;
            const float *cb = L->codebooks + L->cb_offset[i];
            float *t = Tb + L->toff[i];
            const float xv = xb[L->order[i]];
            /* computed, not copied from t: re-reading the entries just stored stalled on store forwarding */
            for (int64_t c = 0; c < slots; ++c) t[c] = cb[c & (n - 1)] * xv;
        }
    }
}

static void add_outliers_and_bias(const layer_t *L, const float *x, int64_t batch, float *y, int64_t r0,
                                  int64_t r1) {
    for (int64_t b = 0; b < batch; ++b) {
        const float *xb = x + b * L->cols;
        float *yb = y + b * L->rows;
        for (int64_t r = r0; r < r1; ++r) {
            /* four partial sums: one chain of dependent adds made this step 15% of a batch-1 call at 0.5% outliers */
            float s[4] = {L->bias ? L->bias[r] : 0.0f, 0.0f, 0.0f, 0.0f};
            int32_t k = L->orow[r];
            const int32_t end = L->orow[r + 1];
            for (; k + 4 <= end; k += 4)
                for (int u = 0; u < 4; ++u) s[u] += L->odelta[k + u] * xb[L->ocol[k + u]];
            for (; k < end; ++k) s[0] += L->odelta[k] * xb[L->ocol[k]];
            yb[r] += (s[0] + s[1]) + (s[2] + s[3]);
        }
    }
}

/* ---- portable C ---- */
static inline uint64_t load64(const void *p) {
    uint64_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

/* code of row r (0..15) in the w words at p */
static inline int code_at(const uint16_t *p, int r, int w) {
    const int bit = r * w, word = bit >> 4, shift = bit & 15;
    uint32_t v = p[word];
    if (shift + w > 16) v |= (uint32_t)p[word + 1] << 16;
    return (int)((v >> shift) & ((1u << w) - 1));
}

static void gemv_portable(const layer_t *L, const float *T, int64_t tsize, int64_t batch, float *y, int64_t g0,
                          int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
        float acc[MAX_BATCH][GROUP];
        memset(acc, 0, sizeof(acc));
        const uint16_t *p = L->codes + g * L->words;
        for (int64_t i = 0; i < L->cols; ++i) {
            const int w = L->widths[i];
            const int64_t off = L->toff[i];
            for (int lane = 0; lane < GROUP; ++lane) {
                const int idx = code_at(p, lane, w);
                for (int64_t b = 0; b < batch; ++b) acc[b][lane] += T[b * tsize + off + idx];
            }
            p += w;
        }
        for (int64_t b = 0; b < batch; ++b)
            for (int lane = 0; lane < GROUP; ++lane) {
                const int64_t r = g * GROUP + lane;
                if (r < L->rows) y[b * L->rows + r] = acc[b][lane];
            }
    }
}

/* ---- tile dequantization (prefill): out[i * ld + r - rbase] for stored column i and row r of groups [g0, g1),
 * float32 or bfloat16 (round to nearest even), so that a dense matmul can use the tile ---- */
static inline uint16_t bf16_bits(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof(u));
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline void put(void *out, int bf16, int64_t e, float v) {
    if (bf16) ((uint16_t *)out)[e] = bf16_bits(v);
    else ((float *)out)[e] = v;
}

static void dequant_portable(const layer_t *L, void *out, int64_t ld, int64_t rbase, int bf16, int64_t g0,
                             int64_t g1) {
    int64_t woff = 0;
    for (int64_t i = 0; i < L->cols; ++i) {
        const int w = L->widths[i];
        const float *cb = L->codebooks + L->cb_offset[i];
        for (int64_t g = g0; g < g1; ++g) {
            const uint16_t *p = L->codes + g * L->words + woff;
            for (int lane = 0; lane < GROUP; ++lane) {
                const int64_t r = g * GROUP + lane;
                if (r < L->rows) put(out, bf16, i * ld + r - rbase, cb[code_at(p, lane, w)]);
            }
        }
        woff += w;
    }
}

#ifdef CMPQ_X86
/* ---- AVX-512 with VBMI ---- */
#define T512 __attribute__((target("avx512f,avx512bw,avx512vbmi")))

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

#define AI __attribute__((always_inline))
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

T512 static void gemv_avx512(const layer_t *L, const float *T, int64_t tsize, int64_t batch, float *y, int64_t g0,
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

T512 static void dequant_avx512(const layer_t *L, void *out, int64_t ld, int64_t rbase, int bf16, int64_t g0,
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

/* ---- AVX2: 8 rows at a time (rows 8h..8h+7 of a group start at byte h*w); vpermps holds 8 entries ---- */
#define T256 __attribute__((target("avx2,fma")))

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

static inline uint32_t load32(const void *p) {
    uint32_t v;
    memcpy(&v, p, sizeof(v));
    return v;
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

/* build_tables with 8 entries per instruction: each column's first 8 entries (2^w of them repeated below 3 bits,
 * one vpermps of the codebook) times x, stored once or twice; wider columns in steps of 8. The scalar loop stored
 * one float at a time and took 17% of a call on 576x576 at 3 bits. Reads up to 8 floats past a codebook (the
 * caller pads the codebooks by 16). */
T256 static void build_tables256(const layer_t *L, const float *x, int64_t batch, float *T, int64_t tsize, int64_t i0,
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
typedef const uint16_t *(*seg256_fn)(const float *, int64_t, int64_t, const uint16_t *, int64_t, int, __m256 *);
#define SEG256(B, H, W)                                                                                         \
    T256 static __attribute__((noinline)) const uint16_t *seg256_##B##_##H##_##W(                               \
        const float *t, int64_t tsize, int64_t n, const uint16_t *p, int64_t words, int h0, __m256 *acc) {      \
        return seg256(t, tsize, n, p, words, h0, acc, B, H, W);                                                 \
    }
#define SEG256_WIDTHS(B, H) SEG256(B, H, 1) SEG256(B, H, 2) SEG256(B, H, 3) SEG256(B, H, 4) SEG256(B, H, 5)        \
    SEG256(B, H, 6) SEG256(B, H, 7) SEG256(B, H, 8)                                                             \
    static const seg256_fn seg256_##B##_##H[9] = {NULL, seg256_##B##_##H##_1, seg256_##B##_##H##_2,              \
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

T256 static void gemv_avx2(const layer_t *L, const float *T, int64_t tsize, int64_t batch, float *y, int64_t g0,
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

T256 static inline void store256(void *out, int bf16, int64_t e, __m256 v,
                                                                  int64_t left) {
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

T256 static void dequant_avx2(const layer_t *L, void *out, int64_t ld, int64_t rbase, int bf16, int64_t g0,
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

static void make_layer(layer_t *L, int64_t rows, int64_t cols, const uint16_t *codes, const int32_t *order,
                       const uint8_t *widths, const float *codebooks, const int64_t *cb_offset,
                       const int32_t *orow, const int32_t *ocol, const float *odelta, const float *bias) {
    L->rows = rows; L->cols = cols; L->groups = (rows + GROUP - 1) / GROUP;
    L->words = 0;
    for (int64_t i = 0; i < cols; ++i) L->words += widths[i];
    L->codes = codes; L->order = order; L->widths = widths; L->codebooks = codebooks; L->cb_offset = cb_offset;
    L->toff = cb_offset;
    L->repeat = 0;
    L->orow = orow; L->ocol = ocol; L->odelta = odelta; L->bias = bias;
    L->nruns = 0;
    L->run = NULL;
}

/* Runs of equal width (scanning them per 64-row pass cost as much as the look-ups on wide layers). Returns 0, or
 * -1 when out of memory. */
static int find_runs(layer_t *L) {
    L->run = (int64_t *)malloc(sizeof(int64_t) * (size_t)(L->cols + 1));
    if (!L->run) return -1;
    L->nruns = 0;
    for (int64_t i = 0; i < L->cols; ++i)
        if (i == 0 || L->widths[i] != L->widths[i - 1]) L->run[L->nruns++] = i;
    L->run[L->nruns] = L->cols;
    return 0;
}

/* threads for one call (0: the OpenMP default), without changing the runtime's setting for later calls */
static int threads_for(int nthreads) {
#ifdef _OPENMP
    return nthreads > 0 ? nthreads : omp_get_max_threads();
#else
    (void)nthreads;
    return 1;
#endif
}

/* [*lo, *hi): the calling thread's contiguous share of n items, inside an OpenMP parallel region */
static void thread_share(int64_t n, int64_t *lo, int64_t *hi) {
#ifdef _OPENMP
    const int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
#else
    const int64_t team = 1, me = 0;
#endif
    const int64_t per = (n + team - 1) / team;
    *lo = me * per < n ? me * per : n;
    *hi = *lo + per < n ? *lo + per : n;
}

/* y (batch, rows) = x (batch, cols) W^T (+ bias); tables: scratch of batch * table_size floats (+16 padding),
 * column i's table at table_offset[i] (max(16, 2^w_i) floats; table_size at least their sum). Returns 0, -1 for
 * an unsupported isa / batch or a too small table_size, -2 when out of memory. */
int cmpq_lut_gemv(const float *x, int64_t batch, float *y, float *tables, int64_t table_size, int64_t rows,
                  int64_t cols, const uint16_t *codes, const int32_t *order, const uint8_t *widths,
                  const float *codebooks, const int64_t *cb_offset, const int64_t *table_offset, const int32_t *orow,
                  const int32_t *ocol, const float *odelta, const float *bias, int isa, int nthreads) {
    if (isa < 0) isa = cmpq_best_isa();
    if (!cmpq_isa_supported(isa) || batch < 1 || batch > MAX_BATCH) return -1;
    if (cols > 0 && table_offset[cols - 1] + table_slots(widths[cols - 1]) > table_size) return -1;
    layer_t L;
    make_layer(&L, rows, cols, codes, order, widths, codebooks, cb_offset, orow, ocol, odelta, bias);
    L.repeat = isa == 1 && batch == 1;  /* the AVX2 batch-1 loop looks up without a mask in stored repeats */
    if (L.repeat) L.toff = table_offset;
    if (find_runs(&L) != 0) return -2;
    const int threads = threads_for(nthreads);
    /* chunks of groups for the AVX-512 passes: 8 (128 rows) for one token when there are at least 8 per thread
     * (fewer would leave the threads unbalanced), else 4 */
    const int64_t per_chunk = isa == 2 && batch == 1 && L.groups >= 64 * threads ? 8 : 4;
    const int64_t chunks = (L.groups + per_chunk - 1) / per_chunk;
#pragma omp parallel num_threads(threads)
    {
        /* each thread builds the tables of its share of the columns (built by one, the others waited) */
        int64_t i0, i1;
        thread_share(cols, &i0, &i1);
#ifdef CMPQ_X86
        if (isa >= 1) build_tables256(&L, x, batch, tables, table_size, i0, i1);
        else
#endif
            build_tables(&L, x, batch, tables, table_size, i0, i1);
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t c = 0; c < chunks; ++c) {
            const int64_t g0 = per_chunk * c, g1 = g0 + per_chunk < L.groups ? g0 + per_chunk : L.groups;
#ifdef CMPQ_X86
            if (isa == 2) gemv_avx512(&L, tables, table_size, batch, y, g0, g1);
            else if (isa == 1) gemv_avx2(&L, tables, table_size, batch, y, g0, g1);
            else
#endif
                gemv_portable(&L, tables, table_size, batch, y, g0, g1);
            const int64_t r1 = g1 * GROUP < rows ? g1 * GROUP : rows;
            add_outliers_and_bias(&L, x, batch, y, g0 * GROUP, r1);
        }
    }
    free(L.run);
    return 0;
}

/* out (cols, ld): rows [g0 * 16, min(g1 * 16, rows)) of the dequantized weight, transposed (stored column i at
 * out[i * ld + r - g0 * 16]), float32 or bfloat16 (bf16 = 1), with the outliers (CSR by row: orow; their stored
 * column opos and value ovalue) written in place: the tile a prefill matmul reads. Returns 0, -1 for an
 * unsupported isa or range, -2 when out of memory. */
int cmpq_dequant_tile(void *out, int64_t ld, int64_t g0, int64_t g1, int bf16, int64_t rows, int64_t cols,
                      const uint16_t *codes, const uint8_t *widths, const float *codebooks, const int64_t *cb_offset,
                      const int32_t *orow, const int32_t *opos, const float *ovalue, int isa, int nthreads) {
    if (isa < 0) isa = cmpq_best_isa();
    layer_t L;
    make_layer(&L, rows, cols, codes, NULL, widths, codebooks, cb_offset, NULL, NULL, NULL, NULL);
    if (!cmpq_isa_supported(isa) || g0 < 0 || g1 > L.groups || g0 >= g1 || ld < (g1 - g0) * GROUP) return -1;
    if (find_runs(&L) != 0) return -2;
    const int threads = threads_for(nthreads);
    (void)threads;  /* only read by OpenMP */
    const int64_t rbase = g0 * GROUP;
#pragma omp parallel num_threads(threads)
    {
        /* contiguous runs of groups per thread: the column-outer loops write long runs of each output row */
        int64_t a, b;
        thread_share(g1 - g0, &a, &b);
        a += g0;
        b += g0;
        if (a < b) {
#ifdef CMPQ_X86
            if (isa == 2) dequant_avx512(&L, out, ld, rbase, bf16, a, b);
            else if (isa == 1) dequant_avx2(&L, out, ld, rbase, bf16, a, b);
            else
#endif
                dequant_portable(&L, out, ld, rbase, bf16, a, b);
            const int64_t r1 = b * GROUP < rows ? b * GROUP : rows;
            for (int64_t r = a * GROUP; r < r1; ++r)
                for (int32_t k = orow[r]; k < orow[r + 1]; ++k) put(out, bf16, opos[k] * ld + r - rbase, ovalue[k]);
        }
    }
    free(L.run);
    return 0;
}

#define INT8_BLOCK 32
#define INT8_MAX_W 4

/* ---- int8 look-up tables (approximate; the default for one token): AVX-512 with VBMI and VNNI, or AVX2 ----
 * Columns of up to 4 bits, in blocks of 32 stored columns of one width, get int8 tables: q_i[c] =
 * round(codebook_i[c] * x_i * 127 / m), m the block's largest |codebook_i[c] * x_i| (so each product is rounded
 * to 8 bits of its block's largest), and the block's integer sums are scaled by m / 127 into the float
 * accumulators. Wider columns, the outliers and the bias stay exact. Both ISAs compute the same integers.
 * AVX-512: a 64-byte vpermb table holds 64 / 2^w columns, and per 16 rows x 4 columns (64 weights) the loop
 * does one vpermb spreading the codes (rows 2q and 2q + 1 of the 4 columns, w bytes, to 64-bit lane q), one
 * vpmultishiftqb (one code per byte), one vpternlogd (mask and column slot), one vpermb look-up and one vpdpbusd
 * (each row's 4 values summed into its int32 lane): about 1.3 instructions per 16 weights against 3 for float
 * tables (benchmarks/microbench/int8_tables.c). Its codes (codes8, made by cmpq/kernels/native.py): per 16-row
 * group, for each run of width w <= 4 in stored order, ceil(n / 4) quads of 8 w bytes, column c of a quad and
 * row r at bits (4 r + c) w; `stride8` bytes per group, plus 64 bytes of padding at the end.
 * AVX2: a 16-byte vpshufb table holds a pair of columns of up to 3 bits (8 entries each) or one column of 4
 * bits. Codes are nibbles (codes8 again, another layout): per group and run, quads of 4 columns in 32 bytes;
 * byte k holds row 8 (k / 16) + (k % 16) / 2, its low nibble the quad's column k % 2 and its high nibble column
 * 2 + k % 2; below 4 bits the second column of a pair is stored as code + 8 (its half of the pair's table).
 * Per 64 weights: vpand, vpsrlw, vpand (both nibbles), then per pair one vpshufb, one vpmaddubsw (the pair
 * summed per row into int16) and one vpaddw (4 bits: two vpshufb on indices masked by bit 7, merged by vpor);
 * a block's int16 sums (at most 32 x 127) are widened and scaled once per block. */
#ifdef CMPQ_X86
#define T512I __attribute__((target("avx512f,avx512bw,avx512vbmi,avx512vnni")))
#endif

/* the int8-table kernel for ISA code `isa` (-1: the best this CPU has): 2 (AVX-512 VBMI + VNNI), 1 (AVX2; also
 * on AVX-512 CPUs without VNNI), 0 (none: portable code keeps float tables) */
int cmpq_int8_isa(int isa) {
#ifdef CMPQ_X86
    if (isa < 0) isa = cmpq_best_isa();
    if (isa == 2 && cmpq_isa_supported(2) && __builtin_cpu_supports("avx512vnni")) return 2;
    if (isa >= 1 && cmpq_isa_supported(1)) return 1;
#else
    (void)isa;
#endif
    return 0;
}

/* bytes of one block's int8 tables: AVX-512 32 x 2^w, AVX2 32 x 8 below 4 bits (pairs of 8-entry halves) */
static inline int64_t int8_block_bytes(int w, int isa) {
    return isa == 2 ? (int64_t)INT8_BLOCK << w : (int64_t)INT8_BLOCK * (w < 4 ? 8 : 16);
}

/* bytes of int8 tables and number of blocks of a layer's columns of up to 4 bits (widths in stored order) */
static void int8_sizes(const uint8_t *widths, int64_t cols, int isa, int64_t *bytes, int64_t *blocks) {
    *bytes = *blocks = 0;
    for (int64_t i = 0; i < cols;) {
        int64_t j = i;
        while (j < cols && widths[j] == widths[i]) ++j;
        if (widths[i] <= 4) {
            const int64_t nb = (j - i + 31) / 32;
            *blocks += nb;
            *bytes += nb * int8_block_bytes(widths[i], isa);
        }
        i = j;
    }
}

void cmpq_int8_sizes(const uint8_t *widths, int64_t cols, int isa, int64_t *out) {
    int8_sizes(widths, cols, isa, out, out + 1);
}

#ifdef CMPQ_X86
/* block b of a run (first stored column a, n columns): its first column, its column count, and its largest
 * |codebook entry * x| (from each column's largest |entry|, amax), whose 1 / 127 is the block's scale */
static inline float int8_block_top(const layer_t *L, const float *x, const float *amax, int64_t a, int64_t n,
                                   int64_t b, int64_t *first, int64_t *m) {
    *first = a + b * INT8_BLOCK;
    *m = n - b * INT8_BLOCK < INT8_BLOCK ? n - b * INT8_BLOCK : INT8_BLOCK;
    float top = 0.0f;
    for (int64_t i = 0; i < *m; ++i) {
        const float xv = x[L->order[*first + i]], v = amax[*first + i] * (xv < 0 ? -xv : xv);
        top = v > top ? v : top;
    }
    return top;
}

/* int8 tables and scales of blocks [b0, b1) of run k's blocks (first stored column a, n columns, width w) */
T512I static void build_int8_run(const layer_t *L, const float *x, const float *amax, int64_t a, int64_t n, int w,
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

/* AVX2 tables of blocks [b0, b1) of a run (first stored column a, n columns, width w <= 4): per block 32 columns
 * of 8 bytes below 4 bits (pair p's table is bytes 16 p .. 16 p + 15: column 2 p, then 2 p + 1) or of 16 bytes
 * at 4 bits; entries past 2^w and columns past n are 0. The same integers as build_int8_run: the same float
 * products, scale and rounding (nearest, ties to even). */
T256 static void build_int8_run256(const layer_t *L, const float *x, const float *amax, int64_t a, int64_t n, int w,
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

typedef struct {
    const uint8_t *codes8;
    int64_t stride8;
    const int8_t *T8;
    const float *scales;
    int64_t t8off[9], boff[9], c8off[9];  /* per run: its tables, first block and codes within a group */
} int8_view_t;

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

T512I static void gemv_int8_groups(const layer_t *L, const int8_view_t *V, const float *T, float *y, int64_t g,
                                   int64_t g1) {
    for (; g + 4 <= g1; g += 4) gemv1_int8(L, V, T, y, g, 4);
    for (; g < g1; ++g) gemv1_int8(L, V, T, y, g, 1);
}

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

T256 static void gemv_int8_groups256(const layer_t *L, const int8_view_t *V, const float *T, float *y, int64_t g,
                                     int64_t g1) {
    for (; g + 4 <= g1; g += 4) gemv1_int8_256(L, V, T, y, g, 4);
    for (; g < g1; ++g) gemv1_int8_256(L, V, T, y, g, 1);
}
#endif

/* y (1, rows) = x (1, cols) W^T (+ bias) with int8 tables for the columns of up to 4 bits (see above), by the
 * int8 kernel `isa` (2: AVX-512, 1: AVX2; codes8 in that kernel's layout). tables: float scratch as for
 * cmpq_lut_gemv (used by the wider columns); tables8 / scales: scratch of at least the bytes / blocks that
 * cmpq_int8_sizes gives for `isa`; amax (cols): each stored column's largest |codebook entry|.
 * Returns 0, -1 when this CPU lacks that kernel or a scratch is too small, -2 when out of memory. */
int cmpq_lut_gemv_int8(const float *x, float *y, float *tables, int64_t table_size, int8_t *tables8,
                       int64_t tables8_size, float *scales, int64_t scales_size, int64_t rows, int64_t cols,
                       const uint16_t *codes, const uint8_t *codes8, int64_t stride8, const int32_t *order,
                       const uint8_t *widths, const float *codebooks, const int64_t *cb_offset, const float *amax,
                       const int32_t *orow, const int32_t *ocol, const float *odelta, const float *bias,
                       int isa, int nthreads) {
#ifdef CMPQ_X86
    if ((isa != 1 && isa != 2) || cmpq_int8_isa(isa) != isa) return -1;
    int64_t need8, nblocks;
    int8_sizes(widths, cols, isa, &need8, &nblocks);
    if (need8 > tables8_size || nblocks > scales_size) return -1;
    int64_t last = 0;  /* float tables of 2^w entries at cb_offset: the end of the last column's */
    if (cols > 0) last = cb_offset[cols - 1] + ((int64_t)1 << widths[cols - 1]);
    if (last > table_size) return -1;
    layer_t L;
    make_layer(&L, rows, cols, codes, order, widths, codebooks, cb_offset, orow, ocol, odelta, bias);
    if (find_runs(&L) != 0) return -2;
    int8_view_t V = {codes8, stride8, tables8, scales, {0}, {0}, {0}};
    for (int64_t k = 0, t8 = 0, b = 0, c8 = 0; k < L.nruns; ++k) {
        const int64_t n = L.run[k + 1] - L.run[k];
        const int w = widths[L.run[k]];
        V.t8off[k] = t8; V.boff[k] = b; V.c8off[k] = c8;
        if (w <= INT8_MAX_W) {
            const int64_t nb = (n + INT8_BLOCK - 1) / INT8_BLOCK;
            t8 += nb * int8_block_bytes(w, isa);
            b += nb;
            c8 += (n + 3) / 4 * (isa == 2 ? 8 * w : 32);
        }
    }
    const int threads = threads_for(nthreads);
    const int64_t chunks = (L.groups + 3) / 4;
#pragma omp parallel num_threads(threads)
    {
        int64_t i0, i1;
        for (int64_t k = 0; k < L.nruns; ++k) {  /* each thread its share of every run's columns or blocks */
            const int64_t a = L.run[k], n = L.run[k + 1] - a;
            const int w = widths[a];
            if (w > INT8_MAX_W) {  /* wide columns: float tables */
                thread_share(n, &i0, &i1);
                build_tables256(&L, x, 1, tables, table_size, a + i0, a + i1);
                continue;
            }
            int64_t b0, b1;
            thread_share((n + INT8_BLOCK - 1) / INT8_BLOCK, &b0, &b1);
            if (isa == 2)
                build_int8_run(&L, x, amax, a, n, w, tables8 + V.t8off[k], scales + V.boff[k], b0, b1);
            else
                build_int8_run256(&L, x, amax, a, n, w, tables8 + V.t8off[k], scales + V.boff[k], b0, b1);
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t c = 0; c < chunks; ++c) {
            const int64_t g0 = 4 * c, g1 = g0 + 4 < L.groups ? g0 + 4 : L.groups;
            if (isa == 2)
                gemv_int8_groups(&L, &V, tables, y, g0, g1);
            else
                gemv_int8_groups256(&L, &V, tables, y, g0, g1);
            add_outliers_and_bias(&L, x, 1, y, g0 * GROUP, g1 * GROUP < rows ? g1 * GROUP : rows);
        }
    }
    free(L.run);
    return 0;
#else
    (void)x; (void)y; (void)tables; (void)table_size; (void)tables8; (void)tables8_size; (void)scales;
    (void)scales_size; (void)rows; (void)cols; (void)codes; (void)codes8; (void)stride8; (void)order; (void)widths;
    (void)codebooks; (void)cb_offset; (void)amax; (void)orow; (void)ocol; (void)odelta; (void)bias; (void)isa;
    (void)nthreads;
    return -1;
#endif
}
