/* The native decode engine (engine.c): a LLaMA-shaped causal LM (LLaMA, Mistral, Qwen2: RMSNorm, rotary
 * embeddings, grouped-query attention, SiLU-gated MLP, optional q/k/v biases, optional sliding window) run one
 * forward per call, all in native code, over the tensors of a loaded model in place: packed CMPQ layers through
 * the LUT kernels and dequantized tiles, float layers through dense kernels.
 *
 * The structs below are filled by cmpq/engine/native.py (ctypes mirrors, same fields, same order; a size check at
 * load). They point at memory the caller keeps alive for the engine's lifetime; the engine owns only its KV cache
 * and scratch. Keep one field per line. */
#ifndef CMPQ_ENGINE_H
#define CMPQ_ENGINE_H
#include "cmpq_kernels.h"

#define LINEAR_ABSENT 0
#define LINEAR_FLOAT 1   /* float32 (rows, cols) row-major */
#define LINEAR_CMPQ 2    /* a packed CMPQ layer */

typedef struct cmpq_linear {
    int64_t kind;
    int64_t rows;
    int64_t cols;
    const float *weight;           /* LINEAR_FLOAT */
    const cmpq_layer_t *packed;    /* LINEAR_CMPQ */
    const float *bias;             /* (rows) or NULL */
} cmpq_linear_t;

typedef struct cmpq_block {
    cmpq_linear_t q;
    cmpq_linear_t k;
    cmpq_linear_t v;
    cmpq_linear_t o;
    cmpq_linear_t gate;
    cmpq_linear_t up;
    cmpq_linear_t down;
    const float *attn_norm;        /* (hidden) */
    const float *mlp_norm;         /* (hidden) */
    int64_t sliding_window;        /* 0: full causal attention; else a key j is seen by a query i when i - j < it */
} cmpq_block_t;

typedef struct cmpq_model {
    int64_t n_blocks;
    int64_t hidden;
    int64_t intermediate;
    int64_t n_heads;
    int64_t n_kv_heads;
    int64_t head_dim;
    int64_t vocab;
    int64_t context;               /* positions of the KV cache */
    double norm_eps;
    double rope_scaling;           /* multiplies cos and sin (the rotary embedding's attention scaling) */
    double attn_scale;             /* multiplies q . k */
    const float *inv_freq;         /* (head_dim / 2) rotary frequencies */
    const float *embed;            /* (vocab, hidden) */
    const float *final_norm;       /* (hidden) */
    cmpq_linear_t head;
    const cmpq_block_t *blocks;    /* (n_blocks) */
} cmpq_model_t;

/* status codes of the exported functions */
#define ENGINE_OK 0
#define ENGINE_BAD_ARG -1
#define ENGINE_NO_MEMORY -2
#define ENGINE_BAD_TOKEN -3
#define ENGINE_CONTEXT -4

typedef struct cmpq_engine cmpq_engine_t;

CMPQ_API int64_t cmpq_engine_struct_size(int which);
CMPQ_API cmpq_engine_t *cmpq_engine_create(const cmpq_model_t *model, int isa, int *status);
CMPQ_API void cmpq_engine_free(cmpq_engine_t *engine);
CMPQ_API int cmpq_engine_forward(cmpq_engine_t *engine, const int64_t *tokens, int64_t n, int64_t pos, float *logits,
                                 int all_logits, int nthreads);

#endif /* CMPQ_ENGINE_H */
