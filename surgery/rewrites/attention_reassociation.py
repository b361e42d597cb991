"""Cross-attention with few queries: reassociate the key/value projections onto the queries.

In SAM3's geometry encoder ~6 prompt tokens attend to 5,184 image tokens. Multi-head attention
projects every image token (``K = X Wk^T + bk``, ``V = X Wv^T + bv``: 2 x 5184 x 256 x 256
multiply-adds per layer, ~95% of the model's arithmetic) and then meets only q = 6 queries.
Reassociating the products moves the projections onto the query side (per head h, with the
head's weight rows ``Wk_h``, ``Wv_h`` and softmax weights ``P_h``):

    scores_h = s Q_h K_h^T = s (Q_h Wk_h) X^T + s Q_h bk_h                 # [q, n]
    out_h    = P_h V_h     = (P_h X) Wv_h^T + rowsum(P_h) bv_h              # [q, d]

which costs H*q*E*n instead of E*E*n per product (H heads, E = H*d): 6x less work here. The
row sum is kept explicit (not assumed 1) because fully masked rows are zeros after PyTorch's
masking, not a distribution.

The rewrite works on the core-ATen graph ``torch.export`` gives for ``nn.MultiheadAttention``
and SAM3's attention: a ``bmm`` whose key (or value) operand is an ``addmm(b, X, W^T)``
followed only by layout operators (view, permute, expand, clone) and a scalar multiply. The
layout chain is not pattern-matched by op names alone: it is *replayed on an index tensor* and
accepted only when it is exactly the head split ``[n*B, H*d] -> [B*H, d, n]`` (keys) or
``[B*H, n, d]`` (values). Anything else is left alone. It is applied only where it saves work
(``H * q < E``), and never together with the image-stage split (``surgery.stages``), which
hoists the projections out of the per-prompt path instead.

Contract: the same products summed in another order; float64 within 1e-12 relative to the
sum of |terms|, float32 within the usual 1e-5 absolute on unit-scale inputs (property tests on
``nn.MultiheadAttention`` and the whole geometry encoder).
"""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import strategies as st
from torch import fx

from ..equivalence.strategies import dtypes, seeded_tensor
from .base import LAYOUT_OPS, GraphRewrite, node_value

aten = torch.ops.aten

CONTRACT = (
    "multi-head attention whose keys/values are a projection of many tokens met by few queries "
    "(heads x queries < embedding width): projections reassociated onto the queries; same terms "
    "summed in another order (float64: 1e-12 relative to the sum of |terms|; float32: 1e-5 absolute "
    "on unit-scale inputs); fully masked rows stay zero; anything else is left as it is"
)


@dataclasses.dataclass
class _Projection:
    """``bmm`` operand = layout(scale * addmm(bias, tokens, weight^T))."""

    bias: fx.Node | None
    tokens: fx.Node  # [n*B, E]
    weight: fx.Node  # [E, E] (out, in)
    chain: list[fx.Node]  # layout/scale nodes from the addmm's output to the bmm operand
    scale: float


def _projection(operand: fx.Node) -> _Projection | None:
    chain, node, scale = [], operand, 1.0
    while isinstance(node, fx.Node) and node.op == "call_function":
        if node.target in LAYOUT_OPS:
            chain.append(node)
            node = node.args[0]
        elif node.target is aten.mul.Scalar and isinstance(node.args[1], (int, float)):
            scale *= float(node.args[1])
            chain.append(node)
            node = node.args[0]
        elif node.target in (aten.addmm.default, aten.mm.default):
            break
        else:
            return None
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target is aten.addmm.default:
        if len(node.args) > 3 or node.kwargs:  # beta/alpha other than 1
            return None
        bias, tokens, weight_t = node.args
    elif node.target is aten.mm.default:
        bias, (tokens, weight_t) = None, node.args
    else:
        return None
    if not (
        isinstance(weight_t, fx.Node) and weight_t.target is aten.permute.default and list(weight_t.args[1]) == [1, 0]
    ):
        return None
    return _Projection(bias, tokens, weight_t.args[0], list(reversed(chain)), scale)


def _replay(chain: list[fx.Node], probe: torch.Tensor) -> torch.Tensor:
    """Run the layout chain on ``probe`` (scalar multiplies skipped): where each element ends up."""
    for node in chain:
        if node.target is aten.mul.Scalar:
            continue
        probe = node.target(probe, *node.args[1:], **node.kwargs)
    return probe


def _head_split(nB: int, E: int, B: int, H: int, keys: bool) -> torch.Tensor:
    """Index of element [m*B + b, h*d + e] of the projection at each position of the head-split
    operand: ``[B*H, d, n]`` for keys (transposed), ``[B*H, n, d]`` for values."""
    n, d = nB // B, E // H
    index = torch.arange(nB * E, dtype=torch.float64).view(n, B, H, d)  # [n, B, H, d]
    index = index.permute(1, 2, 3, 0) if keys else index.permute(1, 2, 0, 3)  # [B, H, d, n] / [B, H, n, d]
    return index.reshape(B * H, *index.shape[2:])


def _matches(projection: _Projection, operand_shape, keys: bool) -> tuple[int, int] | None:
    """(B, H) when the chain is exactly the multi-head split of the projection, else None."""
    tokens, weight = node_value(projection.tokens), node_value(projection.weight)
    if tokens is None or weight is None or tokens.dim() != 2 or weight.dim() != 2 or weight.shape[0] != weight.shape[1]:
        return None
    nB, E = tokens.shape
    G = operand_shape[0]
    d = operand_shape[1] if keys else operand_shape[2]
    if E % d or G % (E // d):
        return None
    H = E // d
    B = G // H
    if nB % B:
        return None
    probe = torch.arange(nB * E, dtype=torch.float64).view(nB, E)
    try:
        replayed = _replay(projection.chain, probe)
    except Exception:  # noqa: BLE001 - a chain we can't replay is not ours to rewrite
        return None
    expected = _head_split(nB, E, B, H, keys)
    if replayed.shape != expected.shape or not torch.equal(replayed, expected):
        return None
    return B, H


class _Builder:
    """Inserts core-ATen nodes before a given node."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph

    def __call__(self, op, *args):
        return self.graph.call_function(op, tuple(args))

    def contiguous(self, x):
        return self.graph.call_function(aten.clone.default, (x,), {"memory_format": torch.contiguous_format})

    def tokens_batch_first(self, tokens, n, B, E):
        """[n*B, E] (sequence first) -> [B, n, E]; a view when B == 1."""
        if B == 1:
            return self(aten.view.default, tokens, [1, n, E])
        return self(aten.permute.default, self(aten.view.default, tokens, [n, B, E]), [1, 0, 2])

    def to_heads_first(self, x, B, H, rows, cols):
        """[B, H*rows, cols] -> [H, B*rows, cols] (contiguous)."""
        x = self(aten.view.default, x, [B, H, rows, cols])
        x = self(aten.permute.default, x, [1, 0, 2, 3])  # [H, B, rows, cols]
        x = self.contiguous(x)
        return self(aten.view.default, x, [H, B * rows, cols])

    def to_batch_first(self, x, B, H, rows, cols):
        """[H, B*rows, cols] -> [B*H, rows, cols] (contiguous)."""
        x = self(aten.view.default, x, [H, B, rows, cols])
        x = self(aten.permute.default, x, [1, 0, 2, 3])  # [B, H, rows, cols]
        x = self.contiguous(x)
        return self(aten.view.default, x, [B * H, rows, cols])


def _rewrite_scores(graph, bmm, q3, key: _Projection, B, H, q, d, n, E):
    b = _Builder(graph)
    with graph.inserting_before(bmm):
        qh = b.contiguous(b(aten.permute.default, b(aten.view.default, q3, [B, H, q, d]), [1, 0, 2, 3]))
        qh = b(aten.view.default, qh, [H, B * q, d])  # [H, B*q, d]
        w = b(aten.view.default, key.weight, [H, d, E])  # [H, d, E]
        qw = b(aten.bmm.default, qh, w)  # [H, B*q, E]
        qw = b(aten.view.default, qw, [H, B, q, E])
        qw = b.contiguous(b(aten.permute.default, qw, [1, 0, 2, 3]))  # [B, H, q, E]
        qw = b(aten.view.default, qw, [B, H * q, E])  # [B, H*q, E]
        # (Q Wk) @ tokens^T: the few query rows are the product's rows, the n tokens its columns,
        # so the product's columns are as many as the tokens whatever H*q is (matmul_packing
        # then lays tokens^T out in column panels, once for all layers)
        tokens_t = b(aten.permute.default, b.tokens_batch_first(key.tokens, n, B, E), [0, 2, 1])  # [B, E, n]
        scores = b(aten.bmm.default, qw, tokens_t)  # [B, H*q, n]
        if key.bias is not None:
            bias = b(aten.view.default, key.bias, [H, d, 1])  # [H, d, 1]
            qb = b(aten.bmm.default, qh, bias)  # [H, B*q, 1]
            qb = b(aten.view.default, qb, [H, B, q, 1])
            qb = b.contiguous(b(aten.permute.default, qb, [1, 0, 2, 3]))  # [B, H, q, 1]
            scores = b(aten.add.Tensor, scores, b(aten.view.default, qb, [B, H * q, 1]))  # [B, H*q, n]
        if key.scale != 1.0:
            scores = b(aten.mul.Scalar, scores, key.scale)
        scores = b(aten.view.default, b.contiguous(scores), [B * H, q, n])  # [B*H, q, n]
    bmm.replace_all_uses_with(scores)
    graph.erase_node(bmm)


def _rewrite_values(graph, bmm, p3, value: _Projection, B, H, q, d, n, E):
    b = _Builder(graph)
    with graph.inserting_before(bmm):
        p = b(aten.view.default, p3, [B, H * q, n])  # [B, H*q, n]
        px = b(aten.bmm.default, p, b.tokens_batch_first(value.tokens, n, B, E))  # [B, H*q, E]
        pxh = b.to_heads_first(px, B, H, q, E)  # [H, B*q, E]
        wt = b(aten.permute.default, b(aten.view.default, value.weight, [H, d, E]), [0, 2, 1])  # [H, E, d]
        out = b(aten.bmm.default, pxh, wt)  # [H, B*q, d]
        if value.bias is not None:
            rows = b(aten.sum.dim_IntList, p3, [-1], True)  # [B*H, q, 1]
            rows = b(aten.view.default, rows, [B, H * q, 1])
            rows = b.to_heads_first(rows, B, H, q, 1)  # [H, B*q, 1]
            bias = b(aten.view.default, value.bias, [H, 1, d])  # [H, 1, d]
            out = b(aten.add.Tensor, out, b(aten.mul.Tensor, rows, bias))  # [H, B*q, d]
        if value.scale != 1.0:
            out = b(aten.mul.Scalar, out, value.scale)
        out = b.to_batch_first(out, B, H, q, d)  # [B*H, q, d]
    bmm.replace_all_uses_with(out)
    graph.erase_node(bmm)


def reassociate(graph: fx.Graph) -> dict[str, int]:
    """Rewrite every qualifying attention ``bmm`` in ``graph`` (core ATen, lifted parameters)."""
    done = {"scores": 0, "values": 0}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.bmm.default:
            continue
        left, right = node.args
        lv, rv = node_value(left), node_value(right)
        if lv is None or rv is None or lv.dtype != rv.dtype or not lv.dtype.is_floating_point:
            continue
        _G, q = lv.shape[0], lv.shape[1]
        for keys, operand in ((True, right), (False, right)):
            projection = _projection(operand)
            if projection is None:
                continue
            found = _matches(projection, tuple(rv.shape), keys)
            if found is None:
                continue
            B, H = found
            E = node_value(projection.weight).shape[0]
            d = E // H
            n = node_value(projection.tokens).shape[0] // B
            if H * q >= E:  # reassociation would cost more than the projection saves
                break
            if keys:
                _rewrite_scores(graph, node, left, projection, B, H, q, d, n, E)
                done["scores"] += 1
            else:
                _rewrite_values(graph, node, left, projection, B, H, q, d, n, E)
                done["values"] += 1
            break
    return {k: v for k, v in done.items() if v}


class AttentionReassociation(GraphRewrite):
    name = "attention_reassociation"
    summary = "few-query attention: key/value projections reassociated onto the queries (speed)"
    contract = CONTRACT

    @staticmethod
    def cases(dtype=None):
        return attention_cases(dtype)

    def rewrite_graph(self, graph, program):
        return {f"aten.bmm.default ({kind})": count for kind, count in reassociate(graph).items()}


# ----------------------------------------------------------------------------- strategy


@dataclasses.dataclass
class AttentionCase:
    """``nn.MultiheadAttention`` (sequence first) with q queries over n tokens."""

    query: torch.Tensor  # [q, B, E]
    tokens: torch.Tensor  # [n, B, E]
    mask: torch.Tensor | None  # [B, n] key padding (True = ignore), may mask whole rows
    heads: int
    seed: int

    @property
    def input(self):
        return self.query

    def module(self) -> torch.nn.Module:
        return _Attention(self.tokens.shape[-1], self.heads, self.seed, self.query.dtype, self.mask is not None)

    def args(self) -> tuple:
        return (self.query, self.tokens) + ((self.mask,) if self.mask is not None else ())

    def reference(self) -> torch.Tensor:
        with torch.no_grad():
            return self.module()(*self.args())

    def rewritten(self) -> torch.Tensor:
        program = torch.export.export(self.module(), self.args())
        return AttentionReassociation()(program).program.module()(*self.args())

    @property
    def scale(self) -> float:
        return max(1.0, float(self.query.abs().max()), float(self.tokens.abs().max()))


class _Attention(torch.nn.Module):
    def __init__(self, E: int, heads: int, seed: int, dtype, masked: bool):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.attn = torch.nn.MultiheadAttention(E, heads, dtype=dtype).eval()
            with torch.no_grad():  # non-zero biases, so their reassociated terms are exercised
                self.attn.in_proj_bias.uniform_(-1, 1)
                self.attn.out_proj.bias.uniform_(-1, 1)
        self.masked = masked

    def forward(self, query, tokens, mask=None):
        out, _ = self.attn(query, tokens + 0.5, tokens, key_padding_mask=mask, need_weights=False)
        return out


def attention_cases(dtype=None):
    """Hypothesis strategy of ``AttentionCase``: 1-6 queries over 5-40 tokens, batch 1-3, 1-4
    heads of width 4-8, with and without key padding masks (including fully masked rows)."""

    @st.composite
    def cases(draw):
        dt = draw(dtypes) if dtype is None else dtype
        heads, width = draw(st.integers(1, 4)), draw(st.sampled_from([4, 8]))
        E = heads * width
        q, n, B = draw(st.integers(1, max(1, E // heads - 1))), draw(st.integers(5, 40)), draw(st.integers(1, 3))
        seed = draw(st.integers(0, 2**31 - 1))
        query = seeded_tensor((q, B, E), dt, seed)  # [q, B, E]
        tokens = seeded_tensor((n, B, E), dt, seed + 1)  # [n, B, E]
        mask = None
        if draw(st.booleans()):
            valid = [draw(st.integers(0, n)) for _ in range(B)]
            mask = torch.arange(n)[None, :] >= torch.tensor(valid)[:, None]  # [B, n]
        return AttentionCase(query, tokens, mask, heads, seed)

    return cases()
