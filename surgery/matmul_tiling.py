"""The register tile and loop order of our CPU matmul kernel, in plain Python.

The Matmul schedule rule (``surgery.schedules.matmul``) lays its kernels out by ``plan_matmul``,
and the ``matmul_packing`` rewrite packs a product's right-hand side into panels exactly one tile
wide, so both read the plan from here. Nothing here imports TVM: the rewrites must not.
"""

from __future__ import annotations

import dataclasses
import math

VECTOR_LANES = 16  # float32 lanes of the vectors the kernels are written in (one AVX-512 register)
VECTOR_REGISTERS = 32  # AVX-512 has zmm0-zmm31
MAX_ACCUMULATORS = 28  # of them, at most this many hold a register tile's accumulators
# An AVX2-only CPU has 16 registers of 8 lanes: LLVM splits each 16-lane vector into two.
AVX2_REGISTERS, AVX2_LANES = 16, 8
MIN_LANES = 4  # the narrowest vector a tile is built of (SSE's 4 floats, on every x86-64)
FMA_LATENCY = 4  # cycles: one k step of a tile takes at least this long
# A column panel of B that every row tile re-reads should stay in L2 (1-2 MiB per core on the
# x86 servers we measured): beyond this the reduction is split across threads instead.
L2_PANEL_BYTES = 768 * 1024
# A left-hand side shared by many column panels stays in the shared cache across them up to
# about this size (32 MB of L3 on the 2-core EPYC, shared with the other core and with B); a
# larger one is cut into blocks of rows of this many bytes, each serving every panel in turn.
A_CACHED_BYTES = 8 * 1024 * 1024
ROW_BLOCK_BYTES = 256 * 1024
# An x86 L1 data cache maps an address to one of 64 sets of 64-byte lines (4 KB apart repeat the
# set) and holds this many lines per set at the fewest (AMD's 32 KB L1s, 8-way; Intel's 48 KB
# ones are 12-way). A register tile reads one line of each of its ``mr`` rows of A per k step;
# rows whose stride is a multiple of 4 KB all fall in one set, and more of them than it holds
# evict each other on every step. On AVX2 that halves the tile's speed (13 x 2048 @ 2048 x 256
# on a Zen 1 EPYC: 13 x 8 tiles 13.7 G multiply-adds a second, 29.3 with rows of 2064; 1 x 32
# tiles 30.0), so AVX2 tiles keep their rows within the set's lines. On AVX-512 the refills cost
# less than any tile that avoids them (the same product on a Zen 5 EPYC, 48 KB 12-way L1: 13 x 32
# tiles 0.038 ms, 13 x 16 0.053, 1 x 128 0.140; over 1024-float rows 6 x 64 against 12-14 x 32
# within 5% either way), and its tiles are planned without the limit.
L1_WAYS = 8
L1_SETS, LINE_BYTES = 64, 64


@dataclasses.dataclass(frozen=True)
class MatmulPlan:
    """How the Matmul rule lays out one ``C[..., i, j] += A[..., i, k] * B[..., k, j]``.

    ``mr x nr`` is the register tile (``mr`` rows of A broadcast, ``nr`` floats of B per k step),
    ``j_major`` runs the column tiles outside the row tiles (B's panel is reused from cache across
    rows: the larger operand is read once), and ``k_parts > 1`` splits the reduction
    across threads (``rfactor``) when the tiles are too few to share out, or when one column
    panel of B is too large to stay in a core's L2 while every row tile re-reads it."""

    mr: int
    nr: int
    j_major: bool
    k_parts: int


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def rows_per_cache_set(mr: int, depth: int) -> int:
    """How many of a tile's ``mr`` rows of a row-major ``A [rows, depth]`` (float32) share one L1
    set at most: their lines repeat the set every ``L1_SETS / gcd`` rows. A stride that is no
    whole number of lines straddles lines and spreads over the sets: counted as one row each."""
    stride = 4 * depth
    if stride % LINE_BYTES:
        return 1
    sets = L1_SETS // math.gcd(stride // LINE_BYTES % L1_SETS, L1_SETS)
    return -(-mr // sets)


def tile_rating(mr: int, b_registers: int) -> tuple[float, int]:
    """How a register tile of ``mr`` rows by ``b_registers`` of B's registers rates: the share
    of a k step's cycles that are FMAs (one per accumulator, two issue per cycle; ``mr``
    broadcasts plus ``b_registers`` loads, two per cycle; at least one FMA latency), then its
    accumulators."""
    accumulators = mr * b_registers
    fma = accumulators / 2
    return round(fma / max(fma, (mr + b_registers) / 2, FMA_LATENCY), 3), accumulators


def plan_matmul(
    batch: int,
    rows: int,
    cols: int,
    depth: int,
    threads: int,
    registers: int = VECTOR_REGISTERS,
    lanes: int = VECTOR_LANES,
) -> MatmulPlan | None:
    """The register tile and loop order for a (batched) ``rows x depth @ depth x cols`` product
    on a CPU with ``registers`` vector registers of ``lanes`` floats, or None when ``cols`` does
    not split into whole vectors of at least ``MIN_LANES`` floats.

    A tile is ``mr`` rows by ``nv`` registers of ``lanes`` floats (16-float vectors on AVX-512;
    on AVX2 8-float ones, so that a few rows that share no divisor with 6, such as 13 queries,
    still fit one tile). Per k step it costs one FMA per accumulator (two issue per cycle),
    ``mr`` broadcasts of A plus ``nv`` loads of B (two per cycle) and at least one FMA latency (4
    cycles); the tile with the best FMA share of those cycles wins, then the one with more
    accumulators, then the taller (measured on SAM3's attention products with AVX-512: 12 x 32
    beats 6 x 64 and 4 x 96 by 5-15%). Accumulators plus B's registers stay within the register
    file, two spare (on AVX2: 6 x 16, 12 of its 16 registers, as BLIS's kernels), and on AVX2
    no more rows than share one L1 set (``rows_per_cache_set``: 13 rows of 2048 floats take
    1 x 32 tiles there, 13 x 32 on AVX-512; ``L1_WAYS``)."""
    # Floats per register of the tile's width: the widest vector that splits the columns into
    # whole registers (300 attention columns take 4-float ones: a quarter of AVX-512's width, far
    # better than no vectors at all).
    unit = min(lanes, VECTOR_LANES)
    while unit > MIN_LANES and cols % unit:
        unit //= 2
    tiles = []
    for nv in range(1, 8 * VECTOR_LANES // unit + 1):
        if cols % (nv * unit):
            continue
        b_registers = nv
        for mr in _divisors(rows, 16):
            if lanes < VECTOR_LANES and rows_per_cache_set(mr, depth) > L1_WAYS:
                continue  # its rows of A would evict each other from L1 on every k step
            accumulators = mr * b_registers
            if accumulators > min(MAX_ACCUMULATORS, registers - 3) or accumulators + b_registers > registers - 2:
                continue
            tiles.append((*tile_rating(mr, b_registers), mr, nv))
    if not tiles:
        return None
    # Few rows (a vector-matrix product, memory-bound): one tile as tall as all of them, so each
    # panel of B is read once rather than once per row tile.
    whole = [t for t in tiles if t[2] == rows and t[0] >= 0.75]
    _, _, mr, nv = max(whole, key=lambda t: (t[0], t[3])) if whole else max(tiles)
    nr = nv * unit
    row_tiles, col_tiles = rows // mr, cols // nr
    a_bytes, b_bytes = 4 * rows * depth, 4 * depth * cols
    j_major = col_tiles > 1 and row_tiles > 1 and b_bytes >= a_bytes
    tasks = batch * row_tiles * col_tiles
    k_parts = 1
    panel = 4 * depth * nr  # one column panel of B, re-read by every row tile
    if (
        threads > 1
        and depth >= 64 * threads
        and depth % threads == 0
        and (tasks < threads or (col_tiles == 1 and row_tiles > 1 and panel > L2_PANEL_BYTES))
    ):
        k_parts = threads
    return MatmulPlan(mr, nr, j_major, k_parts)


def padded_columns(cols: int, lanes: int = VECTOR_LANES) -> int:
    """The columns a product with a weight of ``cols`` columns is computed with: ``cols``, or the
    next whole number of the CPU's ``lanes``-float vectors where the zero columns add at most an
    eighth. Otherwise the register tile is built of 4- or 8-float vectors: on a 2-core Zen 5 EPYC
    (AVX-512), interleaved kernel times, ShuffleNetV2's 1x1 convolutions as products, 196 x 116 @
    116 x 116 48.2 us in tiles of 4 floats, 13.8 padded to 128 columns; 784 rows 193 -> 52; 49 x
    232 @ 232 x 232 27.5 in tiles of 8, 12.1 padded to 240. Where padding adds more (24 -> 32
    columns, a third) it gained nothing (36.5 -> 38.0 us over 3136 rows). Columns that fill no
    4-float vector (91 classes) are padded the same way, so the weight is packed into panels: left
    to ``pad_matmul_columns`` (padded, not packed), Mask R-CNN's mask logits, 78400 x 256 @ 256 x
    91, ran in 14 x 32 tiles over a row-major weight, 12.4 ms a call against 10.6 packed (kernel
    tables of interleaved builds, medians of 6 rounds, same Zen 5)."""
    extra = -cols % lanes
    if not extra or 8 * extra > cols:
        return cols
    return cols + extra


# A register tile of fewer rows reads B faster than the FMAs use it: each k step loads ``nr``
# floats of B (from L2 once its panel outgrows L1) for ``mr * nr`` multiply-adds.
MIN_TILE_ROWS = 4


def padding_candidates(rows: int) -> range:
    """The row counts a product of ``rows`` rows may be padded to, ``rows`` first: fewer than 16
    more, at most ~3% (7 more at the fewest rows)."""
    return range(rows, rows + min(16, rows // 32 + 7))


def padded_rows(
    batch: int, rows: int, cols: int, depth: int, registers: int = VECTOR_REGISTERS, lanes: int = VECTOR_LANES
) -> int:
    """The rows a ``rows x depth @ depth x cols`` product is computed with: ``rows``, or a few
    more (zero rows whose results are dropped: fewer than 16, at most ~3%) where ``rows`` admits
    only register tiles of fewer than ``MIN_TILE_ROWS`` rows and the padded count does not. A
    prime count past 16 (ViT's 197 tokens) otherwise gets 1-row tiles. The least such count;
    ``rows`` itself when none is near or a tile holds all the rows (a vector-matrix product)."""
    plan = plan_matmul(batch, rows, cols, depth, 1, registers, lanes)
    if plan is None or plan.mr >= MIN_TILE_ROWS or plan.mr == rows:
        return rows
    for padded in padding_candidates(rows)[1:]:
        wider = plan_matmul(batch, padded, cols, depth, 1, registers, lanes)
        if wider is not None and wider.mr >= MIN_TILE_ROWS:
            return padded
    return rows


def row_block(rows: int, depth: int, mr: int) -> int | None:
    """Row tiles per block for a left-hand side ``A [rows, depth]`` that many column panels
    share, or None when A stays in the shared cache (``A_CACHED_BYTES``) across them. A block
    holds about ``ROW_BLOCK_BYTES`` of A, a whole number of blocks covers the rows; rows whose
    tile count has no divisor near that size are left unblocked."""
    if 4 * rows * depth <= A_CACHED_BYTES:
        return None
    row_tiles, wanted = rows // mr, max(1, ROW_BLOCK_BYTES // (4 * depth * mr))
    tiles = max(d for d in range(1, min(wanted, row_tiles) + 1) if row_tiles % d == 0)
    return tiles if tiles < row_tiles and 2 * tiles >= wanted else None
