"""Float ``aten.floor_divide`` -> fmod/where arithmetic with PyTorch's exact rounding.

SAM3's position encoding computes ``dim_t // 2`` on a float tensor. Stock TVM's converter maps
``floor_divide`` straight onto ``relax.op.floor_divide`` and fails when a float tensor meets an
integer scalar. This rewrite spells out PyTorch's own ``div_floor_floating`` (ATen's
BinaryOps.h): the quotient is computed from ``fmod`` so it is exact where ``floor(a / b)`` would
round (e.g. ``1.0 // 0.1`` is 9 in PyTorch, but ``floor(1.0 / 0.1)`` is 10).

Integer floor division is left alone (backends handle it).

A quotient that overflows (``1.0 // 1e-42`` in float32) is handled apart: PyTorch's own
vectorized ``fmod`` returns NaN there, while its ``floor_divide`` returns inf.

Contract: bit-exact for floating ``a`` and ``b`` (tensor or number), including division by zero
(IEEE result), signed zeros, subnormals, inf, NaN and overflowing quotients.
"""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import Tensor

from ..equivalence.strategies import dtypes
from .base import Rewrite

aten = torch.ops.aten

CONTRACT = (
    "bit-exact for floating operands (tensor or number), including division by zero, "
    "signed zeros, subnormals, inf, NaN and overflowing quotients; integer floor division "
    "is left as it is"
)


def floating_operands(a: Tensor, b: Tensor | float | int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``a`` and ``b`` as tensors of the floating result dtype: a number becomes a constant of
    that dtype (TVM's converter pairs a float tensor with an int32 constant and fails)."""
    b = torch.as_tensor(b, dtype=dtype, device=a.device) if not isinstance(b, Tensor) else b.to(dtype)
    return a.to(dtype), b


def floor_divide(a: Tensor, b: Tensor | float | int) -> Tensor:
    """``torch.floor_divide(a, b)`` for floating ``a``, from fmod/floor/where."""
    dtype = torch.result_type(a, b)
    if not dtype.is_floating_point:
        return aten.div.Tensor_mode(a, b, rounding_mode="floor")
    a, b = floating_operands(a, b, dtype)
    mod = torch.fmod(a, b)
    div = (a - mod) / b
    # fmod takes the sign of a; floor needs one step down when mod != 0 and its sign differs
    # from b's. (Spelled with where: TVM's LLVM codegen miscompiles != between booleans.)
    signs_differ = torch.where(b < 0, mod > 0, mod < 0)
    div = torch.where(signs_differ, div - 1, div)
    floor = torch.floor(div)
    floor = torch.where(div - floor > 0.5, floor + 1, floor)  # (a - mod) / b can land just below
    # A zero quotient takes the sign of a / b. Where it is used (div == 0: |a / b| <= 1 once
    # rounded, finite), trunc of half of a / b is that signed zero. Not (a / b) * 0: TVM
    # simplifies x * 0 to +0; not copysign: TVM can't import it.
    zero = torch.trunc(a / b * 0.5)
    quotient = torch.where(div != 0, floor, zero)
    # A quotient beyond the largest float floors to +-inf, as in PyTorch; fmod can't tell (its
    # vectorized form returns NaN there). Comparisons with finfo.max, not isinf/isfinite, keep
    # the graph within what every backend converts.
    largest = torch.finfo(dtype).max
    overflow = ((a / b).abs() > largest) & (a.abs() <= largest)
    quotient = torch.where(overflow, a / b, quotient)
    return torch.where(b == 0, a / b, quotient)


def _floor_divide_decomposition(a, b):
    return floor_divide(a, b)


class FloorDivideToFmod(Rewrite):
    name = "floor_divide"
    summary = "float aten.floor_divide -> fmod/floor/where with PyTorch's rounding"
    contract = CONTRACT

    @staticmethod
    def cases(dtype=None):
        return floor_divide_cases(dtype)

    probe_note = "float tensor // int scalar (SAM3's position encoding)"

    def probe_case(self):
        return FloorDivideCase(torch.arange(8, dtype=torch.float32) - 2.5, 2)

    def decompositions(self):
        return {aten.floor_divide.default: _floor_divide_decomposition}

    def functionalized_variants(self):
        return (aten.floor_divide_.Tensor,)


# ----------------------------------------------------------------------------- strategy


@dataclasses.dataclass
class FloorDivideCase:
    input: Tensor
    other: Tensor | float | int

    def reference(self) -> Tensor:
        return torch.floor_divide(self.input, self.other)

    def rewritten(self) -> Tensor:
        return floor_divide(self.input, self.other)

    def module(self) -> torch.nn.Module:
        return _FloorDivideModule(None if isinstance(self.other, Tensor) else self.other)

    def args(self) -> tuple:
        return (self.input,) + ((self.other,) if isinstance(self.other, Tensor) else ())

    scale = None


class _FloorDivideModule(torch.nn.Module):
    def __init__(self, other):
        super().__init__()
        self.other = other

    def forward(self, input, other=None):
        return input // (self.other if other is None else other)


# Numbers a division is drawn with: divisors of either kind, and tensor elements with zeros,
# signed zeros, inf, NaN, exact multiples and near-multiples, subnormals and tiny normals
# (quotients that overflow).
INT_DIVISORS = [2, 3, -2, 1, 7, 0]
FLOAT_DIVISORS = [0.1, 2.5, -0.3, 1e-3, float("inf"), 0.0, -0.0]
SPECIALS = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1.0, -1.0, 0.1, 3.0, 1e-30, 1e30]
division_operands = st.one_of(
    st.floats(-1e6, 1e6, width=32),
    st.sampled_from(SPECIALS),
    st.integers(-50, 50).map(float),
    st.floats(-(2**-126), 2**-126, width=32),
)


def floor_divide_cases(dtype=None):
    """Hypothesis strategy of ``FloorDivideCase``: float tensors against int and float scalars
    and tensors, with zeros, signed zeros, inf, NaN, exact multiples and near-multiples,
    subnormals and quotients that overflow."""

    @st.composite
    def cases(draw):
        dt = draw(dtypes) if dtype is None else dtype
        shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=5))
        np_dtype = "float32" if dt == torch.float32 else "float64"
        input = torch.from_numpy(draw(hnp.arrays(np_dtype, shape, elements=division_operands)))
        kind = draw(st.sampled_from(["int", "float", "tensor"]))
        if kind == "int":
            other = draw(st.sampled_from(INT_DIVISORS))
        elif kind == "float":
            other = draw(st.sampled_from(FLOAT_DIVISORS))
        else:
            other = torch.from_numpy(draw(hnp.arrays(np_dtype, shape, elements=division_operands)))
        return FloorDivideCase(input, other)

    return cases()
