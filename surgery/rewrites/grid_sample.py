"""``aten.grid_sampler_2d`` (and ``aten.grid_sampler`` on 4-D input) -> gather/where arithmetic.

Stock TVM (0.25-0.27) converts ``grid_sampler_2d`` with PyTorch's ``[N, H, W, 2]`` grid passed
to an op that expects ``[N, 2, H, W]``: shape errors, or wrong numbers when the shapes happen to
fit. After this rewrite no grid sampler is left: the input is flattened to ``[N, C, H*W]`` and
every tap is one ``gather`` of linear indices, masked with ``where`` (zero padding), then
weighted and summed in the order PyTorch's CPU kernel uses.

Why not ``torch._decomp``'s ``grid_sampler_2d``: it zeroes the *weight* of an out-of-bounds tap
and reads pixel (0, 0) in its place, so an inf or NaN at pixel (0, 0) turns every out-of-bounds
sample into NaN where ``grid_sample`` gives 0; and it indexes with four ``[N, C, oH, oW]`` index
tensors (advanced indexing) where one ``[N, 1, P]`` gather index suffices. We keep its coordinate
helpers' structure (unnormalize, reflect, clip) but mask values, not weights.

Contract: exact (float64 relative error <= 1e-12, float32 absolute <= 1e-5 on unit-scale data)
for 4-D input, every mode (bilinear, nearest, bicubic), every padding mode and both
``align_corners``, for every *finite* grid and finite input. inf/NaN in the input propagate as
in PyTorch, except at a source coordinate within a rounding error of an integer: PyTorch's CPU
kernel rounds the coordinate arithmetic differently (it agrees bit for bit with ours on about
70% of bilinear samples), so the tap whose weight is exactly 0 (0 * inf = NaN) can differ.
A non-finite grid coordinate is outside the contract. 5-D input (``grid_sampler_3d``) is left
alone.
"""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import strategies as st
from torch import Tensor

from ..equivalence.strategies import dtypes, seeded_tensor
from .base import CallModule, Rewrite

aten = torch.ops.aten

MODES = {"bilinear": 0, "nearest": 1, "bicubic": 2}
PADDINGS = {"zeros": 0, "border": 1, "reflection": 2}

CONTRACT = (
    "exact for 4-D input, modes bilinear/nearest/bicubic, padding zeros/border/reflection, "
    "align_corners True/False, every finite grid and finite input (a non-finite grid coordinate "
    "is outside the contract); inf/NaN in the input propagate as in PyTorch except at source "
    "coordinates within a rounding error of an integer, where the tap weighted exactly 0 can differ"
)


def grid_sample(
    input: Tensor,
    grid: Tensor,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = False,
) -> Tensor:
    """``torch.nn.functional.grid_sample`` on 4-D input, built only from gather/where arithmetic."""
    if mode not in MODES:
        raise ValueError(f"grid_sample: mode must be one of {sorted(MODES)}, got {mode!r}")
    if padding_mode not in PADDINGS:
        raise ValueError(f"grid_sample: padding_mode must be one of {sorted(PADDINGS)}, got {padding_mode!r}")
    return grid_sampler_2d(input, grid, MODES[mode], PADDINGS[padding_mode], bool(align_corners))


def grid_sampler_2d(
    input: Tensor, grid: Tensor, interpolation_mode: int, padding_mode: int, align_corners: bool
) -> Tensor:
    torch._check(input.dim() == 4, lambda: f"grid_sample: expected 4-D input, got {input.dim()}-D")
    torch._check(
        grid.dim() == 4 and grid.shape[-1] == 2 and grid.shape[0] == input.shape[0],
        lambda: f"grid_sample: grid must be [N, H, W, 2] with N={input.shape[0]}, got {list(grid.shape)}",
    )
    torch._check(interpolation_mode in (0, 1, 2), lambda: f"bad interpolation mode {interpolation_mode}")
    torch._check(padding_mode in (0, 1, 2), lambda: f"bad padding mode {padding_mode}")
    N, C, H, W = input.shape
    _, oH, oW, _ = grid.shape
    sampler = _Sampler(input.reshape(N, C, H * W), H, W, padding_mode, align_corners)  # [N, C, H*W]
    x = grid[..., 0].reshape(N, oH * oW)  # [N, P]
    y = grid[..., 1].reshape(N, oH * oW)  # [N, P]

    if interpolation_mode == 0:  # bilinear
        x = sampler.source_index(x, W)  # [N, P]
        y = sampler.source_index(y, H)  # [N, P]
        x_w, y_n = x.floor(), y.floor()  # [N, P]
        w, n = x - x_w, y - y_n  # [N, P] distances to the west / north taps
        e, s = 1 - w, 1 - n  # [N, P]
        # PyTorch's CPU kernel: (nw_val * nw) + (ne_val * ne) + (sw_val * sw) + (se_val * se)
        out = (
            sampler.tap(x_w, y_n) * (s * e)[:, None]
            + sampler.tap(x_w + 1, y_n) * (s * w)[:, None]
            + sampler.tap(x_w, y_n + 1) * (n * e)[:, None]
            + sampler.tap(x_w + 1, y_n + 1) * (n * w)[:, None]
        )  # [N, C, P]
    elif interpolation_mode == 1:  # nearest; torch.round is round-half-to-even like nearbyint
        x = sampler.source_index(x, W).round()  # [N, P]
        y = sampler.source_index(y, H).round()  # [N, P]
        out = sampler.tap(x, y)  # [N, C, P]
    else:  # bicubic: padding applies to each of the 16 taps, not to the source coordinate
        x = sampler.unnormalize(x, W)  # [N, P]
        y = sampler.unnormalize(y, H)  # [N, P]
        x0, y0 = x.floor(), y.floor()  # [N, P]
        cx = _cubic_coefficients(x - x0)  # 4 x [N, P]
        cy = _cubic_coefficients(y - y0)  # 4 x [N, P]
        rows = []
        for j in range(4):
            # one row of four taps interpolated along x, as PyTorch's cubic_interp1d
            yj = sampler.compute_coordinates(y0 - 1 + j, H)  # [N, P]
            taps = [sampler.tap(sampler.compute_coordinates(x0 - 1 + i, W), yj) for i in range(4)]
            rows.append(_interp1d(taps, cx))  # [N, C, P]
        out = _interp1d(rows, cy)  # [N, C, P]
    return out.reshape(N, C, oH, oW)  # [N, C, oH, oW]


@dataclasses.dataclass
class _Sampler:
    flat: Tensor  # [N, C, H*W]
    H: int
    W: int
    padding_mode: int
    align_corners: bool

    def unnormalize(self, coord: Tensor, size: int) -> Tensor:
        # As PyTorch's vectorized CPU kernel: (coord + 1) * scale (- 0.5 when not align_corners).
        if self.align_corners:
            return (coord + 1) * ((size - 1) / 2)
        return (coord + 1) * (size / 2) - 0.5

    def compute_coordinates(self, coord: Tensor, size: int) -> Tensor:
        if self.padding_mode == 0:  # zeros: out-of-bounds taps are masked in tap()
            return coord
        if self.padding_mode == 2:  # reflection, then clip like border
            if self.align_corners:
                coord = _reflect(coord, 0, 2 * (size - 1))
            else:
                coord = _reflect(coord, -1, 2 * size - 1)
        return coord.clamp(0, size - 1)

    def source_index(self, coord: Tensor, size: int) -> Tensor:
        return self.compute_coordinates(self.unnormalize(coord, size), size)

    def tap(self, x: Tensor, y: Tensor) -> Tensor:
        """Pixel values at integer-valued coordinates x, y [N, P]; 0 outside the map."""
        N, C, _ = self.flat.shape
        inside = (x >= 0) & (x <= self.W - 1) & (y >= 0) & (y <= self.H - 1)  # [N, P]
        # Clamp before the integer cast so that far-away (masked) coordinates can't overflow.
        xi = x.clamp(0, self.W - 1).to(torch.int64)  # [N, P]
        yi = y.clamp(0, self.H - 1).to(torch.int64)  # [N, P]
        index = (yi * self.W + xi)[:, None, :].expand(N, C, x.shape[1])  # [N, C, P]
        values = self.flat.gather(2, index)  # [N, C, P]
        # Mask the value, not the weight: 0 * inf would be NaN where grid_sample gives 0.
        return torch.where(inside[:, None, :], values, 0)  # [N, C, P]


def _reflect(coord: Tensor, twice_low: int, twice_high: int) -> Tensor:
    """PyTorch's reflect_coordinates: bounds are given doubled so half-integers stay ints."""
    if twice_low == twice_high:
        return torch.zeros_like(coord)
    low = twice_low / 2
    span = (twice_high - twice_low) / 2
    coord = (coord - low).abs()
    extra = torch.fmod(coord, span)
    flips = (coord / span).floor()
    # Parity of the flip count in floating point: exact, and no int8 overflow for far coords.
    even = torch.remainder(flips, 2) == 0
    return torch.where(even, extra + low, span - extra + low)


_CUBIC_A = -0.75  # PyTorch's bicubic convolution constant


def _cubic_coefficients(t: Tensor) -> list[Tensor]:
    def conv1(x):  # |x| <= 1
        return ((_CUBIC_A + 2) * x - (_CUBIC_A + 3)) * x * x + 1

    def conv2(x):  # 1 < |x| < 2
        return ((_CUBIC_A * x - 5 * _CUBIC_A) * x + 8 * _CUBIC_A) * x - 4 * _CUBIC_A

    return [conv2(t + 1.0), conv1(t), conv1(1.0 - t), conv2(2.0 - t)]


def _interp1d(values: list[Tensor], coefficients: list[Tensor]) -> Tensor:
    out = values[0] * coefficients[0][:, None]
    for v, c in zip(values[1:], coefficients[1:]):
        out = out + v * c[:, None]
    return out  # [N, C, P]


def _grid_sampler(input, grid, interpolation_mode, padding_mode, align_corners):
    # aten.grid_sampler is what torch.export's training IR keeps for F.grid_sample; it
    # dispatches on the input's rank. 5-D input stays a grid_sampler_3d.
    if input.dim() == 5:
        return aten.grid_sampler_3d.default(input, grid, interpolation_mode, padding_mode, align_corners)
    return grid_sampler_2d(input, grid, interpolation_mode, padding_mode, align_corners)


class GridSampleToGather(Rewrite):
    name = "grid_sample"
    summary = "aten.grid_sampler_2d -> gather/where arithmetic (no grid sampler left)"
    contract = CONTRACT

    @staticmethod
    def cases(dtype=None):
        return grid_sample_cases(dtype)

    probe_note = "bilinear grid_sample of a 5x7 map on a 3x4 grid ([N, H, W, 2] layout)"

    def probe_case(self):
        input = torch.linspace(-1, 1, 2 * 5 * 7).reshape(1, 2, 5, 7).cos()
        grid = torch.linspace(-1.1, 1.1, 3 * 4 * 2).reshape(1, 3, 4, 2)
        return GridSampleCase(input, grid, "bilinear", "zeros", False)

    def decompositions(self):
        return {
            aten.grid_sampler_2d.default: grid_sampler_2d,
            aten.grid_sampler.default: _grid_sampler,
        }


# ----------------------------------------------------------------------------- strategy


def grid_sample_cases(dtype=None):
    """Hypothesis strategy of ``GridSampleCase``: maps of random sizes, grids inside and outside
    [-1, 1] (exact pixel centres, corners, half-pixels, far outside), all modes and paddings."""
    specials = [-1.0, 1.0, 0.0, -1.5, 1.5, 3.0, -3.0, 0.5, -0.5, 1e-7, -1 - 1e-7, 1 + 1e-7, 25.0, -40.0]

    @st.composite
    def cases(draw):
        dt = draw(dtypes) if dtype is None else dtype
        N = draw(st.integers(1, 3))
        C = draw(st.integers(1, 4))
        H, W = draw(st.integers(1, 9)), draw(st.integers(1, 9))
        oH, oW = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        seed = draw(st.integers(0, 2**31 - 1))
        input = seeded_tensor((N, C, H, W), dt, seed)
        spread = draw(st.sampled_from([1.0, 1.2, 2.0, 5.0]))
        grid = (seeded_tensor((N, oH, oW, 2), dt, seed + 1, uniform=True) * 2 - 1) * spread
        # Either exact coordinates or inf/NaN in the input, not both: a pinned or snapped
        # coordinate lands within a rounding error of an integer, where the tap that gets weight
        # 0 (and 0 * inf = NaN) depends on rounding (the contract's exception, see the module
        # docstring).
        if draw(st.booleans()):
            # Pin some coordinates to values where the rules change (edges, centres, far out).
            flat = grid.view(-1)
            for pos, value in draw(
                st.lists(st.tuples(st.integers(0, flat.numel() - 1), st.sampled_from(specials)), max_size=8)
            ):
                flat[pos] = value
            # Snap some coordinates exactly onto pixel centres / pixel edges of this map.
            if draw(st.booleans()):
                size = torch.tensor([W, H], dtype=dt)
                k = torch.round((grid + 1) * size)  # half-pixel units
                grid = k / size - 1
        else:
            for pos in draw(st.lists(st.integers(0, input.numel() - 1), max_size=2)):
                input.view(-1)[pos] = draw(st.sampled_from([float("inf"), float("-inf"), float("nan")]))
        return GridSampleCase(
            input,
            grid,
            draw(st.sampled_from(sorted(MODES))),
            draw(st.sampled_from(sorted(PADDINGS))),
            draw(st.booleans()),
        )

    return cases()


@dataclasses.dataclass
class GridSampleCase:
    input: Tensor
    grid: Tensor
    mode: str
    padding_mode: str
    align_corners: bool

    def kwargs(self):
        return dict(mode=self.mode, padding_mode=self.padding_mode, align_corners=self.align_corners)

    def reference(self) -> Tensor:
        return torch.nn.functional.grid_sample(self.input, self.grid, **self.kwargs())

    def rewritten(self) -> Tensor:
        return grid_sample(self.input, self.grid, **self.kwargs())

    def module(self) -> torch.nn.Module:
        """A module that calls the op, for the graph form (export, rewrite, run)."""
        return CallModule(torch.nn.functional.grid_sample, **self.kwargs())

    def args(self) -> tuple:
        return (self.input, self.grid)

    @property
    def scale(self) -> float:
        """Magnitude of the data the output interpolates, for relative errors."""
        finite = self.input[torch.isfinite(self.input)]
        return float(finite.abs().max()) if finite.numel() else 1.0
