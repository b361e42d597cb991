"""A weighted sum over a concatenated axis -> one weighted sum per part, added (speed).

Deformable DETR's multi-scale deformable attention samples each of four levels on its own, then
stacks the samples and takes their weighted sum over levels and points:

    (stack(samples, dim=-2).flatten(-2) * weights).sum(-1)        # [heads, 32, queries, 4 x 4]

TVM fuses the stack into one kernel with every level's sampling: for each output element it
chooses among the four levels by branches, and the four levels' taps, masks and weights are
computed in one branchy loop (79 ms a layer on 512x512's levels, 8 heads, 5440 queries, Intel
Xeon). A sum over the concatenated axis is the sum of the sums over its parts:

    sum(cat([a_1, ..., a_L], d) * w, d) == sum(a_1 * w[.., s_1:e_1], d) + ... + sum(a_L * w[.., s_L:e_L], d)

so no concatenation is left, and each level's sampling fuses with its own share of the sum
(4 x 13.5 ms; the layer 178 -> 138 ms).

The concatenation may be seen through views (``flatten``, ``view``, ``reshape`` of the
contiguous result), which keep the elements' order: a part is then a slice of the reduced axis
as long as every outer index holds the parts in one run each (the reduced axis and the axes after
it cover the concatenated axis and the axes after it), checked from the shapes.

Contract: the same terms summed in another order (each part's sum, then the parts in order):
float64 within 1e-12 relative to the sum of |terms|, float32 1e-5 absolute on unit-scale
inputs. Taken: ``sum`` over one axis of a two-operand product, one of whose operands is a
``cat``/``stack`` seen through views, used by nothing else, whose parts are contiguous slices of
that axis; everything else is left as it is.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from hypothesis import strategies as st
from torch import Tensor, fx

from ..equivalence.strategies import dtypes, seeded_tensor
from .base import GraphRewrite, node_value

aten = torch.ops.aten

CONTRACT = (
    "sum over one axis of a product with a concatenation (cat or stack, seen through views) whose parts are "
    "contiguous slices of that axis becomes one sum per part, added in order: the same terms summed in "
    "another order (float64 within 1e-12 relative to the sum of |terms|, float32 1e-5 absolute on "
    "unit-scale inputs); anything else is left as it is"
)

_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.flatten.using_ints)


def _only_user(node: fx.Node, user: fx.Node) -> bool:
    return list(node.users) == [user]


def _concatenation(node: fx.Node, consumer: fx.Node):
    """``(parts, sizes, axis, shape)`` of the ``cat``/``stack`` that ``node`` views (through views
    used by nothing else): its parts, their sizes along the concatenated axis, that axis and the
    concatenation's shape; None otherwise."""
    user = consumer
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _VIEWS:
        if not _only_user(node, user):
            return None
        user, node = node, node.args[0]
    if not (isinstance(node, fx.Node) and node.op == "call_function" and _only_user(node, user)):
        return None
    if node.target not in (aten.cat.default, aten.stack.default):
        return None
    out = node_value(node)
    parts = list(node.args[0])
    axis = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    values = [node_value(p) for p in parts]
    if out is None or any(v is None or not v.is_contiguous() for v in values):
        return None
    axis %= out.dim()
    if node.target is aten.stack.default:
        sizes = [1] * len(parts)
    else:
        if any(v.dim() != out.dim() for v in values):  # cat's legacy empty 1-d parts
            return None
        sizes = [v.shape[axis] for v in values]
    return parts, sizes, axis, tuple(out.shape)


def _slices(shape, axis: int, sizes: list[int], viewed, dim: int) -> list[tuple[int, int]] | None:
    """Where each part lies along ``dim`` of the viewed shape: ``(start, length)``, or None when a
    part is not one slice of it. Views keep the elements' order, so each index of the axes before
    holds one run of every part, in order, iff the axes before have the same extent."""
    if math.prod(shape[:axis]) != math.prod(viewed[:dim]):
        return None
    inner, viewed_inner = math.prod(shape[axis + 1 :]), math.prod(viewed[dim + 1 :])
    slices, offset = [], 0
    for size in sizes:
        start, length = offset * inner, size * inner
        if start % viewed_inner or length % viewed_inner:
            return None
        slices.append((start // viewed_inner, length // viewed_inner))
        offset += size
    return slices


def _split_sum(graph: fx.Graph, node: fx.Node) -> bool:
    product, dims = node.args[0], node.args[1]
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    out = node_value(node)
    if node.kwargs.get("dtype") is not None or out is None or not isinstance(dims, (list, tuple)) or len(dims) != 1:
        return False
    if not (isinstance(product, fx.Node) and product.target is aten.mul.Tensor and _only_user(product, node)):
        return False
    viewed = node_value(product)
    dim = dims[0] % viewed.dim()
    for side in (0, 1):
        a, w = product.args[side], product.args[1 - side]
        va, vw = node_value(a), node_value(w)
        if va is None or tuple(va.shape) != tuple(viewed.shape):
            continue
        found = _concatenation(a, product)
        if found is None:
            continue
        parts, sizes, axis, shape = found
        slices = _slices(shape, axis, sizes, list(va.shape), dim)
        if slices is None or len(parts) < 2:
            continue
        w_dim = None  # the axis of w along the reduced one, when it is not broadcast there
        if isinstance(w, fx.Node):
            if vw is None:
                continue
            offset = viewed.dim() - vw.dim()
            if dim >= offset and vw.shape[dim - offset] != 1:
                w_dim = dim - offset
        with graph.inserting_before(node):
            total = None
            for part, (start, length) in zip(parts, slices):
                part_shape = list(va.shape)
                part_shape[dim] = length
                piece = graph.call_function(aten.view.default, (part, part_shape))  # [viewed, dim sliced]
                share = w
                if w_dim is not None:
                    share = graph.call_function(aten.slice.Tensor, (w, w_dim, start, start + length))
                term = graph.call_function(aten.mul.Tensor, (piece, share) if side == 0 else (share, piece))
                partial = graph.call_function(aten.sum.dim_IntList, (term, [dim], keepdim))  # [out]
                total = partial if total is None else graph.call_function(aten.add.Tensor, (total, partial))
        node.replace_all_uses_with(total)
        return True
    return False


def split_sums(graph: fx.Graph) -> int:
    done = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten.sum.dim_IntList:
            done += _split_sum(graph, node)
    return done


class SumOverConcat(GraphRewrite):
    name = "sum_over_concat"
    summary = "sum over a concatenated axis of a product -> one sum per part, added (speed)"
    contract = CONTRACT

    @staticmethod
    def cases(dtype=None):
        return sum_over_concat_cases(dtype)

    def rewrite_graph(self, graph, program):
        return {"aten.sum.dim_IntList": split_sums(graph)}


# ----------------------------------------------------------------------------- strategy


@dataclasses.dataclass
class SumOverConcatCase:
    """``(view(cat_or_stack(parts, axis)) * w).sum(dim)``: the view merges the concatenated axis
    with the axis after it, or with the one before it (parts interleaved: left alone), or is
    none; the sum is over the axis holding the concatenation, or another one (left alone)."""

    parts: list[Tensor]
    w: Tensor
    stack: bool
    axis: int
    merge: str  # "none", "next" (the parts stay slices), "previous" (they interleave)
    dim: int
    keepdim: bool
    weight_first: bool

    @property
    def input(self) -> Tensor:
        return self.parts[0]

    def module(self) -> torch.nn.Module:
        return _SumOverConcat(self.stack, self.axis, self.merge, self.dim, self.keepdim, self.weight_first)

    def args(self) -> tuple:
        return (*self.parts, self.w)

    def reference(self) -> Tensor:
        return self.module()(*self.args())

    def rewritten(self) -> Tensor:
        program = torch.export.export(self.module(), self.args())
        return SumOverConcat()(program).program.module()(*self.args())

    def taken(self) -> bool:
        """Whether the parts are contiguous slices of the summed axis, found by viewing the
        parts' numbers the way the module views the parts: every line along that axis must read
        0..0 1..1 ... in order, the same in every line."""
        ids = [torch.full(p.shape, float(i)) for i, p in enumerate(self.parts)]
        viewed = self.module().view_concatenation(ids)
        lines = viewed.movedim(self.dim, -1).reshape(-1, viewed.shape[self.dim])
        first = lines[0]
        in_order = bool((first[1:] >= first[:-1]).all()) and set(first.tolist()) == set(range(len(self.parts)))
        return bool((lines == first).all()) and in_order

    @property
    def scale(self) -> float:
        return float(sum(p.abs().sum() for p in self.parts) * self.w.abs().max()) or 1.0


class _SumOverConcat(torch.nn.Module):
    def __init__(self, stack, axis, merge, dim, keepdim, weight_first):
        super().__init__()
        self.stack, self.axis, self.merge, self.dim = stack, axis, merge, dim
        self.keepdim, self.weight_first = keepdim, weight_first

    @staticmethod
    def concatenated_dim(axis: int, merge: str) -> int:
        return axis - 1 if merge == "previous" else axis

    def view_concatenation(self, parts):
        c = torch.stack(parts, self.axis) if self.stack else torch.cat(parts, self.axis)
        if self.merge == "next":
            return c.flatten(self.axis, self.axis + 1)
        if self.merge == "previous":
            return c.flatten(self.axis - 1, self.axis)
        return c

    def forward(self, *inputs):
        *parts, w = inputs
        c = self.view_concatenation(parts)
        product = w * c if self.weight_first else c * w
        return product.sum(self.dim, keepdim=self.keepdim)


def sum_over_concat_cases(dtype=None):
    """Hypothesis strategy of ``SumOverConcatCase``: 2-4 parts of rank 2-3 (cat with sizes 1-3
    along the axis, or stack), views merging the concatenated axis with its neighbours or none,
    sums over every axis, weights full, broadcast along the reduced axis or of lower rank,
    either operand order, keepdim both ways; Deformable DETR's stack(-2).flatten(-2) among them."""

    @st.composite
    def cases(draw):
        dt = draw(dtypes) if dtype is None else dtype
        seed = draw(st.integers(0, 2**31 - 1))
        count = draw(st.integers(2, 4))
        rank = draw(st.integers(2, 3))
        base = [draw(st.integers(1, 4)) for _ in range(rank)]
        stack = draw(st.booleans())
        if stack:  # the new axis can go anywhere in rank + 1
            axis = draw(st.integers(0, rank))
            shapes = [list(base)] * count
            full = base[:axis] + [count] + base[axis:]
        else:
            axis = draw(st.integers(0, rank - 1))
            sizes = [draw(st.integers(1, 3)) for _ in range(count)]
            shapes = [base[:axis] + [s] + base[axis + 1 :] for s in sizes]
            full = base[:axis] + [sum(sizes)] + base[axis + 1 :]
        merges = ["none"] + (["next"] if axis + 1 < len(full) else []) + (["previous"] if axis > 0 else [])
        merge = draw(st.sampled_from(merges))
        if merge == "next":
            viewed = full[:axis] + [full[axis] * full[axis + 1]] + full[axis + 2 :]
        elif merge == "previous":
            viewed = full[: axis - 1] + [full[axis - 1] * full[axis]] + full[axis + 1 :]
        else:
            viewed = full
        concatenated = _SumOverConcat.concatenated_dim(axis, merge)
        dim = draw(st.sampled_from([concatenated, *range(len(viewed))]))
        w_kind = draw(st.sampled_from(["full", "broadcast", "lower_rank"]))
        w_shape = list(viewed)
        if w_kind == "broadcast":
            w_shape[dim] = 1
        elif w_kind == "lower_rank":
            w_shape = w_shape[1:]
        parts = [seeded_tensor(shape, dt, seed + i) for i, shape in enumerate(shapes)]
        w = seeded_tensor(w_shape, dt, seed + count)
        keepdim, weight_first = draw(st.booleans()), draw(st.booleans())
        return SumOverConcatCase(parts, w, stack, axis, merge, dim, keepdim, weight_first)

    return cases()
