"""``ParallelOuter``: the fallback for what the other rules decline (softmax fused with masking,
gathers, ...): every block's leading spatial loops run in parallel."""

from __future__ import annotations

from tvm.s_tir import dlight

from .analysis import (
    inline_elementwise,
    iter_kinds,
    root_blocks,
    schedule_for,
    simplified,
    static_extent,
)
from .injective import schedule_injective


class ParallelOuter(dlight.ScheduleRule):
    """Fallback (softmax fused with masking, gathers, ...): inline elementwise blocks where TVM
    allows, then run every block's leading spatial loops in parallel and vectorise spatial blocks."""

    def apply(self, func, target, _tunable):
        sch = schedule_for(func, target)
        if sch is None or not root_blocks(sch):
            return None
        inline_elementwise(sch, root_blocks(sch)[-1])
        sch = simplified(sch)
        for block in root_blocks(sch):
            kinds = iter_kinds(sch, block)
            loops = sch.get_loops(block)
            leading = len(kinds) - len(kinds.lstrip("S"))
            if leading == 0 or len(loops) != len(kinds):
                continue
            if leading == len(kinds):
                schedule_injective(sch, block)
                continue
            spatial = sch.fuse(*loops[:leading]) if leading > 1 else loops[0]
            if (static_extent(sch, spatial) or 0) >= 2:
                sch.parallel(spatial)
        return sch
