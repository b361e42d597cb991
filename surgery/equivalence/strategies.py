"""Shared pieces of the hypothesis strategies. Each rewrite's own strategy lives in its file
(next to its replacement and contract); this module re-exports them by rewrite name.

Large tensors (feature maps) come from a seeded ``torch.Generator`` whose seed hypothesis draws:
drawing every float through hypothesis would be slow and shrink poorly. The values where the
rules change (box edges, grid coordinates, indices) are drawn by hypothesis itself.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

dtypes = st.sampled_from([torch.float32, torch.float64])


def seeded_tensor(shape, dtype, seed: int, *, uniform: bool = False) -> torch.Tensor:
    """Unit-scale data: standard normal, or uniform in [0, 1)."""
    generator = torch.Generator().manual_seed(seed % 2**63)
    sample = torch.rand if uniform else torch.randn
    return sample(tuple(shape), generator=generator, dtype=torch.float64).to(dtype)


def strategy_for(rewrite_name: str, dtype=None):
    """The input strategy of a rewrite, by its registered name."""
    from ..rewrites import (attention_reassociation, conv_as_matmul, floor_divide, full_like, gather_through_permute,
                            grid_sample, layout_round_trips, matmul_packing, roi_align, roi_align_separable, scatter,
                            where_scalar)

    table = {
        "floor_divide": floor_divide.floor_divide_cases,
        "full_like": full_like.full_like_cases,
        "roi_align": roi_align.roi_align_cases,
        "grid_sample": grid_sample.grid_sample_cases,
        "scatter": scatter.scatter_cases,
        "conv_as_matmul": conv_as_matmul.conv_cases,
        "attention_reassociation": attention_reassociation.attention_cases,
        "roi_align_separable": roi_align_separable.separable_cases,
        "where_scalar": where_scalar.where_scalar_cases,
        "matmul_packing": matmul_packing.packing_cases,
        "layout_round_trips": layout_round_trips.layout_cases,
        "gather_through_permute": gather_through_permute.gather_cases,
    }
    if rewrite_name not in table:
        raise KeyError(f"no strategy for rewrite {rewrite_name!r}; known: {sorted(table)}")
    return table[rewrite_name](dtype)
