"""Render the kernel templates for the build machine.

    python -m gen.render OUTDIR     (setup.py calls render_all at build time)

Writes OUTDIR/_qgemm_b{2,3,4,8}.pyx from pyx/qgemm.pyx.tp, each with the
parameters the performance model picked for that bitwidth.
"""
import collections
import dataclasses
import os
import sys

from Cython import Tempita

from . import bitlayout, machine as machine_mod, perfmodel

HERE = os.path.dirname(os.path.abspath(__file__))
PYX = os.path.join(HERE, os.pardir, "pyx")
TEMPLATE = os.path.join(PYX, "qgemm.pyx.tp")
SNIPPETS = os.path.join(PYX, "snippets")
MIN_GROUP = 16   # the smallest group size: a segment can end every MIN_GROUP values


# Bytes ahead the float qgemv prefetches its codes. 4096 measured best of
# 1024..8192 on a 2-core Xeon (7B-shaped 4-bit layers from memory: 0.35 of the
# read bandwidth without prefetch, 0.62 at 1024, 0.67 at 4096, 0.64 at 8192).
# QINFER_GEMV_PREFETCH=N at build time replaces it (for experiments).
GEMV_PREFETCH_BYTES = 4096


# Bytes ahead the int8 qgemv prefetches its codes (one stream per thread), by
# CPU vendor. 7B-shaped 4-bit g128 decode, 2 threads, fraction of the
# read-bandwidth bound, builds run alternately: on a 2-core Zen 3, 1 KiB 0.90,
# 2 KiB 0.85, 4 KiB 0.84 (7 rounds); on a 2-core KVM Xeon with AVX-512 (the
# guided schedule of int8_gemv.c.tp), 1 KiB 0.82, 2 KiB 0.86, 4 KiB 0.73 with
# prefetcht0 and 0.80 with prefetcht1 (4 rounds). The Xeon's cores keep fewer
# misses of their own in flight against a longer memory latency, so the
# prefetches have to start further ahead; too far, and the lines come in
# before they are needed and crowd the L1. Vendors not measured get AMD's.
# QINFER_I8_PREFETCH=N at build time replaces it (for experiments).
I8_PREFETCH_BYTES = {"GenuineIntel": 2048}
I8_PREFETCH_DEFAULT = 1024


def i8_prefetch_bytes(machine):
    return int(os.environ.get("QINFER_I8_PREFETCH", 0)) or I8_PREFETCH_BYTES.get(machine.vendor, I8_PREFETCH_DEFAULT)


# Activation rows per call of the float qgemm's AVX-512 micro-kernel (one
# 16-float accumulator per row and tile, two tiles: 24 of the 32 registers).
FMAC512_ROWS = 12


def namespace(bits, params, machine):
    layout = bitlayout.layout(bits)
    gemv_tiles = list(range(1, max(params.nv, params.nv_max) + 1))
    avx512_float = params.tu % ZMM.lanes == 0
    return dict(bits=bits, layout=layout, params=params, machine=machine,
                # AVX-512 twins of the float kernels where a 16-float vector spans whole tiles
                avx512_float=avx512_float,
                # the float qgemv's micro-kernels, once per vector width
                float_vecs=[YMM] + ([ZMM] if avx512_float else []),
                # the float qgemm's micro-kernels: (vectors, rows a call, tiles a call)
                float_gemm_shapes=[(YMM, params.mu, (1,))] + ([(ZMM, FMAC512_ROWS, (1, 2))] if avx512_float else []),
                gemv_prefetch_bytes=int(os.environ.get("QINFER_GEMV_PREFETCH", 0)) or GEMV_PREFETCH_BYTES,
                check=min(MIN_GROUP, layout.unit_values),
                gemv_tiles=gemv_tiles,
                avx2_expr=bitlayout.avx2_expr, scalar_expr=bitlayout.scalar_expr)


class Vec(collections.namedtuple("Vec", "bits lanes ivec fvec p si dot keep scales sfx attr guard")):
    """The vectors a kernel is written in (the float qgemv's micro-kernels, the
    int8 qgemm's row kernel): their width in bits and in 32-bit lanes, the C
    types, the intrinsics' prefix and integer suffix, the prefix of the int8
    multiply-add macros, the register-pinning macro, the scale loader, and for
    the float kernels the suffix of their names, their C function attribute
    and the preprocessor test that the compiler has them."""


YMM = Vec(256, 8, "__m256i", "__m256", "_mm256", "si256", "I8", "QI_KEEP_IN_REGISTER", "load_scales8",
          "", "QI_AVX2", "1")
ZMM = Vec(512, 16, "__m512i", "__m512", "_mm512", "si512", "I8Z", "QI_KEEP_IN_ZMM", "load_scales16",
          "512", "QI_AVX512", "QINFER_HAVE_AVX512")


class Isa(collections.namedtuple("Isa", "name sfx attr guard cpu vec rows")):
    """An instruction set the int8 kernels are rendered for: its name at run time,
    the suffix of its functions and multiply-add macros, the C function
    attribute, the preprocessor test that the compiler has it, the C
    expression that the CPU has it, and the vectors (Vec) and activation rows
    per call of its qgemm kernel. The qgemv is written in 256-bit vectors for
    every instruction set (it waits on memory, not on multiply-adds)."""


# Slowest first: the first is the one every AVX2 CPU runs. AVX-512 VNNI (Ice Lake,
# Sapphire Rapids, Zen 4 and later) multiplies 64 bytes an instruction and has 32
# vector registers: its qgemm takes 8 rows of 16 columns a call.
INT8_ISAS = (Isa("avx2", "", "QI_AVX2", "1", "qi_cpu_has_avx2_kernels()", YMM, 4),
             Isa("avxvnni", "_vnni", "QI_AVXVNNI", "QINFER_HAVE_AVXVNNI", "qi_cpu_has_avxvnni()", YMM, 4),
             Isa("avx512vnni", "_v512", "QI_AVX512VNNI", "QINFER_HAVE_AVX512VNNI", "qi_cpu_has_avx512vnni()",
                 ZMM, 8))


def int8_namespace(bits, params):
    """Names for the int8-activation qgemv (pyx/snippets/int8_gemv.c.tp).
    QINFER_INT8_TILES=N and QINFER_INT8_STREAM_TILES=N replace the model's tile
    counts for layers that fit the caches and layers that stream (for experiments)."""
    has = bits in bitlayout.INT8_BITWIDTHS
    int8 = bitlayout.int8_layout(bits) if has else None
    # a 512-bit kernel needs tiles of a whole number of its vectors
    isas = tuple(isa for isa in INT8_ISAS if params.tu % isa.vec.lanes == 0)
    return dict(int8=int8, avx2_int8_expr=bitlayout.avx2_int8_expr, int8_isas=isas,
                int8_chunk_order=bitlayout.int8_chunk_order,
                int8_tiles=(int(os.environ.get("QINFER_INT8_TILES", 0)) or
                            perfmodel.int8_gemv_tiles(int8, params.tu)) if has else 0,
                int8_stream_tiles=(int(os.environ.get("QINFER_INT8_STREAM_TILES", 0)) or
                                   perfmodel.INT8_STREAM_TILES) if has else 0)


def load(path):
    with open(path) as f:
        return Tempita.Template(f.read(), name=os.path.relpath(path, os.path.join(HERE, os.pardir)))


def render(bits, params, machine):
    ns = namespace(bits, params, machine)
    snippets = {name[:-len(".c.tp")]: load(os.path.join(SNIPPETS, name))
                for name in os.listdir(SNIPPETS) if name.endswith(".c.tp")}

    # Tempita's own {{def}} cannot take arguments in current Cython, so the
    # repeated pieces of C are small templates of their own.
    def snippet(name, **names):
        return snippets[name].substitute(dict(ns, **names)).rstrip("\n")

    ns["snippet"] = snippet
    ns.update(int8_namespace(bits, params), i8_prefetch_bytes=i8_prefetch_bytes(machine))
    return load(TEMPLATE).substitute(ns)


def write_if_changed(path, text):
    """Keep the mtime of unchanged files so Cython does not rebuild them."""
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def overrides(text):
    """QINFER_KERNEL_PARAMS="mu=4,tu=16,nv=3" replaces the model's choice (for experiments);
    a forced nv above the register budget still gets its micro-kernel."""
    fields = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        fields[key.strip()] = int(value)
    return fields


def render_all(outdir, machine=None):
    machine = machine or machine_mod.detect()
    os.makedirs(outdir, exist_ok=True)
    forced = overrides(os.environ.get("QINFER_KERNEL_PARAMS"))
    written = []
    for bits in bitlayout.BITWIDTHS:
        params = perfmodel.choose(bits, machine)
        if forced:
            params = dataclasses.replace(params, **forced)
        path = os.path.join(outdir, f"_qgemm_b{bits}.pyx")
        write_if_changed(path, render(bits, params, machine))
        written.append(path)
    return written


if __name__ == "__main__":
    for p in render_all(sys.argv[1] if len(sys.argv) > 1 else "qinfer"):
        print(p)
