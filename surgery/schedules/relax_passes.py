"""Relax-level rewrites our pipeline runs before legalisation, and the split of weight packing
after scheduling."""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax, s_tir, tirx
from tvm.relax.dpl import is_const, is_op, is_tuple, is_tuple_get_item, rewrite_call, wildcard

from ..matmul_tiling import padded_rows
from .analysis import LAYOUT_REWRITE, root_blocks
from .compat import RelaxConstant, constant_array, prim_number, relax_type
from .matmul import vector_registers


def _static_shape(expr) -> list[int] | None:
    """The static shape of a relax expression, or None when any dimension is symbolic."""
    dims = getattr(getattr(relax_type(expr), "shape", None), "values", None)
    if dims is None or not all(isinstance(v, tirx.IntImm) for v in dims):
        return None
    return [int(v) for v in dims]


def _float32(expr) -> bool:
    """A relax expression of float32 values."""
    return getattr(relax_type(expr), "dtype", None) == "float32"


def _rewrite_functions(mod, *rewrites):
    """Each ``(pattern, rewrite)`` in turn (``rewrite_call``) on every relax function of ``mod``."""
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            for pattern, rewrite in rewrites:
                func = rewrite_call(pattern, rewrite, func)
            mod[gv] = func
    return mod


@tvm.transform.module_pass(opt_level=0, name="AbsorbMatmulBroadcasts")
def absorb_matmul_broadcasts(mod, _ctx):
    """``matmul(broadcast_to(x), y)`` -> ``matmul(x, y)`` where only batch dimensions were
    broadcast (relax's matmul broadcasts them itself), and ``matmul(reshape(broadcast_to(x)), y)``
    with the broadcast merged into one batch dimension -> a product of the unmerged shapes. PyTorch's ``bmm`` needs equal batches, so
    an exported ``matmul([1, M, K], [T, K, N])`` arrives as an ``expand`` of the shared operand,
    which TVM would otherwise materialise as a copy per batch before the product."""
    lhs, rhs = wildcard(), wildcard()
    lhs_b, rhs_b = is_op("relax.broadcast_to")(lhs, wildcard()), is_op("relax.broadcast_to")(rhs, wildcard())
    pattern = is_op("relax.matmul")(lhs_b | wildcard(), rhs_b | wildcard())

    def rewrite(call, matches):
        def operand(broadcast, inner, given):
            if broadcast in matches:
                before, after = _static_shape(matches[inner]), _static_shape(matches[broadcast])
                if before is not None and after is not None and len(before) >= 2 and before[-2:] == after[-2:]:
                    return matches[inner]
            return given

        x, y = operand(lhs_b, lhs, call.args[0]), operand(rhs_b, rhs, call.args[1])
        sx, sy, out = _static_shape(x), _static_shape(y), _static_shape(call)
        if (x is call.args[0] and y is call.args[1]) or None in (sx, sy, out) or min(len(sx), len(sy)) < 2:
            return call
        try:
            batch = list(np.broadcast_shapes(tuple(sx[:-2]), tuple(sy[:-2])))
        except ValueError:
            return call
        if batch + [sx[-2], sy[-1]] != out:
            return call
        return relax.op.matmul(x, y, out_dtype=call.attrs.out_dtype)

    # ``reshape(broadcast_to(x), [B*T, M, K])``: the left operand shared by T panels of each of B
    # batches (``matmul_packing`` on a batched product) arrives with the broadcast dimension
    # merged into the batch; the product is then done 4-d, broadcasting x over T.
    merged_x = wildcard()
    merged = is_op("relax.reshape")(is_op("relax.broadcast_to")(merged_x, wildcard()), wildcard())
    merged_pattern = is_op("relax.matmul")(merged, wildcard())

    def rewrite_merged(call, matches):
        x, y = matches[merged_x], call.args[1]
        sx, sb = _static_shape(x), _static_shape(matches[merged].args[0])
        sm, sy, out = _static_shape(matches[merged]), _static_shape(y), _static_shape(call)
        if None in (sx, sb, sm, sy, out) or len(sx) != len(sb) or len(sm) != 3 or len(sy) != 3 or len(sb) < 3:
            return call
        if sb[-2:] != sm[-2:] or sx[-2:] != sb[-2:] or int(np.prod(sb[:-2])) != sm[0] or sy[0] != sm[0]:
            return call
        product = relax.op.matmul(x, relax.op.reshape(y, [*sb[:-2], *sy[-2:]]), out_dtype=call.attrs.out_dtype)
        return relax.op.reshape(product, out)

    return _rewrite_functions(mod, (pattern, rewrite), (merged_pattern, rewrite_merged))


COLUMN_MULTIPLE = 8  # a product's columns are padded to whole 8-float vectors (AVX2's width; half of AVX-512's)
PAD_MIN_MACS = 1 << 20  # below this a product is not worth the extra slice


@tvm.transform.module_pass(opt_level=0, name="PadMatmulColumns")
def pad_matmul_columns(mod, _ctx):
    """``matmul(x, y)`` whose ``N`` columns are no whole number of 4-float vectors (91 classes)
    -> ``matmul(x, pad(y, zeros to a multiple of 8))[..., :N]``: the Matmul rule tiles only whole
    vectors, and the scalar kernel TVM falls back to ran Mask R-CNN's 78400 x 256 @ 256 x 91
    mask logits at 7.5 G multiply-adds a second. Each kept column is the same dot product; the
    zero columns are computed and dropped. A constant ``y`` (a weight) is padded at build time;
    most weights come here padded and packed already (``matmul_packing``, ``padded_columns``),
    so this pass serves the rest (a right-hand side computed per call, a batched weight)."""
    x, y = wildcard(), wildcard()
    pattern = is_op("relax.matmul")(x, y)

    def rewrite(call, matches):
        sx, sy, out = _static_shape(matches[x]), _static_shape(matches[y]), _static_shape(call)
        if None in (sx, sy, out) or len(sy) < 2 or len(sx) < 2 or sy[-1] % 4 == 0:
            return call
        if int(np.prod(out)) * sx[-1] < PAD_MIN_MACS:
            return call
        cols = sy[-1]
        padded = relax.op.nn.pad(matches[y], [0, 0] * (len(sy) - 1) + [0, -cols % COLUMN_MULTIPLE], pad_value=0.0)
        product = relax.op.matmul(matches[x], padded, out_dtype=call.attrs.out_dtype)
        return relax.op.strided_slice(product, axes=[len(out) - 1], begin=[0], end=[cols])

    return _rewrite_functions(mod, (pattern, rewrite))


@tvm.transform.module_pass(opt_level=0, name="PadMatmulRows")
def pad_matmul_rows(mod, _ctx):
    """``matmul(x, y)`` whose ``M`` rows admit only register tiles of a row or two (a prime
    count past 16: ViT's 197 tokens, a sentence of 37) -> ``matmul(pad(x, zero rows to
    padded_rows), y)[..., :M, :]``: a 1-row tile loads a vector of B for every FMA and runs at
    the speed B streams from L2. Each kept row is the same dot products; the zero rows are
    computed and dropped. Run after ``pad_matmul_columns``, for the current target's registers."""
    x, y = wildcard(), wildcard()
    pattern = is_op("relax.matmul")(x, y)
    registers = vector_registers(tvm.target.Target.current())

    def rewrite(call, matches):
        sx, sy, out = _static_shape(matches[x]), _static_shape(matches[y]), _static_shape(call)
        if None in (sx, sy, out) or len(sx) < 2 or len(sy) < 2 or int(np.prod(out)) * sx[-1] < PAD_MIN_MACS:
            return call
        if not _float32(matches[x]):
            return call
        rows = sx[-2]
        padded = padded_rows(int(np.prod(out[:-2])), rows, out[-1], sx[-1], *registers)
        if padded == rows:
            return call
        widths = [0, 0] * (len(sx) - 2) + [0, padded - rows, 0, 0]
        product = relax.op.matmul(
            relax.op.nn.pad(matches[x], widths, pad_value=0.0), matches[y], out_dtype=call.attrs.out_dtype
        )
        return relax.op.strided_slice(product, axes=[len(out) - 2], begin=[0], end=[rows])

    return _rewrite_functions(mod, (pattern, rewrite))


@tvm.transform.module_pass(opt_level=0, name="BatchNormAsScaleShift")
def batch_norm_as_scale_shift(mod, _ctx):
    """``batch_norm(x, gamma, beta, mean, var)[0]`` in inference with constant statistics ->
    ``x * scale + shift``, computed at build time as PyTorch's CPU kernel computes them
    (float32: ``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale``), and then
    applied as it applies them. Legalised as it is, ``batch_norm`` is a kernel TVM does not fuse
    into the convolution before it (RT-DETR's encoder: each 80x80 map read back and written again
    on its own); as two elementwise steps it runs in the convolution's write-back."""
    x, gamma, beta, mean, var = wildcard(), wildcard(), wildcard(), wildcard(), wildcard()
    norm = is_op("relax.nn.batch_norm")(x, gamma, beta, mean, var)
    pattern = is_tuple_get_item(norm, 0)

    def rewrite(call, matches):
        attrs = matches[norm].attrs
        stats = [matches[p] for p in (gamma, beta, mean, var)]
        shape = _static_shape(matches[x])
        if attrs.training or shape is None or not all(isinstance(s, RelaxConstant) for s in stats):
            return call
        g, b, m, v = (constant_array(s) for s in stats)
        if {a.dtype for a in (g, b, m, v)} != {np.dtype("float32")} or relax_type(matches[x]).dtype != "float32":
            return call
        invstd = np.float32(1) / np.sqrt(v + np.float32(attrs.epsilon))  # [C]
        scale = (invstd * g if attrs.scale else invstd).astype(np.float32)  # [C]
        shift = ((b if attrs.center else np.float32(0)) - m * scale).astype(np.float32)  # [C]
        axis = int(attrs.axis) % len(shape)
        along = [1] * len(shape)
        along[axis] = shape[axis]
        as_const = lambda a: relax.const(a.reshape(along), "float32")  # noqa: E731
        return relax.op.add(relax.op.multiply(matches[x], as_const(scale)), as_const(shift))

    return _rewrite_functions(mod, (pattern, rewrite))


# Broadcasting elementwise operators whose result does not change when one operand of one value
# throughout is given as that value, 0-d.
_BROADCASTING_ELEMENTWISE = (
    "relax.where",
    "relax.add",
    "relax.subtract",
    "relax.multiply",
    "relax.divide",
    "relax.maximum",
    "relax.minimum",
)


def _uniform_value(const) -> np.ndarray | None:
    """The 0-d array of a constant with more than one element, all of them the same bits, or None."""
    array = constant_array(const)
    if array.ndim == 0 or array.size < 2:
        return None
    bits = array.reshape(-1).view(np.uint8).reshape(array.size, -1)
    return array.reshape(-1)[0].copy() if (bits == bits[0]).all() else None


@tvm.transform.module_pass(opt_level=0, name="UniformConstantsAsScalars")
def uniform_constants_as_scalars(mod, _ctx):
    """An elementwise operator's constant operand holding one value throughout -> that value as a
    0-d constant, where the other operands' broadcast shape is still the result's. PyTorch's
    "no key is valid" guard after an attention softmax, ``where(all_masked, zeros_like(p), p)``,
    arrives as a folded ``[1, 8, 13, 5184]`` tensor of zeros (2.2 MB, one per layer) that the
    kernel read on every call; broadcast from a scalar it is read from a register. Bit-exact:
    every element of the result reads the same bits as before."""
    operands = [wildcard() for _ in range(3)]
    patterns = [is_op(op)(*operands[: 3 if op == "relax.where" else 2]) for op in _BROADCASTING_ELEMENTWISE]

    def rewrite(call, _matches):
        out = _static_shape(call)
        if out is None:
            return call
        args = list(call.args)
        for index, arg in enumerate(call.args):
            if not isinstance(arg, RelaxConstant):
                continue
            value = _uniform_value(arg)
            others = [_static_shape(a) for j, a in enumerate(args) if j != index]
            if value is None or None in others:
                continue
            try:
                if list(np.broadcast_shapes(*map(tuple, others))) != out:
                    continue
            except ValueError:
                continue
            args[index] = relax.const(value, str(value.dtype))
        if all(a.same_as(b) for a, b in zip(args, call.args)):
            return call
        return getattr(relax.op, call.op.name.removeprefix("relax."))(*args)

    return _rewrite_functions(mod, *((pattern, rewrite) for pattern in patterns))


def _fast_softmax_by_reciprocal(x, axis: int):
    """TOPI's ``fast_softmax`` (row max, ``fast_exp`` of the differences, their sum), each row
    normalised by one reciprocal of its sum: ``e * (1 / sum)``, where TOPI divides every element
    (``e / sum``, a vector division per 8 floats that LLVM cannot hoist). TOPI's own steps are
    reused; only its last one is replaced (the unused division is never lowered)."""
    from tvm import te, topi

    axis = axis % len(x.shape)
    divided = topi.nn.fast_softmax(x, axis)
    exp, total = sorted(divided.op.input_tensors, key=lambda t: -len(t.shape))  # [..., n, ...], [...]
    one = tirx.const(1.0, x.dtype)

    def normalised(*index):
        return exp[index] * (one / total[index[:axis] + index[axis + 1 :]])

    return te.compute(x.shape, normalised, name="T_softmax_norm", attrs={"axis": axis})


@tvm.transform.module_pass(opt_level=0, name="SoftmaxByReciprocal")
def softmax_by_reciprocal(mod, _ctx):
    """A float32 ``softmax`` -> TOPI's ``fast_softmax`` with each row multiplied by the reciprocal
    of its sum instead of divided by it (``_fast_softmax_by_reciprocal``): the division was ~15%
    of SAM3's attention softmax over 5,184 tokens on an AVX2 EPYC. Each probability within 1 ulp
    of the divided one (two roundings instead of one); PyTorch's CPU softmax differs from a
    correctly rounded division too, and ``fast_exp`` (68 ulp) dominates both."""
    from tvm.relax import PyExprMutator, expr_functor

    @expr_functor.mutator
    class _Mutator(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if getattr(call.op, "name", None) == "relax.nn.softmax" and relax_type(call.args[0]).dtype == "float32":
                return self.builder_.call_te(_fast_softmax_by_reciprocal, call.args[0], int(call.attrs.axis))
            return call

    mutator = _Mutator(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


@tvm.transform.module_pass(opt_level=0, name="SigmoidThroughExp")
def sigmoid_through_exp(mod, _ctx):
    """``sigmoid(x)`` -> ``1 / (1 + exp(-x))`` and ``silu(x)`` -> ``x * sigmoid(x)`` so spelled,
    on float32: PyTorch's CPU kernels compute them by that formula. Legalised as it is, TVM's
    ``sigmoid`` lowers to libm's scalar ``expf``, one call per element (RT-DETR's encoder: a
    3x3 convolution of 128 channels at 80x80 with SiLU 7.1 ms against 6.0 with ReLU); spelled
    with ``exp``, ``FastMathTransform`` (after this pass) makes it ``fast_exp``, which LLVM
    vectorises, in the convolution's write-back."""
    x = wildcard()
    sigmoid, silu = is_op("relax.sigmoid")(x), is_op("relax.nn.silu")(x)

    def through_exp(value):
        one = relax.const(1.0, "float32")
        return relax.op.divide(one, relax.op.add(one, relax.op.exp(relax.op.negative(value))))

    def rewrite_sigmoid(call, matches):
        return through_exp(matches[x]) if _float32(matches[x]) else call

    def rewrite_silu(call, matches):
        return relax.op.multiply(matches[x], through_exp(matches[x])) if _float32(matches[x]) else call

    return _rewrite_functions(mod, (sigmoid, rewrite_sigmoid), (silu, rewrite_silu))


@tvm.transform.module_pass(opt_level=0, name="GeluThroughErfOrTanh")
def gelu_through_erf_or_tanh(mod, _ctx):
    """``gelu(x)`` -> ``x * (0.5 + erf(x / sqrt(2)) * 0.5)`` and ``gelu_tanh(x)`` -> ``0.5 * x *
    (1 + tanh(sqrt(2 / pi) * x * (1 + 0.044715 * x * x)))`` so spelled, on float32: the formulas
    TVM's legalisation writes, where ``erf`` and ``tanh`` are then TIR intrinsics that lower to
    libm's scalar ``erff``/``tanhf``, one call per element (197 x 3072 activations on the Zen 5
    EPYC: GELU 3.2 ms, its tanh form 1.1, a ReLU 0.03); spelled with relax's ``erf`` and
    ``tanh``, ``FastMathTransform`` (after this pass) makes them TVM's ``fast_erf`` and
    ``fast_tanh``, rational polynomials LLVM vectorises (GELU 0.13 ms). Measured against float64
    (over [-6, 6] and [-12, 12]): ``fast_erf`` within 3.7e-7 (5.5 ulp) and ``fast_tanh`` within
    3.1e-7 (5.2 ulp), PyTorch's float32 ``erf`` and ``tanh`` within 0.7 and 0.5 ulp; GELU so
    computed within 1.5e-6 (PyTorch's own float32 GELU 1.2e-6), its tanh form within 8.6e-7
    (PyTorch's 4.3e-7)."""
    x = wildcard()
    exact, tanh_form = is_op("relax.nn.gelu")(x), is_op("relax.nn.gelu_tanh")(x)

    def const(value: float):
        return relax.const(value, "float32")

    def rewrite_exact(call, matches):
        if not _float32(matches[x]):
            return call
        erf = relax.op.erf(relax.op.multiply(matches[x], const(0.5**0.5)))
        return relax.op.multiply(matches[x], relax.op.add(const(0.5), relax.op.multiply(erf, const(0.5))))

    def rewrite_tanh_form(call, matches):
        if not _float32(matches[x]):
            return call
        v = matches[x]
        cubic = relax.op.add(const(1.0), relax.op.multiply(const(0.044715), relax.op.multiply(v, v)))
        tanh = relax.op.tanh(relax.op.multiply(relax.op.multiply(const(math.sqrt(2.0 / math.pi)), v), cubic))
        return relax.op.multiply(relax.op.multiply(const(0.5), v), relax.op.add(const(1.0), tanh))

    return _rewrite_functions(mod, (exact, rewrite_exact), (tanh_form, rewrite_tanh_form))


def gathers_into_weighted_sums():
    """Gathers grouped with the weighted sums that read them, one kernel each, before
    legalisation (``FuseOpsByPattern``), so that the sum reads each gathered value where it lies
    instead of a gathered copy written and read back:

    - ``sum(take(rows, index) * weight)``: ROI pooling's taps (Mask R-CNN's mask pooling:
      100x14x14x16x256 floats, 80 MB);
    - ``index_tensor(x, i0) * w0 + ... + index_tensor(x, i3) * w3``: the bilinear sampler's four
      taps (Deformable DETR's: four ``[heads, channels, samples]`` copies, 22 MB each per level
      and layer);
    - ``sum(reshape(those taps) * weight)``: deformable attention's weighted sum over a level's
      points taken with them, so that no kernel writes the samples (``[heads, queries x points,
      channels]``, 22 MB a level and layer at Deformable DETR's 512x512) for the sum to read
      (Zen 5 EPYC: Deformable DETR 317.6 -> 294.0 ms, bit-identical; docs/speed.md).

    ``FuseOps`` cannot do it: apache-tvm 0.27 marks a legalised gather opaque, and a reduction
    takes only elementwise and broadcast producers; marked a broadcast, the gather pulls the
    whole index computation before it into the kernel too (ROI pooling alone 47 -> 266 ms).
    Grouped, the kernel computes the same terms in the same order."""
    rows, index, weight = wildcard(), wildcard(), wildcard()
    roi_taps = is_op("relax.sum")(is_op("relax.multiply")(is_op("relax.take")(rows, index), weight))

    def tap():
        return is_op("relax.multiply")(is_op("relax.index_tensor")(wildcard(), wildcard()), wildcard())

    bilinear_taps = is_op("relax.add")(is_op("relax.add")(is_op("relax.add")(tap(), tap()), tap()), tap())
    samples = bilinear_taps | is_op("relax.reshape")(bilinear_taps, wildcard())
    attention = is_op("relax.sum")(is_op("relax.multiply")(samples, wildcard()))
    return relax.transform.FuseOpsByPattern(
        [("weighted_gather", roi_taps), ("attention_gather", attention), ("bilinear_gather", bilinear_taps)],
        bind_constants=False,
        annotate_codegen=False,
    )


def guarded_softmax_kernels():
    """Attention's guarded softmax over keys read back from a packed product, one kernel, before
    legalisation (``FuseOpsByPattern``, after ``softmax_by_reciprocal``):

        scores = reshape(reshape(permute_dims(reshape(packed))))   # the product's panels unpacked
        where(not(max(not(scores == -inf))), 0, softmax(scores))   # PyTorch's all-masked rows -> 0

    ``FuseOps`` makes three kernels of it: the unpacking (a transpose, fused into no reduction),
    the all-masked check and the softmax, each reading the scores. Grouped, ``RowReduction``
    gathers each row from the panels into a row buffer once and runs the check and the softmax
    on it: the same terms in the same order, bit for bit. SAM3's prompt stage on the Zen 5
    EPYC, three kernels against one, interleaved, medians of 8 rounds of 50 calls: 3 + 2 1.487
    -> 1.472 ms, 8 + 4 2.173 -> 2.103. The pattern matches nothing in the one-call build or the
    detectors."""
    packed = wildcard()
    unpacked = is_op("relax.permute_dims")(is_op("relax.reshape")(packed, wildcard()))
    scores = is_op("relax.reshape")(is_op("relax.reshape")(unpacked, wildcard()), wildcard())
    softmax = is_op("relax.call_tir")(wildcard(), is_tuple([scores]))
    valid = is_op("relax.max")(
        is_op("relax.astype")(is_op("relax.logical_not")(is_op("relax.equal")(scores, is_const())))
    )
    masked = is_op("relax.logical_not")(is_op("relax.astype")(valid))
    guarded = is_op("relax.where")(masked, is_const(), softmax)
    return relax.transform.FuseOpsByPattern(
        [("guarded_softmax", guarded)], bind_constants=False, annotate_codegen=False
    )


@tvm.transform.module_pass(opt_level=0, name="PositiveSqueezeAxes")
def positive_squeeze_axes(mod, _ctx):
    """``squeeze(x, axis=[-1])`` -> ``squeeze(x, axis=[rank - 1])``: the same operation, spelled
    so that ``ConvertLayout`` can take the program. apache-tvm 0.27's layout inference for
    squeeze fails on a negative axis (``std::bad_alloc``), whatever the layout of ``x``; RT-DETR's
    query selection squeezes its top-k scores so."""
    x = wildcard()
    pattern = is_op("relax.squeeze")(x)

    def rewrite(call, matches):
        rank = getattr(relax_type(matches[x]), "ndim", -1)
        axes = call.attrs.axis
        if rank < 0 or axes is None or all(int(a) >= 0 for a in axes):
            return call
        return relax.op.squeeze(matches[x], axis=[int(a) % rank for a in axes])

    return _rewrite_functions(mod, (pattern, rewrite))


@tvm.transform.module_pass(opt_level=0, name="ClipAsMinimumMaximum")
def clip_as_minimum_maximum(mod, _ctx):
    """``clip(x, lo, hi)`` -> ``maximum(minimum(x, hi), lo)``: what TVM legalises ``clip`` to
    (``topi.clip``: the same two operations in the same order, so the same numbers, NaN
    included), spelled with operators ``ConvertLayout`` knows. apache-tvm 0.27 has no layout
    rule for ``clip``, so a ReLU6 or hard-swish after a channels-last convolution (MobileNetV2,
    MobileNetV3) ran as a kernel of its own between two transposes back to NCHW and forward
    again, which also kept it out of the convolution's write-back."""
    x = wildcard()
    pattern = is_op("relax.clip")(x, varg_default_wildcard=True)  # the bounds are PrimExprs

    def rewrite(call, matches):
        dtype = str(getattr(relax_type(matches[x]), "dtype", ""))
        bounds = [prim_number(b) for b in call.args[1:]]
        if not dtype.startswith("float") or len(bounds) != 2 or None in bounds:
            return call  # integers (an infinite bound has no integer constant), bounds computed at run time
        lo, hi = (relax.const(b, dtype) for b in bounds)
        return relax.op.maximum(relax.op.minimum(matches[x], hi), lo)

    return _rewrite_functions(mod, (pattern, rewrite))


@tvm.transform.module_pass(opt_level=0, name="ChannelsLastConvolutions")
def channels_last_convolutions(mod, _ctx):
    """Every ``conv2d`` channels-last, its weight HWIO (the Conv rule's layout), by TVM's
    ``ConvertLayout``, which also moves the operators around them to that layout so that the
    transposes between convolutions cancel. Where ``ConvertLayout`` fails on some other operator
    of the program (apache-tvm 0.27: ``sum(x, axes, keepdims)`` then ``squeeze`` of a kept axis,
    "undefined bijective layout"), the program keeps its layouts: it compiles and computes the
    same, its convolutions left to the generic rules (slow: the shipped build's ``conv_im2col``
    leaves them for the Conv rule)."""
    try:
        mod = clip_as_minimum_maximum(positive_squeeze_axes(mod))
        return relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]})(mod)
    except tvm.error.InternalError:  # a TVM check failed (or std::bad_alloc) inside the pass
        return mod


def _packs_a_weight(func: tirx.PrimFunc) -> bool:
    """Whether a kernel copies a weight into the layout it reads (at its root, where the Conv
    rule leaves the copy)."""
    sch = s_tir.Schedule(func)
    return any(LAYOUT_REWRITE in sch.get(block).annotations for block in root_blocks(sch))


@tvm.transform.module_pass(opt_level=0, name="SplitWeightPacking")
def split_weight_packing(mod, _ctx):
    """Kernels that copy a weight into the layout they read (``LAYOUT_REWRITE`` blocks) split in
    two, the copy a function of its own called before the kernel (TVM's
    ``SplitLayoutRewritePreproc``), so that ``FoldConstant`` can evaluate it at build time. TVM's
    pass fails on a kernel without blocks (apache-tvm 0.27: "There should be a compute block if
    there is only one subtree under the root"; RT-DETR has such kernels), so it is shown only
    the kernels that pack."""
    packing = {gv for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc) and _packs_a_weight(f)}
    if not packing:
        return mod
    others = {gv: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc) and gv not in packing}
    split = relax.transform.SplitLayoutRewritePreproc()(
        tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv not in others}, attrs=mod.attrs)
    )
    for gv, func in others.items():
        split[gv] = func
    return split
