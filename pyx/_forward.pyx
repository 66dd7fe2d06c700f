# cython: language_level=3
"""The LLaMA forward pass: one call per step (a prefill of n tokens, or one
decode step), in C without the GIL and without numpy.

The C is in forward.h (the weights, the run state and its buffers, the
steps), forward.c (the forward pass, then its steps), float_gemm.c (float32
and float16 linear maps) and attention.c (the KV cache and attention); this
module compiles them in and gives Python the `Transformer` that owns them.
"""
from cpython.pycapsule cimport PyCapsule_GetPointer
from libc.stdint cimport int32_t, uint16_t
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memcpy

import numpy as np

from qmatrix cimport qmatrix, qgemm_fn, qgemv_team_fn, qgemm_team_fn
from team cimport (team_governor, team_wait_mode, TEAM_WAIT_SLEEP, TEAM_WAIT_SPIN,
                   team_probe_min_s, team_probe_max_s, team_probe_share, team_load_check, TEAM_PROBE_SHARE)

# One translation unit, as when the C was a string here (forward.h says why).
cdef extern from "float_gemm.c":
    pass
cdef extern from "kv_cache.c":
    pass
cdef extern from "attention.c":
    pass

cdef extern from "forward.c":
    ctypedef struct linear:
        const qmatrix *q
        qgemm_fn qgemm
        qgemm_fn qgemm_i8
        qgemv_team_fn team
        qgemm_team_fn rows_team
        const float *w
        const uint16_t *w16
        int in_ "in"
        int out
    ctypedef struct layer_weights:
        const float *attn_norm
        linear wq, wk, wv, wo, wqkv
        const float *ffn_norm
        linear w_gate, w_up, w_down, w_gate_up
    ctypedef struct weights:
        int dim, hidden_dim, n_layers, n_heads, n_kv_heads, head_dim, vocab_size, ctx
        float eps
        const float *embedding
        const uint16_t *embedding16
        const qmatrix *embedding_q
        layer_weights *layers
        const float *final_norm
        linear lm_head
        const float *inv_freq
    ctypedef struct run_state:
        int max_tokens
        int threads
        int decode_team
        team_governor decode_governor
        team_governor prefill_governor
        team_governor rows_governor
        float *stacked
        const float *key_center
        const float *key_half_range
        const float *key_levels
        const float *value_levels
        float *q
        float *k
        float *v
        float *att
        int seqs
        int seq
    int team_ready(const weights *w) nogil
    int rows_team_ready(const weights *w) nogil
    int adapt_threads
    int tile_claims
    ctypedef struct kv_spec:
        int format, bits, group, residual
    int alloc_state(run_state *s, const weights *w, int max_tokens, int threads, int seqs, kv_spec kv) nogil
    int KV_F32, KV_F16, KV_Q8, KV_KIVI, KV_KVQUANT
    int kv_hardware_halves
    int kv_avx512
    size_t kv_bytes_per_token(const weights *w, const run_state *s) nogil
    int grow_threads(run_state *s, const weights *w, int threads) nogil
    void free_state(run_state *s) nogil
    int forward(const weights *w, run_state *s, const int *tokens, int n, int pos,
                float *logits, int all_logits, int nthreads) nogil
    int forward_rows(const weights *w, run_state *s, const int *tokens, const int *seqs,
                     const int *positions, int n, float *logits, int nthreads) nogil
    ctypedef struct layer_capture:
        float *attn_in
        float *o_in
        float *mlp_in
        float *down_in
    int run_layer(const weights *w, run_state *s, int l, float *x, int n, int pos,
                  const layer_capture *cap, int nthreads) nogil
    void attention_only(const weights *w, run_state *s, int l, int pos, int n, int nthreads) nogil
    int kvquant_tables(const weights *w, run_state *s) nogil


def set_thread_policy(bint adaptive, bint spin):
    """How forward() uses threads (qinfer.kernels sets this): adaptive, let the
    governors of pyx/team.h choose the count of each decode step and prefill
    block (at most the count asked for), else always run the count asked for;
    spin, make the decode team's barrier spin and yield until released (before
    issue 34) instead of sleeping on a futex after ~50 us."""
    global adapt_threads, team_wait_mode
    adapt_threads = adaptive
    team_wait_mode = TEAM_WAIT_SPIN if spin else TEAM_WAIT_SLEEP


def thread_policy():
    """(adaptive, spin) as set_thread_policy last set them."""
    return bool(adapt_threads), team_wait_mode == TEAM_WAIT_SPIN


def set_tile_claims(bint on):
    """Whether the threads of a batched step (forward_rows) claim the tiles of each row
    kernel call (int8, W8A8, lookup-table) and of attention, their own share first and
    then what the others left (pyx/team.h, team_claim; the default), or each computes a
    fixed share (off): the same results either way; for measurements and tests."""
    global tile_claims
    tile_claims = on


def tile_claims_on():
    """Whether set_tile_claims last turned tile claims on."""
    return bool(tile_claims)


def set_kv_hardware_halves(bint on):
    """Whether attention over a float16 KV cache converts with F16C where the CPU has
    it (the default) or with the portable integer loops (tests compare the two).
    Returns the previous setting."""
    global kv_hardware_halves
    previous = bool(kv_hardware_halves)
    kv_hardware_halves = on
    return previous


def set_kv_avx512(bint on):
    """Whether attention's loops run their AVX-512 build where the CPU has AVX-512F/VL
    (the default; qinfer.kernels.set_float_avx512 sets it with the float kernels) or
    their AVX2 one. Returns the previous setting."""
    global kv_avx512
    previous = bool(kv_avx512)
    kv_avx512 = on
    return previous


def set_probe_interval(double shortest, double longest, double share=TEAM_PROBE_SHARE):
    """Seconds of work between the governors' periodic probes: `shortest` after a
    start or a switch, doubling after every probe that loses, up to `longest`
    (pyx/team.h: 1 and 8), and at least a probe's own time / `share` (0.02).
    Tests set 0, 0, 0: a probe whenever enough units have run. Returns the
    previous triple. Governors already running keep their current interval and
    share."""
    global team_probe_min_s, team_probe_max_s, team_probe_share
    previous = team_probe_min_s, team_probe_max_s, team_probe_share
    team_probe_min_s, team_probe_max_s, team_probe_share = shortest, longest, share
    return previous


def set_load_check(bint on):
    """Whether governors created from now on measure the other processes' load before a
    probe of fewer threads and skip it while the machine has room for their threads
    (pyx/team.h, governor_contended; the default), or run every probe as on a busy
    machine (tests that make the governors probe all the time). Returns the previous
    setting."""
    global team_load_check
    previous = bool(team_load_check)
    team_load_check = on
    return previous


cdef dict governor_state(const team_governor *g):
    return dict(asked=g.max, threads=g.use if g.max else None, probes=g.probes, switches=g.switches,
                skipped=g.skipped, seconds=g.cost if g.max and g.cost >= 0 else None, work=g.work)


cdef const uint16_t *half_ptr(object array, Py_ssize_t size) except NULL:
    """Pointer into a C-contiguous float16 numpy array of `size` elements."""
    cdef const uint16_t[::1] view = array.reshape(-1).view("uint16")
    if view.shape[0] != size:
        raise ValueError(f"expected {size} float16 values, got {view.shape[0]}")
    return &view[0]


cdef bint is_half(object array):
    return getattr(array, "dtype", None) == "float16"


cdef const float *float_ptr(object array, Py_ssize_t size) except NULL:
    """Pointer into a C-contiguous float32 numpy array of `size` elements."""
    cdef const float[::1] view = array.reshape(-1)
    if view.shape[0] != size:
        raise ValueError(f"expected {size} floats, got {view.shape[0]}")
    return &view[0]


cdef class Transformer:
    """The C view of a model: pointers into arrays and packed layers owned by
    the Python objects passed in (kept alive here), plus the run state.

    `layers` is a list of dicts with keys attn_norm, ffn_norm (float32
    arrays) and wq, wk, wv, wo, w_gate, w_up, w_down; each linear is either a
    float32 [out, in] array or a tuple (matrix capsule, kernel capsule[, int8
    kernel capsule or None[, its team twin or None]]); the int8 kernel, when
    given, runs every step, and its team twin the decode steps (team_forward).
    A dict may instead give "wqkv" (wq, wk, wv stacked: [q_dim + 2*kv_dim, dim])
    for wq/wk/wv and "w_gate_up" ([2*hidden, dim]) for w_gate/w_up.
    `embedding` is a float32 or float16 [vocab, dim] array, or a quantized
    table: a linear spec tuple of a packed dim -> vocab layer (the caller
    checks its shape), whose rows are widened only when looked up.
    """
    cdef weights w
    cdef run_state s
    cdef bint has_state
    cdef object keep

    def __cinit__(self):
        self.w.layers = NULL
        self.has_state = False

    def __init__(self, dict config, embedding, list layers, final_norm, lm_head, inv_freq,
                 int max_tokens, int threads, int seqs=1, str kv_cache="f32", int kv_residual=0, int kv_group=0,
                 dict kv_calibration=None):
        cdef int i
        cdef kv_spec kv
        self.keep = [embedding, layers, final_norm, lm_head, inv_freq]
        self.w.dim = config["dim"]
        self.w.hidden_dim = config["hidden_dim"]
        self.w.n_layers = len(layers)
        self.w.n_heads = config["n_heads"]
        self.w.n_kv_heads = config["n_kv_heads"]
        self.w.head_dim = config["head_dim"]
        self.w.vocab_size = config["vocab_size"]
        self.w.ctx = config["ctx"]
        self.w.eps = config["eps"]
        dim, hd = self.w.dim, self.w.head_dim
        q_dim, kv_dim = self.w.n_heads * hd, self.w.n_kv_heads * hd
        self.w.embedding = NULL
        self.w.embedding16 = NULL
        self.w.embedding_q = NULL
        if isinstance(embedding, tuple):        # (matrix capsule, ...): a packed dim -> vocab layer
            self.w.embedding_q = <const qmatrix *>PyCapsule_GetPointer(embedding[0], b"qinfer.qmatrix")
        elif is_half(embedding):
            self.w.embedding16 = half_ptr(embedding, <Py_ssize_t>self.w.vocab_size * dim)
        else:
            self.w.embedding = float_ptr(embedding, <Py_ssize_t>self.w.vocab_size * dim)
        self.w.final_norm = float_ptr(final_norm, dim)
        self.w.inv_freq = float_ptr(inv_freq, hd // 2)
        self.set_linear_ptr(&self.w.lm_head, lm_head, dim, self.w.vocab_size)
        self.w.layers = <layer_weights *>calloc(len(layers), sizeof(layer_weights))
        if self.w.layers == NULL:
            raise MemoryError()
        for i, layer in enumerate(layers):
            self.w.layers[i].attn_norm = float_ptr(layer["attn_norm"], dim)
            self.w.layers[i].ffn_norm = float_ptr(layer["ffn_norm"], dim)
            for name, spec in layer.items():
                if name not in ("attn_norm", "ffn_norm"):
                    self.point(i, name, spec)
            for parts, stacked in ((("wq", "wk", "wv"), "wqkv"), (("w_gate", "w_up"), "w_gate_up")):
                if all(layer.get(p) is not None for p in parts) == (layer.get(stacked) is not None):
                    raise ValueError(f"layer {i}: give either {', '.join(parts)} or {stacked}")
            for name in ("wo", "w_down"):
                if layer.get(name) is None:
                    raise ValueError(f"layer {i}: {name} is missing")
        if seqs < 1:
            raise ValueError("a KV cache holds one sequence or more")
        # (format, bits) of each name of qinfer/kv_cache.py the C side holds
        formats = {"f32": (KV_F32, 0), "f16": (KV_F16, 0), "q8": (KV_Q8, 8), "kivi4": (KV_KIVI, 4),
                   "kivi2": (KV_KIVI, 2), "kvquant4": (KV_KVQUANT, 4), "kvquant3": (KV_KVQUANT, 3),
                   "kvquant2": (KV_KVQUANT, 2)}
        if kv_cache not in formats:
            raise ValueError(f"no KV cache format {kv_cache!r} here; the C side holds {sorted(formats)}")
        kv.format, kv.bits = formats[kv_cache]
        kv.group, kv.residual = kv_group, kv_residual
        if kv.format == KV_KIVI and (kv_group % 32 or kv_group <= 0 or config["head_dim"] % kv_group
                                     or kv_residual < 0 or kv_residual % kv_group):
            raise ValueError(f"KIVI needs a group that is a multiple of 32 and divides head_dim, and a "
                             f"residual window that is a multiple of it (group {kv_group}, residual {kv_residual})")
        if kv.format == KV_KVQUANT and kv_residual < 0:
            raise ValueError(f"a kvquant window holds a non-negative number of tokens, not {kv_residual}")
        if kv.format == KV_Q8 and config["head_dim"] % 32:
            raise ValueError("the q8 cache needs a head_dim divisible by 32")
        if kv.format in (KV_Q8, KV_KIVI, KV_KVQUANT) and config["head_dim"] > 256:
            raise ValueError("the coded KV caches take heads of at most 256 (KV_MAX_HEAD_DIM)")
        if kv.format == KV_KVQUANT and kv_calibration is None:
            raise ValueError("a kvquant cache needs its calibration (key_center, key_half_range, levels)")
        if alloc_state(&self.s, &self.w, max_tokens, threads, seqs, kv) != 0:
            raise MemoryError("not enough memory for the KV cache and buffers "
                              f"(context {self.w.ctx}, {seqs} sequences); try a smaller context")
        self.has_state = True
        if kv.format == KV_KVQUANT:
            self.point_kv_calibration(kv_calibration, kv.bits)

    cdef int point_kv_calibration(self, dict cal, int bits) except -1:
        """KV_KVQUANT's levels and key ranges (qinfer/kv_calibration.py), float32 arrays kept alive here."""
        if cal is None:
            raise ValueError("a kvquant cache needs its calibration (key_center, key_half_range, levels)")
        L, H, D = self.w.n_layers, self.w.n_kv_heads, self.w.head_dim
        shapes = {"key_center": (L, H, D), "key_half_range": (L, H, D), "key_levels": (L, 1 << bits),
                  "value_levels": (L, 1 << bits)}
        arrays = {}
        for name, shape in shapes.items():
            a = np.ascontiguousarray(cal[name], dtype=np.float32)
            if a.shape != shape:
                raise ValueError(f"kv calibration {name} has shape {a.shape}, expected {shape}")
            arrays[name] = a
        self.keep.append(arrays)
        self.s.key_center = float_ptr(arrays["key_center"], L * H * D)
        self.s.key_half_range = float_ptr(arrays["key_half_range"], L * H * D)
        self.s.key_levels = float_ptr(arrays["key_levels"], L << bits)
        self.s.value_levels = float_ptr(arrays["value_levels"], L << bits)
        if kvquant_tables(&self.w, &self.s) != 0:
            raise MemoryError("not enough memory for the kvquant key tables")
        return 0

    @property
    def kv_bytes_per_token(self):
        """Bytes the KV cache holds per token of one sequence (keys and values, every layer)."""
        return kv_bytes_per_token(&self.w, &self.s)

    def linear_shape(self, str name):
        """(in, out) of a block's linear map."""
        dim, hidden = self.w.dim, self.w.hidden_dim
        q_dim, kv_dim = self.w.n_heads * self.w.head_dim, self.w.n_kv_heads * self.w.head_dim
        shapes = {"wq": (dim, q_dim), "wk": (dim, kv_dim), "wv": (dim, kv_dim), "wo": (q_dim, dim),
                  "wqkv": (dim, q_dim + 2 * kv_dim), "w_gate": (dim, hidden), "w_up": (dim, hidden),
                  "w_gate_up": (dim, 2 * hidden), "w_down": (hidden, dim)}
        if name not in shapes:
            raise ValueError(f"no linear map named {name!r}")
        return shapes[name]

    cdef linear *linear_slot(self, int layer, str name) except NULL:
        cdef layer_weights *lw = &self.w.layers[layer]
        if name == "wq": return &lw.wq
        if name == "wk": return &lw.wk
        if name == "wv": return &lw.wv
        if name == "wo": return &lw.wo
        if name == "wqkv": return &lw.wqkv
        if name == "w_gate": return &lw.w_gate
        if name == "w_up": return &lw.w_up
        if name == "w_gate_up": return &lw.w_gate_up
        if name == "w_down": return &lw.w_down
        raise ValueError(f"no linear map named {name!r}")

    cdef int point(self, int layer, str name, object spec) except -1:
        n_in, n_out = self.linear_shape(name)
        return self.set_linear_ptr(self.linear_slot(layer, name), spec, n_in, n_out)

    cdef int set_linear_ptr(self, linear *l, object spec, int n_in, int n_out) except -1:
        """Point l at spec; None unsets it."""
        l.in_ = n_in
        l.out = n_out
        l.q = NULL
        l.qgemm = NULL
        l.qgemm_i8 = NULL
        l.team = NULL
        l.rows_team = NULL
        l.w = NULL
        l.w16 = NULL
        if spec is None:
            return 0
        if isinstance(spec, tuple):
            l.q = <const qmatrix *>PyCapsule_GetPointer(spec[0], b"qinfer.qmatrix")
            l.qgemm = <qgemm_fn>PyCapsule_GetPointer(spec[1], b"qinfer.qgemm_fn")
            if len(spec) > 2 and spec[2] is not None:
                l.qgemm_i8 = <qgemm_fn>PyCapsule_GetPointer(spec[2], b"qinfer.qgemm_fn")
            if len(spec) > 3 and spec[3] is not None:
                l.team = <qgemv_team_fn>PyCapsule_GetPointer(spec[3], b"qinfer.qgemv_team_fn")
            if len(spec) > 4 and spec[4] is not None:
                l.rows_team = <qgemm_team_fn>PyCapsule_GetPointer(spec[4], b"qinfer.qgemm_team_fn")
        elif is_half(spec):
            l.w16 = half_ptr(spec, <Py_ssize_t>n_in * n_out)
        else:
            l.w = float_ptr(spec, <Py_ssize_t>n_in * n_out)
        return 0

    def __dealloc__(self):
        if self.has_state:
            free_state(&self.s)
        free(self.w.layers)

    @property
    def decode_team(self):
        """Whether a decode step runs as one thread team (when every layer has a team
        kernel: int8 activations on the AVX2 path) or as a parallel region per kernel
        call, and a batched step likewise (rows_team_ready); both give the same numbers.
        On by default."""
        return bool(self.s.decode_team)

    @decode_team.setter
    def decode_team(self, bint on):
        self.s.decode_team = on

    def thread_governors(self):
        """What the thread governors (pyx/team.h) chose: for "decode" (steps),
        "prefill" (blocks) and "rows" (batched decode steps of several sequences), the
        count asked for (0: none yet), the count in use, the probes and switches so
        far, the probes of fewer threads skipped because the machine had room for
        ours, the moving average of a unit's seconds (per token for prefill blocks
        and batched steps) at that count and the seconds of work governed."""
        return {"decode": governor_state(&self.s.decode_governor),
                "prefill": governor_state(&self.s.prefill_governor),
                "rows": governor_state(&self.s.rows_governor)}

    @property
    def team_ready(self):
        """Whether every linear map of a decode step has a team kernel, so that
        decode steps with more than one thread run as one team."""
        return bool(team_ready(&self.w))

    @property
    def rows_team_ready(self):
        """Whether every linear map has a team kernel for several rows (int8 activations
        on the AVX2 path), so that a batched step (forward_rows) with more than one thread
        runs as one team."""
        return bool(rows_team_ready(&self.w))

    @property
    def max_tokens(self):
        return self.s.max_tokens

    @property
    def threads(self):
        """Threads the run state has room for (it grows when a call asks for more)."""
        return self.s.threads

    cdef int ensure_threads(self, int nthreads) except -1:
        if grow_threads(&self.s, &self.w, nthreads) != 0:
            raise MemoryError(f"not enough memory for {nthreads} threads' attention scores")
        return 0

    @property
    def seqs(self):
        """Sequences the KV cache holds."""
        return self.s.seqs

    def forward(self, const int32_t[::1] tokens, int pos, float[:, ::1] logits, bint all_logits,
                int nthreads, int seq=0):
        """Tokens of sequence `seq` at positions pos.. (the caller checks ids, lengths and the context)."""
        cdef int n = tokens.shape[0]
        cdef int rc
        if n < 1 or n > self.s.max_tokens or pos < 0 or pos + n > self.w.ctx:
            raise ValueError("forward: token count or position out of range")
        if not 0 <= seq < self.s.seqs:
            raise ValueError(f"forward: sequence {seq} is not one of the cache's {self.s.seqs}")
        if logits.shape[1] != self.w.vocab_size or logits.shape[0] != (n if all_logits else 1):
            raise ValueError("forward: logits buffer has the wrong shape")
        self.ensure_threads(nthreads)
        self.s.seq = seq
        with nogil:
            rc = forward(&self.w, &self.s, <const int *>&tokens[0], n, pos, &logits[0, 0],
                         all_logits, nthreads)
        if rc != 0:
            raise MemoryError("out of memory in the forward pass")

    def forward_rows(self, const int32_t[::1] tokens, const int32_t[::1] seqs, const int32_t[::1] positions,
                     float[:, ::1] logits, int nthreads):
        """One decode step of several sequences: row t is tokens[t] of sequence seqs[t] at
        positions[t]; logits [n, vocab] (the caller checks ids)."""
        cdef int n = tokens.shape[0]
        cdef int rc, t
        if n < 1 or n > self.s.max_tokens or seqs.shape[0] != n or positions.shape[0] != n:
            raise ValueError("forward_rows: tokens, seqs and positions must have the same length (1..max_tokens)")
        if logits.shape[0] != n or logits.shape[1] != self.w.vocab_size:
            raise ValueError("forward_rows: logits buffer has the wrong shape")
        seen = set()
        for t in range(n):
            if not 0 <= seqs[t] < self.s.seqs or seqs[t] in seen:
                raise ValueError(f"forward_rows: sequence {seqs[t]} is not one of the cache's {self.s.seqs}, "
                                 "or appears twice")
            seen.add(seqs[t])
            if not 0 <= positions[t] < self.w.ctx:
                raise ValueError(f"forward_rows: position {positions[t]} is outside the context {self.w.ctx}")
        self.ensure_threads(nthreads)
        with nogil:
            rc = forward_rows(&self.w, &self.s, <const int *>&tokens[0], <const int *>&seqs[0],
                              <const int *>&positions[0], n, &logits[0, 0], nthreads)
        if rc != 0:
            raise MemoryError("out of memory in the forward pass")

    def run_layer(self, int layer, float[:, ::1] x, int pos, dict captures=None, int nthreads=0):
        """Run block `layer` on hidden states x [n, dim] in place (positions pos..).

        captures: optional dict of float32 arrays to fill with the inputs of
        the linear maps: "attn_in" [n, dim], "o_in" [n, n_heads*head_dim],
        "mlp_in" [n, dim], "down_in" [n, hidden].
        """
        cdef layer_capture cap
        cdef int n = x.shape[0]
        cdef int rc
        if layer < 0 or layer >= self.w.n_layers:
            raise ValueError("no such layer")
        if n < 1 or n > self.s.max_tokens or pos < 0 or pos + n > self.w.ctx or x.shape[1] != self.w.dim:
            raise ValueError("run_layer: shape or position out of range")
        self.ensure_threads(nthreads)
        widths = {"attn_in": self.w.dim, "o_in": self.w.n_heads * self.w.head_dim,
                  "mlp_in": self.w.dim, "down_in": self.w.hidden_dim}
        cap.attn_in = capture_ptr(captures, "attn_in", n, widths["attn_in"])
        cap.o_in = capture_ptr(captures, "o_in", n, widths["o_in"])
        cap.mlp_in = capture_ptr(captures, "mlp_in", n, widths["mlp_in"])
        cap.down_in = capture_ptr(captures, "down_in", n, widths["down_in"])
        with nogil:
            self.s.seq = 0
            rc = run_layer(&self.w, &self.s, layer, &x[0, 0], n, pos, &cap, nthreads)
        if rc != 0:
            raise MemoryError("out of memory in the forward pass")

    def attend(self, int layer, int pos, float[:, ::1] q, float[:, ::1] k, float[:, ::1] v, int nthreads=1):
        """Attention alone, for tests: n tokens' queries q [n, n_heads*head_dim] and keys
        and values k, v [n, n_kv_heads*head_dim] (after RoPE) go into sequence 0's cache
        at positions pos.. in its format, as a forward call's would, and attend over it.
        Returns the attention output [n, n_heads*head_dim]."""
        cdef int n = q.shape[0]
        cdef size_t q_dim = self.w.n_heads * self.w.head_dim, kv_dim = self.w.n_kv_heads * self.w.head_dim
        if layer < 0 or layer >= self.w.n_layers:
            raise ValueError("no such layer")
        if (n < 1 or n > self.s.max_tokens or pos < 0 or pos + n > self.w.ctx or q.shape[1] != q_dim
                or k.shape[0] != n or v.shape[0] != n or k.shape[1] != kv_dim or v.shape[1] != kv_dim):
            raise ValueError("attend: shape or position out of range")
        self.ensure_threads(nthreads)
        out = np.empty((n, q_dim), dtype=np.float32)
        cdef float[:, ::1] o = out
        memcpy(self.s.q, &q[0, 0], sizeof(float) * n * q_dim)
        memcpy(self.s.k, &k[0, 0], sizeof(float) * n * kv_dim)
        memcpy(self.s.v, &v[0, 0], sizeof(float) * n * kv_dim)
        with nogil:
            attention_only(&self.w, &self.s, layer, pos, n, nthreads)
        memcpy(&o[0, 0], self.s.att, sizeof(float) * n * q_dim)
        return out

    def set_linear(self, int layer, str name, spec):
        """Point one linear map of a block at new weights (the caller keeps them
        alive), or unset it (None). A stacked map (wqkv, w_gate_up) runs in place
        of its parts while set; unset it after setting the parts to undo it."""
        if layer < 0 or layer >= self.w.n_layers:
            raise ValueError("no such layer")
        if spec is None and name not in ("wqkv", "w_gate_up"):
            raise ValueError(f"only a stacked map can be unset, not {name!r}")
        if name in ("wqkv", "w_gate_up") and spec is not None and self.s.stacked == NULL:
            raise ValueError("stacked maps must be given when the model is built")
        self.point(layer, name, spec)
        self.keep.append(spec)


cdef float *capture_ptr(dict captures, str name, int n, int width) except? NULL:
    cdef float[:, ::1] view
    if captures is None or captures.get(name) is None:
        return NULL
    view = captures[name]
    if view.shape[0] != n or view.shape[1] != width:
        raise ValueError(f"capture {name!r} must have shape ({n}, {width})")
    return &view[0, 0]
