"""A gather whose index is expanded over some dimensions -> advanced indexing with broadcast
index tensors (speed).

The ``grid_sample`` rewrite reads each bilinear tap with ``gather(x, 2, expand(t))``: ``x`` is
``[N, C, H*W]`` and ``t`` the ``[N, 1, P]`` pixel numbers, the same for every channel. TVM
materialises the expanded index (``broadcast_to``: for Deformable DETR's 8 heads x 32 channels
x 21,760 samples a 44.6 MB int64 tensor per tap, 16 taps a layer, 224 ms of a 1489 ms call on
an Intel Xeon) and reads it back in the gather. ``aten.index.Tensor`` takes index tensors that
broadcast against each other, and TVM's ``index_tensor`` reads them broadcast:

    gather(x, d, expand(t)) == x[arange(n_0)[:, None, ...], ..., t, ..., arange(n_last)]

(the arange of every dimension but ``d``, shaped to broadcast along its own dimension; ``t``
along ``d``). On ``[8, 32, 4096]`` with ``t`` of ``[8, 1, 21760]``, TVM: gather and expand 4.95 ms,
index_tensor 1.18 ms.

Runs after ``gather_through_permute``, which makes SAM3's gathers (the same index for every
batch and channel, from a channels-last map) row selections first.

Contract: bit-exact (the same elements, selected by the same indices; gather's indices lie in
``[0, size)``, PyTorch raises otherwise, so no negative index reaches the indexing); gathers
whose index is not an ``expand`` that broadcasts are left as they are.
"""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import strategies as st
from torch import Tensor, fx

from ..equivalence.strategies import dtypes, seeded_tensor
from .base import GraphRewrite, node_value
from .gather_through_permute import expanded_gather

aten = torch.ops.aten

CONTRACT = (
    "gather whose index is an expand broadcasting over some dimensions becomes aten.index.Tensor with the "
    "unexpanded index along the gathered dimension and an arange along every other: bit-exact; other "
    "gathers are left as they are"
)


def rewrite_gathers(graph: fx.Graph) -> int:
    done = 0
    for node in list(graph.nodes):
        found = expanded_gather(node)
        out = node_value(node)
        if found is None or out is None:
            continue
        x, dim, t = found
        shape = list(out.shape)
        expanded = list(node_value(t).shape)
        if any(size not in (1, full) for size, full in zip(expanded, shape)):
            continue
        if not any(size == 1 and full > 1 for size, full in zip(expanded, shape)):
            continue  # nothing broadcast: the gather reads a whole index already
        device = out.device
        with graph.inserting_before(node):
            indices = []
            for d, size in enumerate(shape):
                if d == dim:
                    indices.append(t)  # [1 or size along each dimension], size P along dim
                    continue
                along = graph.call_function(
                    aten.arange.start_step, (0, size, 1), {"dtype": torch.int64, "device": device}
                )  # [size]
                indices.append(
                    graph.call_function(aten.view.default, (along, [-1 if k == d else 1 for k in range(len(shape))]))
                )
            picked = graph.call_function(aten.index.Tensor, (x, indices))  # [out], the indices broadcast
        node.replace_all_uses_with(picked)
        done += 1
    return done


class GatherAsIndex(GraphRewrite):
    name = "gather_as_index"
    summary = "gather with an expanded index -> aten.index.Tensor with broadcast index tensors (speed)"
    contract = CONTRACT

    @staticmethod
    def cases(dtype=None):
        return gather_as_index_cases(dtype)

    def rewrite_graph(self, graph, program):
        return {"aten.gather.default": rewrite_gathers(graph)}


# ----------------------------------------------------------------------------- strategy


@dataclasses.dataclass
class GatherAsIndexCase:
    """``gather(x, dim, t.expand(shape))``, ``t`` of size 1 along the dimensions in ``broadcast``;
    ``shape`` may be smaller than ``x`` off ``dim``, as gather allows. Taken when ``broadcast``
    holds a dimension of size > 1."""

    x: Tensor
    t: Tensor
    dim: int
    shape: tuple[int, ...]

    @property
    def input(self) -> Tensor:
        return self.x

    def module(self) -> torch.nn.Module:
        return _GatherExpanded(self.dim, self.shape)

    def args(self) -> tuple:
        return (self.x, self.t)

    def reference(self) -> Tensor:
        return self.module()(*self.args())

    def rewritten(self) -> Tensor:
        program = torch.export.export(self.module(), self.args())
        return GatherAsIndex()(program).program.module()(*self.args())

    def taken(self) -> bool:
        return any(size == 1 and full > 1 for size, full in zip(self.t.shape, self.shape))

    scale = 1.0


class _GatherExpanded(torch.nn.Module):
    def __init__(self, dim, shape):
        super().__init__()
        self.dim, self.shape = dim, shape

    def forward(self, x, t):
        return torch.gather(x + 0.0, self.dim, t.expand(self.shape))


def gather_as_index_cases(dtype=None):
    """Hypothesis strategy of ``GatherAsIndexCase``: sources of rank 1-4, every gather dimension,
    indices expanded over any subset of the other dimensions (none: left alone), the gathered
    shape equal to or smaller than the source off ``dim``, indices at 0, the last position and
    between; Deformable DETR's ``[heads, channels, H*W]`` with per-head pixels among them."""

    @st.composite
    def cases(draw):
        dt = draw(dtypes) if dtype is None else dtype
        seed = draw(st.integers(0, 2**31 - 1))
        if draw(st.booleans()):  # the grid sampler's taps: [N, C, H*W], index [N, 1, P]
            n, c, hw, p = (draw(st.integers(1, 4)) for _ in range(4))
            x_shape, dim, shape, broadcast = (n, c, hw), 2, (n, c, p), {1}
        else:
            x_shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=4)))
            dim = draw(st.integers(0, len(x_shape) - 1))
            shape = tuple(
                draw(st.integers(1, 5)) if d == dim else draw(st.integers(1, size)) for d, size in enumerate(x_shape)
            )
            broadcast = set(draw(st.sets(st.sampled_from([d for d in range(len(x_shape)) if d != dim] or [dim]))))
            broadcast.discard(dim)
        x = seeded_tensor(x_shape, dt, seed)
        t_shape = [1 if d in broadcast else size for d, size in enumerate(shape)]
        top = x_shape[dim] - 1
        picks = draw(
            st.lists(st.sampled_from([0, top, top // 2]) | st.integers(0, top), min_size=1, max_size=1)
        )  # one drawn pick seeds the rest, edges included
        t = (torch.arange(int(torch.tensor(t_shape).prod())) * 7 + picks[0]).remainder(top + 1).view(t_shape)
        t.view(-1)[0], t.view(-1)[-1] = 0, top
        return GatherAsIndexCase(x, t, dim, shape)

    return cases()
