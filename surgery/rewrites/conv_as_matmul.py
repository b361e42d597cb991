"""A convolution whose kernel covers its whole (unpadded) input -> one matrix product.

SAM3's box encoder projects each 7x7 ROI-pooled feature map with ``Conv2d(256, 256, 7)``: one
output pixel per box, i.e. ``out[n, f] = sum_{c,y,x} in[n, c, y, x] * w[f, c, y, x] + b[f]``,
a matrix product of the flattened input with the flattened weight. Stock TVM compiles the
convolution as a 3-deep scalar reduction reading the weight with a 12,544-float stride; as a
matrix product, with the (constant) transposed weight folded at build time, it runs on our
vectorised matmul schedule (``surgery.schedules.Matmul``): 7.9 ms -> well under 1 ms here.

A speed rewrite: TVM converts ``convolution`` correctly, so the probe never asks for this one;
``surgery.tvm_backend`` applies it when building the shipped configuration. Convolutions it does
not cover (padding, stride > 1 with a smaller kernel, groups, transposed, kernel smaller than
the input) are left as they are.

Contract: same products and sums as the convolution, accumulated in a different order; float64
results agree to a few ulps of the sum of |terms|, float32 within the usual 1e-5 absolute on
unit-scale inputs (checked by the property tests in both dtypes).
"""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import strategies as st
from torch import Tensor

from ..equivalence.strategies import dtypes, seeded_tensor
from .base import Rewrite, RewriteResult, decomposed

aten = torch.ops.aten

CONTRACT = (
    "2-d convolutions whose kernel covers the whole unpadded input (stride and dilation "
    "irrelevant, groups 1, not transposed) become one matrix product; same terms summed in "
    "another order (float64: within 1e-12 relative to the sum of |terms|; float32: 1e-5 "
    "absolute on unit-scale inputs); every other convolution is left as it is"
)


def covers_input(input: Tensor, weight: Tensor, padding, transposed: bool, groups: int) -> bool:
    return (
        input.dim() == 4
        and weight.dim() == 4
        and not transposed
        and groups == 1
        and all(int(p) == 0 for p in padding)
        and tuple(weight.shape[2:]) == tuple(input.shape[2:])
    )


def conv_as_matmul(input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.conv2d(input, weight, bias)`` for a kernel as large as the input: ``[N, F, 1, 1]``."""
    n, f = input.shape[0], weight.shape[0]
    flat = input.reshape(n, -1)  # [N, C*KH*KW]
    kernel = weight.reshape(f, -1).permute(1, 0)  # [C*KH*KW, F] (permute: already core ATen, unlike t)
    out = torch.mm(flat, kernel) if bias is None else torch.addmm(bias, flat, kernel)  # [N, F]
    return out.reshape(n, f, 1, 1)  # [N, F, 1, 1]


def _convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    if not covers_input(input, weight, padding, transposed, groups):
        return NotImplemented  # run_decompositions keeps the convolution
    return conv_as_matmul(input, weight, bias)


class ConvAsMatmul(Rewrite):
    name = "conv_as_matmul"
    summary = "aten.convolution with a kernel covering its whole input -> addmm (speed)"
    contract = CONTRACT

    @staticmethod
    def cases(dtype=None):
        return conv_cases(dtype)

    def decompositions(self):
        return {aten.convolution.default: _convolution}

    def takes(self, input, weight, bias, stride, padding, dilation, transposed, output_padding, groups) -> bool:
        return covers_input(input, weight, padding, transposed, groups)

    def __call__(self, program: torch.export.ExportedProgram) -> RewriteResult:
        return replace_convolutions(program, self)


def replace_convolutions(program: torch.export.ExportedProgram, rewrite: Rewrite) -> RewriteResult:
    """A convolution rewrite's pass. It works on core ATen (convolution.default, which export's
    conv2d becomes) and retraces only when it takes some convolution. What the replacements emit
    (matmul, stack) is then decomposed by a retrace of its own: with the default decompositions
    in the first retrace instead, matmul came out as its built-in composite (an expand and a
    batched product) rather than the table's folded mm, and Mask R-CNN's shipped build ran 4.5x
    slower (0.85 s -> 3.8 s a call at 256x256)."""
    result = Rewrite.__call__(rewrite, decomposed(program))  # the table pass, on core ATen
    return RewriteResult(decomposed(result.program), result.replaced) if result.modified else result


# ----------------------------------------------------------------------------- strategy


@dataclasses.dataclass
class ConvCase:
    input: Tensor  # [N, C, H, W]
    weight: Tensor  # [F, C, KH, KW]
    bias: Tensor | None
    padding: int = 0
    groups: int = 1

    def reference(self) -> Tensor:
        return torch.nn.functional.conv2d(self.input, self.weight, self.bias, padding=self.padding, groups=self.groups)

    def rewritten(self) -> Tensor:
        if not covers_input(self.input, self.weight, [self.padding] * 2, False, self.groups):
            return self.reference()  # what the rewrite leaves in place
        return conv_as_matmul(self.input, self.weight, self.bias)

    def module(self) -> torch.nn.Module:
        return _ConvModule(self.padding, self.groups, self.bias is not None)

    def args(self) -> tuple:
        return (self.input, self.weight) + ((self.bias,) if self.bias is not None else ())

    @property
    def scale(self) -> float:
        """The largest sum of |terms|: the natural scale of a reassociated sum's error."""
        bias = self.bias.abs() if self.bias is not None else None
        return float(
            torch.nn.functional.conv2d(
                self.input.abs(), self.weight.abs(), bias, padding=self.padding, groups=self.groups
            ).max()
        )


class _ConvModule(torch.nn.Module):
    def __init__(self, padding: int, groups: int, has_bias: bool):
        super().__init__()
        self.padding, self.groups, self.has_bias = padding, groups, has_bias

    def forward(self, input, weight, bias=None):
        return torch.nn.functional.conv2d(input, weight, bias, padding=self.padding, groups=self.groups)


def conv_cases(dtype=None):
    """Hypothesis strategy of ``ConvCase``: kernels covering the input (1x1 up to 7x7 maps,
    SAM3's box projection among them), with and without bias, plus convolutions the rewrite
    must leave alone (padded, grouped, kernel smaller than the input)."""

    @st.composite
    def cases(draw):
        dt = draw(dtypes) if dtype is None else dtype
        n, c, f = draw(st.integers(1, 3)), draw(st.integers(1, 8)), draw(st.integers(1, 8))
        h, w = draw(st.integers(1, 7)), draw(st.integers(1, 7))
        kind = draw(st.sampled_from(["covers", "covers", "covers", "padded", "grouped", "smaller"]))
        kh, kw, padding, groups = h, w, 0, 1
        if kind == "padded":
            padding = 1
        elif kind == "grouped":
            groups = c = f = draw(st.sampled_from([2, 4]))
        elif kind == "smaller":
            kh, kw = max(1, h - 1), max(1, w - 1)
        seed = draw(st.integers(0, 2**31 - 1))
        input = seeded_tensor((n, c, h, w), dt, seed)  # [N, C, H, W]
        fan_in = (c // groups) * kh * kw  # weights scaled as a layer's are: unit-scale outputs
        weight = seeded_tensor((f, c // groups, kh, kw), dt, seed + 1) / fan_in**0.5  # [F, C/groups, KH, KW]
        bias = seeded_tensor((f,), dt, seed + 2) if draw(st.booleans()) else None  # [F]
        return ConvCase(input, weight, bias, padding, groups)

    return cases()
