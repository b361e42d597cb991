"""``DepthwiseConv``: a channels-last depthwise convolution (one group per channel, as
MobileNet's, EfficientNet's and ConvNeXt's; TVM's ``group_conv2d_nhwc`` with as many groups as
channels), ``out[n, y, x, c] += in[n, y * s + ry * d, x * s + rx * d, c] * w[ry, rx, 0, c]``.

Each output channel reads only its own input channel, so there is no product to block: per
image row, a tile of up to 8 consecutive output pixels by one vector of channels (of the CPU's
width: 16 floats on AVX-512, 8 on AVX2) accumulates over the taps in registers, each tap a
vector load of the input and a fused multiply-add, the weight's vector loaded once per tap for
the whole tile. Parallel over the output rows of every image; the padding stays a copy of its
own (as in the Conv rule: inlined, every tap would test the border); elementwise consumers
(bias, batch norm, activation, a residual sum) run in the tile's write-back. Left to the
generic fallback, such a convolution was one scalar task per output element, each padding its
own window (EfficientNet-B0 on a 2-core Zen 5 EPYC: 19.96 ms a call, ONNX Runtime 3.69; with
this rule 5.16 against 4.15 in another run).
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir import dlight

from ..matmul_tiling import MIN_LANES, VECTOR_LANES
from .analysis import (
    inline_consumers,
    inline_padding_producers,
    is_spatial,
    iter_kinds,
    reduction_blocks,
    root_blocks,
    schedule_for,
    simplified,
    static_extent,
)
from .compat import accessed_buffer, region_buffer
from .fma import contraction_safe
from .matmul import PARALLEL_MIN_MACS, _is_mul_add, finish_register_tile, schedule_remaining_spatial, vector_registers

# Output pixels of a tile, the most that divide the row's width: each is an accumulator of one
# channel vector, the tap's weight vector shared by all of them.
PIXEL_TILES = (8, 7, 6, 5, 4, 3, 2, 1)


def _same(index, var) -> bool:
    return isinstance(index, tirx.Var) and index.same_as(var)


def _channel(index, c, rc) -> bool:
    """``index`` is input channel ``c`` of a group of one: ``c`` or ``c + rc`` (``rc`` only 0)."""
    if isinstance(index, tirx.Add):
        return (_same(index.a, c) and _same(index.b, rc)) or (_same(index.a, rc) and _same(index.b, c))
    return _same(index, c)


def _operands(stmt):
    """(input buffer, weight buffer) of a channels-last convolution block of one input channel
    per group and one output channel per input channel (TVM's ``group_conv2d_nhwc`` with as many
    groups as channels), else None: the output written at ``[n, y, x, c]``, the weight read at
    ``[ry, rx, rc, c]`` and the input at ``[n, ..., ..., c + rc]``, ``rc`` over one channel."""
    n, y, x, c, ry, rx, rc = (iv.var for iv in stmt.iter_vars)
    if not isinstance(stmt.iter_vars[6].dom.extent, tirx.IntImm) or int(stmt.iter_vars[6].dom.extent) != 1:
        return None
    store = stmt.body
    if len(store.indices) != 4 or not all(_same(i, v) for i, v in zip(store.indices, (n, y, x, c))):
        return None
    weight = image = None
    for read in stmt.reads:
        mins = [r.min for r in read.region]
        if region_buffer(read).same_as(accessed_buffer(store)) or len(mins) != 4:
            continue
        if all(_same(i, v) for i, v in zip(mins, (ry, rx, rc, c))):
            weight = region_buffer(read)
        elif _same(mins[0], n) and _channel(mins[3], c, rc):
            image = region_buffer(read)
    return (image, weight) if image is not None and weight is not None else None


class DepthwiseConv(dlight.ScheduleRule):
    """A channels-last depthwise convolution: tiles of output pixels of one row x one vector of
    channels, accumulated over the taps in registers, parallel over rows."""

    def apply(self, func, target, _tunable):
        sch = schedule_for(func, target)
        if sch is None:
            return None
        reductions = reduction_blocks(sch)
        if len(reductions) != 1 or iter_kinds(sch, reductions[0]) != "SSSSRRR":
            return None
        block = reductions[0]
        stmt = sch.get(block)
        if not isinstance(stmt.body, tirx.BufferStore) or not _is_mul_add(stmt.body):
            return None
        if any(not is_spatial(sch, b) for b in root_blocks(sch) if not sch.get(b).same_as(stmt)):
            return None
        operands = _operands(stmt)
        if operands is None:
            return None
        name = stmt.name_hint
        contractible = contraction_safe(func)
        inline_padding_producers(sch, block, operands[0])
        loops = sch.get_loops(block)
        if len(loops) != 7:
            return None
        batch, *extents = (static_extent(sch, loop) for loop in loops)
        if None in extents:
            return None
        height, width, channels, kh, kw, _ = extents
        _, register_lanes = vector_registers(target)  # 8 on AVX2: a 16-float vector would take two registers
        lanes = next((v for v in (VECTOR_LANES, 8, MIN_LANES) if v <= register_lanes and channels % v == 0), None)
        if lanes is None:
            return None
        xr = next(t for t in PIXEL_TILES if width % t == 0)
        sch = simplified(sch)
        block = sch.get_sblock(name)
        n, y, x, c, ry, rx, rc = sch.get_loops(block)
        xo, xi = sch.split(x, [None, xr])
        co, cg, cv = sch.split(c, [None, 1, lanes])  # cg: the tile's one vector group
        sch.reorder(n, y, xo, co, ry, rx, rc, xi, cg, cv)
        accumulator = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(accumulator, co, preserve_unit_loops=True)
        inline_consumers(sch, accumulator)
        rows = sch.fuse(n, y)
        if (batch or 2) * height * width * channels * kh * kw >= PARALLEL_MIN_MACS:
            sch.parallel(rows)
        finish_register_tile(sch, block, ry, accumulator, (xi, cg, cv), contractible)
        schedule_remaining_spatial(sch)
        return sch
