"""``winograd_convolutions``: a 3x3 channels-last convolution of stride 1 computed as Winograd's
F(2x2, 3x3) (Lavin and Gray, 2015), and ``WinogradInput``, the schedule of its input transform.

Each 2x2 block of output pixels is ``A^T [(G g G^T) * (B^T d B)] A`` of the 4x4 block ``d`` of
input around it: the sum over input channels of the 16 positions is one batched product
``[16, N, 1, blocks, C] @ [16, 1, K / nr, C, nr]`` (the weight in panels of ``nr`` output channels,
one register tile wide), 16 * C * K multiply-adds per 4 output pixels where the convolution
does 4 * 9 * C * K (2.25x fewer), run by the Matmul rule. Three kernels replace the
convolution:

- the input transform ``V[e, b, t, c]``: per block ``t`` of image ``b`` and position
  ``e = 4 * xi + nu``, a signed sum of four input pixels (``B^T`` holds only 0 and +-1), zero
  outside the image (the convolution's padding, read in place); ``WinogradInput`` unrolls the 16
  positions inside the loop over channel vectors, so each block's 16 pixels are read once and
  its 16 sums written. Each image's blocks are padded by a few rows to a count the product's
  register tile divides (``product_rows``: 1600 -> 1602 for AVX2's 6 x 16);
- the product ``M = V @ U``, ``U = G g G^T`` computed from the constant weight at build time in
  float64 and rounded once to float32;
- the output transform ``Y[b, y, x, k] = sum_{xi, nu} A^T[y % 2, xi] A^T[x % 2, nu] M[...]``,
  ``A^T``'s entries written as arithmetic in ``y % 2`` rather than branches, so that FuseOps
  fuses the convolution's elementwise consumers into it (batch norm's scale and shift,
  activation, a residual sum), as the Conv rule fuses them into its write-back.

Contract: its rounding differs from the convolution's (other terms are summed). Measured against
float64 on 40 random cases (1-2 images, 8-128 channels, 1-14 pixels a side, padding 0 or 1,
inputs of scale 1e-3 to 1e3), each output was within 2.8 units of float32 rounding of its sum of
|terms| (|x| * |w| over the window, plus |bias|), PyTorch's own float32 convolution within 23.7;
at 128 channels on 80x80 its largest error was 2.2e-6 where ours direct and PyTorch's were 4.8e-6
and 5.2e-6. The output transform multiplies by 0 where ``A^T`` is 0, so an infinite or NaN
input spreads to whole 2x2 blocks; finite inputs are its domain.

Taken for 3x3 convolutions of stride 1 with at least ``min_channels`` input and output channels
(multiples of 8), a constant weight and constant image sizes; the batch may be known only at
run time (Mask R-CNN's boxes). ``min_channels`` is ``CHANNELS_PER_LANE`` times the CPU's float
lanes (``min_channels_for``): 64 on AVX2, 128 on AVX-512. The product reads V and writes M
through memory and does C * K multiply-adds per row of C floats read and K written, 8 per byte
at C = K = 64: enough for AVX2's FMAs, not for AVX-512's, twice as wide (on the Zen 5 EPYC
below, the products of 64 channels ran at 77-90 G multiply-adds a second, those of 256 at
172-177, in RT-DETR's and Mask R-CNN's kernel tables).

Convolution + batch norm + ReLU against the Conv rule, interleaved, medians of 6 rounds of 3-10
calls (ms). On the 2-core AVX2 EPYC (Zen 3): 64 channels at 160x160 16.7 -> 12.4 (another run
12.9 -> 12.0), 128 at 80x80 12.0 -> 8.0, 256 at 40x40 10.7 -> 6.9, 512 at 20x20 11.0 -> 7.9,
128 at 100x136 26.2 -> 19.2, 256 at 50x68 22.7 -> 14.3, 512 at 25x34 23.1 -> 15.4, 256 at
200x272 377 -> 231, 64 at 200x272 30.4 -> 27.0, 100 boxes of 256 at 14x14 141.9 -> 95.8; at 32
channels (320x320: 15.2 -> 15.0) the product's reduction is too short to gain. On the 2-core
AVX-512 EPYC (Zen 5, full-width FMA units): 64 channels at 160x160 5.48 -> 7.76 (a loss), 128
at 80x80 4.95 -> 4.71, 256 at 40x40 4.18 -> 2.61, 512 at 20x20 4.25 -> 2.30, 256 at 200x272
147.0 -> 114.7, 256 at 100x136 36.4 -> 27.8, 100 boxes of 256 at 14x14 53.8 -> 34.1, 128 at
100x136 9.94 -> 10.17 and at 64x64 2.81 -> 2.26, 64 at 200x272 13.12 -> 17.82 (a loss). Not
measured on an AVX-512 CPU with half-width FMA units (Zen 4), which the threshold treats as
AVX-512.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.s_tir import dlight

from ..matmul_tiling import VECTOR_LANES, plan_matmul, tile_rating
from .analysis import inline_elementwise, root_blocks, schedule_for, static_extent
from .compat import RelaxConstant, constant_array, relax_type
from .matmul import vector_registers

B_T = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64)
A_T = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)

CHANNELS_PER_LANE = 8  # taken from 8 channels a float lane: 64 on AVX2, 128 on AVX-512
INPUT_BLOCK = "winograd_input"  # the input transform's block, which ``WinogradInput`` schedules
# relax's op patterns: FuseOps fuses nothing into an opaque kernel, and into an out-elementwise-
# fusable one only elementwise and broadcast consumers
OPAQUE, OUT_ELEMENTWISE_FUSABLE = 8, 4


def _image_shape(expr) -> list | None:
    """``[N, H, W, C]`` of a channels-last tensor whose H, W and C are constants (N may be
    known only at run time: Mask R-CNN's boxes), else None."""
    dims = getattr(getattr(relax_type(expr), "shape", None), "values", None)
    if dims is None or len(dims) != 4 or not all(isinstance(v, tirx.IntImm) for v in dims[1:]):
        return None
    return [dims[0], *(int(v) for v in dims[1:])]


def input_transform(x: te.Tensor, pads: tuple[int, int], tiles: tuple[int, int], rows: int) -> te.Tensor:
    """``V[e, b, t, c] = (B^T d B)[e // 4, e % 4]`` for channel ``c`` of block ``t`` of image
    ``b`` (rows past the blocks, padding for the product's tiles, are 0): x ``[N, H, W, C]`` ->
    ``[16, N, 1, rows, C]`` (the 1: the product's axis of weight panels)."""
    n, h, w, _ = x.shape
    top, left = pads
    ty, tx = tiles
    zero = tirx.const(0.0, "float32")

    def value(e, b, _, t, c):
        row, col = t // tx, t % tx

        def pixel(a, bb):  # d_t[a, bb]: zero in the padding
            y, z = row * 2 + a - top, col * 2 + bb - left
            inside = tirx.all(t < ty * tx, y >= 0, y < h, z >= 0, z < w)
            return tirx.if_then_else(inside, x[b, y, z, c], zero)

        def position(xi, nu):  # (B^T d B)[xi, nu]: four pixels, added or subtracted
            total = None
            for a in np.flatnonzero(B_T[xi]):
                for bb in np.flatnonzero(B_T[nu]):
                    term = pixel(int(a), int(bb))
                    term = term if B_T[xi, a] * B_T[nu, bb] > 0 else -term
                    total = term if total is None else total + term
            return total

        # a branch per position, each resolved where WinogradInput unrolls e
        out = position(3, 3)
        for e_ in reversed(range(15)):
            out = tirx.Select(e == e_, position(e_ // 4, e_ % 4), out)
        return out

    return te.compute((16, n, 1, rows, x.shape[3]), value, name=INPUT_BLOCK)


def output_transform(m: te.Tensor, shape: list[int], tiles: tuple[int, int]) -> te.Tensor:
    """``Y[b, y, x, k] = (A^T M A)[y % 2, x % 2]`` of the block of image ``b`` holding pixel
    (y, x): M ``[16, N, K / nr, rows, nr]`` (output channels in panels of ``nr``) ->
    ``[N, H, W, K]``."""
    _, tx = tiles
    nr = m.shape[-1]

    def a_t(xi, i):  # A^T[i, xi] for i in {0, 1}, as a line through its two values (no branch)
        value, slope = tirx.const(A_T[0, xi], "float32"), A_T[1, xi] - A_T[0, xi]
        return value + tirx.const(slope, "float32") * tirx.Cast("float32", i) if slope else value

    def value(b, y, x, k):
        t = y // 2 * tx + x // 2
        total = None
        for xi in range(4):
            for nu in range(4):
                term = a_t(xi, y % 2) * a_t(nu, x % 2) * m[xi * 4 + nu, b, k // nr, t, k % nr]
                total = term if total is None else total + term
        return total

    return te.compute(shape, value, name="winograd_output")


def product_rows(blocks: int, channels: int, outputs: int, registers: tuple[int, int]) -> int:
    """The product's rows: the blocks, padded by a few (fewer than 16, at most ~3%) to the
    count whose rows cost least, rows over their register tile's rating
    (``surgery.matmul_tiling.tile_rating``; among costs within 1% of the least, the tile with
    more accumulators, then fewer rows): a prime count of blocks would get 1-row tiles, and
    AVX2's 6 x 16 tile divides none of the detectors' block counts. Mask R-CNN's mask head has
    49 blocks a box: 50 rows of 5 x 16 tiles (rated as 6 x 16: both keep the FMAs busy) rather
    than 54 of 6 x 16 (Zen 1 EPYC, ``[16, 100, rows, 256] @ [16, 1, 256, 256]``: 204 -> 189
    ms); a map's 1600 blocks keep 1602 rows of 6 x 16 (5 x 16 tiles, measured no slower a row
    there, 13600 rows 412 ms against 13602 430, are not measured on other CPUs)."""
    rated = []
    for rows in range(blocks, blocks + min(16, blocks // 32 + 7)):
        plan = plan_matmul(16, rows, outputs, channels, 1, *registers)
        if plan is not None:  # B's registers: the plan's tile width in the CPU's vectors
            rating, accumulators = tile_rating(plan.mr, plan.nr // math.gcd(plan.nr, registers[1]))
            rated.append((rows / rating, -accumulators, rows))
    if not rated:
        return blocks
    least = min(cost for cost, _, _ in rated)
    return min((a, rows) for cost, a, rows in rated if cost <= 1.01 * least)[1]


def _constant_weight(expr, lookup) -> np.ndarray | None:
    """The value of a constant weight, through variables and ``permute_dims`` (ConvertLayout
    leaves the OIHW constant transposed to HWIO)."""
    if isinstance(expr, relax.Var):
        bound = lookup(expr)
        expr = bound if bound is not None else expr
    if isinstance(expr, RelaxConstant):
        return constant_array(expr)
    if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.permute_dims":
        inner = _constant_weight(expr.args[0], lookup)
        axes = expr.attrs.axes
        return None if inner is None else np.transpose(inner, None if axes is None else [int(a) for a in axes])
    return None


def _winograd_shape(call) -> bool:
    """A channels-last 3x3 convolution of stride 1, dilation 1 and one group."""
    attrs = call.attrs
    return (
        attrs.data_layout == "NHWC"
        and attrs.kernel_layout == "HWIO"
        and attrs.out_layout in ("NHWC", "")
        and [int(s) for s in attrs.strides] == [1, 1]
        and [int(d) for d in attrs.dilation] == [1, 1]
        and int(attrs.groups) == 1
        and relax_type(call).dtype == "float32"
    )


@relax.expr_functor.mutator
class _Winograd(relax.PyExprMutator):
    def __init__(self, mod, min_channels: int, registers: tuple[int, int]):
        super().__init__(mod)
        self.min_channels, self.registers = min_channels, registers

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if getattr(call.op, "name", "") != "relax.nn.conv2d" or not _winograd_shape(call):
            return call
        weight = _constant_weight(call.args[1], self.lookup_binding)
        shape = _image_shape(call)
        if weight is None or shape is None or _image_shape(call.args[0]) is None or weight.shape[:2] != (3, 3):
            return call
        channels, outputs = weight.shape[2:]
        if min(channels, outputs) < self.min_channels or channels % 8 or outputs % 8 or weight.dtype != np.float32:
            return call
        _, height, width, _ = shape
        tiles = ((height + 1) // 2, (width + 1) // 2)
        rows = product_rows(tiles[0] * tiles[1], channels, outputs, self.registers)
        nr = plan_matmul(16, rows, outputs, channels, 1, *self.registers).nr
        u = np.einsum("ar,rsck,bs->abck", G, weight.astype(np.float64), G)  # [4, 4, C, K], float64
        u = u.reshape(16, 1, channels, outputs // nr, nr).transpose(0, 1, 3, 2, 4)  # [16, 1, K / nr, C, nr]
        u = relax.const(np.ascontiguousarray(u).astype(np.float32))
        pads = (int(call.attrs.padding[0]), int(call.attrs.padding[1]))
        # the input transform computes no producer (the previous convolution's output transform
        # would be computed 16 times over); the output transform takes the convolution's
        # elementwise consumers, not a transpose (read across its blocks, 16 gathers a vector:
        # Mask R-CNN's mask head back to channels-first, 11.6 -> 99.3 ms)
        v = self._emit(input_transform, OPAQUE, call.args[0], pads, tiles, rows)  # [16, N, 1, rows, C]
        m = self.builder_.emit(relax.op.matmul(v, u))  # [16, N, K / nr, rows, nr]
        return self._emit(output_transform, OUT_ELEMENTWISE_FUSABLE, m, shape, tiles)  # [N, H, W, K]

    def _emit(self, te_func, pattern: int, *args):
        """``emit_te``, its kernel marked with the op pattern FuseOps should see."""
        var = self.builder_.emit_te(te_func, *args)
        gv = self.builder_.lookup_binding(var).args[0]
        self.builder_.update_func(gv, self.builder_.get()[gv].with_attr("op_pattern", pattern))
        return var


def min_channels_for(registers: tuple[int, int]) -> int:
    """The fewest input and output channels a convolution takes F(2x2, 3x3) from, on a CPU of
    ``(registers, float lanes)``: ``CHANNELS_PER_LANE`` a lane (the module's docstring)."""
    return CHANNELS_PER_LANE * registers[1]


def winograd_convolutions(min_channels: int | None = None):
    """The pass: every static, constant-weight, channels-last 3x3 convolution of stride 1 with
    at least ``min_channels`` input and output channels (by default ``min_channels_for`` the
    current target) as F(2x2, 3x3), for the target's registers (run after
    ``channels_last_convolutions``)."""

    @tvm.transform.module_pass(opt_level=0, name="WinogradConvolutions")
    def transform(mod, _ctx):
        registers = vector_registers(tvm.target.Target.current())
        least = min_channels_for(registers) if min_channels is None else min_channels
        mutator = _Winograd(mod, least, registers)
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mutator.builder_.update_func(gv, mutator.visit_expr(func))
        return mutator.builder_.get()

    return transform


class WinogradInput(dlight.ScheduleRule):
    """The input transform: parallel over blocks; per block and vector of channels its 16
    positions unrolled, each copy's branch resolved to its sum of four pixels, so the block's
    16 pixels are read once."""

    def apply(self, func, target, _tunable):
        sch = schedule_for(func, target)
        if sch is None:
            return None
        blocks = [b for b in root_blocks(sch) if sch.get(b).name_hint == INPUT_BLOCK]
        if len(blocks) != 1:
            return None
        block = blocks[0]
        inline_elementwise(sch, block)
        if len(root_blocks(sch)) != 1:
            return None
        e, b, one, t, c = sch.get_loops(block)
        lanes = VECTOR_LANES if static_extent(sch, c) % VECTOR_LANES == 0 else 8
        c_outer, c_inner = sch.split(c, [None, lanes])
        sch.reorder(b, one, t, c_outer, e, c_inner)
        sch.parallel(sch.fuse(b, one, t))
        sch.unroll(e)
        sch.vectorize(c_inner)
        return sch
