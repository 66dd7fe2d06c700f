"""Running a sweep: the configurations not in the cache, serially or as Ray tasks.

    result = run_sweep(sweep, cache)                      # a local Ray instance for the run
    result = run_sweep(sweep, cache, address="head:6379") # an existing cluster
    result = run_sweep(sweep, cache, serial=True)         # in this process, no Ray

The driver tokenizes the text once and cuts the scored windows; the calibration text
is the text after the last scored window (or the whole text when every window is
scored, which results flag as not disjoint). Each configuration not yet in the cache
becomes one Ray task declaring num_cpus = the sweep's threads, so Ray packs tasks onto
the cores it has, on one machine or many. A task runs measure.measure; its row comes
back to the driver, which writes it to the cache at once.

Faults: a worker that dies (killed, a node lost, out of memory) is retried by Ray
(max_retries); a configuration that fails (an error in quantize, perplexity or
generation, or retries exhausted) becomes a failed row with a one-line reason, and
the rest go on. Failed rows are not cached, so a rerun tries them again; an
interrupted sweep resumes from the rows the cache has.

Ray is imported only here and only when a sweep runs on it (`pip install
'qinfer[sweep]'`); nothing else in qinfer imports it.
"""
import dataclasses
import hashlib
import json
import os
import socket
import sys

import numpy as np

from ..errors import QinferError
from .grid import FLOAT, GridError
from .measure import Job, measure
from .shipping import DEFAULT_SHIP_LIMIT, share
from .store import Store

DEFAULT_RETRIES = 3
CONNECT_TIMEOUT = 5.0          # seconds to reach a cluster's address before giving up
PROMPT_CHARS = 400             # decode speed's prompt: the text's start
RESULTS = "sweep-results.json" # the results cache, in the cache folder


@dataclasses.dataclass
class SweepResult:
    rows: list                 # one per configuration, in the sweep's order
    ran: int                   # configurations measured by this run
    cached: int                # ... taken from the cache
    failed: int
    calibration: str           # where the calibration text came from (or None)
    disjoint: bool             # whether it is disjoint from the scored windows
    text_tokens: int
    total_windows: int


def execute(config, spec, node=None):
    """A task's body: the row of `config`, or a failed row with the reason (never raises for a
    configuration's own failure). spec: the driver's Job with SharedFile model and calib."""
    try:
        job = dataclasses.replace(spec, model=spec.model.local(),
                                  calib=spec.calib.local() if spec.calib is not None else None)
        return measure(config, job, node)
    except Exception as e:              # noqa: BLE001 -- one configuration's failure is its row's
        return failed_row(config, e, node)


def failed_row(config, error, node=None):
    text = str(error).strip().splitlines()
    reason = f"{type(error).__name__}: {text[0] if text else ''}"[:300]
    return dict(name=config.name, **config.settings(), node=node or socket.gethostname(), status="failed",
                reason=reason)


def run_sweep(sweep, cache, address=None, serial=False, max_retries=DEFAULT_RETRIES, ship_limit=DEFAULT_SHIP_LIMIT,
              fresh=False, log=None, task=execute):
    """Measure every configuration of `sweep` (grid.Sweep) not in the cache folder `cache`
    -> SweepResult. task(config, spec, node) is the body of each task (execute)."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    sweep.check()
    if not serial:
        ray = _ray()
        if address not in (None, "auto", "local"):
            _check_reachable(address)
    cache = os.path.abspath(cache)
    model = os.path.abspath(sweep.model) if sweep.model else _default_model()
    tokenizer, text, tokens, windows, total = _windows(sweep, model)
    calibration, disjoint, calib = None, True, None
    if any(c.calibrated() for c in sweep.configs):
        calib, calibration, disjoint = _calibration_text(cache, tokenizer, text, tokens, len(windows), total,
                                                         sweep.seqlen)
    store = Store(os.path.join(cache, RESULTS), fresh)
    job_id = _job_id(sweep, model, windows, calib)
    keys = [f"{c.checkpoint or c.digest()}|{c.name}|{job_id}" for c in sweep.configs]
    rows = {k: store.get(k) for k in keys if store.get(k) is not None}
    todo = [(k, c) for k, c in zip(keys, sweep.configs) if k not in rows]
    cached = len(rows)
    log(f"sweep: {len(sweep.configs)} configurations, {cached} cached, {len(todo)} to run "
        f"({len(windows)} windows of {sweep.seqlen} tokens, {sweep.threads} threads each"
        f"{'' if serial else ', on Ray'})")

    def finished(key, row, done):
        rows[key] = row
        if row["status"] == "ok":
            store.put(key, row)
            log(f"[{done}/{len(todo)}] {row['name']} on {row['node']}: ppl {row['ppl']:.4f}"
                + (f", decode {row['decode_tps']:.1f} tokens/s" if row.get("decode_tps") else ""))
        else:
            log(f"[{done}/{len(todo)}] {row['name']} on {row['node']}: failed: {row['reason']}")

    if todo:
        job = Job(model=None, calib=None, windows=windows, seqlen=sweep.seqlen, nsamples=sweep.nsamples, seed=sweep.seed,
                  threads=sweep.threads, decode_tokens=sweep.decode_tokens, prompt=text[:PROMPT_CHARS], cache=cache)
        if serial:
            spec = dataclasses.replace(job, model=share(model, 0), calib=share(calib, 0) if calib else None)
            for done, (key, config) in enumerate(todo, 1):
                finished(key, task(config, spec, socket.gethostname()), done)
        else:
            _run_on_ray(ray, address, todo, job, model, calib, max_retries, ship_limit, task, finished)
    ordered = [rows[k] for k in keys]
    return SweepResult(ordered, len(todo), cached, sum(r["status"] != "ok" for r in ordered), calibration, disjoint,
                       len(tokens), total)


def _run_on_ray(ray, address, todo, job, model, calib, max_retries, ship_limit, task, finished):
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=None if address in (None, "local") else address, include_dashboard=False,
                     logging_level="ERROR", log_to_driver=False, configure_logging=False)
        except Exception as e:              # Ray's own errors: ConnectionError, RuntimeError, ...
            raise QinferError(f"cannot start or join Ray at {address or 'a local instance'}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    try:
        spec = dataclasses.replace(job, model=share(model, ship_limit, ray.put),
                                   calib=share(calib, ship_limit, ray.put) if calib else None)
        remote = ray.remote(_on_node).options(num_cpus=job.threads, max_retries=max_retries,
                                              retry_exceptions=False)
        pending = {remote.remote(task, config, spec): (key, config) for key, config in todo}
        done = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            key, config = pending.pop(ready[0])
            try:
                row = ray.get(ready[0])
            except Exception as e:          # the task's worker died more often than Ray retries
                row = failed_row(config, e, "?")
            done += 1
            finished(key, row, done)
    finally:
        if started:
            ray.shutdown()


def _on_node(task, config, spec):
    """A Ray task: task(config, spec) on this node, the node named host/ray-node-id."""
    import ray

    node = f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:8]}"
    return task(config, spec, node)


def _ray():
    try:
        import ray
    except ImportError:
        raise QinferError("a distributed sweep needs Ray: pip install 'qinfer[sweep]' (or run it in this "
                          "process with --serial)") from None
    return ray


def _check_reachable(address):
    """QinferError unless a TCP connection to address's host:port opens within CONNECT_TIMEOUT."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise GridError(f"--address {address!r}: expected HOST:PORT (a Ray head's GCS address, e.g. "
                        f"10.0.0.1:6379), ray://HOST:PORT, or auto")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as e:
        raise QinferError(f"cannot reach a Ray cluster at {address}: {e.strerror or e}") from None


def _default_model():
    from ..engine import default_model_path
    return os.path.abspath(default_model_path())


def _windows(sweep, model):
    """(the model's tokenizer, text, tokens, scored windows int32 [n, seqlen], windows the text holds)."""
    import qinfer
    from ..perplexity import DataError, load_text, split_windows, tokenize

    text = load_text(sweep.data)
    engine = qinfer.Engine(model, ctx=8, threads=sweep.threads)       # its tokenizer
    tokens = tokenize(engine, text)
    total = len(tokens) // sweep.seqlen
    if total == 0:
        raise DataError(f"{sweep.data}: {len(tokens)} tokens, fewer than one window of {sweep.seqlen}")
    n = total if sweep.windows == 0 else min(sweep.windows, total)
    return engine.tokenizer, text, tokens, split_windows(tokens, sweep.seqlen, n), total


def _calibration_text(cache, tokenizer, text, tokens, n_eval, total, seqlen):
    """(path, description, disjoint) of the text calibrated methods draw from."""
    folder = os.path.join(cache, "calib")
    os.makedirs(folder, exist_ok=True)
    tag = hashlib.sha256(np.asarray(tokens, dtype=np.int32).tobytes()).hexdigest()[:12]
    if n_eval < total:
        start = n_eval * seqlen
        path = os.path.join(folder, f"{tag}-after-{start}-tokens.txt")
        if not os.path.exists(path):
            _write_text(path, tokenizer.decode(tokens[start:]))
        return path, (f"the {len(tokens) - start:,} tokens after the last scored window (tokens {start:,}.."
                      f"{len(tokens) - 1:,}), disjoint from every scored token"), True
    path = os.path.join(folder, f"{tag}-whole-text.txt")
    if not os.path.exists(path):
        _write_text(path, text)
    return path, ("the whole scored text: every window is scored, so no disjoint text is left and calibrated "
                  "rows saw the scored text (optimistic)"), False


def _write_text(path, text):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _job_id(sweep, model, windows, calib):
    """A digest of everything a row's figures depend on besides its configuration."""
    from .shipping import _digest, _size

    ident = dict(model=os.path.basename(model), model_size=_size(model),
                 windows=hashlib.sha256(windows.tobytes()).hexdigest()[:16], seqlen=sweep.seqlen,
                 calib=_digest(calib) if calib else None, nsamples=sweep.nsamples, seed=sweep.seed,
                 threads=sweep.threads, decode_tokens=sweep.decode_tokens)
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def float_row(rows):
    """The float baseline among rows (or None)."""
    return next((r for r in rows if r["method"] == FLOAT and r["status"] == "ok"), None)
