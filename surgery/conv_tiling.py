"""Which convolutions our CPU convolution kernel computes directly, and its register tile, in
plain Python.

The Conv schedule rule (``surgery.schedules.conv``) computes a channels-last convolution where it
is, reading the padded input in place; ``conv_im2col`` then leaves such convolutions alone and
takes only the rest. Both decide from here. Nothing here imports TVM: the rewrites must not.
"""

from __future__ import annotations

from .matmul_tiling import VECTOR_REGISTERS

# Output channels come in whole 16-float vectors (one AVX-512 register, two AVX2 ones): every
# detector's backbone and neck has such widths. Others (3 input planes of a stem are fine; 91
# output classes are not) go through conv_im2col's product, whose columns TVM pads.
CHANNEL_MULTIPLE = 16

# Register tiles (output pixels x output channels) in order of preference, by the vector
# register file; like the matmul's, at most 28 accumulators and two registers spare. Measured on
# a 2-core Xeon with AVX-512, two 3x3 convolutions of a ResNet stage, pixel tiles outermost (ms;
# the matmul's own 10 x 32 tile in brackets): 64 channels at 160x160, 5 x 64 13.6, 4 x 64 14.5,
# 8 x 32 14.3 (21.3); 128 at 80x80, 5 x 64 13.9, 8 x 32 15.1, 16 x 16 17.2 (22.2); 256 at
# 40x40, 8 x 32 30.3, 5 x 64 38.3 (32.8); 512 at 20x20, 5 x 64 41.3, 8 x 32 40.7 (42.1). A
# pixel of the tile is a broadcast from a strided row of the input, where a matmul's comes from
# a contiguous one: wider, shorter tiles than the matmul's pay. On a 2-core EPYC with AVX-512
# (half-width FMA units) every such tile ran at ~100 G multiply-adds a second, within 10%.
#
# Tiles may span a row's end (the Conv rule's pixel axis runs over the whole image), so Mask
# R-CNN's widths 34 and 68 take 5 x 64 where only 2 x 64 and 4 x 64 fitted a row. On a 2-core
# Zen 5 EPYC (AVX-512, full-width FMA), medians of 12 interleaved calls of one 3x3 convolution
# and ReLU: 512 channels at 25x34, 2 x 64 23.3 -> 5 x 64 12.2 ms; 256 at 50x68, 4 x 64 15.1,
# 5 x 64 13.0, 8 x 32 12.4. 8 x 32 before 4 x 64 (where 5 divides no pixel count): 512 at 16x16
# 4.57 -> 3.69 ms, 256 at 32x32 3.39 -> 3.35, 128 at 64x64 4.04 -> 4.00, 64 at 128x128 4.70 -> 4.96.
_AVX512_TILES = ((5, 64), (8, 32), (4, 64), (6, 64), (6, 32), (12, 32), (7, 32), (4, 32), (2, 64), (14, 16))
# 16 registers of 8 floats: BLIS's 6 x 16 (12 accumulators) and its neighbours, dividing the
# pixels. Detectors' maps (20x20 ... 200x272, 14x14 boxes) have no divisor 6; 5 x 16 (10
# accumulators) beat 4 x 16 (8, under the 2 FMA units' latency) on a 2-core Zen 3, medians of 18
# interleaved calls, packed weights, 3x3 convolutions (ms): 512 channels at 20x20 17.9 -> 16.4,
# 256 at 40x40 17.2 -> 15.8, 128 at 80x80 19.9 -> 18.3, 64 at 160x160 23.0 -> 21.7, 32 at
# 320x320 30.1 -> 26.7.
_AVX2_TILES = ((6, 16), (5, 16), (4, 16), (2, 32), (3, 16), (2, 16))
# A convolution of several taps takes 6 x 16 on every image, its last tile cut short: see
# ``plan_conv``.
_AVX2_RAGGED_TILE = _AVX2_TILES[0]
# On AVX-512, a tile of fewer pixels than this, the largest divisor of an image's pixels, is
# replaced by a listed tile cut short (see ``plan_conv``); for a 1x1 convolution, by one of
# these (cut short, 5 x 64's 20 accumulators ran 10-40% slower than 8 x 32's 16 on four shapes).
MIN_DIVIDING_PIXELS = 5
_AVX512_POINTWISE_CUT_TILES = ((8, 32), (14, 16))
# From this many input channels to twice as many, 8 x 32 first (see above).
_WIDE_INPUT_CHANNELS = 256
# Output channels an odd number of 16-float vectors (48, 80, 144, 240, 400: the widths of
# MobileNet, EfficientNet, MNASNet, RegNet) fit none of the tiles above but 14 x 16, whose 14
# accumulators load a vector of the weight for every 14 FMAs. Three or five vectors wide, the
# first whose channels divide (its pixels dividing, else the image's last tile cut short). Zen 5,
# convolution + batch norm + ReLU, medians of 6-10 interleaved rounds of 100 calls, kernel alone
# (ms), 14 x 16 (or the largest divisor's 7 x 16, 5 x 16) -> this: 1x1, 192 -> 48 at 56x56 0.139
# -> 0.125, 24 -> 144 at 56x56 0.076 -> 0.065, 144 -> 144 at 28x28 0.079 -> 0.072, 40 -> 240 at
# 28x28 0.045 -> 0.040, 288 -> 48 at 25x25 (cut) 0.062 -> 0.039, 480 -> 80 at 14x14 0.038 ->
# 0.035, 400 -> 400 at 7x7 (cut) 0.046 -> 0.038; 3x3, 48 at 56x56 0.324 -> 0.288, 80 at 28x28
# 0.226 -> 0.203. Seven vectors (112, 784) measured slower at 2 x 112 and 3 x 112, so such widths
# keep 16.
_AVX512_ODD_VECTOR_TILES = ((8, 48), (7, 48), (4, 80))


def conv_directly(out_channels: int, groups: int, transposed: bool) -> bool:
    """Whether the Conv schedule rule computes this 2-d convolution as it is (channels-last)."""
    return groups == 1 and not transposed and out_channels % CHANNEL_MULTIPLE == 0


def plan_conv(
    pixels: int, out_channels: int, in_channels: int, registers: int = VECTOR_REGISTERS, *, taps: int = 1
) -> tuple[int, int]:
    """The register tile ``(mr, nr)``: ``mr`` consecutive output pixels of one image (of its
    ``pixels``, row after row, so a tile may span a row's end) by ``nr`` output channels (of
    ``out_channels``), dividing both; on AVX-512, wide inputs prefer the 8 x 32 tile (see
    ``_AVX512_TILES``), and output channels an odd number of vectors a tile three or five
    vectors wide (``_AVX512_ODD_VECTOR_TILES``).

    On AVX2 a convolution of several ``taps`` (3x3, 7x7) takes 6 x 16 whatever the pixels:
    where 6 does not divide them, the image's last tile is cut short by a predicate, which LLVM
    moves out of the taps' loops (one copy of the loop nest for whole tiles). Measured on a
    2-core Zen 3, medians of 12 interleaved calls, convolution and ReLU, against the dividing
    tile (ms): Mask R-CNN's mask head (100 boxes, 256 channels at 14x14) 4 x 16 204.0 -> 167.8;
    256 at 100x136 5 x 16 111.4 -> 107.9; 512 at 20x20 13.1 -> 12.5; 128 at 80x80 15.2 ->
    14.3; 64 at 160x160 13.6 -> 13.7; 256 at 40x40 12.0 -> 12.2. A 1x1 convolution keeps the
    dividing tile: its reduction is one loop, out of which LLVM does not move the predicate,
    and the cut tile's accumulators stay in memory (256 to 1024 channels at 50x68: 14.3 ->
    25.8 ms).

    On AVX-512, where no listed tile divides the pixels, the tile takes their largest divisor up
    to 14; where that is under ``MIN_DIVIDING_PIXELS`` (a prime row width: SqueezeNet's 13x13,
    Inception's 109x109, whose divisor is 1, a 1-pixel tile that loads a vector of the weight
    for every FMA), a tile cut short the same way: for several taps the first listed tile whose
    channels divide, for one 8 x 32 or 14 x 16. Zen 5, medians of 7 x 50 interleaved calls,
    convolution and ReLU (ms): 3x3, 1 x 32 -> 5 x 64, 64 -> 256 channels at 13x13 0.417 ->
    0.117, 32 -> 64 at 109x109 3.96 -> 1.18, 48 -> 192 at 13x13 0.238 -> 0.069 (8 x 32, 12 x
    32, 6 x 64 and 13 x 16 within 8% of 5 x 64); where a divisor of 9 served (27x27, 111x111),
    5 x 64 cut short ran the same within 1%. 1x1, 1 x 32 -> 8 x 32: 512 -> 64 at 13x13 0.096 ->
    0.036 (14 x 16 0.038, 5 x 64 0.045), 64 -> 256 0.053 -> 0.023, 48 -> 192 0.042 -> 0.018,
    768 -> 192 at 17x17 0.671 -> 0.206 (5 x 64 0.287)."""
    wide = registers >= VECTOR_REGISTERS
    if not wide and taps > 1:
        return min(_AVX2_RAGGED_TILE[0], pixels), _AVX2_RAGGED_TILE[1]
    if wide and out_channels % 32:
        odd = [(mr, nr) for mr, nr in _AVX512_ODD_VECTOR_TILES if out_channels % nr == 0]
        if odd:
            return next(((mr, nr) for mr, nr in odd if pixels % mr == 0), (min(odd[0][0], pixels), odd[0][1]))
    tiles = _AVX512_TILES if wide else _AVX2_TILES
    if wide and _WIDE_INPUT_CHANNELS <= in_channels < 2 * _WIDE_INPUT_CHANNELS:
        tiles = ((8, 32), *tiles)
    for mr, nr in tiles:
        if pixels % mr == 0 and out_channels % nr == 0:
            return mr, nr
    # an odd pixel count (17x17 after a stride of 2): its largest divisor that fits as many accumulators
    nr = 32 if wide and out_channels % 32 == 0 else CHANNEL_MULTIPLE
    accumulators = nr // (16 if wide else 8)
    mr = max(d for d in range(1, 15) if pixels % d == 0 and d * accumulators <= (24 if wide else 12))
    if mr < MIN_DIVIDING_PIXELS and wide:
        # a prime row width's (13x13): a tile cut short at the image's end, as on AVX2
        cut = tiles if taps > 1 else _AVX512_POINTWISE_CUT_TILES
        mr, nr = next((mr, nr) for mr, nr in cut if out_channels % nr == 0)
        return min(mr, pixels), nr
    return mr, nr
