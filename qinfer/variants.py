"""The kernel modules' variants, one table: which bit widths get a module
(qinfer._qgemm_b{bits}), and which vector widths, instruction sets and
kernel kinds each module is rendered with.

Read twice: by the package at run time (BITWIDTHS, GPTQ_BITWIDTHS) and by the
generator at build time (gen/variants.py loads this file by its path: the
package's __init__ loads the very extension modules the build is about to
make). So it stays plain data and standard library only, and gen/ need not
be installed with the package.

Each table has a comment naming its columns. held(), at the bottom, picks
the rows one module holds; pyx/qgemm.pyx.tp and its snippets render each
table's rows in one {{for}}, and open the module with a comment listing them.
"""
from collections import namedtuple

# ---------------------------------------------------------------- bit widths
# One kernel module per row.
#   bits        code width. A packing unit is one int32 word of 32/bits codes where bits
#               divides 32, else `bits` words of 32 codes (gen/bitlayout.py, docs/FORMAT.md)
#   gptq        GPTQ checkpoints hold it and `qinfer quantize` writes it. 5 and 6 bits are
#               for imported llama.cpp tensors only: no GPTQ tool writes them, so a GPTQ
#               checkpoint that says 5 or 6 is refused rather than read in a layout its
#               writer may not have meant
#   int8_lanes  lane width of the int8-activation kernels: 8 (u8 codes x s8 activations),
#               16 (u16 x s16: an 8-bit code reaches 255, too big for maddubs's int16 pairs)
#   gather      how those kernels put one code in each lane: "slice", a shift and a mask of
#               one word (the codes sit in whole bytes or halves of it); "multishift", AVX-512
#               VBMI's byte gather from two words of a column (the codes straddle words, so
#               no shift of one word lines them up: MULTISHIFT_ISAS below)
Bitwidth = namedtuple("Bitwidth", "bits gptq int8_lanes gather")
BITWIDTH_TABLE = (
    Bitwidth(2, True, 8, "slice"),
    Bitwidth(3, True, 8, "multishift"),
    Bitwidth(4, True, 8, "slice"),
    Bitwidth(5, False, 8, "multishift"),
    Bitwidth(6, False, 8, "multishift"),
    Bitwidth(8, True, 16, "slice"),
)
BITWIDTHS = tuple(row.bits for row in BITWIDTH_TABLE)
GPTQ_BITWIDTHS = tuple(row.bits for row in BITWIDTH_TABLE if row.gptq)
INT8_BITWIDTHS = tuple(row.bits for row in BITWIDTH_TABLE if row.int8_lanes)


# Group sizes (input rows sharing a scale and a zero; -1: the full column) the modules
# handle. The kernels end a segment every min(smallest group, unit values) values
# (gen/render.py, `check`); qinfer.rtn refuses the others.
GROUP_SIZES = (16, 32, 64, 128, -1)


def bitwidth(bits):
    """The row of `bits` (KeyError if no module has it)."""
    return {row.bits: row for row in BITWIDTH_TABLE}[bits]


# ---------------------------------------------------------------- vector types
# The vectors a kernel is written in (the float kernels, the int8 qgemm's row kernel).
#   bits, lanes   width in bits and in 32-bit lanes
#   ivec, fvec    the C integer and float vector types
#   p, si         the intrinsics' prefix and integer suffix (_mm256_and_si256)
#   dot           prefix of the int8 multiply-add macros (I8_DOT_U8, I8Z_DOT_U8, ...)
#   keep          the macro that pins a value to a register (pyx/int8_rows.h)
#   scales        the scale loader (pyx/qgemm.pyx.tp)
#   sfx           suffix of the float kernels' names (mac512_1x2, fmac512_12x2, ...)
#   attr          the float kernels' C function attribute
#   guard         preprocessor test that the compiler has the float kernels' instructions
Vec = namedtuple("Vec", "bits lanes ivec fvec p si dot keep scales sfx attr guard")
VECS = (
    #   bits lanes ivec       fvec      p         si       dot    keep                   scales           sfx    attr         guard
    Vec(256, 8,  "__m256i", "__m256", "_mm256", "si256", "I8",  "QI_KEEP_IN_REGISTER", "load_scales8",  "",    "QI_AVX2",   "1"),
    Vec(512, 16, "__m512i", "__m512", "_mm512", "si512", "I8Z", "QI_KEEP_IN_ZMM",      "load_scales16", "512", "QI_AVX512", "QINFER_HAVE_AVX512"),
)
YMM, ZMM = VECS

# ---------------------------------------------------------------- float kernels
# The float qgemv's micro-kernels and the float qgemm's, once per vector width; a module
# holds those whose vectors span whole tiles (tu % vec.lanes == 0), the first always.
#   vec         the vectors
#   gemm_rows   activation rows per call of the qgemm's micro-kernel; None: the performance
#               model's mu (gen/perfmodel.py). AVX-512: one 16-float accumulator per row and
#               tile, two tiles: 24 of the 32 registers
#   gemm_tiles  tiles per call of the qgemm's micro-kernel, each count its own kernel
FloatKernels = namedtuple("FloatKernels", "vec gemm_rows gemm_tiles")
FLOAT_KERNELS = (
    FloatKernels(YMM, None, (1,)),
    FloatKernels(ZMM, 12, (1, 2)),
)

# ---------------------------------------------------------------- instruction sets
# The int8-activation kernels are rendered once per instruction set, slowest first: the
# first is the one every AVX2 CPU runs. A module holds those whose qgemm vectors span whole
# tiles (tu % vec.lanes == 0). AVX-512 VNNI (Ice Lake, Sapphire Rapids, Zen 4 and later)
# multiplies 64 bytes an instruction and has 32 vector registers: its qgemm takes 8 rows of
# 16 columns a call. The qgemv is written in 256-bit vectors for every instruction set (it
# waits on memory, not on multiply-adds).
#   name    its name at run time (qinfer.kernels.set_int8_isa)
#   sfx     suffix of its functions and multiply-add macros
#   attr    the C function attribute
#   guard   preprocessor test that the compiler has it
#   cpu     C expression: this CPU has it
#   vec     the qgemm's vectors (a Vec above)
#   rows    activation rows per call of the qgemm's kernel
#   dpbusd  it adds byte products straight into int32 (VNNI), with no int16 pairs to
#           saturate: 8-bit codes (up to 255) then take byte lanes like the others, a
#           word's four codes times four activation bytes, where AVX2 needs 16-bit lanes
Isa = namedtuple("Isa", "name sfx attr guard cpu vec rows dpbusd")
INT8_ISAS = (
    #   name          sfx      attr             guard                     cpu                          vec  rows dpbusd
    Isa("avx2",       "",      "QI_AVX2",       "1",                      "qi_cpu_has_avx2_kernels()", YMM, 4,   False),
    Isa("avxvnni",    "_vnni", "QI_AVXVNNI",    "QINFER_HAVE_AVXVNNI",    "qi_cpu_has_avxvnni()",      YMM, 4,   True),
    Isa("avx512vnni", "_v512", "QI_AVX512VNNI", "QINFER_HAVE_AVX512VNNI", "qi_cpu_has_avx512vnni()",   ZMM, 8,   True),
)
# The int8 kernels of "multishift" bitwidths (3, 5, 6 bits): AVX-512 VNNI with VBMI's
# vpmultishiftqb (Ice Lake, Sapphire Rapids, Zen 4 and later), under the VNNI set's name;
# on other CPUs these bitwidths keep the float kernels whatever the int8 setting.
MULTISHIFT_ISAS = (
    Isa("avx512vnni", "_v512", "QI_AVX512VBMI", "QINFER_HAVE_AVX512VNNI", "qi_cpu_has_avx512vbmi()",   ZMM, 8,   True),
)

# ---------------------------------------------------------------- int8 qgemv kinds
# The int8 qgemv's walk over the tiles (pyx/snippets/int8_gemv.c.tp), rendered once per
# kind and instruction set.
#   name         in the kernels' names: qgemm_b{bits}_{name}{isa.sfx}, qgemv_b{bits}_{name}_team...
#   limbs        activation words multiplied per slice of a unit: 1, x rounded to int8
#                (x_q); 3, the float qgemv's x to 23 bits in signed-byte limbs (LIMBS)
#   u8_only      held only where the codes sit in byte lanes of one word: a u16 code (8 bits,
#                up to 255) times the 2^16 limb would not fit the int32 sums, nor would a
#                5- or 6-bit one (32 x 63 x 2^22 > 2^31)
#   lookup       the C function handing out the qgemm kernel by instruction set (NULL: none)
#   team_lookup  ... and its team twin (qgemv_team_fn, pyx/qmatrix.h)
MacKind = namedtuple("MacKind", "name limbs u8_only lookup team_lookup")
MAC_KINDS = (
    MacKind("i8", 1, False, "int8_avx2_kernel_for", "int8_team_kernel_for"),
    MacKind("limbs", 3, True, "limb_kernel_for", "limb_team_kernel_for"),
)

# ---------------------------------------------------------------- AMX
# The float qgemm on AMX tiles (pyx/amx_tiles.h, amx_gemm.h): an AMX tile row is 16
# floats, so a module holds it where tu is that and it has the 512-bit float kernels.
AMX_TILE_COLUMNS = 16

# ---------------------------------------------------------------- one module
#   bits           the Bitwidth row
#   float_kernels  FLOAT_KERNELS rows, gemm_rows resolved
#   int8_isas      INT8_ISAS (MULTISHIFT_ISAS) rows it can render the int8 kernels for (by tu alone)
#   mac_kinds      MAC_KINDS rows it renders them as
#   amx            whether it has the AMX qgemm
Module = namedtuple("Module", "bits float_kernels int8_isas mac_kinds amx")


def held(bits, tu, mu):
    """The variants module qinfer._qgemm_b{bits} is rendered with, for tiles of tu
    columns and the performance model's mu rows."""
    row = bitwidth(bits)
    floats = tuple(k._replace(gemm_rows=k.gemm_rows or mu) for k in FLOAT_KERNELS if tu % k.vec.lanes == 0)
    sliced = row.gather == "slice"
    kinds = tuple(kind for kind in MAC_KINDS if (row.int8_lanes == 8 and sliced) or not kind.u8_only)
    isas = INT8_ISAS if sliced else MULTISHIFT_ISAS
    return Module(bits=row, float_kernels=floats,
                  int8_isas=tuple(isa for isa in isas if tu % isa.vec.lanes == 0),
                  mac_kinds=kinds,
                  amx=tu == AMX_TILE_COLUMNS and ZMM in (k.vec for k in floats))
