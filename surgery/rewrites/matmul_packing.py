"""Matrix products with the right-hand side packed into column panels (speed).

Our matmul kernel (``surgery.schedules.Matmul``) keeps a tile of ``mr x nb`` results in
registers and steps through the reduction, reading ``nb`` consecutive floats of B's row ``k`` at
each step. With B row-major ``[K, N]`` and ``N > nb`` those reads are ``4 * N`` bytes apart
(1 to 20 KB here): a new page every few steps, which the hardware prefetchers do not follow, so
the kernel waits on memory (measured: 78 GFLOP/s for SAM3's ``P @ X`` against 300 packed). This
rewrite stores B as ``nb``-wide column panels, ``Bp[t, k, j] = B[k, t * nb + j]``, and computes

    C[m, t * nb + j] = sum_k A[m, k] * Bp[t, k, j]        # bmm over panels, A shared by all

so every tile streams one contiguous panel. ``nb`` is the tile width the kernel will pick
(``surgery.matmul_tiling.plan_matmul``), so a panel is exactly one column of tiles.

Where B is a weight, TVM folds the packing into a constant at build time: free. Where A is a
weight and B an activation (a convolution as ``kernel @ columns``), the product is left alone:
TVM would fold A's expansion over the panels into one copy of the weight per panel (2.9 GB of
constants for Deformable DETR's backbone at 512x512). Where B is an activation it is a copy per
call, made only when the reduction is long enough (``K >= 64``)
for the strided reads to cost about as much as the copy: the geometry encoder's image features
are packed once per call and shared by all three layers (TVM's common-subexpression
elimination), and the feature map the boxes pool from (72 rows) is packed where the image/prompt
split puts the copy into the image stage, run once per image.

Told which inputs a stage will be computed from (``stage_inputs``: the program is about to be
split by ``surgery.stages.hoist``), the rewrite also packs a right-hand side computed from those
inputs alone and met by a per-call left-hand side, whatever its reduction or batch: the copy
lands in the stage, once per image, and every call streams panels. The geometry encoder's
per-head ``Q_h @ K_h^T`` in its prompt stage reads each head's keys ``[32, 5184]`` 48 floats at
a time, 20 KB apart: 4.0 ms for the 8-head product at 13 queries on a 2-core EPYC, 0.7 ms packed.

The panel width is the tile the kernel picks on the CPU it is built for (``registers`` and
``lanes``: an AVX2-only CPU tiles narrower than AVX-512). A weight whose columns are
no whole number of vectors of that CPU's width (ShuffleNetV2's 116 channels, Mask R-CNN's 91
classes) is packed with zero columns up to the next whole vector where they add at most an eighth
(``matmul_tiling.padded_columns``), and the product's result is sliced back: the kernel's tile is
then built of the CPU's vectors, not of 4-float ones (3.5x faster at 116 columns).

A speed rewrite: TVM converts ``mm``/``addmm``/``bmm`` correctly, so the probe never asks for it;
``surgery.tvm_backend`` applies it last, to the program the shipped build compiles.

Contract: the same products as the original, summed over ``k`` as a matrix product sums them
(the order is the kernel's, as with any BLAS): float64 within 1e-12 relative to the sum of
|terms|, float32 within the usual 1e-5 absolute on unit-scale inputs; products whose B is
already one panel wide, too short a reduction for an activation, or a batch above 1 are left
as they are, and so are products of a weight A with an activation B.
"""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import strategies as st
from torch import Tensor, fx

from ..equivalence.strategies import dtypes, seeded_tensor
from ..matmul_tiling import VECTOR_LANES, VECTOR_REGISTERS, padded_columns, padded_rows, plan_matmul
from .base import GraphRewrite, node_value

aten = torch.ops.aten

CONTRACT = (
    "mm/addmm/bmm whose right-hand side is wider than one register tile: B packed into column "
    "panels [batch, N/nb, K, nb] and multiplied panel by panel (a weight's columns padded with zeros to "
    "whole vectors where that adds at most an eighth, the result sliced back); the same products summed over k "
    "(float64: within 1e-12 relative to the sum of |terms|; float32: 1e-5 absolute on unit-scale "
    "inputs); a batch above 1 only where B is computed from stage inputs alone; other "
    "activations only for reductions of 64 or more, batch 1, and never when A is a weight; "
    "anything else is left as it is"
)

MIN_ACTIVATION_DEPTH = 64  # shorter reductions read an activation's strided rows about as fast as a copy


def panel_width(
    rows: int, cols: int, depth: int, registers: int = VECTOR_REGISTERS, lanes: int = VECTOR_LANES
) -> int | None:
    """The kernel's tile width for this product on a CPU with ``registers`` vector registers of
    ``lanes`` floats, when B is wider than it (else None): planned for the rows the kernel
    computes, ``padded_rows``."""
    rows = padded_rows(1, rows, cols, depth, registers, lanes)
    plan = plan_matmul(1, rows, cols, depth, threads=1, registers=registers, lanes=lanes)
    if plan is None or cols <= plan.nr or cols % plan.nr:
        return None
    return plan.nr


def packed_matmul(a: Tensor, b: Tensor, nb: int) -> Tensor:
    """``a @ b`` for ``a [M, K]``, ``b [K, N]``, computed panel by panel (``N % nb == 0``)."""
    k, n = b.shape
    m = a.shape[0]
    panels = b.reshape(k, n // nb, nb).permute(1, 0, 2).contiguous()  # [T, K, nb]
    shared = a.unsqueeze(0).expand(n // nb, m, k)  # [T, M, K] (a view: every panel reads the same a)
    out = torch.bmm(shared, panels)  # [T, M, nb]
    return out.permute(1, 0, 2).reshape(m, n)  # [M, N]


def packed_bmm(a: Tensor, b: Tensor, nb: int) -> Tensor:
    """``torch.bmm(a, b)`` for ``a [B, M, K]``, ``b [B, K, N]``, panel by panel (``N % nb == 0``)."""
    batch, k, n = b.shape
    m = a.shape[1]
    panels = b.reshape(batch, k, n // nb, nb).permute(0, 2, 1, 3).reshape(-1, k, nb)  # [B*T, K, nb]
    shared = a.unsqueeze(1).expand(batch, n // nb, m, k).reshape(-1, m, k)  # [B*T, M, K]
    out = torch.bmm(shared, panels)  # [B*T, M, nb]
    return out.reshape(batch, n // nb, m, nb).permute(0, 2, 1, 3).reshape(batch, m, n)  # [B, M, N]


def _weight_nodes(graph: fx.Graph, weights: set[str]) -> set[fx.Node]:
    """The nodes computed from the placeholders named in ``weights`` and constants alone (layouts
    of weights), found in one pass in graph order: a backbone's chain of thousands of nodes is
    too deep to recurse."""
    found: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            derived = node.name in weights
        else:
            derived = node.op == "get_attr" or (
                node.op == "call_function" and all(i in found for i in node.all_input_nodes)
            )
        if derived:
            found.add(node)
    return found


def _operands(node: fx.Node):
    """(bias, a, b, batch) of a product this rewrite handles (batch None for mm/addmm), else None."""
    if node.target is aten.mm.default:
        return None, node.args[0], node.args[1], None
    if node.target is aten.addmm.default and len(node.args) == 3 and not node.kwargs:
        return node.args[0], node.args[1], node.args[2], None
    if node.target is aten.bmm.default:
        a, b = node.args
        va, vb = node_value(a), node_value(b)
        if va is not None and vb is not None and va.shape[0] == vb.shape[0]:
            return None, a, b, int(va.shape[0])
    return None


def _packed_bmm_nodes(graph: fx.Graph, a: fx.Node, b: fx.Node, batch: int, m: int, k: int, n: int, nb: int):
    """The nodes of ``packed_bmm(a, b, nb)`` (batch 1: A's expansion over the panels stays a view)."""
    call = lambda op, *args: graph.call_function(op, tuple(args))  # noqa: E731
    panels = call(aten.reshape.default, b, [batch, k, n // nb, nb])  # [B, K, T, nb]
    panels = call(aten.permute.default, panels, [0, 2, 1, 3])  # [B, T, K, nb]
    panels = graph.call_function(aten.clone.default, (panels,), {"memory_format": torch.contiguous_format})
    panels = call(aten.view.default, panels, [batch * (n // nb), k, nb])  # [B*T, K, nb]
    if batch == 1:
        shared = call(aten.expand.default, call(aten.view.default, a, [1, m, k]), [n // nb, m, k])  # [T, M, K]
    else:
        shared = call(aten.expand.default, call(aten.unsqueeze.default, a, 1), [batch, n // nb, m, k])
        shared = call(aten.reshape.default, shared, [batch * (n // nb), m, k])  # [B*T, M, K]
    out = call(aten.bmm.default, shared, panels)  # [B*T, M, nb]
    out = call(aten.view.default, out, [batch, n // nb, m, nb])  # [B, T, M, nb]
    return call(aten.reshape.default, call(aten.permute.default, out, [0, 2, 1, 3]), [batch, m, n])  # [B, M, N]


def pack(
    graph: fx.Graph,
    weights: set[str],
    stage_inputs: frozenset[str] = frozenset(),
    registers: int = VECTOR_REGISTERS,
    lanes: int = VECTOR_LANES,
) -> int:
    """Rewrite every qualifying product in ``graph`` (core ATen); returns how many."""
    done = 0
    weight_nodes = _weight_nodes(graph, weights)
    staged_nodes = _weight_nodes(graph, weights | set(stage_inputs)) if stage_inputs else weight_nodes
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        operands = _operands(node)
        if operands is None:
            continue
        bias, a, b, batch = operands
        va, vb = node_value(a), node_value(b)
        if va is None or vb is None or va.dtype != vb.dtype or not va.dtype.is_floating_point:
            continue
        m, k = va.shape[-2:]
        n = vb.shape[-1]
        # a weight's columns padded to whole vectors of the CPU's width (zeros, at build time)
        padded = padded_columns(n, lanes) if batch is None and b in weight_nodes else n
        nb = panel_width(m, padded, k, registers, lanes)
        # B computed once per stage, A per call: the copy runs in the stage, never per call
        staged = b in staged_nodes and b not in weight_nodes and a not in staged_nodes
        if nb is None or ((batch or 1) > 1 and not staged):
            continue
        if not staged and b not in weight_nodes and (k < MIN_ACTIVATION_DEPTH or a in weight_nodes):
            continue
        with graph.inserting_before(node):
            if batch is None:
                if padded > n:
                    b = graph.call_function(aten.constant_pad_nd.default, (b, [0, padded - n]))  # [K, N']
                out = _packed_bmm_nodes(graph, a, b, 1, m, k, padded, nb)
                out = graph.call_function(aten.view.default, (out, [m, padded]))  # [M, N']
                if padded > n:
                    out = graph.call_function(aten.slice.Tensor, (out, 1, 0, n))  # [M, N]
                if bias is not None:
                    out = graph.call_function(aten.add.Tensor, (out, bias))
            else:
                out = _packed_bmm_nodes(graph, a, b, batch, m, k, n, nb)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        done += 1
    return done


class MatmulPacking(GraphRewrite):
    """``stage_inputs``: the inputs of a stage the program will be split into (see the module's
    docstring); ``registers``/``lanes``: the vector register file of the CPU the kernels are
    built for (default: AVX-512's)."""

    name = "matmul_packing"
    summary = "mm/addmm/bmm with a wide right-hand side -> column panels, one bmm over them (speed)"
    contract = CONTRACT

    def __init__(self, stage_inputs=(), registers: int = VECTOR_REGISTERS, lanes: int = VECTOR_LANES):
        self.stage_inputs = frozenset(stage_inputs)
        self.registers, self.lanes = registers, lanes

    @staticmethod
    def cases(dtype=None):
        return packing_cases(dtype)

    def rewrite_graph(self, graph, program):
        signature = program.graph_signature
        weights = (
            set(signature.inputs_to_parameters)
            | set(signature.inputs_to_buffers)
            | set(getattr(signature, "inputs_to_lifted_tensor_constants", {}))
        )
        return {"matrix products": pack(graph, weights, self.stage_inputs, self.registers, self.lanes)}


# ----------------------------------------------------------------------------- strategy


@dataclasses.dataclass
class PackingCase:
    """``a @ b`` (``bias + a @ b`` with a bias), b a weight or an activation; with b an
    activation, a may be a weight. With ``staged``, ``torch.bmm(a, b)`` on ``batch`` matrices
    where b is computed from an input named ``stage`` and the rewrite is told that a stage will
    be computed from it."""

    a: Tensor  # [M, K], or [B, M, K] when staged
    b: Tensor  # [K, N], or [B, K, N] when staged
    bias: Tensor | None  # [N]
    b_is_weight: bool
    a_is_weight: bool = False
    staged: bool = False

    @property
    def input(self):
        return self.a

    def rewriter(self) -> MatmulPacking:
        """The rewrite as a pipeline would configure it for this case."""
        return MatmulPacking(stage_inputs=("stage",) if self.staged else ())

    def reference(self) -> Tensor:
        if self.staged:
            return torch.bmm(self.a, torch.tanh(self.b))
        out = self.a @ self.b
        return out if self.bias is None else out + self.bias

    def columns(self) -> int:
        """The columns the rewrite computes: a weight's padded to whole vectors where that is cheap."""
        n = self.b.shape[-1]
        return padded_columns(n) if self.b_is_weight and not self.staged else n

    def packs(self) -> bool:
        """Whether the rewrite replaces this product."""
        m, k = self.a.shape[-2:]
        if panel_width(m, self.columns(), k) is None:
            return False
        return self.staged or self.b_is_weight or (k >= MIN_ACTIVATION_DEPTH and not self.a_is_weight)

    def rewritten(self) -> Tensor:
        if not self.packs():
            return self.reference()  # what the rewrite leaves in place
        (m, k), n, padded = self.a.shape[-2:], self.b.shape[-1], self.columns()
        nb = panel_width(m, padded, k)
        if self.staged:
            return packed_bmm(self.a, torch.tanh(self.b), nb)
        out = packed_matmul(self.a, torch.nn.functional.pad(self.b, (0, padded - n)), nb)[:, :n]
        return out if self.bias is None else out + self.bias

    def module(self) -> torch.nn.Module:
        if self.staged:
            return _StagedProduct()
        if self.b_is_weight:
            return _Product(self.b, self.bias)
        return _Product(None, self.bias, self.a if self.a_is_weight else None)

    def args(self) -> tuple:
        if self.staged:
            return (self.b, self.a)
        if self.b_is_weight:
            return (self.a,)
        return (self.b,) if self.a_is_weight else (self.a, self.b)

    @property
    def scale(self) -> float:
        bias = 0.0 if self.bias is None else float(self.bias.abs().max())
        return float((self.a.abs() @ self.b.abs()).max()) + bias


class _Product(torch.nn.Module):
    """``a @ b`` (plus bias) with b, or a, held as a parameter; the other operand(s) are inputs."""

    def __init__(self, weight: Tensor | None, bias: Tensor | None, left_weight: Tensor | None = None):
        super().__init__()
        param = lambda t: None if t is None else torch.nn.Parameter(t.clone(), requires_grad=False)  # noqa: E731
        self.weight, self.bias, self.left_weight = param(weight), param(bias), param(left_weight)

    def forward(self, *operands):
        if self.left_weight is not None:
            a, b = self.left_weight, operands[0]
        else:
            a, b = operands[0], (self.weight if self.weight is not None else operands[1])
        return torch.mm(a, b) if self.bias is None else torch.addmm(self.bias, a, b)


class _StagedProduct(torch.nn.Module):
    """``bmm(a, tanh(stage))``: the right-hand side computed from the input ``stage`` alone."""

    def forward(self, stage, a):
        return torch.bmm(a, torch.tanh(stage))


def packing_cases(dtype=None):
    """Hypothesis strategy of ``PackingCase``: 1-16 rows, reductions of 1-300 (both sides of the
    activation threshold, and right at it), 16-400 columns (one panel, several panels, widths a
    weight is padded from to whole vectors, 116 and 232, and widths that are no multiple of a
    vector, which the rewrite must leave alone), with and without bias, B a
    weight (parameter) or an activation (input), and with B an activation, A a weight (a
    convolution's kernel @ columns, left alone); and batched products of 1-4 matrices whose B
    is computed from a stage's input (packed at any reduction)."""

    @st.composite
    def cases(draw):
        dt = draw(dtypes) if dtype is None else dtype
        m = draw(st.integers(1, 16))
        k = draw(st.one_of(st.integers(1, 300), st.sampled_from([MIN_ACTIVATION_DEPTH - 1, MIN_ACTIVATION_DEPTH])))
        n = draw(st.one_of(st.sampled_from([16, 48, 64, 96, 116, 128, 192, 232, 256, 384]), st.integers(1, 400)))
        seed = draw(st.integers(0, 2**31 - 1))
        if draw(st.booleans()):
            batch = draw(st.integers(1, 4))
            a = seeded_tensor((batch, m, k), dt, seed)  # [B, M, K]
            b = seeded_tensor((batch, k, n), dt, seed + 1) / k**0.5  # [B, K, N]
            return PackingCase(a, b, None, b_is_weight=False, staged=True)
        a = seeded_tensor((m, k), dt, seed)  # [M, K]
        b = seeded_tensor((k, n), dt, seed + 1) / k**0.5  # [K, N], scaled as a layer's weight
        bias = seeded_tensor((n,), dt, seed + 2) if draw(st.booleans()) else None  # [N]
        b_is_weight = draw(st.booleans())
        return PackingCase(a, b, bias, b_is_weight, a_is_weight=not b_is_weight and draw(st.booleans()))

    return cases()
