"""Build: render the kernel templates for this machine, then cythonize.

`pip install .` runs the generator (gen/) first: it reads the CPU's caches,
picks the kernel parameters with the performance model and renders
pyx/qgemm.pyx.tp once per bitwidth into build/generated/. Nothing it writes
is committed.
"""
import glob
import os
import sys

from setuptools import Extension, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
GENERATED = os.path.join("build", "generated")
sys.path.insert(0, ROOT)

from gen.bitlayout import BITWIDTHS  # noqa: E402
from gen.render import render_all  # noqa: E402


# Modules translated and compiled side by side, one per core (the build is most of
# `pip install`'s time; QINFER_BUILD_JOBS=1 builds one at a time).
JOBS = int(os.environ.get("QINFER_BUILD_JOBS") or os.cpu_count() or 1)


def compiler_flags():
    if sys.platform == "win32":
        return ["/O2", "/openmp"], []
    # No -march: the AVX2 kernels carry their own target attribute and are
    # chosen at run time, so the same build runs on CPUs without AVX2.
    # -fno-trapping-math: we never read the FP exception flags, and without it
    # GCC keeps every conditional (a clamp, a sign select) as a branch, which
    # stops loops such as SiLU's and the softmax's from vectorizing.
    return ["-O3", "-fopenmp", "-fno-trapping-math", "-std=gnu11",
            "-Wno-unused-function", "-Wno-unreachable-code"], ["-fopenmp", "-lm"]


def extensions():
    from Cython.Build import cythonize

    render_all(os.path.join(ROOT, GENERATED))
    cflags, lflags = compiler_flags()
    # depends: the modules include pyx/*.h as text (kernel code among them: amx_*.h, int8_*.h),
    # and _forward.pyx the forward pass's C files, which Cython does not see: a changed one
    # must rebuild them even where no .pyx changed.
    headers = sorted(glob.glob(os.path.join("pyx", "*.h")))
    forward_c = [os.path.join("pyx", c) for c in ("forward.c", "float_gemm.c", "kv_cache.c", "attention.c")]
    forward_c.append(os.path.join(GENERATED, "kv_kernels.h"))
    common = dict(include_dirs=["pyx"], depends=headers, extra_compile_args=cflags, extra_link_args=lflags)
    exts = [Extension(f"qinfer._qgemm_b{b}", [os.path.join(GENERATED, f"_qgemm_b{b}.pyx")], **common)
            for b in BITWIDTHS]
    exts.append(Extension("qinfer._runtime", ["pyx/_runtime.pyx"], **common))
    exts.append(Extension("qinfer._forward", ["pyx/_forward.pyx"], **dict(
        common, depends=headers + forward_c, include_dirs=["pyx", GENERATED])))   # kv_kernels.h
    exts.append(Extension("qinfer._sampling", ["pyx/_sampling.pyx"], **common))
    exts.append(Extension("qinfer._lut", ["pyx/_lut.pyx"], **dict(      # lut_kernels.h
        common, depends=headers + [os.path.join(GENERATED, "lut_kernels.h")], include_dirs=["pyx", GENERATED])))
    exts.append(Extension("qinfer._w8a8", ["pyx/_w8a8.pyx"], **dict(    # w8a8_kernels.h; no fused
        common, depends=headers + [os.path.join(GENERATED, "w8a8_kernels.h")], include_dirs=["pyx", GENERATED],
        extra_compile_args=cflags + ["-ffp-contract=off"])))              # multiply-adds: pyx/w8a8.h
    # include_path: the generated modules in build/generated cimport pyx/qmatrix.pxd
    return cythonize(exts, language_level=3, include_path=["pyx"], nthreads=JOBS, compiler_directives={
        "boundscheck": False, "wraparound": False, "cdivision": True})


setup(
    packages=["qinfer", "qinfer.cli", "qinfer.quant", "qinfer.readers", "qinfer.server", "qinfer.sweep", "qinfer.tokenizer",
              "qinfer.tuning"],
    package_dir={"qinfer": "qinfer", "qinfer.tokenizer": "tokenizer"},
    ext_modules=extensions(),
    options={"build_ext": {"parallel": JOBS}},
)
