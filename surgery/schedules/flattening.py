"""Schedules whose indices TVM's buffer flattening would compute wrongly are declined.

TVM lowers every kernel through ``FlattenBuffer``, which rewrites each buffer offset with its
iterator-map simplification (``iter_map_simplify``) over the loop ranges. In apache-tvm 0.25,
0.26 and 0.27 alike that simplification drops the constant of a sum that holds a floor division
of an iterator whose range the divisor does not divide, once the sum is divided or reduced
again: over ``j < 10, i < 2`` it turns ``(j // 4 + i + 1) % 2`` into ``(j // 4 + i) % 2``,
wrong at every point. Stock kernels keep each operator's indices in its own loop nest and
never meet it; our rules inline producers into their consumers, and a reshape inlined into a
concatenation along a 258-long axis made SAM3's box position encoding read the other box
(embeddings 0.2 off on 0.25/0.26; 0.27 builds the same kernel right, its read sitting under the
concatenation's ``128 <= j`` select, but gets the unguarded case wrong like the others).
``Checked`` wraps each rule: a schedule with an index the simplification changes in value (at
sampled points of the block's iterator ranges) is declined, and the next rule, or else stock
TVM's loop nests, takes the kernel.
"""

from __future__ import annotations

import random

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight

from .analysis import root_blocks
from .compat import PrimExpr, accessed_buffer, analyzer, dtype_name, iter_map_simplify

SAMPLE_POINTS = 8  # besides the domain's two corners; the dropped constant is wrong at every point


def _accesses(node, found: list) -> None:
    """Every buffer load and store under a statement or expression, appended to ``found``."""
    if type(node).__name__ in ("BufferLoad", "TensorLoad", "BufferStore", "TensorStore"):
        found.append(node)
    for field in ("a", "b", "value", "condition", "true_value", "false_value", "body", "then_case", "else_case"):
        child = getattr(node, field, None)
        if isinstance(child, (PrimExpr, tirx.Stmt)):
            _accesses(child, found)
    for field in ("args", "indices", "seq"):
        for child in getattr(node, field, None) or ():
            if isinstance(child, (PrimExpr, tirx.Stmt)):
                _accesses(child, found)


def _divides(expr) -> bool:
    """``expr`` holds a floor division or remainder (what the simplification gets wrong)."""
    if isinstance(expr, (tirx.FloorDiv, tirx.FloorMod)):
        return True
    return any(
        isinstance(child, PrimExpr) and _divides(child) for child in (getattr(expr, f, None) for f in ("a", "b"))
    )


def _offset(access):
    """The access's offset into its buffer, row-major, as ``FlattenBuffer`` computes it."""
    offset = None
    for index, extent in zip(access.indices, accessed_buffer(access).shape, strict=True):
        offset = index if offset is None else offset * extent + index
    return offset


def _value(expr, point: dict) -> int:
    at = analyzer()
    for var, value in point.items():
        at.bind(var, tvm.tirx.const(value, dtype_name(var)))
    return int(at.simplify(expr))


def _points(domains: dict) -> list[dict]:
    """The domain's lowest and highest corners and ``SAMPLE_POINTS`` points drawn from it."""
    bounds = {var: (int(r.min), int(r.min) + int(r.extent) - 1) for var, r in domains.items()}
    draw = random.Random(0)
    return [
        {var: low for var, (low, _) in bounds.items()},
        {var: high for var, (_, high) in bounds.items()},
        *({var: draw.randint(low, high) for var, (low, high) in bounds.items()} for _ in range(SAMPLE_POINTS)),
    ]


def flattened_wrongly(offset, domains: dict) -> bool:
    """``iter_map_simplify`` over ``domains`` changes the value of ``offset`` somewhere."""
    if not isinstance(offset, PrimExpr) or not domains or not _divides(offset):
        return False
    loads: list = []
    _accesses(offset, loads)
    if loads:
        return False  # an index read from a buffer (a gather) is no function of the ranges alone
    (simplified,) = iter_map_simplify([offset], domains)
    if simplified.same_as(offset):
        return False
    return any(_value(simplified, point) != _value(offset, point) for point in _points(domains))


def wrongly_flattened_access(func: tirx.PrimFunc) -> str | None:
    """The first access of a block of ``func`` whose offset TVM's flattening would change, over
    the block's iterator ranges, as text; None when there is none."""
    sch = s_tir.Schedule(func)
    for block in root_blocks(sch):
        stmt = sch.get(block)
        if not all(isinstance(iv.dom.extent, tirx.IntImm) for iv in stmt.iter_vars):
            continue  # symbolic ranges: nothing to sample
        domains = {iv.var: iv.dom for iv in stmt.iter_vars}
        found: list = []
        _accesses(stmt.body, found)
        for access in found:
            if flattened_wrongly(_offset(access), domains):
                return f"{stmt.name_hint}: {accessed_buffer(access).name}{list(access.indices)}"
    return None


class Checked(dlight.ScheduleRule):
    """``rule``, declining the kernels where its schedule has an access TVM's flattening would
    compute wrongly (see the module's docstring)."""

    def __init__(self, rule: dlight.ScheduleRule):
        self.rule = rule

    def apply(self, func, target, tunable):
        sch = self.rule.apply(func, target, tunable)
        if sch is None or isinstance(sch, list):
            return sch
        return None if wrongly_flattened_access(sch.mod["main"]) else sch

    def __repr__(self) -> str:
        return f"Checked({type(self.rule).__name__})"
