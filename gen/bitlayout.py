"""Where each packed value sits, per bitwidth, and how a kernel pulls it out.

A *unit* is the smallest run of int32 words that holds a whole number of
values: one word of 32/b values for b in {2, 4, 8}, three words of 32 values
for b = 3 (GPTQ's layout). Inside a unit, value i occupies bits
[b*i, b*i + b) of the little-endian bit stream word0 | word1 << 32 | ...

The AVX2 kernels avoid a shift per value: they AND the word with the value's
mask *in place* and convert the int32 to float, which gives q * 2^e exactly
(q has at most 8 significant bits). The activation for that position is
pre-scaled by 2^-e once per call, so the product is q * x with no rounding.
Two cases need more work:
  - a value whose field reaches bit 31 would read as negative: shift the
    word right by b first, so its field ends at bit 31 - b;
  - a value split across two words (3-bit only, values 10 and 21): shift
    both halves into place and OR them (exponent 0).
"""
from dataclasses import dataclass

BITWIDTHS = (2, 3, 4, 8)


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
    unit_words = 3 if bits == 3 else 1
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

def avx2_expr(f, w="w"):
    """__m256 holding q * 2**exponent for eight columns."""
    m = (1 << f.bits) - 1
    if f.split:
        high_bits = f.bits - f.low_bits
        return (f"_mm256_cvtepi32_ps(_mm256_or_si256("
                f"_mm256_srli_epi32({w}[{f.word}], {f.offset}), "
                f"_mm256_slli_epi32(_mm256_and_si256({w}[{f.word + 1}], "
                f"_mm256_set1_epi32({(1 << high_bits) - 1})), {f.low_bits})))")
    if f.offset + f.bits == 32:
        return (f"_mm256_cvtepi32_ps(_mm256_and_si256("
                f"_mm256_srli_epi32({w}[{f.word}], {f.bits}), "
                f"_mm256_set1_epi32({m << f.exponent}u)))")
    return (f"_mm256_cvtepi32_ps(_mm256_and_si256({w}[{f.word}], "
            f"_mm256_set1_epi32({m << f.exponent}u)))")


def scalar_expr(f, w="w"):
    """uint32_t q for one column (no pre-scaling on the scalar path)."""
    m = (1 << f.bits) - 1
    if f.split:
        high_bits = f.bits - f.low_bits
        return (f"(({w}[{f.word}] >> {f.offset}) | "
                f"(({w}[{f.word + 1}] & {(1 << high_bits) - 1}u) << {f.low_bits}))")
    return f"(({w}[{f.word}] >> {f.offset}) & {m}u)"
