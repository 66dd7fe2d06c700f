"""Which kernel path runs, with how many threads, and what the generator chose.

The AVX2+FMA path is used when the CPU has both; otherwise the portable
scalar path. QINFER_KERNELS=scalar (or use_path("scalar")) forces the scalar
path, for testing and for comparing the two.

Activations: "float" (the default) multiplies the weights by float32 x;
"int8" (QINFER_ACTIVATIONS=int8, set_activations("int8")) makes one-row
products (qgemv, i.e. decode) round x to int8 per block of 32 inputs and
multiply in integers, llama.cpp-style: faster, with llama.cpp-like numerics.
3-, 5- and 6-bit layers have int8 kernels only on AVX-512 VBMI CPUs and
otherwise stay float.

The int8 kernels run on the fastest instruction set this CPU has of those
the build made (int8_isas(): "avx512vnni", "avxvnni", then "avx2");
QINFER_INT8_ISA=avx2 (or set_int8_isa("avx2")) holds them to AVX2. The float
kernels multiply with AVX-512 where the CPU has it; QINFER_AVX512=0 (or
set_float_avx512(False)) holds them to AVX2. The integer sums are exact
either way, so the results are the same bit for bit. Attention's loops
(pyx/attention.c) follow the same switch: their AVX-512 build is the AVX2
one's source with 32 vector registers.

The float qgemv (one row: decode) of 2- and 4-bit layers runs in integer
multiply-adds on the int8 kernels' instruction set: x is cut per block of 32
inputs into three signed bytes of a 23-bit fixed-point code (within 2^-23 of
the block's largest |x|; float32 keeps 24 bits of each x), each multiplied by
the codes exactly, a third of the float multiply-adds' vector operations, so
it keeps up with memory. QINFER_FLOAT_LIMBS=0 (or set_float_limbs(False))
runs it in float multiply-adds.

The float qgemm (16 activation rows or more: prefill, perplexity; groups of
128 rows or full columns) multiplies on AMX tiles where the CPU has AMX-BF16
(Intel since Sapphire Rapids) and the OS grants the tile state: the codes as
bf16 (exact) times x cut into three bf16 limbs (exact: 8 of x's 24
significant bits each), summed in float32; QINFER_AMX=0 (or
set_float_amx(False)) holds it to AVX multiply-adds. The int8 x int8 qgemm (W8A8 and
W4A8 checkpoints, 16 rows or more, groups of a multiple of 64 inputs) multiplies on
AMX-INT8 tiles where the CPU has them, the same bits as its AVX-512 loops; QINFER_AMX=0
(or set_int8_amx(False)) holds it to those.

Lookup-table kernels (pyx/lut.h, qinfer/lut_linear.py) for packed 2-, 3- and
4-bit layers: QINFER_LUT (or set_lut()) is "auto" (the default: where the
activations are int8, which the tables round as int8 activations do, each
layer shape runs on them if it measured faster than its dense int8 kernel on
this CPU, tuning/lut_choice.py), "on" (every such layer, whatever the
activations: faster float-activation decode at the tables' int8 rounding) or
"off". BCQ checkpoints always run on them.

Threads on a busy machine: a thread that shares its core with another
process runs at half speed or less, and the others wait for it. The forward
pass lets a governor (pyx/team.h) choose how many threads each decode step
and each prefill block runs with, at most the count asked for: it times the
count in use, now and then tries one thread fewer (or more) for two units,
and keeps the faster (QINFER_ADAPT_THREADS=0 or set_adaptive_threads(False):
always the count asked for). Waiting threads spin ~50 us (the decode team's
barrier) or ~0.25 ms (libgomp, GOMP_SPINCOUNT=10000, unless OMP_WAIT_POLICY
or GOMP_SPINCOUNT is set) before they sleep; QINFER_WAIT=spin restores the
spinning of before (libgomp's ~300000 pauses, a barrier that never sleeps),
for A/B measurements (OMP_WAIT_POLICY=active makes the barrier spin too).
Thread counts do not change results.
"""
import contextlib
import importlib
import os
import sys

from . import _forward, _runtime, variants
from .errors import UnsupportedError
from .variants import BITWIDTHS

PATHS = ("auto", "avx2", "scalar")
ACTIVATIONS = ("float", "int8")
LUT_MODES = ("auto", "on", "off")
LUT_ENV = "QINFER_LUT"
_modules = {b: importlib.import_module(f"qinfer._qgemm_b{b}") for b in BITWIDTHS}
_cpu_avx2 = _runtime.cpu_has_avx2_fma()
_state = {"path": None, "threads": None, "activations": None, "int8_isa": None, "float_limbs": False,
          "lut": None, "int8_amx": "off"}


def module(bits):
    return _modules[bits]


def params(bits):
    """The kernel parameters the performance model chose for `bits`."""
    return dict(_modules[bits].PARAMS)


def machine():
    """The cache sizes and flags the generator read at build time."""
    return dict(_modules[BITWIDTHS[0]].MACHINE)


def cpu_has_avx2():
    return _cpu_avx2


def has_float_avx512():
    """Whether the float qgemv and qgemm can multiply with AVX-512 here (this build,
    this CPU: AVX-512F)."""
    return all(_modules[b].has_float_avx512() for b in BITWIDTHS)


def set_float_avx512(on):
    """Run the float kernels with AVX-512 (on, where has_float_avx512()) or AVX2.
    Each lane does the same operations either way: the same results bit for bit."""
    if on and not has_float_avx512():
        raise UnsupportedError("float kernels: this build or CPU has no AVX-512")
    for b in BITWIDTHS:
        _modules[b].use_float_avx512(bool(on))
    _forward.set_kv_avx512(bool(on))      # attention's loops follow (pyx/attention.c)


def float_avx512():
    """Whether the float kernels multiply with AVX-512 now."""
    return all(_modules[b].float_avx512() for b in BITWIDTHS)


def use_float_avx512(on):
    """Run the enclosed calls' float kernels with AVX-512 (on) or AVX2, then restore."""
    return _switched(float_avx512, set_float_avx512, on)


def have_openmp():
    return _runtime.have_openmp()


def _resolve(path):
    if path not in PATHS:
        raise UnsupportedError(f"kernel path must be one of {PATHS}, got {path!r}")
    if path == "avx2" and not _cpu_avx2:
        raise UnsupportedError("this CPU lacks AVX2/FMA; use the 'scalar' kernel path")
    if path == "auto":
        return "avx2" if _cpu_avx2 else "scalar"
    return path


def set_path(path):
    """Select "auto", "avx2" or "scalar" for every later call."""
    _state["path"] = _resolve(path)


def active_path():
    if _state["path"] is None:
        _state["path"] = _resolve(os.environ.get("QINFER_KERNELS", "auto").strip().lower() or "auto")
    return _state["path"]


@contextlib.contextmanager
def _switched(get, put, value):
    """put(value) for the enclosed calls, then put back what get() gave before."""
    previous = get()
    put(value)
    try:
        yield
    finally:
        put(previous)


def use_path(path):
    """Run the enclosed calls on one kernel path, then restore the previous one."""
    return _switched(active_path, set_path, path)


def check_lut(mode):
    if mode not in LUT_MODES:
        raise UnsupportedError(f"the lookup-table kernels' mode must be one of {LUT_MODES}, got {mode!r}")
    return mode


def set_lut(mode):
    """When packed 2-, 3- and 4-bit layers run on the lookup-table kernels (module docstring):
    "auto", "on" or "off". Takes effect for models loaded afterwards."""
    _state["lut"] = check_lut(mode)


def lut_mode():
    if _state["lut"] is None:
        wanted = os.environ.get(LUT_ENV, "auto").strip().lower() or "auto"
        if wanted not in LUT_MODES:
            sys.stderr.write(f"qinfer: {LUT_ENV}={wanted!r} ignored: not one of {', '.join(LUT_MODES)}\n")
            wanted = "auto"
        _state["lut"] = wanted
    return _state["lut"]


def use_lut(mode):
    """Load models with this lookup-table mode inside the block, then restore."""
    return _switched(lut_mode, set_lut, mode)


def set_num_threads(n):
    """Threads for every later kernel call (None: OpenMP's default)."""
    if n is not None and (not isinstance(n, int) or n < 1):
        raise UnsupportedError(f"threads must be a positive integer, got {n!r}")
    _state["threads"] = n


def get_num_threads():
    return _state["threads"] or _runtime.openmp_threads()


WAIT_ENV, ADAPT_ENV = "QINFER_WAIT", "QINFER_ADAPT_THREADS"
WAIT_POLICIES = ("sleep", "spin")


def set_adaptive_threads(on):
    """Let the forward pass choose each decode step's and prefill block's thread
    count (on: at most the count asked for, the faster one as measured) or run
    the count asked for (off)."""
    _forward.set_thread_policy(bool(on), _forward.thread_policy()[1])


def adaptive_threads():
    return _forward.thread_policy()[0]


def use_adaptive_threads(on):
    """Run the enclosed calls with adaptive thread counts on or off, then restore."""
    return _switched(adaptive_threads, set_adaptive_threads, on)


def wait_policy():
    """How waiting threads wait: {"team": "sleep" (the decode team's barrier spins
    ~50 us, yields, then sleeps) or "spin" (QINFER_WAIT=spin, or OMP_WAIT_POLICY=active:
    it spins and yields until released), "openmp": what libgomp was told when it loaded, e.g.
    "GOMP_SPINCOUNT=10000 (qinfer)", "OMP_WAIT_POLICY=passive (user)" or
    "libgomp's default"}. (If another library loaded libgomp before qinfer, its
    settings stand; _runtime.display_omp_env() prints what libgomp uses.)"""
    import qinfer
    team = "spin" if _forward.thread_policy()[1] else "sleep"
    if qinfer._omp_default:
        openmp = f"GOMP_SPINCOUNT={qinfer._OMP_SPINCOUNT} (qinfer)"
    else:
        user = [f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ]
        openmp = f"{', '.join(user)} (user)" if user else "libgomp's default"
    return {"team": team, "openmp": openmp}


def _wait_from_environment():
    """At import: QINFER_WAIT ("sleep", the default, or "spin"; OMP_WAIT_POLICY=active
    alone means "spin": the user asked for spinning threads) and QINFER_ADAPT_THREADS
    ("0" turns the governor off). A bad value is named on stderr and the default
    used, as for QINFER_INT8_ISA."""
    default = "spin" if os.environ.get("OMP_WAIT_POLICY", "").strip().lower() == "active" else "sleep"
    wait = os.environ.get(WAIT_ENV, default).strip().lower() or default
    if wait not in WAIT_POLICIES:
        sys.stderr.write(f"qinfer: {WAIT_ENV} ignored: must be one of {WAIT_POLICIES}, got {wait!r}\n")
        wait = default
    adapt = os.environ.get(ADAPT_ENV, "1").strip() != "0"
    _forward.set_thread_policy(adapt, wait == "spin")


def resolve_threads(threads=None):
    if threads is None:
        return get_num_threads()
    if not isinstance(threads, int) or threads < 1:
        raise UnsupportedError(f"threads must be a positive integer, got {threads!r}")
    return threads


def check_activations(mode):
    if mode not in ACTIVATIONS:
        raise UnsupportedError(f"activations must be one of {ACTIVATIONS}, got {mode!r}")
    return mode


def set_activations(mode):
    """"float" or "int8" (decode only) for every later call."""
    _state["activations"] = check_activations(mode)


def environment_activations():
    """QINFER_ACTIVATIONS as given (stripped, lower case), or None where it is unset or empty."""
    return os.environ.get("QINFER_ACTIVATIONS", "").strip().lower() or None


def active_activations():
    if _state["activations"] is None:
        _state["activations"] = check_activations(environment_activations() or "float")
    return _state["activations"]


def use_activations(mode):
    """Run the enclosed calls with "float" or "int8" activations, then restore the previous mode."""
    return _switched(active_activations, set_activations, mode)


def int8_isas():
    """Instruction sets the int8 kernels can run on here (this build, this CPU), fastest first.
    Those of the bitwidths whose codes sit in whole bytes (2, 4, 8 bits); 3-, 5- and 6-bit
    layers have int8 kernels only on AVX-512 VNNI with VBMI and otherwise keep the float ones
    (qinfer/variants.py, MULTISHIFT_ISAS)."""
    have = [_modules[b].int8_isas() for b in BITWIDTHS
            if variants.bitwidth(b).gather == "slice" and _modules[b].int8_isas()]
    return [isa for isa in have[0] if all(isa in h for h in have)] if have else []


def set_int8_isa(isa):
    """Run every int8 kernel on `isa` ("auto": the fastest of int8_isas())."""
    available = int8_isas()
    if isa == "auto":
        isa = available[0] if available else None
    elif isa not in available:
        raise UnsupportedError(f"int8 kernels: instruction set must be 'auto' or one of {available}, got {isa!r}")
    for b in BITWIDTHS:
        if isa is not None and _modules[b].int8_isas():
            _modules[b].use_int8_isa(isa if isa in _modules[b].int8_isas() else None)
    _state["int8_isa"] = isa
    set_float_limbs(_state["float_limbs"])   # the float qgemv's integer kernels follow


def active_int8_isa():
    """The instruction set the int8 kernels run on (None: no int8 kernel on this CPU)."""
    return _state["int8_isa"]


def use_int8_isa(isa):
    """Run the enclosed calls' int8 kernels on `isa`, then restore the previous one."""
    return _switched(lambda: active_int8_isa() or "auto", set_int8_isa, isa)


def _int8_isa_from_environment():
    """At import (the kernel tables hold the choice from then on): QINFER_INT8_ISA, or
    "auto". A bad value must not make `import qinfer` fail: it is named on stderr
    and "auto" used."""
    wanted = os.environ.get("QINFER_INT8_ISA", "auto").strip().lower() or "auto"
    try:
        set_int8_isa(wanted)
    except UnsupportedError as e:
        sys.stderr.write(f"qinfer: QINFER_INT8_ISA ignored: {e}\n")
        set_int8_isa("auto")


def has_float_limbs():
    """Whether the float qgemv can run in integer multiply-adds here (some
    bitwidth's kernels on the int8 kernels' instruction set)."""
    isa = active_int8_isa()
    return isa is not None and any(isa in _modules[b].float_limb_isas() for b in BITWIDTHS)


def set_float_limbs(on):
    """Run the float qgemv of 2- and 4-bit layers in integer multiply-adds (on,
    where has_float_limbs()) or in float multiply-adds; 3- and 8-bit layers
    always take the latter."""
    if on and not has_float_limbs():
        raise UnsupportedError("float qgemv: no integer (limb) kernels on this build and CPU")
    isa = active_int8_isa() if on else None
    for b in BITWIDTHS:
        module = _modules[b]
        module.use_float_limbs(isa if isa in module.float_limb_isas() else None)
    _state["float_limbs"] = bool(on)


def float_limbs():
    """Whether the float qgemv runs in integer multiply-adds now."""
    return _state["float_limbs"]


def use_float_limbs(on):
    """Run the enclosed calls' float qgemv in integer multiply-adds (on) or float ones, then restore."""
    return _switched(float_limbs, set_float_limbs, on)


def has_float_amx():
    """Whether the float qgemm can multiply on AMX tiles here (build, CPU and OS)."""
    return all(_modules[b].has_float_amx() for b in BITWIDTHS)


def set_float_amx(on):
    """Run the float qgemm of 16 rows or more (128-row groups or full columns) on AMX
    tiles (on, where has_float_amx()) or with AVX multiply-adds. The two sum in other
    orders: results agree to float32's rounding, not bit for bit."""
    if on and not has_float_amx():
        raise UnsupportedError("float qgemm: no AMX tiles on this build, CPU or OS")
    for b in BITWIDTHS:
        _modules[b].use_float_amx(bool(on))


def float_amx():
    """Whether the float qgemm multiplies on AMX tiles now."""
    return all(_modules[b].float_amx() for b in BITWIDTHS)


def use_float_amx(on):
    """Run the enclosed calls' float qgemm on AMX tiles (on) or AVX multiply-adds, then restore."""
    return _switched(float_amx, set_float_amx, on)


def has_int8_amx():
    """Whether the int8 x int8 qgemm (W8A8, W4A8) can multiply on AMX-INT8 tiles here (CPU and OS)."""
    from . import _w8a8
    return _w8a8.amx_available()


def set_int8_amx(on):
    """Run the int8 x int8 qgemm of 16 rows or more (groups of a multiple of 64 inputs) on
    AMX-INT8 tiles (on or "tiles", where has_int8_amx()) or on the AVX-512 / AVX2 loops (off):
    the same bits either way. "model" runs the tile loop on a C model of the tiles (slow: tests
    of that loop on CPUs without AMX). Layers take the setting when called (Int8Linear) or
    when a model loads."""
    mode = on if on in ("tiles", "model", "off") else ("tiles" if on else "off")
    if mode == "tiles" and not has_int8_amx():
        raise UnsupportedError("int8 x int8 qgemm: no AMX-INT8 tiles on this CPU or OS")
    _state["int8_amx"] = mode


def int8_amx():
    """Where the int8 x int8 qgemm of 16 rows or more multiplies now: "tiles", "off" or "model"."""
    return _state["int8_amx"]


def use_int8_amx(on):
    """Run the enclosed calls' int8 x int8 qgemm as set_int8_amx(on) says, then restore."""
    return _switched(int8_amx, set_int8_amx, on)


_int8_isa_from_environment()
_wait_from_environment()
# QINFER_AMX=0 keeps the float qgemm on AVX multiply-adds and the int8 x int8 qgemm on its
# AVX-512 / AVX2 loops (they use AMX tiles where they can).
set_float_amx(has_float_amx() and os.environ.get("QINFER_AMX", "1").strip() != "0")
set_int8_amx(has_int8_amx() and os.environ.get("QINFER_AMX", "1").strip() != "0")
# QINFER_FLOAT_LIMBS=0 keeps the float qgemv in float multiply-adds.
set_float_limbs(has_float_limbs() and os.environ.get("QINFER_FLOAT_LIMBS", "1").strip() != "0")
# QINFER_AVX512=0 holds the float kernels to AVX2 (they use AVX-512 where the CPU has it).
set_float_avx512(has_float_avx512() and os.environ.get("QINFER_AVX512", "1").strip() != "0")
