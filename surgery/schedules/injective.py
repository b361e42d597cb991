"""``Injective``: elementwise / broadcast / transpose / gather kernels: one fused loop, parallel
when large, vectorised inner lanes when the innermost extent allows; transposes are copied in
tiles; a concatenation along the innermost axis is one loop per part. ``schedule_injective`` is
also how the other rules schedule the spatial blocks they leave."""

from __future__ import annotations

import contextlib

from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import collect_vars_used_in_prim_expr

from ..matmul_tiling import VECTOR_LANES
from .analysis import (
    PARALLEL_MIN_ELEMENTS,
    PARTITION_HINT,
    inline_elementwise,
    is_spatial,
    narrowed,
    product,
    root_blocks,
    schedule_for,
    simplified,
    static_extent,
    vectorize_inner,
)
from .compat import PrimExpr, analyzer, dtype_name

TILE = 16  # transposes are copied in TILE x TILE blocks, so reads and writes both stay in cache


def _loads(expr, conditions=()):
    """Every buffer load in ``expr`` with the branch conditions it is read under: a concatenation
    reads each part under ``if_then_else(index < end of part, ...)``."""
    if type(expr).__name__ in ("TensorLoad", "BufferLoad"):
        yield expr, conditions
        return
    op = getattr(getattr(expr, "op", None), "name", "")
    if op.endswith("if_then_else") or isinstance(expr, tirx.Select):
        condition, true_value, false_value = (
            expr.args if op.endswith("if_then_else") else (expr.condition, expr.true_value, expr.false_value)
        )
        yield from _loads(condition, conditions)
        yield from _loads(true_value, (*conditions, condition))
        yield from _loads(false_value, (*conditions, tirx.Not(condition)))
        return
    for field in ("a", "b", "value"):
        child = getattr(expr, field, None)
        if isinstance(child, PrimExpr):
            yield from _loads(child, conditions)
    for child in getattr(expr, "args", None) or ():
        if isinstance(child, PrimExpr):
            yield from _loads(child, conditions)


def _part_starts(value, var, extent: int) -> list[int]:
    """Where a concatenation along ``var`` moves from one part to the next: the first index of
    each part but the first, from the branch conditions ``var`` is compared in (``288 <= c``,
    ``c < 288``, ``c == 287``), sorted. Conditions of other forms add nothing: the parts are
    then fewer (coarser), never wrong, since each part's loop keeps its branches."""
    starts = set()
    for _, conditions in _loads(value):
        for condition in conditions:
            if isinstance(condition, tirx.Not):
                condition = condition.a
            if not isinstance(condition, (tirx.LT, tirx.LE, tirx.GT, tirx.GE, tirx.EQ)):
                continue
            a, b = condition.a, condition.b
            if isinstance(a, tirx.Var) and a.same_as(var) and isinstance(b, tirx.IntImm):
                c, after = b.value, isinstance(condition, (tirx.LE, tirx.GT))  # v <= c, v > c: from c + 1
            elif isinstance(b, tirx.Var) and b.same_as(var) and isinstance(a, tirx.IntImm):
                c, after = a.value, isinstance(condition, (tirx.LT, tirx.GE))
            else:
                continue
            starts.add(c + 1 if after else c)
            if isinstance(condition, tirx.EQ):
                starts.add(c + 1)
    return sorted(s for s in starts if 0 < s < extent)


def _part_lanes(sch: s_tir.Schedule, block) -> int | None:
    """For a block that concatenates along its innermost axis (of at least two), each part whole
    vectors: the vectors' width (16, 8 or 4 floats); else None."""
    stmt = sch.get(block)
    if not isinstance(stmt.body, tirx.BufferStore) or len(stmt.iter_vars) < 2:
        return None
    dom = stmt.iter_vars[-1].dom
    if not isinstance(dom.extent, tirx.IntImm):
        return None
    extent = int(dom.extent)
    starts = _part_starts(stmt.body.value, stmt.iter_vars[-1].var, extent)
    lanes = next((v for v in (VECTOR_LANES, 8, 4) if all(x % v == 0 for x in (extent, *starts))), None)
    return lanes if starts and lanes is not None and extent > lanes else None


def _partition_parts(sch: s_tir.Schedule, block, loop) -> bool:
    """A concatenation along ``loop`` (the block's innermost iterator) in whole vectors, the loop
    over its vectors marked for TVM's ``LoopPartition`` (which runs as the kernel is lowered):
    one loop per part, each reading its part only, the branches between parts decided once per
    loop instead of per element. DenseNet-121's concatenations of up to 25 parts fused with
    batch norm and ReLU (14x14x1024) on a Zen 5 EPYC: 0.72 -> 0.026 ms. Only where every part
    is whole vectors (``_part_lanes``), and the loop's index is 32-bit (``narrowed``): lowering
    narrows 64-bit loops to 32 bits and drops the mark (apache-tvm 0.27). Returns whether it
    marked."""
    lanes = _part_lanes(sch, block)
    if lanes is None or dtype_name(sch.get(loop).loop_var) != "int32":
        return False
    vectors, inner = sch.split(loop, [None, lanes])
    sch.vectorize(inner)
    sch.annotate(vectors, PARTITION_HINT, 1)
    return True


def _as_bound(condition, ranges):
    """``x != c`` where ``c`` is the end of ``x``'s range as ``x < c`` (the other branch of a
    concatenation's ``x == 640``), which the analyzer can use to simplify ``x // 640``."""
    if isinstance(condition, tirx.Not) and isinstance(condition.a, tirx.EQ):
        x, c = condition.a.a, condition.a.b
        if isinstance(c, tirx.IntImm):
            bound = ranges.const_int_bound(x)
            if bound.max_value == c.value:
                return x < c
            if bound.min_value == c.value:
                return x > c
    return condition


def _transposed_axis(sch: s_tir.Schedule, block) -> int | None:
    """For a block whose innermost iterator does not index the last axis of a buffer it loads
    (a transpose: consecutive writes, strided reads), the position of the iterator that does
    index that last axis; else None. Indices are simplified over the iterators' ranges and the
    branch they are read in first (inlined reshapes leave ``(72 * y + x) // 5184 + c`` where
    ``c`` is meant; a concatenation's ``(x // 6400 + c) % 32`` is ``c`` where ``x < 6400``)."""
    stmt = sch.get(block)
    iters = [iv.var for iv in stmt.iter_vars]
    if len(iters) < 2 or not isinstance(stmt.body, tirx.BufferStore):
        return None
    ranges = analyzer()
    for iv in stmt.iter_vars:
        ranges.bind(iv.var, iv.dom)
    for load, conditions in _loads(stmt.body.value):
        if len(load.indices) < 2:
            continue
        with contextlib.ExitStack() as scope:
            for condition in conditions:
                scope.enter_context(ranges.constraint_scope(_as_bound(condition, ranges)))
            last = collect_vars_used_in_prim_expr(ranges.simplify(load.indices[-1]))
        if iters[-1] in last:
            continue
        for position, var in enumerate(iters[:-1]):
            if var in last:
                return position
    return None


def schedule_injective(sch: s_tir.Schedule, block, partition_parts: bool = False) -> None:
    """Schedule one spatial block; with ``partition_parts``, a concatenation along its innermost
    axis as one loop per part (``_partition_parts``)."""
    loops = sch.get_loops(block)
    if not loops:
        return
    extents = [static_extent(sch, loop) for loop in loops]
    if None in extents:
        return
    total = product(extents)
    unfused = len(loops) == len(sch.get(block).iter_vars)
    across = _transposed_axis(sch, block) if unfused else None
    if across is not None and extents[across] >= 8 and extents[-1] >= 8:
        # copy in tiles of (read-contiguous axis, write-contiguous axis): both stay in cache
        tile = next((t for t in (TILE, 8) if extents[across] % t == 0 and extents[-1] % t == 0), TILE)
        ro, ri = sch.split(loops[across], [None, tile])
        co, ci = sch.split(loops[-1], [None, tile])
        others = [loop for i, loop in enumerate(loops[:-1]) if i != across]
        sch.reorder(*others, ro, co, ri, ci)
        tiles = sch.fuse(*others, ro, co)
        if total >= PARALLEL_MIN_ELEMENTS:
            sch.parallel(tiles)
        sch.unroll(ci)
        return
    # Outer loops fused and run in parallel; the innermost loop (contiguous writes) vectorised.
    *outer, inner = loops
    lanes = next((v for v in (VECTOR_LANES, 8) if extents[-1] % v == 0), None)
    if outer:
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        if total >= PARALLEL_MIN_ELEMENTS and (static_extent(sch, fused) or 0) >= 2:
            sch.parallel(fused)
    elif total >= PARALLEL_MIN_ELEMENTS and lanes:
        chunk, inner = sch.split(inner, [None, 4096 if extents[-1] % 4096 == 0 else lanes * 64])
        sch.parallel(chunk)
    if outer and unfused and partition_parts and _partition_parts(sch, block, inner):
        return
    if lanes:
        vectorize_inner(sch, inner, lanes)


class Injective(dlight.ScheduleRule):
    """Kernels of spatial blocks only: inline into the last, fuse, parallel when large, vectorise."""

    def apply(self, func, target, _tunable):
        sch = schedule_for(func, target)
        if sch is None:
            return None
        blocks = root_blocks(sch)
        if not blocks or not all(is_spatial(sch, b) for b in blocks):
            return None
        inline_elementwise(sch, blocks[-1])
        sch = simplified(sch)
        if any(_part_lanes(sch, b) and _transposed_axis(sch, b) is None for b in root_blocks(sch)):
            sch = narrowed(sch)  # 32-bit loops: see _partition_parts
        for block in root_blocks(sch):
            schedule_injective(sch, block, partition_parts=True)
        return sch
