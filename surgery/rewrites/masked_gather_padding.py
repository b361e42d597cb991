"""A masked gather, ``where(mask, gather(x, d, expand(t)), 0)`` -> a gather from ``x`` with a zero
appended along ``d``, the masked-out indices pointing at it (speed).

The ``grid_sample`` rewrite zeroes the bilinear taps that fall off the map by masking the
gathered values (masking the weights instead would turn an inf at the clamped pixel into NaN).
The mask is the same for every channel (``[N, 1, P]``), but TVM fuses its computation into the
``[N, C, P]`` kernel that uses it, so the coordinates' bounds are compared and combined once per
channel: for Deformable DETR's 8 heads x 32 channels x 21,760 samples, four such kernels a layer
took 57 ms. Reading a zero pixel appended to the map gives the same value and moves the mask
onto the index, which has no channel dimension:

    where(mask, gather(x, d, expand(t)), 0) == gather(cat([x, 0], d), d, expand(where(mask, t, size_d)))

(one deformable attention layer at 512x512: 106 -> 64-70 ms; its four level kernels 57 -> 26 ms).

Runs after ``gather_through_permute`` (SAM3's gathers are row selections by then, and a padded
map would need a copy of the whole map per call) and before ``gather_as_index``, which reads the
new gathers' expanded indices broadcast.

Contract: bit-exact (the appended zero is +0.0, as ``where``'s 0; every unmasked position reads
the same element); the mask must broadcast to the unexpanded index's shape, the gather have no
other user; anything else is left as it is.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from hypothesis import strategies as st
from torch import Tensor, fx

from ..equivalence.strategies import dtypes, seeded_tensor
from .base import GraphRewrite, node_value
from .gather_through_permute import expanded_gather

aten = torch.ops.aten

CONTRACT = (
    "where(mask, gather(x, d, expand(t)), 0) with the mask broadcasting to t's shape becomes a gather from x "
    "with a zero appended along d, at where(mask, t, size of d): bit-exact; anything else is left as it is"
)


def _positive_zero(value) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0 and math.copysign(1, value) > 0
    )


def _zero_other(node: fx.Node) -> bool:
    """Whether ``where``'s other operand is +0: the number, or a ``scalar_tensor`` (as
    decomposition leaves it) or ``full`` (as where_scalar leaves it) of it."""
    other = node.args[2]
    if node.target is aten.where.ScalarOther:
        return _positive_zero(other)
    if not isinstance(other, fx.Node):
        return False
    if other.target is aten.scalar_tensor.default:
        return _positive_zero(other.args[0])
    return other.target is aten.full.default and _positive_zero(other.args[1])


def _masked_gather(node: fx.Node):
    """``(mask, x, dim, t)`` when ``node`` is ``where(mask, gather(x, dim, expand(t)), 0)``."""
    if node.op != "call_function" or node.target not in (aten.where.ScalarOther, aten.where.self):
        return None
    if not _zero_other(node):
        return None
    mask, gathered = node.args[0], node.args[1]
    found = expanded_gather(gathered) if isinstance(gathered, fx.Node) else None
    if found is None or list(gathered.users) != [node]:
        return None
    x, dim, t = found
    vm, vt, vg, vw = (node_value(n) for n in (mask, t, gathered, node))
    if any(v is None for v in (vm, vg, vw)) or vm.dtype != torch.bool:
        return None
    if tuple(vw.shape) != tuple(vg.shape) or vw.dtype != vg.dtype:
        return None
    if tuple(torch.broadcast_shapes(vm.shape, vt.shape)) != tuple(vt.shape):
        return None
    return mask, x, dim, t


def rewrite_masked_gathers(graph: fx.Graph) -> int:
    done = 0
    padded: dict[tuple[fx.Node, int], fx.Node] = {}  # one padded copy of each map, for all its taps
    for node in list(graph.nodes):
        found = _masked_gather(node)
        if found is None:
            continue
        mask, x, dim, t = found
        vx, vt, vg = node_value(x), node_value(t), node_value(node)
        size = vx.shape[dim]
        if (x, dim) not in padded:
            # right after the map, or after the last input when the map is one (inputs come first)
            after = x if x.op != "placeholder" else [n for n in graph.nodes if n.op == "placeholder"][-1]
            with graph.inserting_after(after):
                zero_shape = [1 if d == dim else s for d, s in enumerate(vx.shape)]
                zero = graph.call_function(
                    aten.full.default, (zero_shape, 0.0), {"dtype": vx.dtype, "device": vx.device}
                )  # [x with 1 along dim], +0.0
            with graph.inserting_after(zero):
                padded[(x, dim)] = graph.call_function(aten.cat.default, ([x, zero], dim))  # [x, size + 1 along dim]
        with graph.inserting_before(node):
            beyond = graph.call_function(
                aten.full.default, (list(vt.shape), size), {"dtype": torch.int64, "device": vt.device}
            )  # [t] the appended zero's index
            index = graph.call_function(aten.where.self, (mask, t, beyond))  # [t]
            index = graph.call_function(aten.expand.default, (index, list(vg.shape)))  # [out]
            out = graph.call_function(aten.gather.default, (padded[(x, dim)], dim, index))  # [out]
        node.replace_all_uses_with(out)
        done += 1
    return done


class MaskedGatherPadding(GraphRewrite):
    name = "masked_gather_padding"
    summary = "where(mask, gather(x, d, expand(t)), 0) -> gather from x with a zero appended along d (speed)"
    contract = CONTRACT

    @staticmethod
    def cases(dtype=None):
        return masked_gather_cases(dtype)

    def rewrite_graph(self, graph, program):
        return {"aten.where of aten.gather": rewrite_masked_gathers(graph)}


# ----------------------------------------------------------------------------- strategy


@dataclasses.dataclass
class MaskedGatherCase:
    """``where(mask, gather(x, dim, t.expand(shape)), 0)`` for the grid sampler's ``[N, C, L]``
    maps with ``[N, 1, P]`` pixels, masks of ``[N, 1, P]`` or ``[1, 1, P]``; inf and NaN in the
    map (masked-out taps must stay 0, unmasked ones read them); taken always. ``taps`` of them
    on the same map share one padded copy."""

    x: Tensor  # [N, C, L]
    pixels: list[Tensor]  # taps x [N, 1, P]
    masks: list[Tensor]  # taps x [N or 1, 1, P]

    @property
    def input(self) -> Tensor:
        return self.x

    computed: bool = True  # the map computed in the graph, or a program input

    def module(self) -> torch.nn.Module:
        return _MaskedTaps(len(self.pixels), self.computed)

    def args(self) -> tuple:
        return (self.x, *self.pixels, *self.masks)

    def reference(self) -> Tensor:
        return self.module()(*self.args())

    def rewritten(self) -> Tensor:
        program = torch.export.export(self.module(), self.args())
        return MaskedGatherPadding()(program).program.module()(*self.args())

    scale = 1.0


class _MaskedTaps(torch.nn.Module):
    def __init__(self, taps: int, computed: bool):
        super().__init__()
        self.taps, self.computed = taps, computed

    def forward(self, x, *pixels_and_masks):
        pixels, masks = pixels_and_masks[: self.taps], pixels_and_masks[self.taps :]
        n, c, _ = x.shape
        if self.computed:
            x = x * 1.0  # a computed map, as the model's
        values = [
            torch.where(mask, x.gather(2, pixel.expand(n, c, pixel.shape[2])), 0) for pixel, mask in zip(pixels, masks)
        ]
        return torch.stack(values)  # [taps, N, C, P]


def masked_gather_cases(dtype=None):
    """Hypothesis strategy of ``MaskedGatherCase``: 1-4 taps over a map of 1-3 batches, 1-4
    channels, 1-9 pixels, a few of them inf or NaN; indices at both ends and between; masks per
    batch or shared, all true, all false or mixed; the map computed or a program input."""

    @st.composite
    def cases(draw):
        dt = draw(dtypes) if dtype is None else dtype
        seed = draw(st.integers(0, 2**31 - 1))
        n, c, length, p = (
            draw(st.integers(1, 3)),
            draw(st.integers(1, 4)),
            draw(st.integers(1, 9)),
            draw(st.integers(1, 6)),
        )
        x = seeded_tensor((n, c, length), dt, seed)
        for value in draw(st.lists(st.sampled_from([float("inf"), float("-inf"), float("nan")]), max_size=2)):
            x.view(-1)[draw(st.integers(0, x.numel() - 1))] = value
        taps = draw(st.integers(1, 4))
        generator = torch.Generator().manual_seed(seed)
        pixels, masks = [], []
        for _ in range(taps):
            pixel = torch.randint(0, length, (n, 1, p), generator=generator)
            pixel.view(-1)[0], pixel.view(-1)[-1] = 0, length - 1
            kind = draw(st.sampled_from(["mixed", "all", "none"]))
            mask_n = draw(st.sampled_from([n, 1]))
            mask = torch.rand(mask_n, 1, p, generator=generator) < 0.5
            if kind != "mixed":
                mask = torch.full((mask_n, 1, p), kind == "all")
            pixels.append(pixel)
            masks.append(mask)
        return MaskedGatherCase(x, pixels, masks, draw(st.booleans()))

    return cases()
