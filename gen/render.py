"""Render the kernel templates for the build machine.

    python -m gen.render OUTDIR     (setup.py calls render_all at build time)

Writes OUTDIR/_qgemm_b{bits}.pyx from pyx/qgemm.pyx.tp for every bit width
of the variant table (qinfer/variants.py: 2, 3, 4, 5, 6, 8), each with the
parameters the performance model picked for that bitwidth and the variants
(vector widths, instruction sets, kernel kinds) the table holds for them; and
OUTDIR/kv_kernels.h from pyx/kv_kernels.h.tp, attention's loops for each coded
KV cache format (its table is at the template's top); and OUTDIR/lut_kernels.h
from pyx/lut_kernels.h.tp, the lookup-table loops per bit width and kind;
and OUTDIR/w8a8_kernels.h from pyx/w8a8_kernels.h.tp, the int8 x int8 loops
per instruction set.
"""
import dataclasses
import os
import sys

from Cython import Tempita

from . import bitlayout, machine as machine_mod, perfmodel
from .variants import table

HERE = os.path.dirname(os.path.abspath(__file__))
PYX = os.path.join(HERE, os.pardir, "pyx")
TEMPLATE = os.path.join(PYX, "qgemm.pyx.tp")
KV_TEMPLATE = os.path.join(PYX, "kv_kernels.h.tp")
LUT_TEMPLATE = os.path.join(PYX, "lut_kernels.h.tp")
W8A8_TEMPLATE = os.path.join(PYX, "w8a8_kernels.h.tp")
SNIPPETS = os.path.join(PYX, "snippets")
# the smallest group size: a segment can end every MIN_GROUP values
MIN_GROUP = min(g for g in table.GROUP_SIZES if g > 0)


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


def namespace(bits, params, machine):
    layout = bitlayout.layout(bits)
    held = table.held(bits, params.tu, params.mu)
    return dict(bits=bits, layout=layout, params=params, machine=machine,
                # the variants this module holds (qinfer/variants.py), one {{for}} each
                held=held, float_kernels=held.float_kernels, int8_isas=held.int8_isas, mac_kinds=held.mac_kinds,
                all_mac_kinds=table.MAC_KINDS, variants_comment=variants_comment(held),
                # AVX-512 twins of the float kernels
                avx512_float=table.ZMM in (k.vec for k in held.float_kernels),
                gemv_prefetch_bytes=int(os.environ.get("QINFER_GEMV_PREFETCH", 0)) or GEMV_PREFETCH_BYTES,
                check=min(MIN_GROUP, layout.unit_values),
                gemv_tiles=list(range(1, max(params.nv, params.nv_max) + 1)),
                avx2_expr=bitlayout.avx2_expr, scalar_expr=bitlayout.scalar_expr)


def variants_comment(held):
    """The generated module's opening comment: the variants it holds."""
    floats = ", ".join(f"{k.vec.bits}-bit vectors (qgemm: {k.gemm_rows} rows x {' or '.join(map(str, k.gemm_tiles))}"
                       f" tile(s) a call)" for k in held.float_kernels)
    kinds = ", ".join(mac.name for mac in held.mac_kinds) or "none (the codes straddle words)"
    isas = ", ".join(isa.name for isa in held.int8_isas) if held.mac_kinds else "-"
    return "\n".join(["# Variants (qinfer/variants.py):",
                      f"#   float qgemv, qgemm:    {floats}",
                      f"#   int8 qgemv kinds:      {kinds}",
                      f"#   ... instruction sets:  {isas}",
                      f"#   AMX float qgemm:       {'yes' if held.amx else 'no'}"])


def int8_namespace(bits, params, machine):
    """Names for the int8-activation qgemv (pyx/snippets/int8_gemv.c.tp).
    QINFER_INT8_TILES=N and QINFER_INT8_STREAM_TILES=N replace the model's tile
    counts for layers that fit the caches and layers that stream (for experiments)."""
    has = bits in bitlayout.INT8_BITWIDTHS
    int8 = bitlayout.int8_layout(bits) if has else None
    held = table.held(bits, params.tu, params.mu)

    def int8_for(isa):
        """The layout instruction set `isa` reads (None: the module's, AVX2's)."""
        return bitlayout.int8_layout(bits, isa.dpbusd) if has and isa else int8

    def quantizer_for(isa):
        """The function that rounds a row's activations into int8_for(isa)'s words."""
        return "quantize_i8_avx2" if int8_for(isa) == int8 else "quantize_i8_bytes"

    quantizers = [(int8, "quantize_i8_avx2")] if has else []
    byte_isas = [isa for isa in held.int8_isas if has and int8_for(isa) != int8]
    if byte_isas:        # 8-bit codes in byte lanes (VNNI): the activations as bytes, not int16 pairs
        quantizers.append((int8_for(byte_isas[0]), "quantize_i8_bytes"))
    return dict(int8=int8, int8_for=int8_for, quantizer_for=quantizer_for, int8_quantizers=quantizers,
                avx2_int8_expr=bitlayout.avx2_int8_expr,
                int8_chunk_order=bitlayout.int8_chunk_order,
                int8_tiles=(int(os.environ.get("QINFER_INT8_TILES", 0)) or
                            perfmodel.int8_gemv_tiles(int8, params.tu)) if has else 0,
                int8_stream_tiles=(int(os.environ.get("QINFER_INT8_STREAM_TILES", 0)) or
                                   perfmodel.int8_stream_tiles(machine)) if has else 0,
                limb_stream_tiles=perfmodel.LIMB_STREAM_TILES if has else 0)


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
    ns.update(int8_namespace(bits, params, machine), i8_prefetch_bytes=i8_prefetch_bytes(machine))
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
    for bits in table.BITWIDTHS:
        params = perfmodel.choose(bits, machine)
        if forced:
            params = dataclasses.replace(params, **forced)
        path = os.path.join(outdir, f"_qgemm_b{bits}.pyx")
        write_if_changed(path, render(bits, params, machine))
        written.append(path)
    path = os.path.join(outdir, "kv_kernels.h")
    write_if_changed(path, load(KV_TEMPLATE).substitute({}))
    written.append(path)
    for name, template in (("lut_kernels.h", LUT_TEMPLATE), ("w8a8_kernels.h", W8A8_TEMPLATE)):
        path = os.path.join(outdir, name)
        write_if_changed(path, load(template).substitute({}))
        written.append(path)
    return written


if __name__ == "__main__":
    for p in render_all(sys.argv[1] if len(sys.argv) > 1 else "qinfer"):
        print(p)
