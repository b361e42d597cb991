"""Relax-level rewrites our pipeline runs before legalisation."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from .compat import relax_type


def _static_shape(expr) -> list[int] | None:
    """The static shape of a relax expression, or None when any dimension is symbolic."""
    dims = getattr(getattr(relax_type(expr), "shape", None), "values", None)
    if dims is None or not all(isinstance(v, tirx.IntImm) for v in dims):
        return None
    return [int(v) for v in dims]


@tvm.transform.module_pass(opt_level=0, name="AbsorbMatmulBroadcasts")
def absorb_matmul_broadcasts(mod, _ctx):
    """``matmul(broadcast_to(x), y)`` -> ``matmul(x, y)`` where only batch dimensions were
    broadcast (relax's matmul broadcasts them itself). PyTorch's ``bmm`` needs equal batches, so
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

    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gv] = rewrite_call(pattern, rewrite, func)
    return mod
