"""The program as ``locate`` sees it: operator nodes in topological order, what each one is in
the user's terms, and small programs cut out of it (one operator alone, a prefix, everything
marked as an output) that TVM can import and build on their own.

A *unit* is one operator call of the program as given to TVM (in-place operators made
functional; TVM's importer decomposes to core ATen itself): a ``call_function`` node that
produces tensors (a multi-output operator, ``native_layer_norm``, is one unit with its
``getitem`` nodes). A *ref* ``(unit, index)`` names one tensor a unit produces (index None for a
single tensor).
"""

from __future__ import annotations

import dataclasses
import operator
import os
import re
from collections.abc import Callable, Sequence

import torch
from torch import fx

from ..equivalence.judge import attribute, is_assertion
from ..rewrites.base import node_value

Ref = tuple[fx.Node, "int | None"]
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<function>\S+)\n\s*(?P<code>[^\n]*)')
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _tensor_elements(value) -> list[int | None] | None:
    """Indices of the tensors a node's value holds: [None] for a tensor, None for no tensor."""
    if isinstance(value, torch.Tensor):
        return [None]
    if isinstance(value, (tuple, list)):
        indices = [i for i, v in enumerate(value) if isinstance(v, torch.Tensor)]
        return indices or None
    return None


def _describe_value(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).replace('torch.', '')}{list(value.shape)}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_describe_value(v) for v in value) + ")"
    return repr(value)


def _describe_arg(arg) -> str:
    if isinstance(arg, fx.Node):
        kind = "constant " if arg.op == "get_attr" else ""
        return kind + _describe_value(node_value(arg))
    if isinstance(arg, (tuple, list)):
        return "[" + ", ".join(_describe_arg(a) for a in arg) + "]"
    return repr(arg)


def source_line(node: fx.Node) -> str | None:
    """Where the user's code called this operator: the innermost frame of the node's recorded
    stack outside torch's own package (else its innermost frame)."""
    frames = list(_FRAME.finditer(node.meta.get("stack_trace") or ""))
    if not frames:
        return None
    user = [f for f in frames if not f["file"].startswith(_TORCH_DIR)] or frames
    frame = user[-1]
    return f"{frame['file']}:{frame['line']} in {frame['function']}: {frame['code'].strip()}"


def module_path(node: fx.Node) -> str | None:
    """The submodule the operator ran in (``nn_module_stack``'s innermost entry) and its class."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    return f"{path or '<root>'} ({str(cls).rsplit('.', 1)[-1]})"


@dataclasses.dataclass
class NodeInfo:
    """One operator node in the user's terms, for reports."""

    name: str
    op: str
    call: str  # "aten.div.Tensor_mode(float32[4, 5], 2, rounding_mode='floor')"
    output: str
    source: str | None
    module: str | None
    decomposed_from: str | None  # the operator the program called, when decomposition made this one

    @classmethod
    def of(cls, node: fx.Node) -> NodeInfo:
        args = [_describe_arg(a) for a in node.args] + [f"{k}={_describe_arg(v)}" for k, v in node.kwargs.items()]
        original = str(node.meta.get("original_aten") or node.target)
        return cls(
            node.name,
            str(node.target),
            f"{node.target}({', '.join(args)})",
            _describe_value(node_value(node)),
            source_line(node),
            module_path(node),
            original if original != str(node.target) else None,
        )

    def operator(self) -> str:
        return self.op + (f" (decomposed from {self.decomposed_from})" if self.decomposed_from else "")

    def where(self) -> str:
        parts = [p for p in (self.source, self.module and f"module {self.module}") if p]
        return "; ".join(parts) or "no source recorded (made by a rewrite)"


def signature(node: fx.Node) -> str:
    """Operator and argument types (constants marked): nodes alike to TVM's converter and build."""
    return NodeInfo.of(node).call


@dataclasses.dataclass
class Subprogram:
    """A program cut out of the graph, ready for TVM, and what its inputs and outputs are."""

    program: torch.export.ExportedProgram
    inputs: tuple[torch.Tensor, ...]  # PyTorch's values for its placeholders
    outputs: list[Ref]  # what each output is
    units: list[fx.Node]  # the operators it computes


def functional(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The program without in-place operators (so that values can be kept per node), its
    operators otherwise as the user's code called them (TVM's importer decomposes them itself)."""
    for node in program.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op == "call_function" and schema is not None and schema.is_mutable:
            return program.run_decompositions({})
    return program


class ProgramGraph:
    """A program as TVM's importer is given it, its units, and how to cut pieces out of it."""

    def __init__(self, program: torch.export.ExportedProgram):
        self.program = functional(program)
        self.module = self.program.module()
        self.graph = self.module.graph
        self.inputs = [n for n in self.graph.nodes if n.op == "placeholder"]
        self.units = [
            n
            for n in self.graph.nodes
            if n.op == "call_function"
            and n.target is not operator.getitem
            and not is_assertion(n)
            and _tensor_elements(node_value(n))
        ]
        self.position = {u: i for i, u in enumerate(self.units)}

    def refs(self, unit: fx.Node) -> list[Ref]:
        return [(unit, i) for i in _tensor_elements(node_value(unit))]

    def ref_of(self, node: fx.Node) -> Ref:
        """The tensor a node stands for: a getitem node is its producer's element."""
        if node.op == "call_function" and node.target is operator.getitem:
            return (node.args[0], node.args[1])
        return (node, None)

    def users(self, ref: Ref) -> list[fx.Node]:
        """Nodes reading a tensor (through the getitem node of a multi-output unit)."""
        node, index = ref
        if index is None:
            return [u for u in node.users if not is_assertion(u)]
        return [u for g in node.users if g.args[1] == index for u in g.users if not is_assertion(u)]

    def input_refs(self, unit: fx.Node) -> list[Ref]:
        """The tensors a unit reads that are computed or given (not constants), in argument order."""
        refs = []
        for node in unit.all_input_nodes:
            ref = self.ref_of(node)
            if node.op != "get_attr" and ref not in refs and isinstance(value_at(ref, node_value), torch.Tensor):
                refs.append(ref)
        return refs

    def value(self, ref: Ref, values: dict):
        """A tensor's value in ``values`` (node -> value; constants read from the module)."""
        node, _ = ref
        if node.op == "get_attr":
            return attribute(self.module, node.target)
        return value_at(ref, values.__getitem__)

    def frontier(self, count: int) -> list[Ref]:
        """Tensors of the first ``count`` units read after them or returned by the program (and the
        last unit's, so that a prefix always computes its last operator)."""
        later = set(self.units[count:]) | {n for n in self.graph.nodes if n.op == "output"}
        last = self.refs(self.units[count - 1])
        return [
            ref
            for unit in self.units[:count]
            for ref in self.refs(unit)
            if ref in last or any(u in later for u in self.users(ref))
        ]

    def producers(self, unit: fx.Node, depth: int) -> list[fx.Node]:
        """``unit`` and the units it reads from, up to ``depth`` steps back, in graph order."""
        found, layer = {unit}, {unit}
        for _ in range(depth):
            layer = {ref[0] for u in layer for ref in self.input_refs(u) if ref[0] in self.position} - found
            found |= layer
        return sorted(found, key=self.position.__getitem__)

    def ancestors(self, unit: fx.Node) -> list[fx.Node]:
        return self.producers(unit, len(self.units))

    def cut(self, units: Sequence[fx.Node], outputs: Sequence[Ref], values: dict, isolated: bool = False) -> Subprogram:
        """A program computing ``outputs`` with ``units``. Every tensor they read that they do
        not compute themselves (with ``isolated``: every tensor they read) is an input, fed
        with its value in ``values``; constants stay constants."""
        inside = set(units)
        graph = fx.Graph()

        def fed_from_outside(ref: Ref) -> bool:
            return isolated or ref[0] not in inside

        fed: list[Ref] = []
        for unit in units:
            for ref in self.input_refs(unit):
                if fed_from_outside(ref) and ref not in fed:
                    fed.append(ref)
        placeholders = {}
        for ref in fed:
            name = ref[0].name if ref[1] is None else f"{ref[0].name}_{ref[1]}"
            placeholders[ref] = graph.placeholder(name)
            placeholders[ref].meta["val"] = value_at(ref, node_value)
        copies: dict[fx.Node, fx.Node] = {}

        def inner(node: fx.Node) -> fx.Node:
            ref = self.ref_of(node)
            if node.op == "get_attr":
                if node not in copies:
                    copies[node] = graph.node_copy(node)
                return copies[node]
            if fed_from_outside(ref):
                return placeholders[ref]
            return copies[ref[0]] if ref[1] is None else graph.call_function(operator.getitem, (copies[ref[0]], ref[1]))

        for unit in units:
            copies[unit] = graph.node_copy(unit, inner)
        graph.output(
            tuple(copies[n] if i is None else graph.call_function(operator.getitem, (copies[n], i)) for n, i in outputs)
        )
        graph.lint()
        inputs = tuple(self.value(ref, values) for ref in fed)
        program = torch.export.export(fx.GraphModule(self.module, graph), inputs)
        return Subprogram(program, inputs, list(outputs), list(units))


def value_at(ref: Ref, value_of: Callable[[fx.Node], object]):
    node, index = ref
    value = value_of(node)
    return value if index is None else value[index]
