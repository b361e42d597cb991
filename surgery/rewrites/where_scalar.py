"""``aten.where`` with a Python-number operand -> ``aten.where.self`` with that number as a full tensor.

``torch.where(cond, x, -1)`` is exported as ``aten.where.ScalarOther``; TVM's importer
decomposes it into a 0-d constant (``scalar_tensor``) and ``where.self``. Some stock TVMs mix
up distinct 0-d int64 constants of one graph: with ``where(m, x, -1)`` and ``where(m, x, 3)`` in
the same program both selects read -1 (the scatter rewrite's ``where(match, position, -1)``
next to SAM3's own integer constants gives wrong embeddings that way). Full-shaped constants
are not mixed up. This rewrite spells the number as ``aten.full`` of the broadcast output shape
and the result dtype, so no 0-d constant is left for the converter. The TVM probe decides
whether it is needed (``probe_case``: three int64 selects with different numbers).

Contract: bit-exact for every condition/tensor shape pair that broadcasts, every real dtype
(bool, integer, floating), every number the result dtype holds (inf, NaN, -0.0 included);
``where.ScalarOther``, ``where.ScalarSelf`` and ``where.Scalar`` (both numbers).
"""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import Tensor

from ..equivalence.strategies import ALL_DTYPES, seeded_tensor
from .base import Rewrite

aten = torch.ops.aten

CONTRACT = (
    "bit-exact for every broadcastable condition and tensor, every real dtype and every number the result "
    "dtype holds (inf, NaN, -0.0 included); number in either or both operands"
)


def _scalars_dtype(a, b) -> torch.dtype:
    """Result dtype of ``torch.where(cond, a, b)`` for two Python numbers."""
    if isinstance(a, float) or isinstance(b, float):
        return torch.get_default_dtype()
    if isinstance(a, bool) and isinstance(b, bool):
        return torch.bool
    return torch.int64


def where_scalar(condition: Tensor, input, other) -> Tensor:
    """``torch.where(condition, input, other)`` where ``input`` and/or ``other`` is a Python
    number, with every number turned into a full tensor of the output's shape and dtype."""
    tensors = [t for t in (input, other) if isinstance(t, Tensor)]
    if tensors:
        dtype = torch.result_type(tensors[0], other if tensors[0] is input else input) if len(tensors) == 1 else None
    else:
        dtype = _scalars_dtype(input, other)
    shape = torch.broadcast_shapes(condition.shape, *(t.shape for t in tensors))

    def full(value):
        return value if isinstance(value, Tensor) else torch.full(shape, value, dtype=dtype, device=condition.device)

    return aten.where.self(condition, full(input), full(other))


def _where_scalar_other(condition, input, other):
    return where_scalar(condition, input, other)


class WhereScalarToFull(Rewrite):
    name = "where_scalar"
    summary = "aten.where with a number operand -> aten.where.self with a full tensor (no 0-d constants)"
    contract = CONTRACT

    @staticmethod
    def cases(dtype=None):
        return where_scalar_cases(dtype)

    probe_note = "three int64 selects with different numbers, where(m, x, -1 / 3 / 0), in one program"

    def probe_case(self):
        return WhereScalarCase(
            torch.tensor([True, False, True, False]), torch.tensor([5, 6, 7, 8]), "other", (-1, 3, 0)
        )

    def decompositions(self):
        return {
            aten.where.ScalarOther: _where_scalar_other,
            aten.where.ScalarSelf: _where_scalar_other,
            aten.where.Scalar: _where_scalar_other,
        }


# ----------------------------------------------------------------------------- strategy


@dataclasses.dataclass
class WhereScalarCase:
    """``torch.where(condition, input, number)`` (``side="other"``), ``(condition, number,
    input)`` (``"self"``) or ``(condition, number, number2)`` (``"both"``; ``input`` unused but
    kept as the case's tensor), one select per number in ``numbers``, stacked."""

    condition: Tensor
    input: Tensor
    side: str
    numbers: tuple

    def _call(self, fn, condition, input) -> Tensor:
        outs = []
        for i, number in enumerate(self.numbers):
            if self.side == "other":
                outs.append(fn(condition, input, number))
            elif self.side == "self":
                outs.append(fn(condition, number, input))
            else:
                outs.append(fn(condition, number, self.numbers[(i + 1) % len(self.numbers)]))
        return torch.stack(outs)

    def reference(self) -> Tensor:
        return self._call(torch.where, self.condition, self.input)

    def rewritten(self) -> Tensor:
        return self._call(where_scalar, self.condition, self.input)

    def module(self) -> torch.nn.Module:
        return _WhereModule(self)

    def args(self) -> tuple:
        return (self.condition, self.input)

    scale = None


class _WhereModule(torch.nn.Module):
    def __init__(self, case):
        super().__init__()
        self.case = dataclasses.replace(case, condition=None, input=None)

    def forward(self, condition, input):
        return self.case._call(torch.where, condition, input)


def where_scalar_cases(dtype=None):
    """Hypothesis strategy of ``WhereScalarCase``: condition and tensor of broadcastable shapes
    (rank 0-3, sizes 0-4, either side broadcast), tensor dtypes bool, int32, int64, float32,
    float64, numbers on either or both sides: 0, 1, -1, 3, large integers, True/False, fractions,
    inf, -inf, NaN, -0.0, each only where the result dtype holds it; 1-3 selects in one program."""
    INTS = [0, 1, -1, 3, 2**31 + 7, -(2**40)]
    FLOATS = [0.5, -2.25, float("inf"), float("-inf"), float("nan"), -0.0, 1e30]

    @st.composite
    def cases(draw):
        shapes = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=3, min_side=0, max_side=4))
        seed = draw(st.integers(0, 2**31 - 1))
        condition = seeded_tensor(shapes.input_shapes[0], torch.float64, seed, uniform=True) < draw(st.floats(0, 1))
        in_dtype = draw(st.sampled_from(ALL_DTYPES)) if dtype is None else dtype
        input = (seeded_tensor(shapes.input_shapes[1], torch.float64, seed + 1) * 10).to(in_dtype)
        side = draw(st.sampled_from(["other", "self", "both"]))
        kind = draw(st.sampled_from(["bool", "int", "float"]))
        pool = {"bool": [True, False], "int": INTS, "float": FLOATS}[kind]
        if kind == "int" and in_dtype == torch.int32 and side != "both":
            pool = [v for v in INTS if -(2**31) <= v < 2**31]  # the result is int32: only numbers it holds
        numbers = tuple(draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3)))
        return WhereScalarCase(condition, input, side, numbers)

    return cases()
