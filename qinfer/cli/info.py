"""`qinfer info`: the CPU, the kernel paths this build and CPU take, and the kernel parameters;
with --model (or --ctx, --kv-cache), the model's shape and its KV cache's size in each format."""
from .options import add_kv_cache_option, positive_int


def add_parser(sub):
    p = sub.add_parser("info", help="CPU features, cache sizes and the kernel parameters chosen; with --model, "
                                    "the model's shape and its KV cache's bytes per token")
    p.add_argument("--model", metavar="PATH", nargs="?", const="", default=None,
                   help="also print this model's shape and its KV cache's size in each format, per token and "
                        "for the whole context (--model alone, --ctx or --kv-cache: the default model)")
    p.add_argument("--ctx", type=positive_int, default=None,
                   help="the context the cache's sizes are for (default: the model's trained context)")
    add_kv_cache_option(p)
    return p


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
    from .. import _lut
    lut_loops = "AVX-512 VBMI + VNNI" if _lut.cpu_has_avx512() and kernels.active_path() == "avx2" else "portable"
    print(f"LUT kernels:  {lut_loops} (2/3/4-bit and BCQ layers; QINFER_LUT={kernels.lut_mode()})")
    from ..int8_linear import kernel_isa
    amx = {"tiles": "; 16+ rows: AMX-INT8 tiles", "model": "; 16+ rows: a C model of AMX tiles (tests)",
           "off": "; QINFER_AMX=0" if kernels.has_int8_amx() else ""}[kernels.int8_amx()]
    print(f"W8A8 kernels: {kernel_isa()}{amx} (int8 activations per token: SmoothQuant/ZeroQuant checkpoints)")
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
    if args.model is not None or args.ctx is not None or args.kv_cache is not None:
        print()
        print("\n".join(model_summary(args.model or None, args.ctx, args.kv_cache,
                                      getattr(args, "kv_residual", None), getattr(args, "kv_group", None))))


def model_summary(path, ctx=None, kv_cache=None, residual=None, group=None):
    """Lines on the model at `path` (None: the default model): its shape, and its KV cache's bytes
    per token and for a context of ctx tokens (default: the trained one) in each implemented
    format, the chosen one (kv_cache, default f32) marked. Reads the config, not the weights."""
    from .. import kv_cache as kv_formats
    from .. import memory
    from ..engine import default_model_path
    from ..model import cache_formats, check_ctx
    from ..readers import open_model

    path = path if path is not None else default_model_path()
    cfg = open_model(path).config
    ctx = check_ctx(ctx if ctx is not None else cfg.max_position_embeddings)
    chosen = kv_formats.check(kv_cache, residual, group, head_dim=cfg.head_dim)
    formats = cache_formats(cfg)
    formats[chosen.name] = chosen
    available = memory.available_bytes()
    lines = [f"Model:        {path}",
             f"Shape:        {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads, "
             f"{cfg.num_key_value_heads} KV heads, head dim {cfg.head_dim}, "
             f"trained context {cfg.max_position_embeddings} tokens",
             f"KV cache:     per token and for a context of {ctx} tokens (--ctx), * the chosen format "
             f"(--kv-cache);",
             "              memory follows use: the cache's pages become resident as tokens fill them"]
    width = max(len(spec.describe()) if isinstance(spec, kv_formats.KVSpec) else len(name)
                for name, spec in formats.items())
    for name, spec in formats.items():
        mark = "*" if name == chosen.name else " "
        if not isinstance(spec, kv_formats.KVSpec):
            lines.append(f"  {mark} {name:<{width}}  not for this model: {spec}")
            continue
        full = spec.cache_bytes(cfg, ctx)
        too_big = "  (more than the memory available)" if available is not None and full > available else ""
        lines.append(f"  {mark} {spec.describe():<{width}}  {spec.bytes_per_token(cfg):>9} B/token  "
                     f"{memory.format_bytes(full):>10}{too_big}")
    if available is not None:
        lines.append(f"Memory:       {memory.format_bytes(available)} available (MemAvailable + SwapFree)")
    return lines
