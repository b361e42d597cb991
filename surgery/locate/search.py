"""Narrowing a TVM failure down to operators.

- Import and build failures: every operator is cut out alone (its inputs fed as placeholders,
  constants kept) and imported or built on its own. Operators alike (same operator, argument
  types and constants, see ``graph.signature``) are tried once; the rest are tried side by side
  in one program, halved while a program fails (group testing: a few dozen TVM runs for a
  model of a thousand operators, not a thousand). An import also fails where the converter
  types an output otherwise than PyTorch (a wrong shape breaks some later converter). When
  none of the operators found fails the way the whole program does, the shortest failing prefix
  of the graph (bisection) names the operator where the whole program's error arises.
- Wrong numbers: one build with every intermediate tensor marked as an output, run on the
  example inputs. Each operator is judged on the inputs TVM computed for it: its TVM output
  against the same operator in float64 on those inputs, with eager float32's error on them as
  the yardstick (``surgery.equivalence.judge``). Upstream noise thus never blames an operator
  downstream, and the first operator judged wrong is where TVM goes wrong. It is confirmed by
  running it in a program of its own fed with PyTorch's values. Marking outputs changes what
  TVM fuses: when no operator is judged wrong there (or the marked build is too big), the
  shortest prefix whose boundary tensors are judged wrong names the operator.
- The reproducer is the smallest of: the operator alone, with its producers 1-3 steps back, with
  everything it depends on, the prefix ending at it, that still fails the same way.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import torch
from torch import fx

from ..equivalence.judge import (
    Judgement,
    evaluate_graph,
    evaluate_node,
    judge,
    judge_outputs,
    largest_magnitude,
)
from ..rewrites.base import node_value
from ..tvm_backend import (
    TvmFunction,
    build,
    convert_program,
    error_line,
    fold_constants,
    native_log,
    output_types,
)
from .graph import ProgramGraph, Ref, Subprogram, signature

MARK_ALL_BYTES = 2**30  # above this, marking every tensor costs more memory than bisecting costs time
CANDIDATES = 5  # operators judged wrong in the marked build that are tried alone before bisecting
_UNSUPPORTED = re.compile(r"Unsupported function types \[([^\]]*)\]")


@dataclasses.dataclass
class Failure:
    step: str  # "import", "build", "run" or "numbers"
    message: str
    judgements: list[Judgement] = dataclasses.field(default_factory=list)  # numbers: per output


@dataclasses.dataclass
class Suspect:
    """An operator TVM gets wrong, how it was found, and the smallest program that shows it."""

    unit: fx.Node
    failure: Failure
    how: str
    alike: list[fx.Node] = dataclasses.field(default_factory=list)  # other operators of its signature
    reproducer: Subprogram | None = None
    reproducer_failure: Failure | None = None
    scope: str = ""  # what the reproducer holds: "the operator alone", ...


class Tvm:
    """TVM's three steps on a program, each failure caught and labelled with its step."""

    def __init__(self, schedules: str, log: list):
        self.schedules, self.log = schedules, log

    def attempt(self, program: torch.export.ExportedProgram, inputs=(), until: str = "run", check_types: bool = False):
        """(outputs or None, Failure or None), stopping after step ``until``. With
        ``check_types``, an import whose outputs TVM types otherwise than PyTorch fails."""
        step = "import"
        try:
            with native_log(self.log):
                mod = convert_program(program)
                wrong_type = check_types and _wrong_output_type(program, mod)
                if wrong_type:
                    return None, Failure("import", wrong_type)
                if until == "import":
                    return None, None
                step = "build"
                fn = TvmFunction(build(fold_constants(mod), schedules=self.schedules))
            if until == "build":
                return None, None
            step = "run"
            return fn(*inputs), None
        except Exception as exc:  # noqa: BLE001 - any TVM error is what we are looking for
            return None, Failure(step, error_line(exc))


def _wrong_output_type(program: torch.export.ExportedProgram, mod) -> str | None:
    """Where the imported module claims an output shape or dtype other than PyTorch's: a
    converter that computes something else (caught before building anything)."""
    output = next(n for n in program.graph.nodes if n.op == "output")
    expected = [node_value(n) for n in output.args[0]]
    for position, ((shape, dtype), value) in enumerate(zip(output_types(mod), expected)):
        if not isinstance(value, torch.Tensor):
            continue
        torch_dtype = str(value.dtype).replace("torch.", "")
        if (shape is not None and shape != tuple(value.shape)) or dtype != torch_dtype:
            return (
                f"TVM's converter makes output {position} {dtype}{list(shape) if shape is not None else '[?]'}, "
                f"PyTorch computes {torch_dtype}{list(value.shape)}"
            )
    return None


def _gist(message: str) -> str:
    """An error's kind and first words, without the names and numbers that differ from one
    program to another ("TypeError: Binary operators must have the same")."""
    return " ".join(re.sub(r"[\w.]*\d[\w.]*", "#", message).split()[:7])


def unsupported_types(message: str) -> set[str]:
    """Operator names TVM's importer lists as having no converter ("Unsupported function types")."""
    found = _UNSUPPORTED.search(message)
    return {name.strip().strip("'\"") for name in found.group(1).split(",")} if found else set()


def numbers_failure(judgements: list[Judgement]) -> Failure | None:
    """A numbers failure naming the output furthest past its tolerance, if any is."""
    wrong = [j for j in judgements if not j.ok]
    return Failure("numbers", str(max(wrong, key=lambda j: j.ratio)), judgements) if wrong else None


class Search:
    """The searches on one program: its graph, PyTorch's values of every node, TVM's steps."""

    def __init__(self, graph: ProgramGraph, values: dict, tvm: Tvm, progress: Callable[[str], None]):
        self.graph, self.values, self.tvm, self.progress = graph, values, tvm, progress
        self.tvm_values: dict | None = None  # every node's TVM value, once the marked build ran
        self.reference: dict | None = None  # every node's float64 value, once wrong numbers are searched

    # ----------------------------------------------------------------- failures of a step

    def fails(self, sub: Subprogram, steps: tuple[str, ...]) -> Failure | None:
        """How ``sub`` fails within ``steps`` (numbers judged when "numbers" is among them)."""
        importing = steps == ("import",)
        outputs, failure = self.tvm.attempt(
            sub.program, sub.inputs, "import" if importing else "run", check_types=importing
        )
        if failure is not None:
            return failure if failure.step in steps else None
        return numbers_failure(judge_outputs(sub.program.module(), sub.inputs, outputs)) if "numbers" in steps else None

    def cut(self, units, outputs, isolated=False) -> Subprogram | None:
        """``graph.cut``, or None where torch.export cannot re-export the piece (a group of
        operators side by side sometimes trips its shape guards; each alone does not)."""
        try:
            return self.graph.cut(units, outputs, self.values, isolated)
        except Exception as exc:  # noqa: BLE001
            if len(units) == 1:
                self.progress(f"  cannot cut out {units[0].name}: {error_line(exc, 200)}")
            return None

    def isolated_failures(self, units: list[fx.Node], steps: tuple[str, ...]) -> list[Suspect]:
        """Operators that fail ``steps`` alone, one per signature, found by group testing."""
        groups: dict[str, list[fx.Node]] = {}
        for unit in units:
            groups.setdefault(signature(unit), []).append(unit)
        representatives = [alike[0] for alike in groups.values()]
        self.progress(f"  trying {len(units)} operators ({len(representatives)} distinct) alone, side by side")
        found, pending, tried = [], [representatives], 0
        while pending:
            group = pending.pop(0)
            sub = self.cut(group, [r for u in group for r in self.graph.refs(u)], isolated=True)
            failure = self.fails(sub, steps) if sub is not None else None
            tried += 1
            if sub is None and len(group) > 1 or failure is not None and len(group) > 1:
                half = (len(group) + 1) // 2
                pending[:0] = [group[:half], group[half:]]
            elif failure is not None:
                unit = group[0]
                self.progress(f"  {unit.name} ({unit.target}) fails alone: {failure.message}")
                found.append(
                    Suspect(
                        unit,
                        failure,
                        f"{failure.step} fails with the operator alone",
                        groups[signature(unit)][1:],
                        sub,
                        failure,
                        "the operator alone",
                    )
                )
        self.progress(f"  {tried} TVM {'/'.join(steps)} attempts")
        return sorted(found, key=lambda s: self.graph.position[s.unit])

    def first_failing_prefix(self, failing: Callable[[int], Failure | None]) -> tuple[int, Failure]:
        """The shortest prefix of units that fails (the whole is known to fail), by bisection."""
        good, bad, failure = 0, len(self.graph.units), None
        while bad - good > 1:
            middle = (good + bad) // 2
            result = failing(middle)
            self.progress(
                f"  first {middle} of {len(self.graph.units)} operators: {'FAIL ' + result.message if result else 'ok'}"
            )
            if result is None:
                good = middle
            else:
                bad, failure = middle, result
        return bad, failure or failing(bad)

    def prefix(self, count: int) -> Subprogram | None:
        return self.cut(self.graph.units[:count], self.graph.frontier(count))

    def bisect(self, steps: tuple[str, ...]) -> Suspect | None:
        """The operator whose addition makes a prefix fail ``steps`` (None if no prefix does)."""
        self.progress(f"  bisecting over prefixes of the {len(self.graph.units)} operators")

        def failing(count: int) -> Failure | None:
            sub = self.prefix(count)
            return None if sub is None else self.fails(sub, steps)

        count, failure = self.first_failing_prefix(failing)
        if failure is None:
            self.progress("  no prefix fails on its own")
            return None
        unit = self.graph.units[count - 1]
        suspect = Suspect(unit, failure, f"the first {count} operators fail, the first {count - 1} do not")
        return self.reduce(suspect, steps, count)

    def reduce(self, suspect: Suspect, steps: tuple[str, ...], prefix_count: int | None = None) -> Suspect:
        """Give the suspect the smallest reproducer that still fails (see the module docstring)."""
        unit, graph = suspect.unit, self.graph
        attempts = [("the operator alone", [unit], graph.refs(unit))]
        for depth in (1, 2, 3):
            attempts.append(
                (
                    f"the operator with its producers {depth} step{'s' if depth > 1 else ''} back",
                    graph.producers(unit, depth),
                    graph.refs(unit),
                )
            )
        attempts.append(("the operator with everything it depends on", graph.ancestors(unit), graph.refs(unit)))
        if prefix_count is not None:
            attempts.append(
                (f"the first {prefix_count} operators", graph.units[:prefix_count], graph.frontier(prefix_count))
            )
        tried = []
        for scope, units, outputs in attempts:
            if units in tried:
                continue
            tried.append(units)
            sub = self.cut(units, outputs)
            failure = None if sub is None else self.fails(sub, steps)
            self.progress(
                f"  reproducer: {scope} ({len(units)} operators): {'fails: ' + failure.message if failure else 'passes'}"
            )
            if failure is not None:
                suspect.reproducer, suspect.reproducer_failure, suspect.scope = sub, failure, scope
                return suspect
        return suspect

    # ----------------------------------------------------------------- the three searches

    def import_failures(self, message: str) -> list[Suspect]:
        """Operators TVM's importer rejects (no converter) or fails on."""
        rejected = unsupported_types(message)
        suspects = []
        for name in sorted(rejected):
            units = [u for u in self.graph.units if getattr(u.target, "__name__", "") == name]
            if units:
                failure = Failure(
                    "import", f"no converter: TVM's importer says 'Unsupported function types' for {name}"
                )
                suspect = Suspect(units[0], failure, "named by TVM's importer", units[1:])
                suspects.append(self.reduce(suspect, ("import",)))
        rest = [u for u in self.graph.units if getattr(u.target, "__name__", "") not in rejected]
        suspects += self.isolated_failures(rest, ("import",))
        return self.explained(message, suspects, ("import",))

    def build_failures(self, message: str) -> list[Suspect]:
        """Operators whose lowering breaks TVM's build (or whose compiled code fails to run)."""
        return self.explained(
            message, self.isolated_failures(self.graph.units, ("import", "build", "run")), ("import", "build", "run")
        )

    def explained(self, message: str, suspects: list[Suspect], steps: tuple[str, ...]) -> list[Suspect]:
        """The suspects, and when none of them fails the way the whole program does (the error
        TVM gave the user), the operator that makes the shortest prefix fail (by bisection)."""
        if not any(_gist(s.failure.message) == _gist(message) for s in suspects):
            bisected = self.bisect(steps)
            found = {s.unit: s for s in suspects}
            if bisected is not None and bisected.unit in found:
                found[bisected.unit].how += f"; the whole program's error ({message[:120]}) arises downstream of it"
            elif bisected is not None:
                inside = [s.unit.name for s in suspects if bisected.reproducer and s.unit in bisected.reproducer.units]
                if inside:
                    bisected.how += f"; its reproducer holds {', '.join(inside)}, wrong alone (see there)"
                suspects.append(bisected)
        return sorted(suspects, key=lambda s: self.graph.position[s.unit])

    def wrong_numbers(self, inputs: tuple) -> list[Suspect]:
        """The first operator TVM computes wrongly from its inputs (see the module docstring)."""
        graph = self.graph
        self.reference = evaluate_graph(graph.module, inputs, float64=True, keep_all=True)[1]
        marked_bytes = sum(
            v.numel() * v.element_size()
            for u in graph.units
            for r in graph.refs(u)
            if isinstance(v := graph.value(r, self.values), torch.Tensor)
        )
        if marked_bytes <= MARK_ALL_BYTES:
            suspect = self.marked_search()
            if suspect is not None:
                return [suspect]
        else:
            self.progress(f"  marking every tensor would hold {marked_bytes / 2**30:.1f} GiB: bisecting instead")
        suspect = self.bisect(("numbers",))
        return [suspect] if suspect else []

    def judge_ref(self, ref: Ref, value: torch.Tensor) -> Judgement:
        return judge(value, self.graph.value(ref, self.values), self.graph.value(ref, self.reference))

    def marked_search(self) -> Suspect | None:
        graph = self.graph
        refs = [r for u in graph.units for r in graph.refs(u)]
        self.progress(f"  one build with all {len(refs)} intermediate tensors marked as outputs")
        sub = self.cut(graph.units, refs)
        if sub is None:
            return None
        outputs, failure = self.tvm.attempt(sub.program, sub.inputs)
        if failure is not None:
            self.progress(f"  the marked build fails ({failure.message}): bisecting instead")
            return None
        self.tvm_values = {n: self.values[n] for n in graph.inputs}
        for (node, index), value in zip(refs, outputs):
            if index is None:
                self.tvm_values[node] = value
            else:
                self.tvm_values.setdefault(node, [None] * len(graph.value((node, None), self.values)))[index] = value
        candidates = []
        for unit in graph.units:
            failure = numbers_failure(self.judge_locally(unit))
            if failure is not None:
                candidates.append(
                    Suspect(unit, failure, "first operator TVM computes wrongly from its own inputs (marked build)")
                )
                self.progress(
                    f"  {unit.name} ({unit.target}) wrong from its own inputs: {candidates[-1].failure.message}"
                )
                if len(candidates) == CANDIDATES:
                    break
        for suspect in candidates:
            self.reduce(suspect, ("numbers",))
            if suspect.reproducer is not None:
                return suspect
        if candidates:
            candidates[0].how += "; not reproduced on its own (only in the marked build)"
            return candidates[0]
        self.progress("  no operator is wrong in the marked build (marking outputs changes fusion): bisecting")
        return None

    def judge_locally(self, unit: fx.Node) -> list[Judgement]:
        """TVM's output(s) of ``unit`` against the operator run by PyTorch on TVM's inputs; only
        the outputs something reads (a layer norm's unread mean and rstd cannot make a program
        wrong, and TVM 0.25/0.26 shape them wrongly)."""
        graph = self.graph

        def tvm_value(node):
            return graph.value(graph.ref_of(node), self.tvm_values)

        try:
            eager = evaluate_node(unit, tvm_value)
            reference = evaluate_node(unit, tvm_value, float64=True)
        except Exception:  # noqa: BLE001 - TVM's inputs are unusable (judged wrong upstream)
            return []
        scale = largest_magnitude(graph.value(r, self.tvm_values) for r in graph.input_refs(unit))
        return [
            judge(
                graph.value(r, self.tvm_values),
                eager if i is None else eager[i],
                reference if i is None else reference[i],
                scale,
            )
            for r in graph.refs(unit)
            if graph.users(r)
            for i in [r[1]]
        ]

    def path(self, suspect: Suspect, limit: int = 8) -> list[dict]:
        """Error statistics along the path: the suspect's inputs, the suspect, and on towards
        the program's outputs along the users judged furthest off."""
        graph = self.graph
        values = self.tvm_values
        if values is None or self.reference is None:
            return []

        def row(ref: Ref, role: str) -> dict:
            node = ref[0]
            value = graph.value(ref, values) if node in values else None
            verdict = self.judge_ref(ref, value) if isinstance(value, torch.Tensor) else None
            return {
                "node": node.name if ref[1] is None else f"{node.name}[{ref[1]}]",
                "op": str(node.target) if node.op == "call_function" else "program input",
                "role": role,
                "judgement": verdict,
            }

        rows = [row(r, "input") for r in graph.input_refs(suspect.unit)]
        rows += [row(r, "suspect") for r in graph.refs(suspect.unit)]
        current = graph.refs(suspect.unit)[0]
        for _ in range(limit):
            users = [u for u in graph.users(current) if u in graph.position]
            if not users:
                break
            ranked = [(self.judge_ref(r, graph.value(r, values)).ratio, r) for u in users for r in graph.refs(u)]
            current = max(ranked, key=lambda pair: pair[0])[1]
            rows.append(row(current, "downstream"))
        return rows
