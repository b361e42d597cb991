"""``Reduction``: dlight's CPU reduction rule, without the schedules that compute a reduction
again on every iteration of a loop it does not depend on.

dlight's rule computes a reduction and its epilogue under the output's leading loops, which is
right when they are the reduction's own (softmax: per row, the row's sums, then the row). For a
channels-last group norm the output leads with rows, the statistics are per group over all
rows: each of the 64 rows of Deformable DETR's 64x64 map recomputed all 32 groups'
statistics (30 ms for a 4 MB map). Such kernels are left to the rules after it (``ParallelOuter``:
the statistics once, parallel over groups, then the normalisation)."""

from __future__ import annotations

from tvm.s_tir import dlight

from .analysis import recomputed_reduction


class Reduction(dlight.ScheduleRule):
    def __init__(self):
        self.rule = dlight.cpu.Reduction()

    def apply(self, func, target, tunable):
        sch = self.rule.apply(func, target, tunable)
        if sch is None or isinstance(sch, list):
            return sch
        return None if recomputed_reduction(sch) else sch
