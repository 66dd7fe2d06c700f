/* forward.c: the forward pass (forward.h), then its steps. Part of
 * _forward.pyx's translation unit. */
#include "forward.h"

/* ------------------------------------------------------------- forward */

/* One transformer block on s->x (n tokens at positions pos..), its steps'
 * work shared among threads as cx says (exec_ctx): the same code for a
 * prefill, a decode step and the decode team. */
static int layer_forward(const weights *w, run_state *s, int l, int pos, int n,
                         const layer_capture *cap, const exec_ctx *cx)
{
    const layer_weights *lw = &w->layers[l];
    const block b = {w, s, lw, l, pos, n, s->x};
    const int dim = w->dim, q_dim = w->n_heads * w->head_dim;
    int rc = 0;

    /* attention block: x += wo(attention(rope(q), cache += (rope(k), v))) */
    each_row(cx, &b, attn_norm_row);
    capture(cap ? cap->attn_in : NULL, s->xb, (size_t)n * dim);
    sync_point(cx);
    rc |= project_qkv(cx, &b);
    sync_point(cx);
    if (is_set(&lw->wqkv) && s->stacked)
        each_row(cx, &b, split_qkv_row);
    each_row(cx, &b, rope_q_row);
    each_row(cx, &b, rope_k_row);
    cache_and_attend(cx, &b);
    capture(cap ? cap->o_in : NULL, s->att, (size_t)n * q_dim);
    rc |= linear_map(cx, &lw->wo, s->att, n, s->proj);
    sync_point(cx);
    each_row(cx, &b, residual_row);

    /* MLP block: x += w_down(silu(w_gate(x)) * w_up(x)) */
    each_row(cx, &b, ffn_norm_row);
    capture(cap ? cap->mlp_in : NULL, s->xb, (size_t)n * dim);
    sync_point(cx);
    rc |= project_gate_up(cx, &b);
    sync_point(cx);
    each_row(cx, &b, swiglu_row);
    sync_point(cx);
    capture(cap ? cap->down_in : NULL, s->gate, (size_t)n * w->hidden_dim);
    rc |= linear_map(cx, &lw->w_down, s->gate, n, s->proj);
    sync_point(cx);
    each_row(cx, &b, residual_row);   /* in a team, the next block's first step on a row is the same thread's */
    return rc ? -1 : 0;
}

/* The final norm and the LM head on the last n_rows of the n rows of s->x:
 * every row, or just the last one for generation. */
static int lm_head(const weights *w, run_state *s, int n, int n_rows, float *logits, const exec_ctx *cx)
{
    const block b = {w, s, NULL, 0, 0, n_rows, s->x + (size_t)(n - n_rows) * w->dim};
    each_row(cx, &b, final_norm_row);
    sync_point(cx);
    return linear_map(cx, &w->lm_head, s->xb, n_rows, logits);
}

/* forward() with nthreads threads, or with the prefill governor's count for
 * each block when g is set (n > 1). */
static int forward_with(const weights *w, run_state *s, const int *tokens, int n, int pos,
                        float *logits, int all_logits, int nthreads, team_governor *g)
{
    if (nthreads > 1 && s->decode_team && (n == 1 ? team_ready(w) : s->row_seq && rows_team_ready(w)))
        return team_forward(w, s, tokens, n, pos, logits, nthreads);
    embed(w, tokens, n, s->x);
    rope_tables(w, s, pos, n);
    if (g)
        governor_rows(g, n);
    int threads = nthreads;
    for (int l = 0; l < w->n_layers; l++) {
        const double t0 = g ? team_clock() : 0.0;
        if (g)
            threads = governor_threads(g, nthreads);
        if (layer_forward(w, s, l, pos, n, NULL, &(exec_ctx){threads, NULL}))
            return -1;
        if (g)
            governor_report(g, threads, t0, team_clock());
    }
    if (g)
        threads = g->use;
    return lm_head(w, s, n, all_logits ? n : 1, logits, &(exec_ctx){threads, NULL});
}

/* A decode step (one token) runs as one OpenMP thread team from the first
 * layer to the LM head, the threads waiting for each other at spinning
 * barriers between the steps, instead of a parallel region per kernel call
 * (five a layer): on a 2-core KVM guest libgomp's fork and join of a region
 * cost ~1.5 us (its join makes a futex system call every time), the barrier
 * of team.h ~0.1 us. Each kernel call is a qgemv_team_fn (qmatrix.h); the row-wise
 * steps between them are a few microseconds of work, done by thread 0 while
 * the others wait, and attention shares its heads out. A batched decode step
 * (forward_rows: n rows, each its own sequence) runs so too, each linear map a
 * qgemm_team_fn over all the rows and the row-wise steps shared out by row
 * (each_row_in). It runs the same layer_forward as the per-call path (exec_ctx,
 * forward.h), whose kernels are the teams' twins, so the results are the same. */

/* Whether a batched step's kernel calls claim their tiles (team_claim, team.h), or keep
 * fixed shares (0; _forward.set_tile_claims: measurements, tests). */
static int tile_claims = 1;

/* forward() for n tokens (one, or a batched step's rows) as one team of nthreads
 * threads (team_ready(w), rows_team_ready(w)). A float LM head (a float16 or
 * float32 table: a tied embedding kept float) has no team kernel: it runs after
 * the team, as one more parallel region (a few microseconds against its
 * tens of megabytes), with the same results. */
static int team_forward(const weights *w, run_state *s, const int *tokens, int n, int pos, float *logits,
                        int nthreads)
{
    team_barrier barrier = {0, 0, 0, !tile_claims};
    int failed = 0;
    team_claims_reset(&barrier, nthreads);   /* and again at every barrier (team.h) */
    embed(w, tokens, n, s->x);
    rope_tables(w, s, pos, n);
    #pragma omp parallel num_threads(nthreads) reduction(|:failed)
    {
        team tm;
        tm.barrier = &barrier;
#ifdef _OPENMP
        tm.thread = omp_get_thread_num();
        tm.threads = omp_get_num_threads();   /* all the team's threads see the same count */
        tm.spins = team_spins(tm.threads, omp_get_num_procs());
#else
        tm.thread = 0;
        tm.threads = 1;
        tm.spins = 0;
#endif
        const exec_ctx cx = {tm.threads, &tm};
        for (int l = 0; l < w->n_layers; l++)
            failed |= layer_forward(w, s, l, pos, n, NULL, &cx);
        if (w->lm_head.team)
            failed |= lm_head(w, s, n, n, logits, &cx);
    }
    if (!w->lm_head.team && !failed)
        failed = lm_head(w, s, n, n, logits, &(exec_ctx){nthreads, NULL});
    return failed ? -1 : 0;
}

static int team_ready_linear(const linear *l)
{
    return l->team != NULL;
}

static int rows_team_ready_linear(const linear *l)
{
    return l->rows_team != NULL;
}

/* Whether every linear map of the blocks is `ready` (stacked maps in place of their parts);
 * a quantized LM head too (a float one runs after the team, team_forward). */
static int every_linear(const weights *w, int (*ready)(const linear *))
{
    if (w->lm_head.q && !ready(&w->lm_head))
        return 0;
    for (int l = 0; l < w->n_layers; l++) {
        const layer_weights *lw = &w->layers[l];
        const int qkv = is_set(&lw->wqkv) ? ready(&lw->wqkv) : ready(&lw->wq) && ready(&lw->wk) && ready(&lw->wv);
        const int gate_up = is_set(&lw->w_gate_up) ? ready(&lw->w_gate_up) : ready(&lw->w_gate) && ready(&lw->w_up);
        if (!qkv || !gate_up || !ready(&lw->wo) || !ready(&lw->w_down))
            return 0;
    }
    return 1;
}

/* Whether every linear map a decode step runs has a team kernel. */
static int team_ready(const weights *w)
{
    return every_linear(w, team_ready_linear);
}

/* Whether every linear map a batched step runs has a rows team kernel (int8 activations). */
static int rows_team_ready(const weights *w)
{
    return every_linear(w, rows_team_ready_linear);
}

static int clamp_threads(const run_state *s, int nthreads)
{
    /* attention() keeps one scores block per thread: never more threads than blocks
     * (the Python side grows them first, grow_threads, when a call asks for more) */
    return (nthreads > 0 && nthreads < s->threads) ? nthreads : s->threads;
}

/* Whether forward() lets the governors (team.h) choose its thread count, of at
 * most the count asked for (kernels.set_adaptive_threads); 0: always that count. */
static int adapt_threads = 1;

/* Run n tokens at positions pos..pos+n-1 through the model, filling the KV
 * cache. logits gets [n][vocab] when all_logits, else the last row only.
 * Returns 0, or -1 when a kernel ran out of memory. With adapt_threads, a
 * decode step runs with the decode governor's count of threads and each block
 * of a prefill with the prefill governor's (the results are the same for any count). */
static int forward(const weights *w, run_state *s, const int *tokens, int n, int pos,
                   float *logits, int all_logits, int nthreads)
{
    nthreads = clamp_threads(s, nthreads);
    if (!adapt_threads || nthreads == 1)
        return forward_with(w, s, tokens, n, pos, logits, all_logits, nthreads, NULL);
    if (n > 1 && !s->row_seq)
        return forward_with(w, s, tokens, n, pos, logits, all_logits, nthreads, &s->prefill_governor);
    /* a decode step, or a batched one of several sequences (a server's): timed whole.
     * A server's own threads (its event loop sending the last step's tokens) take a
     * core for a millisecond now and then; timed layer by layer, as a prefill is, those
     * moments looked like another process taking a core and the count flapped. */
    team_governor *g = s->row_seq ? &s->rows_governor : &s->decode_governor;
    if (s->row_seq)
        governor_rows(g, n);
    const double t0 = team_clock();
    const int threads = governor_threads(g, nthreads);
    const int rc = forward_with(w, s, tokens, n, pos, logits, all_logits, threads, NULL);
    governor_report(g, threads, t0, team_clock());
    return rc;
}

/* A decode step of n sequences at once (a server's slots): row t is token
 * tokens[t] of sequence seqs[t] at position positions[t], each sequence at most
 * once. The linear maps run all rows in one kernel call (a qgemm: every weight
 * read once for all of them); each row's RoPE, cache write and attention are
 * its own sequence's. logits gets [n][vocab]. */
static int forward_rows(const weights *w, run_state *s, const int *tokens, const int *seqs,
                        const int *positions, int n, float *logits, int nthreads)
{
    s->row_seq = seqs;
    s->row_pos = positions;
    const int rc = forward(w, s, tokens, n, 0, logits, 1, nthreads);
    s->row_seq = s->row_pos = NULL;
    return rc;
}

/* One block on caller-given hidden states x[n][dim] (in place), for
 * layer-by-layer work such as GPTQ calibration. */
static int run_layer(const weights *w, run_state *s, int l, float *x, int n, int pos,
                     const layer_capture *cap, int nthreads)
{
    nthreads = clamp_threads(s, nthreads);
    memcpy(s->x, x, sizeof(float) * (size_t)n * w->dim);
    rope_tables(w, s, pos, n);
    const int rc = layer_forward(w, s, l, pos, n, cap, &(exec_ctx){nthreads, NULL});
    memcpy(x, s->x, sizeof(float) * (size_t)n * w->dim);
    return rc;
}

/* Attention alone, for tests that hold it against a reference: n tokens' queries,
 * keys and values of layer l (after RoPE; in s->q, s->k, s->v) go into sequence 0's
 * cache at positions pos.. as a forward call puts them there, and attend; the output
 * is in s->att. */
static void attention_only(const weights *w, run_state *s, int l, int pos, int n, int nthreads)
{
    const block b = {w, s, &w->layers[l], l, pos, n, s->x};
    const exec_ctx cx = {clamp_threads(s, nthreads), NULL};
    s->seq = 0;
    cache_and_attend(&cx, &b);
}

/* ------------------------------------------------ how a step runs (exec_ctx) */

/* step on rows first..first+n-1 of b (each_row: all of them): in a team, row t by
 * thread t % threads (a decode step's one row: thread 0's) while the others go on to
 * the next sync_point; a row is always the same thread's, so one row's steps between
 * two sync_points follow each other; per call shared among the threads when there
 * are PARALLEL_ROWS rows or more. */
static void each_row_in(const exec_ctx *cx, const block *b, row_step *step, int first, int n)
{
    if (cx->tm) {
        for (int t = first; t < first + n; t++)
            if (t % cx->tm->threads == cx->tm->thread)
                step(b, t);
        return;
    }
    int t;
    #pragma omp parallel for schedule(static) if(n >= PARALLEL_ROWS) num_threads(team_thread_count(cx->nthreads))
    for (t = first; t < first + n; t++)
        step(b, t);
}

static void each_row(const exec_ctx *cx, const block *b, row_step *step)
{
    each_row_in(cx, b, step, 0, b->n);
}

/* Where the team's threads wait for each other: what one step wrote, the next
 * reads. Per call there is nothing to wait for: a step's parallel region has
 * ended before the next begins. */
static void sync_point(const exec_ctx *cx)
{
    if (cx->tm)
        team_wait(cx->tm);
}

/* y[n][out] = x[n][in] @ W^T: in the team this thread's share of the decode
 * kernel's team twin (one row), per call a kernel call with its own threads. */
static int linear_map(const exec_ctx *cx, const linear *l, const float *x, int n, float *y)
{
    if (cx->tm)
        return n == 1 ? l->team(l->q, x, y, cx->tm) : l->rows_team(l->q, x, n, y, cx->tm);
    return matmul(l, x, n, y, cx->nthreads);
}

static int matmul(const linear *l, const float *x, int n, float *y, int nthreads)
{
    if (l->q)
        return (l->qgemm_i8 ? l->qgemm_i8 : l->qgemm)(l->q, x, n, y, nthreads);
    if (l->w16)
        return half_matmul(l, x, n, y, nthreads);
    float_matmul(l, x, n, y, nthreads);
    return 0;
}

/* ------------------------------------------------------------ the steps */

/* xb through `count` linear maps into their own outputs, or through the
 * stacked map that replaces them (one kernel call; its rows are theirs side
 * by side) into s->stacked. */
static int project(const exec_ctx *cx, const block *b, const linear *stacked, const linear *const *parts,
                   float *const *outs, int count)
{
    run_state *s = b->s;
    if (is_set(stacked))
        return s->stacked ? linear_map(cx, stacked, s->xb, b->n, s->stacked) : -1;
    int rc = 0;
    for (int i = 0; i < count; i++) {
        if (i && cx->tm && b->n > 1)
            sync_point(cx);   /* a team's rows kernels claim tiles from ranges a barrier sets (team.h) */
        rc |= linear_map(cx, parts[i], s->xb, b->n, outs[i]);
    }
    return rc;
}

/* q, k, v = wq(xb), wk(xb), wv(xb); stacked, rows [q | k | v] that split_qkv_row copies apart */
static int project_qkv(const exec_ctx *cx, const block *b)
{
    const layer_weights *lw = b->lw;
    return project(cx, b, &lw->wqkv, (const linear *const[]){&lw->wq, &lw->wk, &lw->wv},
                   (float *const[]){b->s->q, b->s->k, b->s->v}, 3);
}

/* gate, up = w_gate(xb), w_up(xb); stacked, rows [gate | up] that swiglu_row reads in place */
static int project_gate_up(const exec_ctx *cx, const block *b)
{
    const layer_weights *lw = b->lw;
    return project(cx, b, &lw->w_gate_up, (const linear *const[]){&lw->w_gate, &lw->w_up},
                   (float *const[]){b->s->gate, b->s->up}, 2);
}

/* Row steps (row_step, forward.h): row t of the block's n. */

/* xb[t] = rmsnorm(x[t]) * weight */
static void norm_row(const block *b, const float *weight, int t)
{
    const int dim = b->w->dim;
    rmsnorm_row(b->x + (size_t)t * dim, weight, dim, b->w->eps, b->s->xb + (size_t)t * dim);
}

static void attn_norm_row(const block *b, int t)
{
    norm_row(b, b->lw->attn_norm, t);
}

static void ffn_norm_row(const block *b, int t)
{
    norm_row(b, b->lw->ffn_norm, t);
}

static void final_norm_row(const block *b, int t)
{
    norm_row(b, b->w->final_norm, t);
}

/* q[t], k[t], v[t] = the parts of the stacked wqkv's row t */
static void split_qkv_row(const block *b, int t)
{
    const size_t q_dim = (size_t)b->w->n_heads * b->w->head_dim, kv_dim = (size_t)b->w->n_kv_heads * b->w->head_dim;
    run_state *s = b->s;
    const float *row = s->stacked + (size_t)t * (q_dim + 2 * kv_dim);
    memcpy(s->q + t * q_dim, row, sizeof(float) * q_dim);
    memcpy(s->k + t * kv_dim, row + q_dim, sizeof(float) * kv_dim);
    memcpy(s->v + t * kv_dim, row + q_dim + kv_dim, sizeof(float) * kv_dim);
}

static void rope_q_row(const block *b, int t)
{
    const int hd = b->w->head_dim;
    rope_row(b->s->q + (size_t)t * b->w->n_heads * hd, b->w->n_heads, hd, b->s->cos_sin + (size_t)t * hd);
}

/* (KV_KVQUANT holds keys before RoPE: attention rotates them as it reads them) */
static void rope_k_row(const block *b, int t)
{
    if (b->s->kv.format == KV_KVQUANT)
        return;
    const int hd = b->w->head_dim;
    rope_row(b->s->k + (size_t)t * b->w->n_kv_heads * hd, b->w->n_kv_heads, hd, b->s->cos_sin + (size_t)t * hd);
}

/* token t's key and value (after RoPE) into its sequence's cache at its position
 * (a call of several rows may store them on several threads at once) */
static void cache_kv_row(const block *b, int t)
{
    store_kv_row(b->w, b->s, row_seq(b->s, t), b->layer, t, row_pos(b->s, b->pos, t), b->n > 1);
}

/* KIVI: the key group token t's position ends, coded (kv_cache.c) */
static void close_key_group_row(const block *b, int t)
{
    close_key_group(b->w, b->s, row_seq(b->s, t), b->layer, row_pos(b->s, b->pos, t));
}

/* The call's keys and values into the cache, then attention over it. A prompt into a
 * float16 window (KIVI's, kvquant's) goes a block of KV_BLOCK tokens at a time, so that the
 * window holds R + G + KV_BLOCK positions (kvquant: R + 2 KV_BLOCK), not R + G + max_tokens
 * (kv_cache.c; 48 MiB less for a 7B), each token
 * reading the cache as it reads it decoded alone either way. */
static void cache_and_attend(const exec_ctx *cx, const block *b)
{
    run_state *s = b->s;
    const int step = s->window_blocks && !s->row_seq ? KV_BLOCK : b->n;
    for (int first = 0; first < b->n; first += step) {
        const int n = b->n - first < step ? b->n - first : step;
        if (cx->tm) {
            /* in a team the stores go by (row, KV head), each thread some: a coded format's
             * (kvquant's above all) are microseconds a head, and thread 0 alone would make
             * the others wait. The rows' keys (rope_k_row) and, for KIVI's groups, all
             * heads' stores must be in first: both steps are by row. */
            sync_point(cx);
            for (int t = first; t < first + n; t++)
                for (int h = 0; h < b->w->n_kv_heads; h++)
                    if ((t * b->w->n_kv_heads + h) % cx->tm->threads == cx->tm->thread)
                        store_kv_head(b->w, s, row_seq(s, t), b->layer, t, row_pos(s, b->pos, t), h, b->n > 1);
            if (s->kv.format == KV_KIVI) {
                sync_point(cx);
                each_row_in(cx, b, close_key_group_row, first, n);
            }
        } else {
            each_row_in(cx, b, cache_kv_row, first, n);
            if (s->kv.format == KV_KIVI)   /* after all of these rows' keys are in (a step joins its rows) */
                each_row_in(cx, b, close_key_group_row, first, n);
        }
        sync_point(cx);
        attention(b->w, s, b->layer, b->pos, first, n, cx);
        sync_point(cx);
    }
}

/* x[t] += proj[t] */
static void residual_row(const block *b, int t)
{
    const int dim = b->w->dim;
    add_row(b->s->x + (size_t)t * dim, b->s->proj + (size_t)t * dim, dim);
}

/* gate[t] = silu(gate[t]) * up[t], from the stacked w_gate_up's row t when it ran */
static void swiglu_row(const block *b, int t)
{
    const int hidden = b->w->hidden_dim;
    run_state *s = b->s;
    float *gate = s->gate + (size_t)t * hidden;
    if (is_set(&b->lw->w_gate_up) && s->stacked) {
        const float *row = s->stacked + (size_t)t * 2 * hidden;
        swiglu(gate, row, row + hidden, hidden);
    } else {
        swiglu(gate, gate, s->up + (size_t)t * hidden, hidden);
    }
}

static void embed(const weights *w, const int *tokens, int n, float *x)
{
    for (int t = 0; t < n; t++) {
        float *row = x + (size_t)t * w->dim;
        if (w->embedding_q)
            qm_dequantize_column(w->embedding_q, tokens[t], row);
        else if (w->embedding16)
            for (int i = 0; i < w->dim; i++)
                row[i] = qm_half_to_float(w->embedding16[(size_t)tokens[t] * w->dim + i]);
        else
            memcpy(row, w->embedding + (size_t)tokens[t] * w->dim, sizeof(float) * w->dim);
    }
}

/* out = x / sqrt(mean(x^2) + eps) * weight (Hugging Face order of operations) */
QI_VECTORIZE
static void rmsnorm_row(const float *x, const float *weight, int dim, float eps, float *out)
{
    float ss = 0.0f;
    #pragma omp simd reduction(+:ss)
    for (int i = 0; i < dim; i++)
        ss += x[i] * x[i];
    const float inv = 1.0f / sqrtf(ss / dim + eps);
    #pragma omp simd
    for (int i = 0; i < dim; i++)
        out[i] = weight[i] * (x[i] * inv);
}

/* s->cos_sin[t] for each row's position */
static void rope_tables(const weights *w, const run_state *s, int pos, int n)
{
    const int half = w->head_dim / 2;
    for (int t = 0; t < n; t++) {
        float *cs = s->cos_sin + (size_t)t * w->head_dim;
        const int p = row_pos(s, pos, t);
        for (int i = 0; i < half; i++) {
            const float angle = (float)p * w->inv_freq[i];
            cs[i] = cosf(angle);
            cs[half + i] = sinf(angle);
        }
    }
}

/* Rotate-half RoPE (Hugging Face order): pairs (i, i + head_dim/2) of every head of one token. */
static void rope_row(float *v, int heads, int head_dim, const float *cs)
{
    const int half = head_dim / 2;
    for (int h = 0; h < heads; h++) {
        float *vh = v + (size_t)h * head_dim;
        for (int i = 0; i < half; i++) {
            const float a = vh[i], b = vh[half + i];
            vh[i] = a * cs[i] - b * cs[half + i];
            vh[half + i] = b * cs[i] + a * cs[half + i];
        }
    }
}

/* x[dim] += y[dim] */
QI_VECTORIZE
static void add_row(float *x, const float *y, int dim)
{
    #pragma omp simd
    for (int i = 0; i < dim; i++)
        x[i] += y[i];
}

/* silu(g) = g * sigmoid(g), with sigmoid from e = exp(-|g|) <= 1 so that the
 * branch-free exp_nonpositive serves both signs and the loop vectorizes:
 * sigmoid(g) = 1 / (1 + e) for g >= 0, e / (1 + e) below. */
static inline float silu(float g)
{
    const float e = exp_nonpositive(-fabsf(g));
    return g * (g >= 0.0f ? 1.0f : e) / (1.0f + e);
}

/* out = silu(gate) * up over one row of n values (out may be gate) */
QI_VECTORIZE
static void swiglu(float *out, const float *gate, const float *up, int n)
{
    #pragma omp simd
    for (int i = 0; i < n; i++)
        out[i] = silu(gate[i]) * up[i];
}

static void capture(float *dst, const float *src, size_t count)
{
    if (dst)
        memcpy(dst, src, sizeof(float) * count);
}

/* ------------------------------------------------------------ the run state */

static int is_set(const linear *l)
{
    return l->q != NULL || l->w != NULL || l->w16 != NULL;
}

static void free_state(run_state *s)
{
    free(s->x); free(s->xb); free(s->proj); free(s->q); free(s->att);
    free(s->gate); free(s->up); free(s->scores); free(s->cos_sin);
    free(s->k); free(s->v); free(s->stacked);
    free_kv_cache(s);
    memset(s, 0, sizeof(*s));
}

/* Floats of a query tile's scores: its rows over the whole context. */
static size_t tile_score_floats(const weights *w, const run_state *s)
{
    return (size_t)QUERY_TOKENS * (w->n_heads / w->n_kv_heads) * s->ctx_blocks * KV_BLOCK;
}

/* Floats of `scores` one attention thread uses: a tile's scores, then a block of keys and
 * one of values widened from a float16 cache (attention_tile). */
static size_t scores_per_thread(const weights *w, const run_state *s)
{
    return tile_score_floats(w, s) + 2 * (size_t)KV_BLOCK * w->head_dim;
}

/* Room for `threads` attention threads, when a call asks for more than the state was made for. */
static int grow_threads(run_state *s, const weights *w, int threads)
{
    if (threads <= s->threads)
        return 0;
    float *scores = realloc(s->scores, sizeof(float) * (size_t)threads * scores_per_thread(w, s));
    if (!scores)
        return -1;
    s->scores = scores;
    s->threads = threads;
    return 0;
}

static int alloc_state(run_state *s, const weights *w, int max_tokens, int threads, int seqs, kv_spec kv)
{
    const size_t T = (size_t)max_tokens, q_dim = (size_t)w->n_heads * w->head_dim;
    const size_t kv_dim = (size_t)w->n_kv_heads * w->head_dim;
    memset(s, 0, sizeof(*s));
    s->max_tokens = max_tokens;
    s->threads = threads;
    s->seqs = seqs;
    s->kv = kv;
    s->decode_team = 1;
    governor_init(&s->decode_governor, 2);
    governor_init(&s->prefill_governor, 2);
    governor_init(&s->rows_governor, 2);
    s->x = malloc(sizeof(float) * T * w->dim);
    s->xb = malloc(sizeof(float) * T * w->dim);
    s->proj = malloc(sizeof(float) * T * w->dim);
    s->q = malloc(sizeof(float) * T * q_dim);
    s->att = malloc(sizeof(float) * T * q_dim);
    s->gate = malloc(sizeof(float) * T * w->hidden_dim);
    s->up = malloc(sizeof(float) * T * w->hidden_dim);
    s->ctx_blocks = (w->ctx + KV_BLOCK - 1) / KV_BLOCK;
    s->scores = malloc(sizeof(float) * (size_t)threads * scores_per_thread(w, s));
    s->cos_sin = malloc(sizeof(float) * T * w->head_dim);
    s->k = malloc(sizeof(float) * T * kv_dim);
    s->v = malloc(sizeof(float) * T * kv_dim);
    const int cache_failed = alloc_kv_cache(w, s);
    size_t stacked = 0;
    for (int l = 0; l < w->n_layers; l++) {
        if (is_set(&w->layers[l].wqkv) && stacked < q_dim + 2 * kv_dim)
            stacked = q_dim + 2 * kv_dim;
        if (is_set(&w->layers[l].w_gate_up) && stacked < 2 * (size_t)w->hidden_dim)
            stacked = 2 * (size_t)w->hidden_dim;
    }
    s->stacked = stacked ? malloc(sizeof(float) * T * stacked) : NULL;
    if (!s->x || !s->xb || !s->proj || !s->q || !s->att || !s->gate || !s->up || !s->scores ||
        !s->cos_sin || !s->k || !s->v || cache_failed || (stacked && !s->stacked)) {
        free_state(s);
        return -1;
    }
    return 0;
}
