"""CPU schedule rules of our own for stock TVM, in the style of TVM's dlight rules.

Stock TVM's CPU pipeline (``relax.backend.cpu_generic``) compiles every kernel exactly as
``LegalizeOps`` wrote it: one scalar, single-threaded loop nest per operator. That is why the
untuned geometry encoder ran ~65x slower than eager PyTorch. MetaSchedule would schedule the
kernels, but with apache-tvm 0.27.0.post1 + apache-tvm-ffi 0.1.15.x serialising any TVM object
segfaults in ``tvm::ffi::ToJSONGraph`` (``tvm.ir.save_json(tvm.tirx.Var("x", "int32"))``), which
MetaSchedule does before its first trial; with apache-tvm-ffi 0.1.14.x it runs, but its search
stalled after its initial candidates here and each build costs seconds (README, "Speed on TVM").
So we ship deterministic rules, applied at build time with dlight's ``ApplyDefaultSchedule``
(first rule that accepts a kernel wins):

- ``Matmul``: a kernel whose one reduction block is ``C[..., i, j] += A[..., i, k] * B[..., k, j]``
  (matmul, batched matmul, dense with a pre-transposed weight). Register-blocked micro-kernel
  planned by ``plan_matmul`` (tile ``mr x nr`` from the FMA/load/latency balance within the
  vector registers, loop order reading the larger operand once, reduction split across threads
  when a column panel outgrows L2): accumulators in a local buffer, ``nr`` vectorised over the
  output's contiguous axis, the reduction loop outside them, parallel over the tiles;
  elementwise producers are inlined into it and elementwise consumers fused into its write-back.
- ``RowReduction``: softmax / layer norm and their fused masking: parallel rows, each reduction
  split into 16 partial sums (``rfactor``) and vectorised, single-use elementwise steps computed
  where they are read; dlight's own ``cpu.Reduction`` after it for what it declines.
- ``Injective``: elementwise / broadcast / transpose / gather kernels: one fused loop, parallel
  when large, vectorised inner lanes when the innermost extent allows.
- ``ParallelOuter``: anything else gets its outermost spatial loops run in parallel.

Besides the rules, the pipeline:

- folds constants where stock TVM leaves them to run on every call: a slice of a constant tuple
  (the import turns attention's packed in-projection split into one) is made that constant
  (``CanonicalizeBindings``), and ``FoldConstant`` runs again after fusion, so weight transposes
  are evaluated once, at build time;
- computes ``exp`` as TVM's ``fast_exp`` (``FastMathTransform``), a polynomial LLVM vectorises,
  where libm's ``expf`` is one scalar call per element. Measured over [-87, 88]: at most 4.1e-6
  relative (68 ulp) from the exact value, where ``torch.exp`` is within 1 ulp;
- ``matmul(broadcast_to(x), y)`` becomes ``matmul(x, y)`` (``absorb_matmul_broadcasts``);
- index arithmetic left by inlined reshapes is simplified over the loop ranges (``_simplified``);
- compiles Matmul and RowReduction kernels with fused multiply-add where no step function reads
  a contracted value (``FMA_ANNOTATION`` below).

Schedules change the loop order, never the arithmetic of a single output element except for the
order in which a reduction is accumulated and its FMA contraction (as with any BLAS);
with ``fast_exp`` that is the shipped build's whole numeric difference, and the whole-model
property test bounds it (float32, max abs 1e-5 on unit-scale inputs).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np
import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight

VECTOR_LANES = 16  # float32 lanes of one AVX-512 register (the LLVM backend splits for AVX2)
VECTOR_REGISTERS = 32  # AVX-512 has zmm0-zmm31
MAX_ACCUMULATORS = 28  # of them, at most this many hold a register tile's accumulators
FMA_LATENCY = 4  # cycles: one k step of a tile takes at least this long
PARALLEL_MIN_ELEMENTS = 1 << 14  # below this a thread-pool launch costs more than it saves
PARALLEL_MIN_MACS = 1 << 17  # the same for a matmul's multiply-adds


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    value = sch.get(loop).extent
    return int(value) if isinstance(value, tirx.IntImm) else None


def _blocks(sch: s_tir.Schedule):
    root = sch.get_sblock("root") if _has_root(sch) else None
    return sch.get_child_blocks(root) if root is not None else []


def _has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001 - functions without a root block are not ours to schedule
        return False


def _schedule_for(func, target) -> s_tir.Schedule | None:
    """A schedule of ``func`` when it is a CPU kernel with a root block (what every rule takes)."""
    if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
        return None
    sch = s_tir.Schedule(func)
    return sch if _has_root(sch) else None


def _iter_kinds(sch: s_tir.Schedule, block) -> str:
    kinds = {tirx.IterVar.DataPar: "S", tirx.IterVar.CommReduce: "R"}
    return "".join(kinds.get(iv.iter_type, "O") for iv in sch.get(block).iter_vars)


def _is_spatial(sch, block) -> bool:
    return set(_iter_kinds(sch, block)) <= {"S"}


def _inline_elementwise(sch: s_tir.Schedule, keep) -> None:
    """Inline every spatial block but ``keep`` into its consumer or producer where TVM allows."""
    changed = True
    while changed:
        changed = False
        for block in _blocks(sch):
            if sch.get(block).same_as(sch.get(keep)) or not _is_spatial(sch, block):
                continue
            for inline in (sch.compute_inline, sch.reverse_compute_inline):
                try:
                    inline(block)
                    changed = True
                    break
                except Exception:  # noqa: BLE001 - TVM refuses: not inlinable, try the next way
                    continue
            if changed:
                break


def _simplified(sch: s_tir.Schedule) -> s_tir.Schedule:
    """A fresh schedule of the function with its index arithmetic simplified. Inlining a chain
    of reshapes leaves reads like ``x[((32 * a + b) // 5184 + c) % 256 // 256 + ...]`` that the
    code generator evaluates per element (a 5 MB transpose took 0.7 ms); over the block
    iterators' ranges they are ``x[32 * a + b, c]``. Block and loop handles of ``sch`` are not
    valid in the result: take them again."""
    try:
        from tvm.s_tir.transform import StmtSimplify  # apache-tvm 0.27
    except ImportError:
        from tvm.tirx.transform import StmtSimplify  # 0.25, 0.26

    func = StmtSimplify()(tvm.IRModule({"main": sch.mod["main"]}))["main"]
    return s_tir.Schedule(func)


def _vectorize_inner(sch: s_tir.Schedule, loop, lanes: int = VECTOR_LANES) -> None:
    extent = _extent(sch, loop)
    if extent is None or extent < 2:
        return
    if extent % lanes == 0 and extent > lanes:
        _, inner = sch.split(loop, [None, lanes])
        sch.vectorize(inner)
    elif extent <= lanes:
        sch.vectorize(loop)


@dataclasses.dataclass(frozen=True)
class MatmulPlan:
    """How the Matmul rule lays out one ``C[..., i, j] += A[..., i, k] * B[..., k, j]``.

    ``mr x nr`` is the register tile (``mr`` rows of A broadcast, ``nr / 16`` vectors of B per k
    step), ``j_major`` runs the column tiles outside the row tiles (B's panel is reused from
    cache across rows: the larger operand is read once), and ``k_parts > 1`` splits the reduction
    across threads (``rfactor``) when the tiles are too few to share out, or when one column
    panel of B is too large to stay in a core's L2 while every row tile re-reads it."""

    mr: int
    nr: int
    j_major: bool
    k_parts: int


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def plan_matmul(batch: int, rows: int, cols: int, depth: int, threads: int,
                registers: int = VECTOR_REGISTERS) -> MatmulPlan | None:
    """The register tile and loop order for a (batched) ``rows x depth @ depth x cols`` product,
    or None when ``cols`` does not split into whole vectors.

    Per k step a tile costs ``mr * nv`` FMAs (two issue per cycle), ``mr + nv`` loads (two per
    cycle: ``mr`` broadcasts of A, ``nv`` vectors of B) and at least one FMA latency (4 cycles);
    the tile with the best FMA share of those cycles wins, then the one with more accumulators,
    then the taller (measured on SAM3's attention products: 12 x 32 beats 6 x 64 and 4 x 96 by
    5-15%). Accumulators plus B's vectors stay within the 32 vector registers."""
    tiles = []
    for nv in range(1, 9):
        if cols % (nv * VECTOR_LANES):
            continue
        for mr in _divisors(rows, 16):
            accumulators = mr * nv
            if accumulators > min(MAX_ACCUMULATORS, registers - 4) or accumulators + nv > registers - 2:
                continue
            fma = accumulators / 2
            efficiency = fma / max(fma, (mr + nv) / 2, FMA_LATENCY)
            tiles.append((round(efficiency, 3), accumulators, mr, nv))
    if not tiles:
        return None
    # Few rows (a vector-matrix product, memory-bound): one tile as tall as all of them, so each
    # panel of B is read once rather than once per row tile.
    whole = [t for t in tiles if t[2] == rows and t[0] >= 0.75]
    _, _, mr, nv = max(whole, key=lambda t: (t[0], t[3])) if whole else max(tiles)
    nr = nv * VECTOR_LANES
    row_tiles, col_tiles = rows // mr, cols // nr
    a_bytes, b_bytes = 4 * rows * depth, 4 * depth * cols
    j_major = col_tiles > 1 and row_tiles > 1 and b_bytes >= a_bytes
    tasks = batch * row_tiles * col_tiles
    k_parts = 1
    panel = 4 * depth * nr  # one column panel of B, re-read by every row tile
    if threads > 1 and depth >= 64 * threads and depth % threads == 0 and (
            tasks < threads or (col_tiles == 1 and row_tiles > 1 and panel > L2_PANEL_BYTES)):
        k_parts = threads
    return MatmulPlan(mr, nr, j_major, k_parts)


class Matmul(dlight.ScheduleRule):
    """``C[..., i, j] (+)= A[..., i, k] * B[..., k, j]``: register-blocked, vectorised over j,
    parallel over tiles (or over parts of the reduction), laid out by ``plan_matmul``."""

    def apply(self, func, target, _tunable):
        sch = _schedule_for(func, target)
        if sch is None:
            return None
        reductions = [b for b in _blocks(sch) if "R" in _iter_kinds(sch, b)]
        if len(reductions) != 1:
            return None
        block = reductions[0]
        kinds = _iter_kinds(sch, block)
        stmt = sch.get(block)
        if kinds.rstrip("R") != "S" * kinds.count("S") or kinds.count("R") != 1 or kinds.count("S") < 2:
            return None
        if len(stmt.reads) < 2 or not isinstance(stmt.body, tirx.BufferStore) or not _is_mul_add(stmt.body):
            return None
        if any(not _is_spatial(sch, b) for b in _blocks(sch) if not sch.get(b).same_as(stmt)):
            return None
        contractible = _contraction_safe(func)
        _inline_elementwise(sch, block)
        sch = _simplified(sch)
        block = [b for b in _blocks(sch) if "R" in _iter_kinds(sch, b)][0]
        loops = sch.get_loops(block)
        if len(loops) != len(kinds):
            return None
        extents = [_extent(sch, loop) for loop in loops]
        if None in extents:
            return None
        *batch_extents, rows, cols, depth = extents
        threads = _threads(target)
        plan = plan_matmul(_product(batch_extents), rows, cols, depth, threads, _vector_registers(target))
        if plan is None:
            return None
        if plan.k_parts > 1:
            block, final = self._split_reduction(sch, block, plan.k_parts)
        else:
            final = None
        *outer, i, j, k = sch.get_loops(block)
        io, ii = sch.split(i, [None, plan.mr])
        jo, jv = sch.split(j, [None, plan.nr])
        jvo, jvi = sch.split(jv, [None, VECTOR_LANES])
        tile_order = [jo, io] if plan.j_major else [io, jo]
        sch.reorder(*outer, *tile_order, k, ii, jvo, jvi)
        accumulator = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(accumulator, tile_order[-1], preserve_unit_loops=True)
        if final is None:
            self._inline_consumers(sch, accumulator)
            tiles = sch.fuse(*outer, *tile_order)
            if _product(extents) >= PARALLEL_MIN_MACS:
                sch.parallel(tiles)
        else:
            # the reduction's parts are the parallel loop; each part's tiles run in order
            sch.parallel(outer[0])
        sch.unroll(ii)
        sch.unroll(jvo)
        sch.vectorize(jvi)
        if contractible:
            sch.annotate(block, FMA_ANNOTATION, 1)
        init = sch.decompose_reduction(block, k)  # last: TVM only vectorises complete reduction blocks
        sch.vectorize(sch.get_loops(init)[-1])
        write_back = sch.get_loops(accumulator)[len(sch.get_loops(accumulator)) - 2:]
        _vectorize_inner(sch, write_back[-1], VECTOR_LANES)
        if final is not None:
            self._schedule_sum_of_parts(sch, final, contractible)
        for other in _blocks(sch):
            if _is_spatial(sch, other) and not _is_scheduled(sch, other):
                _schedule_injective(sch, other)
        return sch

    @staticmethod
    def _split_reduction(sch, block, parts: int):
        """``rfactor``: part p of the reduction into ``C_rf[p, ...]``, then ``C = sum_p C_rf[p]``."""
        *outer, i, j, k = sch.get_loops(block)
        ko, ki = sch.split(k, [parts, None])
        sch.reorder(ko, *outer, i, j, ki)
        partial = sch.rfactor(ko, 0)
        return partial, block

    @staticmethod
    def _inline_consumers(sch, producer) -> None:
        """Elementwise consumers (bias add, activation, layout) run on the tile just written."""
        for consumer in [b for b in _blocks(sch) if _is_spatial(sch, b) and not sch.get(b).same_as(sch.get(producer))]:
            try:
                sch.reverse_compute_inline(consumer)
            except Exception:  # noqa: BLE001 - left as its own loop nest, scheduled after
                pass

    def _schedule_sum_of_parts(self, sch, final, contractible: bool) -> None:
        """``C[..., i, j] = sum_p C_rf[p, ..., i, j]``: parallel over rows, the parts inside, j
        vectorised; elementwise consumers fused into it."""
        self._inline_consumers(sch, final)
        ko, *rest = sch.get_loops(final)
        *outer, j = rest
        sch.reorder(*outer, ko, j)
        rows = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        sch.parallel(rows)
        _vectorize_inner(sch, j)
        sch.decompose_reduction(final, ko)  # after vectorising: its init copies the vector loop
        for block in _blocks(sch):
            if _is_spatial(sch, block) and sch.get(sch.get_loops(block)[0]).same_as(sch.get(rows)):
                _vectorize_inner(sch, sch.get_loops(block)[-1])


def _is_scheduled(sch, block) -> bool:
    """A block under a parallel or vectorised loop already has its schedule."""
    kinds = {tirx.ForKind.PARALLEL, tirx.ForKind.VECTORIZED}
    return any(sch.get(loop).kind in kinds for loop in sch.get_loops(block))


def _product(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _vector_registers(target) -> int:
    """16-float vectors the host keeps in registers: 32 with AVX-512 (zmm0-31); on an AVX2-only
    CPU each is two of its 16 ymm registers, so 8 (tiles shrink instead of spilling)."""
    from tvm.target import codegen

    host = tvm.target.Target({"kind": "llvm", "mcpu": str(target.attrs.get("mcpu", codegen.llvm_get_system_cpu()))})
    try:
        return VECTOR_REGISTERS if codegen.target_has_features("avx512f", host) else 8
    except Exception:  # noqa: BLE001 - not an x86 target: assume the wide register file
        return VECTOR_REGISTERS


def _threads(target) -> int:
    cores = target.attrs.get("num-cores") if hasattr(target, "attrs") else None
    return int(cores) if cores else 1


# Fused multiply-add. The shipped target turns LLVM's a*b+c contraction off (see
# surgery.tvm_backend.host_target): where a value feeds a floor, a comparison or a select, one
# rounding instead of two can move it across the step (the whole-model test found such a case in
# ROI pooling's sample positions). A sum of products with no such step after it (a matmul's
# accumulation, a layer norm's or softmax's row sums) only changes rounding the way any BLAS's
# order of accumulation does. So the kernels our Matmul and RowReduction rules schedule are
# compiled for a target with FMA (which on x86 also brings AVX-512 back) when no step function in
# them reads a contractible value (one computed with a*b+c in that kernel); everything else keeps
# it off. One exception: the range reduction inside TVM's fast_exp, floor(x * log2(e) + 0.5),
# may round either way at a tie without changing exp's value beyond its polynomial's error. TVM
# compiles all CPU kernels of a module with one LLVM target, so ``surgery.tvm_backend.build``
# compiles the marked kernels as a library of their own and links it into the executable.
FMA_ANNOTATION = "surgery.fma_contractible"
_STEP_CALLS = {f"{ns}.{op}" for ns in ("tirx", "tir") for op in ("floor", "ceil", "round", "trunc", "nearbyint")}
_EXACT_RANGE_REDUCTION = ("T_fast_exp",)  # blocks whose steps round either way harmlessly


_EXPR = getattr(tvm.ir, "Expr", None) or getattr(tvm.ir, "PrimExpr")  # 0.27 / before


def _visit(expr, fn) -> None:
    """Call ``fn`` on every node of a TIR expression, children first."""
    for field in ("a", "b", "value", "condition", "true_value", "false_value"):
        child = getattr(expr, field, None)
        if isinstance(child, _EXPR):
            _visit(child, fn)
    for field in ("args", "indices"):
        for child in getattr(expr, field, None) or ():
            if isinstance(child, _EXPR):
                _visit(child, fn)
    fn(expr)


def _loaded_buffer(expr) -> str | None:
    """The name of the buffer a load reads (``TensorLoad.source`` in 0.27, ``BufferLoad.buffer`` before)."""
    if type(expr).__name__ not in ("TensorLoad", "BufferLoad"):
        return None
    buffer = getattr(expr, "source", None)
    if buffer is None:
        buffer = getattr(expr, "buffer", None)
    return getattr(buffer, "name", None)


def _is_float(expr) -> bool:
    dtype = getattr(expr, "dtype", None)  # before 0.27; its type (``.ty``) from 0.27
    return str(dtype if dtype is not None else getattr(expr, "ty", "")).startswith(("float", "bfloat"))


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
        if isinstance(node, (tirx.Add, tirx.Sub)) and _is_float(node) and any(isinstance(x, tirx.Mul) for x in (node.a, node.b)):
            found = True
        elif _loaded_buffer(node) in contracted:
            found = True

    _visit(expr, visit)
    return found


def _contraction_safe(func: tirx.PrimFunc) -> bool:
    """No step function in the kernel reads a value that FMA could round differently."""
    sch = s_tir.Schedule(func)
    if not _has_root(sch):
        return False
    contracted: set[str] = set()
    for block in _blocks(sch):
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
    return isinstance(func, tirx.PrimFunc) and FMA_ANNOTATION in func.script()


def _is_mul_add(store: tirx.BufferStore) -> bool:
    value = store.value
    return isinstance(value, tirx.Add) and any(isinstance(side, tirx.Mul) for side in (value.a, value.b))


def _region_buffer(region):
    """The buffer a read region covers (``TensorRegion.source`` in 0.27, ``BufferRegion.buffer`` before)."""
    return region.source if hasattr(region, "source") else region.buffer


def _analyzer():
    try:
        from tvm.sym.analyzer import Analyzer  # apache-tvm 0.27
    except ImportError:
        from tvm.arith import Analyzer  # earlier releases
    return Analyzer()


def _transposed_axis(sch: s_tir.Schedule, block) -> int | None:
    """For a block whose innermost iterator does not index the last axis of a buffer it reads
    (a transpose: consecutive writes, strided reads), the position of the iterator that does
    index that last axis; else None. Indices are simplified over the iterators' ranges first
    (inlined reshapes leave ``(72 * y + x) // 5184 + c`` where ``c`` is meant)."""
    stmt = sch.get(block)
    names = [iv.var.name for iv in stmt.iter_vars]
    if len(names) < 2:
        return None
    analyzer = _analyzer()
    for iv in stmt.iter_vars:
        analyzer.bind(iv.var, iv.dom)
    inner = names[-1]
    for read in stmt.reads:
        if len(_region_buffer(read).shape) < 2:
            continue
        last = str(analyzer.simplify(read.region[-1].min))
        if re.search(rf"\b{re.escape(inner)}\b", last):
            continue
        for position, name in enumerate(names[:-1]):
            if re.search(rf"\b{re.escape(name)}\b", last):
                return position
    return None


# A column panel of B that every row tile re-reads should stay in L2 (1-2 MiB per core on the
# x86 servers we measured): beyond this the reduction is split across threads instead.
L2_PANEL_BYTES = 768 * 1024
TILE = 16  # transposes are copied in TILE x TILE blocks, so reads and writes both stay in cache


def _schedule_injective(sch: s_tir.Schedule, block) -> None:
    loops = sch.get_loops(block)
    if not loops:
        return
    extents = [_extent(sch, loop) for loop in loops]
    if None in extents:
        return
    total = 1
    for e in extents:
        total *= e
    across = _transposed_axis(sch, block) if len(loops) == len(sch.get(block).iter_vars) else None
    if across is not None and extents[across] >= 8 and extents[-1] >= 8:
        # copy in tiles of (read-contiguous axis, write-contiguous axis): both stay in cache
        tile = next((t for t in (TILE, 8) if extents[across] % t == 0 and extents[-1] % t == 0), TILE)
        ro, ri = sch.split(loops[across], [None, tile])
        co, ci = sch.split(loops[-1], [None, tile])
        others = [loop for i, loop in enumerate(loops[:-1]) if i != across]
        sch.reorder(*others, ro, co, ri, ci)
        tiles = sch.fuse(*others, ro, co)
        if total >= PARALLEL_MIN_ELEMENTS:
            sch.parallel(tiles)
        sch.unroll(ci)
        return
    # Outer loops fused and run in parallel; the innermost loop (contiguous writes) vectorised.
    *outer, inner = loops
    lanes = next((v for v in (VECTOR_LANES, 8) if extents[-1] % v == 0), None)
    if outer:
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        if total >= PARALLEL_MIN_ELEMENTS and (_extent(sch, fused) or 0) >= 2:
            sch.parallel(fused)
    elif total >= PARALLEL_MIN_ELEMENTS and lanes:
        chunk, inner = sch.split(inner, [None, 4096 if extents[-1] % 4096 == 0 else lanes * 64])
        sch.parallel(chunk)
    if lanes:
        _vectorize_inner(sch, inner, lanes)


class Injective(dlight.ScheduleRule):
    """Kernels of spatial blocks only: inline into the last, fuse, parallel when large, vectorise."""

    def apply(self, func, target, _tunable):
        sch = _schedule_for(func, target)
        if sch is None:
            return None
        blocks = _blocks(sch)
        if not blocks or not all(_is_spatial(sch, b) for b in blocks):
            return None
        _inline_elementwise(sch, blocks[-1])
        sch = _simplified(sch)
        for block in _blocks(sch):
            _schedule_injective(sch, block)
        return sch


class ParallelOuter(dlight.ScheduleRule):
    """Fallback (softmax fused with masking, gathers, ...): inline elementwise blocks where TVM
    allows, then run every block's leading spatial loops in parallel and vectorise spatial blocks."""

    def apply(self, func, target, _tunable):
        sch = _schedule_for(func, target)
        if sch is None or not _blocks(sch):
            return None
        _inline_elementwise(sch, _blocks(sch)[-1])
        sch = _simplified(sch)
        for block in _blocks(sch):
            kinds = _iter_kinds(sch, block)
            loops = sch.get_loops(block)
            leading = len(kinds) - len(kinds.lstrip("S"))
            if leading == 0 or len(loops) != len(kinds):
                continue
            if leading == len(kinds):
                _schedule_injective(sch, block)
                continue
            spatial = sch.fuse(*loops[:leading]) if leading > 1 else loops[0]
            if (_extent(sch, spatial) or 0) >= 2:
                sch.parallel(spatial)
        return sch


class RowReduction(dlight.ScheduleRule):
    """Softmax, layer norm and their fused masking, or a lone row sum: blocks over the same rows,
    some reducing along the row. Each reduction is split into 16 partial accumulators (``rfactor``) so it
    vectorises instead of waiting on one add's latency per element; then every block moves
    under one parallel loop over the rows and the elementwise blocks are vectorised."""

    def apply(self, func, target, _tunable):
        sch = _schedule_for(func, target)
        if sch is None:
            return None
        blocks = _blocks(sch)
        kinds = [_iter_kinds(sch, b) for b in blocks]
        lone = len(blocks) == 1  # a row sum on its own (attention's row sums of probabilities)
        if not blocks or not any("R" in k for k in kinds) or ("R" in kinds[-1] and not lone):
            return None
        leading = min(len(k) - len(k.lstrip("S")) for k in kinds)
        if leading == 0 or any(k.count("R") > 1 or (("R" in k) and not k.endswith("R")) for k in kinds):
            return None
        for block, k in zip(blocks, kinds):
            if "R" in k and (_extent(sch, sch.get_loops(block)[-1]) or 0) % VECTOR_LANES:
                return None  # rows that do not split into whole vectors: leave to the next rule
        contractible = _contraction_safe(func)
        # an elementwise step read once (x - max, the masking after the division) is computed
        # where it is read instead of through a row-sized buffer
        for block in blocks[:-1]:
            if _is_spatial(sch, block) and len(sch.get_consumers(block)) == 1:
                try:
                    sch.compute_inline(block)
                except Exception:  # noqa: BLE001 - TVM refuses: keep it as its own loop
                    pass
        sch = _simplified(sch)
        blocks = _blocks(sch)
        kinds = [_iter_kinds(sch, b) for b in blocks]
        for block, k in zip(list(blocks), kinds):
            if "R" not in k:
                continue
            reduce_loop = sch.get_loops(block)[-1]
            _, lanes = sch.split(reduce_loop, [None, VECTOR_LANES])
            sch.rfactor(lanes, factor_axis=len(k) - 1)
        blocks = _blocks(sch)
        last = blocks[-1]
        loops = sch.get_loops(last)
        elements = _product(_extent(sch, loop) or 1 for loop in loops)
        rows = sch.fuse(*loops[:leading]) if leading > 1 else loops[0]
        if elements >= PARALLEL_MIN_ELEMENTS:
            sch.parallel(rows)  # a few short rows (6 prompt tokens' layer norm) run faster alone
        for block in reversed(blocks[:-1]):
            sch.compute_at(block, rows, preserve_unit_loops=True)
        for block in _blocks(sch):
            inner = sch.get_loops(block)[-1]
            if sch.get(inner).same_as(sch.get(rows)):
                continue
            kind = _iter_kinds(sch, block)
            if "R" not in kind:
                _vectorize_inner(sch, inner)
            elif sch.get(block).name_hint.endswith("_rf"):
                # partial accumulators of an rfactor block: the 16 lanes innermost, one vector
                below = [lp for lp in sch.get_loops(block) if not sch.get(lp).same_as(sch.get(rows))]
                lanes = [lp for lp in below if _extent(sch, lp) == VECTOR_LANES]
                steps = [lp for lp in below if (_extent(sch, lp) or 1) > 1 and lp not in lanes]
                if lanes and len(steps) == 1:
                    try:
                        sch.reorder(steps[0], lanes[-1])
                        sch.vectorize(lanes[-1])
                    except Exception:  # noqa: BLE001 - stays scalar, still 16 independent chains
                        pass
        if contractible:
            sch.annotate(_blocks(sch)[-1], FMA_ANNOTATION, 1)
        return sch


def _static_shape(expr) -> list[int] | None:
    """The static shape of a relax expression (``.ty`` in TVM 0.27, ``.struct_info`` before)."""
    ty = getattr(expr, "ty", None) or getattr(expr, "struct_info", None)
    dims = getattr(getattr(ty, "shape", None), "values", None)
    if dims is None or not all(isinstance(v, tirx.IntImm) for v in dims):
        return None
    return [int(v) for v in dims]


@tvm.transform.module_pass(opt_level=0, name="AbsorbMatmulBroadcasts")
def absorb_matmul_broadcasts(mod, _ctx):
    """``matmul(broadcast_to(x), y)`` -> ``matmul(x, y)`` where only batch dimensions were
    broadcast (relax's matmul broadcasts them itself). PyTorch's ``bmm`` needs equal batches, so
    an exported ``matmul([1, M, K], [T, K, N])`` arrives as an ``expand`` of the shared operand,
    which TVM would otherwise materialise as a copy per batch before the product."""
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

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


@functools.lru_cache(maxsize=None)
def rules() -> tuple:
    return (Matmul(), RowReduction(), dlight.cpu.Reduction(), Injective(), ParallelOuter())


def pipeline(target: tvm.target.Target):
    """Stock TVM's CPU pipeline with our schedule rules applied after fusion."""

    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                # the same image + position sum feeds all three layers: compute it once
                [relax.transform.EliminateCommonSubexpr()]
                # exp as TVM's fast_exp (a polynomial LLVM vectorises) instead of libm's scalar
                # expf, one call per element: softmax over 5,184 image tokens was 2/3 exp
                + [relax.transform.FastMathTransform()]
                # a slice of a constant tuple (the import folds attention's packed in-projection
                # split into one) becomes that constant, so what follows it can fold too
                + [relax.transform.CanonicalizeBindings()]
                # matmul(broadcast_to(x), y) -> matmul(x, y): no per-batch copy of a shared operand
                + [absorb_matmul_broadcasts]
                + cpu.library_dispatch_passes(target)
                + cpu.legalize_passes(target)
                # again after fusion: a fused kernel whose inputs are all constants (a slice of
                # attention's packed in-projection, transposed) is evaluated once, here
                + [relax.transform.FoldConstant()]
                + [dlight.ApplyDefaultSchedule(*rules())]
                + cpu.dataflow_lower_passes(target)
                + cpu.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline
