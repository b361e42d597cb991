"""Gathers that read whole channels -> gathers of channels-last rows, the layout carried to where
the result shrinks (speed).

After ``gather_as_index`` Deformable DETR samples each level with

    x[arange(8)[:, None, None], arange(32)[None, :, None], t]      # x [heads, 32, H*W + 1], t [heads, 1, S]

the same pixel for every one of the 32 channels, which lie ``H*W + 1`` floats apart: each output
element is a scalar load from its own cache line, and everything after it (the taps' weights,
the weighted sum over the points) runs along the sampled axis. Moving the channels innermost
makes every sample one contiguous row of 32:

    x[a_0, a_1, t] == permute(permute(x, [0, 2, 1])[a_0', t'], [0, 2, 1])

and the permute is then carried forward instead of being done: through element-wise arithmetic
(the other operand is permuted, a broadcast one costs nothing), views (when the viewed order is
still a permutation of contiguous memory, found by replaying the view on an index tensor), sums
(over the matching axes) and permutes (composed), up to the first operator that needs the
logical layout, where the (by then reduced) tensor is permuted once. One deformable attention
layer at 512x512's four levels (8 heads, 5440 queries, 4 points), shipped TVM on a 2-core AVX2
EPYC: 41.0 -> 21.5 ms (the four level gathers 23.0 -> 6.8 ms, the sums over the points 7.9 ->
4.0).

A group of gathers is taken only where the permutes it leaves are of tensors at most half the
size of its gathered ones (a sum must come first), else the gathers stay as they are.

Contract: every element is the same arithmetic on the same operands (gathers, element-wise
operators, views and permutes are bit-exact); a ``sum`` adds the same terms along another memory
axis, which PyTorch may associate differently (float32 rounding of that sum). Taken:
``aten.index.Tensor`` with an index for every axis, where some axes before the last gathered one
(of more than one element) are indexed by their own ``arange`` and every other index is constant
along them.
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
    "index.Tensor whose leading-or-middle axes are indexed by their own arange becomes a gather of "
    "channels-last rows, the permute carried through element-wise operators, views, sums and permutes "
    "to where the tensor is at most half its gathered size: element-wise bit-exact, sums add the same "
    "terms (float32 rounding of each sum); groups that would permute a larger tensor are left as they are"
)

_ELEMENTWISE = frozenset({aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor})
_VIEWS = frozenset({aten.view.default, aten._unsafe_view.default, aten.reshape.default})
MAX_REPLAY_ELEMENTS = 1 << 25


@dataclasses.dataclass
class _Layout:
    """A node's value as ``permute(physical, order)``, where the physical tensor (built by
    ``_physical``) has ``shape`` and ``order[i]`` is the physical axis of logical axis ``i``;
    ``seeds`` are the gathers it comes from."""

    shape: list[int]
    order: list[int]
    seeds: frozenset


def _arange_axis(node, rank: int, size: int) -> int | None:
    """The axis ``d`` when ``node`` is ``view(arange(size), [1, .., -1 or size at d, .., 1])``."""
    if not (isinstance(node, fx.Node) and node.target in _VIEWS and len(node.args[1]) == rank):
        return None
    source = node.args[0]
    if not isinstance(source, fx.Node):
        return None
    if source.target is aten.arange.default:
        bounds = (0, source.args[0], 1)
    elif source.target is aten.arange.start_step:
        bounds = (source.args + (1,))[:3]
    elif source.target is aten.arange.start:
        bounds = (*source.args[:2], 1)
    else:
        return None
    if tuple(bounds) != (0, size, 1):
        return None
    axes = [d for d, n in enumerate(node.args[1]) if n != 1]
    return axes[0] if len(axes) == 1 and node.args[1][axes[0]] in (-1, size) else None


def _rows_axes(node: fx.Node) -> list[int] | None:
    """The axes an ``index.Tensor`` reads whole (by their own arange, every other index constant
    along them), when moving them innermost changes the layout; else None."""
    if node.op != "call_function" or node.target is not aten.index.Tensor:
        return None
    x, indices = node.args
    vx, out = node_value(x), node_value(node)
    if vx is None or out is None or len(indices) != vx.dim() or any(i is None for i in indices):
        return None
    if not (_static(vx) and _static(out)) or vx.dim() != out.dim() or out.numel() > MAX_REPLAY_ELEMENTS:
        return None
    rank = vx.dim()
    values = [node_value(i) for i in indices]
    if any(not isinstance(v, Tensor) or v.dim() != rank for v in values):
        return None
    ranges = [d for d, i in enumerate(indices) if vx.shape[d] > 1 and _arange_axis(i, rank, vx.shape[d]) == d]
    # an axis is read whole when its arange is the only index that varies along it
    whole = [k for k in ranges if all(v.shape[k] == 1 for d, v in enumerate(values) if d != k)]
    gathered = [d for d in range(rank) if d not in whole]
    if not whole or not gathered or whole == list(range(rank - len(whole), rank)):
        return None  # nothing read whole, nothing gathered, or the rows are innermost already
    return whole


def _as_permuted_contiguous(index: Tensor) -> tuple[list[int], list[int]] | None:
    """``(shape, order)`` with ``index == arange.view(shape).permute(order)`` (order as
    ``_Layout.order``), or None when ``index`` lists memory in no such order."""
    strides = []
    for d, size in enumerate(index.shape):
        strides.append(int(index.select(d, 1).flatten()[0] - index.flatten()[0]) if size > 1 else 0)
    if int(index.flatten()[0]) != 0:
        return None
    # size-1 axes first (their place is free), then by decreasing stride
    physical = sorted(range(index.dim()), key=lambda d: (index.shape[d] != 1, -strides[d]))
    expected = 1
    for d in reversed(physical):
        if index.shape[d] > 1 and strides[d] != expected:
            return None
        expected *= index.shape[d]
    shape = [index.shape[d] for d in physical]
    order = [physical.index(d) for d in range(index.dim())]
    if not torch.equal(torch.arange(index.numel()).view(shape).permute(order), index):
        return None
    return shape, order


def _composed_view(layout: _Layout, out_shape) -> tuple[list[int], list[int]] | None:
    """The layout of ``view(permute(physical, order), out_shape)``, when there is one."""
    if math.prod(layout.shape) > MAX_REPLAY_ELEMENTS:
        return None
    index = torch.arange(math.prod(layout.shape)).view(layout.shape).permute(layout.order).reshape(list(out_shape))
    return _as_permuted_contiguous(index)


def _static(value: Tensor) -> bool:
    return all(isinstance(size, int) for size in value.shape)


def _identity(order) -> bool:
    return list(order) == list(range(len(order)))


class _Plan:
    """Which nodes take a physical layout, from which gathers (``layouts``), for a seed set."""

    def __init__(self, graph: fx.Graph, seeds: dict[fx.Node, list[int]]):
        self.whole = seeds  # each gather's axes read whole
        self.layouts: dict[fx.Node, _Layout] = {}
        for node in graph.nodes:
            if node in seeds:
                self.layouts[node] = self._seed(node, seeds[node])
            elif node.op == "call_function":
                layout = self._follow(node)
                if layout is not None:
                    self.layouts[node] = layout

    @staticmethod
    def _seed(node, whole) -> _Layout:
        out = node_value(node)
        rank = out.dim()
        physical = [d for d in range(rank) if d not in whole] + whole
        return _Layout([out.shape[d] for d in physical], [physical.index(d) for d in range(rank)], frozenset([node]))

    def _follow(self, node: fx.Node) -> _Layout | None:
        args = [a for a in node.args if isinstance(a, fx.Node)]
        carried = [a for a in args if a in self.layouts]
        out = node_value(node)
        if not carried or not isinstance(out, Tensor) or not _static(out) or node.kwargs:
            return None
        first = self.layouts[carried[0]]
        seeds = frozenset().union(*(self.layouts[a].seeds for a in carried))
        if node.target in _ELEMENTWISE:
            for a in args:
                value = node_value(a)
                if a in self.layouts:
                    if self.layouts[a].order != first.order or tuple(value.shape) != tuple(out.shape):
                        return None
                elif (
                    not isinstance(value, Tensor)
                    or not _static(value)
                    or value.dim() > out.dim()
                    or value.numel() * 2 > out.numel()
                ):
                    return None  # only small (broadcast) operands are permuted to meet the layout
            return _Layout(first.shape, first.order, seeds)
        if node.target in _VIEWS and node.args[0] in self.layouts:
            found = _composed_view(first, out.shape)
            return None if found is None else _Layout(found[0], found[1], seeds)
        if node.target is aten.permute.default and node.args[0] in self.layouts:
            perm = [p % out.dim() for p in node.args[1]]
            return _Layout(first.shape, [first.order[p] for p in perm], seeds)
        if node.target is aten.sum.dim_IntList and node.args[0] in self.layouts and len(node.args) >= 2:
            rank = len(first.order)
            dims, keep = _summed(node, rank)
            gone = {first.order[d] for d in dims}
            if keep:
                return _Layout([1 if p in gone else s for p, s in enumerate(first.shape)], first.order, seeds)
            left = [p for p in range(rank) if p not in gone]
            shape = [first.shape[p] for p in left]
            order = [left.index(first.order[d]) for d in range(rank) if d not in dims]
            return _Layout(shape, order, seeds)
        return None

    def exits(self) -> list[fx.Node]:
        """Nodes whose value leaves the carried layout (a user outside it, or the output)."""
        return [node for node in self.layouts if any(user not in self.layouts for user in node.users)]


def _plan(graph: fx.Graph) -> _Plan | None:
    seeds = {node: whole for node in graph.nodes if (whole := _rows_axes(node)) is not None}
    while seeds:
        plan = _Plan(graph, seeds)
        smallest = {seed: node_value(seed).numel() for seed in seeds}
        refused = set()
        for node in plan.exits():
            layout = plan.layouts[node]
            if not _identity(layout.order) and 2 * math.prod(layout.shape) > min(smallest[s] for s in layout.seeds):
                refused |= layout.seeds
        if not refused:
            return plan
        seeds = {s: w for s, w in seeds.items() if s not in refused}
    return None


def _build(graph: fx.Graph, plan: _Plan) -> int:
    physical: dict[fx.Node, fx.Node] = {}
    sources: dict[tuple, fx.Node] = {}  # one permuted map for all the gathers from it
    for node, layout in plan.layouts.items():
        with graph.inserting_before(node):
            physical[node] = _physical(graph, node, layout, plan, physical, sources)
    for node in plan.exits():
        layout = plan.layouts[node]
        with graph.inserting_before(node):
            value = physical[node]
            if not _identity(layout.order):
                value = graph.call_function(aten.permute.default, (value, layout.order))
                value = graph.call_function(aten.clone.default, (value,), {"memory_format": torch.contiguous_format})
        node.replace_all_uses_with(value, delete_user_cb=lambda user: user not in plan.layouts)
    return sum(1 for node in plan.layouts if node.target is aten.index.Tensor)


def _physical(graph, node, layout: _Layout, plan: _Plan, physical, sources) -> fx.Node:
    """The node computing ``node``'s value in ``layout``'s physical order."""
    rank = len(layout.order)
    if node.target is aten.index.Tensor:  # a gather: the map permuted, then indexed
        x, indices = node.args
        physical_axes = _inverse(layout.order)  # the logical axis of each physical one
        gathered = [d for d in physical_axes if d not in plan.whole[node]]
        key = (x, tuple(physical_axes))
        if key not in sources:  # before the first gather from it; the later ones come after it
            sources[key] = graph.call_function(aten.permute.default, (x, physical_axes))
        source = sources[key]
        picks = []
        for d in gathered:
            shape = [node_value(indices[d]).shape[k] for k in gathered]
            picks.append(graph.call_function(aten.view.default, (indices[d], shape)))
        return graph.call_function(aten.index.Tensor, (source, picks))
    if node.target in _ELEMENTWISE:
        args = []
        for a in node.args:
            if isinstance(a, fx.Node) and a in plan.layouts:
                args.append(physical[a])
            elif isinstance(a, fx.Node):
                value = node_value(a)
                full = graph.call_function(aten.view.default, (a, [1] * (rank - value.dim()) + list(value.shape)))
                moved = graph.call_function(aten.permute.default, (full, _inverse(layout.order)))
                # contiguous, so that the result is too (a later view of it needs that)
                args.append(
                    graph.call_function(aten.clone.default, (moved,), {"memory_format": torch.contiguous_format})
                )
            else:
                args.append(a)
        return graph.call_function(node.target, tuple(args))
    source = physical[node.args[0]]
    if node.target in _VIEWS:
        return graph.call_function(aten.view.default, (source, layout.shape))
    if node.target is aten.permute.default:
        return source
    # sum.dim_IntList
    first = plan.layouts[node.args[0]]
    dims, keep = _summed(node, len(first.order))
    return graph.call_function(aten.sum.dim_IntList, (source, sorted(first.order[d] for d in dims), keep))


def _summed(node: fx.Node, rank: int) -> tuple[list[int], bool]:
    """A ``sum.dim_IntList``'s summed (logical) axes, made non-negative, and its ``keepdim``."""
    dims = sorted({d % rank for d in node.args[1]}) if node.args[1] else list(range(rank))
    return dims, bool(len(node.args) > 2 and node.args[2])


def _inverse(order: list[int]) -> list[int]:
    """``p`` with ``permute(permute(physical, order), p) == physical``."""
    return sorted(range(len(order)), key=lambda d: order[d])


def rewrite_gathers(graph: fx.Graph) -> int:
    plan = _plan(graph)
    return 0 if plan is None else _build(graph, plan)


class ChannelsLastGathers(GraphRewrite):
    name = "channels_last_gathers"
    summary = "gathers reading whole channels -> channels-last rows, the permute carried to a smaller tensor (speed)"
    contract = CONTRACT

    @staticmethod
    def cases(dtype=None):
        return channels_last_cases(dtype)

    def rewrite_graph(self, graph, program):
        return {"aten.index.Tensor": rewrite_gathers(graph)}


# ----------------------------------------------------------------------------- strategy


@dataclasses.dataclass
class ChannelsLastCase:
    """The grid sampler's two taps of ``x [A, C, n]`` at pixels ``t [A, 1, Q*P]`` (and the next
    pixel), weighted, then (``tail``) returned as gathered, summed over the points with
    ``attention [A, 1, Q, P]``, or summed and laid out as Deformable DETR's ``[1, Q, A*C]``.
    Taken when there are channels to move (C > 1) and the sum shrinks the tensor at least
    twofold (P >= 2) before it is laid out, or the layout needs no permute at all."""

    x: Tensor
    t: Tensor
    weight: Tensor
    attention: Tensor
    tail: str

    @property
    def input(self) -> Tensor:
        return self.x

    def module(self) -> torch.nn.Module:
        return _Sampler(self.tail)

    def args(self) -> tuple:
        return (self.x, self.t, self.weight, self.attention)

    def reference(self) -> Tensor:
        return self.module()(*self.args())

    def rewritten(self) -> Tensor:
        program = torch.export.export(self.module(), self.args())
        return ChannelsLastGathers()(program).program.module()(*self.args())

    def taken(self) -> bool:
        heads, channels, _ = self.x.shape
        queries, points = self.attention.shape[-2:]
        if self.tail == "gathered" or channels == 1:
            return False
        # with one point nothing shrinks, but Deformable DETR's [1, Q, A*C] is then the gathered
        # rows' own order when there is one head or one query: no permute left at all
        return points >= 2 or (self.tail == "msda" and 1 in (heads, queries))

    scale = 1.0


class _Sampler(torch.nn.Module):
    def __init__(self, tail: str):
        super().__init__()
        self.tail = tail

    def forward(self, x, t, weight, attention):
        a, c, n = x.shape
        heads, channels = torch.arange(a).view(-1, 1, 1), torch.arange(c).view(1, -1, 1)
        taps = x[heads, channels, t] * weight + x[heads, channels, (t + 1).remainder(n)] * (1 - weight)  # [A, C, S]
        if self.tail == "gathered":
            return taps
        q, p = attention.shape[-2:]
        summed = (taps.view(a, c, q, p) * attention).sum(-1)  # [A, C, Q]
        if self.tail == "sum":
            return summed
        return summed.view(1, a * c, q).permute(0, 2, 1).contiguous()  # [1, Q, A*C]


def channels_last_cases(dtype=None):
    """Hypothesis strategy of ``ChannelsLastCase``: 1-3 heads, 1-6 channels, 1-7 pixels, 1-4
    queries and points (one point: not taken), pixels at 0, the last one and between, every tail."""

    @st.composite
    def cases(draw):
        dt = draw(dtypes) if dtype is None else dtype
        seed = draw(st.integers(0, 2**31 - 1))
        a, c, n, q, p = (draw(st.integers(1, hi)) for hi in (3, 6, 7, 4, 4))
        x = seeded_tensor((a, c, n), dt, seed)
        first = draw(st.sampled_from([0, n - 1, n // 2]) | st.integers(0, n - 1))
        t = (torch.arange(a * q * p) * 5 + first).remainder(n).view(a, 1, q * p)
        weight = seeded_tensor((a, 1, q * p), dt, seed + 1)
        attention = seeded_tensor((a, 1, q, p), dt, seed + 2)
        return ChannelsLastCase(x, t, weight, attention, draw(st.sampled_from(["gathered", "sum", "msda"])))

    return cases()
