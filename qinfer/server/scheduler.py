"""Slots and the loop that runs them: many generations on one model, decoded together.

The slots are the sequences of one KV cache (Model.new_cache(ctx, seqs=parallel)).
A job (one request) waits until a slot is free, takes the free slot whose
cache shares the longest start with its prompt (the earlier turns of a chat:
prefix reuse), and prefills the rest in chunks of `prefill_chunk` tokens, one
chunk a turn, so the other slots' streams keep flowing during a long prompt.
Every turn then decodes one token for every slot past its prompt in one
forward step (Model.forward_rows): the linear maps run all those rows in one
qgemm call, each weight read once for all of them, instead of once per
sequence. A finished, failed or cancelled job frees its slot at once; the
slot keeps its tokens for the next job to reuse.

The loop runs in one thread of its own: the forward pass releases the GIL,
so the server's event loop stays responsive.
"""
import collections
import threading

import numpy as np

from ..generation import Generation, shared_prefix

DEFAULT_PREFILL_CHUNK = 256


class Job:
    """One request's generation. Events go to `emit(kind, value)`, called from the loop's
    thread: ("text", str) pieces, then ("done", GenerationStats) or ("error", exception)."""

    def __init__(self, ids, emit, max_tokens, temperature=0.0, top_p=1.0, seed=None, stop=None,
                 ignore_eos=False):
        self.ids, self.emit = list(ids), emit
        self.settings = dict(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                             stop=stop, ignore_eos=ignore_eos)
        self.cancelled = False      # set from any thread: the loop frees the slot at its next turn
        self.run = None             # its Generation, once it has a slot
        self.pending = []           # prompt tokens still to prefill
        self.logits = None          # the last step's logits [vocab], which the next token is sampled from

    def cancel(self):
        self.cancelled = True


class Slot:
    def __init__(self, seq):
        self.seq = seq              # its sequence in the scheduler's KV cache
        self.ids = []               # the tokens in the cache, positions 0..len-1
        self.job = None


class Scheduler:
    """Runs jobs on `engine`'s model in `parallel` slots of `ctx` tokens each."""

    def __init__(self, engine, parallel=1, ctx=None, prefill_chunk=DEFAULT_PREFILL_CHUNK):
        self.engine, self.model = engine, engine.model
        self.ctx = ctx or engine.ctx
        self.prefill_chunk = prefill_chunk
        # a cache of its own, so the engine can still run beside the server
        self.cache = self.model.new_cache(self.ctx, seqs=parallel)
        self.slots = [Slot(i) for i in range(parallel)]
        # the decode steps' logits: a turn samples every row before the next step writes them
        self.logits = np.empty((parallel, self.model.config.vocab_size), dtype=np.float32)
        self.waiting = collections.deque()
        self.lock = threading.Condition()
        self.closed = False
        # called (from the loop's thread) when the events emitted so far should go out: before
        # each forward step, whose threads leave the GIL to whoever sends them, and at a turn's end
        self.send_events = lambda: None
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
            kept, slot = max(((shared_prefix(s.ids, job.ids), s) for s in free), key=lambda pair: pair[0])
            del slot.ids[kept:]
            job.pending = job.ids[kept:]
            job.run = Generation(self.engine.tokenizer, self.engine.config, job.ids, cached=kept,
                                 **job.settings)
            slot.job = job

    def _prefill(self, slot):
        """One chunk of a slot's prompt into its cache; the logits when the prompt is in."""
        job = slot.job
        chunk, job.pending = job.pending[:self.prefill_chunk], job.pending[self.prefill_chunk:]
        logits = self.model.forward(chunk, len(slot.ids), cache=self.cache, seq=slot.seq)
        slot.ids += chunk
        if not job.pending:
            job.logits = logits
            job.run.prefilled()

    def _sample(self, slot):
        """The slot's next token from its logits (None: the job is done, its events sent)."""
        job = slot.job
        text, token = job.run.advance(job.logits, room=len(slot.ids) < self.ctx)
        if text:
            job.emit("text", text)
        if token is None:
            text = job.run.finish()
            if text:
                job.emit("text", text)
            job.emit("done", job.run.stats)
        return token

    def _fail(self, slot, exc):
        del slot.ids[:]                 # what the cache holds is unknown now
        slot.job.emit("error", exc)

    def _turn(self, active):
        """One turn: a prefill chunk for each slot in its prompt, then one decode step of all
        the slots past it, together. Returns the slots whose jobs ended."""
        ended = [s for s in active if s.job.cancelled]
        for slot in active:
            if slot.job.pending and slot not in ended:
                try:
                    self._prefill(slot)
                except Exception as exc:            # a failed step ends its job, not the server
                    self._fail(slot, exc)
                    ended.append(slot)
        rows = []
        for slot in active:
            if slot in ended or slot.job.pending:
                continue
            try:
                token = self._sample(slot)
            except Exception as exc:
                self._fail(slot, exc)
                token = None
            if token is None:
                ended.append(slot)
            else:
                rows.append((slot, token))
        self.send_events()
        if rows:
            try:
                logits = self.model.forward_rows([t for _, t in rows], [s.seq for s, _ in rows],
                                                 [len(s.ids) for s, _ in rows], self.cache,
                                                 out=self.logits[:len(rows)])
            except Exception as exc:
                for slot, _ in rows:
                    self._fail(slot, exc)
                return ended + [slot for slot, _ in rows]
            for i, (slot, token) in enumerate(rows):
                slot.ids.append(token)
                slot.job.logits = logits[i]
        return ended

    def _loop(self):
        while True:
            with self.lock:
                while not self.closed and not self.waiting and not any(s.job for s in self.slots):
                    self.lock.wait()
                if self.closed:
                    break
                self._admit()
                active = [s for s in self.slots if s.job is not None]
            ended = self._turn(active)
            self.send_events()
            with self.lock:
                for slot in ended:
                    slot.job = None
        for job in list(self.waiting) + [s.job for s in self.slots if s.job]:
            job.emit("error", RuntimeError("the server is shutting down"))
        self.send_events()
