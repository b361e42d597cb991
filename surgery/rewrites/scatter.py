"""``aten.scatter.src`` and ``aten.scatter.value`` -> index/where arithmetic, no scatter left.

For each output position ``p`` along ``dim`` we find the *last* index entry that writes to it:
compare every index entry with every output position along ``dim`` (``[..., I_d, S_d, ...]``
booleans), keep the entry's position where they match (``-1`` elsewhere) and take the maximum
over the index axis. Then one ``gather`` of ``src`` at that position and a ``where`` against the
input. Values are *selected*, never multiplied by a one-hot mask and summed, so inf and NaN in
``src`` or ``input`` come through bit-exact.

Duplicates: PyTorch leaves the result unspecified when several index entries along ``dim``
name the same position. Ours is deterministic: the entry with the largest position along ``dim``
wins (the last write of a serial loop, which is what PyTorch's CPU kernel does in practice).

Memory: the comparison is ``index.numel() * input.shape[dim]`` booleans plus as many int64
positions. Past ``max_intermediate_elements`` (default 2**26, about 0.6 GB) the rewrite refuses
with a clear error instead of building it; raise the limit explicitly if you have the memory.

Contract: exact (bit-identical) for every ``dim``, an index of any shape no larger than ``src``
(and than ``input`` off ``dim``) whose entries lie in ``[0, input.shape[dim])``, every dtype,
inf/NaN included; duplicate indices as stated above. An out-of-range index entry (an error in
PyTorch) is ignored in a rewritten graph; the eager function raises.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import Tensor

from ..equivalence.strategies import dtypes, seeded_tensor
from .base import Rewrite, is_tracing

aten = torch.ops.aten

DEFAULT_MAX_INTERMEDIATE_ELEMENTS = 2**26

CONTRACT = (
    "bit-exact for every dim, any index shape no larger than src (and than input off dim) with "
    "entries in [0, input.shape[dim]), every dtype, inf/NaN included; for duplicate indices the "
    "entry with the largest position along dim wins (PyTorch: unspecified); refuses when the "
    "index-by-positions comparison would exceed max_intermediate_elements"
)


class ScatterTooLarge(ValueError):
    pass


def scatter(
    input: Tensor,
    dim: int,
    index: Tensor,
    src: Tensor | float | int | bool,
    *,
    max_intermediate_elements: int = DEFAULT_MAX_INTERMEDIATE_ELEMENTS,
) -> Tensor:
    """``torch.scatter(input, dim, index, src)`` (``src`` a tensor or a number) without scatter."""
    if not is_tracing(input, index) and index.numel():
        size = input.shape[dim] if input.dim() else 1
        if bool(((index < 0) | (index >= size)).any()):
            raise IndexError(
                f"scatter: index out of range [0, {size}) along dim {dim}: "
                f"min {int(index.min())}, max {int(index.max())}"
            )
    return scatter_by_select(input, dim, index, src, max_intermediate_elements=max_intermediate_elements)


def scatter_by_select(
    input: Tensor, dim: int, index: Tensor, src, *, max_intermediate_elements: int = DEFAULT_MAX_INTERMEDIATE_ELEMENTS
) -> Tensor:
    torch._check(index.dim() == input.dim(), lambda: "scatter: index must have as many dims as input")
    if input.dim() == 0:  # a scalar is a 1-element vector along dim 0
        return scatter_by_select(
            input.reshape(1),
            0,
            index.reshape(1),
            src.reshape(1) if isinstance(src, Tensor) else src,
            max_intermediate_elements=max_intermediate_elements,
        ).reshape(())
    dim = dim % input.dim()
    if isinstance(src, Tensor):
        torch._check(src.dim() == input.dim(), lambda: "scatter: src must have as many dims as input")
        torch._check(src.dtype == input.dtype, lambda: f"scatter: src dtype {src.dtype} != input dtype {input.dtype}")
    for d in range(input.dim()):
        torch._check(
            index.shape[d] <= (src.shape[d] if isinstance(src, Tensor) else index.shape[d])
            and (d == dim or index.shape[d] <= input.shape[d]),
            lambda: f"scatter: index {list(index.shape)} larger than src or input off dim {dim}",
        )
    if index.numel() == 0:
        return input.clone()
    S = input.shape[dim]
    I = index.shape[dim]  # noqa: E741 - the I of the shape comments below
    comparisons = index.numel() * S
    if comparisons > max_intermediate_elements:
        raise ScatterTooLarge(
            f"scatter: rewriting needs an index x positions comparison of {comparisons:,} elements "
            f"(index {list(index.shape)} x {S} positions along dim {dim}), above the limit of "
            f"{max_intermediate_elements:,}; pass a larger max_intermediate_elements if you have "
            f"the memory (about 9 bytes per element)"
        )

    def along(n: int, at: int) -> list[int]:  # shape with n at `at`, 1 elsewhere, rank + 1
        shape = [1] * (input.dim() + 1)
        shape[at] = n
        return shape

    positions = torch.arange(S, device=input.device).reshape(along(S, dim + 1))  # [1.., 1, S, 1..]
    order = torch.arange(I, device=input.device).reshape(along(I, dim))  # [1.., I, 1, 1..]
    hits = index.unsqueeze(dim + 1) == positions  # [..., I, S, ...]
    # The last entry along dim that writes each position; -1 where none does. (max.dim rather
    # than amax: stock TVM 0.27 converts the one and not the other.)
    writer = torch.where(hits, order, -1).max(dim=dim).values  # [..., S, ...] = region
    written = writer >= 0  # [..., S, ...]
    if isinstance(src, Tensor):
        src = src[tuple(slice(0, n) if d != dim else slice(None) for d, n in enumerate(index.shape))]
        # Both bounds: TVM lowers a one-sided integer clamp with an infinite bound and fails.
        values = src.gather(dim, writer.clamp(0, I - 1))  # [..., S, ...]
    else:
        values = torch.full((), src, dtype=input.dtype, device=input.device)  # []
    # The region the index covers is a corner of input: pad the mask back to input's shape.
    padding = []
    for d in reversed(range(input.dim())):
        padding += [0, input.shape[d] - written.shape[d]]
    if any(padding):
        written = F.pad(written, padding, value=False)  # [*input.shape]
        if values.dim():
            values = F.pad(values, padding)  # [*input.shape]
    return torch.where(written, values, input)


class ScatterToSelect(Rewrite):
    name = "scatter"
    summary = "aten.scatter.src / aten.scatter.value -> compare/max/gather/where (no scatter left)"
    contract = CONTRACT

    @staticmethod
    def cases(dtype=None):
        return scatter_cases(dtype)

    def __init__(self, max_intermediate_elements: int = DEFAULT_MAX_INTERMEDIATE_ELEMENTS):
        self.max_intermediate_elements = max_intermediate_elements

    def settings(self):
        return {"max_intermediate_elements": self.max_intermediate_elements}

    probe_note = "scatter.src along dim 0 with an index smaller than the input (SAM3's padded concat)"

    def probe_case(self):
        input = torch.zeros(5, 2, 3)
        index = torch.tensor([[1, 2], [2, 3]])[:, :, None].expand(2, 2, 3).contiguous()
        src = torch.arange(12, dtype=torch.float32).reshape(2, 2, 3) + 1
        return ScatterCase(input, 0, index, src, "shifted_range")

    def decompositions(self):
        def scatter_decomposition(input, dim, index, src):
            return scatter_by_select(input, dim, index, src, max_intermediate_elements=self.max_intermediate_elements)

        return {aten.scatter.src: scatter_decomposition, aten.scatter.value: scatter_decomposition}

    def functionalized_variants(self):
        return (aten.scatter_.src, aten.scatter_.value)


# ----------------------------------------------------------------------------- strategy


@dataclasses.dataclass
class ScatterCase:
    input: Tensor
    dim: int
    index: Tensor
    src: Tensor | float
    index_kind: str

    def reference(self) -> Tensor:
        return torch.scatter(self.input, self.dim, self.index, self.src)

    def rewritten(self) -> Tensor:
        return scatter(self.input, self.dim, self.index, self.src)

    def module(self) -> torch.nn.Module:
        """A module that calls the op, for the graph form (export, rewrite, run)."""
        return _ScatterModule(self.dim, None if isinstance(self.src, Tensor) else self.src)

    def args(self) -> tuple:
        return (self.input, self.index) + ((self.src,) if isinstance(self.src, Tensor) else ())

    scale = None


class _ScatterModule(torch.nn.Module):
    def __init__(self, dim, value):
        super().__init__()
        self.dim, self.value = dim, value

    def forward(self, input, index, src=None):
        return torch.scatter(input, self.dim, index, self.value if src is None else src)


def scatter_cases(dtype=None):
    """Hypothesis strategy of ``ScatterCase``: ranks 1-4, any dim (negative too), indices as
    shifted ranges, permutations and random distinct picks, partial index shapes (smaller than
    src and input), src larger than index, inf/NaN/-0.0 in src and input, scalar src, float and
    integer dtypes. Indices are duplicate-free along dim, where PyTorch's result is specified."""
    specials = [float("inf"), float("-inf"), float("nan"), -0.0, 0.0]

    @st.composite
    def cases(draw):
        dt = draw(st.one_of(dtypes, st.just(torch.int64))) if dtype is None else dtype
        rank = draw(st.integers(1, 4))
        shape = [draw(st.integers(1, 5)) for _ in range(rank)]
        dim = draw(st.integers(-rank, rank - 1))
        d = dim % rank
        S = shape[d]
        index_shape = [draw(st.integers(1, n)) if j != d else draw(st.integers(0, S)) for j, n in enumerate(shape)]
        if draw(st.booleans()) and rank > 1:  # an empty index somewhere off dim, now and then
            index_shape[draw(st.sampled_from([j for j in range(rank) if j != d]))] = draw(st.integers(0, 1))
        I = index_shape[d]  # noqa: E741 - as in scatter()
        kind = draw(st.sampled_from(["shifted_range", "permutation", "random_distinct"]))
        lines = 1
        for j, n in enumerate(index_shape):
            lines *= n if j != d else 1
        rows = []
        for _ in range(lines):  # one duplicate-free line of I positions out of S per index line
            if kind == "shifted_range":
                shift = draw(st.integers(0, S - 1)) if S else 0
                rows.append([(shift + i) % S for i in range(I)])
            elif kind == "permutation":
                rows.append(list(draw(st.permutations(range(S))))[:I])
            else:
                rows.append(draw(st.lists(st.integers(0, S - 1), min_size=I, max_size=I, unique=True)) if I else [])
        moved = [n for j, n in enumerate(index_shape) if j != d] + [I]
        index = torch.tensor(rows, dtype=torch.int64).reshape(moved).movedim(-1, d).contiguous()
        seed = draw(st.integers(0, 2**31 - 1))

        def data(shape_, s):
            t = seeded_tensor(shape_, torch.float64, s) * 10
            return t.round().to(dt) if not dt.is_floating_point else t.to(dt)

        input = data(shape, seed)
        if draw(st.booleans()):
            src_shape = [n + draw(st.integers(0, 2)) for n in index_shape]
            src = data(src_shape, seed + 1)
            if dt.is_floating_point and src.numel():
                for pos in draw(st.lists(st.integers(0, src.numel() - 1), max_size=3)):
                    src.view(-1)[pos] = draw(st.sampled_from(specials))
        else:
            src = (
                draw(st.sampled_from([2.5, -1.0, float("nan"), float("inf")]))
                if dt.is_floating_point
                else draw(st.integers(-3, 3))
            )
        if dt.is_floating_point and input.numel():
            for pos in draw(st.lists(st.integers(0, input.numel() - 1), max_size=2)):
                input.view(-1)[pos] = draw(st.sampled_from(specials))
        return ScatterCase(input, dim, index, src, kind)

    return cases()
