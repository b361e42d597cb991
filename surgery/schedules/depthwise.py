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
    convolution_block,
    convolution_operands,
    inline_consumers,
    inline_padding_producers,
    is_var,
    schedule_for,
    simplified,
    static_extent,
)
from .fma import contraction_safe
from .matmul import PARALLEL_MIN_MACS, finish_register_tile, schedule_remaining_spatial, vector_registers

# Output pixels of a tile, the most that divide the row's width: each is an accumulator of one
# channel vector, the tap's weight vector shared by all of them.
PIXEL_TILES = (8, 7, 6, 5, 4, 3, 2, 1)


def _own_channel(index, c, rc) -> bool:
    """``index`` is input channel ``c`` of a group of one: ``c`` or ``c + rc`` (``rc`` only 0)."""
    if isinstance(index, tirx.Add):
        return (is_var(index.a, c) and is_var(index.b, rc)) or (is_var(index.a, rc) and is_var(index.b, c))
    return is_var(index, c)


def _operands(stmt):
    """(input buffer, weight buffer) of a channels-last convolution block of one input channel
    per group and one output channel per input channel (TVM's ``group_conv2d_nhwc`` with as many
    groups as channels: ``rc`` over one channel, the input read at channel ``c + rc``), else
    None."""
    extent = stmt.iter_vars[6].dom.extent
    if not isinstance(extent, tirx.IntImm) or int(extent) != 1:
        return None
    return convolution_operands(stmt, _own_channel)


class DepthwiseConv(dlight.ScheduleRule):
    """A channels-last depthwise convolution: tiles of output pixels of one row x one vector of
    channels, accumulated over the taps in registers, parallel over rows."""

    def apply(self, func, target, _tunable):
        sch = schedule_for(func, target)
        found = None if sch is None else convolution_block(sch, _operands)
        if found is None:
            return None
        block, operands = found
        stmt = sch.get(block)
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
