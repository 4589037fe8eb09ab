/* Mixed-precision LUT kernels for packed CMPQ layers (the format: src/cmpq/formats/cmpq.py and bitpack.py,
 * docs/format.md):
 * the common header of every kernel file. It holds the layer struct the exported functions take (mirrored by
 * native.CMPQLayer), a call's working view of it, the table of one ISA's kernels, and the helpers that every ISA
 * shares.
 *
 * A layer stores, per group of 16 output rows and per stored column i (columns sorted by width), w_i words of
 * 16 bits holding the 16 codes as one little-endian bit string (row r at bits [r*w, r*w + w)). Stored column i
 * is original input column order[i] and has the codebook codebooks[cb_offset[i] .. + 2^w_i]. The caller pads
 * the code array by 8 bytes: the SIMD paths read whole 64-bit windows.
 *
 * lut_gemv (decode, batch 1..8): tables T_b[i][c] = codebook_i[c] * x_b[order[i]] are built once per call;
 * each output is then a sum of table look-ups (the per-ISA loops: portable.c, avx2.c, avx512.c). Sparse outliers
 * (CSR, delta = value minus the codebook value they replace) are added per row; batches of 2..8 share each
 * decoded window across their tokens. dequant_tile (prefill): tiles of rows of the weight, transposed and in
 * stored column order, float32 or bfloat16, for a dense matmul. lut_gemv_int8 (one token): int8 tables for the
 * columns of up to 4 bits (int8_avx2.c, int8_avx512.c; what they compute: the int8 section below).
 *
 * Runtime dispatch (dispatch.c): isa 2 = AVX-512 (F+BW+VBMI), 1 = AVX2, 0 = portable C; -1 picks the best this
 * CPU supports. Every file is compiled with the portable baseline flags; the ISA code carries its own
 * __attribute__((target(...))) and is only called after the CPU check. Off x86 only the portable kernels exist.
 * No Python or torch headers: called through ctypes with raw pointers.
 */
#ifndef CMPQ_KERNELS_H
#define CMPQ_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(_M_X64)
#define CMPQ_X86 1
#include <immintrin.h>
#endif

/* functions shared between the kernel files but not exported from the library */
#if defined(__GNUC__) || defined(__clang__)
#define CMPQ_HIDDEN __attribute__((visibility("hidden")))
#else
#define CMPQ_HIDDEN
#endif
/* functions called through ctypes */
#if defined(_WIN32)
#define CMPQ_API __declspec(dllexport)
#elif defined(__GNUC__) || defined(__clang__)
#define CMPQ_API __attribute__((visibility("default")))
#else
#define CMPQ_API
#endif

#define GROUP 16
#define MAX_BATCH 8

/* One packed layer, as the exported functions take it (by pointer). native.CMPQLayer mirrors it field for field
 * (same order, same types: int64 or a pointer); cmpq_layer_size and cmpq_layer_last_offset let native.py check
 * the layout when it loads the library. Keep one field per line (a test reads the names from here), and update
 * cmpq_layer_last_offset (dispatch.c) when the last field changes. */
typedef struct cmpq_layer {
    int64_t rows;
    int64_t cols;
    const uint16_t *codes;         /* (groups, words) row-packed, + 8 bytes of padding */
    const int32_t *order;          /* (cols) stored column -> original column */
    const uint8_t *widths;         /* (cols) width of each stored column (sorted: at most 8 runs) */
    const float *codebooks;        /* flat, stored order, + 16 floats of padding */
    const int64_t *cb_offset;      /* (cols) column i's codebook of 2^w_i entries */
    const int64_t *table_offset;   /* (cols) column i's table in one token's LUT-GEMV tables: max(16, 2^w_i) */
    int64_t table_size;            /* floats of one token's LUT-GEMV tables (at least the sum of those) */
    const int32_t *orow;           /* (rows + 1) outliers, CSR by row */
    const int32_t *ocol;           /* (nnz) original column of each outlier (LUT-GEMV) */
    const float *odelta;           /* (nnz) value - the codebook value it replaces (LUT-GEMV) */
    const int32_t *opos;           /* (nnz) stored column of each outlier (tiles) */
    const float *ovalue;           /* (nnz) value (tiles) */
    const uint8_t *codes8;         /* int8 tables only: the narrow columns' codes in one int8 kernel's layout */
    int64_t stride8;               /* int8 tables only: bytes of codes8 per 16-row group */
    const float *amax;             /* int8 tables only: (cols) each stored column's largest |codebook entry| */
} cmpq_layer_t;

/* A call's working view of a layer: the struct's arrays plus what the call derives (groups, words, runs) and
 * chooses (which tables layout, the bias). */
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

/* An int8 kernel's view of a call: the layer's int8 codes and the call's int8 tables and block scales */
typedef struct {
    const uint8_t *codes8;
    int64_t stride8;
    const int8_t *T8;
    const float *scales;
    int64_t t8off[9], boff[9], c8off[9];  /* per run: its tables, first block and codes within a group */
} int8_view_t;

/* The kernels of one ISA, chosen once per call (dispatch.c). Each stage works on a range that the calling
 * OpenMP thread owns: columns [i0, i1) of the tables, groups [g0, g1) of the output, blocks [b0, b1) of a run. */
typedef struct {
    /* float tables of columns [i0, i1) for `batch` tokens: T[b * tsize + toff[i] + c] */
    void (*build_tables)(const layer_t *L, const float *x, int64_t batch, float *T, int64_t tsize, int64_t i0,
                         int64_t i1);
    /* y (batch, rows) for the rows of groups [g0, g1), from the tables (outliers and bias come after) */
    void (*gemv)(const layer_t *L, const float *T, int64_t tsize, int64_t batch, float *y, int64_t g0, int64_t g1);
    /* rows of groups [g0, g1) of the dequantized weight, transposed: out[i * ld + r - rbase] */
    void (*dequant)(const layer_t *L, void *out, int64_t ld, int64_t rbase, int bf16, int64_t g0, int64_t g1);
    /* int8 tables of blocks [b0, b1) of a run of width w <= 4 (first stored column a, n columns); NULL where the
     * ISA has no int8 kernel. AVX-512's also needs VNNI: callers check cmpq_int8_isa first. */
    void (*build_int8_run)(const layer_t *L, const float *x, const float *amax, int64_t a, int64_t n, int w,
                           int8_t *T8, float *scales, int64_t b0, int64_t b1);
    /* one token, groups [g0, g1): int8 tables for the narrow runs, the float tables T for the wider ones */
    void (*gemv_int8)(const layer_t *L, const int8_view_t *V, const float *T, float *y, int64_t g0, int64_t g1);
    int repeat_one_token;   /* one token reads tables repeated to 16 entries (at table_offset), else 2^w entries */
    int64_t one_token_chunk; /* groups per thread chunk for one token on tall layers (AVX-512: passes of 8) */
} cmpq_kernels_t;

/* the exported functions (dispatch.c) */
CMPQ_API int cmpq_isa_supported(int isa);
CMPQ_API int cmpq_best_isa(void);
CMPQ_API int cmpq_int8_isa(int isa);
CMPQ_API int64_t cmpq_layer_size(void);
CMPQ_API int64_t cmpq_layer_last_offset(void);
CMPQ_API void cmpq_int8_sizes(const uint8_t *widths, int64_t cols, int isa, int64_t *out);
CMPQ_API int cmpq_lut_gemv(const cmpq_layer_t *layer, const float *x, int64_t batch, float *y, float *tables,
                           const float *bias, int isa, int nthreads);
CMPQ_API int cmpq_dequant_tile(const cmpq_layer_t *layer, void *out, int64_t ld, int64_t g0, int64_t g1, int bf16,
                               int isa, int nthreads);
CMPQ_API int cmpq_lut_gemv_int8(const cmpq_layer_t *layer, const float *x, float *y, float *tables, int8_t *tables8,
                                int64_t tables8_size, float *scales, int64_t scales_size, const float *bias, int isa,
                                int nthreads);

/* dispatch.c's pieces that the engine (engine.c) runs inside its own OpenMP team */
CMPQ_HIDDEN const cmpq_kernels_t *kernels_for(int isa);
CMPQ_HIDDEN void make_layer(layer_t *L, const cmpq_layer_t *src, const float *bias);
CMPQ_HIDDEN int find_runs(layer_t *L);
CMPQ_HIDDEN void thread_share(int64_t n, int64_t *lo, int64_t *hi);
CMPQ_HIDDEN void add_outliers_and_bias(const layer_t *L, const float *x, int64_t batch, float *y, int64_t r0,
                                       int64_t r1);
CMPQ_HIDDEN void lut_gemv_team(const cmpq_kernels_t *K, const layer_t *L, const float *x, int64_t batch, float *y,
                               float *tables, int64_t table_size);
CMPQ_HIDDEN void dequant_groups(const cmpq_kernels_t *K, const layer_t *L, const cmpq_layer_t *src, void *out,
                                int64_t ld, int64_t rbase, int bf16, int64_t a, int64_t b);

/* ---- helpers shared by the ISAs ---- */

/* entries of a repeated table: 2^w, repeated up to 16 */
static inline int64_t table_slots(int w) { return w < 4 ? 16 : (int64_t)1 << w; }

static inline uint64_t load64(const void *p) {
    uint64_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

static inline uint32_t load32(const void *p) {
    uint32_t v;
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

/* float32 -> bfloat16 bits, round to nearest even (as torch rounds) */
static inline uint16_t bf16_bits(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof(u));
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* element e of a tile of float32 or bfloat16 */
static inline void put(void *out, int bf16, int64_t e, float v) {
    if (bf16) ((uint16_t *)out)[e] = bf16_bits(v);
    else ((float *)out)[e] = v;
}

#define INT8_BLOCK 32
#define INT8_MAX_W 4

/* ---- int8 look-up tables (approximate; the default for one token): AVX-512 with VBMI and VNNI, or AVX2 ----
 * Columns of up to 4 bits, in blocks of 32 stored columns of one width, get int8 tables: q_i[c] =
 * round(codebook_i[c] * x_i * 127 / m), m the block's largest |codebook_i[c] * x_i| (so each product is rounded
 * to 8 bits of its block's largest), and the block's integer sums are scaled by m / 127 into the float
 * accumulators. Wider columns, the outliers and the bias stay exact. Both ISAs compute the same integers; each
 * kernel's table and code layout is described in its file (int8_avx512.c, int8_avx2.c). */

/* bytes of one block's int8 tables: AVX-512 32 x 2^w, AVX2 32 x 8 below 4 bits (pairs of 8-entry halves) */
static inline int64_t int8_block_bytes(int w, int isa) {
    return isa == 2 ? (int64_t)INT8_BLOCK << w : (int64_t)INT8_BLOCK * (w < 4 ? 8 : 16);
}

/* bytes of one quad (4 columns, 16 rows) of int8 codes: AVX-512 8 w (codes of w bits), AVX2 32 (nibbles) */
static inline int64_t int8_quad_bytes(int w, int isa) { return isa == 2 ? 8 * (int64_t)w : 32; }

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

/* ---- the stages of each ISA (the tables that group them: dispatch.c) ---- */

/* portable.c */
CMPQ_HIDDEN void build_tables(const layer_t *L, const float *x, int64_t batch, float *T, int64_t tsize, int64_t i0,
                              int64_t i1);
CMPQ_HIDDEN void gemv_portable(const layer_t *L, const float *T, int64_t tsize, int64_t batch, float *y, int64_t g0,
                               int64_t g1);
CMPQ_HIDDEN void dequant_portable(const layer_t *L, void *out, int64_t ld, int64_t rbase, int bf16, int64_t g0,
                                  int64_t g1);

#ifdef CMPQ_X86
#define T256 __attribute__((target("avx2,fma")))
#define T512 __attribute__((target("avx512f,avx512bw,avx512vbmi")))
#define T512I __attribute__((target("avx512f,avx512bw,avx512vbmi,avx512vnni")))
#define AI __attribute__((always_inline))

/* avx2.c (build_tables256 serves AVX-512 too) */
CMPQ_HIDDEN void build_tables256(const layer_t *L, const float *x, int64_t batch, float *T, int64_t tsize, int64_t i0,
                                 int64_t i1);
CMPQ_HIDDEN void gemv_avx2(const layer_t *L, const float *T, int64_t tsize, int64_t batch, float *y, int64_t g0,
                           int64_t g1);
CMPQ_HIDDEN void dequant_avx2(const layer_t *L, void *out, int64_t ld, int64_t rbase, int bf16, int64_t g0,
                              int64_t g1);
/* avx512.c */
CMPQ_HIDDEN void gemv_avx512(const layer_t *L, const float *T, int64_t tsize, int64_t batch, float *y, int64_t g0,
                             int64_t g1);
CMPQ_HIDDEN void dequant_avx512(const layer_t *L, void *out, int64_t ld, int64_t rbase, int bf16, int64_t g0,
                                int64_t g1);
/* int8_avx2.c */
CMPQ_HIDDEN void build_int8_run256(const layer_t *L, const float *x, const float *amax, int64_t a, int64_t n, int w,
                                   int8_t *T8, float *scales, int64_t b0, int64_t b1);
CMPQ_HIDDEN void gemv_int8_groups256(const layer_t *L, const int8_view_t *V, const float *T, float *y, int64_t g,
                                     int64_t g1);
/* int8_avx512.c */
CMPQ_HIDDEN void build_int8_run(const layer_t *L, const float *x, const float *amax, int64_t a, int64_t n, int w,
                                int8_t *T8, float *scales, int64_t b0, int64_t b1);
CMPQ_HIDDEN void gemv_int8_groups(const layer_t *L, const int8_view_t *V, const float *T, float *y, int64_t g,
                                  int64_t g1);
#endif

#endif /* CMPQ_KERNELS_H */
