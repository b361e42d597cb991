"""Export -> rewrite -> verify -> compile with TVM -> run -> report: the library behind
``python -m surgery apply``, usable directly from a notebook::

    from models import geometry_encoder_spec
    from surgery.pipeline import ModelSpec, operate

    spec = geometry_encoder_spec(points=3, boxes=2)     # or ModelSpec.from_module(name, module, args)
    result = operate(spec)                              # a Surgery: programs, callables, report
    result.rewritten_module(*spec.example_args)         # rewritten PyTorch, same results
    result.tvm(*spec.example_args)                      # the TVM-compiled function, same results
    result.report["equivalence"]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torchvision  # noqa: F401  programs holding torchvision ops need it registered before loading
from hypothesis import strategies as st

from . import op_census, rewrite_with_log
from .atomic import atomic_path
from .equivalence.compare import ErrorStats, accumulate, compare
from .equivalence.verify import PropertyFailed, check_property
from .paths import display_path
from .rewrites import REGISTRY, RewriteError
from .rewrites.base import decomposed
from .stages import hoist
from .tvm_backend import (
    cache_root,
    compile_program,
    host_target,
    native_log,
    probe,
    speed_rewrites,
)


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

    @classmethod
    def from_module(cls, name: str, module: torch.nn.Module, example_args: tuple, input_strategy=None,
                    output_names: Sequence[str] | None = None) -> "ModelSpec":
        """A spec for your own module. Without ``input_strategy``, checks draw random inputs
        shaped like ``example_args`` (see ``_random_like`` for what that means per dtype)."""
        return cls(
            name=name, module=module.eval(), example_args=tuple(example_args),
            input_names=[f"input{i}" for i in range(len(example_args))],
            output_names=list(output_names) if output_names else [f"output{i}" for i in range(len(_outputs(module(*example_args))))],
            input_strategy=input_strategy or _random_inputs_like(example_args),
            description={"model": type(module).__name__, "weights": "as given"},
        )


@dataclasses.dataclass
class Surgery:
    """The result: original and rewritten programs, callables, TVM function, report."""

    spec: ModelSpec
    original: torch.export.ExportedProgram
    rewritten: torch.export.ExportedProgram
    tvm: object | None  # surgery.tvm_backend.TvmFunction
    report: dict
    passed: bool

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
        return found.needed(), {n: ("applied: " if f.needed else "skipped: ") + f.reason for n, f in found.findings.items()}
    names = list(mode)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise RewriteError(f"unknown rewrite {unknown[0]!r}; known rewrites: {', '.join(REGISTRY)}")
    return names, {n: ("applied: named on the command line" if n in names else "skipped: not named") for n in REGISTRY}


def _outputs(value) -> tuple[torch.Tensor, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _compare_outputs(spec: ModelSpec, actual, expected) -> dict[str, ErrorStats]:
    """Per named output; integer and boolean outputs (masks) must be identical (see compare)."""
    return {name: compare(a.detach(), e.detach())
            for name, a, e in zip(spec.output_names, _outputs(actual), _outputs(expected))}


def _check(spec: ModelSpec, reference_fn, candidate_fn, examples: int, seed: int, label: str, failures: list) -> dict:
    """Property check of ``candidate_fn`` against ``reference_fn`` on the spec's input strategy."""
    total: dict[str, ErrorStats] = {}

    def check(args):
        with torch.no_grad():
            stats = _compare_outputs(spec, candidate_fn(*args), _outputs(reference_fn(*args)))
        accumulate(total, stats)
        bad = {k: str(v) for k, v in stats.items() if not v.within_bounds()}
        assert not bad, f"{label}: {bad}"

    if examples > 0:
        try:
            check_property(spec.input_strategy, check, examples, seed)
        except PropertyFailed as exc:
            failures.append({"check": label, "error": str(exc), "counterexample": _describe_inputs(spec, exc.counterexample)})
    return total


def _describe_inputs(spec: ModelSpec, args) -> dict:
    if not isinstance(args, tuple):
        return {"value": repr(args)[:2000]}
    return {name: (repr(a.tolist())[:2000] if isinstance(a, torch.Tensor) and a.numel() <= 64 else
                   f"tensor{tuple(a.shape)} {a.dtype} mean={a.float().mean():.4g} std={a.float().std():.4g}"
                   if isinstance(a, torch.Tensor) else repr(a))
            for name, a in zip(spec.input_names, args)}


def latency_ms(fn, args, repeats: int) -> float:
    """Median wall time of ``repeats`` calls after one warm-up call, in milliseconds."""
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


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
    """Run the whole surgery on one model. See the module docstring.

    ``schedules``: ``"ours"`` (speed rewrites + ``surgery.schedules``, the shipped build) or
    ``"default"`` (stock TVM's CPU pipeline). ``stage_inputs``: names of inputs whose dependent
    computation is hoisted into a separate compiled stage (``surgery.stages``), e.g. the image
    features of a prompt encoder; ``None`` compiles one graph. ``cache_dir``: where compiled
    libraries are kept and reused (``None``: ``$SURGERY_CACHE`` or ``~/.cache/surgery``).
    """
    if schedules not in ("ours", "default"):
        raise ValueError(f"schedules must be 'ours' or 'default', got {schedules!r}")
    stages: dict[str, float] = {}

    def stage(name: str, start: float, detail: str = "") -> None:
        stages[name] = time.perf_counter() - start
        progress(f"[{name:10s}] {stages[name]:7.2f} s  {detail}".rstrip())

    start = time.perf_counter()
    if spec.program is not None:
        original = spec.program
        stage("export", start, "loaded a saved ExportedProgram")
    else:
        with torch.no_grad():
            original = torch.export.export(spec.module, spec.example_args)
        stage("export", start, f"{len(original.graph.nodes)} nodes")
    census_before = op_census(original)

    start = time.perf_counter()
    names, reasons = choose_rewrites(rewrites, progress=lambda m: progress(f"             {m}"))
    rewritten, log = rewrite_with_log(original, names)
    census_after = op_census(rewritten)
    applied = {rw.name: dict(res.replaced) for rw, res in log if res.modified}
    stage("rewrite", start, f"{', '.join(f'{k} ({sum(v.values())})' for k, v in applied.items()) or 'none'}")

    # Verify: the original (the eager module where there is one, else the loaded program) vs the
    # rewritten program, on `examples` hypothesis examples.
    start = time.perf_counter()
    rewritten_fn = rewritten.module()
    original_fn = spec.module if spec.module is not None else original.module()
    failures: list[dict] = []
    rewritten_stats = _check(spec, original_fn, rewritten_fn, examples, seed, "original vs rewritten (PyTorch)", failures)
    stage("verify", start, f"{examples} examples: " + "; ".join(f"{k}: {v}" for k, v in rewritten_stats.items()))

    tvm_fn, tvm_info, tvm_stats, tvm_log = None, {}, {}, []
    staged, stage_fns = None, None
    tvm_examples = examples if tvm_examples is None else tvm_examples
    if compile_tvm:
        start = time.perf_counter()
        current = "TVM prepare"
        try:
            for_tvm, speed = (speed_rewrites(rewritten, split=bool(stage_inputs)) if schedules == "ours" else (rewritten, {}))
            tvm_info.update(schedules=schedules, target=str(host_target(schedules)), speed_rewrites=speed)
            detail = f"speed rewrites: {', '.join(speed) or 'none'}"
            if stage_inputs:
                staged = hoist(decomposed(for_tvm), stage_inputs, spec.example_args)
                detail += (f"; split: {staged.hoisted_nodes} nodes hoisted into the {'/'.join(stage_inputs)} stage, "
                           f"{len(staged.frontier)} tensors ({staged.frontier_bytes() / 2**20:.1f} MiB) handed to the rest")
                tvm_info["split"] = {"stage_inputs": list(stage_inputs), "hoisted_nodes": staged.hoisted_nodes,
                                     "rest_nodes": staged.rest_nodes, "frontier": staged.frontier}
            stage(current, start, detail)
            start, current = time.perf_counter(), "TVM build"
            parts = {"stage": staged.stage, "rest": staged.rest} if staged else {"whole": for_tvm}
            compiled, cached = {}, []
            for part, program in parts.items():
                compiled[part], info = compile_program(program, schedules=schedules, cache_dir=cache_root(cache_dir), log=tvm_log)
                tvm_info[f"{part}_build"] = info
                cached.append(info["cached"])
            tvm_info["build_s"] = stages.setdefault("TVM build", time.perf_counter() - start)
            how = ("reused compiled libraries from the cache (" + display_path(cache_root(cache_dir) / "tvm-lib") + ")" if all(cached)
                   else f"target {host_target(schedules)}, {schedules} schedules")
            stage(current, start, how)
            if staged:
                stage_fns = (compiled["stage"], compiled["rest"])
                tvm_fn = staged.compose(*stage_fns)
            else:
                tvm_fn = compiled["whole"]
        except Exception as exc:
            message = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[-1][:500]}"
            stage(current, start, f"FAILED: {message}")
            tvm_info["error"] = message
            failures.append({"check": current, "error": message})
        if staged is not None:
            # The split itself, in PyTorch: must reproduce the rewritten program bit for bit.
            composed = staged.compose(staged.stage.module(), staged.rest.module())
            _check(spec, rewritten_fn, composed, min(examples, 5), seed, "rewritten vs split (PyTorch)", failures)
        if tvm_fn is not None:
            start = time.perf_counter()
            tvm_stats = _check(spec, original_fn, tvm_fn, tvm_examples, seed, "original vs TVM", failures)
            stage("TVM run", start, f"{tvm_examples} examples: " + "; ".join(f"{k}: {v}" for k, v in tvm_stats.items()))

    latency = {}
    if latency_repeats > 0:
        with torch.no_grad():
            if spec.module is not None:
                latency["eager_ms"] = latency_ms(spec.module, spec.example_args, latency_repeats)
            latency["rewritten_pytorch_ms"] = latency_ms(rewritten_fn, spec.example_args, latency_repeats)
        if tvm_fn is not None:
            latency["tvm_ms"] = latency_ms(tvm_fn, spec.example_args, latency_repeats)
        if stage_fns is not None:
            stage_args, rest_args = staged.split_args(spec.example_args)
            frontier = tuple(stage_fns[0](*stage_args))
            latency["tvm_stage_ms"] = latency_ms(stage_fns[0], stage_args, latency_repeats)
            latency["tvm_rest_ms"] = latency_ms(stage_fns[1], frontier + tuple(rest_args), latency_repeats)
        progress("[latency   ] " + ", ".join(f"{k} {v:.1f}" for k, v in latency.items()))

    artifacts = {}
    if out_dir is not None:
        out_dir = Path(out_dir)
        for label, program in (("original", original), ("rewritten", rewritten)):
            target = out_dir / f"{spec.name}.{label}.pt2"
            with atomic_path(target, suffix=".pt2") as tmp:
                torch.export.save(program, tmp)
            artifacts[f"{label}_program"] = str(target)
        if tvm_fn is not None:
            first, second = spec.stage_names
            libraries = {"tvm_library": ("tvm", tvm_fn)} if stage_fns is None else {
                f"tvm_{first}_library": (f"{first}.tvm", stage_fns[0]), f"tvm_{second}_library": (f"{second}.tvm", stage_fns[1])}
            for key, (suffix, fn) in libraries.items():
                target = out_dir / f"{spec.name}.{suffix}.so"
                with atomic_path(target, suffix=".so") as tmp, native_log(tvm_log):
                    fn.export_library(tmp)
                artifacts[key] = str(target)
            if stage_fns is not None:  # how to call the two: surgery.stages.StagedFunction.load(path)
                target = out_dir / f"{spec.name}.stages.json"
                manifest = tvm_fn.manifest(Path(artifacts[f"tvm_{first}_library"]).name, Path(artifacts[f"tvm_{second}_library"]).name)
                with atomic_path(target) as tmp:
                    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
                artifacts["tvm_stages"] = str(target)
        if tvm_log:
            target = out_dir / f"{spec.name}.tvm.log"
            with atomic_path(target) as tmp:
                tmp.write_text("\n".join(tvm_log) + "\n")
            artifacts["tvm_log"] = str(target)
    if tvm_log:
        tvm_info["log_lines"] = len(tvm_log)
        progress(f"TVM wrote {len(tvm_log)} log lines (mostly warnings)" + (f"; kept in {artifacts['tvm_log']}" if "tvm_log" in artifacts else ""))

    passed = not failures and (tvm_fn is not None or not compile_tvm)
    report = {
        "model": spec.name,
        "description": spec.description,
        "passed": passed,
        "rewrites": {"mode": rewrites if isinstance(rewrites, str) else list(rewrites), "applied": applied,
                     "reasons": reasons,
                     "contracts": {n: REGISTRY[n].contract for n in applied}},
        "census_before": dict(sorted(census_before.items())),
        "census_after": dict(sorted(census_after.items())),
        "examples": examples,
        "tvm_examples": tvm_examples if tvm_fn is not None else 0,
        "seed": seed,
        "equivalence": {"original_vs_rewritten": rewritten_stats, "original_vs_tvm": tvm_stats},
        "failures": failures,
        "tvm": tvm_info,
        "latency": latency,
        "stages_s": stages,
        "artifacts": artifacts,
    }
    result = Surgery(spec, original, rewritten, tvm_fn, report, passed)
    if raise_on_failure and not passed:
        raise SurgeryFailed(f"{spec.name}: equivalence failed: {failures[:1]}")
    return result


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
        name=Path(path).stem, module=None, example_args=tuple(_random_like(v, g) for v in vals),
        input_names=[n.name for n in placeholders], output_names=[f"output{i}" for i in range(len(outputs))],
        input_strategy=strategy,
        description={"model": f"saved ExportedProgram {str(path)!r}",
                     "inputs": {n.name: f"{tuple(v.shape)} {v.dtype}" for n, v in zip(placeholders, vals)},
                     "weights": "as saved in the program"},
        program=program,
    )
