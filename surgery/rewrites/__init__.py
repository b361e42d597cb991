"""The rewrites, one per file, and their registry (by name, in the order they must run)."""

from __future__ import annotations

from .base import Rewrite, RewriteError, RewriteResult, op_census
from .floor_divide import FloorDivideToFmod
from .full_like import FullLikeToFull
from .grid_sample import GridSampleToGather
from .roi_align import RoiAlignToGridSample
from .scatter import ScatterToSelect
from .where_scalar import WhereScalarToFull

# name -> class; instantiated with default settings when named by a string.
REGISTRY: dict[str, type[Rewrite]] = {
    cls.name: cls for cls in sorted([RoiAlignToGridSample, GridSampleToGather, ScatterToSelect, FloorDivideToFmod, FullLikeToFull, WhereScalarToFull], key=lambda c: c.order)
}


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
        else:
            raise RewriteError(f"unknown rewrite {item!r}; known rewrites: {', '.join(REGISTRY)}")
    return sorted(resolved.values(), key=lambda r: r.order)


__all__ = ["REGISTRY", "Rewrite", "RewriteError", "RewriteResult", "op_census", "resolve",
           "FloorDivideToFmod", "FullLikeToFull", "GridSampleToGather", "RoiAlignToGridSample", "ScatterToSelect", "WhereScalarToFull"]
