"""Float ``aten.div`` with ``rounding_mode="floor"`` or ``"trunc"`` -> PyTorch's exact arithmetic.

Deformable DETR (transformers) computes ``torch.div(x, 2, rounding_mode="floor")`` on a float
tensor. ``torch.export`` keeps that as ``aten.div.Tensor_mode`` (while ``x // 2`` and
``torch.floor_divide`` export as ``aten.floor_divide``, which the floor_divide rewrite takes;
torch's default decompositions, which TVM's importer runs, then turn ``floor_divide`` into
``div.Tensor_mode`` too). Measured on stock apache-tvm 0.25.0, 0.26.0 and 0.27.0, all alike:

- a float tensor divided by an int number, floor or trunc: the import fails ("Binary operators
  must have the same datatype": the number becomes an int32 constant);
- floor with a float tensor divisor: wrong numbers, ``floor(a / b)`` where PyTorch rounds from
  ``fmod`` (``1.0 // 0.1`` is 9 in PyTorch, 10 on TVM);
- trunc with a float number or tensor divisor: right.

The probe case holds the first two (``probe_case``). Floor is the floor_divide rewrite's
replacement (PyTorch's ``div_floor_floating``); trunc is ``trunc(a / b)``, what ATen's CPU
``div_trunc_kernel`` computes for float32 and float64, with the number as a constant of the
tensor's dtype. Integer division, ``rounding_mode=None`` (true division) and reduced-precision
floats (whose CPU kernel divides by a number in float32 arithmetic) are left as they are.

Contract: bit-exact for float32 and float64 results (tensor or number divisor, either mode),
including division by zero, signed zeros, subnormals, inf, NaN and overflowing quotients.
"""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import Tensor

from ..equivalence.strategies import dtypes
from .base import Rewrite
from .floor_divide import FLOAT_DIVISORS, INT_DIVISORS, division_operands, floating_operands, floor_divide

aten = torch.ops.aten

CONTRACT = (
    "bit-exact for float32 and float64 results with rounding_mode floor or trunc (tensor or number divisor), "
    "including division by zero, signed zeros, subnormals, inf, NaN and overflowing quotients; integer, "
    "reduced-precision and true division are left as they are"
)

ROUNDING_MODES = ("floor", "trunc")
_FLOATS = (torch.float32, torch.float64)


def div_trunc(a: Tensor, b: Tensor | float | int) -> Tensor:
    """``torch.div(a, b, rounding_mode="trunc")`` for a float32/float64 result."""
    a, b = floating_operands(a, b, torch.result_type(a, b))
    return torch.trunc(a / b)  # trunc keeps the sign of a zero quotient: trunc(-0.25) is -0.0


def div_rounding(a: Tensor, b: Tensor | float | int, rounding_mode: str) -> Tensor:
    """``torch.div(a, b, rounding_mode=rounding_mode)``, floor or trunc, for a float result."""
    return floor_divide(a, b) if rounding_mode == "floor" else div_trunc(a, b)


def _takes(input, other, rounding_mode=None) -> bool:
    """Whether the rewrite replaces this division: floor or trunc with a float32/float64 result."""
    return rounding_mode in ROUNDING_MODES and torch.result_type(input, other) in _FLOATS


def _div_mode_decomposition(input, other, *, rounding_mode=None):
    if not _takes(input, other, rounding_mode):
        return NotImplemented  # run_decompositions keeps the division
    return div_rounding(input, other, rounding_mode)


class DivRoundingToArithmetic(Rewrite):
    name = "div_rounding"
    summary = "float aten.div with rounding_mode floor/trunc -> PyTorch's fmod/floor/where or trunc(a / b)"
    contract = CONTRACT

    @staticmethod
    def cases(dtype=None):
        return div_rounding_cases(dtype)

    probe_note = "float div(x, 2) and div(x, y) with rounding_mode='floor' (Deformable DETR; 1.0 / 0.1 floors to 9)"

    def probe_case(self):
        x = torch.tensor([-2.5, -1.0, -0.5, -0.0, 0.5, 1.0, 1.5, 7.0])
        y = torch.tensor([2.0, 0.1, 0.1, 3.0, -0.3, 0.1, 0.1, 2.0])
        return DivRoundingCase(x, ((2, "floor"), (y, "floor")))

    def decompositions(self):
        return {aten.div.Tensor_mode: _div_mode_decomposition, aten.div.Scalar_mode: _div_mode_decomposition}

    def functionalized_variants(self):
        return (aten.div_.Tensor_mode, aten.div_.Scalar_mode)

    takes = staticmethod(_takes)


# ----------------------------------------------------------------------------- strategy


@dataclasses.dataclass
class DivRoundingCase:
    """``torch.div(input, divisor, rounding_mode=mode)`` for each (divisor, mode) in
    ``divisions``, stacked; a divisor is a number or a tensor that broadcasts to ``input``'s
    shape. ``inplace``: the graph form divides a copy in place (``Tensor.div_``)."""

    input: Tensor
    divisions: tuple
    inplace: bool = False

    def reference(self) -> Tensor:
        return _divide_each(_torch_div(self.inplace), self.input, self.divisions)

    def rewritten(self) -> Tensor:
        return _divide_each(div_rounding, self.input, self.divisions)

    def module(self) -> torch.nn.Module:
        return _DivModule(
            tuple((None if isinstance(d, Tensor) else d, mode) for d, mode in self.divisions), self.inplace
        )

    def args(self) -> tuple:
        return (self.input, *(d for d, _ in self.divisions if isinstance(d, Tensor)))

    scale = None


def _divide_each(divide, input: Tensor, divisions) -> Tensor:
    return torch.stack([divide(input, d, mode) for d, mode in divisions])  # [len(divisions), *input.shape]


def _torch_div(inplace: bool):
    if inplace:
        return lambda a, b, mode: a.clone().div_(b, rounding_mode=mode)
    return lambda a, b, mode: torch.div(a, b, rounding_mode=mode)


class _DivModule(torch.nn.Module):
    def __init__(self, slots, inplace):
        super().__init__()
        self.slots, self.inplace = slots, inplace  # (number or None for a tensor argument, mode)

    def forward(self, input, *tensors):
        tensors = iter(tensors)
        divisions = [(next(tensors) if d is None else d, mode) for d, mode in self.slots]
        return _divide_each(_torch_div(self.inplace), input, divisions)


def div_rounding_cases(dtype=None):
    """Hypothesis strategy of ``DivRoundingCase``: a float32/float64 tensor divided, floor or
    trunc, by 1-3 divisors: int and float numbers, tensors of its shape and dtype, and 0-d
    tensors of another dtype (int64, or float of the other width); elements with zeros, signed
    zeros, inf, NaN, exact and near multiples, subnormals and quotients that overflow."""

    @st.composite
    def divisor(draw, np_dtype, shape):
        kind = draw(st.sampled_from(["int", "float", "tensor", "0-d"]))
        if kind == "int":
            return draw(st.sampled_from(INT_DIVISORS))
        if kind == "float":
            return draw(st.sampled_from(FLOAT_DIVISORS))
        if kind == "tensor":
            return torch.from_numpy(draw(hnp.arrays(np_dtype, shape, elements=division_operands)))
        zero_d = draw(st.sampled_from([torch.int64, torch.float32, torch.float64]))
        value = draw(st.sampled_from(INT_DIVISORS if zero_d == torch.int64 else FLOAT_DIVISORS))
        return torch.tensor(value, dtype=zero_d)

    @st.composite
    def cases(draw):
        dt = draw(dtypes) if dtype is None else dtype
        shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=5))
        np_dtype = "float32" if dt == torch.float32 else "float64"
        input = torch.from_numpy(draw(hnp.arrays(np_dtype, shape, elements=division_operands)))
        divisions = draw(
            st.lists(st.tuples(divisor(np_dtype, shape), st.sampled_from(ROUNDING_MODES)), min_size=1, max_size=3)
        )
        return DivRoundingCase(input, tuple(divisions), draw(st.booleans()))

    return cases()
