"""Where stock TVM goes wrong on an exported program, found by itself: the library behind
``python -m surgery locate``.

    from surgery.locate import locate
    from surgery.pipeline import ModelSpec

    found = locate(ModelSpec.from_module("mine", module, args), rewrites="none", out_dir="out/locate/mine")
    found.verdict                  # "nothing diverges", "import failure", "build failure", "run failure", "wrong numbers"
    found.culprits[0].node.where() # the user's source line and module of the operator
    found.culprits[0].reproducer   # program.pt2, inputs.pt, reproduce.py (torch + TVM only)

The program is exported and rewritten as ``apply`` would (``rewrites``, ``schedules``), then
imported, built and run whole on the example inputs. Its outputs are judged against a float64
run of the same program (``surgery.equivalence.judge``). Only when a step fails or an output is
judged wrong does the search (``surgery.locate.search``) cut the program into pieces.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..atomic import write_text
from ..equivalence.judge import Judgement, evaluate_graph, judge_outputs, rule_text
from ..pipeline import ModelSpec, export, rewrite, stage_done
from ..rewrites import REGISTRY
from ..tvm_backend import (
    cache_root,
    compile_program,
    error_line,
    native_log,
    speed_rewrites,
)
from . import reproducer
from .graph import NodeInfo, ProgramGraph
from .search import Failure, Search, Suspect, Tvm

NOTHING = "nothing diverges"
VERDICTS = {"import": "import failure", "build": "build failure", "run": "run failure", "numbers": "wrong numbers"}
MAX_CULPRITS = 10  # reported, each with its reproducer (import failures can name many)


@dataclasses.dataclass
class Culprit:
    """An operator TVM gets wrong, where it is in the user's code, and what to do about it."""

    stage: str  # "import", "build", "run" or "numbers"
    node: NodeInfo
    error: str
    how: str  # how it was found
    alike: list[NodeInfo]  # other operators of the same signature, which fail the same way
    judgements: list[Judgement]  # numbers: per output of the operator
    path: list[dict]  # numbers: error statistics from its inputs on towards the outputs
    reproducer: dict | None  # paths, what it holds, and whether its script reproduces
    rewrites: list[str]  # registered rewrites that replace the operator
    next_step: str


@dataclasses.dataclass
class Location:
    model: str
    description: dict
    verdict: str
    culprits: list[Culprit]
    outputs: dict[str, Judgement]  # the whole program's outputs, when it ran
    whole_failure: str | None  # TVM's error on the whole program
    rewrites: dict  # mode, applied, reasons
    schedules: str
    operators: int  # operator nodes of the program TVM imports
    judge: str
    stages_s: dict[str, float]
    artifacts: dict[str, str]

    @property
    def diverges(self) -> bool:
        return self.verdict != NOTHING


class _Stages:
    """Timed stages, each reported as a progress line like ``apply``'s."""

    def __init__(self, progress: Callable[[str], None]):
        self.progress, self.seconds, self.start = progress, {}, time.perf_counter()

    def done(self, name: str, detail: str = "") -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + stage_done(name, self.start, self.progress, detail)
        self.start = time.perf_counter()


def rewrites_replacing(node: torch.fx.Node) -> list[str]:
    """Registered rewrites that replace the node (``Rewrite.replaces``)."""
    return [name for name, cls in REGISTRY.items() if cls().replaces(node)]


def next_step(culprit_op: str, rewrites: list[str], reasons: dict[str, str], reproducer_dir: str | None) -> str:
    """What the user can do about a culprit: the rewrite that replaces it, or an upstream report."""
    if not rewrites:
        where = f" ({reproducer_dir}/reproduce.py)" if reproducer_dir else ""
        return (
            f"no registered rewrite replaces {culprit_op}: report it upstream with the reproducer{where}, "
            "or write a rewrite (surgery/rewrites) that replaces it"
        )
    name = rewrites[0]
    step = f"the {name} rewrite replaces {culprit_op}: run with --rewrite {name}"
    if reasons.get(name, "").startswith("skipped"):
        step += f" (--rewrite auto {reasons[name]})"
    if reproducer_dir:
        step += (
            f"; to have --rewrite auto apply it from now on, keep the reproducer as a probe case: "
            f"--save-probe {name}, or python -m surgery probe add {reproducer_dir} --rewrite {name}"
        )
    return step


def locate(
    spec: ModelSpec,
    *,
    rewrites: str | Sequence[str] = "auto",
    schedules: str = "default",
    out_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: Callable[[str], None] = print,
    run_reproducers: bool = True,
) -> Location:
    """Find where TVM goes wrong on ``spec``'s program (see the module docstring).

    ``rewrites``/``schedules`` as for ``surgery.pipeline.operate`` (default ``"default"``: stock
    TVM's CPU pipeline, the build the reproducer scripts use). ``out_dir``: where reproducers go
    (none written without it). ``run_reproducers``: run each reproducer script in a fresh
    interpreter to record whether stock TVM fails it.
    """
    if schedules not in ("ours", "default"):
        raise ValueError(f"schedules must be 'ours' or 'default', got {schedules!r}")
    exported = export(spec, progress=progress)
    rewritten = rewrite(exported, rewrites, progress=progress)
    stages = _Stages(progress)
    stages.seconds.update({**exported.stages_s, **rewritten.stages_s})
    program, applied, reasons = rewritten.program, dict(rewritten.applied), rewritten.reasons
    if schedules == "ours":
        program, speed = speed_rewrites(program)
        applied.update(speed)
        stages.done("speed", ", ".join(speed) or "none")
    graph = ProgramGraph(program)
    args = tuple(spec.example_args)
    stages.done("prepare", f"{len(graph.units)} operators in the program TVM imports")

    tvm_log: list[str] = []
    tvm = Tvm(schedules, tvm_log)
    location = Location(
        spec.name,
        spec.description,
        NOTHING,
        [],
        {},
        None,
        {"mode": rewrites if isinstance(rewrites, str) else list(rewrites), "applied": applied, "reasons": reasons},
        schedules,
        len(graph.units),
        rule_text(),
        stages.seconds,
        {},
    )
    failure = _run_whole(graph, args, tvm, schedules, cache_dir, tvm_log, spec, location)
    stages.done("TVM", failure.message if failure else "whole program: every output within the judge's tolerance")
    if failure is not None:
        location.verdict = VERDICTS[failure.step]
        search = Search(graph, _values(graph, args), tvm, progress)
        with native_log(tvm_log):  # TVM's C++ warnings, some printed as its objects are freed
            suspects = _suspects(search, failure, args)
        stages.done(
            "search", f"{len(suspects)} culprit(s): " + ", ".join(f"{s.unit.name} ({s.unit.target})" for s in suspects)
        )
        location.culprits = [_culprit(s, search, reasons, spec, schedules, out_dir) for s in suspects[:MAX_CULPRITS]]
        if out_dir is not None and run_reproducers:
            _run_reproducers(location.culprits, progress)
            stages.done(
                "reproduce", f"{sum(1 for c in location.culprits if c.reproducer)} reproducer(s) written and run"
            )
    if out_dir is not None and tvm_log:
        location.artifacts["tvm_log"] = str(write_text(Path(out_dir) / "tvm.log", "\n".join(tvm_log) + "\n"))
    return location


def _suspects(search: Search, failure: Failure, args: tuple) -> list[Suspect]:
    """The search that fits how the whole program failed."""
    if failure.step == "import":
        return search.import_failures(failure.message)
    if failure.step in ("build", "run"):
        return search.build_failures(failure.message)
    return search.wrong_numbers(args)


def _run_reproducers(culprits: list[Culprit], progress: Callable[[str], None]) -> None:
    """Run each reproducer's script in a fresh interpreter: does stock TVM fail on it?"""
    for culprit in culprits:
        if culprit.reproducer:
            culprit.reproducer.update(reproducer.run_script(culprit.reproducer["script"]))
            progress(
                f"  {culprit.reproducer['script']}: "
                f"{'reproduces' if culprit.reproducer['reproduces'] else 'does NOT reproduce'} with stock TVM (llvm)"
            )


def _run_whole(
    graph: ProgramGraph,
    args: tuple,
    tvm: Tvm,
    schedules: str,
    cache_dir,
    tvm_log: list,
    spec: ModelSpec,
    location: Location,
) -> Failure | None:
    """Import, build and run the whole program, and judge its outputs; the failure, if any."""
    try:
        fn, _ = compile_program(graph.program, schedules=schedules, cache_dir=cache_root(cache_dir), log=tvm_log)
    except Exception as exc:  # noqa: BLE001 - which step failed decides the search
        failure = tvm.attempt(graph.program, until="import")[1] or Failure("build", error_line(exc))
        location.whole_failure = failure.message
        return failure
    try:
        with native_log(tvm_log):
            outputs = fn(*args)
    except Exception as exc:  # noqa: BLE001
        location.whole_failure = error_line(exc)
        return Failure("run", location.whole_failure)
    names = list(spec.output_names) + [f"output{i}" for i in range(len(spec.output_names), len(outputs))]
    location.outputs = dict(zip(names, judge_outputs(graph.module, args, outputs)))
    wrong = {name: j for name, j in location.outputs.items() if not j.ok}
    if not wrong:
        return None
    location.whole_failure = "; ".join(f"{name}: {j}" for name, j in wrong.items())
    return Failure("numbers", location.whole_failure)


def _values(graph: ProgramGraph, args: tuple) -> dict:
    """PyTorch's value of every node on the example inputs (what cut-out pieces are fed)."""
    return evaluate_graph(graph.module, args, keep_all=True)[1]


def _culprit(suspect: Suspect, search: Search, reasons: dict, spec: ModelSpec, schedules: str, out_dir) -> Culprit:
    info = NodeInfo.of(suspect.unit)
    saved = None
    if out_dir is not None and suspect.reproducer is not None:
        failure = suspect.reproducer_failure or suspect.failure
        context = {"model": spec.name, "schedules": schedules, "found": suspect.how}
        saved = reproducer.save(
            Path(out_dir) / f"repro_{info.name}",
            suspect.reproducer,
            info,
            f"{failure.step}: {failure.message}",
            suspect.scope,
            context,
        )
    covering = rewrites_replacing(suspect.unit)
    return Culprit(
        suspect.failure.step,
        info,
        suspect.failure.message,
        suspect.how,
        [NodeInfo.of(n) for n in suspect.alike],
        suspect.failure.judgements,
        search.path(suspect) if suspect.failure.step == "numbers" else [],
        saved,
        covering,
        next_step(info.operator(), covering, reasons, saved and saved["dir"]),
    )


__all__ = ["NOTHING", "Culprit", "Location", "locate", "rewrites_replacing"]
