"""The rewrites, one per file, and their registry (by name, in the order they must run)."""

from __future__ import annotations

from .attention_reassociation import AttentionReassociation
from .base import Rewrite, RewriteError, RewriteResult, op_census
from .bool_arithmetic import BoolArithmeticToLogical
from .channels_last_gathers import ChannelsLastGathers
from .conv_as_matmul import ConvAsMatmul
from .conv_im2col import ConvIm2col
from .div_rounding import DivRoundingToArithmetic
from .floor_divide import FloorDivideToFmod
from .full_like import FullLikeToFull
from .gather_as_index import GatherAsIndex
from .gather_through_permute import GatherThroughPermute
from .gathered_rows_only import GatheredRowsOnly
from .grid_sample import GridSampleToGather
from .layout_round_trips import LayoutRoundTrips
from .masked_gather_padding import MaskedGatherPadding
from .matmul_packing import MatmulPacking
from .negative_index import NegativeIndex
from .roi_align import RoiAlignToGridSample
from .roi_align_separable import RoiAlignSeparable
from .roi_align_taps import RoiAlignTaps
from .row_dispatch import RowDispatch
from .scatter import ScatterToSelect
from .sum_over_concat import SumOverConcat
from .where_scalar import WhereScalarToFull

# The order the rewrites run in. row_dispatch runs first: it recognises the row-wise computation
# between a nonzero selection and its index_put by its operators, torchvision's roi_align among
# them, which roi_align would replace by a grid sampler (and cannot trace on an unbacked number
# of boxes). A replacement may call another rewrite's operator, which that rewrite must then
# still find: roi_align emits grid_sampler_2d, so it runs before grid_sample; scatter emits
# where(match, position, -1), so it runs before where_scalar; and replacements call
# zeros_like/full_like and where with numbers, so full_like and where_scalar run late.
# div_rounding and bool_arithmetic emit no other rewrite's operator, and no replacement emits
# theirs (a division with a rounding mode, arithmetic of two booleans). negative_index runs
# last: it emits only lt/add/where.self on index tensors, which no rewrite replaces, and it
# normalises any negative select or index tensor another replacement emits.
ORDER: list[type[Rewrite]] = [
    RowDispatch,
    RoiAlignToGridSample,
    GridSampleToGather,
    ScatterToSelect,
    FloorDivideToFmod,
    DivRoundingToArithmetic,
    BoolArithmeticToLogical,
    FullLikeToFull,
    WhereScalarToFull,
    NegativeIndex,
]

# Speed rewrites: TVM converts their operators correctly, so the probe never asks for them; they
# make the compiled program faster (``surgery.tvm_backend`` applies them for the shipped build,
# after the rewrites above). gathered_rows_only runs first: it removes work (rows no one reads)
# before the others reshape what is left. roi_align_taps takes the roi_align calls it pools
# cheaper (large maps, small bins) and roi_align_separable the rest; both take the feature map back
# channels-last, a round trip layout_round_trips then removes. gather_through_permute moves
# gathers before the permutes left after that; masked_gather_padding moves the masks of the
# gathers left (per-head indices) onto their indices, and gather_as_index reads those indices
# broadcast. sum_over_concat splits a weighted sum over stacked parts (Deformable DETR's levels)
# into one per part; channels_last_gathers then reads the per-part gathers as channels-last rows
# and carries that layout through the weighted sums. matmul_packing runs last, as the others emit products it packs.
# conv_as_matmul takes the convolutions whose kernel covers the input (one addmm) before
# conv_im2col takes the rest.
SPEED_ORDER: list[type[Rewrite]] = [
    GatheredRowsOnly,
    RoiAlignTaps,
    RoiAlignSeparable,
    ConvAsMatmul,
    ConvIm2col,
    AttentionReassociation,
    LayoutRoundTrips,
    GatherThroughPermute,
    MaskedGatherPadding,
    GatherAsIndex,
    SumOverConcat,
    ChannelsLastGathers,
    MatmulPacking,
]

# name -> class, in ORDER; instantiated with default settings when named by a string.
REGISTRY: dict[str, type[Rewrite]] = {cls.name: cls for cls in ORDER}
SPEED_REWRITES: dict[str, type[Rewrite]] = {cls.name: cls for cls in SPEED_ORDER}
# Where each rewrite runs when several are applied together: ORDER, then SPEED_ORDER (roi_align
# before roi_align_separable: where the probe chose roi_align, nothing is left for the other).
_POSITION = {cls.name: i for i, cls in enumerate([*ORDER, *SPEED_ORDER])}


def _registered(name: str) -> type[Rewrite] | None:
    return REGISTRY.get(name) or SPEED_REWRITES.get(name)


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
        elif isinstance(item, str) and _registered(item):
            resolved.setdefault(item, _registered(item)())
        else:
            raise RewriteError(f"unknown rewrite {item!r}; known rewrites: {', '.join(REGISTRY)}")
    return sorted(resolved.values(), key=lambda r: _POSITION[r.name])


def strategy_for(rewrite_name: str, dtype=None):
    """The hypothesis strategy of a rewrite's cases (``Rewrite.cases``), by its registered name."""
    cls = _registered(rewrite_name)
    if cls is None:
        raise KeyError(f"no strategy for rewrite {rewrite_name!r}; known: {sorted([*REGISTRY, *SPEED_REWRITES])}")
    return cls.cases(dtype)


__all__ = [
    "ORDER",
    "REGISTRY",
    "SPEED_ORDER",
    "SPEED_REWRITES",
    "Rewrite",
    "RewriteError",
    "RewriteResult",
    "op_census",
    "resolve",
    "strategy_for",
    "AttentionReassociation",
    "BoolArithmeticToLogical",
    "ChannelsLastGathers",
    "ConvAsMatmul",
    "ConvIm2col",
    "DivRoundingToArithmetic",
    "FloorDivideToFmod",
    "FullLikeToFull",
    "GatherAsIndex",
    "GatheredRowsOnly",
    "GatherThroughPermute",
    "GridSampleToGather",
    "LayoutRoundTrips",
    "MaskedGatherPadding",
    "MatmulPacking",
    "NegativeIndex",
    "RoiAlignSeparable",
    "RoiAlignTaps",
    "RoiAlignToGridSample",
    "RowDispatch",
    "ScatterToSelect",
    "SumOverConcat",
    "WhereScalarToFull",
]
