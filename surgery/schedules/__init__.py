"""CPU schedule rules of our own for stock TVM, in the style of TVM's dlight rules.

Stock TVM's CPU pipeline (``relax.backend.cpu_generic``) compiles every kernel exactly as
``LegalizeOps`` wrote it: one scalar, single-threaded loop nest per operator (the untuned
geometry encoder ran ~65x slower than eager PyTorch). MetaSchedule would schedule the kernels,
but with apache-tvm 0.27.0.post1 + apache-tvm-ffi 0.1.15.x serialising any TVM object segfaults
in ``tvm::ffi::ToJSONGraph`` (``tvm.ir.save_json(tvm.tirx.Var("x", "int32"))``), which
MetaSchedule does before its first trial; with apache-tvm-ffi 0.1.14.x it runs, but its search
stalled after its initial candidates here and each build costs seconds (README, "Speed on TVM").
So we ship deterministic rules, applied at build time by ``pipeline`` with dlight's
``ApplyDefaultSchedule``; the first rule that accepts a kernel wins (``rules()``, in order):

- ``winograd``: ``WinogradInput``, ``WinogradOutput`` and ``WinogradOutputByPanel``, the input
  transform and the output transforms (of 4x4 tiles, on request only; of 2x2 tiles, a panel of
  output channels at a time) of the convolutions that ``winograd_convolutions`` (a pass before
  legalisation) computes as F(2x2, 3x3);
- ``conv``: ``Conv``, channels-last convolutions tiled by ``surgery.conv_tiling``;
- ``grouped_conv``: ``GroupedConv``, channels-last grouped convolutions, depthwise ones among them;
- ``matmul``: ``Matmul``, register-blocked products laid out by ``surgery.matmul_tiling``;
- ``row_reduction``: ``RowReduction``, softmax / layer norm rows;
- ``column_reduction``: ``ColumnReduction``, reductions over leading axes that keep the innermost one,
  in vectors along it (ROI pooling's taps); then ``reduction.Reduction``: dlight's
  ``cpu.Reduction`` where it computes each reduction once;
- ``injective``: ``Injective``, elementwise / broadcast / transpose / gather kernels, a
  concatenation along the innermost axis as one loop per part (TVM's ``LoopPartition``);
- ``parallel_outer``: ``ParallelOuter``, the fallback for anything else;
- ``analysis``: what the rules share (blocks, loops, inlining, vectorising);
- ``fma``: which kernels may be compiled with fused multiply-add (``FMA_ANNOTATION``);
- ``flattening``: ``Checked``, wrapping each rule: a schedule with an index TVM's buffer
  flattening would compute wrongly is declined;
- ``relax_passes``: ``channels_last_convolutions``, ``absorb_matmul_broadcasts`` and
  ``pad_matmul_columns``, run before legalisation;
- ``compat``: what differs between apache-tvm 0.25, 0.26 and 0.27.

Schedules change the loop order, never the arithmetic of a single output element except for the
order in which a reduction is accumulated and its FMA contraction (as with any BLAS); with
``fast_exp`` and Winograd's F(2x2, 3x3) (see ``pipeline``; its float32 error against float64
measured below the direct convolution's, ``winograd``) that is the shipped build's whole numeric
difference, and the whole-model property test bounds it (float32, max abs 1e-5 on unit-scale
inputs).
"""

from __future__ import annotations

import functools

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu
from tvm.s_tir import dlight

from ..matmul_tiling import (
    MAX_ACCUMULATORS,
    VECTOR_LANES,
    VECTOR_REGISTERS,
    MatmulPlan,
    plan_matmul,
)
from .column_reduction import ColumnReduction
from .conv import Conv
from .flattening import Checked
from .fma import FMA_ANNOTATION, is_fma_kernel
from .grouped_conv import GroupedConv
from .injective import Injective
from .matmul import Matmul
from .parallel_outer import ParallelOuter
from .reduction import Reduction
from .relax_passes import (
    absorb_matmul_broadcasts,
    batch_norm_as_scale_shift,
    channels_last_convolutions,
    clip_as_minimum_maximum,
    gathers_into_weighted_sums,
    gelu_through_erf_or_tanh,
    guarded_softmax_kernels,
    pad_matmul_columns,
    pad_matmul_rows,
    positive_squeeze_axes,
    sigmoid_through_exp,
    softmax_by_reciprocal,
    split_weight_packing,
    uniform_constants_as_scalars,
)
from .row_reduction import RowReduction
from .winograd import WinogradInput, WinogradOutput, WinogradOutputByPanel, winograd_convolutions


@functools.cache
def rules() -> tuple:
    rules = (
        WinogradInput(),
        WinogradOutput(),
        WinogradOutputByPanel(),
        Conv(),
        GroupedConv(),
        Matmul(),
        RowReduction(),
        ColumnReduction(),
        Reduction(),
        Injective(),
        ParallelOuter(),
    )
    return tuple(Checked(rule) for rule in rules)


def pipeline(target: tvm.target.Target):
    """Stock TVM's CPU pipeline with our schedule rules applied after fusion. Besides the rules, it

    - folds constants where stock TVM leaves them to run on every call: a slice of a constant
      tuple (the import turns attention's packed in-projection split into one) is made that
      constant (``CanonicalizeBindings``), and ``FoldConstant`` runs again after fusion, so
      weight transposes are evaluated once, at build time;
    - spells ``clip`` (ReLU6, hard-swish's) as the ``minimum`` and ``maximum`` TVM computes it
      with, which ``ConvertLayout`` takes channels-last, so that it runs in the convolution's
      write-back (``clip_as_minimum_maximum``, inside ``channels_last_convolutions``);
    - applies an inference batch norm as a scale and shift computed at build time
      (``batch_norm_as_scale_shift``), which fuse into the convolution's write-back;
    - computes 3x3 convolutions of stride 1 with at least 64 channels in and out (128 on
      AVX-512) as Winograd's F(2x2, 3x3) (``winograd_convolutions``): an input transform, one
      batched product on the Matmul rule with 2.25x fewer multiply-adds, and an output transform
      into which the convolution's consumers fuse; the weight transformed at build time;
    - packs each convolution's weight into the panels of output channels the Conv rule reads,
      once, at build time (``split_weight_packing``, then ``FoldConstant``);
    - computes ``exp`` as TVM's ``fast_exp`` (``FastMathTransform``), a polynomial LLVM
      vectorises, where libm's ``expf`` is one scalar call per element. Measured over [-87, 88]:
      at most 4.1e-6 relative (68 ulp) from the exact value, where ``torch.exp`` is within 1 ulp;
      ``sigmoid`` and ``silu`` too, spelled with ``exp`` as PyTorch computes them
      (``sigmoid_through_exp``); ``gelu``'s ``erf`` and its tanh form's ``tanh`` as ``fast_erf``
      and ``fast_tanh`` (``gelu_through_erf_or_tanh``: within 3.7e-7 and 3.1e-7 of the exact
      values); a softmax row is multiplied by one reciprocal of its sum
      instead of dividing every element by it (``softmax_by_reciprocal``, within 1 ulp);
    - gives an elementwise operator a constant of one value throughout (attention's guard
      zeros, folded to a tensor of the scores' size) as a 0-d scalar
      (``uniform_constants_as_scalars``, bit-exact);
    - computes attention's guarded softmax over scores unpacked from a product's panels (SAM3's
      prompt stage) in one kernel: the unpacking, the all-masked check and the softmax
      (``guarded_softmax_kernels``, bit-exact);
    - computes gathers that feed a weighted sum (ROI pooling's taps, the bilinear sampler's four,
      and with them deformable attention's sum over points) in the sum's kernel
      (``gathers_into_weighted_sums``);
    - turns ``matmul(broadcast_to(x), y)`` into ``matmul(x, y)``, also with the broadcast merged
      into the batch by a reshape (``absorb_matmul_broadcasts``);
    - pads a product's columns to whole vectors when they are no whole number of 4-float ones,
      and slices the result (``pad_matmul_columns``);
    - pads a product's rows by a few when they admit only 1- or 2-row register tiles (a prime
      count past 16), and slices the result (``pad_matmul_rows``);
    - simplifies index arithmetic left by inlined reshapes over the loop ranges
      (``analysis.simplified``, inside the rules);
    - compiles Matmul and RowReduction kernels with fused multiply-add where no step function
      reads a contracted value (``fma``)."""

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                # convolutions channels-last (weights HWIO): the Conv rule's layout; layout
                # changes between them and their neighbours cancel out
                [channels_last_convolutions]
                # inference batch norm as a constant scale and shift: elementwise steps the
                # convolution before it computes in its write-back
                + [batch_norm_as_scale_shift]
                # 3x3 convolutions of stride 1 as Winograd's F(2x2, 3x3): 2.25x fewer multiply-adds
                + [winograd_convolutions()]
                # the same image + position sum feeds all three layers: compute it once
                + [relax.transform.EliminateCommonSubexpr()]
                # sigmoid as 1 / (1 + exp(-x)), so that its exp is the fast_exp below
                + [sigmoid_through_exp]
                # gelu with relax's erf or tanh, so that the next pass makes them fast_erf and
                # fast_tanh (libm's erff and tanhf are scalar calls)
                + [gelu_through_erf_or_tanh]
                # softmax with fast_exp, each row normalised by one reciprocal of its sum
                + [softmax_by_reciprocal]
                # exp as TVM's fast_exp (a polynomial LLVM vectorises) instead of libm's scalar
                # expf, one call per element: softmax over 5,184 image tokens was 2/3 exp
                + [relax.transform.FastMathTransform()]
                # a slice of a constant tuple (the import folds attention's packed in-projection
                # split into one) becomes that constant, so what follows it can fold too
                + [relax.transform.CanonicalizeBindings()]
                # a constant of one value throughout (attention's guard zeros) as a 0-d scalar
                + [uniform_constants_as_scalars]
                # matmul(broadcast_to(x), y) -> matmul(x, y): no per-batch copy of a shared operand
                + [absorb_matmul_broadcasts]
                # columns no whole number of vectors (91 classes): padded, so the Matmul rule tiles them
                + [pad_matmul_columns]
                # rows that admit only 1- or 2-row register tiles (197 tokens): padded by a few
                + [pad_matmul_rows]
                # attention's guarded softmax over scores unpacked from a product's panels: one kernel
                + [guarded_softmax_kernels()]
                # gathers feeding a weighted sum (ROI pooling's taps, bilinear sampling's) one kernel with it
                + [gathers_into_weighted_sums()]
                + cpu.library_dispatch_passes(target)
                + cpu.legalize_passes(target)
                # again after fusion: a fused kernel whose inputs are all constants (a slice of
                # attention's packed in-projection, transposed) is evaluated once, here
                + [relax.transform.FoldConstant()]
                + [dlight.ApplyDefaultSchedule(*rules())]
                # a convolution's weight, read in panels by the Conv rule, packed once, here
                + [split_weight_packing, relax.transform.FoldConstant()]
                + [relax.transform.DeadCodeElimination()]
                + cpu.dataflow_lower_passes(target)
                + cpu.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline


__all__ = [
    "FMA_ANNOTATION",
    "Checked",
    "ColumnReduction",
    "Conv",
    "GroupedConv",
    "MAX_ACCUMULATORS",
    "VECTOR_LANES",
    "VECTOR_REGISTERS",
    "Injective",
    "Matmul",
    "MatmulPlan",
    "ParallelOuter",
    "RowReduction",
    "WinogradInput",
    "WinogradOutput",
    "absorb_matmul_broadcasts",
    "batch_norm_as_scale_shift",
    "channels_last_convolutions",
    "clip_as_minimum_maximum",
    "pad_matmul_columns",
    "pad_matmul_rows",
    "positive_squeeze_axes",
    "softmax_by_reciprocal",
    "split_weight_packing",
    "uniform_constants_as_scalars",
    "winograd_convolutions",
    "is_fma_kernel",
    "pipeline",
    "plan_matmul",
    "rules",
]
