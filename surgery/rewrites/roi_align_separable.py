"""``torchvision::roi_align`` -> two small matrix products per box (speed).

Bilinear ROI pooling samples a tensor-product grid: the rows a bin samples do not depend on the
column and vice versa, and each bilinear weight is a product of a row weight and a column weight.
So the C++ kernel's sum over samples factorises (per box k, channel c):

    out[k, c, ph, pw] = sum_{r, s} Wy[k, ph, r] * F[b_k, c, r, s] * Wx[k, pw, s]

with ``Wy[k, ph, r] = sum_iy used * (hy [r == y_low] + ly [r == y_high]) / grid_h`` (the same
sample positions, boundary rule, edge clamping and adaptive sample counts as the kernel: shared
with ``roi_align.sample_positions``), and ``Wx`` alike. Two matrix products replace ~120 samples x
4 taps per output for a map-sized box: on SAM3's 72x72x256 features two boxes cost ~20 M
multiply-adds in well-vectorised products instead of ~12 M scattered loads (5.9 ms in the C++
kernel, 5.7 ms in TVM's converter on this machine).

A speed rewrite: TVM converts roi_align correctly (0.27), so the probe does not ask for it;
``surgery.tvm_backend.speed_rewrites`` applies it. Where TVM's converter is broken the probe
chooses ``roi_align`` (grid_sample-based) first and nothing is left for this one.

Contract: that of ``roi_align`` (same static bound of samples per bin); the same terms summed in
another order (float64 within 1e-12 relative, float32 1e-5 absolute on unit-scale inputs).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .roi_align import CONTRACT as ROI_ALIGN_CONTRACT
from .roi_align import PooledCase, RoiAlignRewrite, SamplePositions, axis_bilinear, roi_align_with

CONTRACT = ROI_ALIGN_CONTRACT + "; the same terms as the kernel summed in another order (speed rewrite)"


def axis_weights(pos: Tensor, used: Tensor, grid: Tensor, size: int) -> Tensor:
    """[K, P, G] sample coordinates along one axis -> [K, P, size] averaged interpolation weights."""
    low, high, w_low, w_high = axis_bilinear(pos, used, size)  # [K, P, G] each
    pixels = torch.arange(size, dtype=pos.dtype, device=pos.device)  # [size]
    weights = w_low[..., None] * (pixels == low[..., None]) + w_high[..., None] * (
        pixels == high[..., None]
    )  # [K, P, G, size]
    return weights.sum(2) / grid.clamp(min=1)[:, None, None]  # [K, P, size]


def separable_pool(input: Tensor, rois: Tensor, at: SamplePositions) -> Tensor:
    """``Wy @ F @ Wx^T`` per box."""
    N, C, H, W = input.shape
    K = rois.shape[0]
    PH, PW = at.y.shape[1], at.x.shape[1]
    wy = axis_weights(at.y, at.used_y, at.grid_h, H)  # [K, PH, H]
    wx = axis_weights(at.x, at.used_x, at.grid_w, W)  # [K, PW, W]
    if N == 1:
        # One map for every box, taken channels-last: SAM3's features arrive as [H*W, 1, C], so
        # [H, W*C] is what the graph had before it was permuted to NCHW. Then the row products of
        # all boxes are one matrix product with C-long contiguous rows (no product per channel
        # over 72-wide rows), and so are the column products.
        feats = input[0].permute(1, 2, 0).reshape(H, W * C)  # [H, W*C]
        rows = torch.matmul(wy.reshape(K * PH, H), feats).reshape(K, PH, W, C)  # [K, PH, W, C]
        out = torch.matmul(wx[:, None], rows)  # [K, 1, PW, W] @ [K, PH, W, C] -> [K, PH, PW, C]
        # contiguous, as roi_align's result is: a consumer may view it (Mask R-CNN's box head
        # flattens it), which a permuted layout would refuse
        return out.permute(0, 3, 1, 2).contiguous()  # [K, C, PH, PW]
    else:
        maps = input.index_select(0, rois[:, 0].to(torch.int64))  # [K, C, H, W]
        rows = torch.matmul(wy[:, None], maps).reshape(K, C * PH, W)  # [K, C*PH, W]
    out = torch.bmm(rows, wx.transpose(1, 2))  # [K, C*PH, PW]
    return out.reshape(K, C, PH, PW)  # [K, C, PH, PW]


# ``torchvision::roi_align`` (its argument order) as ``Wy @ F @ Wx^T`` per box.
roi_align_separable = functools.partial(roi_align_with, separable_pool)


class RoiAlignSeparable(RoiAlignRewrite):
    name = "roi_align_separable"
    summary = "torchvision::roi_align -> Wy @ F @ Wx^T per box (speed)"
    contract = CONTRACT
    pool = staticmethod(separable_pool)

    @staticmethod
    def cases(dtype=None):
        return separable_cases(dtype)


# ----------------------------------------------------------------------------- strategy


class SeparableCase(PooledCase):
    """``roi_align``'s cases, with the separable form as the replacement."""

    pool = staticmethod(separable_pool)


def separable_cases(dtype=None):
    """The roi_align strategy, pooled by the separable form (``PooledCase.cases``)."""
    return SeparableCase.cases(dtype)
