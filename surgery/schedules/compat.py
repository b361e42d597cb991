"""What differs between the apache-tvm releases we run on (0.25, 0.26, 0.27), in one place."""

from __future__ import annotations

import tvm

# A TIR expression: ``tvm.ir.Expr`` in 0.27, ``tvm.ir.PrimExpr`` before.
PrimExpr = getattr(tvm.ir, "Expr", None) or tvm.ir.PrimExpr

# A relax constant: ``tvm.ir.expr.Constant`` in 0.27, ``tvm.relax.Constant`` before.
RelaxConstant = getattr(tvm.relax, "Constant", None) or tvm.ir.expr.Constant


def stmt_simplify():
    """TIR's ``StmtSimplify`` pass (``tvm.s_tir.transform`` in 0.27, ``tvm.tirx.transform`` before)."""
    try:
        from tvm.s_tir.transform import StmtSimplify  # 0.27
    except ImportError:
        from tvm.tirx.transform import StmtSimplify  # 0.25, 0.26
    return StmtSimplify()


def analyzer():
    """A fresh arithmetic analyzer (``tvm.sym.analyzer`` in 0.27, ``tvm.arith`` before)."""
    try:
        from tvm.sym.analyzer import Analyzer  # apache-tvm 0.27
    except ImportError:
        from tvm.arith import Analyzer  # earlier releases
    return Analyzer()


def region_buffer(region):
    """The buffer a read region covers (``TensorRegion.source`` in 0.27, ``BufferRegion.buffer`` before)."""
    return region.source if hasattr(region, "source") else region.buffer


def param_buffers(func) -> list:
    """The buffers a kernel is given (its parameters in 0.27, ``buffer_map``'s values before)."""
    return list(func.buffer_map.values()) if hasattr(func, "buffer_map") else list(func.params)


def loaded_buffer_name(expr) -> str | None:
    """The name of the buffer a load reads (``TensorLoad.source`` in 0.27, ``BufferLoad.buffer`` before)."""
    if type(expr).__name__ not in ("TensorLoad", "BufferLoad"):
        return None
    return getattr(accessed_buffer(expr), "name", None)


def dtype_name(expr) -> str:
    """A TIR expression's data type as text (``.dtype`` before 0.27, its type ``.ty`` from 0.27)."""
    dtype = getattr(expr, "dtype", None)
    return str(dtype if dtype is not None else getattr(expr, "ty", ""))


def constant_array(const):
    """A relax constant's value as a numpy array (``.value`` in 0.27, ``.data`` before)."""
    value = getattr(const, "value", None)
    return (value if value is not None else const.data).numpy()


def prim_number(expr) -> int | float | None:
    """The number of a constant scalar argument of a relax call (``relax.clip``'s bounds): an
    ``IntImm``/``FloatImm`` in 0.27, or a ``PrimValue`` holding one; None for anything else (a
    bound computed at run time)."""
    value = getattr(expr, "value", None)
    value = getattr(value, "value", value)
    return value if isinstance(value, (int, float)) else None


def relax_type(expr):
    """A relax expression's type (``.ty`` in 0.27, ``.struct_info`` before)."""
    return getattr(expr, "ty", None) or getattr(expr, "struct_info", None)


def iter_map_simplify(indices, domains: dict):
    """TVM's iterator-map simplification of ``indices`` over ``domains`` (var -> Range), as
    ``FlattenBuffer`` applies it (``tvm.sym`` in 0.27, ``tvm.arith`` before)."""
    try:
        from tvm.sym import iter_map_simplify as simplify  # 0.27
    except ImportError:
        from tvm.arith import iter_map_simplify as simplify  # 0.25, 0.26
    return list(simplify(indices, domains))


def accessed_buffer(expr):
    """The buffer a load or store accesses (``.source`` in 0.27, ``.buffer`` before), or None."""
    buffer = getattr(expr, "source", None)
    return buffer if buffer is not None else getattr(expr, "buffer", None)
