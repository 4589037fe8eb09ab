/* The exported entry points (called through ctypes by native.py): CPU feature checks, the table of kernels of
 * each ISA, the call's view of a layer, the OpenMP split of a call into the stages of cmpq_kernels_t, and the
 * sparse outliers and bias, which every ISA adds the same way. */
#include "cmpq_kernels.h"
#ifdef _OPENMP
#include <omp.h>
#endif

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

/* The layout of cmpq_layer_t, which native.py compares with its ctypes mirror when it loads the library: a
 * different field list would otherwise make every call read the wrong pointers. */
int64_t cmpq_layer_size(void) { return (int64_t)sizeof(cmpq_layer_t); }
int64_t cmpq_layer_last_offset(void) { return (int64_t)offsetof(cmpq_layer_t, amax); }

/* ---- the kernels of each ISA ---- */
static const cmpq_kernels_t portable_kernels = {
    .build_tables = build_tables, .gemv = gemv_portable, .dequant = dequant_portable,
    .build_int8_run = NULL, .gemv_int8 = NULL, .repeat_one_token = 0, .one_token_chunk = 4,
};
#ifdef CMPQ_X86
/* AVX2's one-token loop looks up without a mask in tables repeated to 16 entries */
static const cmpq_kernels_t avx2_kernels = {
    .build_tables = build_tables256, .gemv = gemv_avx2, .dequant = dequant_avx2,
    .build_int8_run = build_int8_run256, .gemv_int8 = gemv_int8_groups256, .repeat_one_token = 1,
    .one_token_chunk = 4,
};
/* AVX-512 repeats compact tables in the register (broadcast loads); one token takes passes of 8 groups (each
 * column's table loaded once per 128 rows) where a chunk of 8 leaves the threads balanced */
static const cmpq_kernels_t avx512_kernels = {
    .build_tables = build_tables256, .gemv = gemv_avx512, .dequant = dequant_avx512,
    .build_int8_run = build_int8_run, .gemv_int8 = gemv_int8_groups, .repeat_one_token = 0,
    .one_token_chunk = 8,
};
#endif

/* the kernels of ISA code `isa` (-1: the best this CPU has), or NULL where this CPU lacks that ISA */
const cmpq_kernels_t *kernels_for(int isa) {
    if (isa < 0) isa = cmpq_best_isa();
    if (!cmpq_isa_supported(isa)) return NULL;
#ifdef CMPQ_X86
    static const cmpq_kernels_t *const by_isa[3] = {&portable_kernels, &avx2_kernels, &avx512_kernels};
    return by_isa[isa];
#else
    return &portable_kernels;
#endif
}

void make_layer(layer_t *L, const cmpq_layer_t *src, const float *bias) {
    L->rows = src->rows; L->cols = src->cols; L->groups = (src->rows + GROUP - 1) / GROUP;
    L->words = 0;
    for (int64_t i = 0; i < src->cols; ++i) L->words += src->widths[i];
    L->codes = src->codes; L->order = src->order; L->widths = src->widths; L->codebooks = src->codebooks;
    L->cb_offset = src->cb_offset;
    L->toff = src->cb_offset;
    L->repeat = 0;
    L->orow = src->orow; L->ocol = src->ocol; L->odelta = src->odelta; L->bias = bias;
    L->nruns = 0;
    L->run = NULL;
}

/* Runs of equal width (scanning them per 64-row pass cost as much as the look-ups on wide layers). Returns 0, or
 * -1 when out of memory. */
int find_runs(layer_t *L) {
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
void thread_share(int64_t n, int64_t *lo, int64_t *hi) {
#ifdef _OPENMP
    const int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
#else
    const int64_t team = 1, me = 0;
#endif
    const int64_t per = (n + team - 1) / team;
    *lo = me * per < n ? me * per : n;
    *hi = *lo + per < n ? *lo + per : n;
}

void add_outliers_and_bias(const layer_t *L, const float *x, int64_t batch, float *y, int64_t r0,
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

/* The LUT-GEMV of one call, run by every thread of an OpenMP team (cmpq_lut_gemv's, or the engine's one team per
 * forward): each thread builds the tables of its share of the columns, then the team shares the chunks of groups.
 * Ends with the team's barrier: y is complete when any thread returns. */
void lut_gemv_team(const cmpq_kernels_t *K, const layer_t *L, const float *x, int64_t batch, float *y,
                   float *tables, int64_t table_size) {
#ifdef _OPENMP
    const int64_t threads = omp_get_num_threads();
#else
    const int64_t threads = 1;
#endif
    /* chunks of groups: the ISA's one-token chunk when there are at least 8 groups per thread for it (fewer would
     * leave the threads unbalanced), else 4 */
    const int64_t per_chunk = batch == 1 && L->groups >= 64 * threads ? K->one_token_chunk : 4;
    const int64_t chunks = (L->groups + per_chunk - 1) / per_chunk;
    int64_t i0, i1;
    thread_share(L->cols, &i0, &i1);
    K->build_tables(L, x, batch, tables, table_size, i0, i1);
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
        const int64_t g0 = per_chunk * c, g1 = g0 + per_chunk < L->groups ? g0 + per_chunk : L->groups;
        K->gemv(L, tables, table_size, batch, y, g0, g1);
        const int64_t r1 = g1 * GROUP < L->rows ? g1 * GROUP : L->rows;
        add_outliers_and_bias(L, x, batch, y, g0 * GROUP, r1);
    }
}

/* Groups [a, b) of a layer dequantized into out (stored column i at out[i * ld + r - rbase]) with its outliers
 * written in place: one thread's part of a tile (cmpq_dequant_tile, the engine's prefill strips). */
void dequant_groups(const cmpq_kernels_t *K, const layer_t *L, const cmpq_layer_t *src, void *out, int64_t ld,
                    int64_t rbase, int bf16, int64_t a, int64_t b) {
    if (a >= b) return;
    K->dequant(L, out, ld, rbase, bf16, a, b);
    const int64_t r1 = b * GROUP < L->rows ? b * GROUP : L->rows;
    for (int64_t r = a * GROUP; r < r1; ++r)
        for (int32_t k = src->orow[r]; k < src->orow[r + 1]; ++k)
            put(out, bf16, src->opos[k] * ld + r - rbase, src->ovalue[k]);
}

/* y (batch, rows) = x (batch, cols) W^T (+ bias, or NULL); tables: scratch of batch * layer->table_size floats
 * (+16 padding), column i's table at table_offset[i] (max(16, 2^w_i) floats; table_size at least their sum).
 * Returns 0, -1 for an unsupported isa / batch or a too small table_size, -2 when out of memory. */
int cmpq_lut_gemv(const cmpq_layer_t *layer, const float *x, int64_t batch, float *y, float *tables,
                  const float *bias, int isa, int nthreads) {
    const cmpq_kernels_t *K = kernels_for(isa);
    if (!K || !layer || batch < 1 || batch > MAX_BATCH) return -1;
    const int64_t cols = layer->cols, table_size = layer->table_size;
    if (cols > 0 && layer->table_offset[cols - 1] + table_slots(layer->widths[cols - 1]) > table_size) return -1;
    layer_t L;
    make_layer(&L, layer, bias);
    L.repeat = K->repeat_one_token && batch == 1;
    if (L.repeat) L.toff = layer->table_offset;
    if (find_runs(&L) != 0) return -2;
    const int threads = threads_for(nthreads);
#pragma omp parallel num_threads(threads)
    lut_gemv_team(K, &L, x, batch, y, tables, table_size);
    free(L.run);
    return 0;
}

/* out (cols, ld): rows [g0 * 16, min(g1 * 16, rows)) of the dequantized weight, transposed (stored column i at
 * out[i * ld + r - g0 * 16]), float32 or bfloat16 (bf16 = 1), with the outliers (CSR by row: orow; their stored
 * column opos and value ovalue) written in place: the tile a prefill matmul reads. Returns 0, -1 for an
 * unsupported isa or range, -2 when out of memory. */
int cmpq_dequant_tile(const cmpq_layer_t *layer, void *out, int64_t ld, int64_t g0, int64_t g1, int bf16, int isa,
                      int nthreads) {
    const cmpq_kernels_t *K = kernels_for(isa);
    if (!layer) return -1;
    layer_t L;
    make_layer(&L, layer, NULL);
    if (!K || g0 < 0 || g1 > L.groups || g0 >= g1 || ld < (g1 - g0) * GROUP) return -1;
    if (find_runs(&L) != 0) return -2;
    const int threads = threads_for(nthreads);
    (void)threads;  /* only read by OpenMP */
    const int64_t rbase = g0 * GROUP;
#pragma omp parallel num_threads(threads)
    {
        /* contiguous runs of groups per thread: the column-outer loops write long runs of each output row */
        int64_t a, b;
        thread_share(g1 - g0, &a, &b);
        dequant_groups(K, &L, layer, out, ld, rbase, bf16, a + g0, b + g0);
    }
    free(L.run);
    return 0;
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

/* y (1, rows) = x (1, cols) W^T (+ bias, or NULL) with int8 tables for the columns of up to 4 bits (see
 * cmpq_kernels.h), by the int8 kernel `isa` (2: AVX-512, 1: AVX2; layer->codes8 in that kernel's layout,
 * layer->amax set). tables: float scratch as for cmpq_lut_gemv (used by the wider columns); tables8 / scales:
 * scratch of at least the bytes / blocks that cmpq_int8_sizes gives for `isa`.
 * Returns 0, -1 when this CPU lacks that kernel, the layer has no int8 codes or a scratch is too small, -2 when
 * out of memory. */
int cmpq_lut_gemv_int8(const cmpq_layer_t *layer, const float *x, float *y, float *tables, int8_t *tables8,
                       int64_t tables8_size, float *scales, int64_t scales_size, const float *bias, int isa,
                       int nthreads) {
    const cmpq_kernels_t *K = isa >= 0 && cmpq_int8_isa(isa) == isa ? kernels_for(isa) : NULL;
    if (!K || !K->gemv_int8 || !layer || !layer->codes8) return -1;
    const int64_t rows = layer->rows, cols = layer->cols, table_size = layer->table_size;
    const uint8_t *widths = layer->widths;
    const float *amax = layer->amax;
    int64_t need8, nblocks;
    int8_sizes(widths, cols, isa, &need8, &nblocks);
    if (need8 > tables8_size || nblocks > scales_size) return -1;
    int64_t last = 0;  /* float tables of 2^w entries at cb_offset: the end of the last column's */
    if (cols > 0) last = layer->cb_offset[cols - 1] + ((int64_t)1 << widths[cols - 1]);
    if (last > table_size) return -1;
    layer_t L;
    make_layer(&L, layer, bias);
    if (find_runs(&L) != 0) return -2;
    int8_view_t V = {layer->codes8, layer->stride8, tables8, scales, {0}, {0}, {0}};
    for (int64_t k = 0, t8 = 0, b = 0, c8 = 0; k < L.nruns; ++k) {
        const int64_t n = L.run[k + 1] - L.run[k];
        const int w = widths[L.run[k]];
        V.t8off[k] = t8; V.boff[k] = b; V.c8off[k] = c8;
        if (w <= INT8_MAX_W) {
            const int64_t nb = (n + INT8_BLOCK - 1) / INT8_BLOCK;
            t8 += nb * int8_block_bytes(w, isa);
            b += nb;
            c8 += (n + 3) / 4 * int8_quad_bytes(w, isa);
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
                K->build_tables(&L, x, 1, tables, table_size, a + i0, a + i1);
                continue;
            }
            int64_t b0, b1;
            thread_share((n + INT8_BLOCK - 1) / INT8_BLOCK, &b0, &b1);
            K->build_int8_run(&L, x, amax, a, n, w, tables8 + V.t8off[k], scales + V.boff[k], b0, b1);
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t c = 0; c < chunks; ++c) {
            const int64_t g0 = 4 * c, g1 = g0 + 4 < L.groups ? g0 + 4 : L.groups;
            K->gemv_int8(&L, &V, tables, y, g0, g1);
            add_outliers_and_bias(&L, x, 1, y, g0 * GROUP, g1 * GROUP < rows ? g1 * GROUP : rows);
        }
    }
    free(L.run);
    return 0;
}
