"""Rows selected by a mask, computed, written back -> every row computed, kept with ``where``.

torchvision's ``MultiScaleRoIAlign`` assigns each box to an FPN level (``LevelMapper``:
log2, floor, clamp of the box's size) and pools each level's boxes apart:

    idx = torch.where(levels == level)[0]            # nonzero: as many rows as the data says
    result[idx] = roi_align(feature, rois[idx], ...)  # index, roi_align, index_put

``torch.export`` keeps this with unbacked sizes (``nonzero`` and ``_assert_scalar`` on its
count), and stock TVM refuses the program (``Unsupported function types ['nonzero.default']``).
When the computation between the selection and the write is row-wise (output row ``r`` depends
only on input row ``r``), selecting rows, computing and writing them back is computing every
row and keeping the selected ones:

    index_put(result, [nonzero(mask)[:, 0]], f(index(x, [idx])))  ->  where(mask[:, None, ...], f(x), result)

Static shapes, no ``nonzero`` or ``index_put`` left; the ``_assert_scalar`` and
``sym_constrain_range*`` nodes that checked the unbacked count go with it. Several levels
writing into one result (a chain of ``index_put`` on the zeros) become a chain of ``where``.
``nonzero`` gives sorted, unique rows, so each selected row is written once.

The rewrite checks row-wise-ness on the graph, walking back from the written values to the
selections (``index(x, [idx])`` or ``index_select(x, 0, idx)`` with the same ``idx``); every
operator in between must be one that keeps rows apart along dim 0:

- ``torchvision::roi_align`` with the selected tensor as its boxes (each box is pooled alone);
- elementwise arithmetic, comparisons, casts and ``where`` that round the same way whatever
  the number of rows (add/sub/mul/div, neg, abs, relu, sqrt, min/max, clamp, floor/ceil/round/
  trunc, ``_to_copy``); their other operands must not depend on the selection and must
  broadcast along dim 0 (lower rank, or size 1 there);
- layout operators that keep dim 0 in place (view, reshape, expand, permute, unsqueeze, ...);
- ``mm``/``addmm`` (``linear``) with the selected rows as the left operand: row-wise, but BLAS
  sums a row's terms in an order that may depend on the number of rows (measured: not bit-exact
  across row counts), so those are exact within the project bounds, not bit for bit.

Anything else (a sum, softmax or cumsum over dim 0, a flip, rows mixed in any way, an
``index_put`` with ``accumulate=True`` or a multi-dimensional mask) leaves the graph alone.

Cost: ``f`` runs on every row instead of the selected ones. For MultiScaleRoIAlign that is
every box pooled on every level: L times the ``roi_align`` work of the eager module (L = 4 for
Mask R-CNN), measured by ``scripts/bench_roi_align.py --multiscale``.

Order: this rewrite runs before ``roi_align``, which replaces the ``roi_align`` inside the
dispatch otherwise: its replacement cannot even be traced on an unbacked number of boxes
(``GuardOnDataDependentSymNode: Eq(u0, 0)``), and after it the rows would pass through
operators this rewrite does not take.

Contract: bit-exact when the computation between selection and write uses no matrix product
(with ``mm``/``addmm``: within the project bounds), provided ``f`` is defined on every row of
its input, not only the selected ones (``roi_align``: batch indices in ``[0, N)`` for every
box); anything not shown row-wise on the graph is left as it is.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torchvision
from hypothesis import strategies as st
from torch import Tensor, fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torchvision.ops.poolers import _convert_to_roi_format, _setup_scales

from ..equivalence.strategies import dtypes, seeded_tensor
from .base import GraphRewrite, RewriteResult, node_value

aten = torch.ops.aten

CONTRACT = (
    "index_put(result, [nonzero(mask)[:, 0]], f(x[idx])) with a 1-D mask, accumulate=False and f "
    "shown row-wise along dim 0 on the graph (roi_align with the rows as boxes; exact elementwise "
    "arithmetic, comparisons, casts and where with operands broadcast along dim 0; layout operators "
    "keeping dim 0; mm/addmm with the rows on the left) becomes where(mask, f(x), result): bit-exact "
    "without matrix products, within the project bounds with them, provided f is defined on every row "
    "(roi_align: batch indices in [0, N) for every box); every box is pooled on every level (L times "
    "the roi_align work); anything else is left as it is"
)

# What export and decomposition make of a data-dependent selection: the program calls one of
# these when it may hold a row dispatch (``torch.where(mask)`` is ``where.default``).
_SELECTING = frozenset({aten.nonzero.default, aten.where.default, aten.argwhere.default, aten.nonzero_numpy.default})

# Elementwise operators whose result is the same bits whatever the number of rows: IEEE
# arithmetic and sqrt, comparisons, selections, rounding and casts (PyTorch's vectorised and
# scalar loops agree on them; transcendental functions may differ in the last bit between the
# two, and which elements take which loop depends on the count).
_ELEMENTWISE = frozenset(
    {
        aten.add.Tensor,
        aten.add.Scalar,
        aten.sub.Tensor,
        aten.sub.Scalar,
        aten.mul.Tensor,
        aten.mul.Scalar,
        aten.div.Tensor,
        aten.div.Scalar,
        aten.neg.default,
        aten.abs.default,
        aten.relu.default,
        aten.sqrt.default,
        aten.reciprocal.default,
        aten.maximum.default,
        aten.minimum.default,
        aten.clamp.default,
        aten.clamp_min.default,
        aten.clamp_max.default,
        aten.floor.default,
        aten.ceil.default,
        aten.round.default,
        aten.trunc.default,
        aten.where.self,
        aten.eq.Scalar,
        aten.eq.Tensor,
        aten.ne.Scalar,
        aten.ne.Tensor,
        aten.lt.Scalar,
        aten.lt.Tensor,
        aten.le.Scalar,
        aten.le.Tensor,
        aten.gt.Scalar,
        aten.gt.Tensor,
        aten.ge.Scalar,
        aten.ge.Tensor,
        aten.logical_and.default,
        aten.logical_or.default,
        aten.logical_not.default,
        aten._to_copy.default,
        aten.clone.default,
        aten.alias.default,
    }
)

# Layout operators: row-wise when they keep dim 0 where it is (checked on the shapes).
_LAYOUT = frozenset(
    {
        aten.view.default,
        aten._unsafe_view.default,
        aten.reshape.default,
        aten.expand.default,
        aten.permute.default,
        aten.transpose.int,
        aten.unsqueeze.default,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.select.int,
        aten.slice.Tensor,
    }
)


@dataclasses.dataclass(frozen=True)
class Operands:
    """Which operands of a non-elementwise operator carry the rows, which must not depend on the
    selection, and which of those must also broadcast along dim 0."""

    rows: tuple[int, ...]
    independent: tuple[int, ...]
    broadcast: tuple[int, ...] = ()


_ROW_OPERANDS = {
    torch.ops.torchvision.roi_align.default: Operands(rows=(1,), independent=(0,)),  # (input, rois, ...): a box a row
    aten.mm.default: Operands(rows=(0,), independent=(1,)),
    aten.addmm.default: Operands(rows=(1,), independent=(2,), broadcast=(0,)),  # (bias, rows, weight)
}
_PRODUCTS = frozenset({aten.mm.default, aten.addmm.default})

# Index forms of nonzero's [n, 1] result that give its column as [n] (1-D masks only).
_COLUMN_STEPS = frozenset(
    {
        aten.slice.Tensor,
        aten.select.int,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.view.default,
        aten._unsafe_view.default,
        aten.reshape.default,
        aten.alias.default,
        aten.clone.default,
    }
)


def rows_by_where(mask: Tensor, f: Callable[[Tensor], Tensor], x: Tensor, result: Tensor) -> Tensor:
    """``result`` with rows ``mask`` replaced by those of ``f(x)``: the replacement, for
    ``f`` row-wise along dim 0 (``f(x[idx]) == f(x)[idx]``)."""
    rows = mask.reshape(-1, *[1] * (result.dim() - 1))  # [K, 1, ...]
    return torch.where(rows, f(x), result)  # [K, ...]


def rows_by_index(mask: Tensor, f: Callable[[Tensor], Tensor], x: Tensor, result: Tensor) -> Tensor:
    """``result`` with rows ``mask`` replaced by ``f`` of those rows of ``x``: what the rewrite
    replaces (``index``, ``f``, ``index_put``)."""
    idx = torch.where(mask)[0]  # [n], sorted and unique
    return result.index_put((idx,), f(x[idx]))


def multiscale_roi_align(
    features: Sequence[Tensor],
    boxes: Sequence[Tensor],
    image_shapes: Sequence[tuple[int, int]],
    output_size: tuple[int, int],
    sampling_ratio: int,
    *,
    canonical_scale: int = 224,
    canonical_level: int = 4,
) -> Tensor:
    """``torchvision.ops.MultiScaleRoIAlign`` on ``features`` (its maps in level order), every box
    pooled on every level and kept where its level is: what the rewritten program computes."""
    scales, mapper = _setup_scales(list(features), list(image_shapes), canonical_scale, canonical_level)
    rois = _convert_to_roi_format(list(boxes))  # [K, 5]
    levels = mapper(list(boxes))  # [K]
    first = features[0]
    result = first.new_zeros((rois.shape[0], first.shape[1], *output_size))  # [K, C, PH, PW]
    for level, (feature, scale) in enumerate(zip(features, scales)):

        def pooled(r, feature=feature, scale=scale):
            return torchvision.ops.roi_align(feature, r, output_size, scale, sampling_ratio).to(first.dtype)

        result = rows_by_where(levels == level, pooled, rois, result)
    return result


# ----------------------------------------------------------------------------- the graph


def _expr(size):
    """A size as a comparable value: an int, or a symbolic size's expression."""
    return size.node.expr if isinstance(size, torch.SymInt) else size


def _selected_by(index: fx.Node) -> fx.Node | None:
    """The ``nonzero`` whose column ``index`` is (``torch.where(mask)[0]``, ``mask.nonzero()[:, 0]``,
    ``.squeeze(1)``, ``.view(-1)``), for a 1-D ``mask``; None for anything else."""
    node, steps = index, 0
    val = node_value(index)
    if not isinstance(val, Tensor) or val.dim() != 1 or val.dtype != torch.int64:
        return None
    count = _expr(val.shape[0])
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _COLUMN_STEPS and steps < 8:
        node, steps = node.args[0], steps + 1
        if not isinstance(node_value(node), Tensor) or _expr(node_value(node).shape[0]) != count:
            return None  # a step that changed the rows
    if not (isinstance(node, fx.Node) and node.target is aten.nonzero.default):
        return None
    return node if node_value(node.args[0]).dim() == 1 else None


def _unbacked(value) -> bool:
    return bool(free_unbacked_symbols(value))


@dataclasses.dataclass
class Dispatch:
    """One ``index_put(result, [idx], f(x[idx]))`` found row-wise: the nodes to replace it."""

    write: fx.Node  # index_put(result, [idx], values)
    nonzero: fx.Node  # nonzero(mask): [n, 1]
    count: object  # n, the unbacked number of rows selected
    rows: int  # K = mask.shape[0] = result.shape[0]
    selections: set  # index(x, [idx]) / index_select(x, 0, idx) nodes: x's rows idx
    computation: list  # the row-wise nodes from the selections to the values, in graph order

    @property
    def mask(self) -> fx.Node:
        return self.nonzero.args[0]


def _descendants(node: fx.Node) -> set:
    seen, stack = set(), [node]
    while stack:
        for user in stack.pop().users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


class _RowWalk:
    """Walks back from the written values and decides whether everything between them and the
    selections of one ``nonzero`` is row-wise along dim 0."""

    def __init__(self, nonzero: fx.Node, count, rows: int):
        self.nonzero, self.count, self.rows = nonzero, count, rows
        self.dependent = _descendants(nonzero)
        self.selections: set = set()
        self.computation: set = set()

    def is_selection(self, node: fx.Node) -> bool:
        """``x[idx]`` or ``index_select(x, 0, idx)`` with ``idx`` this nonzero's column and ``x``
        of the mask's length."""
        if node.target is aten.index.Tensor and len(node.args[1]) == 1:
            x, index = node.args[0], node.args[1][0]
        elif node.target is aten.index_select.default and node.args[1] == 0:
            x, index = node.args[0], node.args[2]
        else:
            return False
        source = node_value(x)
        return (
            isinstance(index, fx.Node)
            and _selected_by(index) is self.nonzero
            and isinstance(source, Tensor)
            and source.dim() >= 1
            and _expr(source.shape[0]) == self.rows
            and not _unbacked(source)
        )

    def holds_rows(self, node) -> bool:
        """A tensor whose dim 0 is the selected rows and whose other sizes are static."""
        val = node_value(node)
        return (
            isinstance(val, Tensor)
            and val.dim() >= 1
            and _expr(val.shape[0]) == self.count
            and not any(_unbacked(size) for size in val.shape[1:])
        )

    def independent(self, node, broadcast_rank: int | None) -> bool:
        """An operand that does not depend on the selection, of static shape; with
        ``broadcast_rank``, one that broadcasts along dim 0 of a result of that rank."""
        val = node_value(node)
        if node in self.dependent or _unbacked(val):
            return False
        if broadcast_rank is None or not isinstance(val, Tensor):
            return True
        return val.dim() < broadcast_rank or val.shape[0] == 1

    def walk(self, values: fx.Node) -> bool:
        stack = [values]
        while stack:
            node = stack.pop()
            if node in self.selections or node in self.computation:
                continue
            if not (isinstance(node, fx.Node) and node.op == "call_function" and self.holds_rows(node)):
                return False
            if self.is_selection(node):
                self.selections.add(node)
                continue
            operands = self.row_operands(node)
            if operands is None:
                return False
            self.computation.add(node)
            stack.extend(operands)
        return True

    def row_operands(self, node: fx.Node) -> list | None:
        """The operands of ``node`` that carry rows, when ``node`` keeps rows apart; else None."""
        tensors = [a for a in node.args if isinstance(node_value(a), Tensor)]
        if not self.plain_arguments(node):
            return None
        if node.target in _ROW_OPERANDS:
            operands, rank = _ROW_OPERANDS[node.target], node_value(node).dim()
            if not all(self.independent(node.args[i], None) for i in operands.independent):
                return None
            if not all(self.independent(node.args[i], rank) for i in operands.broadcast):
                return None
            return [node.args[i] for i in operands.rows]
        if node.target in _LAYOUT:
            return [node.args[0]] if _keeps_dim_0(node) else None
        if node.target in _ELEMENTWISE and _unit_alpha(node):
            rank = node_value(node).dim()
            rows = [a for a in tensors if a in self.dependent]
            if any(node_value(a).dim() != rank for a in rows):
                return None  # a row operand broadcast against other rows
            if not all(self.independent(a, rank) for a in tensors if a not in self.dependent):
                return None
            return rows
        return None

    def plain_arguments(self, node: fx.Node) -> bool:
        """The selected count appears only as the leading size of a reshape or expand (where it
        becomes the mask's length); no other argument involves an unbacked size (``r * r.shape[0]``
        would be multiplied by another number)."""
        args = list(node.args)
        if node.target in _SHAPED:
            leading = node_value(args[1][0])
            if _unbacked(leading) and _expr(leading) != self.count:
                return False
            args[1] = args[1][1:]
        arguments: list[fx.Node] = []
        fx.node.map_arg((args, node.kwargs), arguments.append)
        return not any(isinstance(node_value(a), torch.SymInt) and _unbacked(node_value(a)) for a in arguments)


# Layout operators whose second argument is the result's shape.
_SHAPED = frozenset({aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default})


def _keeps_dim_0(node: fx.Node) -> bool:
    """Dim 0 of the result is dim 0 of the operand (the shapes check the rest): a squeeze of dim 0
    would drop it when one row is selected."""
    if node.target not in (aten.squeeze.dim, aten.squeeze.dims):
        return True
    dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
    rank = node_value(node.args[0]).dim()
    return all(d % rank != 0 for d in dims)


def _unit_alpha(node: fx.Node) -> bool:
    """add/sub with an ``alpha`` other than 1 fuse a multiply-add in the vectorised loop only."""
    if node.target not in (aten.add.Tensor, aten.sub.Tensor):
        return True
    alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)
    return alpha == 1


def row_dispatch(write: fx.Node) -> Dispatch | None:
    """The row dispatch ``write`` is, when it is ``index_put(result, [nonzero(mask)[:, 0]],
    f(x[idx]))`` with ``f`` row-wise along dim 0; None for anything else."""
    if write.op != "call_function" or write.target is not aten.index_put.default:
        return None
    result, indices, values = write.args[:3]
    accumulate = write.kwargs.get("accumulate", write.args[3] if len(write.args) > 3 else False)
    if accumulate or len(indices) != 1 or not isinstance(indices[0], fx.Node):
        return None
    nonzero = _selected_by(indices[0])
    if nonzero is None:
        return None
    count, rows = _expr(node_value(indices[0]).shape[0]), _expr(node_value(nonzero.args[0]).shape[0])
    target, written = node_value(result), node_value(values)
    if isinstance(count, int) or not isinstance(rows, int):
        return None  # the count must be the unbacked symbol, the mask's length static
    if _unbacked(target) or _expr(target.shape[0]) != rows or not isinstance(written, Tensor):
        return None
    if (
        written.dtype != target.dtype
        or written.dim() != target.dim()
        or tuple(written.shape[1:]) != tuple(target.shape[1:])
    ):
        return None  # values broadcast or cast into the rows: not one row of f per written row
    walk = _RowWalk(nonzero, count, rows)
    if not walk.walk(values):
        return None
    order = [n for n in write.graph.nodes if n in walk.computation]
    return Dispatch(write, nonzero, count, rows, walk.selections, order)


def _every_row(graph: fx.Graph, dispatch: Dispatch) -> fx.Node:
    """A copy of the computation on every row: each selection becomes the tensor it selected
    from, the selected count the mask's length. Returns the copy of the written values."""
    copies = {s: s.args[0] for s in dispatch.selections}

    def argument(arg: fx.Node):
        if arg in copies:
            return copies[arg]
        if isinstance(node_value(arg), torch.SymInt) and _expr(node_value(arg)) == dispatch.count:
            return dispatch.rows
        return arg

    for node in dispatch.computation:
        copies[node] = graph.node_copy(node, argument)
        copies[node].meta.pop("val", None)  # of the selected rows; the retrace records the new one
    return copies[dispatch.write.args[2]]


def _replace(graph: fx.Graph, dispatch: Dispatch) -> None:
    write, rank = dispatch.write, node_value(dispatch.write).dim()
    with graph.inserting_before(write):
        mask = dispatch.mask
        if node_value(mask).dtype != torch.bool:  # nonzero selects the non-zero entries
            mask = graph.call_function(aten.ne.Scalar, (mask, 0))  # [K] bool
        rows = graph.call_function(aten.view.default, (mask, [dispatch.rows] + [1] * (rank - 1)))  # [K, 1, ...]
        computed = _every_row(graph, dispatch)  # [K, ...]
        kept = graph.call_function(aten.where.self, (rows, computed, write.args[0]))  # [K, ...]
    write.replace_all_uses_with(kept)
    graph.erase_node(write)


def _drop_metadata_checks(graph: fx.Graph, computed: set) -> None:
    """The ``_assert_tensor_metadata`` (dtype, device, layout) of a computation on selected rows
    that nothing else uses now: its copy on every row has the same metadata."""
    for node in computed:
        checks = [u for u in node.users if u.target is aten._assert_tensor_metadata.default]
        if len(checks) == len(node.users):
            for check in checks:
                graph.erase_node(check)


def _drop_count_checks(graph: fx.Graph, nonzero: fx.Node) -> bool:
    """Erase ``nonzero`` when its result is used only to check its count (sym_size,
    ``_assert_scalar``, ``sym_constrain_range*``), with those checks; whether it was."""
    users = _descendants(nonzero)
    if any(isinstance(node_value(u), Tensor) for u in users):
        return False
    position = {node: i for i, node in enumerate(graph.nodes)}
    for user in sorted(users, key=position.__getitem__, reverse=True):
        graph.erase_node(user)
    graph.erase_node(nonzero)
    return True


def rewrite_dispatches(graph: fx.Graph) -> dict[str, int]:
    dispatches = [d for d in map(row_dispatch, list(graph.nodes)) if d is not None]
    if not dispatches:
        return {}
    for dispatch in dispatches:
        _replace(graph, dispatch)
    graph.eliminate_dead_code()
    alive = set(graph.nodes)
    _drop_metadata_checks(graph, {n for d in dispatches for n in d.computation if n in alive})
    graph.eliminate_dead_code()
    nonzeros = {d.nonzero for d in dispatches}
    dropped = sum(_drop_count_checks(graph, n) for n in nonzeros)
    graph.eliminate_dead_code()
    return {"aten.index_put.default": len(dispatches), "aten.nonzero.default": dropped}


class RowDispatch(GraphRewrite):
    name = "row_dispatch"
    summary = "index_put of a row-wise computation on nonzero(mask)'s rows -> where(mask, f(every row), result)"
    contract = CONTRACT

    @staticmethod
    def cases(dtype=None):
        return multiscale_cases(dtype)

    probe_note = "result[idx] = 2 * x[idx] + 1 with idx = torch.where(x[:, 0] > 0)[0]"

    def probe_case(self):
        x = torch.linspace(-1, 1, 6 * 3).reshape(6, 3).sin()
        return DispatchCase(x, x[:, 0] > 0, _affine)

    def replaces(self, node: fx.Node) -> bool:
        if node.op != "call_function":
            return False
        if node.target is aten.nonzero.default:
            return any((d := row_dispatch(u)) is not None and d.nonzero is node for u in _descendants(node))
        return row_dispatch(node) is not None

    def rewrite_graph(self, graph, program):
        return rewrite_dispatches(graph)

    def __call__(self, program: torch.export.ExportedProgram) -> RewriteResult:
        # A program that selects no rows by data is left as it is, without paying for a
        # decomposition (seconds on a real model).
        if not any(node.op == "call_function" and node.target in _SELECTING for node in program.graph.nodes):
            return RewriteResult(program, {})
        result = super().__call__(program)
        _forget_stale_ranges(result.program)
        return result


def _forget_stale_ranges(program: torch.export.ExportedProgram) -> None:
    """Drop the ranges of unbacked sizes no node has any more: the retrace carries the old
    program's ranges over, and a program without row dispatch has static shapes only."""
    present = set().union(*(free_unbacked_symbols(v) for n in program.graph.nodes if (v := node_value(n)) is not None))
    ranges = program.range_constraints  # the retraced program's own dict
    for symbol in [s for s in ranges if free_unbacked_symbols(s) and s not in present]:
        del ranges[symbol]


# ----------------------------------------------------------------------------- cases


def _affine(rows: Tensor) -> Tensor:
    return 2 * rows + 1


@dataclasses.dataclass
class DispatchCase:
    """``result[idx] = f(x[idx])`` with ``idx = torch.where(mask)[0]`` on zeros like ``f(x)``."""

    x: Tensor
    mask: Tensor  # [K] bool
    f: Callable[[Tensor], Tensor]

    @property
    def input(self) -> Tensor:
        return self.x

    def _result(self) -> Tensor:
        return torch.zeros_like(self.f(self.x))

    def reference(self) -> Tensor:
        return rows_by_index(self.mask, self.f, self.x, self._result())

    def rewritten(self) -> Tensor:
        return rows_by_where(self.mask, self.f, self.x, self._result())

    def module(self) -> torch.nn.Module:
        return _DispatchModule(self.f)

    def args(self) -> tuple:
        return (self.x, self.mask)

    scale = 1.0


class _DispatchModule(torch.nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x, mask):
        result = torch.zeros_like(self.f(x))
        idx = torch.where(mask)[0]
        result[idx] = self.f(x[idx])
        return result


# The levels of Mask R-CNN's pooler: maps at strides 4, 8, 16, 32 (levels 2-5 of LevelMapper).
STRIDES = (4, 8, 16, 32)
CANONICAL_SCALE, CANONICAL_LEVEL = 224, 4


def level_bounds(level: int) -> tuple[float, float]:
    """The box sizes sqrt(area) LevelMapper sends to ``level`` (2-5 with Mask R-CNN's maps): from
    224 * 2**(level - 4) up to twice that; the lowest level takes everything smaller, the
    highest everything larger."""
    low = CANONICAL_SCALE * 2.0 ** (level - CANONICAL_LEVEL)
    return (0.0 if level == 2 else low), (math.inf if level == 5 else 2 * low)


BOX_KINDS = ("level 2", "level 3", "level 4", "level 5", "threshold", "padding")


@dataclasses.dataclass
class MultiScaleCase:
    """torchvision's ``MultiScaleRoIAlign`` over four maps at strides 4-32 of an image."""

    features: tuple[Tensor, ...]  # [N, C, H/s, W/s] for s in STRIDES
    boxes: tuple[Tensor, ...]  # per image, [L, 4] (x1, y1, x2, y2) in image pixels
    image_size: tuple[int, int]
    output_size: tuple[int, int]
    sampling_ratio: int
    kinds: tuple[str, ...]

    @property
    def input(self) -> Tensor:
        return self.features[0]

    def pooler(self) -> torchvision.ops.MultiScaleRoIAlign:
        names = [str(i) for i in range(len(self.features))]
        return torchvision.ops.MultiScaleRoIAlign(names, self.output_size, self.sampling_ratio)

    def reference(self) -> Tensor:
        return self.module()(*self.args())

    def rewritten(self) -> Tensor:
        image_shapes = [self.image_size] * len(self.boxes)
        return multiscale_roi_align(self.features, self.boxes, image_shapes, self.output_size, self.sampling_ratio)

    def module(self) -> torch.nn.Module:
        return MultiScaleModule(self.pooler(), len(self.features), self.image_size)

    def args(self) -> tuple:
        return (*self.features, *self.boxes)

    scale = None  # bit-exact: compared as they are


class MultiScaleModule(torch.nn.Module):
    """``MultiScaleRoIAlign`` with tensor arguments: the maps, then each image's boxes."""

    def __init__(self, pooler: torchvision.ops.MultiScaleRoIAlign, maps: int, image_size: tuple[int, int]):
        super().__init__()
        self.pooler, self.maps, self.image_size = pooler, maps, image_size

    def forward(self, *tensors: Tensor) -> Tensor:
        features = OrderedDict((str(i), t) for i, t in enumerate(tensors[: self.maps]))
        boxes = list(tensors[self.maps :])
        return self.pooler(features, boxes, [self.image_size] * len(boxes))


def multiscale_cases(dtype=None):
    """Hypothesis strategy of ``MultiScaleCase``: one or two images of 32-96 pixels a side, four
    maps of 1-3 channels, 1-6 boxes an image (4-10 with one on every level): boxes whose size LevelMapper sends to each level,
    boxes exactly at the level thresholds (sqrt(area) = 112, 224, 448, on integer corners and
    shifted, so rounding may take either side), zero-area padding boxes; boxes on every level,
    all on one level or drawn freely (some levels empty); 7x7, 14x14 and small pooling, sampling
    1, 2 or adaptive."""

    @st.composite
    def box(draw, kind, H, W):
        if kind == "padding":
            x, y = draw(st.sampled_from([0.0, float(W) / 2])), draw(st.sampled_from([0.0, float(H) / 2]))
            return [x, y, x, y]
        if kind == "threshold":
            side = CANONICAL_SCALE * 2.0 ** draw(st.integers(-1, 1))  # 112, 224, 448
            x1 = draw(st.sampled_from([0.0, 3.0]) | st.floats(-20, W))
            y1 = draw(st.sampled_from([0.0, 5.0]) | st.floats(-20, H))
            return [x1, y1, x1 + side, y1 + side]
        low, high = level_bounds(int(kind.split()[1]))
        size = draw(st.floats(max(low, 1.0), min(high, 900.0), exclude_max=True))
        aspect = draw(st.floats(0.5, 2.0))
        w, h = size * math.sqrt(aspect), size / math.sqrt(aspect)
        x1, y1 = draw(st.floats(-w / 2, W)), draw(st.floats(-h / 2, H))
        return [x1, y1, x1 + w, y1 + h]

    @st.composite
    def kinds(draw, count):
        spread = draw(st.sampled_from(["every level", "one level", "free"]))
        if spread == "every level":
            return [f"level {k}" for k in range(2, 6)] + draw(st.lists(st.sampled_from(BOX_KINDS), max_size=count))
        if spread == "one level":
            return [draw(st.sampled_from(BOX_KINDS[:4]))] * count
        return draw(st.lists(st.sampled_from(BOX_KINDS), min_size=count, max_size=count))

    @st.composite
    def cases(draw):
        dt = draw(dtypes) if dtype is None else dtype
        H, W = 32 * draw(st.integers(1, 3)), 32 * draw(st.integers(1, 3))
        images, channels = draw(st.integers(1, 2)), draw(st.integers(1, 3))
        seed = draw(st.integers(0, 2**31 - 1))
        features = tuple(seeded_tensor((images, channels, H // s, W // s), dt, seed + s) for s in STRIDES)
        drawn = [draw(kinds(draw(st.integers(1, 6)))) for _ in range(images)]
        boxes = tuple(torch.tensor([draw(box(k, H, W)) for k in ks], dtype=dt) for ks in drawn)
        output_size = draw(st.sampled_from([(7, 7), (14, 14), (2, 3)]))
        sampling_ratio = draw(st.sampled_from([2, 1, -1]))
        return MultiScaleCase(
            features, boxes, (H, W), output_size, sampling_ratio, tuple(k for ks in drawn for k in ks)
        )

    return cases()
