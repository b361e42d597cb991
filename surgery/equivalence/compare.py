"""Comparison metrics: max absolute error, max relative error, ULP distance.

Non-finite values must agree exactly (NaN where NaN, +inf where +inf); the metrics are taken
over the positions where the reference is finite.

Relative error is *normwise*: max |actual - expected| / scale, where scale is the larger of the
reference's largest magnitude and the magnitude of the data the output was computed from (a
caller may pass it). Elementwise relative error is meaningless for sums that cancel to ~0, which
interpolation and pooling produce all the time.
"""

from __future__ import annotations

import dataclasses
import math

import torch

# The bounds the project holds every rewrite to (README, "Equivalence").
FLOAT64_MAX_REL = 1e-12
FLOAT32_MAX_ABS = 1e-5


@dataclasses.dataclass
class ErrorStats:
    dtype: str
    elements: int
    max_abs: float
    max_rel: float
    max_ulp: int
    nonfinite_mismatches: int
    shape_mismatch: str | None = None

    def within_bounds(self) -> bool:
        if self.shape_mismatch or self.nonfinite_mismatches:
            return False
        if self.dtype == "torch.float64":
            return self.max_rel <= FLOAT64_MAX_REL
        if self.dtype in ("torch.float32", "torch.float16", "torch.bfloat16"):
            return self.max_abs <= FLOAT32_MAX_ABS
        return self.max_abs == 0  # integer and bool outputs must be identical

    def bound(self) -> str:
        if self.dtype == "torch.float64":
            return f"max_rel <= {FLOAT64_MAX_REL:g}"
        if self.dtype in ("torch.float32", "torch.float16", "torch.bfloat16"):
            return f"max_abs <= {FLOAT32_MAX_ABS:g}"
        return "identical"

    def merge(self, other: ErrorStats) -> ErrorStats:
        return ErrorStats(
            self.dtype if self.dtype == other.dtype else f"{self.dtype},{other.dtype}",
            self.elements + other.elements,
            max(self.max_abs, other.max_abs),
            max(self.max_rel, other.max_rel),
            max(self.max_ulp, other.max_ulp),
            self.nonfinite_mismatches + other.nonfinite_mismatches,
            self.shape_mismatch or other.shape_mismatch,
        )

    def __str__(self) -> str:
        if self.shape_mismatch:
            return f"shape mismatch: {self.shape_mismatch}"
        return (
            f"max_abs={self.max_abs:.3g} max_rel={self.max_rel:.3g} max_ulp={self.max_ulp} "
            f"nonfinite_mismatches={self.nonfinite_mismatches} ({self.bound()})"
        )


def accumulate(total: dict[str, ErrorStats], new: dict[str, ErrorStats]) -> None:
    """Merge per-key statistics of one example into running totals, in place."""
    for key, stats in new.items():
        total[key] = total[key].merge(stats) if key in total else stats


def ulp_distance(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Number of representable floats between the two, elementwise (same dtype, finite)."""
    int_type = {torch.float64: torch.int64, torch.float32: torch.int32}[expected.dtype]
    a = actual.contiguous().view(int_type).to(torch.int64)
    b = expected.contiguous().view(int_type).to(torch.int64)
    # Map the sign-magnitude bit patterns onto a monotone integer line.
    bits = 64 if int_type is torch.int64 else 32
    low = -(2 ** (bits - 1))
    a = torch.where(a < 0, low - a, a)
    b = torch.where(b < 0, low - b, b)
    # int64 differences of float64 patterns can overflow only for opposite-sign huge values.
    return (a - b).abs()


def compare(actual: torch.Tensor, expected: torch.Tensor, *, scale: float | None = None) -> ErrorStats:
    """Error statistics of ``actual`` against the reference ``expected``."""
    dtype = str(expected.dtype)
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return ErrorStats(
            dtype,
            expected.numel(),
            math.inf,
            math.inf,
            0,
            0,
            f"{tuple(actual.shape)}/{actual.dtype} vs {tuple(expected.shape)}/{expected.dtype}",
        )
    if not expected.is_floating_point():
        diff = (actual != expected).sum().item()
        return ErrorStats(dtype, expected.numel(), float(diff), float(diff), 0, 0)
    a, e = actual.detach(), expected.detach()
    finite = torch.isfinite(e)
    nonfinite_mismatches = int((~finite & ~((a == e) | (torch.isnan(a) & torch.isnan(e)))).sum())
    nonfinite_mismatches += int((finite & ~torch.isfinite(a)).sum())
    both = finite & torch.isfinite(a)
    if not both.any():
        return ErrorStats(dtype, e.numel(), 0.0, 0.0, 0, nonfinite_mismatches)
    a64, e64 = a[both].double(), e[both].double()
    max_abs = float((a64 - e64).abs().max())
    denominator = max(float(e64.abs().max()), scale or 0.0)
    max_rel = max_abs / denominator if denominator > 0 else (0.0 if max_abs == 0 else math.inf)
    max_ulp = int(ulp_distance(a[both], e[both]).max()) if e.dtype in (torch.float32, torch.float64) else 0
    return ErrorStats(dtype, e.numel(), max_abs, max_rel, max_ulp, nonfinite_mismatches)


def assert_equivalent(actual, expected, *, scale: float | None = None, context: str = "") -> ErrorStats:
    """Raise AssertionError (with the statistics) unless ``actual`` is within the project bounds."""
    stats = compare(actual, expected, scale=scale)
    if not stats.within_bounds():
        raise AssertionError(f"not equivalent{': ' + context if context else ''}: {stats}")
    return stats
