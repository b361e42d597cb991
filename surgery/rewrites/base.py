"""The rewrite pass: one object, one entry point, and a report of what it changed.

A rewrite replaces every call of some operator overloads in a ``torch.export.ExportedProgram``
by a subgraph of core ATen operators. It does so with torch's own mechanism,
``ExportedProgram.run_decompositions`` with a decomposition table that holds only the rewrite's
entries, so every other operator is left as it was and the result is again an
``ExportedProgram`` (savable with ``torch.export.save``, runnable with ``.module()``).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import ClassVar

import torch
from torch._ops import OpOverload
from torch.export.graph_signature import TensorArgument
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils._python_dispatch import _get_current_dispatch_mode


class RewriteError(RuntimeError):
    """A rewrite could not do what it promises (unknown name, operator left behind, ...)."""


def op_census(
    program: torch.export.ExportedProgram, where: Callable[[torch.fx.Node], bool] = lambda node: True
) -> collections.Counter:
    """How many times each operator is called in the program's graph (the calls ``where``
    accepts), keyed by its name."""
    census: collections.Counter = collections.Counter()
    for node in program.graph.nodes:
        if node.op == "call_function" and where(node):
            census[_op_name(node.target)] += 1
    return census


def _op_name(target) -> str:
    # OpOverloads print as "aten.scatter.src", "torchvision.roi_align.default".
    return str(target) if isinstance(target, OpOverload) else getattr(target, "__name__", str(target))


@functools.lru_cache(maxsize=1)
def _decomposed_by_default() -> frozenset:
    # _unsafe_view is in the table but is also what decomposing reshape emits: it stays
    return frozenset(torch.export.default_decompositions().keys()) - {torch.ops.aten._unsafe_view.default}


def decomposed(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``program`` in core ATen: as it is when ``run_decompositions()`` would change nothing (no
    operator of its is in the default decomposition table, none mutates), else that. The speed
    rewrites run one after another on each other's output, and a second ``run_decompositions()``
    of a decomposed program costs ~2 s of retracing here for nothing."""
    table = _decomposed_by_default()
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        schema = getattr(node.target, "_schema", None)
        if node.target in table or (schema is not None and schema.is_mutable):
            return program.run_decompositions()
    return program


def is_tracing(*tensors: torch.Tensor) -> bool:
    """True while the values are symbolic (export, decomposition, make_fx): data checks can't run."""
    if _get_current_dispatch_mode() is not None or torch.compiler.is_compiling():
        return True
    return any(type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter) for t in tensors)


@dataclasses.dataclass(frozen=True)
class RewriteResult:
    program: torch.export.ExportedProgram
    replaced: Mapping[str, int]  # operator name -> calls replaced

    @property
    def modified(self) -> bool:
        return sum(self.replaced.values()) > 0


class Rewrite:
    """Base of every rewrite. Subclasses set the class attributes and ``decompositions``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    contract: ClassVar[str]

    def targets(self) -> tuple[OpOverload, ...]:
        """Every operator this rewrite removes: its decomposition keys, plus the in-place
        variants that ``run_decompositions`` functionalizes into them (``scatter_`` in a
        training-IR graph becomes ``scatter`` and is then decomposed)."""
        return tuple(self.decompositions()) + self.functionalized_variants()

    def functionalized_variants(self) -> tuple[OpOverload, ...]:
        return ()

    def replaces(self, node: torch.fx.Node) -> bool:
        """Whether the rewrite replaces this call: a call of one of its targets whose arguments,
        as export recorded them (``argument_values``), it ``takes``."""
        if node.target not in self.targets():
            return False
        args, kwargs = argument_values(node)
        return self.takes(*args, **kwargs)

    def takes(self, *args, **kwargs) -> bool:
        """Whether the decompositions replace a call with these arguments (tensors as fake
        tensors of the right shape and dtype): every call, unless they decline some (return
        ``NotImplemented``, so the call stays), as bool_arithmetic declines every product that
        is not of two booleans."""
        return True

    def decompositions(self) -> dict[OpOverload, Callable]:
        raise NotImplementedError

    # What the TVM probe checks (``surgery.tvm_backend.probe``): a small case built from the
    # converter bugs we know of, and a few words saying what it exercises.
    probe_note: ClassVar[str] = ""

    def probe_case(self):
        raise NotImplementedError

    @staticmethod
    def cases(dtype=None):
        """Hypothesis strategy of the rewrite's test cases, defined in the rewrite's file next to
        its replacement and contract: what ``python -m surgery verify`` and the property tests
        draw. Each case gives ``reference()``, ``rewritten()``, ``module()``, ``args()`` and
        ``scale``; ``dtype`` fixes the cases' dtype (default: drawn)."""
        raise NotImplementedError

    def settings(self) -> dict:
        """The rewrite's parameters, for reports."""
        return {}

    def __call__(self, program: torch.export.ExportedProgram) -> RewriteResult:
        before = op_census(program, self.replaces)
        if not before:
            return RewriteResult(program, {})
        rewritten = program.run_decompositions(self.decompositions())
        left = op_census(rewritten, self.replaces)
        if left:
            raise RewriteError(f"rewrite {self.name!r} left operators behind: {dict(left)}")
        return RewriteResult(rewritten, dict(sorted(before.items())))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args})"


def by_table(rewrite: Rewrite) -> bool:
    """Whether the rewrite is a decomposition table and nothing more (``Rewrite.__call__``), so
    that it can share one retrace with others (``apply_together``)."""
    return type(rewrite).__call__ is Rewrite.__call__


def apply_together(
    rewrites: list[Rewrite], program: torch.export.ExportedProgram
) -> tuple[torch.export.ExportedProgram, list[RewriteResult]]:
    """Several decomposition-table rewrites (``by_table``, tables with no operator in common)
    in one ``run_decompositions``, as one retrace: on a detector's thousands of nodes each
    retrace costs tens of seconds. Decompositions apply to what other decompositions emit, so
    an operator one replacement emits and another rewrite replaces (roi_align's grid sampler)
    is replaced as when they run one after another. Each result counts the calls it replaced
    in ``program`` as given."""
    keys = [set(rw.decompositions()) for rw in rewrites]
    if sum(map(len, keys)) != len(set().union(*keys)) or not all(map(by_table, rewrites)):
        raise RewriteError("apply_together takes decomposition-table rewrites with no operator in common")
    before = [op_census(program, rw.replaces) for rw in rewrites]
    table = {op: fn for rw in rewrites for op, fn in rw.decompositions().items()}
    rewritten = program.run_decompositions(table) if any(before) else program
    for rw in rewrites:
        left = op_census(rewritten, rw.replaces)
        if left:
            raise RewriteError(f"rewrite {rw.name!r} left operators behind: {dict(left)}")
    return rewritten, [RewriteResult(rewritten, dict(sorted(b.items()))) for b in before]


# Operators that only change how a tensor's elements are viewed or laid out, never their values:
# the graph rewrites walk through them to find where an operand comes from.
LAYOUT_OPS = frozenset(
    {
        torch.ops.aten.view.default,
        torch.ops.aten._unsafe_view.default,
        torch.ops.aten.reshape.default,
        torch.ops.aten.permute.default,
        torch.ops.aten.expand.default,
        torch.ops.aten.clone.default,
        torch.ops.aten.alias.default,
        torch.ops.aten.unsqueeze.default,
        torch.ops.aten.squeeze.dim,
        torch.ops.aten.squeeze.dims,
    }
)


def node_value(node):
    """The example value export recorded for a graph node (``meta["val"]``); None for a non-node."""
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def argument_values(node: torch.fx.Node) -> tuple[tuple, dict]:
    """A call's arguments as its operator sees them: each argument node's recorded value (a
    fake tensor of the right shape and dtype), numbers and strings as they are."""
    return torch.fx.node.map_arg((node.args, node.kwargs), node_value)


class GraphRewrite(Rewrite):
    """A rewrite that edits the core-ATen graph itself, for what a decomposition table cannot
    express (chains of operators, pairs of products): subclasses implement ``rewrite_graph``,
    which edits the graph in place and says what it replaced; the program is then cleaned up
    and retraced, so its metadata is fresh and the graph verified again."""

    def decompositions(self):
        return {}

    def rewrite_graph(self, graph, program: torch.export.ExportedProgram) -> dict[str, int]:
        raise NotImplementedError

    def __call__(self, program: torch.export.ExportedProgram) -> RewriteResult:
        return apply_in_place([self], program)[1][0]


def by_graph(rewrite: Rewrite) -> bool:
    """Whether the rewrite is a graph edit and nothing more (``GraphRewrite.__call__``), so that
    it can share one copy of the graph with others (``apply_in_place``)."""
    return isinstance(rewrite, GraphRewrite) and type(rewrite).__call__ is GraphRewrite.__call__


def apply_in_place(
    rewrites: list[GraphRewrite], program: torch.export.ExportedProgram
) -> tuple[torch.export.ExportedProgram, list[RewriteResult]]:
    """Graph rewrites one after another on one copy of the graph. After each edit the recorded
    values are brought up to date by propagating fake tensors through the graph, and at the end
    the program is verified (``ExportedProgram.validate``): seconds on a detector's ten thousand
    nodes, where retracing (``run_decompositions``) costs a minute or more each time. Each
    result counts what that rewrite replaced in the graph the rewrites before it left."""
    if not all(isinstance(rw, GraphRewrite) for rw in rewrites):
        raise RewriteError("apply_in_place takes graph rewrites (GraphRewrite subclasses)")
    program = copy.deepcopy(decomposed(program))
    _name_signature(program)
    graph = program.graph_module.graph
    replaced_by: list[dict[str, int]] = []
    for rw in rewrites:
        replaced = {k: v for k, v in rw.rewrite_graph(graph, program).items() if v}
        replaced_by.append(replaced)
        if replaced:
            graph.eliminate_dead_code()
            program.graph_module.recompile()
            _propagate_values(program)
    if any(replaced_by):
        _name_signature(program)
        program.validate()
    return program, [RewriteResult(program, replaced) for replaced in replaced_by]


def _name_signature(program: torch.export.ExportedProgram) -> None:
    """Point the signature at the graph: its inputs at the placeholders (copying a graph renames a
    placeholder whose name is a Python builtin: ``nn.Sequential``'s ``input`` becomes
    ``input_1``), its outputs at the nodes the graph returns (an edit may have replaced the node
    that computed an output). Otherwise the program would no longer validate."""
    placeholders = [node for node in program.graph.nodes if node.op == "placeholder"]
    returned = program.graph.output_node().args[0]
    for specs, nodes in (
        (program.graph_signature.input_specs, placeholders),
        (program.graph_signature.output_specs, returned),
    ):
        for spec, node in zip(specs, nodes):
            if isinstance(node, torch.fx.Node) and isinstance(spec.arg, TensorArgument) and spec.arg.name != node.name:
                spec.arg = TensorArgument(name=node.name)


def _propagate_values(program: torch.export.ExportedProgram) -> None:
    """Record every node's value (``meta["val"]``) anew, as export would: fake tensors through
    the graph, in the fake mode the program's inputs were recorded in."""
    inputs = [node.meta["val"] for node in program.graph.nodes if node.op == "placeholder"]
    mode = next(v.fake_mode for v in inputs if isinstance(v, torch.Tensor) and hasattr(v, "fake_mode"))
    FakeTensorProp(program.graph_module, mode).propagate_dont_convert_inputs(*inputs)


class CallModule(torch.nn.Module):
    """``forward(*inputs)`` calls ``fn(*inputs, **kwargs)``: a test case in graph form, for export."""

    def __init__(self, fn: Callable, **kwargs):
        super().__init__()
        self.fn, self.kwargs = fn, kwargs

    def forward(self, *inputs):
        return self.fn(*inputs, **self.kwargs)
