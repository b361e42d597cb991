"""Which kernels may be compiled with fused multiply-add.

The shipped target turns LLVM's a*b+c contraction off (see ``surgery.tvm_backend.host_target``):
where a value feeds a floor, a comparison or a select, one rounding instead of two can move it
across the step (the whole-model test found such a case in ROI pooling's sample positions). A
sum of products with no such step after it (a matmul's accumulation, a layer norm's or softmax's
row sums) only changes rounding the way any BLAS's order of accumulation does. So the kernels our
Matmul and RowReduction rules schedule are compiled for a target with FMA (which on x86 also
brings AVX-512 back) when no step function in them reads a contractible value (one computed with
a*b+c in that kernel); everything else keeps it off. One exception: the range reduction inside
TVM's fast_exp, floor(x * log2(e) + 0.5), may round either way at a tie without changing exp's
value beyond its polynomial's error. TVM compiles all CPU kernels of a module with one LLVM
target, so ``surgery.tvm_backend.build`` compiles the kernels marked ``FMA_ANNOTATION`` as a
library of their own and links it into the executable.
"""

from __future__ import annotations

from tvm import s_tir, tirx

from .analysis import has_root_block, root_blocks
from .compat import PrimExpr, dtype_name, loaded_buffer_name

FMA_ANNOTATION = "surgery.fma_contractible"
_STEP_CALLS = {f"{ns}.{op}" for ns in ("tirx", "tir") for op in ("floor", "ceil", "round", "trunc", "nearbyint")}
_EXACT_RANGE_REDUCTION = ("T_fast_exp",)  # blocks whose steps round either way harmlessly


def _visit(expr, fn) -> None:
    """Call ``fn`` on every node of a TIR expression, children first."""
    for field in ("a", "b", "value", "condition", "true_value", "false_value"):
        child = getattr(expr, field, None)
        if isinstance(child, PrimExpr):
            _visit(child, fn)
    for field in ("args", "indices"):
        for child in getattr(expr, field, None) or ():
            if isinstance(child, PrimExpr):
                _visit(child, fn)
    fn(expr)


def _is_float(expr) -> bool:
    return dtype_name(expr).startswith(("float", "bfloat"))


def _steps(expr) -> list:
    """The float arguments of the step functions in ``expr``: floor/ceil/round, comparisons of
    floats, float-to-integer casts."""
    found = []

    def visit(node):
        if type(node).__name__ == "Call" and getattr(getattr(node, "op", None), "name", "") in _STEP_CALLS:
            found.extend(node.args)
        elif isinstance(node, (tirx.LT, tirx.LE, tirx.GT, tirx.GE, tirx.EQ, tirx.NE)) and _is_float(node.a):
            found.extend([node.a, node.b])
        elif isinstance(node, tirx.Cast) and _is_float(node.value) and not _is_float(node):
            found.append(node.value)

    _visit(expr, visit)
    return found


def _contractible(expr, contracted: set) -> bool:
    """``expr`` holds a float a*b+c, or reads a buffer computed with one."""
    found = False

    def visit(node):
        nonlocal found
        if (
            isinstance(node, (tirx.Add, tirx.Sub))
            and _is_float(node)
            and any(isinstance(x, tirx.Mul) for x in (node.a, node.b))
        ):
            found = True
        elif loaded_buffer_name(node) in contracted:
            found = True

    _visit(expr, visit)
    return found


def contraction_safe(func: tirx.PrimFunc) -> bool:
    """No step function in the kernel reads a value that FMA could round differently."""
    sch = s_tir.Schedule(func)
    if not has_root_block(sch):
        return False
    contracted: set[str] = set()
    for block in root_blocks(sch):
        stmt = sch.get(block)
        body = stmt.body
        if not isinstance(body, tirx.BufferStore):
            return False
        exempt = stmt.name_hint.startswith(_EXACT_RANGE_REDUCTION)
        if not exempt and any(_contractible(arg, contracted) for arg in _steps(body.value)):
            return False
        if _contractible(body.value, contracted):
            contracted.add(body.buffer.name)
    return True


def is_fma_kernel(func) -> bool:
    """A kernel one of our rules marked contraction-safe."""
    return isinstance(func, tirx.PrimFunc) and FMA_ANNOTATION in func.script()
