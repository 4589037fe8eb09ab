/* Portable C kernels (any CPU; the only ones off x86): float tables, the LUT-GEMV loop and tile dequantization,
 * one scalar look-up per weight and token. */
#include "cmpq_kernels.h"

/* ---- tables of columns [i0, i1): T[b * tsize + toff[i] + c] = codebooks[cb_offset[i] + c mod 2^w] * x[b, order[i]]
 * for c below 2^w (or below 16 when repeated) ---- */
void build_tables(const layer_t *L, const float *x, int64_t batch, float *T, int64_t tsize, int64_t i0,
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

/* ---- the LUT-GEMV loop: per 16-row group, every column's 16 codes looked up for each token ---- */
void gemv_portable(const layer_t *L, const float *T, int64_t tsize, int64_t batch, float *y, int64_t g0,
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
void dequant_portable(const layer_t *L, void *out, int64_t ld, int64_t rbase, int bf16, int64_t g0,
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
