"""``RowReduction``: softmax / layer norm and their fused masking, or a lone row sum: parallel
rows, each reduction split into 16 partial sums (``rfactor``; fewer, down to 4, where 16 does not
divide the row: RT-DETR's 300 queries) and vectorised, single-use
elementwise steps computed where they are read. dlight's own ``cpu.Reduction`` runs after it for
what it declines."""

from __future__ import annotations

import math

from tvm.s_tir import dlight

from ..matmul_tiling import VECTOR_LANES
from .analysis import (
    PARALLEL_MIN_ELEMENTS,
    is_spatial,
    iter_kinds,
    product,
    root_blocks,
    schedule_for,
    simplified,
    static_extent,
    vectorize_inner,
)
from .fma import FMA_ANNOTATION, contraction_safe

MIN_LANES = 4  # fewer partial sums than this barely shorten the chain of dependent adds


class RowReduction(dlight.ScheduleRule):
    """Softmax, layer norm and their fused masking, or a lone row sum: blocks over the same rows,
    some reducing along the row. Each reduction is split into 16 partial accumulators (``rfactor``) so it
    vectorises instead of waiting on one add's latency per element; then every block moves
    under one parallel loop over the rows and the elementwise blocks are vectorised."""

    def apply(self, func, target, _tunable):
        sch = schedule_for(func, target)
        if sch is None:
            return None
        blocks = root_blocks(sch)
        kinds = [iter_kinds(sch, b) for b in blocks]
        lone = len(blocks) == 1  # a row sum on its own (attention's row sums of probabilities)
        if not blocks or not any("R" in k for k in kinds) or ("R" in kinds[-1] and not lone):
            return None
        leading = min(len(k) - len(k.lstrip("S")) for k in kinds)
        if leading == 0 or any(k.count("R") > 1 or (("R" in k) and not k.endswith("R")) for k in kinds):
            return None
        # partial sums a row splits into: the most lanes (up to a vector's) dividing every row
        lanes = VECTOR_LANES
        for block, k in zip(blocks, kinds):
            if "R" in k:
                extent = static_extent(sch, sch.get_loops(block)[-1])
                if extent is None:
                    return None  # rows of a length known only at run time: the next rule's
                lanes = math.gcd(lanes, extent)
        if lanes < MIN_LANES:
            return None  # rows that do not split into vectors: leave to the next rule
        contractible = contraction_safe(func)
        # an elementwise step read once (x - max, the masking after the division) is computed
        # where it is read instead of through a row-sized buffer
        for block in blocks[:-1]:
            if is_spatial(sch, block) and len(sch.get_consumers(block)) == 1:
                try:
                    sch.compute_inline(block)
                except Exception:  # noqa: BLE001 - TVM refuses: keep it as its own loop
                    pass
        sch = simplified(sch)
        blocks = root_blocks(sch)
        kinds = [iter_kinds(sch, b) for b in blocks]
        for block, k in zip(list(blocks), kinds):
            if "R" not in k:
                continue
            reduce_loop = sch.get_loops(block)[-1]
            _, partial = sch.split(reduce_loop, [None, lanes])
            sch.rfactor(partial, factor_axis=len(k) - 1)
        blocks = root_blocks(sch)
        last = blocks[-1]
        loops = sch.get_loops(last)
        elements = product(static_extent(sch, loop) or 1 for loop in loops)
        rows = sch.fuse(*loops[:leading]) if leading > 1 else loops[0]
        if elements >= PARALLEL_MIN_ELEMENTS:
            sch.parallel(rows)  # a few short rows (6 prompt tokens' layer norm) run faster alone
        for block in reversed(blocks[:-1]):
            sch.compute_at(block, rows, preserve_unit_loops=True)
        for block in root_blocks(sch):
            inner = sch.get_loops(block)[-1]
            if sch.get(inner).same_as(sch.get(rows)):
                continue
            kind = iter_kinds(sch, block)
            if "R" not in kind:
                extent = static_extent(sch, inner)  # None: known only at run time
                vectorize_inner(sch, inner, lanes if extent and extent % VECTOR_LANES else VECTOR_LANES)
            elif sch.get(block).name_hint.endswith("_rf"):
                # partial accumulators of an rfactor block: the lanes innermost, one vector
                below = [lp for lp in sch.get_loops(block) if not sch.get(lp).same_as(sch.get(rows))]
                vector = [lp for lp in below if static_extent(sch, lp) == lanes]
                steps = [lp for lp in below if (static_extent(sch, lp) or 1) > 1 and lp not in vector]
                if vector and len(steps) == 1:
                    try:
                        sch.reorder(steps[0], vector[-1])
                        sch.vectorize(vector[-1])
                    except Exception:  # noqa: BLE001 - stays scalar, still independent chains
                        pass
        if contractible:
            sch.annotate(root_blocks(sch)[-1], FMA_ANNOTATION, 1)
        return sch
