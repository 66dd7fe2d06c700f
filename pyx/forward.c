/* forward.c: the forward pass (forward.h) and its steps. Part of
 * _forward.pyx's translation unit. */
#include "forward.h"

/* ------------------------------------------------------------- forward */

/* One transformer block on s->x (n tokens at positions pos..). */
static int layer_forward(const weights *w, run_state *s, int l, int pos, int n,
                         const layer_capture *cap, int nthreads)
{
    const layer_weights *lw = &w->layers[l];
    const int dim = w->dim, hd = w->head_dim, q_dim = w->n_heads * hd;
    int rc = 0;

    /* attention block: x += wo(attention(rope(q), cache += (rope(k), v))) */
    rmsnorm(s->x, lw->attn_norm, n, dim, w->eps, s->xb, nthreads);
    capture(cap ? cap->attn_in : NULL, s->xb, (size_t)n * dim);
    rc |= project_qkv(w, lw, s, n, nthreads);
    rope(s->q, n, w->n_heads, hd, s->cos_sin, nthreads);
    rope(s->k, n, w->n_kv_heads, hd, s->cos_sin, nthreads);
    store_kv(w, s, l, pos, n, nthreads);
    attention(w, s, l, pos, n, nthreads);
    capture(cap ? cap->o_in : NULL, s->att, (size_t)n * q_dim);
    rc |= matmul(&lw->wo, s->att, n, s->proj, nthreads);
    add_rows(s->x, s->proj, n, dim, nthreads);

    /* MLP block: x += w_down(silu(w_gate(x)) * w_up(x)) */
    rmsnorm(s->x, lw->ffn_norm, n, dim, w->eps, s->xb, nthreads);
    capture(cap ? cap->mlp_in : NULL, s->xb, (size_t)n * dim);
    rc |= gated_hidden(w, lw, s, n, nthreads);
    capture(cap ? cap->down_in : NULL, s->gate, (size_t)n * w->hidden_dim);
    rc |= matmul(&lw->w_down, s->gate, n, s->proj, nthreads);
    add_rows(s->x, s->proj, n, dim, nthreads);
    return rc ? -1 : 0;
}

/* ------------------------------------------------------- the decode team */

/* A decode step (one token) runs as one OpenMP thread team from the first
 * layer to the LM head, the threads waiting for each other at spinning
 * barriers between the steps, instead of a parallel region per kernel call
 * (five a layer): on a 2-core KVM guest libgomp's fork and join of a region
 * cost ~1.5 us (its join makes a futex system call every time), the barrier
 * of team.h ~0.1 us. Each kernel call is a qgemv_team_fn (qmatrix.h); the row-wise
 * steps between them are a few microseconds of work, done by thread 0 while
 * the others wait, and attention shares its heads out. Every number is
 * computed by the same functions as in the per-call path, so the results are
 * the same. */

static int team_ready_linear(const linear *l)
{
    return l->team != NULL;
}

/* Whether every linear map a decode step runs has a team kernel. */
static int team_ready(const weights *w)
{
    if (!team_ready_linear(&w->lm_head))
        return 0;
    for (int l = 0; l < w->n_layers; l++) {
        const layer_weights *lw = &w->layers[l];
        const int qkv = is_set(&lw->wqkv) ? team_ready_linear(&lw->wqkv)
            : team_ready_linear(&lw->wq) && team_ready_linear(&lw->wk) && team_ready_linear(&lw->wv);
        const int gate_up = is_set(&lw->w_gate_up) ? team_ready_linear(&lw->w_gate_up)
            : team_ready_linear(&lw->w_gate) && team_ready_linear(&lw->w_up);
        if (!qkv || !gate_up || !team_ready_linear(&lw->wo) || !team_ready_linear(&lw->w_down))
            return 0;
    }
    return 1;
}

static int team_matmul(const linear *l, const float *x, float *y, const team *tm)
{
    return l->team(l->q, x, y, tm);
}

/* One block on s->x for the token at position pos, by every thread of the team. */
static int layer_decode_team(const weights *w, run_state *s, int l, int pos, const team *tm)
{
    const layer_weights *lw = &w->layers[l];
    const int dim = w->dim, hd = w->head_dim, hidden = w->hidden_dim;
    const size_t q_dim = (size_t)w->n_heads * hd, kv_dim = (size_t)w->n_kv_heads * hd;
    const int lead = tm->thread == 0;
    int rc = 0;

    /* attention block: x += wo(attention(rope(q), cache += (rope(k), v))) */
    if (lead)
        rmsnorm_row(s->x, lw->attn_norm, dim, w->eps, s->xb);
    team_wait(tm);
    if (is_set(&lw->wqkv)) {
        rc |= team_matmul(&lw->wqkv, s->xb, s->stacked, tm);
    } else {
        rc |= team_matmul(&lw->wq, s->xb, s->q, tm);
        rc |= team_matmul(&lw->wk, s->xb, s->k, tm);
        rc |= team_matmul(&lw->wv, s->xb, s->v, tm);
    }
    team_wait(tm);
    if (lead) {
        if (is_set(&lw->wqkv)) {
            memcpy(s->q, s->stacked, sizeof(float) * q_dim);
            memcpy(s->k, s->stacked + q_dim, sizeof(float) * kv_dim);
            memcpy(s->v, s->stacked + q_dim + kv_dim, sizeof(float) * kv_dim);
        }
        rope_row(s->q, w->n_heads, hd, s->cos_sin);
        rope_row(s->k, w->n_kv_heads, hd, s->cos_sin);
        store_kv_row(w, s, l, 0, pos);
    }
    team_wait(tm);
    for (int job = tm->thread; job < attention_jobs(w, 1); job += tm->threads)
        attention_job(w, s, l, pos, 1, job, thread_scores(w, s, tm->thread));
    team_wait(tm);
    rc |= team_matmul(&lw->wo, s->att, s->proj, tm);
    team_wait(tm);

    /* MLP block: x += w_down(silu(w_gate(x)) * w_up(x)) */
    if (lead) {
        add_row(s->x, s->proj, dim);
        rmsnorm_row(s->x, lw->ffn_norm, dim, w->eps, s->xb);
    }
    team_wait(tm);
    if (is_set(&lw->w_gate_up)) {
        rc |= team_matmul(&lw->w_gate_up, s->xb, s->stacked, tm);
    } else {
        rc |= team_matmul(&lw->w_gate, s->xb, s->gate, tm);
        rc |= team_matmul(&lw->w_up, s->xb, s->up, tm);
    }
    team_wait(tm);
    if (lead) {
        if (is_set(&lw->w_gate_up))
            swiglu(s->gate, s->stacked, s->stacked + hidden, hidden);
        else
            swiglu(s->gate, s->gate, s->up, hidden);
    }
    team_wait(tm);
    rc |= team_matmul(&lw->w_down, s->gate, s->proj, tm);
    team_wait(tm);
    if (lead)
        add_row(s->x, s->proj, dim);   /* the next block's first step is thread 0's too */
    return rc;
}

/* forward() for one token, as one team of nthreads threads (team_ready(w)). */
static int decode_team(const weights *w, run_state *s, int token, int pos, float *logits, int nthreads)
{
    team_barrier barrier = {0, 0, 0};
    int failed = 0;
    embed(w, &token, 1, s->x);
    rope_tables(w, pos, 1, s->cos_sin);
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
        for (int l = 0; l < w->n_layers; l++)
            failed |= layer_decode_team(w, s, l, pos, &tm);
        if (tm.thread == 0)
            rmsnorm_row(s->x, w->final_norm, w->dim, w->eps, s->xb);
        team_wait(&tm);
        failed |= team_matmul(&w->lm_head, s->xb, logits, &tm);
    }
    return failed ? -1 : 0;
}

static int clamp_threads(const run_state *s, int nthreads)
{
    /* attention() keeps one scores block per thread: never more threads than blocks
     * (the Python side grows them first, grow_threads, when a call asks for more) */
    return (nthreads > 0 && nthreads < s->threads) ? nthreads : s->threads;
}

/* forward() with nthreads threads, or with the prefill governor's count for
 * each block when g is set (n > 1). */
static int forward_with(const weights *w, run_state *s, const int *tokens, int n, int pos,
                        float *logits, int all_logits, int nthreads, team_governor *g)
{
    const int dim = w->dim;
    if (n == 1 && nthreads > 1 && s->decode_team && team_ready(w))
        return decode_team(w, s, tokens[0], pos, logits, nthreads);
    embed(w, tokens, n, s->x);
    rope_tables(w, pos, n, s->cos_sin);
    if (g)
        governor_rows(g, n);
    int threads = nthreads;
    for (int l = 0; l < w->n_layers; l++) {
        const double t0 = g ? team_clock() : 0.0;
        if (g)
            threads = governor_threads(g, nthreads);
        if (layer_forward(w, s, l, pos, n, NULL, threads))
            return -1;
        if (g)
            governor_report(g, threads, t0, team_clock());
    }
    if (g)
        threads = g->use;

    /* final norm and LM head: every row, or just the last one for generation */
    const float *rows = all_logits ? s->x : s->x + (size_t)(n - 1) * dim;
    const int n_rows = all_logits ? n : 1;
    rmsnorm(rows, w->final_norm, n_rows, dim, w->eps, s->xb, threads);
    return matmul(&w->lm_head, s->xb, n_rows, logits, threads);
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
    if (n > 1)
        return forward_with(w, s, tokens, n, pos, logits, all_logits, nthreads, &s->prefill_governor);
    const double t0 = team_clock();
    const int threads = governor_threads(&s->decode_governor, nthreads);
    const int rc = forward_with(w, s, tokens, n, pos, logits, all_logits, threads, NULL);
    governor_report(&s->decode_governor, threads, t0, team_clock());
    return rc;
}

/* One block on caller-given hidden states x[n][dim] (in place), for
 * layer-by-layer work such as GPTQ calibration. */
static int run_layer(const weights *w, run_state *s, int l, float *x, int n, int pos,
                     const layer_capture *cap, int nthreads)
{
    nthreads = clamp_threads(s, nthreads);
    memcpy(s->x, x, sizeof(float) * (size_t)n * w->dim);
    rope_tables(w, pos, n, s->cos_sin);
    const int rc = layer_forward(w, s, l, pos, n, cap, nthreads);
    memcpy(x, s->x, sizeof(float) * (size_t)n * w->dim);
    return rc;
}

/* ------------------------------------------------------------ the steps */

static int thread_count(int nthreads)
{
#ifdef _OPENMP
    return nthreads > 0 ? nthreads : omp_get_max_threads();
#else
    (void)nthreads;
    return 1;
#endif
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

static void rmsnorm(const float *x, const float *weight, int n, int dim, float eps, float *out, int nthreads)
{
    int t;
    #pragma omp parallel for schedule(static) if(n >= PARALLEL_ROWS) num_threads(thread_count(nthreads))
    for (t = 0; t < n; t++)
        rmsnorm_row(x + (size_t)t * dim, weight, dim, eps, out + (size_t)t * dim);
}

static void rope_tables(const weights *w, int pos, int n, float *cos_sin)
{
    const int half = w->head_dim / 2;
    for (int t = 0; t < n; t++) {
        float *cs = cos_sin + (size_t)t * w->head_dim;
        for (int i = 0; i < half; i++) {
            const float angle = (float)(pos + t) * w->inv_freq[i];
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

static void rope(float *v, int n, int heads, int head_dim, const float *cos_sin, int nthreads)
{
    int t;
    #pragma omp parallel for schedule(static) if(n >= PARALLEL_ROWS) num_threads(thread_count(nthreads))
    for (t = 0; t < n; t++)
        rope_row(v + (size_t)t * heads * head_dim, heads, head_dim, cos_sin + (size_t)t * head_dim);
}


/* x[dim] += y[dim] */
QI_VECTORIZE
static void add_row(float *x, const float *y, int dim)
{
    #pragma omp simd
    for (int i = 0; i < dim; i++)
        x[i] += y[i];
}

/* x[n][dim] += y[n][dim] */
static void add_rows(float *x, const float *y, int n, int dim, int nthreads)
{
    int t;
    #pragma omp parallel for schedule(static) if(n >= PARALLEL_ROWS) num_threads(thread_count(nthreads))
    for (t = 0; t < n; t++)
        add_row(x + (size_t)t * dim, y + (size_t)t * dim, dim);
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

/* q, k, v = wq(xb), wk(xb), wv(xb): three kernel calls, or one call of the
 * stacked wqkv whose rows [q | k | v] are then copied apart. */
static int project_qkv(const weights *w, const layer_weights *lw, run_state *s, int n, int nthreads)
{
    const size_t q_dim = (size_t)w->n_heads * w->head_dim, kv_dim = (size_t)w->n_kv_heads * w->head_dim;
    if (!is_set(&lw->wqkv)) {
        int rc = matmul(&lw->wq, s->xb, n, s->q, nthreads);
        rc |= matmul(&lw->wk, s->xb, n, s->k, nthreads);
        rc |= matmul(&lw->wv, s->xb, n, s->v, nthreads);
        return rc;
    }
    if (!s->stacked || matmul(&lw->wqkv, s->xb, n, s->stacked, nthreads))
        return -1;
    int t;
    #pragma omp parallel for schedule(static) if(n >= PARALLEL_ROWS) num_threads(thread_count(nthreads))
    for (t = 0; t < n; t++) {
        const float *row = s->stacked + (size_t)t * (q_dim + 2 * kv_dim);
        memcpy(s->q + t * q_dim, row, sizeof(float) * q_dim);
        memcpy(s->k + t * kv_dim, row + q_dim, sizeof(float) * kv_dim);
        memcpy(s->v + t * kv_dim, row + q_dim + kv_dim, sizeof(float) * kv_dim);
    }
    return 0;
}

/* gate = silu(w_gate(xb)) * w_up(xb): two kernel calls, or one of the stacked w_gate_up. */
static int gated_hidden(const weights *w, const layer_weights *lw, run_state *s, int n, int nthreads)
{
    const int hidden = w->hidden_dim;
    const int stacked = is_set(&lw->w_gate_up);
    if (stacked) {
        if (!s->stacked || matmul(&lw->w_gate_up, s->xb, n, s->stacked, nthreads))
            return -1;
    } else if (matmul(&lw->w_gate, s->xb, n, s->gate, nthreads) | matmul(&lw->w_up, s->xb, n, s->up, nthreads)) {
        return -1;
    }
    int t;
    #pragma omp parallel for schedule(static) if(n >= PARALLEL_ROWS) num_threads(thread_count(nthreads))
    for (t = 0; t < n; t++) {
        float *gate = s->gate + (size_t)t * hidden;
        if (stacked) {
            const float *row = s->stacked + (size_t)t * 2 * hidden;
            swiglu(gate, row, row + hidden, hidden);
        } else {
            swiglu(gate, gate, s->up + (size_t)t * hidden, hidden);
        }
    }
    return 0;
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
    free(s->k); free(s->v); free(s->stacked); free(s->key_cache); free(s->value_cache);
    memset(s, 0, sizeof(*s));
}

/* Floats of `scores` one attention thread uses: a query tile's rows over the whole context. */
static size_t scores_per_thread(const weights *w, const run_state *s)
{
    return (size_t)QUERY_TOKENS * (w->n_heads / w->n_kv_heads) * s->ctx_blocks * KV_BLOCK;
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

static int alloc_state(run_state *s, const weights *w, int max_tokens, int threads)
{
    const size_t T = (size_t)max_tokens, q_dim = (size_t)w->n_heads * w->head_dim;
    const size_t kv_dim = (size_t)w->n_kv_heads * w->head_dim;
    memset(s, 0, sizeof(*s));
    s->max_tokens = max_tokens;
    s->threads = threads;
    s->decode_team = 1;
    governor_init(&s->decode_governor, 2);
    governor_init(&s->prefill_governor, 2);
    s->x = malloc(sizeof(float) * T * w->dim);
    s->xb = malloc(sizeof(float) * T * w->dim);
    s->proj = malloc(sizeof(float) * T * w->dim);
    s->q = malloc(sizeof(float) * T * q_dim);
    s->att = malloc(sizeof(float) * T * q_dim);
    s->gate = malloc(sizeof(float) * T * w->hidden_dim);
    s->up = malloc(sizeof(float) * T * w->hidden_dim);
    s->ctx_blocks = (w->ctx + KV_BLOCK - 1) / KV_BLOCK;
    const size_t cache = (size_t)w->n_layers * s->ctx_blocks * KV_BLOCK * kv_dim;
    s->scores = malloc(sizeof(float) * (size_t)threads * scores_per_thread(w, s));
    s->cos_sin = malloc(sizeof(float) * T * w->head_dim);
    s->k = malloc(sizeof(float) * T * kv_dim);
    s->v = malloc(sizeof(float) * T * kv_dim);
    s->key_cache = calloc(cache, sizeof(float));
    s->value_cache = calloc(cache, sizeof(float));
    size_t stacked = 0;
    for (int l = 0; l < w->n_layers; l++) {
        if (is_set(&w->layers[l].wqkv) && stacked < q_dim + 2 * kv_dim)
            stacked = q_dim + 2 * kv_dim;
        if (is_set(&w->layers[l].w_gate_up) && stacked < 2 * (size_t)w->hidden_dim)
            stacked = 2 * (size_t)w->hidden_dim;
    }
    s->stacked = stacked ? malloc(sizeof(float) * T * stacked) : NULL;
    if (!s->x || !s->xb || !s->proj || !s->q || !s->att || !s->gate || !s->up || !s->scores ||
        !s->cos_sin || !s->k || !s->v || !s->key_cache || !s->value_cache || (stacked && !s->stacked)) {
        free_state(s);
        return -1;
    }
    return 0;
}

