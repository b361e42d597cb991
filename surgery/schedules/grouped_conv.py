"""``GroupedConv``: a channels-last grouped convolution, TVM's ``group_conv2d_nhwc``,
``out[n, y, x, c] += in[n, y * s + ry * d, x * s + rx * d, c // g_out * g_in + rc] * w[ry, rx, rc, c]``
with ``g_in`` input and ``g_out`` output channels a group: depthwise (one channel a group, as
MobileNet's, EfficientNet's and ConvNeXt's) or several (ResNeXt's 32 groups, RegNet's groups of
16 channels).

A group's output channels read only its own input channels, so there is no product across all
channels to block as the Conv rule does: per image row, a tile of up to 8 consecutive output
pixels by one vector of output channels accumulates over the taps and the group's input
channels in registers, the weight's vector loaded once per step for the whole tile. The vector
is of the CPU's width (16 floats on AVX-512, 8 on AVX2) or narrower: with one channel a group
its lanes read consecutive input channels (a vector load), and where the vectors do not divide
the channels (ShuffleNetV2's 58) the last one is cut short: its loops are marked for TVM's
LoopPartition, which lowers them as a narrower vector (10 floats of 58) with no test per lane
(a kernel with 32-bit indices only, ``analysis.PARTITION_HINT``; else the widest vector that
divides the channels). With several channels a group, the vector holds output channels of one
group (16, 8 or 4 of them, dividing the group's), so its lanes all read the same input channel
(a broadcast). A group of output channels no vector of 4 fits (3 a group, or a depthwise
convolution with two outputs an input) is left to the generic schedule.
Parallel over the output rows of every image; the padding stays a copy of its own (as in the
Conv rule: inlined, every tap would test the border); elementwise consumers (bias, batch norm,
activation, a residual sum) run in the tile's write-back.

Left to the generic fallback, such a convolution was one scalar task per output element, each
padding its own window. On a 2-core Zen 5 EPYC, whole models: ResNeXt-50 32x4d 133.7 -> 21.2 ms
a call and RegNetY-800MF 33.3 -> 5.1 (the two builds interleaved in one process, medians of 60
calls); EfficientNet-B0 19.96 -> 5.16 when this rule took depthwise convolutions only (one
``surgery bench`` run each). ShuffleNetV2's 58 channels, generic before the last vector was cut
short: 3x3 at 28x28 0.112 -> 0.010 ms, the model 1.71 -> 1.34 ms (interleaved, medians).
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir import dlight

from ..matmul_tiling import MIN_LANES, VECTOR_LANES
from .analysis import (
    PARTITION_HINT,
    convolution_block,
    convolution_operands,
    inline_consumers,
    inline_padding_producers,
    is_var,
    narrowed,
    schedule_for,
    simplified,
    static_extent,
)
from .compat import region_buffer
from .fma import contraction_safe
from .matmul import PARALLEL_MIN_MACS, finish_register_tile, schedule_remaining_spatial, vector_registers

# Output pixels of a tile, the most that divide the row's width: each is an accumulator of one
# channel vector, the tap's weight vector shared by all of them.
PIXEL_TILES = (8, 7, 6, 5, 4, 3, 2, 1)


def _group_widths(index, c, rc) -> tuple[int, int] | None:
    """(input channels, output channels) of a group when ``index`` reads output channel ``c``'s
    input channel ``rc`` of its group: ``c`` or ``c + rc`` for one channel a group (a depthwise
    convolution), ``c // out * in + rc`` for several (TVM's ``group_conv2d_nhwc``); else None."""
    if isinstance(index, tirx.Add):
        first, second = (index.a, index.b) if is_var(index.b, rc) else (index.b, index.a)
        if not is_var(second, rc):
            return None
        if is_var(first, c):
            return (1, 1)
        if (
            isinstance(first, tirx.Mul)
            and isinstance(first.a, tirx.FloorDiv)
            and is_var(first.a.a, c)
            and isinstance(first.a.b, tirx.IntImm)
            and isinstance(first.b, tirx.IntImm)
        ):
            return (int(first.b.value), int(first.a.b.value))
        return None
    return (1, 1) if is_var(index, c) else None


def _channel_vector(channels: int, group: tuple[int, int], register_lanes: int, cut_allowed: bool = True):
    """(lanes, whether the last vector is cut short) of the tile's vector of output channels,
    at most ``register_lanes``: with one channel a group, the lanes read consecutive input
    channels, so a vector of the register's width, its last one cut short where it does not
    divide the channels (``cut_allowed``), else the widest that divides them; with several
    channels a group, all lanes read the same input channel, so the vector lies inside one
    group: 16, 8 or 4 dividing the group's output channels. (None, False) where none fits."""
    if group == (1, 1) and cut_allowed:
        lanes = min(VECTOR_LANES, register_lanes)
        return lanes, channels % lanes != 0
    width = channels if group == (1, 1) else group[1]
    lanes = next((v for v in (VECTOR_LANES, 8, MIN_LANES) if v <= register_lanes and width % v == 0), None)
    return lanes, False


def _operands(stmt):
    """(input buffer, weight buffer, (input, output) channels of a group) of a channels-last
    grouped convolution block (TVM's ``group_conv2d_nhwc``: ``rc`` over a group's input
    channels), else None."""
    operands = convolution_operands(stmt, lambda index, f, rc: _group_widths(index, f, rc) is not None)
    if operands is None:
        return None
    image = operands[0]
    [index] = [r.region[3].min for r in stmt.reads if region_buffer(r).same_as(image)]
    widths = _group_widths(index, stmt.iter_vars[3].var, stmt.iter_vars[6].var)
    extent = stmt.iter_vars[6].dom.extent
    if not isinstance(extent, tirx.IntImm) or int(extent) != widths[0]:
        return None
    return (*operands, widths)


class GroupedConv(dlight.ScheduleRule):
    """A channels-last grouped (or depthwise) convolution: tiles of output pixels of one row x
    one vector of a group's output channels, accumulated over the taps and the group's input
    channels in registers, parallel over rows."""

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
        height, width, channels, kh, kw, group_depth = extents
        _, register_lanes = vector_registers(target)  # 8 on AVX2: a 16-float vector would take two registers
        lanes, cut = _channel_vector(channels, operands[2], register_lanes)
        if cut and narrowed(sch) is sch:
            lanes, cut = _channel_vector(channels, operands[2], register_lanes, cut_allowed=False)
        if lanes is None:
            return None
        xr = next(t for t in PIXEL_TILES if width % t == 0)
        sch = simplified(sch)
        block = sch.get_sblock(name)
        n, y, x, c, ry, rx, rc = sch.get_loops(block)
        xo, xi = sch.split(x, [None, xr])
        co, cg, cv = sch.split(c, [None, 1, lanes])  # cg: the tile's one vector group
        sch.reorder(n, y, xo, co, ry, rx, rc, xi, cg, cv)
        if cut:
            sch.annotate(co, PARTITION_HINT, 1)
        accumulator = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(accumulator, co, preserve_unit_loops=True)
        inline_consumers(sch, accumulator)
        rows = sch.fuse(n, y)
        if (batch or 2) * height * width * channels * kh * kw * group_depth >= PARALLEL_MIN_MACS:
            sch.parallel(rows)
        finish_register_tile(sch, block, ry, accumulator, (xi, cg, cv), contractible)
        schedule_remaining_spatial(sch)
        if not cut:
            return sch
        # the last vector's loops (the tile's, its initialisation's, its write-back's) cut where
        # the channels end: a narrower vector, no per-lane test
        for step in (block, sch.get_sblock(f"{name}_init"), accumulator):
            sch.annotate(sch.get_loops(step)[-1], PARTITION_HINT, 1)
        return narrowed(sch)
