"""Is a float32 result wrong, or only rounded differently? Judged against float64.

A compiler may add, multiply and reduce in another order than PyTorch, contract ``a*b+c`` or
use its own ``exp``: its float32 results then differ from eager PyTorch's by rounding, and
neither is "the" answer. So both are measured against a float64 reference (the same operations
on the same values, in float64: inputs, parameters, constants and float dtype arguments cast)
and the candidate is wrong only when it is much further from it than eager float32 is::

    |candidate - float64| <= ERROR_FACTOR * |eager - float64| + FLOOR_ULPS * eps(dtype) * scale

(maxima over the tensor's finite elements; ``scale`` the larger of the reference's largest
magnitude and the caller's, e.g. an operator's largest input, for sums that cancel). The floor
covers values eager happens to get exact. Integer and bool values must equal eager's exactly,
and inf/NaN must sit exactly where eager has them.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .compare import ErrorStats, compare

ERROR_FACTOR = 16  # another summation order or contraction costs a few times eager's rounding
FLOOR_ULPS = 8  # of the value's scale, for values eager computes exactly
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rule_text() -> str:
    return (
        f"|TVM - float64| <= {ERROR_FACTOR} x |eager - float64| + {FLOOR_ULPS} ulp x scale (max over finite elements; "
        "float64 = the same operations on the same values in float64, inputs, parameters, constants and float dtype "
        "arguments cast; scale = max(|float64|, |the operator's inputs|)); integer and bool values identical to eager's; "
        "inf/NaN exactly where eager has them"
    )


@dataclasses.dataclass
class Judgement:
    ok: bool
    dtype: str
    elements: int
    error: float  # max |candidate - float64| (integers: elements differing from eager)
    eager_error: float  # max |eager - float64|
    tolerance: float
    scale: float
    problem: str = ""  # shape, dtype or non-finite mismatch

    @property
    def ratio(self) -> float:
        """How far past its tolerance the candidate is (> 1: wrong)."""
        if self.problem:
            return math.inf
        return self.error / self.tolerance if self.tolerance > 0 else (0.0 if self.error == 0 else math.inf)

    def __str__(self) -> str:
        if self.problem:
            return self.problem
        if self.dtype not in map(str, FLOAT_DTYPES + (torch.float64,)):
            return f"{int(self.error)} of {self.elements} elements differ from eager (must be identical)"
        return (
            f"max |TVM - float64| = {self.error:.3g}, eager float32's = {self.eager_error:.3g}, "
            f"tolerance {self.tolerance:.3g} (scale {self.scale:.3g})"
        )


def judge(candidate: torch.Tensor, eager: torch.Tensor, reference: torch.Tensor, scale: float = 0.0) -> Judgement:
    """Judge ``candidate`` against the float64 ``reference``, with eager PyTorch's own error
    (``eager`` vs ``reference``) as the yardstick. See the module docstring."""
    dtype, elements = str(eager.dtype), eager.numel()
    if candidate.shape != eager.shape or candidate.dtype != eager.dtype:
        return Judgement(
            False,
            dtype,
            elements,
            math.inf,
            0.0,
            0.0,
            scale,
            f"shape/dtype {tuple(candidate.shape)}/{candidate.dtype}, PyTorch gives {tuple(eager.shape)}/{eager.dtype}",
        )
    if not eager.is_floating_point():
        differ = int((candidate != eager).sum())
        return Judgement(differ == 0, dtype, elements, float(differ), 0.0, 0.0, 0.0)
    nonfinite = ~torch.isfinite(eager)
    same_nonfinite = (candidate == eager) | (torch.isnan(candidate) & torch.isnan(eager))
    mismatched = int((nonfinite & ~same_nonfinite).sum() + (~nonfinite & ~torch.isfinite(candidate)).sum())
    reference = reference.to(torch.float64)
    finite = ~nonfinite & torch.isfinite(reference)
    scale = max(scale, float(reference[finite].abs().max()) if finite.any() else 0.0)
    error = float((candidate[finite].double() - reference[finite]).abs().max()) if finite.any() else 0.0
    eager_error = float((eager[finite].double() - reference[finite]).abs().max()) if finite.any() else 0.0
    tolerance = ERROR_FACTOR * eager_error + FLOOR_ULPS * torch.finfo(eager.dtype).eps * scale
    problem = f"{mismatched} inf/NaN where eager has none or another" if mismatched else ""
    return Judgement(
        not mismatched and error <= tolerance, dtype, elements, error, eager_error, tolerance, scale, problem
    )


@dataclasses.dataclass
class JudgedStats(ErrorStats):
    """``ErrorStats`` against eager float32, judged by ``judge`` against float64: within bounds
    when, in every example, the candidate's error stays within the tolerance eager's own error
    sets. ``error``/``eager_error``/``tolerance`` are those of the example closest to failing."""

    error: float = 0.0
    eager_error: float = 0.0
    tolerance: float = 0.0
    problem: str = ""
    reordered: int = 0  # queries compared where eager has them, ranked otherwise at a verified tie

    @classmethod
    def of(cls, candidate: torch.Tensor, eager: torch.Tensor, reference: torch.Tensor, scale: float) -> JudgedStats:
        stats, verdict = compare(candidate, eager), judge(candidate, eager, reference, scale)
        return cls(
            **dataclasses.asdict(stats),
            error=verdict.error,
            eager_error=verdict.eager_error,
            tolerance=verdict.tolerance,
            problem=verdict.problem,
        )

    @property
    def ratio(self) -> float:
        if self.problem or self.shape_mismatch:
            return math.inf
        return self.error / self.tolerance if self.tolerance > 0 else (0.0 if self.error == 0 else math.inf)

    def within_bounds(self) -> bool:
        if self.dtype not in map(str, FLOAT_DTYPES):
            return super().within_bounds()
        return not self.nonfinite_mismatches and self.ratio <= 1

    def bound(self) -> str:
        if self.dtype not in map(str, FLOAT_DTYPES):
            return super().bound()
        return (
            f"|x - float64| <= {ERROR_FACTOR} x |eager - float64| + {FLOOR_ULPS} ulp x scale "
            f"(worst: {self.error:.3g} vs tolerance {self.tolerance:.3g}, eager's error {self.eager_error:.3g}"
            + (f"; {self.reordered} queries ranked otherwise at verified near-ties" if self.reordered else "")
            + ")"
        )

    def merge(self, other: ErrorStats) -> JudgedStats:
        merged = super().merge(other)
        worst = max((self, other), key=lambda s: s.ratio if isinstance(s, JudgedStats) else 0.0)
        return JudgedStats(
            **dataclasses.asdict(merged),
            error=worst.error,
            eager_error=worst.eager_error,
            tolerance=worst.tolerance,
            problem=self.problem or getattr(other, "problem", ""),
            reordered=self.reordered + getattr(other, "reordered", 0),
        )


def largest_magnitude(values) -> float:
    """The largest finite magnitude among the float tensors in ``values`` (0 if none)."""
    largest = 0.0
    for value in values:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            finite = value[torch.isfinite(value)]
            if finite.numel():
                largest = max(largest, float(finite.abs().max()))
    return largest


def to_float64(value):
    """Float tensors and float dtypes (``dtype=torch.float32`` arguments) in ``value``, a tensor
    or a nest of lists, tuples and dicts, as float64; everything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.double() if value.is_floating_point() else value
    if isinstance(value, torch.dtype):
        return torch.float64 if value in FLOAT_DTYPES else value
    if isinstance(value, (list, tuple)):
        return type(value)(to_float64(v) for v in value)
    if isinstance(value, dict):
        return {k: to_float64(v) for k, v in value.items()}
    return value


def is_assertion(node: torch.fx.Node) -> bool:
    """Runtime checks export leaves in a graph (``_assert_tensor_metadata`` checks a dtype, which
    a float64 run would fail) and ``module()``'s input guards: values nobody reads."""
    if node.op == "call_module":
        return str(node.target).startswith("_guards")
    return node.op == "call_function" and "_assert" in getattr(node.target, "__name__", str(node.target))


def evaluate_node(node: torch.fx.Node, value_of, float64: bool = False):
    """``node``'s operator applied to ``value_of(input node)`` for each of its inputs, in float64
    when asked (see ``to_float64``)."""
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), value_of)
    if float64:
        args, kwargs = to_float64(args), to_float64(kwargs)
    return node.target(*args, **kwargs)


def attribute(module: torch.nn.Module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module


def evaluate_graph(module: torch.fx.GraphModule, args, float64: bool = False, keep_all: bool = False):
    """Run ``module``'s graph node by node (``program.module()`` of an ExportedProgram: user
    inputs as placeholders, parameters as attributes), optionally in float64. Returns the flat
    outputs and, with ``keep_all``, every node's value (else values are dropped after their last use)."""
    nodes = list(module.graph.nodes)
    last_use = {}
    for position, node in enumerate(nodes):
        for used in node.all_input_nodes:
            last_use[used] = position
    values, inputs = {}, iter(args)
    cast = to_float64 if float64 else (lambda v: v)
    with torch.no_grad():
        for position, node in enumerate(nodes):
            if node.op == "placeholder":
                values[node] = cast(next(inputs))
            elif node.op == "get_attr":
                values[node] = cast(attribute(module, node.target))
            elif node.op == "output":
                outputs = torch.fx.node.map_arg(node.args[0], values.__getitem__)
            elif not is_assertion(node):
                values[node] = evaluate_node(node, values.__getitem__, float64)
            if not keep_all:
                for used in node.all_input_nodes:
                    if last_use[used] == position and used in values:
                        del values[used]
    return tuple(outputs), values


# Operators that choose elements by comparing values: (position of the values they return or
# None, position of the indices, keyword and position of ``dim``, its default, whether ``dim``
# is kept). A float64 run may choose otherwise than float32 where values (nearly) tie, and would
# then be no yardstick for float32 rounding at all; ``evaluate_along`` makes it choose as float32.
aten = torch.ops.aten
_CHOICES = {
    aten.topk.default: (0, 1, 2, -1, True),
    aten.sort.default: (0, 1, 1, -1, True),
    aten.sort.stable: (0, 1, None, -1, True),
    aten.max.dim: (0, 1, 1, None, False),
    aten.min.dim: (0, 1, 1, None, False),
    aten.argmax.default: (None, None, 1, None, False),
    aten.argmin.default: (None, None, 1, None, False),
}


def _chosen_as(node: torch.fx.Node, float32_value, float64_input: torch.Tensor):
    """``node``'s float64 value making float32's choices: its indices, and the float64 input's
    values at them."""
    values_at, indices_at, dim_at, default_dim, kept = _CHOICES[node.target]
    if values_at is None:  # argmax/argmin: the choice is the value
        return float32_value
    indices = float32_value[indices_at]
    if node.target is aten.sort.stable:
        dim = node.kwargs.get("dim", default_dim)
    else:
        dim = node.args[dim_at] if len(node.args) > dim_at else node.kwargs.get("dim", default_dim)
    keepdim = kept or (len(node.args) > 2 and node.args[2]) or node.kwargs.get("keepdim", False)
    gathered = float64_input.gather(dim, indices if keepdim else indices.unsqueeze(dim))
    return (gathered if keepdim else gathered.squeeze(dim), indices)


@dataclasses.dataclass(frozen=True)
class Selection:
    """What a ``topk`` chose in ``evaluate_along``'s run: its sorted scores in float32 and, at the
    same elements, in float64 ([..., k] each)."""

    scores: torch.Tensor
    scores64: torch.Tensor

    def tie_tolerance(self) -> float:
        """How far apart two scores may be and still tie within float32 rounding: the judge's
        rule applied to the scores' own error against float64."""
        error = float((self.scores.double() - self.scores64).abs().max()) if self.scores.numel() else 0.0
        scale = float(self.scores64.abs().max()) if self.scores.numel() else 0.0
        return ERROR_FACTOR * error + FLOOR_ULPS * torch.finfo(self.scores.dtype).eps * scale


def evaluate_along(module: torch.fx.GraphModule, args, selections: list | None = None) -> tuple[tuple, tuple]:
    """Outputs of ``module``'s graph in float32 (as ``evaluate_graph``) and in float64 along the
    same path: where an operator chooses elements by value (topk, sort, max/min over a dim,
    argmax/argmin), the float64 run takes float32's choice and its own values there. So the
    float64 outputs differ from float32's by rounding only, even at near-ties, and a candidate
    that chose otherwise than eager float32 is judged wrong rather than excused."""
    nodes = list(module.graph.nodes)
    last_use = {}
    for position, node in enumerate(nodes):
        for used in node.all_input_nodes:
            last_use[used] = position
    values32, values64, inputs = {}, {}, iter(args)
    with torch.no_grad():
        for position, node in enumerate(nodes):
            if node.op == "placeholder":
                value = next(inputs)
                values32[node], values64[node] = value, to_float64(value)
            elif node.op == "get_attr":
                value = attribute(module, node.target)
                values32[node], values64[node] = value, to_float64(value)
            elif node.op == "output":
                outputs32 = torch.fx.node.map_arg(node.args[0], values32.__getitem__)
                outputs64 = torch.fx.node.map_arg(node.args[0], values64.__getitem__)
            elif not is_assertion(node):
                values32[node] = evaluate_node(node, values32.__getitem__)
                if node.target in _CHOICES:
                    values64[node] = _chosen_as(node, values32[node], values64[node.args[0]])
                    if selections is not None and node.target is aten.topk.default:
                        selections.append(Selection(values32[node][0], values64[node][0]))
                else:
                    values64[node] = evaluate_node(node, values64.__getitem__, float64=True)
            for used in node.all_input_nodes:
                if last_use[used] == position:
                    values32.pop(used, None)
                    values64.pop(used, None)
    return tuple(outputs32), tuple(outputs64)


def judge_outputs(module: torch.fx.GraphModule, inputs, outputs) -> list[Judgement]:
    """A compiled program's ``outputs`` on ``inputs`` judged against the program's graph run by
    PyTorch (``program.module()``; eager float32, and float64 along its path: ``evaluate_along``),
    output by output; scale: the inputs' largest magnitude."""
    eager, reference = evaluate_along(module, inputs)
    scale = largest_magnitude(inputs)
    return [judge(a, e, r, scale) for a, e, r in zip(outputs, eager, reference)]


def reordered_at_ties(candidate, eager, selections: list[Selection], query_dim: int = 1):
    """Where a candidate ranked queries that tie within float32 rounding in another order than
    eager (their rows swapped along ``query_dim`` in every output), the permutation that maps the
    candidate's rows back onto eager's, per batch item [B, Q]; None when the difference is not
    such a reordering. Verified, not assumed: each row must match one eager row (nearest over all
    outputs, a one-to-one map), and every moved query's selection score (a ``topk`` choosing that
    many queries) must lie within the scores' tie tolerance of the score it took the place of."""
    queries = eager[0].shape[query_dim]
    chosen = [s for s in selections if s.scores.shape[-1] == queries]
    if not chosen:
        return None
    batch = eager[0].shape[0]
    permutation = torch.empty(batch, queries, dtype=torch.long)
    for b in range(batch):
        distance = sum(
            torch.cdist(c[b].flatten(1).double(), e[b].flatten(1).double(), p=float("inf"))
            for c, e in zip(candidate, eager)
            if e.is_floating_point()
        )  # [Q, Q]: candidate row i vs eager row j
        nearest = distance.argmin(dim=1)  # [Q]
        if nearest.unique().numel() != queries:
            return None
        moved = (nearest != torch.arange(queries)).nonzero().flatten()
        for selection in chosen:
            scores = selection.scores.reshape(batch, queries)[b]
            gaps = (scores[moved] - scores[nearest[moved]]).abs()
            if gaps.numel() and float(gaps.max()) > selection.tie_tolerance():
                return None
        permutation[b] = nearest
    return permutation


def unpermuted(output: torch.Tensor, permutation: torch.Tensor, query_dim: int = 1) -> torch.Tensor:
    """``output``'s rows along ``query_dim`` put where ``permutation`` [B, Q] says eager has them."""
    restored = torch.empty_like(output)
    for b in range(output.shape[0]):
        restored[b].index_copy_(query_dim - 1, permutation[b], output[b])
    return restored
