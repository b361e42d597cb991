"""Row-wise work whose result a gather selects rows of -> the same work on the selected rows only
(speed).

RT-DETR's encoder scores every one of its anchors (8,400 at 640x640), keeps the best 300 with
``topk``, and gathers their boxes; transformers computes the box head, a three-layer MLP, on all
anchors before the gather:

    boxes = mlp(memory) + anchors                       # [B, 8400, 4]: 2 x 8400 x 256 x 256 + ...
    gather(boxes, 1, topk_index[..., None].repeat(1, 1, 4))   # [B, 300, 4]

Each row of ``mlp(memory) + anchors`` depends on that row of ``memory`` and ``anchors`` alone,
so gathering first gives the same rows:

    mlp(gather(memory, 1, index)) + gather(anchors, 1, index)     # 2 x 300 x 256 x 256 + ...

(28x fewer multiply-adds for the box head; Deformable DETR's and DINO's two-stage heads are
built the same way, and are taken too where the program does not also return every row).

What counts as row-wise: the rows are the gathered axis with every axis before it (``[B, R]`` of
a ``[B, R, ...]`` source, or ``[B * R]`` where a view flattens them for a product); the chain of
operators walked back from the gather's source, each used by nothing else, may be views that keep
those rows (reshaping only what follows them), elementwise operators, and products
``addmm(bias, x, w)`` / ``mm(x, w)`` with the rows in ``x``. Another operand of an elementwise
operator (a bias, the anchors) is either the same for every row, and stays as it is, or holds a
value per row, and is gathered too. The walk stops at an operand something else also reads (the
memory, which the score head reads too) and gathers it there. The gather's index must be an index
per row, the same across the row's elements: ``repeat`` or ``expand`` of ``[..., K, 1, ...]``.

Contract: every selected row is computed by the same operators from the same values; a product
may sum its terms in another order on fewer rows (its blocking changes with the row count), so
float64 agrees within 1e-12 relative and float32 within the products' rounding. Taken where the
chain holds a product and the gather keeps fewer rows than there are; other gathers are left as
they are.
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
    "a gather of whole rows (index repeated or expanded along each row) of a chain of row-wise operators "
    "(views keeping the rows, elementwise operators, addmm/mm with the rows on the left) that holds a product "
    "becomes that chain on the gathered rows; operands with a value per row are gathered too: the same "
    "operators on the same values, products possibly summed in another order (float64 within 1e-12 "
    "relative, float32 within the products' rounding); anything else is left as it is"
)

_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
_PRODUCTS = (aten.addmm.default, aten.mm.default)
# elementwise operators whose every tensor operand broadcasts against the result
_ELEMENTWISE = frozenset(
    {
        aten.relu.default,
        aten.sigmoid.default,
        aten.tanh.default,
        aten.gelu.default,
        aten.silu.default,
        aten.exp.default,
        aten.log.default,
        aten.neg.default,
        aten.abs.default,
        aten.sqrt.default,
        aten.rsqrt.default,
        aten.clamp.default,
        aten.hardtanh.default,
        aten.leaky_relu.default,
        aten.clone.default,
        aten.alias.default,
        aten.add.Tensor,
        aten.sub.Tensor,
        aten.mul.Tensor,
        aten.div.Tensor,
        aten.add.Scalar,
        aten.sub.Scalar,
        aten.mul.Scalar,
        aten.div.Scalar,
        aten.maximum.default,
        aten.minimum.default,
        aten.where.self,
    }
)


@dataclasses.dataclass(frozen=True)
class _Rows:
    """The rows a gather selects: the source's axes ``lead`` before the gathered one of ``count``
    rows, ``kept`` of them selected by ``index`` (``[*lead, kept, 1, ..., 1]``, ``ones`` trailing
    ones)."""

    lead: tuple[int, ...]
    count: int
    kept: int
    index: fx.Node
    ones: int

    def prefix(self, shape) -> int | None:
        """How many leading axes of ``shape`` hold the rows: ``[*lead, count]`` or the flat
        ``[prod(lead) * count]``; None when neither."""
        shape = tuple(shape)
        if shape[: len(self.lead) + 1] == (*self.lead, self.count):
            return len(self.lead) + 1
        if shape and shape[0] == math.prod(self.lead) * self.count and self.lead:
            return 1
        return None

    def kept_shape(self, shape, prefix: int) -> list[int]:
        """``shape`` with its rows cut to the kept ones."""
        rows = [*self.lead, self.kept] if prefix == len(self.lead) + 1 else [math.prod(self.lead) * self.kept]
        return rows + list(shape[prefix:])


def _row_index(node: fx.Node) -> _Rows | None:
    """The rows ``node`` selects when it is ``gather(x, d, repeat_or_expand(t))`` with ``t`` of
    shape ``[*x.shape[:d], K, 1, ...]`` repeated/expanded to ``x``'s row length."""
    if node.op != "call_function" or node.target is not aten.gather.default or node.kwargs.get("sparse_grad"):
        return None
    x, dim, index = node.args[:3]
    vx, vi, out = node_value(x), node_value(index), node_value(node)
    if vx is None or vi is None or out is None or not isinstance(index, fx.Node) or index.op != "call_function":
        return None
    dim %= vx.dim()
    if tuple(vi.shape[:dim]) != tuple(vx.shape[:dim]) or tuple(vi.shape[dim + 1 :]) != tuple(vx.shape[dim + 1 :]):
        return None  # not whole rows of x
    if index.target not in (aten.repeat.default, aten.expand.default):
        return None
    t = index.args[0]
    vt = node_value(t)
    tail = vx.dim() - dim - 1
    if vt is None or vt.dtype != torch.int64 or vt.dim() != vx.dim() or tuple(vt.shape[dim + 1 :]) != (1,) * tail:
        return None
    if tuple(vt.shape[: dim + 1]) != tuple(vi.shape[: dim + 1]):
        return None  # a repeat along the rows themselves
    return _Rows(tuple(vx.shape[:dim]), vx.shape[dim], vi.shape[dim], t, tail)


def _rows_of(rows: _Rows, node, result_shape, prefix: int) -> tuple[str, list[int] | None]:
    """How an operand of an elementwise operator with result ``[rows..., tail]`` meets the rows:
    ``("same", None)``, one value for all of them; ``("each", shape)``, a value per row, read at
    ``shape`` (the result's rows and the operand's own tail; broadcast there first where the
    operand is shared along some of the rows' leading axes, as anchors are across images); or
    ``("other", None)``."""
    value = node_value(node)
    if not isinstance(node, fx.Node):
        return "same", None  # a number
    if not isinstance(value, Tensor) or value.dim() > len(result_shape):
        return "other", None  # unknown, or a symbolic number
    shape = [1] * (len(result_shape) - value.dim()) + list(value.shape)
    if shape[prefix - 1] == 1:
        return "same", None
    if (
        all(s in (1, r) for s, r in zip(shape[:prefix], result_shape[:prefix]))
        and shape[prefix - 1] == result_shape[prefix - 1]
    ):
        return "each", [*result_shape[:prefix], *shape[prefix:]]
    return "other", None


def _row_input(rows: _Rows, node: fx.Node) -> tuple[fx.Node, list[tuple[fx.Node, list[int]]]] | None:
    """For a row-wise ``node``: its operand that carries the rows (walked on) and its other
    operands with a value per row, each with the shape it is read at (gathered); None when
    ``node`` is not row-wise over the rows."""
    out = node_value(node)
    if node.op != "call_function" or out is None or not isinstance(out, Tensor):
        return None
    prefix = rows.prefix(out.shape)
    if prefix is None:
        return None
    if node.target in _VIEWS:
        source = node.args[0]
        vs = node_value(source)
        if vs is None or rows.prefix(vs.shape) is None:
            return None
        return source, []
    if node.target in _PRODUCTS:
        if prefix != 1 or node.kwargs or len(node.args) > 3:
            return None  # addmm with beta/alpha: left alone
        sides = []
        if node.target is aten.addmm.default:
            kind, shape = _rows_of(rows, node.args[0], out.shape, prefix)
            if kind == "other":
                return None
            sides = [(node.args[0], shape)] if kind == "each" else []
        return node.args[-2], sides  # the rows of x @ w are x's
    if node.target in _ELEMENTWISE:
        if any(isinstance(v, fx.Node) for v in node.kwargs.values()):
            return None
        tensors = list(dict.fromkeys(a for a in node.args if isinstance(a, fx.Node)))
        kinds = [(a, *_rows_of(rows, a, out.shape, prefix)) for a in tensors]
        if any(kind == "other" for _, kind, _ in kinds):
            return None
        each = [(a, shape) for a, kind, shape in kinds if kind == "each"]
        # walk on an operand holding all the rows itself; the others are gathered
        whole = [a for a, shape in each if list(node_value(a).shape) == shape]
        if not whole:
            return None
        return whole[0], [(a, shape) for a, shape in each if a is not whole[0]]
    return None


def _gather_rows(graph: fx.Graph, rows: _Rows, node: fx.Node, shape: list[int]) -> fx.Node:
    """The kept rows of ``node`` read at ``shape`` (its own, or broadcast to it): ``[*lead,
    kept, ...]``, or flat where ``shape`` holds the rows flat."""
    prefix = rows.prefix(shape)
    tail = shape[prefix:]
    source = node
    if list(node_value(node).shape) != shape:
        source = graph.call_function(aten.expand.default, (node, shape))
    if prefix == 1:  # flat rows: the gather reads them as [*lead, count, ...]
        source = graph.call_function(aten.view.default, (source, [*rows.lead, rows.count, *tail]))
    index = rows.index  # [*lead, kept, 1 x ones] -> [*lead, kept, 1 x len(tail)]
    if rows.ones > len(tail):
        index = graph.call_function(aten.squeeze.dims, (index, list(range(-1, len(tail) - rows.ones - 1, -1))))
    for _ in range(len(tail) - rows.ones):
        index = graph.call_function(aten.unsqueeze.default, (index, -1))
    index = graph.call_function(aten.expand.default, (index, [*rows.lead, rows.kept, *tail]))
    kept = graph.call_function(aten.gather.default, (source, len(rows.lead), index))  # [*lead, kept, *tail]
    if prefix == 1:
        kept = graph.call_function(aten.view.default, (kept, rows.kept_shape(shape, 1)))
    return kept


def _rewrite(graph: fx.Graph, gather: fx.Node) -> bool:
    rows = _row_index(gather)
    if rows is None or rows.kept >= rows.count:
        return False
    chain: list[fx.Node] = []  # from the gather's source back
    sides: dict[fx.Node, list[tuple[fx.Node, list[int]]]] = {}
    node, user = gather.args[0], gather
    while isinstance(node, fx.Node) and list(node.users) == [user]:
        found = _row_input(rows, node)
        if found is None:
            break
        chain.append(node)
        sides[node] = found[1]
        node, user = found[0], node
    if not any(n.target in _PRODUCTS for n in chain):
        return False
    start = (node, list(node_value(node).shape))
    for extra, shape in [start, *(side for n in chain for side in sides[n])]:
        prefix = rows.prefix(shape)
        if prefix is None or (prefix == 1 and not node_value(extra).is_contiguous()):  # flat rows are viewed
            return False
    with graph.inserting_before(gather):
        kept = {node: _gather_rows(graph, rows, *start)}
        gathered: dict[tuple, fx.Node] = {}  # the other operands' kept rows, by operand and shape
        for n in reversed(chain):
            read = dict(kept)
            for side, shape in sides[n]:
                key = (side, tuple(shape))
                if key not in gathered:
                    gathered[key] = _gather_rows(graph, rows, side, shape)
                read[side] = gathered[key]
            out = node_value(n)
            args = fx.node.map_arg(n.args, lambda a, read=read: read.get(a, a))
            if n.target in _VIEWS:
                args = (args[0], rows.kept_shape(out.shape, rows.prefix(out.shape)))
            kept[n] = graph.call_function(n.target, tuple(args), dict(n.kwargs))
    gather.replace_all_uses_with(kept[chain[0]])
    return True


def gathered_rows_first(graph: fx.Graph) -> int:
    return sum(_rewrite(graph, node) for node in list(graph.nodes) if node.op == "call_function")


class GatheredRowsOnly(GraphRewrite):
    name = "gathered_rows_only"
    summary = "row-wise work (products included) before a gather of rows -> the same work on the gathered rows (speed)"
    contract = CONTRACT

    @staticmethod
    def cases(dtype=None):
        return gathered_rows_only_cases(dtype)

    def rewrite_graph(self, graph, program):
        return {"aten.gather.default": gathered_rows_first(graph)}


# ----------------------------------------------------------------------------- strategy


@dataclasses.dataclass
class GatheredRowsOnlyCase:
    """``gather(chain(x) + per_row, 1, index[..., None].repeat/expand)`` over ``[B, R, D]`` rows:
    ``chain`` of linear layers (biased or not, a ReLU or sigmoid after each), then optionally
    the sum with a value per row (of each image, or shared by the images) or a bias;
    ``shared`` also returns ``chain(x)`` (its rows are read elsewhere, so nothing is taken);
    ``whole`` gathers with an index drawn per element (not whole rows: left alone)."""

    x: Tensor
    index: Tensor
    weights: list[Tensor]
    biases: list[Tensor | None]
    activation: str
    extra: str  # "none", "per_row" ([B, R, E]), "bias" ([E]), "anchors" ([1, R, E])
    per_row: Tensor
    expand: bool
    shared: bool
    whole: bool

    @property
    def input(self) -> Tensor:
        return self.x

    def module(self) -> torch.nn.Module:
        return _GatheredRows(
            self.weights, self.biases, self.activation, self.extra, self.expand, self.shared, self.whole
        )

    def args(self) -> tuple:
        return (self.x, self.index, self.per_row)

    def reference(self):
        return self.module()(*self.args())

    def rewritten(self):
        program = torch.export.export(self.module(), self.args())
        return GatheredRowsOnly()(program).program.module()(*self.args())

    def taken(self) -> bool:
        return not self.whole and not self.shared and bool(self.weights) and self.index.shape[1] < self.x.shape[1]

    @property
    def scale(self) -> float:
        scale = float(self.x.abs().max())
        for w, b in zip(self.weights, self.biases):
            scale = scale * float(w.abs().sum(1).max()) + (float(b.abs().max()) if b is not None else 0.0)
        return scale + float(self.per_row.abs().max()) or 1.0


class _GatheredRows(torch.nn.Module):
    def __init__(self, weights, biases, activation, extra, expand, shared, whole):
        super().__init__()
        self.weights = torch.nn.ParameterList([torch.nn.Parameter(w, requires_grad=False) for w in weights])
        self.biases = [None if b is None else torch.nn.Parameter(b, requires_grad=False) for b in biases]
        for i, b in enumerate(self.biases):
            if b is not None:
                self.register_parameter(f"bias_{i}", b)
        self.activation, self.extra, self.expand, self.shared, self.whole = activation, extra, expand, shared, whole

    def forward(self, x, index, per_row):  # [B, R, D], [B, K] (or [B, K, E]), [B, R, E]
        h = x
        for w, b in zip(self.weights, self.biases):
            h = torch.nn.functional.linear(h, w, b)
            h = torch.relu(h) if self.activation == "relu" else torch.sigmoid(h)
        if self.extra == "per_row":
            h = h + per_row
        elif self.extra == "bias":
            h = h + per_row[0, 0]
        elif self.extra == "anchors":  # a value per row, the same for every image
            h = h + per_row[:1]
        if self.whole:
            picked = torch.gather(h, 1, index)
        elif self.expand:
            picked = torch.gather(h, 1, index.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        else:
            picked = torch.gather(h, 1, index.unsqueeze(-1).repeat(1, 1, h.shape[-1]))
        return torch.cat([picked.flatten(), h.flatten()]) if self.shared else picked


def gathered_rows_only_cases(dtype=None):
    """Hypothesis strategy of ``GatheredRowsOnlyCase``: batches of 1-2, 2-12 rows of 1-8
    features, 0-3 linear layers, 1 to all rows kept (repeats allowed), each variant above."""

    @st.composite
    def cases(draw):
        dt = draw(dtypes) if dtype is None else dtype
        seed = draw(st.integers(0, 2**31 - 1))
        batch, rows = draw(st.integers(1, 2)), draw(st.integers(2, 12))
        widths = [draw(st.integers(1, 8)) for _ in range(draw(st.integers(0, 3)) + 1)]
        weights = [seeded_tensor((o, i), dt, seed + k) for k, (i, o) in enumerate(zip(widths, widths[1:]))]
        biases = [
            seeded_tensor((w.shape[0],), dt, seed + 100 + k) if draw(st.booleans()) else None
            for k, w in enumerate(weights)
        ]
        kept = draw(st.integers(1, rows))
        whole = draw(st.booleans()) and draw(st.booleans())
        index_seed = draw(st.integers(0, 2**31 - 1))
        generator = torch.Generator().manual_seed(index_seed)
        shape = (batch, kept, widths[-1]) if whole else (batch, kept)
        index = torch.randint(0, rows, shape, generator=generator)
        return GatheredRowsOnlyCase(
            x=seeded_tensor((batch, rows, widths[0]), dt, seed + 200),
            index=index,
            weights=weights,
            biases=biases,
            activation=draw(st.sampled_from(["relu", "sigmoid"])),
            extra=draw(st.sampled_from(["none", "per_row", "bias", "anchors"])),
            per_row=seeded_tensor((batch, rows, widths[-1]), dt, seed + 300),
            expand=draw(st.booleans()),
            shared=draw(st.booleans()) and draw(st.booleans()),
            whole=whole,
        )

    return cases()
