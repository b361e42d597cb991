"""``Conv``: a channels-last 2-d convolution computed where it is, ``out[n, y, x, f] +=
in[n, y * s + ry * d, x * s + rx * d, c] * w[ry, rx, c, f]`` (``relax.nn.conv2d`` in NHWC/HWIO,
which ``pipeline`` converts every convolution to).

Where ``conv_im2col`` gathers the input's patches into a matrix ``KH * KW`` times the input's
size and multiplies that, this kernel reads the (padded) input in place: a register tile of
``mr`` consecutive output pixels by ``nr`` output channels accumulates over the taps and input
channels, each tap's ``mr`` input pixels broadcast against ``nr`` channels of the weight
(read from a copy packed in panels of ``nr`` channels, made once at build time). Tiles are
planned by ``surgery.conv_tiling.plan_conv``; one may span the end of an output row (the block
iterates over an image's pixels as one axis), and where the tile does not divide the pixels the
image's last tile is cut short by a predicate (AVX2's 6-pixel tiles on the detectors' maps,
none of which 6 divides). The padding block
stays a separate copy (inlined, every tap would test the border; without padding the input is
read directly); elementwise consumers (bias, batch norm's scale and shift, activation, a
residual sum) are fused into the tile's write-back. Where the weight outgrows an image, the
channel panels run outside the pixel tiles.
"""

from __future__ import annotations

import math

from tvm.s_tir import dlight

from ..conv_tiling import conv_directly, plan_conv
from ..matmul_tiling import VECTOR_LANES
from .analysis import (
    LAYOUT_REWRITE,
    convolution_block,
    convolution_operands,
    inline_consumers,
    inline_padding_producers,
    is_var,
    schedule_for,
    simplified,
    static_extent,
)
from .compat import param_buffers, region_buffer
from .fma import contraction_safe
from .matmul import PARALLEL_MIN_MACS, finish_register_tile, schedule_remaining_spatial, vector_registers


def _operands(stmt):
    """(input buffer, weight buffer) of a channels-last convolution block reading input channel
    ``rc`` (``analysis.convolution_operands``), else None."""
    return convolution_operands(stmt, lambda channel, _f, rc: is_var(channel, rc))


def _pack_weight(sch, block, weight_name: str, nr: int) -> None:
    """The weight (the buffer of that name the block reads) read from a copy laid out in panels
    of ``nr`` output channels, ``[F / nr, KH, KW, C, nr]``: a register tile then reads its ``KH * KW * C * nr`` weights as
    one contiguous run, where in HWIO they lie ``F`` floats apart (a strided walk across pages
    and a few of L1's sets). The copy is marked as a layout rewrite: ``pipeline`` moves it
    into a function of its own (``split_weight_packing``), which ``FoldConstant`` evaluates
    once, at build time, for a constant weight (a weight computed at run time is packed on
    every call). A weight the kernel computes itself, which TVM's split can't move out, is
    read as it is. Measured on a 2-core Zen 3 (AVX2), best of 30 calls: 512 channels at
    20x20, 3x3, 28.6 -> 14.5 ms; 256 at 40x40 27.8 -> 17.8; 128 at 80x80 16.6 -> 14.3; Mask
    R-CNN's mask head (100 boxes, 256 channels at 14x14) 380 -> 205; 1x1, 1024 channels at
    50x68, 119 -> 61."""
    index, weight = next(
        (i, region_buffer(r)) for i, r in enumerate(sch.get(block).reads) if region_buffer(r).name == weight_name
    )
    if not any(given.same_as(weight) for given in param_buffers(sch.mod["main"])):
        return
    packed = sch.cache_read(block, index, "global")
    sch.transform_layout(block, ("read", index), lambda ry, rx, c, f: (f // nr, ry, rx, c, f % nr))
    sch.annotate(packed, LAYOUT_REWRITE, True)


class Conv(dlight.ScheduleRule):
    """A channels-last convolution: register tiles of output pixels x channels, vectorised over
    channels, parallel over tiles, accumulated over taps and input channels in registers."""

    def apply(self, func, target, _tunable):
        sch = schedule_for(func, target)
        found = None if sch is None else convolution_block(sch, _operands)
        if found is None:
            return None
        block, operands = found
        stmt = sch.get(block)
        name, padded = stmt.name_hint, operands[0]
        contractible = contraction_safe(func)
        inline_padding_producers(sch, block, padded)
        loops = sch.get_loops(block)
        if len(loops) != 7:
            return None
        # all extents static but the batch's (Mask R-CNN's heads run on as many boxes as it keeps)
        batch, *extents = (static_extent(sch, loop) for loop in loops)
        if None in extents:
            return None
        height, width, channels, kh, kw, depth = extents
        if not conv_directly(channels, groups=1, transposed=False):
            # what ``conv_im2col`` makes a product in the shipped build (RegNet's squeeze-excitation,
            # 144 -> 36 channels: no whole vectors); compiled without it, the generic rules'
            return None
        registers, _ = vector_registers(target)
        pixels = height * width
        mr, nr = plan_conv(pixels, channels, depth, registers, taps=kh * kw)
        # The block iterates over the image's pixels as one axis, and its accumulator too: a
        # tile may span a row's end and its write-back covers its own pixels exactly (over rows
        # and columns, TVM would write back the rectangle they span). Where mr does not divide
        # the pixels, the image's last tile is cut short by a predicate on its pixels.
        sch.transform_block_layout(block, lambda n, y, x, f, ry, rx, rc: (n, y * width + x, f, ry, rx, rc))
        sch = simplified(sch)
        block = sch.get_sblock(name)
        _pack_weight(sch, block, operands[1].name, nr)  # buffers of the schedule before simplified
        n, p, f, ry, rx, rc = sch.get_loops(block)
        po, pi = sch.split(p, [None, mr])
        fo, fv = sch.split(f, [None, nr])
        fvo, fvi = sch.split(fv, [None, math.gcd(nr, VECTOR_LANES)])
        # the larger operand is read once: where the weight outgrows an image (deep layers),
        # each panel of output channels stays in cache while every pixel tile passes it
        # (512 channels at 20x20, 5 x 64: 23.6 -> 21.1 ms on a 2-core EPYC, AVX-512)
        weight_major = kh * kw * depth * channels >= pixels * depth
        tile_order = [n, fo, po] if weight_major else [n, po, fo]
        sch.reorder(*tile_order, ry, rx, rc, pi, fvo, fvi)
        accumulator = sch.cache_write(block, 0, "local")
        sch.transform_layout(block, ("write", 0), lambda n, y, x, f: (n, y * width + x, f))
        sch.transform_block_layout(accumulator, lambda n, y, x, f: (n, y * width + x, f))
        sch.reverse_compute_at(accumulator, tile_order[-1], preserve_unit_loops=True)
        inline_consumers(sch, accumulator)
        tiles = sch.fuse(*tile_order)
        if (batch or 2) * height * width * channels * kh * kw * depth >= PARALLEL_MIN_MACS:
            sch.parallel(tiles)
        finish_register_tile(sch, block, ry, accumulator, (pi, fvo, fvi), contractible)
        schedule_remaining_spatial(sch)
        return sch
