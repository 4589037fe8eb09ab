/* The native decode engine (the model it runs: engine.h). One call of cmpq_engine_forward runs n tokens at
 * positions pos .. pos + n - 1 through every block in one OpenMP team: the team splits each stage (norms, the
 * linears, rotary embeddings, attention, the MLP) and meets at a barrier between stages, so that a token costs one
 * call from Python and no thread start.
 *
 * Linears: a packed CMPQ layer runs the LUT-GEMV (lut_gemv_team, float tables) for up to lut_tokens tokens, and
 * above that dequantized strips of STRIP rows (dequant_groups) times the permuted input (dense GEMM); a float
 * layer runs dense GEMV for a few tokens, transposed strips and the same GEMM above. Long prompts go in chunks of
 * CHUNK tokens. The KV cache is float32: V (block, kv head, position, head_dim), K in blocks of KV_BLOCK positions
 * transposed (key_at), so that attention's two products are dense tiles too. */
#include "engine.h"

#include <math.h>

#include "dense.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#define CHUNK 512            /* tokens per internal step of a long prompt */
#define FLOAT_GEMV_TOKENS 4
#define KV_BLOCK 64          /* positions per block of the K cache (a STRIP: one tile of a GEMM) */  /* float layers: GEMV per token up to this many tokens, strips and GEMM above */

typedef struct {
    const cmpq_linear_t *src;
    layer_t one;    /* a packed layer's view for one token (tables as this ISA's one-token loop reads them) */
    layer_t batch;  /* and for 2..8 tokens */
} linear_t;

struct cmpq_engine {
    cmpq_model_t m;
    cmpq_block_t *blocks;            /* the caller's blocks, copied */
    linear_t *lin;                   /* 7 per block, then the head */
    const cmpq_kernels_t *K;
    const dense_kernels_t *D;
    int64_t lut_tokens;              /* packed layers: LUT-GEMV up to this many tokens */
    int64_t max_cols, table_size;
    int64_t ctx_pad;                 /* context rounded up to KV_BLOCK */
    float *kcache, *vcache;
    /* scratch of CHUNK tokens: residual h, normed xn, q / k / v, attention output, gate and up, linear output y,
     * permuted input xp (+ GEMM_TOKENS zero rows), rotary cos / sin, LUT tables */
    float *h, *xn, *q, *k, *v, *att, *g, *u, *y, *xp, *cos, *sin, *tables;
    float *per_thread;               /* per thread: a tile, a GEMM tail, attention scores */
    int64_t threads_allocated, per_thread_floats;
};

int64_t cmpq_engine_struct_size(int which) {
    switch (which) {
        case 0: return (int64_t)sizeof(cmpq_linear_t);
        case 1: return (int64_t)sizeof(cmpq_block_t);
        case 2: return (int64_t)sizeof(cmpq_model_t);
        case 3: return (int64_t)offsetof(cmpq_block_t, sliding_window);
        case 4: return (int64_t)offsetof(cmpq_model_t, blocks);
        default: return -1;
    }
}

static int check_linear(const cmpq_linear_t *l, int64_t rows, int64_t cols) {
    if (l->rows != rows || l->cols != cols) return 0;
    if (l->kind == LINEAR_FLOAT) return l->weight != NULL;
    if (l->kind == LINEAR_CMPQ) return l->packed && l->packed->rows == rows && l->packed->cols == cols;
    return 0;
}

static int prepare_linear(cmpq_engine_t *E, linear_t *out, const cmpq_linear_t *src) {
    out->src = src;
    memset(&out->one, 0, sizeof(out->one));
    memset(&out->batch, 0, sizeof(out->batch));
    if (src->cols > E->max_cols) E->max_cols = src->cols;
    if (src->kind != LINEAR_CMPQ) return ENGINE_OK;
    const cmpq_layer_t *p = src->packed;
    if (p->cols > 0 && p->table_offset[p->cols - 1] + table_slots(p->widths[p->cols - 1]) > p->table_size)
        return ENGINE_BAD_ARG;
    if (p->table_size > E->table_size) E->table_size = p->table_size;
    make_layer(&out->batch, p, src->bias);
    if (find_runs(&out->batch) != 0) return ENGINE_NO_MEMORY;
    out->one = out->batch;
    out->one.run = NULL;
    if (find_runs(&out->one) != 0) return ENGINE_NO_MEMORY;
    out->one.repeat = E->K->repeat_one_token;
    if (out->one.repeat) out->one.toff = p->table_offset;
    return ENGINE_OK;
}

void cmpq_engine_free(cmpq_engine_t *E) {
    if (!E) return;
    if (E->lin)
        for (int64_t i = 0; i < E->m.n_blocks * 7 + 1; ++i) {
            free(E->lin[i].one.run);
            free(E->lin[i].batch.run);
        }
    free(E->lin);
    free(E->blocks);
    free(E->kcache); free(E->vcache);
    free(E->h); free(E->xn); free(E->q); free(E->k); free(E->v); free(E->att); free(E->g); free(E->u);
    free(E->y); free(E->xp); free(E->cos); free(E->sin); free(E->tables); free(E->per_thread);
    free(E);
}

static float *floats(int64_t n) { return (float *)calloc((size_t)(n > 0 ? n : 1), sizeof(float)); }

cmpq_engine_t *cmpq_engine_create(const cmpq_model_t *model, int isa, int *status) {
    int dummy;
    if (!status) status = &dummy;
    *status = ENGINE_BAD_ARG;
    if (!model || !model->blocks || !model->embed || !model->final_norm || !model->inv_freq) return NULL;
    const cmpq_model_t *m = model;
    if (m->n_blocks < 1 || m->hidden < 1 || m->intermediate < 1 || m->n_heads < 1 || m->n_kv_heads < 1 ||
        m->head_dim < 2 || m->head_dim % 2 || m->vocab < 1 || m->context < 1 || m->n_heads % m->n_kv_heads)
        return NULL;
    const int64_t qdim = m->n_heads * m->head_dim, kvdim = m->n_kv_heads * m->head_dim;
    for (int64_t b = 0; b < m->n_blocks; ++b) {
        const cmpq_block_t *B = &m->blocks[b];
        if (!check_linear(&B->q, qdim, m->hidden) || !check_linear(&B->k, kvdim, m->hidden) ||
            !check_linear(&B->v, kvdim, m->hidden) || !check_linear(&B->o, m->hidden, qdim) ||
            !check_linear(&B->gate, m->intermediate, m->hidden) || !check_linear(&B->up, m->intermediate, m->hidden) ||
            !check_linear(&B->down, m->hidden, m->intermediate) || !B->attn_norm || !B->mlp_norm ||
            B->sliding_window < 0)
            return NULL;
    }
    if (!check_linear(&m->head, m->vocab, m->hidden)) return NULL;
    const cmpq_kernels_t *K = kernels_for(isa);
    const dense_kernels_t *D = dense_kernels_for(isa);
    if (!K || !D) return NULL;
    *status = ENGINE_NO_MEMORY;
    cmpq_engine_t *E = (cmpq_engine_t *)calloc(1, sizeof(cmpq_engine_t));
    if (!E) return NULL;
    E->m = *m;
    E->K = K;
    E->D = D;
    E->lut_tokens = (isa < 0 ? cmpq_best_isa() : isa) == 2 ? 32 : MAX_BATCH;
    E->blocks = (cmpq_block_t *)malloc(sizeof(cmpq_block_t) * (size_t)m->n_blocks);
    E->lin = (linear_t *)calloc((size_t)(m->n_blocks * 7 + 1), sizeof(linear_t));
    if (!E->blocks || !E->lin) goto fail;
    memcpy(E->blocks, m->blocks, sizeof(cmpq_block_t) * (size_t)m->n_blocks);
    E->m.blocks = E->blocks;
    for (int64_t b = 0; b < m->n_blocks; ++b) {
        const cmpq_linear_t *parts[7] = {&E->blocks[b].q, &E->blocks[b].k, &E->blocks[b].v, &E->blocks[b].o,
                                         &E->blocks[b].gate, &E->blocks[b].up, &E->blocks[b].down};
        for (int j = 0; j < 7; ++j)
            if ((*status = prepare_linear(E, &E->lin[b * 7 + j], parts[j])) != ENGINE_OK) goto fail;
    }
    if ((*status = prepare_linear(E, &E->lin[m->n_blocks * 7], &E->m.head)) != ENGINE_OK) goto fail;
    *status = ENGINE_NO_MEMORY;
    E->ctx_pad = (m->context + KV_BLOCK - 1) / KV_BLOCK * KV_BLOCK;
    size_t cache = (size_t)m->n_blocks * (size_t)kvdim * (size_t)E->ctx_pad;
    if (cache / (size_t)m->n_blocks / (size_t)kvdim != (size_t)E->ctx_pad) goto fail;
    cache += STRIP;  /* row-times-tile loads read whole registers past a row's end */
    E->kcache = (float *)calloc(cache, sizeof(float));  /* untouched pages stay unmapped */
    E->vcache = (float *)calloc(cache, sizeof(float));
    const int64_t pad = CHUNK + GEMM_TOKENS;
    E->h = floats(CHUNK * m->hidden); E->xn = floats(CHUNK * m->hidden); E->y = floats(CHUNK * m->hidden);
    E->q = floats(pad * qdim); E->att = floats(pad * qdim);  /* attention reads and writes whole token blocks */
    E->k = floats(CHUNK * kvdim); E->v = floats(CHUNK * kvdim);
    E->g = floats(CHUNK * m->intermediate); E->u = floats(CHUNK * m->intermediate);
    E->xp = floats(pad * E->max_cols);
    E->cos = floats(CHUNK * m->head_dim / 2); E->sin = floats(CHUNK * m->head_dim / 2);
    E->tables = floats(MAX_BATCH * E->table_size + 64);
    if (!E->kcache || !E->vcache || !E->h || !E->xn || !E->y || !E->q || !E->att || !E->k || !E->v || !E->g ||
        !E->u || !E->xp || !E->cos || !E->sin || !E->tables)
        goto fail;
    E->per_thread_floats = E->max_cols * STRIP + GEMM_TOKENS * STRIP + GEMM_TOKENS * E->ctx_pad + 64;
    *status = ENGINE_OK;
    return E;
fail:
    cmpq_engine_free(E);
    return NULL;
}

/* ---- stages, each run by every thread of the team and ending at a barrier ---- */

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* rows [r0, r0 + nr) of y (n, ldy) from a tile (k, STRIP) and A (n padded to GEMM_TOKENS, lda) */
static void strip_product(const cmpq_engine_t *E, const float *A, int64_t lda, int64_t n, const float *tile,
                          int64_t k, int64_t r0, int64_t nr, float *y, int64_t ldy, const float *bias, float *tail) {
    const int64_t full = n / GEMM_TOKENS * GEMM_TOKENS;
    if (full) E->D->gemm(A, lda, full, tile, STRIP, k, nr, y + r0, ldy);
    if (full < n) {  /* the last tokens into a scratch: y has exactly n rows */
        E->D->gemm(A + full * lda, lda, GEMM_TOKENS, tile, STRIP, k, nr, tail, STRIP);
        for (int64_t t = full; t < n; ++t) memcpy(y + t * ldy + r0, tail + (t - full) * STRIP, sizeof(float) * nr);
    }
    if (bias)
        for (int64_t t = 0; t < n; ++t)
            for (int64_t r = 0; r < nr; ++r) y[t * ldy + r0 + r] += bias[r0 + r];
}

/* y (n, rows) = x (n, cols) W^T + bias */
static void linear_team(cmpq_engine_t *E, const linear_t *lin, const float *x, int64_t n, float *y, float *mine) {
    const cmpq_linear_t *l = lin->src;
    const int64_t rows = l->rows, cols = l->cols;
    float *tile = mine, *tail = mine + E->max_cols * STRIP;
    if (l->kind == LINEAR_CMPQ && n <= E->lut_tokens) {
        for (int64_t t = 0; t < n; t += MAX_BATCH) {
            const int64_t b = n - t < MAX_BATCH ? n - t : MAX_BATCH;
            lut_gemv_team(E->K, b == 1 ? &lin->one : &lin->batch, x + t * cols, b, y + t * rows, E->tables,
                          l->packed->table_size);
        }
        return;
    }
    if (l->kind == LINEAR_FLOAT && n <= FLOAT_GEMV_TOKENS) {
        const int64_t chunks = (rows + STRIP - 1) / STRIP;
#pragma omp for schedule(static)
        for (int64_t c = 0; c < chunks; ++c) {
            const int64_t r0 = c * STRIP, r1 = r0 + STRIP < rows ? r0 + STRIP : rows;
            for (int64_t t = 0; t < n; ++t) {
                E->D->gemv(l->weight, cols, x + t * cols, y + t * rows, r0, r1);
                if (l->bias)
                    for (int64_t r = r0; r < r1; ++r) y[t * rows + r] += l->bias[r];
            }
        }
        return;
    }
    /* strips: the input in the tile's column order, padded with zero tokens */
    const int32_t *order = l->kind == LINEAR_CMPQ ? l->packed->order : NULL;
    const int64_t padded = (n + GEMM_TOKENS - 1) / GEMM_TOKENS * GEMM_TOKENS;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < padded; ++t) {
        float *dst = E->xp + t * cols;
        if (t >= n) memset(dst, 0, sizeof(float) * cols);
        else if (order) for (int64_t i = 0; i < cols; ++i) dst[i] = x[t * cols + order[i]];
        else memcpy(dst, x + t * cols, sizeof(float) * cols);
    }
    const int64_t strips = (rows + STRIP - 1) / STRIP;
#pragma omp for schedule(static)
    for (int64_t s = 0; s < strips; ++s) {
        const int64_t r0 = s * STRIP, nr = rows - r0 < STRIP ? rows - r0 : STRIP;
        if (order) {
            dequant_groups(E->K, &lin->batch, l->packed, tile, STRIP, r0, 0, r0 / GROUP, (r0 + nr + GROUP - 1) / GROUP);
        } else {
            for (int64_t r = 0; r < nr; ++r) {
                const float *w = l->weight + (r0 + r) * cols;
                for (int64_t i = 0; i < cols; ++i) tile[i * STRIP + r] = w[i];
            }
        }
        strip_product(E, E->xp, cols, n, tile, cols, r0, nr, y, rows, l->bias, tail);
    }
}

/* out (n, hidden) = RMSNorm(x) * weight */
static void norm_team(const cmpq_engine_t *E, const float *x, const float *weight, int64_t n, float *out) {
    const int64_t d = E->m.hidden;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n; ++t) {
        const float *xt = x + t * d;
        double s = 0.0;
        for (int64_t i = 0; i < d; ++i) s += (double)xt[i] * xt[i];
        const float r = 1.0f / sqrtf((float)(s / (double)d) + (float)E->m.norm_eps);
        for (int64_t i = 0; i < d; ++i) out[t * d + i] = weight[i] * (xt[i] * r);
    }
}

static void add_team(float *h, const float *y, int64_t n, int64_t d) {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n; ++t)
        for (int64_t i = 0; i < d; ++i) h[t * d + i] += y[t * d + i];
}

/* rotate the two halves of v (head_dim) by the angles of token t */
static void rope(const cmpq_engine_t *E, float *v, int64_t t) {
    const int64_t half = E->m.head_dim / 2;
    const float *c = E->cos + t * half, *s = E->sin + t * half;
    for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i] + a * s[i];
    }
}

/* where key element i of position p of kv head kv sits in a block's K cache: blocks of KV_BLOCK positions, each
 * (head_dim, KV_BLOCK), so that the scores of KV_BLOCK positions are one row-times-tile product */
static inline int64_t key_at(const cmpq_engine_t *E, int64_t kv, int64_t p, int64_t i) {
    return (kv * E->ctx_pad + p / KV_BLOCK * KV_BLOCK) * E->m.head_dim + i * KV_BLOCK + p % KV_BLOCK;
}

/* first key position that a query at position p sees */
static inline int64_t first_key(int64_t p, int64_t window) { return window > 0 && p - window + 1 > 0 ? p - window + 1 : 0; }

/* scores of rows queries (rows of S, ldS apart) -> softmax weights over keys [lo_r, p_r] of each row (S starts at
 * key position base); other entries 0 */
static void softmax_rows(const cmpq_engine_t *E, float *S, int64_t ldS, int64_t rows, int64_t p0, int64_t base,
                         int64_t len, int64_t window) {
    const float scale = (float)E->m.attn_scale;
    for (int64_t r = 0; r < rows; ++r) {
        float *s = S + r * ldS;
        const int64_t p = p0 + r, a = first_key(p, window) - base, b = p - base + 1;
        float top = -INFINITY;
        for (int64_t j = a; j < b; ++j) {
            s[j] *= scale;
            top = s[j] > top ? s[j] : top;
        }
        const float inv = 1.0f / E->D->exp_sum(s + a, b - a, top);
        for (int64_t j = 0; j < a; ++j) s[j] = 0.0f;
        for (int64_t j = a; j < b; ++j) s[j] *= inv;
        for (int64_t j = b; j < len; ++j) s[j] = 0.0f;
    }
}

/* rotary embeddings of q and k, k and v into the cache, then attention of each query head over the cache: per
 * query head and block of GEMM_TOKENS tokens (one token: per head), scores = Q K^T by KV_BLOCK positions, softmax
 * within each query's causal (and sliding) window, then the weighted sum of V, both as dense products */
static void attention_team(cmpq_engine_t *E, int64_t block, int64_t n, int64_t pos, float *mine) {
    const cmpq_model_t *m = &E->m;
    const int64_t hd = m->head_dim, nh = m->n_heads, nkv = m->n_kv_heads, group = nh / nkv, qdim = nh * hd;
    const int64_t kvdim = nkv * hd, window = E->blocks[block].sliding_window;
    float *kc = E->kcache + block * nkv * E->ctx_pad * hd, *vc = E->vcache + block * nkv * E->ctx_pad * hd;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < n * (nh + nkv); ++item) {
        const int64_t t = item / (nh + nkv), j = item % (nh + nkv);
        if (j < nh) {
            rope(E, E->q + t * qdim + j * hd, t);
        } else {
            const int64_t kv = j - nh, p = pos + t;
            float *k = E->k + t * kvdim + kv * hd;
            rope(E, k, t);
            for (int64_t i = 0; i < hd; ++i) kc[key_at(E, kv, p, i)] = k[i];
            memcpy(vc + (kv * E->ctx_pad + p) * hd, E->v + t * kvdim + kv * hd, sizeof(float) * hd);
        }
    }
    float *S = mine + E->max_cols * STRIP + GEMM_TOKENS * STRIP;  /* GEMM_TOKENS rows of ctx_pad scores */
    const int64_t ldS = E->ctx_pad, blocks = n == 1 ? 1 : (n + GEMM_TOKENS - 1) / GEMM_TOKENS;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < blocks * nh; ++item) {
        const int64_t tb = item / nh, h = item % nh, kv = h / group;
        const int64_t t0 = tb * GEMM_TOKENS, rows = n == 1 ? 1 : (n - t0 < GEMM_TOKENS ? n - t0 : GEMM_TOKENS);
        const int64_t p0 = pos + t0, last = p0 + rows - 1;
        const int64_t base = first_key(p0, window) / KV_BLOCK * KV_BLOCK, len = last - base + 1;
        const float *Q = E->q + t0 * qdim + h * hd;
        const float *K = kc + kv * E->ctx_pad * hd, *V = vc + (kv * E->ctx_pad + base) * hd;
        float *out = E->att + t0 * qdim + h * hd;
        for (int64_t b = base; b <= last; b += KV_BLOCK) {
            const int64_t nr = last + 1 - b < KV_BLOCK ? last + 1 - b : KV_BLOCK;
            if (n == 1) E->D->vecmat(Q, hd, K + b * hd, KV_BLOCK, nr, S + b - base);
            else E->D->gemm(Q, qdim, GEMM_TOKENS, K + b * hd, KV_BLOCK, hd, nr, S + b - base, ldS);
        }
        softmax_rows(E, S, ldS, rows, p0, base, len, window);
        for (int64_t r = rows; r < (n == 1 ? 1 : GEMM_TOKENS); ++r) memset(S + r * ldS, 0, sizeof(float) * len);
        for (int64_t c = 0; c < hd; c += STRIP) {
            const int64_t nr = hd - c < STRIP ? hd - c : STRIP;
            if (n == 1) E->D->vecmat(S, len, V + c, hd, nr, out + c);
            else E->D->gemm(S, ldS, GEMM_TOKENS, V + c, hd, len, nr, out + c, qdim);
        }
    }
}

static void block_team(cmpq_engine_t *E, int64_t b, int64_t n, int64_t pos, float *mine) {
    const cmpq_model_t *m = &E->m;
    const cmpq_block_t *B = &E->blocks[b];
    const linear_t *L = E->lin + b * 7;
    norm_team(E, E->h, B->attn_norm, n, E->xn);
    linear_team(E, &L[0], E->xn, n, E->q, mine);
    linear_team(E, &L[1], E->xn, n, E->k, mine);
    linear_team(E, &L[2], E->xn, n, E->v, mine);
    attention_team(E, b, n, pos, mine);
    linear_team(E, &L[3], E->att, n, E->y, mine);
    add_team(E->h, E->y, n, m->hidden);
    norm_team(E, E->h, B->mlp_norm, n, E->xn);
    linear_team(E, &L[4], E->xn, n, E->g, mine);
    linear_team(E, &L[5], E->xn, n, E->u, mine);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n; ++t)
        E->D->silu_mul(E->g + t * m->intermediate, E->u + t * m->intermediate, m->intermediate);
    linear_team(E, &L[6], E->g, n, E->y, mine);
    add_team(E->h, E->y, n, m->hidden);
}

/* one chunk of at most CHUNK tokens */
enum { HEAD_NONE, HEAD_LAST, HEAD_ALL };

static void chunk_team(cmpq_engine_t *E, const int64_t *tokens, int64_t n, int64_t pos, float *logits, int head) {
    const cmpq_model_t *m = &E->m;
    float *mine = E->per_thread + (int64_t)thread_id() * E->per_thread_floats;
    const int64_t half = m->head_dim / 2;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n; ++t) {
        memcpy(E->h + t * m->hidden, m->embed + tokens[t] * m->hidden, sizeof(float) * m->hidden);
        for (int64_t i = 0; i < half; ++i) {  /* as transformers: the angle in float32, cos and sin of it */
            const float angle = (float)(pos + t) * m->inv_freq[i];
            E->cos[t * half + i] = (float)(cos((double)angle) * m->rope_scaling);
            E->sin[t * half + i] = (float)(sin((double)angle) * m->rope_scaling);
        }
    }
    for (int64_t b = 0; b < m->n_blocks; ++b) block_team(E, b, n, pos, mine);
    const linear_t *lm_head = E->lin + m->n_blocks * 7;
    if (head == HEAD_ALL) {
        norm_team(E, E->h, m->final_norm, n, E->xn);
        linear_team(E, lm_head, E->xn, n, logits, mine);
    } else if (head == HEAD_LAST) {
        norm_team(E, E->h + (n - 1) * m->hidden, m->final_norm, 1, E->xn);
        linear_team(E, lm_head, E->xn, 1, logits, mine);
    }
}

/* Runs tokens (n) at positions pos .. pos + n - 1 (the cache holds positions below pos from earlier calls) and
 * writes the logits of the last token (vocab floats), or of every token with all_logits (n * vocab). Returns
 * ENGINE_OK, ENGINE_BAD_ARG, ENGINE_BAD_TOKEN (an id outside the vocabulary), ENGINE_CONTEXT (past the cache) or
 * ENGINE_NO_MEMORY. */
int cmpq_engine_forward(cmpq_engine_t *E, const int64_t *tokens, int64_t n, int64_t pos, float *logits,
                        int all_logits, int nthreads) {
    if (!E || !tokens || !logits || n < 1 || pos < 0) return ENGINE_BAD_ARG;
    if (pos + n > E->m.context) return ENGINE_CONTEXT;
    for (int64_t t = 0; t < n; ++t)
        if (tokens[t] < 0 || tokens[t] >= E->m.vocab) return ENGINE_BAD_TOKEN;
#ifdef _OPENMP
    const int threads = nthreads > 0 ? nthreads : omp_get_max_threads();
#else
    const int threads = 1;
    (void)nthreads;
#endif
    if (threads > E->threads_allocated) {
        float *p = (float *)realloc(E->per_thread, sizeof(float) * (size_t)(threads * E->per_thread_floats));
        if (!p) return ENGINE_NO_MEMORY;
        E->per_thread = p;
        E->threads_allocated = threads;
    }
    for (int64_t t0 = 0; t0 < n; t0 += CHUNK) {
        const int64_t c = n - t0 < CHUNK ? n - t0 : CHUNK;
        /* the head runs on every token with all_logits, else on the last token of the last chunk only */
        const int head = all_logits ? HEAD_ALL : t0 + c == n ? HEAD_LAST : HEAD_NONE;
        float *out = all_logits ? logits + t0 * E->m.vocab : logits;
#pragma omp parallel num_threads(threads)
        chunk_team(E, tokens + t0, c, pos + t0, out, head);
    }
    return ENGINE_OK;
}
