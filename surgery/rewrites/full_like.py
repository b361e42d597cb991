"""``aten.zeros_like`` / ``ones_like`` / ``full_like`` -> ``aten.full`` with an explicit shape and dtype.

SAM3's transformer layers call ``nn.MultiheadAttention`` with a boolean key padding mask, which
``F._canonical_mask`` turns into an additive float mask::

    torch.zeros_like(mask, dtype=torch.float32).masked_fill_(mask, float("-inf"))

TVM's importer first runs torch's default decompositions, which turn ``zeros_like(x, dtype=d)``
(and ``ones_like``) into ``full_like(x, value, dtype=d)``. Some stock TVMs' ``full_like``
converter drops the ``dtype`` argument and gives a tensor of ``x``'s dtype: a *bool* tensor
here, and the ``masked_fill`` that follows fails to build ("x->dtype == y->dtype (float32 vs
bool)"). This rewrite replaces each of the three operators by ``aten.full(x.shape, value,
dtype=d)``, whose converter honours the dtype. The TVM probe decides whether it is needed
(``probe_case`` is the pattern above), not a version number.

Contract: bit-exact for every input shape (zero-sized and 0-d included), every input and output
dtype (bool, integer, floating), every fill value the output dtype can hold (inf, NaN, -0.0
included): the result never depends on the input's values, only on its shape, dtype and
device. The result is contiguous (a ``*_like`` of a strided tensor keeps its strides; values
and shape are the same, and an exported graph is functional, so nothing observes the strides).
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
    "bit-exact for every shape (zero-sized and 0-d included), every input and output dtype and "
    "every fill value the output dtype holds (inf, NaN, -0.0 included); the result is contiguous"
)


def full_like(input: Tensor, fill_value, *, dtype: torch.dtype | None = None) -> Tensor:
    """``torch.full_like(input, fill_value, dtype=dtype)`` as ``torch.full`` of ``input``'s shape."""
    return torch.full(
        tuple(input.shape), fill_value, dtype=input.dtype if dtype is None else dtype, device=input.device
    )


def _full_like_decomposition(
    input, fill_value, *, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None
):
    return torch.full(
        tuple(input.shape),
        fill_value,
        dtype=input.dtype if dtype is None else dtype,
        device=input.device if device is None else device,
    )


def _zeros_like_decomposition(input, *, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    return _full_like_decomposition(input, 0, dtype=dtype, device=device)


def _ones_like_decomposition(input, *, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    return _full_like_decomposition(input, 1, dtype=dtype, device=device)


class FullLikeToFull(Rewrite):
    name = "full_like"
    summary = "aten.zeros_like/ones_like/full_like -> aten.full with explicit shape and dtype"
    contract = CONTRACT

    @staticmethod
    def cases(dtype=None):
        return full_like_cases(dtype)

    probe_note = (
        "zeros_like(bool mask, dtype=float32).masked_fill(mask, -inf) (nn.MultiheadAttention's key padding mask)"
    )

    def probe_case(self):
        mask = torch.tensor([[False, True, False, True], [True, False, False, False]])
        return FullLikeCase(
            "canonical_mask", mask, 0, torch.float32, values=torch.arange(8, dtype=torch.float32).reshape(2, 4) - 3.5
        )

    def decompositions(self):
        return {
            aten.zeros_like.default: _zeros_like_decomposition,
            aten.ones_like.default: _ones_like_decomposition,
            aten.full_like.default: _full_like_decomposition,
        }


# ----------------------------------------------------------------------------- strategy


@dataclasses.dataclass
class FullLikeCase:
    """``op`` is "zeros_like", "ones_like", "full_like", or "canonical_mask" (the probe's pattern:
    ``zeros_like(mask, dtype).masked_fill(mask, -inf) + values``)."""

    op: str
    input: Tensor
    fill_value: object
    dtype: torch.dtype | None
    values: Tensor | None = None

    def _call(self, fn) -> Tensor:
        if self.op == "canonical_mask":
            return fn(self.input, 0, dtype=self.dtype).masked_fill(self.input, float("-inf")) + self.values
        return fn(self.input, {"zeros_like": 0, "ones_like": 1}.get(self.op, self.fill_value), dtype=self.dtype)

    def reference(self) -> Tensor:
        return self._call(_torch_op(self.op))

    def rewritten(self) -> Tensor:
        return self._call(full_like)

    def module(self) -> torch.nn.Module:
        return _FullLikeModule(self.op, self.fill_value, self.dtype)

    def args(self) -> tuple:
        return (self.input,) + ((self.values,) if self.values is not None else ())

    scale = None


def _torch_op(op: str):
    if op == "zeros_like":
        return lambda x, _, dtype: torch.zeros_like(x, dtype=dtype)
    if op == "ones_like":
        return lambda x, _, dtype: torch.ones_like(x, dtype=dtype)
    return lambda x, value, dtype: torch.full_like(x, value, dtype=dtype)


class _FullLikeModule(torch.nn.Module):
    def __init__(self, op, fill_value, dtype):
        super().__init__()
        self.op, self.fill_value, self.dtype = op, fill_value, dtype

    def forward(self, input, values=None):
        return FullLikeCase(self.op, input, self.fill_value, self.dtype, values)._call(
            _torch_op("zeros_like" if self.op == "canonical_mask" else self.op)
        )


def full_like_cases(dtype=None):
    """Hypothesis strategy of ``FullLikeCase``: the three operators and the key-padding-mask
    pattern; shapes of rank 0-4 with zero-sized dimensions; input and output dtypes among bool,
    int32, int64, float32, float64 (output dtype also unset); fill values 0, 1, -1, large
    integers, fractions, inf, -inf, NaN, -0.0, True/False, each where the output dtype holds it."""

    def fits(value, dt: torch.dtype) -> bool:
        if dt == torch.bool:
            return isinstance(value, bool) or value in (0, 1)
        if dt.is_floating_point:
            return True
        if isinstance(value, float) and (
            value != value or value in (float("inf"), float("-inf")) or value != int(value)
        ):
            return False
        info = torch.iinfo(dt)
        return info.min <= int(value) <= info.max

    @st.composite
    def cases(draw):
        op = draw(st.sampled_from(["zeros_like", "ones_like", "full_like", "canonical_mask"]))
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4))
        seed = draw(st.integers(0, 2**31 - 1))
        if op == "canonical_mask":
            out_dtype = draw(st.sampled_from([torch.float32, torch.float64])) if dtype is None else dtype
            mask = seeded_tensor(shape, torch.float64, seed, uniform=True) < draw(st.floats(0, 1))
            return FullLikeCase(op, mask, 0, out_dtype, values=seeded_tensor(shape, out_dtype, seed + 1))
        in_dtype = draw(st.sampled_from(ALL_DTYPES))
        out_dtype = draw(st.one_of(st.none(), st.sampled_from(ALL_DTYPES))) if dtype is None else dtype
        input = (seeded_tensor(shape, torch.float64, seed) * 10).to(in_dtype)
        target = in_dtype if out_dtype is None else out_dtype
        candidates = [
            0,
            1,
            -1,
            7,
            2**31 + 5,
            0.5,
            -2.25,
            float("inf"),
            float("-inf"),
            float("nan"),
            -0.0,
            True,
            False,
            1e30,
        ]
        value = (
            {"zeros_like": 0, "ones_like": 1}.get(op)
            if op != "full_like"
            else draw(st.sampled_from([v for v in candidates if fits(v, target)]))
        )
        return FullLikeCase(op, input, value, out_dtype)

    return cases()
