"""A 2-d convolution -> its input's patches as columns, times the weight as one matrix (im2col).

Stock TVM compiles a convolution as a scalar loop nest over the output with a three-deep
reduction (channel, kernel row, kernel column); the backbones of the detectors are almost all
convolutions, and that loop nest ran RT-DETR's 30x slower than eager PyTorch here. As a matrix
product ``[Ho*Wo, KH*KW*C] @ [KH*KW*C, F]`` it runs on our vectorised matmul schedule
(``surgery.schedules.Matmul``), which already serves attention's products. The input goes
channels-last (``[N*H*W, C]``, one row per pixel) and zero-padded; the columns ``[N*Ho*Wo,
KH*KW*C]`` are its rows gathered once per tap (``index_select`` by an index that depends on
shapes only), so they cost one contiguous copy of ``KH*KW`` times the input (none for a 1x1
convolution with stride 1: a reshape). The product is ``columns @ kernel``, with the weight on
the right where ``matmul_packing`` packs it at build time.

A speed rewrite: TVM converts ``convolution`` correctly, so the probe never asks for this one;
``surgery.tvm_backend`` applies it when building the shipped configuration, after
``conv_as_matmul`` (which turns a kernel covering its whole input into one ``addmm``), with
``leave_direct``: the convolutions our Conv schedule rule computes in place, channels-last
(``surgery.conv_tiling.conv_directly``: groups 1, not transposed, output channels whole 16-float
vectors), are left to it, as it saves the columns' copy; this rewrite takes the rest.
A transposed convolution whose stride equals its kernel and that has no padding (each input
pixel writes its own ``KH x KW`` block of the output: Mask R-CNN's mask head upsamples so) is
one product ``[F*KH*KW, C] @ [C, H*W]`` followed by a depth-to-space; stock TVM's loop nest for
it took 72% of a Mask R-CNN call. Grouped convolutions, other transposed ones and those with a
1-d or 3-d input are left as they are.

Contract: same products and sums as the convolution, accumulated in a different order; float64
results agree to a few ulps of the sum of |terms|, float32 within the usual 1e-5 absolute on
unit-scale inputs (checked by the property tests in both dtypes).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from hypothesis import strategies as st
from torch import Tensor

from ..conv_tiling import conv_directly
from ..equivalence.strategies import dtypes, seeded_tensor
from .base import Rewrite, RewriteResult
from .conv_as_matmul import replace_convolutions

aten = torch.ops.aten

CONTRACT = (
    "2-d convolutions with groups 1, any stride, zero padding and dilation, become patches-as-columns "
    "times the weight as one matrix product, and transposed ones whose stride equals the kernel (no "
    "padding, dilation 1) one product and a depth-to-space; same terms summed in another order "
    "(float64: within 1e-12 relative to the sum of |terms|; float32: 1e-5 absolute on unit-scale inputs); "
    "grouped, other transposed and non-2-d convolutions are left as they are"
)


def takes_convolution(
    input: Tensor, weight: Tensor, stride, padding, dilation, transposed: bool, output_padding, groups: int
) -> bool:
    if input.dim() != 4 or weight.dim() != 4 or groups != 1:
        return False
    if not transposed:
        return True
    return (
        tuple(stride) == tuple(weight.shape[2:])
        and all(int(p) == 0 for p in [*padding, *output_padding])
        and all(int(d) == 1 for d in dilation)
    )


def output_extent(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def im2col_convolution(input: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation) -> Tensor:
    """``F.conv2d(input, weight, bias, stride, padding, dilation)`` as one matrix product:
    ``[N, F, Ho, Wo]``."""
    n, c, h, w = input.shape
    f, _, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ho, wo = output_extent(h, kh, sh, ph, dh), output_extent(w, kw, sw, pw, dw)
    hp, wp = h + 2 * ph, w + 2 * pw
    pixels = input.permute(0, 2, 3, 1)  # [N, H, W, C]
    if ph or pw:
        pixels = aten.constant_pad_nd(pixels, [0, 0, pw, pw, ph, ph])  # [N, Hp, Wp, C]
    pixels = pixels.reshape(n * hp * wp, c)  # [N*Hp*Wp, C]: one row of C channels per pixel
    if (kh, kw, sh, sw) == (1, 1, 1, 1):
        columns = pixels  # [N*Ho*Wo, C]
    else:
        # Each output pixel's KH*KW taps are whole rows of ``pixels``: one gather of contiguous
        # C-float rows, by an index that depends on shapes only (TVM folds it into a constant).
        # Stacked strided slices of [N, C, H, W] instead made TVM compute the columns element by
        # element through a chain of branches and divisions (RT-DETR's backbone: half its time).
        index = _tap_rows(n, hp, wp, ho, wo, kh, kw, stride, dilation, input.device)  # [N*Ho*Wo*KH*KW]
        columns = aten.index_select(pixels, 0, index)  # [N*Ho*Wo*KH*KW, C]
    columns = columns.reshape(n * ho * wo, kh * kw * c)  # [N*Ho*Wo, KH*KW*C]
    kernel = weight.permute(2, 3, 1, 0).reshape(kh * kw * c, f)  # [KH*KW*C, F], columns' order
    out = torch.mm(columns, kernel) if bias is None else torch.addmm(bias, columns, kernel)  # [N*Ho*Wo, F]
    return out.reshape(n, ho, wo, f).permute(0, 3, 1, 2)  # [N, F, Ho, Wo]


def _tap_rows(n: int, hp: int, wp: int, ho: int, wo: int, kh: int, kw: int, stride, dilation, device) -> Tensor:
    """The row of the padded, flattened ``[N*Hp*Wp, C]`` input that output pixel ``(b, y, x)``
    reads at tap ``(i, j)``: ``(b * Hp + y * sh + i * dh) * Wp + x * sw + j * dw``, ordered
    ``[N, Ho, Wo, KH, KW]`` and flattened."""
    (sh, sw), (dh, dw) = stride, dilation
    arange = functools.partial(torch.arange, device=device)
    y = (arange(n) * hp).reshape(n, 1, 1, 1, 1) + (arange(ho) * sh).reshape(1, ho, 1, 1, 1)  # [N, Ho, 1, 1, 1]
    y = y + (arange(kh) * dh).reshape(1, 1, 1, kh, 1)  # [N, Ho, 1, KH, 1]
    x = (arange(wo) * sw).reshape(1, 1, wo, 1, 1) + (arange(kw) * dw).reshape(1, 1, 1, 1, kw)  # [1, 1, Wo, 1, KW]
    return (y * wp + x).reshape(-1)  # [N*Ho*Wo*KH*KW]


def block_transposed_convolution(input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.conv_transpose2d(input, weight, bias, stride=kernel)``: each input pixel times the
    weight is its own ``KH x KW`` output block, ``[N, F, H*KH, W*KW]``."""
    n, c, h, w = input.shape
    _, f, kh, kw = weight.shape  # [C, F, KH, KW]
    kernel = weight.reshape(c, f * kh * kw).permute(1, 0)  # [F*KH*KW, C]
    out = torch.matmul(kernel, input.reshape(n, c, h * w))  # [N, F*KH*KW, H*W]
    out = out.reshape(n, f, kh, kw, h, w).permute(0, 1, 4, 2, 5, 3)  # [N, F, H, KH, W, KW]
    out = out.reshape(n, f, h * kh, w * kw)  # [N, F, H*KH, W*KW]
    return out if bias is None else out + bias.reshape(1, f, 1, 1)


class ConvIm2col(Rewrite):
    """``leave_direct``: leave the convolutions that our Conv schedule rule computes as they are
    (``surgery.conv_tiling.conv_directly``: in place, channels-last, no columns), as the shipped
    build does; take only the rest (transposed ones, output channels no whole number of vectors)."""

    name = "conv_im2col"
    summary = "aten.convolution (2-d, groups 1; transposed with stride = kernel) -> one matmul (speed)"
    contract = CONTRACT

    def __init__(self, leave_direct: bool = False):
        self.leave_direct = leave_direct

    @staticmethod
    def cases(dtype=None):
        return im2col_cases(dtype)

    def settings(self) -> dict:
        return {"leave_direct": self.leave_direct}

    def decompositions(self):
        def convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
            if not self.takes(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
                return NotImplemented  # run_decompositions keeps the convolution
            if transposed:
                return block_transposed_convolution(input, weight, bias)
            return im2col_convolution(input, weight, bias, stride, padding, dilation)

        return {aten.convolution.default: convolution}

    def takes(self, input, weight, bias, stride, padding, dilation, transposed, output_padding, groups) -> bool:
        if self.leave_direct and conv_directly(weight.shape[0], groups, transposed):
            return False
        return takes_convolution(input, weight, stride, padding, dilation, transposed, output_padding, groups)

    def __call__(self, program: torch.export.ExportedProgram) -> RewriteResult:
        return replace_convolutions(program, self)


# ----------------------------------------------------------------------------- strategy


@dataclasses.dataclass
class Im2colCase:
    input: Tensor  # [N, C, H, W]
    weight: Tensor  # [F, C / groups, KH, KW]; transposed: [C, F / groups, KH, KW]
    bias: Tensor | None  # [F]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    transposed: bool = False

    def _convolve(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.transposed:
            return torch.nn.functional.conv_transpose2d(
                input, weight, bias, self.stride, self.padding, 0, self.groups, self.dilation
            )
        return torch.nn.functional.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def reference(self) -> Tensor:
        return self._convolve(self.input, self.weight, self.bias)

    def taken(self) -> bool:
        return takes_convolution(
            self.input, self.weight, self.stride, self.padding, self.dilation, self.transposed, (0, 0), self.groups
        )

    def rewritten(self) -> Tensor:
        if not self.taken():
            return self.reference()  # what the rewrite leaves in place
        if self.transposed:
            return block_transposed_convolution(self.input, self.weight, self.bias)
        return im2col_convolution(self.input, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def module(self) -> torch.nn.Module:
        return _ConvModule(self)

    def args(self) -> tuple:
        return (self.input, self.weight) + ((self.bias,) if self.bias is not None else ())

    @property
    def scale(self) -> float:
        """The largest sum of |terms|: the natural scale of a reassociated sum's error."""
        bias = self.bias.abs() if self.bias is not None else None
        return float(self._convolve(self.input.abs(), self.weight.abs(), bias).max())


class _ConvModule(torch.nn.Module):
    def __init__(self, case: Im2colCase):
        super().__init__()
        self.case = case

    def forward(self, input, weight, bias=None):
        return self.case._convolve(input, weight, bias)


def im2col_cases(dtype=None):
    """Hypothesis strategy of ``Im2colCase``: the detectors' convolutions in small (1x1, 3x3 and
    7x7 kernels, strides 1 and 2, padding up to the kernel's half and beyond, dilation 1 and 2,
    odd and even maps down to a kernel as large as the padded input), with and without bias,
    transposed convolutions whose stride is their kernel (Mask R-CNN's 2x2 upsampling) and
    others, plus grouped convolutions: the rewrite must leave the other transposed and the
    grouped ones alone."""

    @st.composite
    def cases(draw):
        dt = draw(dtypes) if dtype is None else dtype
        n, c, f = draw(st.integers(1, 2)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
        kh, kw = draw(st.sampled_from([1, 3, 7, 2])), draw(st.sampled_from([1, 3, 7, 2]))
        stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        padding = (draw(st.integers(0, kh)), draw(st.integers(0, kw)))
        span_h, span_w = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
        # at least one output position: the padded map is as large as the dilated kernel
        h = draw(st.integers(max(1, span_h - 2 * padding[0]), max(1, span_h - 2 * padding[0]) + 9))
        w = draw(st.integers(max(1, span_w - 2 * padding[1]), max(1, span_w - 2 * padding[1]) + 9))
        groups = 1
        if draw(st.integers(0, 7)) == 0:
            groups = c = f = draw(st.sampled_from([2, 3]))
        seed = draw(st.integers(0, 2**31 - 1))
        bias = seeded_tensor((f,), dt, seed + 2) if draw(st.booleans()) else None  # [F]
        if draw(st.integers(0, 3)) == 0:  # transposed: Mask R-CNN's 2x2 upsampling, and ones left alone
            kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
            blocks = draw(st.booleans())
            stride = (kh, kw) if blocks else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
            padding = (0, 0) if blocks else (draw(st.integers(0, kh - 1)), draw(st.integers(0, kw - 1)))
            dilation = (1, 1)
            # at least one output position: (H - 1) * stride + kernel - 2 * padding >= 1
            min_h = 1 + max(0, -(-(2 * padding[0] + 1 - kh) // stride[0]))
            min_w = 1 + max(0, -(-(2 * padding[1] + 1 - kw) // stride[1]))
            h, w = draw(st.integers(min_h, min_h + 7)), draw(st.integers(min_w, min_w + 7))
            input = seeded_tensor((n, c, h, w), dt, seed)  # [N, C, H, W]
            weight = seeded_tensor((c, f // groups, kh, kw), dt, seed + 1) / c**0.5  # [C, F/groups, KH, KW]
            return Im2colCase(input, weight, bias, stride, padding, dilation, groups, transposed=True)
        input = seeded_tensor((n, c, h, w), dt, seed)  # [N, C, H, W]
        fan_in = (c // groups) * kh * kw  # weights scaled as a layer's are: unit-scale outputs
        weight = seeded_tensor((f, c // groups, kh, kw), dt, seed + 1) / fan_in**0.5  # [F, C/groups, KH, KW]
        return Im2colCase(input, weight, bias, stride, padding, dilation, groups)

    return cases()
