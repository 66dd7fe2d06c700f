"""Where each packed value sits, per bitwidth, and how a kernel pulls it out.

A *unit* is a run of int32 words that holds a whole number of values: one
word of 32/b values for b in {2, 4, 8}; for b in {3, 5, 6}, b words of 32
values (GPTQ's 3-bit layout, extended the same way to 5 and 6 bits). Inside a unit, value i occupies bits
[b*i, b*i + b) of the little-endian bit stream word0 | word1 << 32 | ...

The AVX2 kernels avoid a shift per value: they AND the word with the value's
mask *in place* and convert the int32 to float, which gives q * 2^e exactly
(q has at most 8 significant bits). The activation for that position is
pre-scaled by 2^-e once per call, so the product is q * x with no rounding.
Two cases need more work:
  - a value whose field reaches bit 31 would read as negative: shift the
    word right by b first, so its field ends at bit 31 - b;
  - a value split across two words (3-bit: values 10 and 21; 5-bit: 6, 12,
    19, 25; 6-bit: 5, 10, 21, 26): shift both halves into place and OR them
    (exponent 0).
"""
from dataclasses import dataclass

from .variants import table

BITWIDTHS = table.BITWIDTHS


@dataclass(frozen=True)
class Field:
    index: int        # position of the value inside its unit
    word: int         # word holding the value's low bits
    offset: int       # bit offset of the low bits in that word
    low_bits: int     # bits in `word`; b - low_bits more sit at the bottom of word + 1
    exponent: int     # the AVX2 path produces q * 2**exponent
    bits: int         # width of the value

    @property
    def split(self):
        return self.low_bits < self.bits


@dataclass(frozen=True)
class Layout:
    bits: int
    unit_words: int   # int32 words per unit
    unit_values: int  # values per unit
    fields: tuple

    @property
    def mask(self):
        return (1 << self.bits) - 1


def layout(bits):
    if bits not in BITWIDTHS:
        raise ValueError(f"no layout for {bits}-bit values")
    unit_words = 1 if 32 % bits == 0 else bits
    unit_values = 32 * unit_words // bits
    fields = []
    for i in range(unit_values):
        start = bits * i
        word, offset = divmod(start, 32)
        low_bits = min(bits, 32 - offset)
        if low_bits < bits:
            exponent = 0                 # split: reassembled at bit 0
        elif offset + bits == 32:
            exponent = offset - bits     # touches the sign bit: shifted down by b
        else:
            exponent = offset
        fields.append(Field(i, word, offset, low_bits, exponent, bits))
    return Layout(bits, unit_words, unit_values, tuple(fields))


# ---------------------------------------------------------------- C snippets
# Each returns a C expression; `w` names the unit's words (w[0], w[1], ...).

def avx2_expr(f, w="w", width=256):
    """__m256 holding q * 2**exponent for eight columns (width=512: __m512, sixteen)."""
    m = (1 << f.bits) - 1
    p, si = f"_mm{width}", f"si{width}"
    if f.split:
        high_bits = f.bits - f.low_bits
        return (f"{p}_cvtepi32_ps({p}_or_{si}("
                f"{p}_srli_epi32({w}[{f.word}], {f.offset}), "
                f"{p}_slli_epi32({p}_and_{si}({w}[{f.word + 1}], "
                f"{p}_set1_epi32({(1 << high_bits) - 1})), {f.low_bits})))")
    if f.offset + f.bits == 32:
        return (f"{p}_cvtepi32_ps({p}_and_{si}("
                f"{p}_srli_epi32({w}[{f.word}], {f.bits}), "
                f"{p}_set1_epi32({m << f.exponent}u)))")
    return (f"{p}_cvtepi32_ps({p}_and_{si}({w}[{f.word}], "
            f"{p}_set1_epi32({m << f.exponent}u)))")


def scalar_expr(f, w="w"):
    """uint32_t q for one column (no pre-scaling on the scalar path)."""
    m = (1 << f.bits) - 1
    if f.split:
        high_bits = f.bits - f.low_bits
        return (f"(({w}[{f.word}] >> {f.offset}) | "
                f"(({w}[{f.word + 1}] & {(1 << high_bits) - 1}u) << {f.low_bits}))")
    return f"(({w}[{f.word}] >> {f.offset}) & {m}u)"


# ------------------------------------------------ int8 activations (decode)
# The int8 qgemv multiplies the packed codes by activations rounded to int8
# (per block of 32 rows, see pyx/qgemm.pyx.tp) with integer multiply-adds:
# one instruction multiplies the lanes of a code vector by the lanes of a
# broadcast 32-bit "activation word" and adds neighbouring products.
#
# The codes are not moved: a *slice* of a packed 32-bit word is the word
# shifted right and masked so that each lane (a byte for 2- and 4-bit codes,
# a 16-bit half for 8-bit codes) holds one code. The activation word of that
# slice holds, lane for lane, the activations of the same input rows, so the
# products line up without any shuffle of the weights; the activations are
# arranged once per call instead.

@dataclass(frozen=True)
class Slice:
    shift: int        # right shift of the word (0: none)
    rows: tuple       # value index (inside the unit) held by lane 0, 1, ...


@dataclass(frozen=True)
class Gather:
    """Eight codes of a multi-word unit that one vpmultishiftqb picks out of a
    64-bit lane holding words `word` (low half) and `word` + 1 (high half) of a
    column: byte i of the result starts at bit offsets[i] of that lane."""
    word: int
    offsets: tuple    # bit offset in the 64-bit lane of byte 0, 1, ..., 7
    rows: tuple       # value index (inside the unit) that lands in byte 0, 1, ..., 7

    @property
    def control(self):
        """The multishift's control qword: byte i = offsets[i]."""
        return sum(o << (8 * i) for i, o in enumerate(self.offsets))


@dataclass(frozen=True)
class Int8Layout:
    bits: int
    lane_bits: int    # 8: u8 codes x s8 activations; 16: u16 codes x s16 activations
    lane_mask: int    # the AND that isolates one code per lane after the shift (or gather)
    slices: tuple     # "slice" bitwidths: Slice per activation word of a unit
    gathers: tuple = ()   # "multishift" bitwidths: Gather per two activation words of a unit

    @property
    def lanes(self):
        return 32 // self.lane_bits

    @property
    def act_words(self):
        """32-bit activation words per unit (I8_SLICES in the C)."""
        return 2 * len(self.gathers) if self.gathers else len(self.slices)


INT8_BITWIDTHS = table.INT8_BITWIDTHS


def int8_layout(bits, dpbusd=False):
    """How the int8 qgemv reads a unit (one word) of b-bit codes.

    b = 2, 4: byte j of the word holds values 8j/b .. 8j/b + 8/b - 1; shifting
    by b*s and masking every byte with 2^b - 1 leaves value j*(8/b) + s in
    byte j. b = 8: the 16-bit halves of the word hold values (0, 1) and
    (2, 3); masking with 0x00FF00FF leaves values (0, 2), a 16-bit shift by 8
    leaves values (1, 3). With dpbusd (VNNI: byte products added straight into
    int32, nothing to saturate) 8-bit codes take byte lanes too: the word itself,
    byte j = value j, one slice.
    """
    if bits not in INT8_BITWIDTHS:
        raise ValueError(f"no int8-activation layout for {bits}-bit values")
    lane_bits = table.bitwidth(bits).int8_lanes   # qinfer/variants.py: 16 for 8-bit codes, else 8
    if table.bitwidth(bits).gather == "multishift":
        return multishift_layout(bits)
    if lane_bits == 16 and dpbusd:
        return Int8Layout(bits, 8, 0xFFFFFFFF, (Slice(0, (0, 1, 2, 3)),))
    if lane_bits == 16:
        return Int8Layout(bits, lane_bits, 0x00FF00FF, (Slice(0, (0, 2)), Slice(8, (1, 3))))
    per_byte = 8 // bits
    byte_mask = (1 << bits) - 1
    mask = byte_mask * 0x01010101
    slices = tuple(Slice(bits * s, tuple(j * per_byte + s for j in range(4))) for s in range(per_byte))
    return Int8Layout(bits, lane_bits, mask, slices)


def multishift_layout(bits):
    """How the int8 kernels read a unit of b words of 32 b-bit codes (b = 3, 5, 6).

    The codes straddle words, and no shift of one word puts whole codes in its
    bytes. AVX-512 VBMI's vpmultishiftqb copies, into each byte of a 64-bit
    lane, the 8 bits starting at any offset of that lane. Interleaving words k
    and k + 1 of a unit (unpacklo/hi_epi32) gives each column a 64-bit lane of
    its bit stream from bit 32k; codes 8q .. 8q + 7 (bits 8qb .. 8qb + 8b - 1)
    all lie in the lane of k = the largest word index with 32k <= 8qb that
    keeps k + 1 inside the unit, so one multishift and a mask give those eight
    codes in bytes 0..7, in row order: the activation words need no shuffle.
    """
    lay = layout(bits)
    gathers = []
    for q in range(lay.unit_values // 8):
        first, end = 8 * q * bits, 8 * (q + 1) * bits       # the codes' bits in the unit
        k = min(first // 32, lay.unit_words - 2)
        assert 32 * k <= first and end <= 32 * k + 64, (bits, q)
        gathers.append(Gather(k, tuple(first - 32 * k + bits * i for i in range(8)),
                              tuple(8 * q + i for i in range(8))))
    return Int8Layout(bits, 8, ((1 << bits) - 1) * 0x0101010101010101, (), tuple(gathers))


def avx2_int8_expr(lay, s, w="w", width=256):
    """One slice, a code per lane (u8 or u16) for eight columns (__m256i) or,
    with width=512, for sixteen (AVX-512's __m512i)."""
    p = f"_mm{width}"
    if lay.lane_mask == 0xFFFFFFFF:
        return w                                   # 8-bit codes in byte lanes: the word as it is
    if lay.lane_bits == 16 and s.shift == 8:
        return f"{p}_srli_epi16({w}, 8)"          # the high byte of each half: no mask needed
    shifted = f"{p}_srli_epi32({w}, {s.shift})" if s.shift else w
    return f"{p}_and_si{width}({shifted}, {p}_set1_epi32({lay.lane_mask:#010x}))"


def int8_chunk_order(lay, unit_values):
    """The byte shuffle that turns 16 activation codes of consecutive rows
    (int8, or int16 for 16-bit lanes: 16 bytes of one 128-bit lane, 8 rows)
    into their activation words: words of a unit in slice order, lanes
    in the order each slice reads them. Entry i names the source byte of
    output byte i."""
    if lay.gathers:                      # multishift: the activations stay in row order
        return list(range(16))
    order = []
    if lay.lane_bits == 8:
        for u in range(16 // unit_values):
            for s in lay.slices:
                order += [u * unit_values + r for r in s.rows]
    else:
        for u in range(8 // unit_values):
            for s in lay.slices:
                for r in s.rows:
                    order += [2 * (u * unit_values + r), 2 * (u * unit_values + r) + 1]
    assert sorted(order) == list(range(16))
    return order
