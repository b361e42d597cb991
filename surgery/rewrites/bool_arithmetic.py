"""Arithmetic of two boolean tensors -> ``logical_and`` / ``logical_or``.

RT-DETR (transformers) builds its anchors' valid mask as ``(anchors > eps) * (anchors < 1 -
eps)``: ``aten.mul.Tensor`` of two bool tensors. Stock apache-tvm 0.25.0, 0.26.0 and 0.27.0
import it and then fail in LLVM code generation (0.27: "Check failed:
(t.MatchesCode(DLDataTypeCode::kDLFloat)) is false", 0.25: "(t.is_float()) is false"); so do
bool + bool and ``maximum``/``minimum`` of two bool tensors (measured). A bool tensor times or
plus a Python bool builds and runs right, and is left alone.

PyTorch computes these in bool arithmetic: a product, or a minimum, is True where both operands
are (``logical_and``); a sum ``a + alpha * b``, or a maximum, is True where either is
(``logical_or``) — for any non-zero ``alpha``; ``alpha=0`` gives ``a`` and is left alone (sub
of bools raises in PyTorch, as do ``floor_divide``, ``remainder``, ``fmod`` and ``pow``; true
division gives floats). Only calls whose two operands are both bool tensors are replaced:
every other ``mul``/``add``/``maximum``/``minimum`` (float, integer, mixed dtypes) stays, its
decomposition declining it (``replaces`` says which, from the dtypes export recorded).

Contract: bit-exact (identical booleans) for every pair of broadcastable bool tensors
(0-d and zero-sized included); ``mul``, ``add`` (non-zero alpha), ``maximum``, ``minimum``
and the in-place ``mul_``/``add_``.
"""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import Tensor

from ..equivalence.strategies import seeded_tensor
from .base import Rewrite

aten = torch.ops.aten

CONTRACT = (
    "bit-exact for every pair of broadcastable bool tensors (0-d and zero-sized included): mul, add with "
    "non-zero alpha, maximum, minimum, and in-place mul_/add_; any other dtype is left as it is"
)

# Each operator on two booleans as a logical one: a product or a minimum is True where both
# operands are, a sum or a maximum where either is.
LOGICAL = {
    "mul": torch.logical_and,
    "minimum": torch.logical_and,
    "add": torch.logical_or,
    "maximum": torch.logical_or,
}


def bool_arithmetic(op: str, input: Tensor, other: Tensor) -> Tensor:
    """``torch.<op>(input, other)`` for two bool tensors (``add`` with a non-zero alpha)."""
    return LOGICAL[op](input, other)


def _takes(input, other, alpha=1) -> bool:
    """Whether the rewrite replaces this call: two bool tensors (and, for add, a non-zero alpha)."""
    tensors = isinstance(input, Tensor) and isinstance(other, Tensor)
    return tensors and input.dtype == torch.bool and other.dtype == torch.bool and bool(alpha)


def _decomposition(op: str):
    def decompose(input, other, *, alpha=1):
        if not _takes(input, other, alpha):
            return NotImplemented  # run_decompositions keeps the call
        return bool_arithmetic(op, input, other)

    return decompose


class BoolArithmeticToLogical(Rewrite):
    name = "bool_arithmetic"
    summary = "mul/add/maximum/minimum of two bool tensors -> logical_and/logical_or"
    contract = CONTRACT

    @staticmethod
    def cases(dtype=None):
        return bool_arithmetic_cases(dtype)

    probe_note = "bool tensor * bool tensor (RT-DETR's anchor valid mask)"

    def probe_case(self):
        anchors = torch.tensor([0.0, 0.3, 0.999, 0.5, 1.0, 0.02])
        return BoolArithmeticCase(anchors > 0.01, anchors < 0.99, "mul")

    def decompositions(self):
        return {
            aten.mul.Tensor: _decomposition("mul"),
            aten.add.Tensor: _decomposition("add"),
            aten.maximum.default: _decomposition("maximum"),
            aten.minimum.default: _decomposition("minimum"),
        }

    def functionalized_variants(self):
        return (aten.mul_.Tensor, aten.add_.Tensor)

    takes = staticmethod(_takes)


# ----------------------------------------------------------------------------- strategy


@dataclasses.dataclass
class BoolArithmeticCase:
    """``torch.<op>(input, other)`` of two bool tensors; ``alpha`` for add; ``inplace``: the
    graph form calls ``mul_``/``add_`` on a copy of ``input`` (whose shape is then the result's)."""

    input: Tensor
    other: Tensor
    op: str
    alpha: int | bool = 1
    inplace: bool = False

    def reference(self) -> Tensor:
        return _torch_op(self.op, self.alpha, self.inplace)(self.input, self.other)

    def rewritten(self) -> Tensor:
        return bool_arithmetic(self.op, self.input, self.other)

    def module(self) -> torch.nn.Module:
        return _BoolModule(self.op, self.alpha, self.inplace)

    def args(self) -> tuple:
        return (self.input, self.other)

    scale = None


def _torch_op(op: str, alpha, inplace: bool):
    if op == "add":
        if inplace:
            return lambda a, b: a.clone().add_(b, alpha=alpha)
        return lambda a, b: torch.add(a, b, alpha=alpha)
    if inplace:
        return lambda a, b: a.clone().mul_(b)
    return getattr(torch, op)


class _BoolModule(torch.nn.Module):
    def __init__(self, op, alpha, inplace):
        super().__init__()
        self.op, self.alpha, self.inplace = op, alpha, inplace

    def forward(self, input, other):
        return _torch_op(self.op, self.alpha, self.inplace)(input, other)


def bool_arithmetic_cases(dtype=None):
    """Hypothesis strategy of ``BoolArithmeticCase``: two bool tensors of broadcastable shapes
    (rank 0-3, sizes 0-4, either side broadcast), each True with a drawn probability; mul, add
    (alpha True, 1, 2 or -1), maximum, minimum; mul and add also in place. ``dtype`` is ignored:
    the operands are bool."""

    @st.composite
    def cases(draw):
        shapes = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=3, min_side=0, max_side=4))
        op = draw(st.sampled_from(list(LOGICAL)))
        inplace = op in ("mul", "add") and draw(st.booleans())
        input_shape = shapes.result_shape if inplace else shapes.input_shapes[0]
        seed = draw(st.integers(0, 2**31 - 1))
        input = seeded_tensor(input_shape, torch.float64, seed, uniform=True) < draw(st.floats(0, 1))
        other = seeded_tensor(shapes.input_shapes[1], torch.float64, seed + 1, uniform=True) < draw(st.floats(0, 1))
        alpha = draw(st.sampled_from([True, 1, 2, -1])) if op == "add" else 1
        return BoolArithmeticCase(input, other, op, alpha, inplace)

    return cases()
