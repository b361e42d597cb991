"""``ColumnReduction``: a reduction over leading axes that keeps the innermost one, ``out[..., c] =
out[..., c] (+, max) f(...)[..., r, c]`` with ``c`` the last index of the output and of every
read that uses it (ROI pooling's weighted sum of a bin's taps, each tap a row of channels; a
channels-last max pool's window).

The fallback rule runs such a sum one output element at a time, reduction innermost: scalar,
each tap's row read one float per pass (Mask R-CNN's mask pooling, 100x14x14 bins of 16 taps
of 256 channels, its taps gathered in the same kernel: 23 ms). Here the leading kept axes run
in parallel, the reduction inside them, and the innermost axis, contiguous in the output and
in the rows read, in vectors: each tap's row is read once, as whole vectors, into the bin's
output row, which stays in L1 (100 boxes pooled 14x14 from one 256 x 200x272 map: 27 -> 22 ms
on a Zen 5 EPYC). Each output element still combines its terms in the order of the reduction
axes, as before.

A global average pool over a channels-last map (squeeze-and-excitation's mean, one image) has
no leading rows to share among cores: its vectors of channels are shared instead, each summed
over the whole map and divided in the same task. dlight's reduction rule, which took these,
summed one channel at a time with strided scalar loads (EfficientNet-B0's eleven means: 0.75 ->
0.13 ms a call on a Zen 5 EPYC).
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import collect_vars_used_in_prim_expr

from ..matmul_tiling import AVX2_LANES
from .analysis import (
    inline_elementwise,
    is_spatial,
    iter_kinds,
    one_value_per_element,
    reduction_blocks,
    root_blocks,
    schedule_for,
    simplified,
    static_extent,
    target_threads,
    vectorize_inner,
)
from .compat import region_buffer

# vectors of the target the kernel is compiled for without FMA (AVX2 on x86: 8 floats)
_LANES = AVX2_LANES


def _uses(expr, var) -> bool:
    return any(v.same_as(var) for v in collect_vars_used_in_prim_expr(expr))


def _innermost_only(indices, var) -> bool:
    """``var`` is the last index and no other index uses it."""
    *outer, last = indices
    return isinstance(last, tirx.Var) and last.same_as(var) and not any(_uses(i, var) for i in outer)


class ColumnReduction(dlight.ScheduleRule):
    """Parallel over the leading kept axes, then the reduction, then the innermost kept axis in
    vectors, the output accumulated in place. Where the leading axes are too few to share out
    (a global average pool: one image), the vectors of the innermost axis are shared out
    instead, and an elementwise step after the reduction (the mean's division) runs on each
    vector as it is finished."""

    def apply(self, func, target, _tunable):
        sch = schedule_for(func, target)
        if sch is None:
            return None
        reductions = reduction_blocks(sch)
        if len(reductions) != 1:
            return None
        inline_elementwise(sch, reductions[0])
        sch = simplified(sch)
        blocks, reductions = root_blocks(sch), reduction_blocks(sch)
        if len(reductions) != 1 or len(blocks) > 2:
            return None
        block = reductions[0]
        epilogue = next((b for b in blocks if not sch.get(b).same_as(sch.get(block))), None)
        # after the sum, at most one step of one value per sum (the mean's division), which
        # then runs on each part of the output as it is finished
        if epilogue is not None and not (is_spatial(sch, epilogue) and one_value_per_element(sch, epilogue, block)):
            return None
        stmt = sch.get(block)
        kinds = iter_kinds(sch, block)
        kept = len(kinds) - len(kinds.lstrip("S"))
        loops = sch.get_loops(block)
        if kept < 2 or kinds[kept:] != "R" * (len(kinds) - kept) or len(loops) != len(kinds):
            return None
        if not isinstance(stmt.body, tirx.BufferStore):
            return None
        column = stmt.iter_vars[kept - 1].var
        if not _innermost_only(stmt.body.indices, column):
            return None
        for read in stmt.reads:
            mins = [r.min for r in read.region]
            if region_buffer(read).same_as(region_buffer(stmt.writes[0])):
                continue
            if any(_uses(m, column) for m in mins) and not _innermost_only(mins, column):
                return None
        width = static_extent(sch, loops[kept - 1])
        if width is None or width % _LANES != 0:
            return None
        outer = sch.fuse(*loops[: kept - 1]) if kept > 2 else loops[0]
        threads, rows = target_threads(target), static_extent(sch, outer) or 0
        if rows >= 4 * threads and epilogue is None:
            sch.reorder(outer, *loops[kept:], loops[kept - 1])
            sch.parallel(outer)
            vectorize_inner(sch, loops[kept - 1], _LANES)
        elif rows * (width // _LANES) >= 2 * threads:
            vectors, lanes = sch.split(loops[kept - 1], [None, _LANES])
            sch.reorder(outer, vectors, *loops[kept:], lanes)
            shared = sch.fuse(outer, vectors)
            sch.parallel(shared)
            sch.vectorize(lanes)
            if epilogue is not None:
                try:
                    sch.reverse_compute_at(epilogue, shared)
                except Exception:  # noqa: BLE001 - TVM refuses (the step reads other parts)
                    return None
                vectorize_inner(sch, sch.get_loops(epilogue)[-1], _LANES)
        else:
            return None
        # last: TVM vectorises a reduction block only while it still holds its initialisation
        init = sch.decompose_reduction(block, loops[kept])
        vectorize_inner(sch, sch.get_loops(init)[-1], _LANES)
        return sch
