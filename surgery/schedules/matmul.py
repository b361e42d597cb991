"""``Matmul``: a kernel whose one reduction block is ``C[..., i, j] += A[..., i, k] * B[..., k, j]``
(matmul, batched matmul, dense with a pre-transposed weight). Register-blocked micro-kernel
planned by ``surgery.matmul_tiling.plan_matmul`` (tile ``mr x nr`` from the FMA/load/latency
balance within the vector registers, loop order reading the larger operand once, reduction split
across threads when a column panel outgrows L2, a left-hand side shared by panels cut into
blocks of rows when it outgrows the cache): accumulators in a local buffer, ``nr``
vectorised over the output's contiguous axis, the reduction loop outside them, parallel over the
tiles; elementwise producers are inlined into it and elementwise consumers fused into its
write-back."""

from __future__ import annotations

import math

import tvm
from tvm import tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import collect_vars_used_in_prim_expr
from tvm.target import codegen

from ..matmul_tiling import (
    AVX2_LANES,
    AVX2_REGISTERS,
    L2_PANEL_BYTES,
    VECTOR_LANES,
    VECTOR_REGISTERS,
    plan_matmul,
    row_block,
)
from .analysis import (
    inline_consumers,
    inline_elementwise,
    is_mul_add,
    is_scheduled,
    is_spatial,
    iter_kinds,
    product,
    reduction_blocks,
    root_blocks,
    schedule_for,
    simplified,
    static_extent,
    target_threads,
    vectorize_inner,
)
from .fma import FMA_ANNOTATION, contraction_safe
from .injective import schedule_injective

PARALLEL_MIN_MACS = 1 << 17  # below this many multiply-adds a thread-pool launch costs more than it saves


def vector_registers(target) -> tuple[int, int]:
    """(registers, float lanes of each) of the target's CPU: 32 of 16 with AVX-512 (zmm0-31), 16
    of 8 on an AVX2-only CPU (ymm0-15), where tiles are planned smaller so as not to spill."""
    host = tvm.target.Target({"kind": "llvm", "mcpu": str(target.attrs.get("mcpu", codegen.llvm_get_system_cpu()))})
    try:
        wide = codegen.target_has_features("avx512f", host)
    except Exception:  # noqa: BLE001 - not an x86 target: assume the wide register file
        wide = True
    return (VECTOR_REGISTERS, VECTOR_LANES) if wide else (AVX2_REGISTERS, AVX2_LANES)


def _batch_axes_of_rows(stmt) -> list[bool]:
    """For each batch axis, whether the product's A (the operand read along i and k, not j)
    is indexed by it; A indexed by none is the same for every batch (the panels of a packed
    weight share it)."""
    *batch, i, j, _ = [iv.var for iv in stmt.iter_vars]
    for read in stmt.reads:
        used = [v for r in read.region for v in collect_vars_used_in_prim_expr(r.min)]
        if any(v.same_as(i) for v in used) and not any(v.same_as(j) for v in used):
            return [any(v.same_as(b) for v in used) for b in batch]
    return [True] * len(batch)


def finish_register_tile(sch, block, reduction, accumulator, tile_loops, contractible: bool) -> None:
    """The register tile's last steps, the same for every rule that builds one: its rows and
    vector groups unrolled and its lanes vectorised (``tile_loops``), FMA allowed where
    ``contractible``, the reduction's initialisation split off at ``reduction`` (last: TVM only
    vectorises complete reduction blocks) and vectorised, and the write-back vectorised."""
    rows, vector_groups, lanes = tile_loops
    sch.unroll(rows)
    sch.unroll(vector_groups)
    sch.vectorize(lanes)
    if contractible:
        sch.annotate(block, FMA_ANNOTATION, 1)
    init = sch.decompose_reduction(block, reduction)
    sch.vectorize(sch.get_loops(init)[-1])
    # the write-back in the tile's own vectors (24 columns: three of 8, where 16-float ones
    # leave it scalar and, small enough not to run in parallel, unscheduled)
    write_back = sch.get_loops(accumulator)[-1]
    vectorize_inner(sch, write_back, math.gcd(static_extent(sch, write_back) or VECTOR_LANES, VECTOR_LANES))


def schedule_remaining_spatial(sch) -> None:
    """Spatial blocks a rule left as loop nests of their own (a padding copy, a slice after a
    product) get the injective schedule."""
    for block in root_blocks(sch):
        if is_spatial(sch, block) and not is_scheduled(sch, block):
            schedule_injective(sch, block)


def _shared_evenly(tasks: int, threads: int) -> bool:
    """Whether ``tasks`` parallel tasks keep ``threads`` threads about equally busy: a multiple
    of them, or at least 8 each."""
    return tasks % threads == 0 or tasks >= 8 * threads


class Matmul(dlight.ScheduleRule):
    """``C[..., i, j] (+)= A[..., i, k] * B[..., k, j]``: register-blocked, vectorised over j,
    parallel over tiles (or over parts of the reduction), laid out by ``plan_matmul``."""

    def apply(self, func, target, _tunable):
        sch = schedule_for(func, target)
        if sch is None:
            return None
        reductions = reduction_blocks(sch)
        if len(reductions) != 1:
            return None
        block = reductions[0]
        kinds = iter_kinds(sch, block)
        stmt = sch.get(block)
        if kinds.rstrip("R") != "S" * kinds.count("S") or kinds.count("R") != 1 or kinds.count("S") < 2:
            return None
        if len(stmt.reads) < 2 or not isinstance(stmt.body, tirx.BufferStore) or not is_mul_add(stmt.body):
            return None
        if any(not is_spatial(sch, b) for b in root_blocks(sch) if not sch.get(b).same_as(stmt)):
            return None
        contractible = contraction_safe(func)
        inline_elementwise(sch, block)
        sch = simplified(sch)
        block = reduction_blocks(sch)[0]
        loops = sch.get_loops(block)
        if len(loops) != len(kinds):
            return None
        extents = [static_extent(sch, loop) for loop in loops]
        if None in extents[-3:]:
            return None
        *batch_extents, rows, cols, depth = extents
        # a batch known only at run time (a Winograd convolution of Mask R-CNN's boxes) is
        # counted as 2, and a program's A is then never taken as shared by all of it
        dynamic = None in batch_extents
        batch_extents = [2 if e is None else e for e in batch_extents]
        extents = [*batch_extents, rows, cols, depth]
        # Every batch reads the same A (the panels of a packed weight) and all of B is within
        # the L2 budget: a row tile of A then serves every panel while it is in cache, and A is
        # read from memory once rather than once per panel (2-core EPYC, 512 KB L2, best of 21:
        # 25600x576 @ 576x64 56 -> 65 GMAC/s, 6400x1152 @ 1152x128, 590 KB of B, 64 -> 72; with
        # 9 MB of B, 400x4608 @ 4608x512, it was slower in one run, 51 -> 38).
        by_rows = _batch_axes_of_rows(sch.get(block))
        shared_rows = bool(batch_extents) and not dynamic and not any(by_rows)
        batch_inside = shared_rows and 4 * product(batch_extents) * depth * cols <= L2_PANEL_BYTES
        threads = target_threads(target)
        registers, lanes = vector_registers(target)
        plan = plan_matmul(product(batch_extents), rows, cols, depth, threads, registers, lanes)
        if plan is None:
            return None
        if plan.k_parts > 1:
            block, final = self._split_reduction(sch, block, plan.k_parts)
        else:
            final = None
        *outer, i, j, k = sch.get_loops(block)
        io, ii = sch.split(i, [None, plan.mr])
        jo, jv = sch.split(j, [None, plan.nr])
        jvo, jvi = sch.split(jv, [None, math.gcd(plan.nr, VECTOR_LANES)])  # whole vectors
        tile_order = [jo, io] if plan.j_major else [io, jo]
        serial = 0  # the innermost tile loops that run in order inside each parallel task
        panels = [e for e, used in zip(batch_extents, by_rows) if not used]
        if final is None and batch_inside and not plan.j_major:
            # each parallel task one row tile, running the panels in order (as below): a packed
            # weight's product alone, interleaved, 8400 x 256 @ 256 x 256 2.96 -> 2.46 ms, 3136 x
            # 96 @ 96 x 384 0.63 -> 0.50; 1024 columns and 197 x 768 @ 768 x 768 within 1%
            if _shared_evenly(rows // plan.mr, threads):
                serial = len(outer) + 1
            tile_order, outer = [io, *outer, jo], []
        elif (
            final is None
            and not plan.j_major
            and any(by_rows)
            and panels
            and 4 * product(panels) * depth * cols <= L2_PANEL_BYTES
        ):
            # the batch axes A is not read along (the panels of a packed weight, per Winograd
            # position) run inside the row tiles: a row tile of A serves every panel from L1
            tile_order = [
                *[o for o, u in zip(outer, by_rows) if u],
                io,
                *[o for o, u in zip(outer, by_rows) if not u],
                jo,
            ]
            outer = []
            # and a parallel task is one row tile, running the panels in order, where there are
            # enough such tasks to share evenly among the threads. On the Zen 5 EPYC, kernel
            # tables of interleaved builds, with the panels among the parallel tasks -> in order:
            # Winograd products, RT-DETR's [16, 1610, 128] @ [16, 4, 128, 32] 19.0 -> 15.7 ms a
            # call, Mask R-CNN's [16, 13608, 256] @ [16, 8, 256, 32] 77.5 -> 67.1, the mask
            # head's 99.8 -> 95.8; the same numbers. The gain is the two threads': a hand-written
            # kernel of the same loops, single-threaded, ran 4% slower in order (cause not found).
            if _shared_evenly(product(b for b, u in zip(batch_extents, by_rows) if u) * (rows // plan.mr), threads):
                serial = len(panels) + 1
        elif final is None and shared_rows and not plan.j_major and row_block(rows, depth, plan.mr):
            # A outgrows the cache and all of B outgrows L2: panel by panel, A came from memory
            # once per panel. A block of rows serves every panel from cache instead, B's panels
            # re-read from the shared cache once per block (2-core EPYC, interleaved: 19600x2304
            # shared by 16 panels of 2304x16, Mask R-CNN's mask head, 50-64 -> 70-79 GMAC/s;
            # 3400x2304 by 16, 60 -> 72; with A in cache, 400x4608 by 32, blocks were slower,
            # 66 -> 53).
            ib, io = sch.split(io, [None, row_block(rows, depth, plan.mr)])
            tile_order, outer = [ib, *outer, io, jo], []
        sch.reorder(*outer, *tile_order, k, ii, jvo, jvi)
        accumulator = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(accumulator, tile_order[-1], preserve_unit_loops=True)
        if final is None:
            inline_consumers(sch, accumulator)
            tiles = sch.fuse(*outer, *tile_order[: len(tile_order) - serial])
            if product(extents) >= PARALLEL_MIN_MACS:
                sch.parallel(tiles)
        else:
            # the reduction's parts are the parallel loop; each part's tiles run in order
            sch.parallel(outer[0])
        finish_register_tile(sch, block, k, accumulator, (ii, jvo, jvi), contractible)
        if final is not None:
            self._schedule_sum_of_parts(sch, final)
        schedule_remaining_spatial(sch)
        return sch

    @staticmethod
    def _split_reduction(sch, block, parts: int):
        """``rfactor``: part p of the reduction into ``C_rf[p, ...]``, then ``C = sum_p C_rf[p]``."""
        *outer, i, j, k = sch.get_loops(block)
        ko, ki = sch.split(k, [parts, None])
        sch.reorder(ko, *outer, i, j, ki)
        partial = sch.rfactor(ko, 0)
        return partial, block

    def _schedule_sum_of_parts(self, sch, final) -> None:
        """``C[..., i, j] = sum_p C_rf[p, ..., i, j]``: parallel over rows, the parts inside, j
        vectorised; elementwise consumers fused into it."""
        inline_consumers(sch, final)
        ko, *rest = sch.get_loops(final)
        *outer, j = rest
        sch.reorder(*outer, ko, j)
        rows = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        sch.parallel(rows)
        vectorize_inner(sch, j)
        sch.decompose_reduction(final, ko)  # after vectorising: its init copies the vector loop
        for block in root_blocks(sch):
            if is_spatial(sch, block) and sch.get(sch.get_loops(block)[0]).same_as(sch.get(rows)):
                vectorize_inner(sch, sch.get_loops(block)[-1])
