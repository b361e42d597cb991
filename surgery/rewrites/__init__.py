"""The rewrites, one per file, and their registry (by name, in the order they must run)."""

from __future__ import annotations

from .base import Rewrite, RewriteError, RewriteResult, op_census
from .attention_reassociation import AttentionReassociation
from .conv_as_matmul import ConvAsMatmul
from .floor_divide import FloorDivideToFmod
from .full_like import FullLikeToFull
from .grid_sample import GridSampleToGather
from .gather_through_permute import GatherThroughPermute
from .layout_round_trips import LayoutRoundTrips
from .matmul_packing import MatmulPacking
from .roi_align import RoiAlignToGridSample
from .roi_align_separable import RoiAlignSeparable
from .scatter import ScatterToSelect
from .where_scalar import WhereScalarToFull

# name -> class; instantiated with default settings when named by a string.
REGISTRY: dict[str, type[Rewrite]] = {
    cls.name: cls for cls in sorted([RoiAlignToGridSample, GridSampleToGather, ScatterToSelect, FloorDivideToFmod, FullLikeToFull, WhereScalarToFull], key=lambda c: c.order)
}

# Speed rewrites: TVM converts their operators correctly, so the probe never asks for them; they
# make the compiled program faster (``surgery.tvm_backend`` applies them for the shipped build).
SPEED_REWRITES: dict[str, type[Rewrite]] = {cls.name: cls for cls in sorted([RoiAlignSeparable, ConvAsMatmul, AttentionReassociation, LayoutRoundTrips, GatherThroughPermute, MatmulPacking], key=lambda c: c.order)}


def resolve(rewrites=None) -> list[Rewrite]:
    """Names and/or Rewrite instances -> instances in canonical order (default: all)."""
    if rewrites is None:
        rewrites = list(REGISTRY)
    if isinstance(rewrites, (str, Rewrite)):
        rewrites = [rewrites]
    resolved: dict[str, Rewrite] = {}
    for item in rewrites:
        if isinstance(item, Rewrite):
            resolved[item.name] = item
        elif isinstance(item, str) and item in REGISTRY:
            resolved.setdefault(item, REGISTRY[item]())
        elif isinstance(item, str) and item in SPEED_REWRITES:
            resolved.setdefault(item, SPEED_REWRITES[item]())
        else:
            raise RewriteError(f"unknown rewrite {item!r}; known rewrites: {', '.join(REGISTRY)}")
    return sorted(resolved.values(), key=lambda r: r.order)


__all__ = ["REGISTRY", "SPEED_REWRITES", "Rewrite", "RewriteError", "RewriteResult", "op_census", "resolve",
           "AttentionReassociation", "ConvAsMatmul", "FloorDivideToFmod", "FullLikeToFull", "GatherThroughPermute", "GridSampleToGather", "LayoutRoundTrips",
           "MatmulPacking", "RoiAlignSeparable", "RoiAlignToGridSample", "ScatterToSelect", "WhereScalarToFull"]
