"""``torchvision::roi_align`` -> bilinear pooling built on ``grid_sample``.

Every sample of every bin of every box comes from one ``grid_sampler_2d`` call over a sampling
grid computed from the boxes; the samples are then masked and averaged per bin. torchvision's
adaptive mode (``sampling_ratio <= 0``) takes ``ceil(roi_size / pooled_size)`` samples per bin,
which depends on the data; graphs need static shapes, so we lay out a static upper bound of
samples per bin (``max_samples_per_bin``, by default derived from the feature map) and mask off
the samples a box doesn't use.

Why not torchvision's pure-PyTorch ``_roi_align``: its adaptive mode lays out H x W samples per
bin, an intermediate of ``[K, C, PH, PW, H, W]`` (for SAM3, 64 boxes x 256 x 49 x 72 x 72 floats:
over 16 GB per tensor), it is wrapped in ``torch.compile``, and it lacks the C++ kernel's boundary
rule (a sample beyond -1 or the map's size contributes 0), so it is not exact for boxes that
straddle the map's edge. We follow the C++ kernel (``roi_align_kernel.cpp``) instead.

Contract: exact (float64 relative error <= 1e-12, float32 absolute <= 1e-5 on unit-scale data)
on a finite feature map for every finite box whose adaptive sample count fits the bound:
``ceil(roi_h / PH) <= GH`` and ``ceil(roi_w / PW) <= GW`` (roi sizes in feature-map pixels, after
``spatial_scale``; ``(GH, GW) = max_samples_per_bin``, default ``(ceil(H / PH), ceil(W / PW))``),
so in particular for every box no larger than the feature map. ``sampling_ratio > 0`` is exact
for every finite box. Batch indices must lie in ``[0, N)``. Beyond the bound the eager function
raises; a rewritten graph (which cannot raise on data) caps that box's samples per bin at the
bound, i.e. pools it as torchvision would with ``sampling_ratio = min(ceil(roi / pooled), G)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
import torchvision  # noqa: F401  registers torchvision::roi_align (also needed to load .pt2 files)
from hypothesis import strategies as st
from torch import Tensor
from torch.nn.modules.utils import _pair
from torchvision.ops._utils import check_roi_boxes_shape, convert_boxes_to_roi_format

from ..equivalence.strategies import dtypes, seeded_tensor
from .base import CallModule, Rewrite, is_tracing

CONTRACT = (
    "exact on a finite feature map for every finite box whose adaptive sample count fits the static bound: "
    "ceil(roi_h/PH) <= GH and ceil(roi_w/PW) <= GW in feature-map pixels, with "
    "(GH, GW) = max_samples_per_bin, default (ceil(H/PH), ceil(W/PW)), i.e. every box no larger "
    "than the feature map; sampling_ratio > 0 is exact for every finite box; batch indices in "
    "[0, N). Beyond the bound the eager function raises and a rewritten graph caps the box's "
    "samples per bin at the bound"
)


def roi_align(
    input: Tensor,
    boxes: Tensor | Sequence[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    *,
    max_samples_per_bin: int | tuple[int, int] | None = None,
) -> Tensor:
    """``torchvision.ops.roi_align`` built only from ``grid_sample`` and arithmetic.

    Boxes are ``Tensor[K, 5]`` (batch index, x1, y1, x2, y2) or a list of ``Tensor[L, 4]``, one per
    image. Raises ValueError for a box outside the contract (see module docstring).
    """
    check_roi_boxes_shape(boxes)
    rois = boxes if isinstance(boxes, Tensor) else convert_boxes_to_roi_format(list(boxes))
    PH, PW = _pair(output_size)
    return roi_align_grid_sample(
        input,
        rois,
        spatial_scale,
        PH,
        PW,
        sampling_ratio,
        aligned,
        max_samples_per_bin=max_samples_per_bin,
        check_contract=True,
    )


def default_bound(H: int, W: int, PH: int, PW: int) -> tuple[int, int]:
    """Samples per bin that cover every box no larger than the map: (ceil(H/PH), ceil(W/PW))."""
    return max(1, math.ceil(H / PH)), max(1, math.ceil(W / PW))


@dataclasses.dataclass
class SamplePositions:
    """Where torchvision's C++ kernel samples, for every box, bin and sample slot."""

    y: Tensor  # [K, PH, GH] sample rows (pixel coordinates)
    x: Tensor  # [K, PW, GW] sample columns
    used_y: Tensor  # [K, PH, GH] the slot is one of the box's samples and inside the boundary rule
    used_x: Tensor  # [K, PW, GW]
    grid_h: Tensor  # [K] samples per bin actually taken
    grid_w: Tensor  # [K]


def sample_positions(
    input: Tensor,  # [N, C, H, W]
    rois: Tensor,  # [K, 5]
    spatial_scale: float,
    PH: int,
    PW: int,
    sampling_ratio: int,
    aligned: bool,
    max_samples_per_bin: int | tuple[int, int] | None,
    check_contract: bool,
) -> SamplePositions:
    """The C++ kernel's sample positions over a static layout of GH x GW slots per bin."""
    torch._check(input.dim() == 4, lambda: f"roi_align: expected 4-D input, got {input.dim()}-D")
    torch._check(
        rois.dim() == 2 and rois.shape[1] == 5, lambda: f"roi_align: rois must be [K, 5], got {list(rois.shape)}"
    )
    torch._check(PH > 0 and PW > 0, lambda: "roi_align: output_size must be positive")
    N, C, H, W = input.shape
    adaptive = sampling_ratio <= 0
    if adaptive:
        GH, GW = _pair(max_samples_per_bin) if max_samples_per_bin is not None else default_bound(H, W, PH, PW)
        torch._check(GH > 0 and GW > 0, lambda: "roi_align: max_samples_per_bin must be positive")
    else:
        GH = GW = sampling_ratio

    offset = 0.5 if aligned else 0.0
    start_w = rois[:, 1] * spatial_scale - offset  # [K]
    start_h = rois[:, 2] * spatial_scale - offset  # [K]
    roi_w = (rois[:, 3] * spatial_scale - offset) - start_w  # [K]
    roi_h = (rois[:, 4] * spatial_scale - offset) - start_h  # [K]
    if not aligned:  # torchvision forces malformed ROIs to be 1x1
        roi_w = roi_w.clamp(min=1.0)  # [K]
        roi_h = roi_h.clamp(min=1.0)  # [K]
    bin_h = roi_h / PH  # [K]
    bin_w = roi_w / PW  # [K]

    if adaptive:
        needed_h = bin_h.ceil()  # [K] torchvision's roi_bin_grid_h (<= 0 for inverted aligned boxes)
        needed_w = bin_w.ceil()  # [K]
        if check_contract and not is_tracing(input, rois):
            _raise_outside_bound(rois, needed_h, needed_w, GH, GW)
        grid_h = needed_h.clamp(max=GH)  # [K] past the bound, cap (see contract)
        grid_w = needed_w.clamp(max=GW)  # [K]
    else:
        grid_h = torch.full_like(bin_h, GH)  # [K]
        grid_w = torch.full_like(bin_w, GW)  # [K]

    # Sample positions as the C++ kernel computes them:
    #   y = roi_start_h + ph * bin_size_h + (iy + .5) * bin_size_h / roi_bin_grid_h
    ph = torch.arange(PH, dtype=input.dtype, device=input.device)  # [PH]
    pw = torch.arange(PW, dtype=input.dtype, device=input.device)  # [PW]
    iy = torch.arange(GH, dtype=input.dtype, device=input.device) + 0.5  # [GH]
    ix = torch.arange(GW, dtype=input.dtype, device=input.device) + 0.5  # [GW]
    # Unused samples (iy >= grid_h) are masked; dividing by >= 1 keeps them finite.
    y = (start_h[:, None, None] + ph[None, :, None] * bin_h[:, None, None]) + (
        iy[None, None, :] * bin_h[:, None, None]
    ) / grid_h.clamp(min=1)[:, None, None]  # [K, PH, GH]
    x = (start_w[:, None, None] + pw[None, :, None] * bin_w[:, None, None]) + (
        ix[None, None, :] * bin_w[:, None, None]
    ) / grid_w.clamp(min=1)[:, None, None]  # [K, PW, GW]
    # The kernel's boundary rule: a sample beyond -1 or the map's size contributes 0.
    used_y = (iy[None, :] < grid_h[:, None])[:, None, :] & (y >= -1) & (y <= H)  # [K, PH, GH]
    used_x = (ix[None, :] < grid_w[:, None])[:, None, :] & (x >= -1) & (x <= W)  # [K, PW, GW]
    return SamplePositions(y, x, used_y, used_x, grid_h, grid_w)


def axis_bilinear(pos: Tensor, used: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """[K, P, G] sample coordinates along one axis -> the pixels of their two taps and the taps'
    weights, ``(low, high, w_low, w_high)``, each [K, P, G], with the C++ kernel's clamping and
    edge rule; unused samples weigh 0."""
    pos = pos.clamp(min=0)  # the kernel: y <= 0 -> 0
    low = pos.floor()  # [K, P, G]
    at_end = low >= size - 1  # the kernel: y_low >= size - 1 -> both taps on the last pixel
    low = torch.where(at_end, torch.full_like(low, size - 1), low)  # [K, P, G]
    frac = torch.where(at_end, torch.zeros_like(pos), pos - low)  # [K, P, G]
    high = torch.where(at_end, low, low + 1)  # [K, P, G]
    zero = torch.zeros_like(pos)
    w_low = torch.where(used, 1 - frac, zero)  # [K, P, G]
    w_high = torch.where(used, frac, zero)  # [K, P, G]
    return low, high, w_low, w_high


# How a replacement pools the samples, given the map, the boxes in the map's dtype (at least one)
# and where the C++ kernel samples: -> [K, C, PH, PW].
Pool = Callable[[Tensor, Tensor, SamplePositions], Tensor]


def roi_align_with(
    pool: Pool,
    input: Tensor,  # [N, C, H, W]
    rois: Tensor,  # [K, 5]
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
    *,
    max_samples_per_bin: int | tuple[int, int] | None = None,
    check_contract: bool = False,
) -> Tensor:
    """A replacement in the argument order of ``torchvision::roi_align`` (after ``pool``): the
    kernel's sample positions, pooled by ``pool``."""
    _, C, _, _ = input.shape
    rois = rois.to(input.dtype)
    at = sample_positions(
        input,
        rois,
        spatial_scale,
        pooled_height,
        pooled_width,
        sampling_ratio,
        aligned,
        max_samples_per_bin,
        check_contract,
    )
    if rois.shape[0] == 0:
        return input.new_zeros(0, C, pooled_height, pooled_width)
    return pool(input, rois, at)


def grid_sample_pool(input: Tensor, rois: Tensor, at: SamplePositions) -> Tensor:
    """Every sample of every bin from one ``grid_sample`` call, then the mean per bin."""
    N, C, H, W = input.shape
    K = rois.shape[0]
    PH, GH = at.y.shape[1:]
    PW, GW = at.x.shape[1:]
    count = (at.grid_h * at.grid_w).clamp(min=1)  # [K]

    # One in [-1, 0] (or [size-1, size]) is clamped onto the edge pixel: grid_sample's own zero
    # padding is a different rule, so clamp here. Samples that don't count (beyond the boundary,
    # or past the box's adaptive count) are sent far outside the map, where zero padding makes
    # them exactly 0: no mask over the [K, C, ...] samples is needed.
    gy = torch.where(at.used_y, _normalize(at.y.clamp(0, H - 1), H), _OUTSIDE)  # [K, PH, GH]
    gx = torch.where(at.used_x, _normalize(at.x.clamp(0, W - 1), W), _OUTSIDE)  # [K, PW, GW]
    grid = torch.stack(
        [
            gx.reshape(K, 1, PW * GW).expand(K, PH * GH, PW * GW),
            gy.reshape(K, PH * GH, 1).expand(K, PH * GH, PW * GW),
        ],
        dim=-1,
    )  # [K, PH*GH, PW*GW, 2]

    if N == 1:  # every valid batch index is 0: share the map instead of copying it per box
        maps = input.expand(K, C, H, W)  # [K, C, H, W]
    else:
        maps = input.index_select(0, rois[:, 0].to(torch.int64))  # [K, C, H, W]
    samples = F.grid_sample(
        maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )  # [K, C, PH*GH, PW*GW]
    sums = samples.reshape(K, C, PH, GH, PW, GW).sum(dim=(3, 5))  # [K, C, PH, PW]
    return sums / count[:, None, None, None]  # [K, C, PH, PW]


# The replacement, in the argument order of ``torchvision::roi_align``.
roi_align_grid_sample = functools.partial(roi_align_with, grid_sample_pool)


# A normalized coordinate whose four bilinear taps all lie outside any map (pixel -size-0.5).
_OUTSIDE = -3.0


def _normalize(coord: Tensor, size: int) -> Tensor:
    """Pixel coordinate in [0, size-1] -> grid_sample's [-1, 1] (align_corners=False)."""
    return (2 * coord + 1) / size - 1


def _raise_outside_bound(rois: Tensor, needed_h: Tensor, needed_w: Tensor, GH: int, GW: int) -> None:
    outside = (needed_h > GH) | (needed_w > GW)
    if bool(outside.any()):
        k = int(outside.nonzero()[0, 0])
        raise ValueError(
            f"roi_align: box {k} {rois[k].tolist()} needs {int(needed_h[k])}x{int(needed_w[k])} "
            f"samples per bin, beyond the static bound {GH}x{GW} (contract: boxes no larger than "
            f"the feature map); pass max_samples_per_bin=({int(needed_h.max())}, {int(needed_w.max())}) "
            f"or larger"
        )


class RoiAlignRewrite(Rewrite):
    """Base of the rewrites of ``torchvision::roi_align``: subclasses name their ``pool``."""

    pool: ClassVar[Pool]

    def __init__(self, max_samples_per_bin: int | tuple[int, int] | None = None):
        self.max_samples_per_bin = max_samples_per_bin

    def settings(self):
        return {"max_samples_per_bin": self.max_samples_per_bin}

    def decompositions(self):
        def roi_align_decomposition(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
            args = (input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)
            if not self.takes(*args):
                return NotImplemented  # run_decompositions keeps the call
            return roi_align_with(
                self.pool,
                input,
                rois,
                spatial_scale,
                pooled_height,
                pooled_width,
                sampling_ratio,
                aligned,
                max_samples_per_bin=self.max_samples_per_bin,
            )

        return {torch.ops.torchvision.roi_align.default: roi_align_decomposition}


class RoiAlignToGridSample(RoiAlignRewrite):
    """``torchvision::roi_align`` -> grid_sample + masked mean. Run before ``grid_sample``."""

    name = "roi_align"
    summary = "torchvision::roi_align -> bilinear pooling built on grid_sample"
    contract = CONTRACT
    pool = staticmethod(grid_sample_pool)

    @staticmethod
    def cases(dtype=None):
        return roi_align_cases(dtype)

    probe_note = "adaptive roi_align on a 7x9 map with boxes straddling its edges"

    def probe_case(self):
        input = torch.linspace(-1, 1, 2 * 7 * 9).reshape(1, 2, 7, 9).sin()
        boxes = torch.tensor([[0, -1.5, 0.5, 6.0, 5.0], [0, 3.2, 2.1, 10.0, 8.5], [0, 1.0, 1.0, 2.0, 1.5]])
        return RoiAlignCase(input, boxes, (3, 2), 1.0, -1, False, ())


# ----------------------------------------------------------------------------- strategy

BOX_KINDS = ("inside", "straddling", "outside", "degenerate", "tiny", "inverted", "whole_map", "edge", "beyond_edge")


@dataclasses.dataclass
class RoiAlignCase:
    input: Tensor
    boxes: Tensor | list[Tensor]
    output_size: tuple[int, int]
    spatial_scale: float
    sampling_ratio: int
    aligned: bool
    kinds: tuple[str, ...]

    def kwargs(self):
        return dict(
            output_size=self.output_size,
            spatial_scale=self.spatial_scale,
            sampling_ratio=self.sampling_ratio,
            aligned=self.aligned,
        )

    def reference(self) -> Tensor:
        return torchvision.ops.roi_align(self.input, self.boxes, **self.kwargs())

    def rewritten(self) -> Tensor:
        return roi_align(self.input, self.boxes, **self.kwargs())

    def module(self) -> torch.nn.Module:
        """A module that calls the op, for the graph form (export, rewrite, run)."""
        return CallModule(torchvision.ops.roi_align, **self.kwargs())

    def args(self) -> tuple:
        return (self.input, self.boxes)

    def rois(self) -> Tensor:
        return self.boxes if isinstance(self.boxes, Tensor) else convert_boxes_to_roi_format(self.boxes)

    def within_contract(self) -> bool:
        """The contract, computed independently of the implementation (from its definition)."""
        if self.sampling_ratio > 0:
            return True
        _, _, H, W = self.input.shape
        PH, PW = self.output_size
        GH, GW = default_bound(H, W, PH, PW)
        for box in self.rois().tolist():
            off = 0.5 if self.aligned else 0.0
            x1, y1, x2, y2 = (torch.tensor(v, dtype=self.input.dtype) * self.spatial_scale - off for v in box[1:])
            h, w = y2 - y1, x2 - x1
            if not self.aligned:
                h, w = max(h, torch.tensor(1.0, dtype=h.dtype)), max(w, torch.tensor(1.0, dtype=w.dtype))
            if math.ceil(float(h / PH)) > GH or math.ceil(float(w / PW)) > GW:
                return False
        return True

    @property
    def scale(self) -> float:
        return float(self.input.abs().max()) if self.input.numel() else 1.0


class PooledCase(RoiAlignCase):
    """``roi_align``'s cases, with another ``pool`` (a speed rewrite's) as the replacement."""

    pool: ClassVar[Pool]

    def rewritten(self) -> Tensor:
        check_roi_boxes_shape(self.boxes)
        return roi_align_with(
            type(self).pool,
            self.input,
            self.rois().to(self.input.dtype),
            self.spatial_scale,
            *_pair(self.output_size),
            self.sampling_ratio,
            self.aligned,
            check_contract=True,
        )

    @classmethod
    def cases(cls, dtype=None):
        """The roi_align strategy's cases (boxes inside, straddling, outside, degenerate, tiny,
        inverted, whole-map, at and beyond the contract's edge; scales; both box formats; several
        images) as cases of this class."""
        return roi_align_cases(dtype).map(lambda case: cls(**{f: getattr(case, f) for f in case.__dataclass_fields__}))


def roi_align_cases(dtype=None):
    """Hypothesis strategy of ``RoiAlignCase``: feature maps of random sizes and channels, boxes
    inside, straddling and outside the map, degenerate, tiny and inverted ones, boxes exactly at
    the contract's edge and just beyond it, several images with batch indices, spatial scales
    1, 1/2, 1/4, 1/16 and 0.3, fixed and adaptive sampling, both ``aligned``, both box formats."""

    @st.composite
    def box(draw, H, W, scale, PH, PW, aligned):
        """One box in image coordinates (feature-map pixels / scale)."""
        kind = draw(st.sampled_from(BOX_KINDS))
        u = st.floats(0, 1)
        GH, GW = default_bound(H, W, PH, PW)
        if kind == "inside":
            x1, x2 = sorted([draw(u) * W, draw(u) * W])
            y1, y2 = sorted([draw(u) * H, draw(u) * H])
        elif kind == "straddling":
            x1, y1 = draw(st.floats(-3, 0.5)), draw(st.floats(-3, 0.5))
            x2, y2 = x1 + draw(st.floats(0, W)), y1 + draw(st.floats(0, H))
            if draw(st.booleans()):
                x1, x2 = W - x2 + x1, W + draw(st.floats(0, 2))
        elif kind == "outside":
            x1 = draw(st.sampled_from([-6.0, W + 1.5, W + 0.25, -1.25]))
            y1 = draw(st.floats(-4, H + 4))
            x2, y2 = x1 + draw(st.floats(0, 4)), y1 + draw(st.floats(0, 4))
        elif kind == "degenerate":
            x1 = x2 = draw(u) * W
            y1 = draw(u) * H
            y2 = y1 + draw(st.sampled_from([0.0, 1.0]))
        elif kind == "tiny":
            x1, y1 = draw(u) * W, draw(u) * H
            x2, y2 = x1 + draw(st.sampled_from([1e-3, 0.1, 0.5])), y1 + draw(st.sampled_from([1e-3, 0.1, 0.5]))
        elif kind == "inverted":
            x2, y2 = draw(u) * W, draw(u) * H
            x1, y1 = x2 + draw(st.floats(0.1, 3)), y2 + draw(st.floats(0.1, 3))
        elif kind == "whole_map":
            x1, y1, x2, y2 = 0.0, 0.0, float(W), float(H)
        else:  # the contract's edge: exactly G*P feature pixels, or one pixel more
            extra = 0.0 if kind == "edge" else 1.0
            x1, y1 = draw(st.floats(-2, 2)), draw(st.floats(-2, 2))
            x2, y2 = x1 + GW * PW + extra, y1 + GH * PH + extra
        return [x1 / scale, y1 / scale, x2 / scale, y2 / scale], kind

    @st.composite
    def cases(draw):
        dt = draw(dtypes) if dtype is None else dtype
        N, C = draw(st.integers(1, 3)), draw(st.integers(1, 4))
        H, W = draw(st.integers(1, 12)), draw(st.integers(1, 12))
        PH, PW = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        scale = draw(st.sampled_from([1.0, 0.5, 0.25, 1 / 16, 0.3]))
        aligned = draw(st.booleans())
        sampling_ratio = draw(st.sampled_from([-1, 0, 1, 2, 3]))
        per_image = [draw(st.lists(box(H, W, scale, PH, PW, aligned), max_size=3)) for _ in range(N)]
        kinds = tuple(kind for boxes in per_image for _, kind in boxes)
        input = seeded_tensor((N, C, H, W), dt, draw(st.integers(0, 2**31 - 1)))
        if draw(st.booleans()):  # list of Tensor[L, 4], one per image
            boxes = [torch.tensor([b for b, _ in bs], dtype=dt).reshape(-1, 4) for bs in per_image]
        else:  # Tensor[K, 5] with batch indices, in a shuffled order
            rows = [[float(n)] + b for n, bs in enumerate(per_image) for b, _ in bs]
            order = draw(st.permutations(range(len(rows))))
            boxes = torch.tensor([rows[i] for i in order], dtype=dt).reshape(-1, 5)
        return RoiAlignCase(input, boxes, (PH, PW), scale, sampling_ratio, aligned, kinds)

    return cases()
