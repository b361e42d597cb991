"""A gather of whole rows from a permuted tensor -> an index_select of the unpermuted one (speed).

The ``grid_sample`` rewrite reads its taps with ``gather(x, 2, index)`` from the feature map
flattened to ``[N, C, H*W]``, the same pixel indices for every channel (``index`` is an
``expand`` over channels). SAM3's feature map is channels-last underneath: ``x`` is a permute of
the ``[H*W, N, C]`` features, so TVM first transposes all 5.3 MB to channel-major (0.4 ms a
call here) to then read 4 taps x 3 points of it. Gathering the same index for every channel
along ``d`` is ``index_select`` along ``d``, and an ``index_select`` commutes with a permute:

    gather(permute(s, p), d, expand(i)) == permute(index_select(s, p[d], i), p)

so the rewrite selects the needed rows of ``s`` (contiguous C-long rows) and permutes only them.

The chain from ``s`` to the gathered tensor is checked by replaying it on an index tensor: it
must equal one ``permute`` of ``s`` (views that only restore the permute's shape are allowed).

Contract: bit-exact (the same elements, selected by the same indices); gathers whose index
varies along another dimension, or whose source is not one permute away, are left as they are.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
from hypothesis import strategies as st
from torch import Tensor, fx

from ..equivalence.strategies import dtypes, seeded_tensor
from .base import GraphRewrite, node_value
from .layout_round_trips import _chain, replayed_index

aten = torch.ops.aten

CONTRACT = (
    "gather with the same index for every position of the other dimensions, from a tensor that "
    "is one permute of another, becomes an index_select of that other tensor and a permute of the "
    "rows selected: bit-exact; anything else is left as it is"
)


def expanded_gather(node: fx.Node) -> tuple[fx.Node, int, fx.Node] | None:
    """``(x, dim, t)`` when ``node`` is ``gather(x, dim, expand(t))`` (no sparse gradient) with
    ``t`` an int64 tensor of the gather's rank: an index the gather reads broadcast. ``dim`` is
    made non-negative."""
    if node.op != "call_function" or node.target is not aten.gather.default or node.kwargs.get("sparse_grad"):
        return None
    x, dim, index = node.args[:3]
    if not (isinstance(index, fx.Node) and index.op == "call_function" and index.target is aten.expand.default):
        return None
    t = index.args[0]
    vx, vt = node_value(x), node_value(t)
    if vx is None or vt is None or vt.dtype != torch.int64 or vt.dim() != vx.dim():
        return None
    return x, dim % vx.dim(), t


def _as_one_permute(source: fx.Node, chain: list[fx.Node], shape) -> list[int] | None:
    """The permutation ``p`` with ``chain(source) == permute(source, p)`` (shapes included)."""
    replayed = replayed_index(source, chain) if chain else None
    if replayed is None:
        return None
    index, result = replayed
    if index.dim() != len(shape) or index.dim() > 6:
        return None
    for perm in itertools.permutations(range(index.dim())):
        candidate = index.permute(perm)
        if tuple(candidate.shape) == tuple(shape) and torch.equal(candidate, result):
            return list(perm)
    return None


def rewrite_gathers(graph: fx.Graph) -> int:
    done = 0
    for node in list(graph.nodes):
        found = expanded_gather(node)
        if found is None:
            continue
        x, dim, rows = found
        if any(size != 1 for d, size in enumerate(node_value(rows).shape) if d != dim):
            continue  # the same index for every position of the other dimensions only
        source, chain = _chain(x)
        perm = _as_one_permute(source, chain, node_value(x).shape)
        if perm is None:
            continue
        with graph.inserting_before(node):
            flat = graph.call_function(aten.view.default, (rows, [-1]))  # the indices, once
            picked = graph.call_function(aten.index_select.default, (source, perm[dim], flat))
            out = graph.call_function(aten.permute.default, (picked, perm))
            out = graph.call_function(aten.clone.default, (out,), {"memory_format": torch.contiguous_format})
        node.replace_all_uses_with(out)
        done += 1
    return done


class GatherThroughPermute(GraphRewrite):
    name = "gather_through_permute"
    summary = "gather of whole rows from a permuted tensor -> index_select before the permute (speed)"
    contract = CONTRACT

    @staticmethod
    def cases(dtype=None):
        return gather_cases(dtype)

    def rewrite_graph(self, graph, program):
        return {"aten.gather.default": rewrite_gathers(graph)}


# ----------------------------------------------------------------------------- strategy


@dataclasses.dataclass
class GatherCase:
    """``gather(s.permute(perm) (+ views back to that shape), dim, index)``; ``index`` either
    broadcast along every other dimension (rewritten) or varying along them (left alone)."""

    s: Tensor
    perm: tuple
    dim: int
    index: Tensor  # [..., P at dim, ...], sizes 1 elsewhere when broadcast
    broadcast: bool

    @property
    def input(self):
        return self.s

    def reference(self) -> Tensor:
        return _GatherModule(self.perm, self.dim, self.broadcast)(self.s, self.index)

    def rewritten(self) -> Tensor:
        program = torch.export.export(self.module(), self.args())
        return GatherThroughPermute()(program).program.module()(*self.args())

    def module(self) -> torch.nn.Module:
        return _GatherModule(self.perm, self.dim, self.broadcast)

    def args(self) -> tuple:
        return (self.s, self.index)

    scale = 1.0


class _GatherModule(torch.nn.Module):
    def __init__(self, perm, dim, broadcast):
        super().__init__()
        self.perm, self.dim, self.broadcast = perm, dim, broadcast

    def forward(self, s, index):
        x = (s + 0.0).permute(*self.perm)
        if self.broadcast:
            shape = list(x.shape)
            shape[self.dim] = index.shape[self.dim]
            index = index.expand(shape)
        return torch.gather(x, self.dim, index)


def gather_cases(dtype=None):
    """Hypothesis strategy of ``GatherCase``: sources of rank 2-4 (SAM3's [HW, 1, C] among them),
    every permutation and gather dimension, 1-5 indices (repeats and the edges included), the
    index broadcast over the other dimensions or varying along them."""

    @st.composite
    def cases(draw):
        dt = draw(dtypes) if dtype is None else dtype
        seed = draw(st.integers(0, 2**31 - 1))
        if draw(st.booleans()):
            shape, perm, dim = (draw(st.integers(1, 30)), 1, draw(st.integers(1, 8))), (1, 2, 0), 2  # SAM3's
        else:
            shape = tuple(draw(st.lists(st.integers(1, 5), min_size=2, max_size=4)))
            perm = tuple(draw(st.permutations(range(len(shape)))))
            dim = draw(st.integers(0, len(shape) - 1))
        s = seeded_tensor(shape, dt, seed)
        permuted = [shape[p] for p in perm]
        n = permuted[dim]
        count = draw(st.integers(1, 5))
        picks = draw(
            st.lists(
                st.sampled_from(sorted({0, n - 1, n // 2})) | st.integers(0, n - 1), min_size=count, max_size=count
            )
        )
        broadcast = draw(st.booleans())
        index_shape = [1] * len(shape) if broadcast else list(permuted)
        index_shape[dim] = count
        if broadcast:
            index = torch.tensor(picks, dtype=torch.int64).view(index_shape)
        else:
            index = torch.tensor(picks, dtype=torch.int64).view([count if d == dim else 1 for d in range(len(shape))])
            varying = torch.arange(int(torch.tensor(index_shape).prod())).view(index_shape)  # along every dimension
            index = (index + varying).remainder(n).contiguous()
        return GatherCase(s, perm, dim, index, broadcast)

    return cases()
