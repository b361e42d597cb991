"""``torchvision::roi_align`` -> the bilinear taps gathered as channel rows (speed).

The C++ kernel reads, for every bin, ``GH x GW`` samples of four taps each. Per axis a sample
is two taps (the low and the high pixel, with the kernel's clamping and edge rule) with weights
``(1 - frac, frac) / grid``, so a bin is ``TY x TX = 2GH x 2GW`` pixels with weights
``wy * wx``:

    out[k, c, ph, pw] = sum_{ty, tx} wy[k, ph, ty] * wx[k, pw, tx] * F[b_k, c, iy[k, ph, ty], ix[k, pw, tx]]

The map is taken channels-last, ``[N*H*W, C]``, and every tap is one C-long row of it: one
gather of ``K * PH * PW * TY * TX`` rows, indexed ``[K, PH, PW, TY * TX]`` so that the weighted
sum over each bin's taps reads it with no reshape between (TVM then computes both in one
kernel: ``surgery.schedules.gathers_into_weighted_sums``).

Why next to ``roi_align_separable``: the separable form multiplies every box's row weights by the
whole map (``K * PH * H * W * C`` multiply-adds however small the box), which is cheap on SAM3's
72x72 map and two boxes, and dominates Mask R-CNN, whose FPN pools every proposal on every
level (row_dispatch) and whose finest level is 200x272. The taps form's work does not grow with
the map. ``taps_cheaper`` chooses per call, from shapes alone (the box count cancels out of the
comparison, so it holds for a data-dependent number of boxes): the ratio of the separable
form's multiply-adds to the taps read. Measured in TVM (shipped schedules, 256 channels, 100
boxes with sampling ratio 2 unless said; separable ms / taps ms at each ratio), on a 2-core AMD
EPYC with AVX2, with the taps gathered in their weighted sum's kernel:

    ratio          1.1   1.7 (SAM3)    2.1    3.0    5.9    9.7   19.4   34.6   69.2  129.9
    sep / taps    1.34   0.72-1.01    1.93   2.37   3.59   3.99   8.33   7.88   11.6   11.2

(1.1: 7x7 bins on an 8x8 map; SAM3: adaptive 7x7 bins, 11x11 samples each, over 72x72, 16
and 2 boxes; the rest Mask R-CNN's levels and a 13x17 and a 16x16 map.) The threshold,
``MIN_RATIO = 2``, sits between SAM3's calls, where separable won or tied, and the next ratio
measured, where taps won by 1.9x. The 8x8 map is on the wrong side of it (taps 1.34x faster
there, left separable): no model here pools so small a map at its default sizes. Before the
taps were gathered in the sum's kernel the crossover was at ~19-35 on both AVX2 and AVX-512
CPUs (threshold 25).

A speed rewrite, run before ``roi_align_separable``, which takes the calls this one leaves.

Contract: that of ``roi_align`` (same static bound of samples per bin); the same terms as the
kernel summed in another order (float64 within 1e-12 relative, float32 1e-5 absolute on
unit-scale inputs); calls below the ratio are left as they are.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.nn.modules.utils import _pair

from .roi_align import CONTRACT as ROI_ALIGN_CONTRACT
from .roi_align import PooledCase, RoiAlignRewrite, SamplePositions, axis_bilinear, default_bound, roi_align_with

aten = torch.ops.aten

CONTRACT = (
    ROI_ALIGN_CONTRACT + "; the same terms as the kernel summed in another order (speed rewrite); only calls whose "
    "map makes the separable form's multiply-adds at least min_ratio (default 2) times the taps read are "
    "taken, the others are left as they are (for roi_align_separable)"
)

# The ratio of the separable form's multiply-adds to the taps read at which the taps form is
# chosen (see the module docstring for the measurements it comes from).
MIN_RATIO = 2.0


def samples_per_bin(
    H: int, W: int, PH: int, PW: int, sampling_ratio: int, max_samples_per_bin: int | tuple[int, int] | None
) -> tuple[int, int]:
    """The static ``(GH, GW)`` sample slots per bin that ``sample_positions`` lays out."""
    if sampling_ratio > 0:
        return sampling_ratio, sampling_ratio
    if max_samples_per_bin is not None:
        return _pair(max_samples_per_bin)
    return default_bound(H, W, PH, PW)


def work_ratio(H: int, W: int, PH: int, PW: int, GH: int, GW: int) -> float:
    """Separable multiply-adds over taps read, per box and channel:
    ``(PH*H*W + PH*PW*W) / (PH*PW * 2GH * 2GW)``."""
    separable = PH * H * W + PH * PW * W  # rows of every bin's weights times the map, then columns
    taps = PH * PW * (2 * GH) * (2 * GW)
    return separable / taps


def taps_cheaper(
    input_shape, PH: int, PW: int, sampling_ratio: int, max_samples_per_bin=None, min_ratio: float = MIN_RATIO
) -> bool:
    """Whether the taps form is the cheaper one for a ``[N, C, H, W]`` map (static shapes)."""
    H, W = int(input_shape[2]), int(input_shape[3])
    GH, GW = samples_per_bin(H, W, PH, PW, sampling_ratio, max_samples_per_bin)
    return work_ratio(H, W, PH, PW, GH, GW) >= min_ratio


def axis_taps(pos: Tensor, used: Tensor, grid: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """[K, P, G] sample coordinates along one axis -> the [K, P, 2G] pixels they read (low taps,
    then high) and their weights, averaged over the box's samples per bin."""
    low, high, w_low, w_high = axis_bilinear(pos, used, size)  # [K, P, G] each
    pixels = torch.cat([low, high], dim=2).to(torch.int64)  # [K, P, 2G], in [0, size)
    weights = torch.cat([w_low, w_high], dim=2) / grid.clamp(min=1)[:, None, None]  # [K, P, 2G]
    return pixels, weights


def taps_pool(input: Tensor, rois: Tensor, at: SamplePositions) -> Tensor:
    """Every bin's taps as rows of the channels-last map, weighted and summed."""
    N, C, H, W = input.shape
    K = rois.shape[0]
    PH, PW = at.y.shape[1], at.x.shape[1]
    iy, wy = axis_taps(at.y, at.used_y, at.grid_h, H)  # [K, PH, TY]
    ix, wx = axis_taps(at.x, at.used_x, at.grid_w, W)  # [K, PW, TX]
    TY, TX = iy.shape[2], ix.shape[2]
    row = iy[:, :, None, :, None] * W + ix[:, None, :, None, :]  # [K, PH, PW, TY, TX]
    if N > 1:  # batch indices lie in [0, N) (roi_align's contract)
        row = row + (rois[:, 0].to(torch.int64) * (H * W))[:, None, None, None, None]  # [K, PH, PW, TY, TX]
    weight = wy[:, :, None, :, None] * wx[:, None, :, None, :]  # [K, PH, PW, TY, TX]
    # Channels-last, a pixel's C values are one contiguous row; Mask R-CNN's FPN levels come out
    # of the convolution rewrites channels-last, so this permute undoes theirs.
    rows = input.permute(0, 2, 3, 1).reshape(N * H * W, C)  # [N*H*W, C]
    taps = aten.index.Tensor(rows, [row.reshape(K, PH, PW, TY * TX)])  # [K, PH, PW, T, C]
    out = (taps * weight.reshape(K, PH, PW, TY * TX, 1)).sum(3)  # [K, PH, PW, C]
    # contiguous, as roi_align's result is (Mask R-CNN's box head views it)
    return out.permute(0, 3, 1, 2).contiguous()  # [K, C, PH, PW]


# ``torchvision::roi_align`` (its argument order) pooled from gathered taps.
roi_align_taps = functools.partial(roi_align_with, taps_pool)


class RoiAlignTaps(RoiAlignRewrite):
    name = "roi_align_taps"
    summary = "torchvision::roi_align -> bilinear taps gathered as channel rows, where cheaper than separable (speed)"
    contract = CONTRACT
    pool = staticmethod(taps_pool)

    def __init__(self, max_samples_per_bin: int | tuple[int, int] | None = None, min_ratio: float = MIN_RATIO):
        super().__init__(max_samples_per_bin)
        self.min_ratio = min_ratio

    def settings(self):
        return {**super().settings(), "min_ratio": self.min_ratio}

    @staticmethod
    def cases(dtype=None):
        return taps_cases(dtype)

    def takes(self, input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned) -> bool:
        return taps_cheaper(
            input.shape, pooled_height, pooled_width, sampling_ratio, self.max_samples_per_bin, self.min_ratio
        )


# ----------------------------------------------------------------------------- strategy


class TapsCase(PooledCase):
    """``roi_align``'s cases, with the taps form as the replacement."""

    pool = staticmethod(taps_pool)

    def taken(self, min_ratio: float = MIN_RATIO) -> bool:
        """Whether ``RoiAlignTaps(min_ratio=min_ratio)`` replaces this call."""
        return taps_cheaper(self.input.shape, *_pair(self.output_size), self.sampling_ratio, None, min_ratio)


def taps_cases(dtype=None):
    """The roi_align strategy, pooled from gathered taps (``PooledCase.cases``)."""
    return TapsCase.cases(dtype)
