/* forward.h: the LLaMA forward pass's model, buffers and steps, in the
 * order of llama2.c's run.c: the weights (`weights`), the buffers one call
 * needs (`run_state`, the KV cache among them), then the steps forward.c runs
 * one after the other. Linear layers are either quantized (a qmatrix and the
 * generated kernel for its bitwidth, qmatrix.h) or float32/float16
 * (float_gemm.c). Float loops are compiled twice (AVX2+FMA and baseline) and
 * picked by the dynamic loader (GCC target_clones), so they vectorize where
 * the CPU can.
 *
 * pyx/_forward.pyx compiles float_gemm.c, attention.c and forward.c into its
 * own module, one translation unit as when they were a string inside it:
 * team.h's policy variables are per module (set_thread_policy sets this
 * module's), and the compiler inlines (and contracts into FMAs) across the
 * files as it did. Every function is static for that reason.
 */
#ifndef QINFER_FORWARD_H
#define QINFER_FORWARD_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif
#include <string.h>
#include "qmatrix.h"
#include "team.h"
#ifdef _OPENMP
#include <omp.h>
#endif

/* One clone for x86-64-v3 (AVX2 and FMA together) and one baseline. Not
 * target_clones("avx2,fma"): that makes an AVX2 clone without FMA and an FMA
 * clone without AVX2, and the resolver picks the first. */
#if defined(__GNUC__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
#define QI_VECTORIZE __attribute__((target_clones("arch=x86-64-v3", "default")))
#elif defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
#define QI_VECTORIZE __attribute__((target_clones("avx2", "default")))
#else
#define QI_VECTORIZE
#endif

/* ----------------------------------------------------------------- weights */

typedef struct {
    const qmatrix *q;     /* quantized: the packed layer ... */
    qgemm_fn qgemm;       /* ... and the kernel for its bitwidth */
    qgemm_fn qgemm_i8;    /* NULL, or the int8-activation kernel (Engine(activations="int8")) */
    qgemv_team_fn team;   /* NULL, or the decode kernel's twin for the decode team (team_forward) */
    qgemm_team_fn rows_team;   /* NULL, or qgemm_i8's twin for several rows in a team (team_forward) */
    const float *w;       /* float32: [out][in] (Hugging Face orientation) */
    const uint16_t *w16;  /* or float16, the same layout (a float16 checkpoint's LM head) */
    int in, out;
} linear;

/* A block's linear maps. Stacked maps: when wqkv is set (quantized models,
 * qinfer/model.py), it holds wq, wk and wv one above the other and replaces
 * them, so the three projections of the same input are one kernel call (one
 * pass of the threads, one preparation of the input) and wq/wk/wv are unset;
 * w_gate_up likewise stacks w_gate over w_up. */
typedef struct {
    const float *attn_norm;     /* [dim] */
    linear wq, wk, wv, wo;      /* dim -> n_heads*head_dim, dim -> kv_dim (x2), n_heads*head_dim -> dim */
    linear wqkv;                /* dim -> n_heads*head_dim + 2*kv_dim, or unset */
    const float *ffn_norm;      /* [dim] */
    linear w_gate, w_up, w_down;
    linear w_gate_up;           /* dim -> 2*hidden_dim, or unset */
} layer_weights;

typedef struct {
    int dim, hidden_dim, n_layers, n_heads, n_kv_heads, head_dim, vocab_size, ctx;
    float eps;
    const float *embedding;     /* [vocab][dim] float32, or */
    const uint16_t *embedding16;    /* [vocab][dim] float16 (a float16 checkpoint's table), or */
    const qmatrix *embedding_q;     /* dim -> vocab packed (a quantized table, rows widened on lookup) */
    layer_weights *layers;      /* [n_layers] */
    const float *final_norm;    /* [dim] */
    linear lm_head;             /* dim -> vocab */
    const float *inv_freq;      /* [head_dim/2]: RoPE frequencies, scaling applied */
} weights;

/* ------------------------------------------------------------ buffers */

#define KV_BLOCK 32
/* The KV cache's formats (kv_cache.c has their layouts; qinfer/kv_cache.py their names). */
enum { KV_F32 = 0, KV_F16 = 1, KV_Q8 = 2, KV_KIVI = 3, KV_KVQUANT = 4 };
typedef struct {
    int format;       /* KV_F32, KV_F16, KV_Q8, KV_KIVI or KV_KVQUANT */
    int bits;         /* bits of a code: KV_Q8 8, KV_KIVI 4 or 2, KV_KVQUANT 4, 3 or 2 */
    int group;        /* KV_KIVI: G, the positions of a key group and the channels of a value group */
    int residual;     /* KV_KIVI: R, the newest positions a query reads at float16 (a multiple of G) */
} kv_spec;

typedef struct {
    int max_tokens;   /* rows every buffer below has room for */
    int threads;      /* rows of `scores` */
    float *x;         /* [T][dim]        the residual stream */
    float *xb;        /* [T][dim]        normalized input of a block */
    float *proj;      /* [T][dim]        output of wo / w_down before the residual add */
    float *q;         /* [T][n_heads*head_dim] */
    float *att;       /* [T][n_heads*head_dim]  attention output per head */
    float *gate;      /* [T][hidden_dim] */
    float *up;        /* [T][hidden_dim] */
    float *scores;    /* [threads][QUERY_TOKENS*group][ctx]  attention scores of one query tile */
    float *cos_sin;   /* [T][head_dim]   cos (first half) and sin (second half) per position */
    float *k;         /* [T][kv_dim]     new keys, before RoPE and the move into the cache */
    float *v;         /* [T][kv_dim]     new values */
    float *stacked;   /* [T][widest stacked map]  output of wqkv / w_gate_up (NULL when none) */
    /* The KV cache of `seqs` sequences (a server's slots; 1 otherwise). Keys are
     * stored transposed in blocks of KV_BLOCK positions,
     * [seqs][n_layers][n_kv_heads][ctx/KV_BLOCK][head_dim][KV_BLOCK], so the scores of a
     * block are KV_BLOCK-wide vector FMAs with no horizontal sums; values are
     * [seqs][n_layers][n_kv_heads][ctx][head_dim] (each probability scales one row). */
    kv_spec kv;           /* the cache's format (kv_cache.c has each one's layout) */
    void *key_cache;      /* keys: values (KV_F32, KV_F16) or codes */
    void *value_cache;    /* values: the same */
    uint16_t *key_params;     /* the codes' float16 scales (and minimums), or NULL */
    uint16_t *value_params;
    uint16_t *key_window;     /* KV_KIVI, KV_KVQUANT: the newest tokens' keys and values in float16, a ring */
    uint16_t *value_window;
    int window_blocks;    /* KV_KIVI, KV_KVQUANT with R > 0: the float16 ring's length, in blocks; else 0 */
    /* KV_KVQUANT's calibration (qinfer/kv_calibration.py; the caller keeps it alive) */
    const float *key_center;      /* [n_layers][n_kv_heads][head_dim] */
    const float *key_half_range;  /* [n_layers][n_kv_heads][head_dim] */
    const float *key_levels;      /* [n_layers][2^bits], ascending in [-1, 1] */
    const float *value_levels;    /* [n_layers][2^bits] */
    float *rope;          /* KV_KVQUANT: cos | sin of every position, [ctx/32][head_dim][32] (kv_cache.c, rope_at) */
    float *key_table;     /* KV_KVQUANT: [n_layers][n_kv_heads][head_dim][16] each key channel's levels, dequantized */
    uint16_t *sink;       /* KV_KVQUANT: [seqs][n_layers][n_kv_heads][2][head_dim] position 0's key (after RoPE), value */
    int ctx_blocks;   /* ctx rounded up to whole KV_BLOCKs, in blocks */
    int seqs;         /* sequences the cache holds */
    /* Where a call's rows go: row t is sequence row_seq[t] at position row_pos[t] (a
     * batched decode step of several sequences, forward_rows), or, with these NULL,
     * sequence `seq` at position pos + t (forward: a prompt, or one sequence's step). */
    int seq;
    const int *row_seq;   /* [T] or NULL */
    const int *row_pos;   /* [T] or NULL */
    int decode_team;  /* 1: a decode step, or a batched one of several sequences, runs as one
                         thread team when every layer can (team_forward) */
    team_governor decode_governor;    /* how many threads decode steps run with (team.h) ... */
    team_governor prefill_governor;   /* ... each block of a prefill ... */
    team_governor rows_governor;      /* ... and batched decode steps (forward_rows), each whole */
} run_state;

/* Prefill's row-wise steps (norms, RoPE, the cache write, SwiGLU, residual
 * adds) share their rows out among the threads; fewer rows than this (decode)
 * are too little work to wake them for. */
#define PARALLEL_ROWS 4
#define QUERY_TOKENS 8   /* tokens per attention tile (see attention_tile) */

/* Inputs of a layer's linear maps, copied out when a caller asks (GPTQ
 * calibration collects them); any pointer may be NULL. */
typedef struct {
    float *attn_in;   /* [n][dim]        input of q/k/v_proj */
    float *o_in;      /* [n][n_heads*hd] input of o_proj */
    float *mlp_in;    /* [n][dim]        input of gate/up_proj */
    float *down_in;   /* [n][hidden]     input of down_proj */
} layer_capture;

/* ------------------------------------------------------- how a step runs */

/* How the steps of a block share their work among threads, so that the block
 * is written once (layer_forward) for both ways a call runs. Per call (`tm`
 * NULL; a prefill, or a decode step without the team): every step is a
 * parallel region of its own, of `nthreads` threads, whose join orders it
 * before the next. In a team (forward.c, team_forward: a decode step, or a
 * batched step of several sequences): the calling thread is one of a team that
 * runs the whole step; the kernels compute its share, the row-wise steps run on
 * thread 0 (a batched step's rows: shared out by row), and the threads meet at
 * the team's barrier (team.h) at every sync_point. */
typedef struct {
    int nthreads;     /* threads of each step's parallel region (per call), or of the team */
    const team *tm;   /* NULL per call, or this thread's place in the decode team */
} exec_ctx;

/* What a row-wise step works on: n tokens at positions pos.. in block `layer`. */
typedef struct {
    const weights *w;
    run_state *s;
    const layer_weights *lw;   /* w->layers[layer], or NULL (the LM head's norm) */
    int layer, pos, n;
    const float *x;            /* [n][dim] the rows of s->x a norm reads (the LM head: the last ones) */
} block;

/* Row t of n of a row-wise step (forward.c, each_row). */
typedef void row_step(const block *b, int t);

/* exp(x) for x <= 0, branch-free so the softmax loop vectorizes: x*log2(e) =
 * n + f with |f| <= 1/2, 2^f by its Taylor series to degree 6 (relative error
 * < 2e-7), 2^n written into the exponent bits. Here because attention.c's
 * softmax and forward.c's SiLU both inline it. */
static inline float exp_nonpositive(float x)
{
    x = x < -87.0f ? -87.0f : x;                       /* exp(-87) ~ 1.6e-38: as good as 0 */
    const float t = x * 1.44269504088896341f;
    const float n = (t + 12582912.0f) - 12582912.0f;   /* round to nearest: 1.5 * 2^23 */
    const float f = t - n;
    const float p = 1.0f + f * (0.693147181f + f * (0.240226507f + f * (0.0555041087f +
                    f * (0.00961812911f + f * (0.00133335581f + f * 0.000154035304f)))));
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}

/* ------------------------------------------------------------ the steps */

/* forward.c: how a step runs, and the steps of a block */
static void each_row(const exec_ctx *cx, const block *b, row_step *step);
static void each_row_in(const exec_ctx *cx, const block *b, row_step *step, int first, int n);
static void cache_and_attend(const exec_ctx *cx, const block *b);
static void sync_point(const exec_ctx *cx);
static int linear_map(const exec_ctx *cx, const linear *l, const float *x, int n, float *y);
static int matmul(const linear *l, const float *x, int n, float *y, int nthreads);
static int project_qkv(const exec_ctx *cx, const block *b);
static int project_gate_up(const exec_ctx *cx, const block *b);
static row_step attn_norm_row, ffn_norm_row, final_norm_row, split_qkv_row, rope_q_row, rope_k_row,
                cache_kv_row, close_key_group_row, residual_row, swiglu_row;
static void embed(const weights *w, const int *tokens, int n, float *x);
static void rope_tables(const weights *w, const run_state *s, int pos, int n);
QI_VECTORIZE static void rmsnorm_row(const float *x, const float *weight, int dim, float eps, float *out);
static void rope_row(float *v, int heads, int head_dim, const float *cs);
QI_VECTORIZE static void add_row(float *x, const float *y, int dim);
QI_VECTORIZE static void swiglu(float *out, const float *gate, const float *up, int n);
static void capture(float *dst, const float *src, size_t count);
static int team_ready(const weights *w);
static int rows_team_ready(const weights *w);
static int team_forward(const weights *w, run_state *s, const int *tokens, int n, int pos, float *logits,
                        int nthreads);
static int is_set(const linear *l);
static size_t tile_score_floats(const weights *w, const run_state *s);
static size_t scores_per_thread(const weights *w, const run_state *s);

/* float_gemm.c: y[n][out] = x[n][in] @ w[out][in]^T for float32 and float16 weights */
static void float_matmul(const linear *l, const float *x, int n, float *y, int nthreads);
static int half_matmul(const linear *l, const float *x, int n, float *y, int nthreads);

/* Row t's sequence and position (run_state: row_seq, row_pos) */
static inline int row_seq(const run_state *s, int t)
{
    return s->row_seq ? s->row_seq[t] : s->seq;
}

static inline int row_pos(const run_state *s, int pos, int t)
{
    return s->row_pos ? s->row_pos[t] : pos + t;
}

/* attention.c: the KV cache and attention over it */
QI_VECTORIZE static void store_kv_head(const weights *w, run_state *s, int seq, int layer, int t, int p, int h, int shared);
static void store_kv_row(const weights *w, run_state *s, int seq, int layer, int t, int p, int shared);
QI_VECTORIZE static void close_key_group(const weights *w, run_state *s, int seq, int layer, int p);
static int alloc_kv_cache(const weights *w, run_state *s);
static void free_kv_cache(run_state *s);
static size_t kv_bytes_per_token(const weights *w, const run_state *s);
static void attention(const weights *w, run_state *s, int layer, int pos, int first, int n, const exec_ctx *cx);

#endif
