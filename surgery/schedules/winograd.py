"""``winograd_convolutions``: a 3x3 channels-last convolution of stride 1 computed as Winograd's
F(2x2, 3x3) (Lavin and Gray, 2015), the shipped tile, or F(4x4, 3x3) on request (not shipped:
its float32 error exceeds PyTorch's own, below), and ``WinogradInput``, ``WinogradOutput`` and
``WinogradOutputByPanel``, the schedules of its transforms.

Each m x m block of output pixels is ``A^T [(G g G^T) * (B^T d B)] A`` of the (m + 2) x (m + 2)
block ``d`` of input around it (``WinogradTile``): the sum over input channels of the
``(m + 2)^2`` positions is one batched product ``[positions, N, 1, blocks, C] @ [positions, 1,
K / nr, C, nr]`` (the weight in panels of ``nr`` output channels, one register tile wide),
``positions * C * K`` multiply-adds per ``m^2`` output pixels where the convolution does
``9 * m^2 * C * K``: 2.25x fewer for F(2x2, 3x3) (16 positions), 4x for F(4x4, 3x3) (36), run by
the Matmul rule. Three kernels replace the convolution:

- the input transform ``V[e, b, t, c]``: per block ``t`` of image ``b`` and position
  ``e = size * xi + nu``, a weighted sum of input pixels (F(2x2, 3x3)'s ``B^T`` holds only 0
  and +-1: four pixels added or subtracted; F(4x4, 3x3)'s sums of column sums), zero outside
  the image (the convolution's padding, read in place); ``WinogradInput`` unrolls the
  positions inside the loop over channel vectors, so each block's pixels are read once and its
  sums written. Each image's blocks are padded by a few rows to a count the product's register
  tile divides (``product_rows``: 1600 -> 1602 for AVX2's 6 x 16);
- the product ``M = V @ U``, ``U = G g G^T`` computed from the constant weight at build time in
  float64 and rounded once to float32;
- the output transform ``Y[b, y, x, k] = (A^T M A)[y % m, x % m]``, into which FuseOps fuses
  the convolution's elementwise consumers (batch norm's scale and shift, activation, a residual
  sum), as the Conv rule fuses them into its write-back. F(2x2, 3x3)'s writes ``A^T``'s entries
  as arithmetic in ``y % 2``, constants where ``WinogradOutputByPanel`` unrolls a block's 2 x 2
  places, a panel of M's output channels at a time (16 streams through memory, not 16 per
  panel); F(4x4, 3x3)'s looks
  each entry of ``A^T`` up by the pixel's place in its block, which ``WinogradOutput`` makes
  constants by unrolling the block's 16 places inside its loop over channel vectors, so the
  block's 36 values of M are read once and the zero terms drop out (computed per pixel, 36
  loads each, it took 10.8 ms of 100 boxes of 256 channels at 14x14; blocked, 3.6 ms).

F(4x4, 3x3) is Toom-Cook's construction (``toom_cook``) on the points 0, -1, 1, 1/2 and -2:
with Lavin and Gray's 0, +-1, +-2 its worst float32 error was twice as large (numpy model of
the kernels, 64 and 256 channels on 20x20: 18.8 and 18.2 units against 10.0 and 8.2; +-1/2:
21.6 and 29.8).

Contract: its rounding differs from the convolution's (other terms are summed). Measured against
float64 on 40 random cases (1-2 images, 8-128 channels, 1-14 pixels a side, padding 0 or 1,
inputs of scale 1e-3 to 1e3), each output was within 2.8 units of float32 rounding of its sum of
|terms| (|x| * |w| over the window, plus |bias|) for F(2x2, 3x3), and PyTorch's own float32
convolution within 23.7 (what the property test bounds F(2x2, 3x3) by). On 19 such cases drawn
later on the Zen 5 EPYC: F(4x4, 3x3) within 15.7 units (8 of them above 9), F(2x2, 3x3) within
1.9, PyTorch there within 3.2. Randomised tests then found F(4x4, 3x3) at 25.9 units, above
PyTorch's 23.7 (8 input and 16 output channels on 5x8; 176 and 168 channels on 8x13, two
images): narrow and wide convolutions alike, so no channel count bounds it below PyTorch's
worst. That is why the shipped build keeps F(2x2, 3x3) on every CPU, although F(4x4, 3x3) was
faster on AVX-512 (below) and the detectors' whole-model checks held with it (errors 1-2x eager
PyTorch's, within their bounds of 16x). The transforms add and subtract a block's
values, so an infinite or NaN input spreads to whole blocks; finite inputs are its domain.

Taken for 3x3 convolutions of stride 1 with at least ``min_channels`` input and output channels
(multiples of 8), a constant weight and constant image sizes; the batch may be known only at
run time (Mask R-CNN's boxes). ``min_channels`` is ``CHANNELS_PER_LANE`` times the CPU's float
lanes (``min_channels_for``): 64 on AVX2, 128 on AVX-512. The
product reads V and writes M through memory and does C * K multiply-adds per row of C floats
read and K written, 8 per byte at C = K = 64: enough for AVX2's FMAs, not for AVX-512's, twice
as wide (on the Zen 5 EPYC below, F(2x2, 3x3)'s products of 64 channels ran at 77-90 G
multiply-adds a second, those of 256 at 172-177, in RT-DETR's and Mask R-CNN's kernel tables).
F(4x4, 3x3) moves 2.25 values a pixel through V and M where F(2x2, 3x3) moves 4, and does 1.78x
fewer multiply-adds: on AVX-512 it was faster at every shape measured from 128 channels, and at
64 still slower than the direct convolution (not measured on AVX2).

Convolution + batch norm + ReLU against the Conv rule, interleaved, medians of 6 rounds of 3-10
calls (ms). On the 2-core AVX2 EPYC (Zen 3), F(2x2, 3x3): 64 channels at 160x160 16.7 -> 12.4
(another run 12.9 -> 12.0), 128 at 80x80 12.0 -> 8.0, 256 at 40x40 10.7 -> 6.9, 512 at 20x20
11.0 -> 7.9, 128 at 100x136 26.2 -> 19.2, 256 at 50x68 22.7 -> 14.3, 512 at 25x34 23.1 -> 15.4,
256 at 200x272 377 -> 231, 64 at 200x272 30.4 -> 27.0, 100 boxes of 256 at 14x14 141.9 -> 95.8;
at 32 channels (320x320: 15.2 -> 15.0) the product's reduction is too short to gain. On the
2-core AVX-512 EPYC (Zen 5, full-width FMA units), F(2x2, 3x3): 64 channels at 160x160 5.48 ->
7.76 (a loss), 128 at 80x80 4.95 -> 4.71, 256 at 40x40 4.18 -> 2.61, 512 at 20x20 4.25 -> 2.30,
256 at 200x272 147.0 -> 114.7, 256 at 100x136 36.4 -> 27.8, 100 boxes of 256 at 14x14 53.8 ->
34.1, 128 at 100x136 9.94 -> 10.17 and at 64x64 2.81 -> 2.26, 64 at 200x272 13.12 -> 17.82 (a
loss). On the same CPU another day, F(2x2, 3x3) against F(4x4, 3x3): 128 at 80x80 3.69 -> 2.19,
256 at 40x40 2.47 -> 1.44, 512 at 20x20 2.48 -> 1.81, 256 at 200x272 123.6 -> 84.5, 256 at
100x136 26.9 -> 19.6, 100 boxes of 256 at 14x14 36.1 -> 30.2, 128 at 100x136 10.5 -> 7.5; at 64
channels, F(2x2, 3x3) / F(4x4, 3x3) / direct: 160x160 7.53 / 5.66 / 5.36, 200x272 17.57 /
13.98 / 13.07, 320x320 32.88 / 27.37 / 22.57. Not measured on an AVX-512 CPU with half-width
FMA units (Zen 4), which the threshold treats as AVX-512.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.s_tir import dlight

from ..matmul_tiling import VECTOR_LANES, padding_candidates, plan_matmul, tile_rating
from .analysis import inline_elementwise, root_blocks, schedule_for, static_extent
from .compat import RelaxConstant, constant_array, region_buffer, relax_type
from .matmul import vector_registers


@dataclass(frozen=True)
class WinogradTile:
    """F(m x m, 3x3): ``Y = A^T [(G g G^T) * (B^T d B)] A`` for an m x m block of output pixels
    from the (m + 2) x (m + 2) block ``d`` of input around it; ``b_t`` ``[m + 2, m + 2]``, ``g``
    ``[m + 2, 3]``, ``a_t`` ``[m, m + 2]``, float64."""

    m: int
    b_t: np.ndarray
    g: np.ndarray
    a_t: np.ndarray

    @property
    def size(self) -> int:
        """Pixels a side of the input block."""
        return self.m + 2

    @property
    def positions(self) -> int:
        """Values a block transforms to: the product's batch."""
        return self.size * self.size


def toom_cook(m: int, points: tuple[float, ...]) -> WinogradTile:
    """F(m x m, 3x3) from the ``m + 1`` finite interpolation points (and infinity) of Toom-Cook's
    construction: ``a_t[i, j] = p_j^i``, ``g[j] = (1, p_j, p_j^2) / prod_{l != j} (p_j - p_l)``,
    ``b_t[j]`` the coefficients of ``prod_{l != j} (x - p_l)`` and its last row those of
    ``prod_l (x - p_l)`` (lowest degree first)."""
    pts = np.array(points, dtype=np.float64)
    n = m + 2
    a_t = np.zeros((m, n))
    a_t[:, : n - 1] = pts[None, :] ** np.arange(m)[:, None]
    a_t[m - 1, n - 1] = 1
    g = np.zeros((n, 3))
    b_t = np.zeros((n, n))
    for j, p in enumerate(pts):
        others = np.delete(pts, j)
        g[j] = p ** np.arange(3) / np.prod(p - others)
        b_t[j, : n - 1] = np.polynomial.polynomial.polyfromroots(others)
    g[n - 1, 2] = 1
    b_t[n - 1] = np.polynomial.polynomial.polyfromroots(pts)
    return WinogradTile(m, b_t, g, a_t)


# Lavin and Gray's F(2x2, 3x3): B^T holds only 0 and +-1
F2 = WinogradTile(
    2,
    b_t=np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64),
    g=np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64),
    a_t=np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64),
)
# F(4x4, 3x3) on the points 0, -1, 1, 1/2, -2: of the sets tried, the smallest float32 error
# (the module's docstring); every entry of B^T and A^T is a power of two or a sum of two
F4 = toom_cook(4, (0, -1, 1, 0.5, -2))

CHANNELS_PER_LANE = 8  # taken from 8 channels a float lane: 64 on AVX2, 128 on AVX-512
INPUT_BLOCK = "winograd_input"  # the input transform's block, which ``WinogradInput`` schedules
OUTPUT_BLOCK = "winograd_output"  # F(2x2, 3x3)'s output transform: ``WinogradOutputByPanel``'s
OUTPUT_BY_PLACE_BLOCK = "winograd_output_by_place"  # larger tiles' (``_4`` for 4x4): ``WinogradOutput``'s
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


def weighted_sum(coefficients: np.ndarray, values) -> tirx.PrimExpr:
    """``sum_i coefficients[i] * values(i)`` over the nonzero coefficients, +-1 as a sign."""
    total = None
    for i in np.flatnonzero(coefficients):
        term, c = values(int(i)), float(coefficients[i])
        term = term if c == 1 else -term if c == -1 else term * tirx.const(c, "float32")
        total = term if total is None else total + term
    return total


def entry(matrix: np.ndarray, row, col: int) -> tirx.PrimExpr:
    """``matrix[row, col]`` for a row known only as an expression: a branch per row, each a
    float32 constant (one constant once ``row`` is)."""
    out = tirx.const(float(matrix[-1, col]), "float32")
    for r in reversed(range(matrix.shape[0] - 1)):
        out = tirx.Select(row == r, tirx.const(float(matrix[r, col]), "float32"), out)
    return out


def input_transform(
    x: te.Tensor, pads: tuple[int, int], tiles: tuple[int, int], rows: int, tile: WinogradTile = F2
) -> te.Tensor:
    """``V[e, b, t, c] = (B^T d B)[e // size, e % size]`` for channel ``c`` of block ``t`` of
    image ``b`` (rows past the blocks, padding for the product's tiles, are 0): x ``[N, H, W, C]``
    -> ``[positions, N, 1, rows, C]`` (the 1: the product's axis of weight panels)."""
    n, h, w, _ = x.shape
    top, left = pads
    ty, tx = tiles
    size, b_t = tile.size, tile.b_t
    zero = tirx.const(0.0, "float32")

    def value(e, b, _, t, c):
        row, col = t // tx, t % tx

        def pixel(a, bb):  # d_t[a, bb]: zero in the padding
            y, z = row * tile.m + a - top, col * tile.m + bb - left
            inside = tirx.all(t < ty * tx, y >= 0, y < h, z >= 0, z < w)
            return tirx.if_then_else(inside, x[b, y, z, c], zero)

        if tile.m > 2:
            # sum_j B^T[nu, j] (sum_i B^T[xi, i] d[i, j]), each coefficient looked up by the
            # position: constants where WinogradInput unrolls e, the zero terms then folded
            # away; each column sum is the same expression at every nu, which LLVM computes
            # once. (A branch per position holds every position's sum in each unrolled copy:
            # 33 s to build one convolution of 128 channels, against 1.2 s.)
            xi, nu = e // size, e % size
            return sum(
                entry(b_t, nu, j) * sum(entry(b_t, xi, i) * pixel(i, j) for i in range(size)) for j in range(size)
            )

        def position(xi, nu):  # (B^T d B)[xi, nu]: four pixels, added or subtracted
            return weighted_sum(np.outer(b_t[xi], b_t[nu]).ravel(), lambda i: pixel(i // size, i % size))

        # a branch per position, each resolved where WinogradInput unrolls e
        last = tile.positions - 1
        out = position(last // size, last % size)
        for e_ in reversed(range(last)):
            out = tirx.Select(e == e_, position(e_ // size, e_ % size), out)
        return out

    return te.compute((tile.positions, n, 1, rows, x.shape[3]), value, name=INPUT_BLOCK)


def output_transform(m: te.Tensor, shape: list[int], tiles: tuple[int, int], tile: WinogradTile = F2) -> te.Tensor:
    """``Y[b, y, x, k] = (A^T M A)[y % m, x % m]`` of the block of image ``b`` holding pixel
    (y, x): M ``[positions, N, K / nr, rows, nr]`` (output channels in panels of ``nr``) ->
    ``[N, H, W, K]``."""
    _, tx = tiles
    nr, size, a_t = m.shape[-1], tile.size, tile.a_t

    if tile.m == 2:

        def coefficient(xi, i):  # A^T[i, xi] for i in {0, 1}, as a line through its two values (no branch)
            value, slope = tirx.const(a_t[0, xi], "float32"), a_t[1, xi] - a_t[0, xi]
            return value + tirx.const(slope, "float32") * tirx.Cast("float32", i) if slope else value

        def value(b, y, x, k):
            t = y // 2 * tx + x // 2
            total = None
            for xi in range(size):
                for nu in range(size):
                    term = coefficient(xi, y % 2) * coefficient(nu, x % 2) * m[xi * size + nu, b, k // nr, t, k % nr]
                    total = term if total is None else total + term
            return total

        return te.compute(shape, value, name=OUTPUT_BLOCK)

    def value(b, y, x, k):
        # sum_xi A^T[y % m, xi] (sum_nu A^T[x % m, nu] M[xi, nu]), each coefficient looked up
        # by the place: constants where WinogradOutput unrolls the places, the zero terms then
        # folded away; each row sum is the same expression at every y % m, which LLVM computes
        # once
        t = y // tile.m * tx + x // tile.m
        return sum(
            entry(a_t, y % tile.m, xi)
            * sum(entry(a_t, x % tile.m, nu) * m[xi * size + nu, b, k // nr, t, k % nr] for nu in range(size))
            for xi in range(size)
        )

    return te.compute(shape, value, name=f"{OUTPUT_BY_PLACE_BLOCK}_{tile.m}")


def product_rows(
    blocks: int, channels: int, outputs: int, registers: tuple[int, int], positions: int = F2.positions
) -> int:
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
    for rows in padding_candidates(blocks):
        plan = plan_matmul(positions, rows, outputs, channels, 1, *registers)
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


def _with_tile(te_func, tile: WinogradTile):
    """``te_func`` with its ``tile`` given (``emit_te`` takes tensors and numbers only), under
    its own name (the kernel's)."""
    return functools.update_wrapper(functools.partial(te_func, tile=tile), te_func)


@relax.expr_functor.mutator
class _Winograd(relax.PyExprMutator):
    def __init__(self, mod, min_channels: int, registers: tuple[int, int], tile: WinogradTile):
        super().__init__(mod)
        self.min_channels, self.registers, self.tile = min_channels, registers, tile

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
        tile = self.tile
        tiles = (-(-height // tile.m), -(-width // tile.m))
        rows = product_rows(tiles[0] * tiles[1], channels, outputs, self.registers, tile.positions)
        nr = plan_matmul(tile.positions, rows, outputs, channels, 1, *self.registers).nr
        u = np.einsum("ar,rsck,bs->abck", tile.g, weight.astype(np.float64), tile.g)  # [size, size, C, K], float64
        u = u.reshape(tile.positions, 1, channels, outputs // nr, nr)  # [positions, 1, C, K / nr, nr]
        u = u.transpose(0, 1, 3, 2, 4)  # [positions, 1, K / nr, C, nr]
        u = relax.const(np.ascontiguousarray(u).astype(np.float32))
        pads = (int(call.attrs.padding[0]), int(call.attrs.padding[1]))
        # the input transform computes no producer (the previous convolution's output transform
        # would be computed once a position over); the output transform takes the convolution's
        # elementwise consumers, not a transpose (read across its blocks, 16 gathers a vector:
        # Mask R-CNN's mask head back to channels-first, 11.6 -> 99.3 ms)
        v = self._emit(
            _with_tile(input_transform, tile), OPAQUE, call.args[0], pads, tiles, rows
        )  # [positions, N, 1, rows, C]
        m = self.builder_.emit(relax.op.matmul(v, u))  # [positions, N, K / nr, rows, nr]
        return self._emit(_with_tile(output_transform, tile), OUT_ELEMENTWISE_FUSABLE, m, shape, tiles)  # [N, H, W, K]

    def _emit(self, te_func, pattern: int, *args):
        """``emit_te``, its kernel marked with the op pattern FuseOps should see."""
        var = self.builder_.emit_te(te_func, *args)
        gv = self.builder_.lookup_binding(var).args[0]
        self.builder_.update_func(gv, self.builder_.get()[gv].with_attr("op_pattern", pattern))
        return var


def min_channels_for(registers: tuple[int, int]) -> int:
    """The fewest input and output channels a convolution takes Winograd from, on a CPU of
    ``(registers, float lanes)``: ``CHANNELS_PER_LANE`` a lane (the module's docstring)."""
    return CHANNELS_PER_LANE * registers[1]


def winograd_convolutions(min_channels: int | None = None, tile: WinogradTile = F2):
    """The pass: every static, constant-weight, channels-last 3x3 convolution of stride 1 with
    at least ``min_channels`` input and output channels (by default ``min_channels_for`` the
    current target) as Winograd's ``tile``, for the target's registers (run after
    ``channels_last_convolutions``). The shipped build takes F(2x2, 3x3); F(4x4, 3x3) (``F4``)
    is faster on AVX-512 but its float32 error exceeds PyTorch's own (the module's docstring)."""

    @tvm.transform.module_pass(opt_level=0, name="WinogradConvolutions")
    def transform(mod, _ctx):
        registers = vector_registers(tvm.target.Target.current())
        least = min_channels_for(registers) if min_channels is None else min_channels
        mutator = _Winograd(mod, least, registers, tile)
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mutator.builder_.update_func(gv, mutator.visit_expr(func))
        return mutator.builder_.get()

    return transform


def _schedule_of_block(func, target, name: str):
    """A schedule of ``func`` and its one root block named ``name``; (None, None) if it has none
    or several, or no schedule of ours applies."""
    sch = schedule_for(func, target)
    if sch is None:
        return None, None
    blocks = [b for b in root_blocks(sch) if sch.get(b).name_hint == name]
    return (sch, blocks[0]) if len(blocks) == 1 else (None, None)


class WinogradInput(dlight.ScheduleRule):
    """The input transform: parallel over blocks; per block and vector of channels its positions
    (16, or 36 for F(4x4, 3x3)) unrolled, each copy's branch or looked-up coefficients resolved
    to constants, so the block's pixels are read once."""

    def apply(self, func, target, _tunable):
        sch, block = _schedule_of_block(func, target, INPUT_BLOCK)
        if sch is None:
            return None
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


class WinogradOutput(dlight.ScheduleRule):
    """The output transform of tiles larger than 2x2 and the consumers fused into it: parallel
    over rows of blocks; per block and vector of output channels its m x m places unrolled, each
    copy's branch resolved to its sum, so the block's values of M are read once and the row
    sums they share computed once. The consumers stay a block of their own that reads the
    block's m x m vectors from a small buffer (inlined into the transform, on the Zen 5 EPYC:
    convolution + batch norm + ReLU of 128 channels at 80x80 2.74 ms against 2.39, of 256 at
    40x40 1.89 against 1.35, separate runs)."""

    def apply(self, func, target, _tunable):
        sch = schedule_for(func, target)
        if sch is None:
            return None
        prefix = OUTPUT_BY_PLACE_BLOCK + "_"
        blocks = [b for b in root_blocks(sch) if sch.get(b).name_hint.startswith(prefix)]
        if len(blocks) != 1:
            return None
        transform = blocks[0]
        place = int(sch.get(transform).name_hint[len(prefix) :])  # m: the block's places a side
        inline_elementwise(sch, transform, into_producers=False)  # the consumers into one block
        consumers = [b for b in root_blocks(sch) if not sch.get(b).same_as(sch.get(transform))]
        if len(consumers) > 1:
            return None
        last = consumers[0] if consumers else transform
        loops = sch.get_loops(last)
        if len(loops) != 4 or static_extent(sch, loops[3]) is None or static_extent(sch, loops[3]) % 8:
            return None
        b, y, x, k = loops
        lanes = VECTOR_LANES if static_extent(sch, k) % VECTOR_LANES == 0 else 8
        y_block, y_place = sch.split(y, [None, place])
        x_block, x_place = sch.split(x, [None, place])
        k_outer, k_inner = sch.split(k, [None, lanes])
        sch.reorder(b, y_block, x_block, k_outer, y_place, x_place, k_inner)
        sch.parallel(sch.fuse(b, y_block))
        sch.unroll(y_place)
        sch.unroll(x_place)
        sch.vectorize(k_inner)
        if consumers:
            sch.compute_at(transform, k_outer, preserve_unit_loops=True)
            *_, y_in, x_in, k_in = sch.get_loops(transform)
            sch.unroll(y_in)
            sch.unroll(x_in)
            sch.vectorize(k_in)
        return sch


class WinogradOutputByPanel(dlight.ScheduleRule):
    """F(2x2, 3x3)'s output transform and the consumers fused into it, a panel of output channels
    at a time: parallel over rows of blocks; in each, M's panels (``nr`` channels, the product's
    register tile wide) in order, and per block and vector of channels its 2 x 2 places unrolled,
    so the block's 16 values of M are read once.

    As an elementwise kernel (pixel after pixel, every channel of each) a row of pixels reads the
    16 positions of every panel at once: 16 x K / nr streams through memory, 128 for 256
    channels, more than the hardware prefetchers follow. A panel at a time reads 16. On the Zen 5
    EPYC, kernel tables of interleaved builds (8-10 rounds, medians, ms a call), elementwise ->
    by panel: Mask R-CNN's FPN, 256 channels at 200x272, 14.59 -> 5.76, at 100x136 2.82 -> 1.40;
    its mask head (100 boxes, 256 at 14x14, + ReLU) 3.31 -> 2.50; 128 at 100x136 (+ batch norm,
    ReLU) 1.42 -> 0.68; RT-DETR's 128 at 80x80 with batch norm, SiLU and a residual sum 1.22 ->
    0.42. Panel after panel without unrolling the places (each pixel reading its 16 values) took
    7.64 ms at 200x272 against 5.05 unrolled (conv + batch norm + ReLU alone)."""

    def apply(self, func, target, _tunable):
        sch, transform = _schedule_of_block(func, target, OUTPUT_BLOCK)
        if sch is None:
            return None
        # M [positions, N, K / nr, rows, nr]: the panels' width
        widths = {int(region_buffer(r).shape[-1]) for r in sch.get(transform).reads if len(region_buffer(r).shape) == 5}
        inline_elementwise(sch, transform)  # the consumers into the transform
        if len(root_blocks(sch)) != 1 or len(widths) != 1:
            return None
        loops = sch.get_loops(transform)
        if len(loops) != 4:
            return None
        b, y, x, k = loops
        (nr,), channels = widths, static_extent(sch, k)
        if (
            channels is None
            or channels % nr
            or nr % VECTOR_LANES
            or None in (static_extent(sch, y), static_extent(sch, x))
        ):
            return None
        y_block, y_place = sch.split(y, [None, F2.m])  # an odd height or width: the last block cut short
        x_block, x_place = sch.split(x, [None, F2.m])
        panel, within = sch.split(k, [None, nr])
        vector, lane = sch.split(within, [None, VECTOR_LANES])
        sch.reorder(b, y_block, panel, x_block, vector, y_place, x_place, lane)
        sch.parallel(sch.fuse(b, y_block))
        sch.unroll(y_place)
        sch.unroll(x_place)
        sch.vectorize(lane)
        return sch
