"""`qinfer info`: the CPU, the kernel paths this build and CPU take, and the kernel parameters."""


def add_parser(sub):
    return sub.add_parser("info", help="CPU features, cache sizes and the kernel parameters chosen")


def _fmt_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024


def run(args):
    from .. import __version__, kernels
    from ..packing import BITWIDTHS
    from ..tune import tuned_summary

    built = kernels.machine()
    print(f"qinfer {__version__}")
    print(f"CPU:          {built['cpu_model']}")
    print(f"AVX2 + FMA:   {'yes' if kernels.cpu_has_avx2() else 'no'} (kernel path: {kernels.active_path()})")
    if kernels.has_float_avx512():
        print(f"AVX-512:      yes (float kernels: {'AVX-512' if kernels.float_avx512() else 'AVX2, QINFER_AVX512=0'})")
    isas = kernels.int8_isas()
    print(f"int8 kernels: {kernels.active_int8_isa() or 'scalar only'}"
          + (f" (this CPU and build: {', '.join(isas)})" if isas else ""))
    if kernels.has_float_amx():
        print(f"AMX:          yes (float qgemm of 16+ rows: {'AMX-BF16 tiles' if kernels.float_amx() else 'AVX, QINFER_AMX=0'})")
    if kernels.float_limbs():
        print(f"float qgemv:  2/4-bit in integer multiply-adds ({kernels.active_int8_isa()}; QINFER_FLOAT_LIMBS=0: float)")
    print(f"Caches:       L1d {_fmt_bytes(built['l1d_bytes'])}, L2 {_fmt_bytes(built['l2_bytes'])}, "
          f"L3 {_fmt_bytes(built['l3_bytes'])} (read from {built['cache_source']} at build time)")
    print(f"Threads:      {kernels.get_num_threads()} (OpenMP {'on' if kernels.have_openmp() else 'off'})")
    print("Kernel parameters (performance model; mu x tu: qgemm tile, nv: tiles per qgemv step,")
    print("mb x tb: Mini-GEMV block, nb: activation rows per L2 chunk):")
    print(f"  {'bits':>4} {'mu':>3} {'tu':>3} {'nv':>3} {'mb':>5} {'tb':>4} {'nb':>4} {'registers':>9} {'L1 bytes':>9}")
    for bits in BITWIDTHS:
        p = kernels.params(bits)
        print(f"  {bits:>4} {p['mu']:>3} {p['tu']:>3} {p['nv']:>3} {p['mb']:>5} {p['tb']:>4} {p['nb']:>4} "
              f"{p['registers_used']:>9} {p['l1_bytes_used']:>9}")
    print("\n".join(tuned_summary()))
