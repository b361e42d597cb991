"""Shared pieces of the hypothesis strategies. Each rewrite's own strategy lives in its file
(next to its replacement and contract) and is named by its class (``Rewrite.cases``); this
module imports no rewrite.

Large tensors (feature maps) come from a seeded ``torch.Generator`` whose seed hypothesis draws:
drawing every float through hypothesis would be slow and shrink poorly. The values where the
rules change (box edges, grid coordinates, indices) are drawn by hypothesis itself.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

dtypes = st.sampled_from([torch.float32, torch.float64])
# Boolean, integer and floating: for the operators that take a tensor of any dtype (full_like, where).
ALL_DTYPES = [torch.bool, torch.int32, torch.int64, torch.float32, torch.float64]


def seeded_tensor(shape, dtype, seed: int, *, uniform: bool = False) -> torch.Tensor:
    """Unit-scale data: standard normal, or uniform in [0, 1)."""
    generator = torch.Generator().manual_seed(seed % 2**63)
    sample = torch.rand if uniform else torch.randn
    return sample(tuple(shape), generator=generator, dtype=torch.float64).to(dtype)
