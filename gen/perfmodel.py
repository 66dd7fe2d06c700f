"""The performance model that picks kernel parameters (QIGen, section 3).

Micro-GEMV tile (mu x tu): mu activation rows times tu output columns are
accumulated in registers. With 8 floats per YMM register and V = tu/8, the
tile needs
    mu * V   accumulators
  +      V   registers of packed weight words (one per 8 columns)
  +      2   one broadcast activation and one converted weight vector
and all of it must fit the 16 vector registers (Eq. 4). For each packed
value the tile issues V unpacks (AND + convert) and mu*V FMAs; it costs
    max(FMA latency,           each accumulator is one dependency chain
        mu*V / FMA ports,      the FMA pipes
        (2V + mu*V) / vector ports)   every vector pipe
cycles, and the model keeps the tile with most multiply-adds per cycle
(ties: fewer registers, then larger mu). The packed layout is cut in tiles
of tu columns; qgemv (mu = 1) walks nv such tiles side by side, nv chosen
by the same count, because one tile alone is too few chains to hide the
FMA latency. Every nv up to the register budget (nv_max) gets a qgemv
micro-kernel, so the run-time tuner (qinfer/tuning) can measure them all.

Mini-GEMV block (mb x tb): mb input rows times tb output columns of packed
weights, together with the mb-slice of mu activation rows and the tb-slice
of mu outputs, must fit in the L1 data cache (Eqs. 3 and 5), so that the
weights unpacked for one row tile are still in L1 for the next. mb is kept
a multiple of 128 (every group size divides it), tb a multiple of nv * tu.

Row chunk (nb): qgemm with many activation rows (a prompt) takes them nb at
a time, nb rows of an mb-slice of x filling half of L2, so the slice is
read from L2, not from L3 or memory, for every tile.
"""
from dataclasses import dataclass, asdict

FLOATS_PER_VECTOR = 8
FMA_LATENCY = 4          # cycles; Haswell..Zen 4 are all 4 or 5
FMA_PORTS = 2
VECTOR_PORTS = 4
L1_BUDGET = 0.5          # leave half of L1 for stack, scales and prefetched lines
L2_BUDGET = 0.5          # half of L2 for the activations of one row chunk
MB_UNIT = 128
MAX_MB = 1024
MAX_TB = 256


@dataclass(frozen=True)
class KernelParams:
    bits: int
    mu: int
    tu: int
    nv: int
    nv_max: int
    mb: int
    tb: int
    nb: int
    registers_used: int
    l1_bytes_used: int

    def as_dict(self):
        return asdict(self)


def registers_needed(mu, vectors):
    return mu * vectors + vectors + 2


def macs_per_cycle(mu, vectors):
    cycles = max(FMA_LATENCY, mu * vectors / FMA_PORTS,
                 (2 * vectors + mu * vectors) / VECTOR_PORTS)
    return FLOATS_PER_VECTOR * mu * vectors / cycles


def best_mu(vectors, vector_registers=16, max_mu=8):
    fits = [mu for mu in range(1, max_mu + 1)
            if registers_needed(mu, vectors) <= vector_registers]
    # Fastest first; among equals the fewest registers (the smallest mu).
    return max(fits, key=lambda mu: (round(macs_per_cycle(mu, vectors), 6), -mu)) if fits else 0


def max_gemv_tiles(tu, vector_registers=16):
    """The most tu-wide tiles qgemv can walk side by side within the registers."""
    v = tu // FLOATS_PER_VECTOR
    return max((nv for nv in range(1, 9) if registers_needed(1, nv * v) <= vector_registers), default=1)


def choose_gemv_tiles(tu, vector_registers=16):
    """How many tu-wide tiles qgemv walks side by side."""
    v = tu // FLOATS_PER_VECTOR
    fits = [nv for nv in range(1, 9) if registers_needed(1, nv * v) <= vector_registers]
    return max(fits, key=lambda nv: (round(macs_per_cycle(1, nv * v), 6), -nv))


def choose_tile(vector_registers=16, max_vectors=8):
    """Return (mu, tu, nv).

    Scored by qgemm speed, then qgemv speed (with its best nv); ties go to a
    tu that divides 128 (real layer widths are multiples of 128, so no
    padded columns), then to the wider tile (fewer streams for qgemv).
    """
    def score(v):
        tu = v * FLOATS_PER_VECTOR
        mu = best_mu(v, vector_registers)
        nv = choose_gemv_tiles(tu, vector_registers)
        return (round(macs_per_cycle(mu, v), 6), round(macs_per_cycle(1, nv * v), 6),
                128 % tu == 0, tu)
    fitting = [v for v in range(1, max_vectors + 1) if best_mu(v, vector_registers)]
    v = max(fitting, key=score)
    tu = v * FLOATS_PER_VECTOR
    return best_mu(v, vector_registers), tu, choose_gemv_tiles(tu, vector_registers)


def block_bytes(bits, mu, mb, tb):
    weights = mb * tb * bits // 8
    activations = mu * mb * 4
    outputs = mu * tb * 4
    return weights + activations + outputs


def choose_block(bits, mu, tu, l1d_bytes, nv=1):
    """tb steps by nv tiles so qgemv never ends a column block on a narrower kernel."""
    budget = int(l1d_bytes * L1_BUDGET)
    step = tu * nv
    best = (MB_UNIT, step)
    for mb in range(MB_UNIT, MAX_MB + 1, MB_UNIT):
        for tb in range(step, MAX_TB + 1, step):
            if block_bytes(bits, mu, mb, tb) > budget:
                continue
            # Prefer the larger block, then the taller one (fewer y reloads).
            if (mb * tb, mb) > (best[0] * best[1], best[0]):
                best = (mb, tb)
    return best


def choose_row_chunk(mu, mb, l2_bytes):
    """Activation rows whose mb-slice fills half of L2: qgemm walks them per column block."""
    rows = int(l2_bytes * L2_BUDGET) // (mb * 4)
    return max(mu, rows // mu * mu)


def gemm_rows(tu, vector_registers=16):
    """Rows of qgemm's float micro-kernel: it multiplies unpacked float weights,
    so it needs rows * V accumulators + V weight vectors + 1 broadcast."""
    v = tu // FLOATS_PER_VECTOR
    return max(1, (vector_registers - 1 - v) // v)


def choose_gemm_rows_per_block(tu, l1d_bytes):
    """mb for qgemm: the unpacked float tile (mb x tu floats) fills L1 (Eq. 3 with
    the tile in float): each call of the float micro-kernel then runs mb steps,
    so its per-call cost (loading and storing y) is spread thinly."""
    mb = l1d_bytes // (tu * 4) // MB_UNIT * MB_UNIT
    return max(MB_UNIT, min(MAX_MB, mb))


def choose(bits, machine):
    _, tu, nv = choose_tile(machine.vector_registers)
    # The model above weighs unpacking in registers against FMAs; qgemm now
    # unpacks a tile once per row chunk (see pyx/qgemm.pyx.tp), so its tile
    # height is set by the registers of the float micro-kernel alone.
    mu = gemm_rows(tu, machine.vector_registers)
    _, tb = choose_block(bits, mu, tu, machine.l1d_bytes, nv)
    mb = choose_gemm_rows_per_block(tu, machine.l1d_bytes)
    nb = choose_row_chunk(mu, mb, machine.l2_bytes)
    return KernelParams(bits=bits, mu=mu, tu=tu, nv=nv, nv_max=max_gemv_tiles(tu, machine.vector_registers),
                        mb=mb, tb=tb, nb=nb,
                        registers_used=mu * (tu // FLOATS_PER_VECTOR) + tu // FLOATS_PER_VECTOR + 1,
                        l1_bytes_used=mb * tu * 4 + mu * mb * 4 + mu * tu * 4)


# The int8-activation qgemv (pyx/snippets/int8_gemv.c.tp) does a few integer
# operations per 32-byte vector of packed words, so one core can outrun its
# share of memory bandwidth; what matters is then how memory is read.
MEMORY_BYTES_PER_CYCLE = 8     # a generous per-core DRAM share (~24 GB/s at 3 GHz)
LOAD_PORTS = 3


def int8_registers_needed(int8, vectors):
    """Registers the inner loop keeps busy over `vectors` vectors of 8 columns:
    per vector the integer sum of the current block; shared, the broadcast
    activation words of one unit (one per slice), the lane mask, the loaded
    word and its masked slice. (y is updated in L1 once per block.) A
    multishift unit (gen/bitlayout.multishift_layout) keeps two sums per
    vector (the interleaved low and high words) and its words, controls and
    activation qwords live."""
    if int8.gathers:
        return 2 * vectors + len(int8.gathers) * 2 + 4
    return vectors + len(int8.slices) + 3


def int8_bytes_per_cycle(int8, vectors):
    """Packed bytes per cycle of the int8 qgemv's inner loop over one unit
    (a 32-byte word vector per 8 columns): per vector a load, per slice a
    shift (not the first) and a mask (not a 16-bit lane's high half), a
    multiply-add and an add; per unit one broadcast per slice."""
    if int8.gathers:   # per vector and gather: 2 interleaves, 2 multishifts, 2 masks, 2 multiply-adds
        gathers = len(int8.gathers)
        words = 1 + max(g.word for g in int8.gathers)
        alu, loads = vectors * gathers * 8, vectors * words + gathers
        return 32 * words * vectors / max(alu / VECTOR_PORTS, loads / LOAD_PORTS)
    slices = len(int8.slices)
    alu = vectors * (sum((s.shift > 0) + (int8.lane_bits == 8 or s.shift == 0) for s in int8.slices)
                     + 2 * slices)
    loads = vectors + slices
    return 32 * vectors / max(alu / VECTOR_PORTS, loads / LOAD_PORTS)


# Tiles side by side in the int8 (and float-limb) qgemv of a layer too large for
# the caches, which each thread reads from memory in runs of ~1 MiB, by CPU vendor.
# On a KVM Xeon with AVX-512 two streams per thread kept more lines in flight than
# one: 11008x4096 4-bit, fraction of the streaming read bandwidth (2 threads, g128
# and full column): one tile 0.84 / 0.70 int8 and 0.78 / 0.82 float limbs, two tiles
# 0.96 / 0.96 and 0.92 / 0.92. On a 2-core KVM Zen 4 one stream is better, most of
# all for short columns: int8 time over the float qgemv's in the same process, builds
# run alternately twice, 2 threads: 11008x4096 4-bit g128 two tiles 0.85 / 0.87, one
# 0.77 / 0.81; SmolLM2's LM head (49152x576, 8-bit g32) two tiles 1.26 / 1.45, one
# 0.81 / 0.99. Layers that fit the caches keep int8_gemv_tiles (SmolLM2 decode with
# two: 359 -> 347 tok/s int8, 302 -> 274 float). Vendors not measured get AMD's.
INT8_STREAM_TILES = {"GenuineIntel": 2}
INT8_STREAM_TILES_DEFAULT = 1


# The float-limb kind keeps two everywhere: on the Zen 4 its 11008x4096 4-bit decode
# took 772 / 692 us with two tiles and 833 / 726 with one (same runs as above).
LIMB_STREAM_TILES = 2


def int8_stream_tiles(machine):
    return INT8_STREAM_TILES.get(machine.vendor, INT8_STREAM_TILES_DEFAULT)


def int8_gemv_tiles(int8, tu, vector_registers=16, max_tiles=4):
    """Tiles the int8 qgemv walks side by side: the fewest whose inner loop
    outruns memory. Tiles are stored one after another, so one tile at a time
    reads each array (words, scales, zeros) front to back, a single stream the
    hardware prefetcher follows across tiles; t tiles side by side read 3t
    streams, each only K*b/8*tu bytes long. (Zen 3, SmolLM2: four tiles of
    576-row 4-bit columns ran 30% slower than one, and decode 98 -> 70 tok/s.)"""
    v = tu // FLOATS_PER_VECTOR
    fits = [t for t in range(1, max_tiles + 1) if int8_registers_needed(int8, t * v) <= vector_registers]
    for t in fits:
        if int8_bytes_per_cycle(int8, t * v) >= MEMORY_BYTES_PER_CYCLE:
            return t
    return max(fits) if fits else 1
