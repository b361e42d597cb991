"""Chains of layout operators that end where they started -> one view (speed).

SAM3 hands the geometry encoder its image features sequence-first, ``[H*W, B, C]``, permutes
them to ``[B, C, H, W]`` for ``grid_sample``/``roi_align``, and ``roi_align_separable`` takes the
one map back channels-last as ``[H, W*C]``: two transposes of 5.3 MB (and a ``select``) whose
composition is the identity on memory order. PyTorch pays for them lazily (views, one copy);
TVM materialises every step (~1 ms per call on this machine). This rewrite finds chains of
layout-only operators (view, reshape, permute, clone, select/squeeze/unsqueeze of a size-1 axis)
and, where the chain's result lists its source's elements in the source's own order, replaces
the chain's end by a ``view`` of the source.

The test is not a pattern over op names: the chain is *replayed on an index tensor* (element i
of the source holds i) and accepted only when the result is ``arange`` in the result's shape.

Contract: bit-exact (only data movement is removed; every value is the same element of the same
tensor); chains that reorder elements, that start at a program input, or that read a
non-contiguous source are left alone.
"""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import strategies as st
from torch import Tensor, fx

from ..equivalence.strategies import dtypes, seeded_tensor
from .base import LAYOUT_OPS, GraphRewrite, node_value

aten = torch.ops.aten

CONTRACT = (
    "chains of layout operators (view, reshape, permute, clone, select/squeeze/unsqueeze of a "
    "size-1 axis) whose result lists its source's elements in the source's memory order become "
    "one view of the source: bit-exact; chains that reorder elements or start at a program input are "
    "left as they are"
)

_LAYOUT = LAYOUT_OPS | {aten.squeeze.default, aten.select.int}  # select: of a size-1 axis only (_is_layout)
MAX_REPLAY_ELEMENTS = 1 << 24  # index tensors are float64 copies of the source's shape


def _is_layout(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in _LAYOUT:
        return False
    if node.target is aten.clone.default and node.kwargs.get("memory_format") not in (None, torch.contiguous_format):
        return False
    if node.target is aten.select.int:  # only the element of a size-1 axis: a view dropping it
        source = node_value(node.args[0])
        return source is not None and source.shape[node.args[1]] == 1
    if node.target is aten.expand.default:  # only an expand that adds nothing (a no-op)
        source, out = node_value(node.args[0]), node_value(node)
        return source is not None and out is not None and tuple(source.shape) == tuple(out.shape)
    return True


def _chain(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """The first non-layout ancestor of ``node`` and the layout operators from it to ``node``."""
    chain = []
    while isinstance(node, fx.Node) and _is_layout(node):
        chain.append(node)
        node = node.args[0]
    return node, list(reversed(chain))


def _replay(chain: list[fx.Node], probe: Tensor) -> Tensor:
    for node in chain:
        probe = node.target(probe, *node.args[1:], **node.kwargs)
    return probe


def replayed_index(source: fx.Node, chain: list[fx.Node]) -> tuple[Tensor, Tensor] | None:
    """The source's element numbers (element i holds i, in the source's shape) and what the
    chain makes of them; None for a source unknown, too large or not contiguous, or a chain
    that can't be replayed."""
    val = node_value(source)
    if val is None or val.numel() > MAX_REPLAY_ELEMENTS or not val.is_contiguous():
        return None
    index = torch.arange(val.numel(), dtype=torch.float64).view(tuple(val.shape))
    try:
        return index, _replay(chain, index)
    except Exception:  # noqa: BLE001 - a chain we can't replay is not ours to rewrite
        return None


def _is_identity(source: fx.Node, chain: list[fx.Node]) -> bool:
    out = node_value(chain[-1])
    replayed = replayed_index(source, chain)
    if out is None or replayed is None:
        return False
    index, result = replayed
    return tuple(result.shape) == tuple(out.shape) and torch.equal(result.reshape(-1), index.reshape(-1))


def simplify(graph: fx.Graph) -> int:
    """Replace the end of every identity-order layout chain of two or more operators by a view."""
    done = 0
    for node in list(graph.nodes):
        if not _is_layout(node) or all(_is_layout(user) for user in node.users):
            continue  # only chain ends: nodes some non-layout operator (or the output) reads
        source, chain = _chain(node)
        # an operator's output, not a program input: an input may arrive with other strides than
        # its example had, and a view of it would then fail
        if len(chain) < 2 or source.op != "call_function" or not _is_identity(source, chain):
            continue
        with graph.inserting_before(node):
            view = graph.call_function(aten.view.default, (source, list(node_value(node).shape)))
        node.replace_all_uses_with(view)
        done += 1
    return done


class LayoutRoundTrips(GraphRewrite):
    name = "layout_round_trips"
    summary = "layout chains that end in their source's memory order -> one view (speed)"
    contract = CONTRACT

    @staticmethod
    def cases(dtype=None):
        return layout_cases(dtype)

    def rewrite_graph(self, graph, program):
        return {"layout chains": simplify(graph)}


# ----------------------------------------------------------------------------- strategy


@dataclasses.dataclass
class LayoutCase:
    """A tensor sent through a chain of layout operators, then a non-layout operator (+ 0.5)."""

    x: Tensor
    steps: tuple  # ("permute", dims) / ("reshape", shape) / ("clone",) / ("select0",) / ("unsqueeze0",)

    @property
    def input(self):
        return self.x

    def reference(self) -> Tensor:
        return _apply(self.steps, self.x) + 0.5

    def rewritten(self) -> Tensor:
        program = torch.export.export(self.module(), self.args())
        return LayoutRoundTrips()(program).program.module()(*self.args())

    def module(self) -> torch.nn.Module:
        return _Chain(self.steps)

    def args(self) -> tuple:
        return (self.x,)

    scale = 1.0


def _apply(steps, x: Tensor) -> Tensor:
    for step in steps:
        if step[0] == "permute":
            x = x.permute(*step[1])
        elif step[0] == "reshape":
            x = x.reshape(*step[1])
        elif step[0] == "clone":
            x = x.contiguous()
        elif step[0] == "select0":
            x = x[0]
        elif step[0] == "unsqueeze0":
            x = x.unsqueeze(0)
    return x


class _Chain(torch.nn.Module):
    def __init__(self, steps):
        super().__init__()
        self.steps = steps

    def forward(self, x):
        return _apply(self.steps, x + 0.0) + 0.5  # x + 0.0: the chain's source is an operator


def layout_cases(dtype=None):
    """Hypothesis strategy of ``LayoutCase``: SAM3's round trip ([HW, 1, C] -> NCHW -> [H, W*C])
    at random sizes, permutes followed by their inverses (with clones and unsqueezes between),
    and random chains of permutes, reshapes, clones and size-1 selects, most of which reorder
    elements and must be left alone."""

    @st.composite
    def cases(draw):
        dt = draw(dtypes) if dtype is None else dtype
        seed = draw(st.integers(0, 2**31 - 1))
        if draw(st.booleans()):
            h, w, c = draw(st.integers(1, 6)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
            x = seeded_tensor((h * w, 1, c), dt, seed)  # [HW, 1, C]
            steps = (
                ("permute", (1, 2, 0)),
                ("reshape", (1, c, h, w)),
                ("select0",),
                ("permute", (1, 2, 0)),
                ("clone",),
                ("reshape", (h, w * c)),
            )
            return LayoutCase(x, steps)
        shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=4)))
        x = seeded_tensor(shape, dt, seed)
        if draw(st.booleans()):  # permutes, then their inverses: back in the source's order
            perms = [tuple(draw(st.permutations(range(len(shape))))) for _ in range(draw(st.integers(1, 3)))]
            inverses = [tuple(sorted(range(len(p)), key=p.__getitem__)) for p in reversed(perms)]
            steps = [("permute", p) for p in perms] + [("clone",)] * draw(st.integers(0, 1))
            steps += [("permute", p) for p in inverses] + [("unsqueeze0",)] * draw(st.integers(0, 1))
            return LayoutCase(x, tuple(steps))
        steps, current = [], shape
        for _ in range(draw(st.integers(1, 5))):
            kind = draw(st.sampled_from(["permute", "reshape", "clone", "select0", "unsqueeze0"]))
            if kind == "permute":
                dims = tuple(draw(st.permutations(range(len(current)))))
                steps.append(("permute", dims))
                current = tuple(current[d] for d in dims)
            elif kind == "reshape":
                flat = 1
                for s in current:
                    flat *= s
                steps.append(("reshape", (flat,)))
                current = (flat,)
            elif kind == "select0" and current and current[0] == 1 and len(current) > 1:
                steps.append(("select0",))
                current = current[1:]
            elif kind == "unsqueeze0":
                steps.append(("unsqueeze0",))
                current = (1,) + current
            else:
                steps.append(("clone",))
        return LayoutCase(x, tuple(steps))

    return cases()
