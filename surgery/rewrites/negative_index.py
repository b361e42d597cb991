"""``aten.select.int`` and ``aten.index.Tensor`` with negative indices -> the same operators with
indices in ``[0, size)``.

Transformers' RT-DETR takes ``logits = outputs_class[:, -1]``, exported as
``select.int(x, 1, -1)``. Stock TVM's converter emits ``take(x, -1, axis=1, mode="fast")``, which
reads out of bounds for a negative index: garbage or NaN, silently. ``index.Tensor`` with negative
entries in an integer index tensor (``x[:, i]``, ``i = [-1, 0, -3]``) goes through the same
``take`` and is as wrong; ``slice.Tensor`` with negative bounds is right.

A negative static ``select`` index becomes ``index + size`` (a static int: no new operator). An
integer index tensor of ``index.Tensor`` that may be negative is normalised before it as
``where(i < 0, i + size, i)``; boolean masks and ``None`` entries are left alone, and so are index
tensors known to be non-negative: ``arange``, ``argmax``/``argmin``/``argsort``, ``nonzero``, the
indices of ``topk``/``sort``/``max.dim``/``min.dim``, and this rewrite's own normalisation (so it
replaces nothing the second time). Constant index tensors are normalised too: TVM folds that
``where`` into the constant at import. The graph is searched in core ATen, as TVM's importer
decomposes it (``torch.take`` with negative indices becomes ``index.Tensor`` only there); a
program that calls neither a negative select nor ``index``/``take`` is left as it is.

The TVM probe (``probe_case``: ``x[:, -1]`` and ``x[:, i]`` with negative entries) finds wrong
numbers on apache-tvm 0.25.0, 0.26.0 and 0.27.0.

Contract: bit-exact for indices in ``[-size, size)`` (PyTorch raises outside it): the same
elements are read.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
from hypothesis import strategies as st
from torch import Tensor, fx

from ..equivalence.strategies import ALL_DTYPES, seeded_tensor
from .base import GraphRewrite, RewriteResult, decomposed, node_value

aten = torch.ops.aten

CONTRACT = (
    "bit-exact for every index in [-size, size) (PyTorch raises outside it): negative select indices "
    "become index + size, integer index tensors of index.Tensor that may be negative are normalised "
    "with where(i < 0, i + size, i); non-negative selects, boolean masks and index tensors known to "
    "be non-negative are left as they are"
)

# Operators whose (integer) result is never negative, and those whose output 1 is such indices.
_NON_NEGATIVE = frozenset(
    {
        aten.arange.default,
        aten.arange.start,
        aten.arange.start_step,
        aten.argmax.default,
        aten.argmin.default,
        aten.argsort.default,
        aten.argsort.stable,
        aten.nonzero.default,
    }
)
_INDICES_AT_1 = frozenset({aten.topk.default, aten.sort.default, aten.sort.stable, aten.max.dim, aten.min.dim})


def normalised_index(index: int, size: int) -> int:
    """A select index in ``[-size, size)`` as the same position in ``[0, size)``."""
    return index + size if index < 0 else index


def normalised_indices(index: Tensor, size: int) -> Tensor:
    """Integer indices in ``[-size, size)`` as the same positions in ``[0, size)``."""
    return torch.where(index < 0, index + size, index)


def _is_normalisation(node: fx.Node, size: int) -> bool:
    """``node`` is ``where(i < 0, i + size, i)``, as ``normalised_indices`` is exported."""
    if node.target is not aten.where.self:
        return False
    condition, shifted, index = node.args
    return (
        isinstance(condition, fx.Node)
        and condition.target is aten.lt.Scalar
        and tuple(condition.args) == (index, 0)
        and isinstance(shifted, fx.Node)
        and shifted.target is aten.add.Tensor
        and tuple(shifted.args) == (index, size)
    )


def _known_non_negative(node: fx.Node, size: int) -> bool:
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        source, position = node.args
        return position == 1 and isinstance(source, fx.Node) and source.target in _INDICES_AT_1
    return node.target in _NON_NEGATIVE or _is_normalisation(node, size)


def _integer_indices(node: fx.Node):
    """(position in the index list, index tensor node, size of the dimension it indexes) for
    every integer index tensor of an ``index.Tensor`` node; a boolean mask spans its rank."""
    shape = node_value(node.args[0]).shape
    dim = 0
    for position, index in enumerate(node.args[1]):
        val = node_value(index)
        if val is not None and val.dtype in (torch.bool, torch.uint8):
            dim += val.dim()
            continue
        if val is not None and isinstance(shape[dim], int):
            yield position, index, shape[dim]
        dim += 1


def _negative_select(node: fx.Node) -> bool:
    index = node.args[2]
    return isinstance(index, int) and index < 0 and isinstance(node_value(node.args[0]).shape[node.args[1]], int)


def _indices_to_normalise(node: fx.Node) -> list[tuple[int, fx.Node, int]]:
    return [(p, i, size) for p, i, size in _integer_indices(node) if not _known_non_negative(i, size)]


def needs_normalising(node: fx.Node) -> bool:
    """A ``select.int`` with a negative index, or an ``index.Tensor`` with an integer index tensor
    that may be negative."""
    if node.op != "call_function":
        return False
    if node.target is aten.select.int:
        return _negative_select(node)
    return node.target is aten.index.Tensor and bool(_indices_to_normalise(node))


def _may_need_normalising(node: fx.Node) -> bool:
    """Before decomposition: a negative select, or an operator that is or becomes an index."""
    if node.op != "call_function":
        return False
    if node.target is aten.select.int:
        return _negative_select(node)
    return node.target in (aten.index.Tensor, aten.take.default)


def normalise_selects(graph: fx.Graph) -> int:
    done = 0
    for node in graph.nodes:
        if node.op == "call_function" and node.target is aten.select.int and _negative_select(node):
            x, dim, index = node.args
            node.args = (x, dim, normalised_index(index, node_value(x).shape[dim]))
            done += 1
    return done


def normalise_index_tensors(graph: fx.Graph) -> int:
    done = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.index.Tensor:
            continue
        indices = list(node.args[1])
        for position, index, size in _indices_to_normalise(node):
            with graph.inserting_before(node):
                negative = graph.call_function(aten.lt.Scalar, (index, 0))  # same shape as index, bool
                shifted = graph.call_function(aten.add.Tensor, (index, size))
                indices[position] = graph.call_function(aten.where.self, (negative, shifted, index))
        if indices != list(node.args[1]):
            node.args = (node.args[0], indices)
            done += 1
    return done


class NegativeIndex(GraphRewrite):
    name = "negative_index"
    summary = "aten.select.int / aten.index.Tensor with negative indices -> the same with indices in [0, size)"
    contract = CONTRACT

    @staticmethod
    def cases(dtype=None):
        return negative_index_cases(dtype)

    probe_note = "x[:, -1] (RT-DETR's outputs_class[:, -1]) and x[:, i] with i = [-1, 0, -3]"

    def probe_case(self):
        x = torch.arange(40, dtype=torch.float32).view(2, 5, 4)
        return NegativeIndexCase(x, (("select", 1, -1), ("index", (1,), (torch.tensor([-1, 0, -3]),))))

    def replaces(self, node: fx.Node) -> bool:
        return needs_normalising(node)

    def rewrite_graph(self, graph, program):
        return {"aten.select.int": normalise_selects(graph), "aten.index.Tensor": normalise_index_tensors(graph)}

    def __call__(self, program: torch.export.ExportedProgram) -> RewriteResult:
        # A program that calls none of the operators that are, or decompose into, a negative
        # select or an index is left as it is, without paying for a decomposition (seconds on a
        # real model). Otherwise it is looked for in core ATen, as TVM's importer decomposes the
        # program (torch.take becomes index.Tensor there); with nothing to normalise, that
        # core-ATen program is handed back uncopied, so the importer's and the speed rewrites'
        # decomposition cost nothing again.
        if not any(_may_need_normalising(node) for node in program.graph.nodes):
            return RewriteResult(program, {})
        core = decomposed(program)
        if not any(needs_normalising(node) for node in core.graph.nodes):
            return RewriteResult(core, {})
        return super().__call__(core)


# ----------------------------------------------------------------------------- strategy


@dataclasses.dataclass
class NegativeIndexCase:
    """Picks from one tensor, their results flattened and concatenated: ``("select", dim, index)``
    is ``x.select(dim, index)``; ``("index", dims, tensors)`` is ``x[..., t0, ..., t1]`` with the
    index tensors at ``dims`` (program inputs: their sign is unknown to the rewrite)."""

    input: Tensor
    picks: tuple

    def _index_tensors(self) -> tuple[Tensor, ...]:
        return tuple(t for pick in self.picks if pick[0] == "index" for t in pick[2])

    def reference(self) -> Tensor:
        return _picked(self.picks, self.input, self._index_tensors(), normalise=False)

    def rewritten(self) -> Tensor:
        return _picked(self.picks, self.input, self._index_tensors(), normalise=True)

    def module(self) -> torch.nn.Module:
        return _PicksModule(tuple(pick if pick[0] == "select" else pick[:2] for pick in self.picks))

    def args(self) -> tuple:
        return (self.input, *self._index_tensors())

    scale = None


def _picked(picks, x: Tensor, tensors, normalise: bool) -> Tensor:
    tensors, out = list(tensors), []
    for pick in picks:
        if pick[0] == "select":
            _, dim, index = pick
            out.append(x.select(dim, normalised_index(index, x.shape[dim]) if normalise else index))
            continue
        key: list = [slice(None)] * (max(pick[1]) + 1)
        for dim in pick[1]:
            index = tensors.pop(0)
            key[dim] = normalised_indices(index, x.shape[dim]) if normalise else index
        out.append(x[tuple(key)])
    return torch.cat([o.reshape(-1) for o in out])


class _PicksModule(torch.nn.Module):
    def __init__(self, picks):
        super().__init__()
        self.picks = picks

    def forward(self, x, *tensors):
        return _picked(self.picks, x, tensors, normalise=False)


def negative_index_cases(dtype=None):
    """Hypothesis strategy of ``NegativeIndexCase``: tensors of rank 1-4 and sides 1-5, every
    dtype; one to three picks, the first one the rewrite must normalise (a negative select, or
    index tensors), the others selects of any index; indices across [-size, size), the edges
    -size, -1, 0 and size - 1 favoured; int64 and int32 index tensors of rank 1-2 (export makes
    ``x[t]`` with a 0-d ``t`` a select at ``t.item()``), one or two of them, of one shape, in one
    pick."""

    @st.composite
    def index_value(draw, size):
        return draw(st.sampled_from(sorted({-size, -1, 0, size - 1})) | st.integers(-size, size - 1))

    @st.composite
    def select(draw, shape, negative):
        dim = draw(st.integers(0, len(shape) - 1))
        index = draw(index_value(shape[dim]))
        return ("select", dim, -1 - (index % shape[dim]) if negative else index)  # negative: in [-size, -1]

    @st.composite
    def index(draw, shape):
        dims = sorted(draw(st.sets(st.integers(0, len(shape) - 1), min_size=1, max_size=min(2, len(shape)))))
        index_shape = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))  # 0-d: a select
        index_dtype = draw(st.sampled_from([torch.int64, torch.int32]))
        tensors = tuple(
            torch.tensor(
                draw(st.lists(index_value(shape[d]), min_size=math.prod(index_shape), max_size=math.prod(index_shape))),
                dtype=index_dtype,
            ).view(index_shape)
            for d in dims
        )
        return ("index", tuple(dims), tensors)

    @st.composite
    def cases(draw):
        dt = draw(st.sampled_from(ALL_DTYPES)) if dtype is None else dtype
        shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=4)))
        x = (seeded_tensor(shape, torch.float64, draw(st.integers(0, 2**31 - 1))) * 10).to(dt)
        first = draw(select(shape, negative=True) | index(shape))
        rest = draw(st.lists(select(shape, negative=False), max_size=2))
        return NegativeIndexCase(x, (first, *rest))

    return cases()
