"""Export -> rewrite -> verify -> compile with TVM -> run -> report: the library behind
``python -m surgery apply``, usable directly from a notebook::

    from models import geometry_encoder_spec
    from surgery.pipeline import ModelSpec, operate

    spec = geometry_encoder_spec(points=3, boxes=2)     # or ModelSpec.from_module(name, module, args)
    result = operate(spec)                              # a Surgery: programs, callables, report
    result.rewritten_module(*spec.example_args)         # rewritten PyTorch, same results
    result.tvm(*spec.example_args)                      # the TVM-compiled function, same results
    result.report.equivalence                           # result.report: a surgery.equivalence.report.SurgeryReport

``operate`` calls these steps in order, each a function returning a frozen result that the next
ones take, and reports what they found; call them one by one to look at (or redo) a step::

    from surgery.pipeline import compile_with_tvm, export, measure, rewrite, save, verify, verify_compiled

    exported = export(spec)                             # .program, .census
    rewritten = rewrite(exported, "all")                # .program, .module, .applied
    verified = verify(spec, exported, rewritten, examples=10)       # .stats, .failures
    compiled = compile_with_tvm(spec, rewritten)        # .fn (None when it failed), .info
    checked = verify_compiled(spec, exported, rewritten, compiled, examples=10)
    measured = measure(spec, rewritten, compiled)       # .latency, median ms
    saved = save(spec, exported, rewritten, compiled, "out/mine")   # .artifacts
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torchvision  # noqa: F401  programs holding torchvision ops need it registered before loading
from hypothesis import strategies as st

from . import op_census, rewrite_with_log
from .atomic import atomic_path
from .equivalence.compare import ErrorStats, accumulate, compare
from .equivalence.judge import JudgedStats, evaluate_along, largest_magnitude, reordered_at_ties, unpermuted
from .equivalence.report import SurgeryReport
from .equivalence.verify import PropertyFailed, check_property
from .paths import display_path
from .rewrites import REGISTRY, RewriteError
from .rewrites.base import decomposed
from .stages import StagedPrograms, hoist
from .tvm_backend import cache_root, compile_program, host_target, native_log, probe, speed_rewrites


class SurgeryFailed(RuntimeError):
    """Raised by ``operate(..., raise_on_failure=True)`` when an equivalence check fails."""


@dataclasses.dataclass
class ModelSpec:
    """What ``operate`` needs to know about a model: built by an adapter in ``models/``."""

    name: str
    module: torch.nn.Module | None  # None when only a saved program exists
    example_args: tuple
    input_names: Sequence[str]
    output_names: Sequence[str]
    # Hypothesis strategy of input tuples of the exported shapes, for the equivalence checks.
    input_strategy: object
    description: dict
    program: torch.export.ExportedProgram | None = None  # given instead of exporting module
    # Inputs whose dependent computation is worth hoisting into a stage of its own (computed
    # once, reused across calls): a prompt encoder's image features.
    stage_inputs: tuple[str, ...] | None = None
    stage_names: tuple[str, str] = ("stage", "rest")  # of the hoisted stage and of the rest, for artifacts
    # Judge float outputs against a float64 run of the original program (surgery.equivalence.judge)
    # instead of the fixed bound of 1e-5: for deep networks whose own float32 noise exceeds it.
    judged: bool = False
    # What apply does unless told otherwise: hypothesis examples per check (each runs the original
    # and the candidate, and a judged spec the original in float64 too) and the TVM build.
    examples: int = 20
    schedules: str = "ours"
    # Judged specs whose outputs hold queries ranked by a topk along this dim (a detector's
    # [B, queries, ...]): rows a candidate ranked otherwise at a verified near-tie are compared
    # where eager has them (``judge.reordered_at_ties``); None: rows must match as they are.
    query_dim: int | None = None

    @classmethod
    def from_module(
        cls,
        name: str,
        module: torch.nn.Module,
        example_args: tuple,
        input_strategy=None,
        output_names: Sequence[str] | None = None,
    ) -> ModelSpec:
        """A spec for your own module. Without ``input_strategy``, checks draw random inputs
        shaped like ``example_args`` (see ``_random_like`` for what that means per dtype)."""
        return cls(
            name=name,
            module=module.eval(),
            example_args=tuple(example_args),
            input_names=[f"input{i}" for i in range(len(example_args))],
            output_names=list(output_names)
            if output_names
            else [f"output{i}" for i in range(len(_outputs(module(*example_args))))],
            input_strategy=input_strategy or _random_inputs_like(example_args),
            description={"model": type(module).__name__, "weights": "as given"},
        )


@dataclasses.dataclass(frozen=True)
class Surgery:
    """The result: original and rewritten programs, callables, TVM function, report."""

    spec: ModelSpec
    original: torch.export.ExportedProgram
    rewritten: torch.export.ExportedProgram
    tvm: object | None  # surgery.tvm_backend.TvmFunction, or a surgery.stages.StagedFunction when split
    report: SurgeryReport

    @property
    def passed(self) -> bool:
        return self.report.passed

    @property
    def rewritten_module(self) -> torch.nn.Module:
        return self.rewritten.module()

    @property
    def original_module(self) -> torch.nn.Module:
        return self.original.module()


def choose_rewrites(mode: str | Sequence[str], progress=print) -> tuple[list[str], dict[str, str]]:
    """``"auto"`` (probe TVM), ``"all"``, ``"none"`` or explicit names -> (names, reason per name)."""
    if mode == "all":
        return list(REGISTRY), {n: "--rewrite all" for n in REGISTRY}
    if mode == "none":
        return [], {n: "--rewrite none" for n in REGISTRY}
    if mode == "auto":
        found = probe(progress=progress)
        return found.needed(), {
            n: ("applied: " if f.needed else "skipped: ") + f.reason for n, f in found.findings.items()
        }
    names = list(mode)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise RewriteError(f"unknown rewrite {unknown[0]!r}; known rewrites: {', '.join(REGISTRY)}")
    return names, {n: ("applied: named on the command line" if n in names else "skipped: not named") for n in REGISTRY}


def _outputs(value) -> tuple[torch.Tensor, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _compare_outputs(spec: ModelSpec, actual, expected) -> dict[str, ErrorStats]:
    """Per named output; integer and boolean outputs (masks) must be identical (see compare)."""
    return {
        name: compare(a.detach(), e.detach())
        for name, a, e in zip(spec.output_names, _outputs(actual), _outputs(expected))
    }


def _judge_outputs(spec: ModelSpec, actual, expected, reference, scale: float) -> dict[str, JudgedStats]:
    """Per named output, judged against the float64 ``reference`` (see ``ModelSpec.judged``)."""
    outputs64, selections = reference
    stats = {
        name: JudgedStats.of(a.detach(), e.detach(), r, scale)
        for name, a, e, r in zip(spec.output_names, _outputs(actual), _outputs(expected), outputs64)
    }
    if spec.query_dim is None or all(s.within_bounds() for s in stats.values()):
        return stats
    permutation = reordered_at_ties(_outputs(actual), expected, selections, spec.query_dim)
    if permutation is None:
        return stats
    moved = int((permutation != torch.arange(permutation.shape[1])).sum())
    restored = [unpermuted(a.detach(), permutation, spec.query_dim) for a in _outputs(actual)]
    return {
        name: dataclasses.replace(JudgedStats.of(a, e.detach(), r, scale), reordered=moved)
        for name, a, e, r in zip(spec.output_names, restored, expected, outputs64)
    }


def _check(
    spec: ModelSpec,
    reference_fn,
    candidate_fn,
    examples: int,
    seed: int,
    label: str,
    failures: list,
    float64_fn: Callable | None = None,
) -> dict:
    """Property check of ``candidate_fn`` against ``reference_fn`` on the spec's input strategy;
    with ``float64_fn`` (the original program in float64), judged against it."""
    total: dict[str, ErrorStats] = {}

    def check(args):
        with torch.no_grad():
            actual, expected = candidate_fn(*args), _outputs(reference_fn(*args))
            if float64_fn is None:
                stats = _compare_outputs(spec, actual, expected)
            else:
                stats = _judge_outputs(spec, actual, expected, float64_fn(*args), largest_magnitude(args))
        accumulate(total, stats)
        bad = {k: str(v) for k, v in stats.items() if not v.within_bounds()}
        assert not bad, f"{label}: {bad}"

    if examples > 0:
        try:
            check_property(spec.input_strategy, check, examples, seed)
        except PropertyFailed as exc:
            failures.append(
                {"check": label, "error": str(exc), "counterexample": _describe_inputs(spec, exc.counterexample)}
            )
    return total


def _float64_reference(spec: ModelSpec, exported: Exported) -> Callable | None:
    """The original program run in float64 along eager float32's path (``evaluate_along``: topk
    and the like choose as float32 did), for specs judged against it (else None)."""
    if not spec.judged:
        return None
    graph = exported.program.module()

    def float64_run(*args):
        selections: list = []
        return evaluate_along(graph, args, selections)[1], selections

    return float64_run


def _describe_inputs(spec: ModelSpec, args) -> dict:
    if not isinstance(args, tuple):
        return {"value": repr(args)[:2000]}
    return {
        name: (
            repr(a.tolist())[:2000]
            if isinstance(a, torch.Tensor) and a.numel() <= 64
            else f"tensor{tuple(a.shape)} {a.dtype} mean={a.float().mean():.4g} std={a.float().std():.4g}"
            if isinstance(a, torch.Tensor)
            else repr(a)
        )
        for name, a in zip(spec.input_names, args)
    }


LATENCY_BUDGET_S = 30.0  # per system: a detector taking seconds a call is timed 3 times, not for minutes


def latency_ms(fn, args, repeats: int, budget_s: float = LATENCY_BUDGET_S) -> float:
    """Median wall time of ``repeats`` calls after one warm-up call, in milliseconds; fewer (never
    under three) once the timed calls have taken ``budget_s``."""
    fn(*args)
    times: list[float] = []
    while len(times) < repeats and (len(times) < 3 or sum(times) < budget_s):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _stats_text(stats: dict[str, ErrorStats]) -> str:
    return "; ".join(f"{k}: {v}" for k, v in stats.items())


def stage_done(name: str, start: float, progress: Callable[[str], None], detail: str = "") -> float:
    """Seconds since ``start``, for the report's ``stages_s``, after printing the stage's line."""
    seconds = time.perf_counter() - start
    progress(f"[{name:10s}] {seconds:7.2f} s  {detail}".rstrip())
    return seconds


def _check_schedules(schedules: str) -> None:
    if schedules not in ("ours", "default"):
        raise ValueError(f"schedules must be 'ours' or 'default', got {schedules!r}")


# ----------------------------------------------------------------------------- the steps


@dataclasses.dataclass(frozen=True)
class Exported:
    """What ``export`` made."""

    program: torch.export.ExportedProgram
    # What the checks compare against: the eager module where there is one, else the loaded program.
    reference: Callable
    census: dict[str, int]  # operator -> count
    stages_s: dict[str, float]


@dataclasses.dataclass(frozen=True)
class Rewritten:
    """What ``rewrite`` made of it."""

    program: torch.export.ExportedProgram
    module: torch.nn.Module  # the program, callable
    mode: str | list[str]  # the rewrites asked for: "auto", "all", "none" or names
    applied: dict[str, dict[str, int]]  # rewrite -> operators it replaced, with counts
    reasons: dict[str, str]  # rewrite -> why it was applied or skipped
    census: dict[str, int]
    stages_s: dict[str, float]


@dataclasses.dataclass(frozen=True)
class Verified:
    """What ``verify`` or ``verify_compiled`` found."""

    stats: dict[str, ErrorStats]  # per output, over all examples; empty when nothing was compared
    examples: int
    seed: int
    failures: tuple[dict, ...]  # check, error, counterexample (shrunk by hypothesis)
    stages_s: dict[str, float]


@dataclasses.dataclass(frozen=True)
class Compiled:
    """What ``compile_with_tvm`` built, or where it failed."""

    fn: object | None  # TvmFunction, or a StagedFunction of two when split; None when building failed
    staged: StagedPrograms | None  # the split, in PyTorch, when stage inputs were given
    info: dict  # the report's "tvm": schedules, target, speed rewrites, split, builds, error
    log: tuple[str, ...]  # what TVM's C++ side wrote while building
    failures: tuple[dict, ...]  # the step that failed, with TVM's message
    stages_s: dict[str, float]


@dataclasses.dataclass(frozen=True)
class Measured:
    """What ``measure`` timed."""

    latency: dict[str, float]  # median ms per callable: eager, rewritten PyTorch, TVM (and its stages)


@dataclasses.dataclass(frozen=True)
class Saved:
    """What ``save`` wrote."""

    artifacts: dict[str, str]  # what -> path
    tvm_log: tuple[str, ...]  # what TVM wrote building and exporting the libraries


def export(spec: ModelSpec, *, progress: Callable[[str], None] = print) -> Exported:
    """The spec's module through ``torch.export`` (or its saved program, as it is)."""
    start = time.perf_counter()
    if spec.program is not None:
        program, detail = spec.program, "loaded a saved ExportedProgram"
    else:
        with torch.no_grad():
            program = torch.export.export(spec.module, spec.example_args)
        detail = f"{len(program.graph.nodes)} nodes"
    seconds = stage_done("export", start, progress, detail)
    reference = spec.module if spec.module is not None else program.module()
    return Exported(program, reference, op_census(program), {"export": seconds})


def rewrite(
    exported: Exported, rewrites: str | Sequence[str] = "auto", *, progress: Callable[[str], None] = print
) -> Rewritten:
    """The rewrites ``choose_rewrites`` picks for ``rewrites``, applied to the exported program."""
    start = time.perf_counter()
    names, reasons = choose_rewrites(rewrites, progress=lambda m: progress(f"             {m}"))
    program, log = rewrite_with_log(exported.program, names)
    applied = {rw.name: dict(res.replaced) for rw, res in log if res.modified}
    seconds = stage_done(
        "rewrite", start, progress, ", ".join(f"{k} ({sum(v.values())})" for k, v in applied.items()) or "none"
    )
    mode = rewrites if isinstance(rewrites, str) else list(rewrites)
    return Rewritten(program, program.module(), mode, applied, reasons, op_census(program), {"rewrite": seconds})


def verify(
    spec: ModelSpec,
    exported: Exported,
    rewritten: Rewritten,
    *,
    examples: int = 20,
    seed: int = 0,
    progress: Callable[[str], None] = print,
) -> Verified:
    """The original vs the rewritten program, in PyTorch, on ``examples`` hypothesis examples."""
    start = time.perf_counter()
    failures: list[dict] = []
    stats = _check(
        spec,
        exported.reference,
        rewritten.module,
        examples,
        seed,
        "original vs rewritten (PyTorch)",
        failures,
        _float64_reference(spec, exported),
    )
    seconds = stage_done("verify", start, progress, f"{examples} examples: " + _stats_text(stats))
    return Verified(stats, examples, seed, tuple(failures), {"verify": seconds})


def compile_with_tvm(
    spec: ModelSpec,
    rewritten: Rewritten,
    *,
    schedules: str = "ours",
    stage_inputs: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    progress: Callable[[str], None] = print,
) -> Compiled:
    """The rewritten program built with TVM (see ``operate`` for the options). A failure is
    recorded, not raised: ``fn`` is then None and ``failures`` says where and why."""
    _check_schedules(schedules)
    info: dict = {}
    log: list[str] = []
    stages_s: dict[str, float] = {}
    fn = staged = None
    failures: list[dict] = []
    start, current = time.perf_counter(), "TVM prepare"
    try:
        for_tvm, speed = (
            speed_rewrites(rewritten.program, stage_inputs or ()) if schedules == "ours" else (rewritten.program, {})
        )
        info.update(schedules=schedules, target=str(host_target(schedules)), speed_rewrites=speed)
        detail = f"speed rewrites: {', '.join(speed) or 'none'}"
        if stage_inputs:
            staged = hoist(decomposed(for_tvm), stage_inputs, spec.example_args)
            detail += (
                f"; split: {staged.hoisted_nodes} nodes hoisted into the {'/'.join(stage_inputs)} stage, "
                f"{len(staged.frontier)} tensors ({staged.frontier_bytes() / 2**20:.1f} MiB) handed to the rest"
            )
            info["split"] = {
                "stage_inputs": list(stage_inputs),
                "hoisted_nodes": staged.hoisted_nodes,
                "rest_nodes": staged.rest_nodes,
                "frontier": staged.frontier,
            }
        stages_s[current] = stage_done(current, start, progress, detail)
        start, current = time.perf_counter(), "TVM build"
        parts = {"stage": staged.stage, "rest": staged.rest} if staged else {"whole": for_tvm}
        built, cached = {}, []
        for part, program in parts.items():
            built[part], info[f"{part}_build"] = compile_program(
                program, schedules=schedules, cache_dir=cache_root(cache_dir), log=log
            )
            cached.append(info[f"{part}_build"]["cached"])
        how = (
            "reused compiled libraries from the cache (" + display_path(cache_root(cache_dir) / "tvm-lib") + ")"
            if all(cached)
            else f"target {host_target(schedules)}, {schedules} schedules"
        )
        stages_s[current] = info["build_s"] = stage_done(current, start, progress, how)
        fn = staged.compose(built["stage"], built["rest"]) if staged else built["whole"]
    except Exception as exc:
        message = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[-1][:500]}"
        stages_s[current] = stage_done(current, start, progress, f"FAILED: {message}")
        info["error"] = message
        failures.append({"check": current, "error": message})
    return Compiled(fn, staged, info, tuple(log), tuple(failures), stages_s)


def verify_compiled(
    spec: ModelSpec,
    exported: Exported,
    rewritten: Rewritten,
    compiled: Compiled,
    *,
    examples: int = 20,
    split_examples: int = 5,
    seed: int = 0,
    progress: Callable[[str], None] = print,
) -> Verified:
    """The split in PyTorch vs the rewritten program on ``split_examples`` examples (it must
    reproduce it bit for bit), then the original vs TVM on ``examples``: what was compiled."""
    failures: list[dict] = []
    if compiled.staged is not None:
        composed = compiled.staged.compose(compiled.staged.stage.module(), compiled.staged.rest.module())
        _check(spec, rewritten.module, composed, split_examples, seed, "rewritten vs split (PyTorch)", failures)
    if compiled.fn is None:
        return Verified({}, 0, seed, tuple(failures), {})
    start = time.perf_counter()
    float64_fn = _float64_reference(spec, exported)
    stats = _check(spec, exported.reference, compiled.fn, examples, seed, "original vs TVM", failures, float64_fn)
    seconds = stage_done("TVM run", start, progress, f"{examples} examples: " + _stats_text(stats))
    return Verified(stats, examples, seed, tuple(failures), {"TVM run": seconds})


def measure(
    spec: ModelSpec,
    rewritten: Rewritten,
    compiled: Compiled | None = None,
    *,
    repeats: int = 5,
    progress: Callable[[str], None] = print,
) -> Measured:
    """Median latencies on the spec's example inputs: eager, rewritten PyTorch, TVM and, when
    split, each TVM stage alone."""
    latency = {}
    with torch.no_grad():
        if spec.module is not None:
            latency["eager_ms"] = latency_ms(spec.module, spec.example_args, repeats)
        latency["rewritten_pytorch_ms"] = latency_ms(rewritten.module, spec.example_args, repeats)
    if compiled is not None and compiled.fn is not None:
        latency["tvm_ms"] = latency_ms(compiled.fn, spec.example_args, repeats)
        if compiled.staged is not None:
            stage_args, rest_args = compiled.staged.split_args(spec.example_args)
            frontier = tuple(compiled.fn.stage_fn(*stage_args))
            latency["tvm_stage_ms"] = latency_ms(compiled.fn.stage_fn, stage_args, repeats)
            latency["tvm_rest_ms"] = latency_ms(compiled.fn.rest_fn, frontier + tuple(rest_args), repeats)
    progress("[latency   ] " + ", ".join(f"{k} {v:.1f}" for k, v in latency.items()))
    return Measured(latency)


def save(
    spec: ModelSpec, exported: Exported, rewritten: Rewritten, compiled: Compiled | None, out_dir: str | Path
) -> Saved:
    """Into ``out_dir``: both programs (``.pt2``), the TVM libraries (``.so``; with
    ``.stages.json`` saying how to call two: ``surgery.stages.StagedFunction.load``) and TVM's log."""
    out_dir = Path(out_dir)
    artifacts = {}
    for label, program in (("original", exported.program), ("rewritten", rewritten.program)):
        target = out_dir / f"{spec.name}.{label}.pt2"
        with atomic_path(target, suffix=".pt2") as tmp:
            torch.export.save(program, tmp)
        artifacts[f"{label}_program"] = str(target)
    log = list(compiled.log) if compiled is not None else []
    if compiled is not None and compiled.fn is not None:
        artifacts.update(_save_libraries(spec, compiled, out_dir, log))
    if log:
        target = out_dir / f"{spec.name}.tvm.log"
        with atomic_path(target) as tmp:
            tmp.write_text("\n".join(log) + "\n")
        artifacts["tvm_log"] = str(target)
    return Saved(artifacts, tuple(log))


def _save_libraries(spec: ModelSpec, compiled: Compiled, out_dir: Path, log: list[str]) -> dict[str, str]:
    """The compiled libraries, named after the spec's stages when split; what TVM writes goes to ``log``."""
    first, second = spec.stage_names
    libraries = (
        {"tvm_library": ("tvm", compiled.fn)}
        if compiled.staged is None
        else {
            f"tvm_{first}_library": (f"{first}.tvm", compiled.fn.stage_fn),
            f"tvm_{second}_library": (f"{second}.tvm", compiled.fn.rest_fn),
        }
    )
    artifacts = {}
    for key, (suffix, fn) in libraries.items():
        target = out_dir / f"{spec.name}.{suffix}.so"
        with atomic_path(target, suffix=".so") as tmp, native_log(log):
            fn.export_library(tmp)
        artifacts[key] = str(target)
    if compiled.staged is not None:
        target = out_dir / f"{spec.name}.stages.json"
        manifest = compiled.fn.manifest(
            Path(artifacts[f"tvm_{first}_library"]).name, Path(artifacts[f"tvm_{second}_library"]).name
        )
        with atomic_path(target) as tmp:
            tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        artifacts["tvm_stages"] = str(target)
    return artifacts


# ----------------------------------------------------------------------------- all of them


def operate(
    spec: ModelSpec,
    *,
    rewrites: str | Sequence[str] = "auto",
    examples: int = 20,
    tvm_examples: int | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    compile_tvm: bool = True,
    latency_repeats: int = 5,
    progress: Callable[[str], None] = print,
    raise_on_failure: bool = False,
    schedules: str = "ours",
    stage_inputs: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
) -> Surgery:
    """Run the whole surgery on one model: the steps in order. See the module docstring.

    ``schedules``: ``"ours"`` (speed rewrites + ``surgery.schedules``, the shipped build) or
    ``"default"`` (stock TVM's CPU pipeline). ``stage_inputs``: names of inputs whose dependent
    computation is hoisted into a separate compiled stage (``surgery.stages``), e.g. the image
    features of a prompt encoder; ``None`` compiles one graph. ``cache_dir``: where compiled
    libraries are kept and reused (``None``: ``$SURGERY_CACHE`` or ``~/.cache/surgery``).
    """
    _check_schedules(schedules)
    exported = export(spec, progress=progress)
    rewritten = rewrite(exported, rewrites, progress=progress)
    verified = verify(spec, exported, rewritten, examples=examples, seed=seed, progress=progress)
    compiled = checked = None
    if compile_tvm:
        compiled = compile_with_tvm(
            spec, rewritten, schedules=schedules, stage_inputs=stage_inputs, cache_dir=cache_dir, progress=progress
        )
        checked = verify_compiled(
            spec,
            exported,
            rewritten,
            compiled,
            examples=examples if tvm_examples is None else tvm_examples,
            split_examples=min(examples, 5),
            seed=seed,
            progress=progress,
        )
    measured = (
        measure(spec, rewritten, compiled, repeats=latency_repeats, progress=progress) if latency_repeats > 0 else None
    )
    saved = save(spec, exported, rewritten, compiled, out_dir) if out_dir is not None else None
    _tell_tvm_log(compiled, saved, progress)
    report = _report(spec, exported, rewritten, verified, compiled, checked, measured, saved)
    if raise_on_failure and not report.passed:
        raise SurgeryFailed(f"{spec.name}: equivalence failed: {list(report.failures[:1])}")
    return Surgery(spec, exported.program, rewritten.program, compiled.fn if compiled is not None else None, report)


def _tvm_log(compiled: Compiled | None, saved: Saved | None) -> tuple[str, ...]:
    """All TVM wrote: building, and exporting the libraries when they were saved."""
    if saved is not None:
        return saved.tvm_log
    return compiled.log if compiled is not None else ()


def _tell_tvm_log(compiled: Compiled | None, saved: Saved | None, progress: Callable[[str], None]) -> None:
    """One line for the hundreds TVM writes, saying where they are kept."""
    lines = _tvm_log(compiled, saved)
    if lines:
        kept = saved.artifacts.get("tvm_log") if saved is not None else None
        progress(f"TVM wrote {len(lines)} log lines (mostly warnings)" + (f"; kept in {kept}" if kept else ""))


def _report(
    spec: ModelSpec,
    exported: Exported,
    rewritten: Rewritten,
    verified: Verified,
    compiled: Compiled | None,
    checked: Verified | None,
    measured: Measured | None,
    saved: Saved | None,
) -> SurgeryReport:
    """What the steps found (``None``: the step did not run), as the report."""
    timed = [step for step in (exported, rewritten, verified, compiled, checked) if step is not None]
    failures = tuple(f for step in (verified, compiled, checked) if step is not None for f in step.failures)
    tvm = dict(compiled.info) if compiled is not None else {}
    tvm_log = _tvm_log(compiled, saved)
    if tvm_log:
        tvm["log_lines"] = len(tvm_log)
    return SurgeryReport(
        model=spec.name,
        description=spec.description,
        passed=not failures and (compiled is None or compiled.fn is not None),
        rewrites={
            "mode": rewritten.mode,
            "applied": rewritten.applied,
            "reasons": rewritten.reasons,
            "contracts": {n: REGISTRY[n].contract for n in rewritten.applied},
        },
        census_before=dict(sorted(exported.census.items())),
        census_after=dict(sorted(rewritten.census.items())),
        examples=verified.examples,
        tvm_examples=checked.examples if checked is not None else 0,
        seed=verified.seed,
        equivalence={
            "original_vs_rewritten": verified.stats,
            "original_vs_tvm": checked.stats if checked is not None else {},
        },
        failures=failures,
        tvm=tvm,
        latency=measured.latency if measured is not None else {},
        stages_s={name: s for step in timed for name, s in step.stages_s.items()},
        artifacts=saved.artifacts if saved is not None else {},
    )


def load_program(path: str | Path) -> torch.export.ExportedProgram:
    """Load a saved ExportedProgram; a clear ValueError when the file isn't one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such file: {str(path)!r}")
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.ERROR)  # torch logs a traceback before raising; our one line says it
    try:
        return torch.export.load(path)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"cannot load an ExportedProgram from {str(path)!r}: {type(exc).__name__}: {first}") from None
    finally:
        logger.setLevel(level)


def _random_like(val, generator: torch.Generator) -> torch.Tensor:
    """Random input matching a placeholder's example value. Floats: uniform [0, 1) (valid for
    normalized coordinates and unit-scale features alike); integers: 0/1 (labels); bools: all
    False (no padding: masks of unknown meaning are left unpadded)."""
    shape, dtype = tuple(int(s) for s in val.shape), val.dtype
    if dtype.is_floating_point:
        return torch.rand(shape, generator=generator, dtype=torch.float64).to(dtype)
    if dtype == torch.bool:
        return torch.zeros(shape, dtype=torch.bool)
    return torch.randint(0, 2, shape, generator=generator).to(dtype)


def _random_inputs_like(examples) -> object:
    """Hypothesis strategy of seeds mapped to random tensors shaped like ``examples``."""

    def sample(s: int) -> tuple:
        g = torch.Generator().manual_seed(s)
        return tuple(_random_like(v, g) for v in examples)

    return st.integers(0, 2**31 - 1).map(sample)


def saved_program_spec(path: str | Path, seed: int = 0) -> ModelSpec:
    """A ModelSpec for a saved ``.pt2``: random inputs matching its input specs."""
    program = load_program(path)
    user_inputs = set(program.graph_signature.user_inputs)
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
    for node in placeholders:
        if not isinstance(node.meta.get("val"), torch.Tensor):
            raise ValueError(f"{str(path)!r}: input {node.name!r} is not a tensor; only tensor inputs are supported")
    vals = [n.meta["val"] for n in placeholders]
    strategy = _random_inputs_like(vals)
    g = torch.Generator().manual_seed(seed)
    outputs = program.graph_signature.user_outputs
    return ModelSpec(
        name=Path(path).stem,
        module=None,
        example_args=tuple(_random_like(v, g) for v in vals),
        input_names=[n.name for n in placeholders],
        output_names=[f"output{i}" for i in range(len(outputs))],
        input_strategy=strategy,
        description={
            "model": f"saved ExportedProgram {str(path)!r}",
            "inputs": {n.name: f"{tuple(v.shape)} {v.dtype}" for n, v in zip(placeholders, vals)},
            "weights": "as saved in the program",
        },
        program=program,
    )
