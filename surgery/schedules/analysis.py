"""What the schedule rules share: which kernels they take, their blocks and loops, inlining,
index simplification and vectorising an inner loop."""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.base import get_extent

from ..matmul_tiling import VECTOR_LANES
from .compat import (
    accessed_buffer,
    loaded_buffer_name,
    param_buffers,
    region_buffer,
    stmt_simplify,
)

PARALLEL_MIN_ELEMENTS = 1 << 14  # below this a thread-pool launch costs more than it saves


# The block annotation that marks a copy of a weight into the layout a kernel reads, for TVM's
# SplitLayoutRewritePreproc to move into a function of its own (MetaSchedule's name for it).
LAYOUT_REWRITE = "meta_schedule.layout_rewrite_preproc"

# The loop annotation that asks TVM's LoopPartition (run as a kernel is lowered) to cut a loop
# where a condition in its body changes, each piece without the condition. Lowering narrows
# 64-bit loops to 32 bits first and drops the mark (apache-tvm 0.27): mark loops of a kernel
# with 32-bit indices (``narrowed``).
PARTITION_HINT = "pragma_loop_partition_hint"


def static_extent(sch: s_tir.Schedule, loop) -> int | None:
    """A loop's extent when it is a constant."""
    extent = get_extent(sch, loop)
    return extent if isinstance(extent, int) else None


def is_var(index, var) -> bool:
    """``index`` (a buffer index) is the variable ``var`` itself."""
    return isinstance(index, tirx.Var) and index.same_as(var)


def is_mul_add(store: tirx.BufferStore) -> bool:
    """The store adds a product to something: a reduction's ``C += A * B`` step."""
    value = store.value
    return isinstance(value, tirx.Add) and any(isinstance(side, tirx.Mul) for side in (value.a, value.b))


def has_root_block(sch: s_tir.Schedule) -> bool:
    try:
        get_root_block(sch)
        return True
    except Exception:  # noqa: BLE001 - functions without a root block are not ours to schedule
        return False


def root_blocks(sch: s_tir.Schedule):
    """The blocks under the function's root block, in order."""
    return sch.get_child_blocks(get_root_block(sch)) if has_root_block(sch) else []


def schedule_for(func, target) -> s_tir.Schedule | None:
    """A schedule of ``func`` when it is a CPU kernel with a root block (what every rule takes)."""
    if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
        return None
    sch = s_tir.Schedule(func)
    return sch if has_root_block(sch) else None


def reduction_blocks(sch: s_tir.Schedule) -> list:
    """The root blocks with a reduction axis."""
    return [b for b in root_blocks(sch) if "R" in iter_kinds(sch, b)]


def target_threads(target) -> int:
    """The cores the target is compiled for (its ``num-cores``; 1 when it names none)."""
    cores = target.attrs.get("num-cores") if hasattr(target, "attrs") else None
    return int(cores) if cores else 1


def iter_kinds(sch: s_tir.Schedule, block) -> str:
    """One letter per block iterator: S(patial), R(eduction), O(ther). Unlike dlight's
    ``SBlockInfo.dom_kind``, which pairs iterators with loops, this counts every iterator
    whatever the loops above the block have become."""
    kinds = {tirx.IterVar.DataPar: "S", tirx.IterVar.CommReduce: "R"}
    return "".join(kinds.get(iv.iter_type, "O") for iv in sch.get(block).iter_vars)


def is_spatial(sch, block) -> bool:
    return set(iter_kinds(sch, block)) <= {"S"}


def is_scheduled(sch, block) -> bool:
    """A block under a parallel or vectorised loop already has its schedule."""
    kinds = {tirx.ForKind.PARALLEL, tirx.ForKind.VECTORIZED}
    return any(sch.get(loop).kind in kinds for loop in sch.get_loops(block))


def inline_elementwise(sch: s_tir.Schedule, keep, into_producers: bool = True) -> None:
    """Inline every spatial block but ``keep`` into its consumer or (``into_producers``) its
    producer where TVM allows. Unlike dlight's ``try_inline``, one block at a time, each into its
    consumer before its producer, and never ``keep``: the block the rule schedules stays where
    it is."""
    ways = (sch.compute_inline, sch.reverse_compute_inline) if into_producers else (sch.compute_inline,)
    changed = True
    while changed:
        changed = False
        for block in root_blocks(sch):
            if sch.get(block).same_as(sch.get(keep)) or not is_spatial(sch, block):
                continue
            for inline in ways:
                try:
                    inline(block)
                    changed = True
                    break
                except Exception:  # noqa: BLE001 - TVM refuses: not inlinable, try the next way
                    continue
            if changed:
                break


def simplified(sch: s_tir.Schedule) -> s_tir.Schedule:
    """A fresh schedule of the function with its index arithmetic simplified. Inlining a chain
    of reshapes leaves reads like ``x[((32 * a + b) // 5184 + c) % 256 // 256 + ...]`` that the
    code generator evaluates per element (a 5 MB transpose took 0.7 ms); over the block
    iterators' ranges they are ``x[32 * a + b, c]``. Block and loop handles of ``sch`` are not
    valid in the result: take them again."""
    func = stmt_simplify()(tvm.IRModule({"main": sch.mod["main"]}))["main"]
    return s_tir.Schedule(func)


def narrowed(sch: s_tir.Schedule) -> s_tir.Schedule:
    """A fresh schedule of the function with 32-bit indices (TVM's ``ForceNarrowIndexToInt32``)
    where every buffer it is given has fewer than 2**31 elements; else, or where the pass
    declines the function (apache-tvm 0.27: a buffer of int64 values), ``sch`` as it is."""
    func = sch.mod["main"]
    sizes = [_elements(b.shape) for b in param_buffers(func)]
    if any(not isinstance(n, int) or n >= 2**31 for n in sizes):
        return sch
    try:
        func = tirx.transform.ForceNarrowIndexToInt32()(tvm.IRModule({"main": func}))["main"]
    except tvm.error.InternalError:
        return sch
    return s_tir.Schedule(func)


def vectorize_inner(sch: s_tir.Schedule, loop, lanes: int = VECTOR_LANES) -> None:
    """Vectorise ``loop`` when it is at most ``lanes`` long, else its inner ``lanes`` when they
    divide it; a loop of any other length stays scalar (dlight's ``auto_vectorize`` would split
    it with a tail)."""
    extent = static_extent(sch, loop)
    if extent is None or extent < 2:
        return
    if extent % lanes == 0 and extent > lanes:
        _, inner = sch.split(loop, [None, lanes])
        sch.vectorize(inner)
    elif extent <= lanes:
        sch.vectorize(loop)


def product(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _elements(extents) -> int | str:
    """How many elements a shape holds; its text where a dimension is symbolic."""
    if all(isinstance(e, tirx.IntImm) for e in extents):
        return product(int(e) for e in extents)
    return str(list(extents))


def one_value_per_element(sch: s_tir.Schedule, consumer, producer) -> bool:
    """Whether ``consumer`` computes as many values as ``producer`` writes (an elementwise step,
    a layout of its output), not a part of them (a slice). Symbolic shapes compare as written; a
    producer of several outputs (a group norm's mean and variance) has no such consumer."""
    writes = sch.get(producer).writes
    if len(writes) != 1:
        return False
    output = region_buffer(writes[0])
    return _elements([iv.dom.extent for iv in sch.get(consumer).iter_vars]) == _elements(output.shape)


def inline_consumers(sch: s_tir.Schedule, producer) -> None:
    """Reverse-inline into ``producer`` (a tile's write-back) the spatial blocks that compute one
    value per element of its output (bias, batch norm, activation, a residual sum, a layout such
    as unpacking a product's panels): they run on the tile just written. A consumer of fewer
    elements (a slice) stays a loop nest of its own: TVM inlines one that reads a part of the
    output as if it read every element, and the result held the last element written where the
    sliced-off ones collapsed (``linear(x)[:1]`` came out as row 63 of the product)."""
    for consumer in [b for b in root_blocks(sch) if is_spatial(sch, b) and not sch.get(b).same_as(sch.get(producer))]:
        if not one_value_per_element(sch, consumer, producer):
            continue
        try:
            sch.reverse_compute_inline(consumer)
        except Exception:  # noqa: BLE001 - TVM refuses: left as its own loop nest, scheduled after
            pass


def convolution_block(sch: s_tir.Schedule, operands_of):
    """``(block, operands_of(its statement))`` of a kernel whose one reduction block is a 2-d
    convolution's (iterators ``n, y, x, f, ry, rx, rc``, a multiply-add step) and whose other
    blocks are elementwise, when ``operands_of`` finds its operands; else None."""
    reductions = reduction_blocks(sch)
    if len(reductions) != 1 or iter_kinds(sch, reductions[0]) != "SSSSRRR":
        return None
    block = reductions[0]
    stmt = sch.get(block)
    if not isinstance(stmt.body, tirx.BufferStore) or not is_mul_add(stmt.body):
        return None
    if any(not is_spatial(sch, b) for b in root_blocks(sch) if not sch.get(b).same_as(stmt)):
        return None
    operands = operands_of(stmt)
    return None if operands is None else (block, operands)


def convolution_operands(stmt, input_channel):
    """(input buffer, weight buffer) of a channels-last convolution block ``stmt`` (iterators
    ``n, y, x, f, ry, rx, rc``), else None: the output written at ``[n, y, x, f]``, the weight
    read at ``[ry, rx, rc, f]`` and the input at ``[n, ..., ..., i]`` where ``input_channel(i,
    f, rc)`` holds (a dense convolution reads channel ``rc``, a depthwise one ``f + rc``)."""
    n, y, x, f, ry, rx, rc = (iv.var for iv in stmt.iter_vars)
    store = stmt.body
    if len(store.indices) != 4 or not all(is_var(i, v) for i, v in zip(store.indices, (n, y, x, f))):
        return None
    weight = image = None
    for read in stmt.reads:
        mins = [r.min for r in read.region]
        if region_buffer(read).same_as(accessed_buffer(store)) or len(mins) != 4:
            continue
        if all(is_var(i, v) for i, v in zip(mins, (ry, rx, rc, f))):
            weight = region_buffer(read)
        elif is_var(mins[0], n) and input_channel(mins[3], f, rc):
            image = region_buffer(read)
    return (image, weight) if image is not None and weight is not None else None


def inline_padding_producers(sch: s_tir.Schedule, block, padded) -> None:
    """Elementwise producers of a convolution's padding copy (``padded``, the buffer ``block``
    reads its input from) are inlined into it; the copy itself stays (inlined into the
    reduction, every tap of every pixel would test the border), unless there is no border: then
    it is a plain copy, and the reduction reads the input itself."""
    for other in root_blocks(sch):
        stmt = sch.get(other)
        copy = isinstance(stmt.body, tirx.BufferStore) and loaded_buffer_name(stmt.body.value) is not None
        if copy and any(region_buffer(w).same_as(padded) for w in stmt.writes):
            try:
                sch.compute_inline(other)
            except Exception:  # noqa: BLE001 - TVM refuses: the copy stays, as with a border
                pass
            break
    changed = True
    while changed:
        changed = False
        for other in root_blocks(sch):
            stmt = sch.get(other)
            if stmt.same_as(sch.get(block)) or any(region_buffer(w).same_as(padded) for w in stmt.writes):
                continue
            if not is_spatial(sch, other) or not sch.get_consumers(other):
                continue
            if any(sch.get(c).same_as(sch.get(block)) for c in sch.get_consumers(other)):
                continue
            try:
                sch.compute_inline(other)
                changed = True
                break
            except Exception:  # noqa: BLE001 - TVM refuses: left as its own loop nest
                continue


def _realize_of(sch: s_tir.Schedule, block, loop):
    """The realisation of ``block`` directly under ``loop`` (its innermost loop)."""
    body = sch.get(loop).body
    for stmt in getattr(body, "seq", None) or [body]:
        if type(stmt).__name__ in ("SBlockRealize", "BlockRealize") and stmt.block.same_as(sch.get(block)):
            return stmt
    return None


def recomputed_reduction(sch: s_tir.Schedule) -> str | None:
    """The first reduction block placed under a loop (longer than 1) that none of its iterators
    is bound to, as text: it is computed again, whole, on every iteration of that loop. None
    when there is none."""
    for block in root_blocks(sch):
        loops = sch.get_loops(block)
        if "R" not in iter_kinds(sch, block) or not loops:
            continue
        realize = _realize_of(sch, block, loops[-1])
        if realize is None:
            continue
        bound = {var for value in realize.iter_values for var in tirx.analysis.undefined_vars(value)}
        for loop in loops:
            stmt = sch.get(loop)
            if (static_extent(sch, loop) or 2) > 1 and not any(var.same_as(stmt.loop_var) for var in bound):
                return f"{sch.get(block).name_hint} under {stmt.loop_var.name}"
    return None
