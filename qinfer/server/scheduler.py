"""Slots and the loop that runs them: many generations on one model, one step each in turn.

A slot is a KV cache of its own (Model.new_cache) and the tokens it holds. A
job (one request) waits until a slot is free, takes the free slot whose
cache shares the longest start with its prompt (the earlier turns of a
chat: prefix reuse), prefills the rest in chunks of `prefill_chunk` tokens
(so the other slots' streams keep flowing during a long prompt), then
decodes a token a turn. A finished, failed or cancelled job frees its slot
at once; the slot keeps its tokens for the next job to reuse.

The loop runs in one thread of its own: the forward pass releases the GIL,
so the server's event loop stays responsive. Each slot still runs its own
forward step (a batched step of all slots through the qgemm kernels is the
next change); results are the ones a job gets alone.
"""
import collections
import threading

from ..generation import Generation

DEFAULT_PREFILL_CHUNK = 256


class Job:
    """One request's generation. Events go to `emit(kind, value)`, called from the loop's
    thread: ("text", str) pieces, then ("done", GenerationStats) or ("error", exception)."""

    def __init__(self, ids, emit, max_tokens, temperature=0.0, top_p=1.0, seed=None, stop=None):
        self.ids, self.emit = list(ids), emit
        self.settings = dict(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                             stop=stop)
        self.cancelled = False      # set from any thread: the loop frees the slot at its next turn
        self.run = None             # its Generation, once it has a slot
        self.pending = []           # prompt tokens still to prefill
        self.logits = None          # the last step's logits, which the next token is sampled from

    def cancel(self):
        self.cancelled = True


class Slot:
    def __init__(self, index, cache):
        self.index, self.cache = index, cache
        self.ids = []               # the tokens in the cache, positions 0..len-1
        self.job = None


def shared_prefix(cached, ids):
    """Tokens of `ids` a cache holding `cached` can keep (Engine.reusable_prefix's rule:
    the last two prompt tokens always run)."""
    n = 0
    for a, b in zip(cached, ids[:len(ids) - 2]):
        if a != b:
            break
        n += 1
    return n


class Scheduler:
    """Runs jobs on `engine`'s model in `parallel` slots of `ctx` tokens each."""

    def __init__(self, engine, parallel=1, ctx=None, prefill_chunk=DEFAULT_PREFILL_CHUNK,
                 share_engine_cache=False):
        self.engine, self.model = engine, engine.model
        self.ctx = ctx or engine.ctx
        self.prefill_chunk = prefill_chunk
        # Caches of their own, so the engine can still run beside the server; `qinfer serve`,
        # which never runs the engine itself, lets the first slot use the engine's (memory).
        caches = [self.model.cache] if share_engine_cache and self.ctx == self.model.ctx else []
        caches += [self.model.new_cache(self.ctx) for _ in range(parallel - len(caches))]
        self.slots = [Slot(i, c) for i, c in enumerate(caches)]
        self.waiting = collections.deque()
        self.lock = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="qinfer-scheduler", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------ outside
    def submit(self, job):
        with self.lock:
            if self.closed:
                raise RuntimeError("the scheduler is closed")
            self.waiting.append(job)
            self.lock.notify()

    def close(self):
        with self.lock:
            self.closed = True
            self.lock.notify()
        self.thread.join()

    def busy_slots(self):
        return sum(s.job is not None for s in self.slots)

    # -------------------------------------------------------------- inside
    def _admit(self):
        """Waiting jobs into free slots, each where the most of its prompt is cached."""
        while self.waiting:
            free = [s for s in self.slots if s.job is None]
            if not free:
                return
            job = self.waiting.popleft()
            if job.cancelled:
                continue
            slot = max(free, key=lambda s: shared_prefix(s.ids, job.ids))
            kept = shared_prefix(slot.ids, job.ids)
            del slot.ids[kept:]
            job.pending = job.ids[kept:]
            job.run = Generation(self.engine.tokenizer, self.engine.config, job.ids, cached=kept,
                                 **job.settings)
            slot.job = job

    def _step(self, slot):
        """One turn of a slot's job: a prefill chunk, or one sampled and decoded token."""
        job, run = slot.job, slot.job.run
        if job.pending:
            chunk, job.pending = job.pending[:self.prefill_chunk], job.pending[self.prefill_chunk:]
            job.logits = self.model.forward(chunk, len(slot.ids), cache=slot.cache)
            slot.ids += chunk
            if job.pending:
                return False
            run.prefilled()
        text, token = run.advance(job.logits, room=len(slot.ids) < slot.cache.ctx)
        if text:
            job.emit("text", text)
        if token is None:
            text = run.finish()
            if text:
                job.emit("text", text)
            job.emit("done", run.stats)
            return True
        job.logits = self.model.forward([token], len(slot.ids), cache=slot.cache)
        slot.ids.append(token)
        return False

    def _loop(self):
        while True:
            with self.lock:
                while not self.closed and not self.waiting and not any(s.job for s in self.slots):
                    self.lock.wait()
                if self.closed:
                    break
                self._admit()
                active = [s for s in self.slots if s.job is not None]
            for slot in active:
                job = slot.job
                try:
                    finished = job.cancelled or self._step(slot)
                except Exception as exc:            # a failed step ends its job, not the server
                    del slot.ids[:]                 # what the cache holds is unknown now
                    job.emit("error", exc)
                    finished = True
                if finished:
                    with self.lock:
                        slot.job = None
        for job in list(self.waiting) + [s.job for s in self.slots if s.job]:
            job.emit("error", RuntimeError("the server is shutting down"))
