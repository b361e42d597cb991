"""``python -m surgery``: a thin shell over the library.

python -m surgery apply geometry_encoder   # export, rewrite, verify, TVM, run, report
python -m surgery apply PATH.pt2           # the same for a saved ExportedProgram
python -m surgery list                     # models and rewrites, with their contracts
python -m surgery verify [--rewrite NAME]  # property-check rewrites, write reports/rewrites.*
python -m surgery locate MODEL|PATH.pt2    # where TVM goes wrong: culprit operators, reproducers
python -m surgery probe add REPRO --rewrite NAME   # make --rewrite auto check a reproducer from now on
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import sys
import time
from pathlib import Path

from models import MODELS
from models.padded_prompts import check_compiled, limits_from_options

from .catalog import catalog_markdown
from .equivalence.report import write_model_report, write_rewrite_report
from .equivalence.verify import verify_rewrite
from .locate import locate
from .locate.report import write_locate_report
from .locate.reproducer import keep_as_probe
from .pipeline import operate, saved_program_spec
from .probes import ProbeCaseError, probes_dir, remove_case, user_cases
from .rewrites import REGISTRY, SPEED_REWRITES


class UsageError(Exception):
    """Bad input from the user: one clear line on stderr, exit 2, no traceback."""


def _list(args) -> int:
    if args.markdown:
        descriptions = {name: (build.__doc__ or "").strip().splitlines()[0] for name, build in MODELS.items()}
        print(catalog_markdown(descriptions, contracts=not args.brief), end="")
        return 0
    print("models (python -m surgery apply NAME, or apply PATH.pt2 for a saved ExportedProgram):")
    for name, build in MODELS.items():
        print(f"  {name:16s} {(build.__doc__ or '').strip().splitlines()[0]}")
    print("rewrites (applied in this order):")
    for name, cls in REGISTRY.items():
        print(f"  {name:12s} {cls.summary}")
        print(f"  {'':12s} contract: {cls.contract}")
    print("speed rewrites (the shipped TVM build, --schedules ours, applies them after those, in this order):")
    for name, cls in SPEED_REWRITES.items():
        print(f"  {name:12s} {cls.summary}")
        print(f"  {'':12s} contract: {cls.contract}")
    return 0


def _verify(args) -> int:
    names = args.rewrite or list(REGISTRY)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise UsageError(f"unknown rewrite {unknown[0]!r}; known rewrites: {', '.join(REGISTRY)}")
    if args.examples < 1 or args.graph_examples < 0:
        raise UsageError("--examples must be >= 1 and --graph-examples >= 0")
    results = []
    for name in names:
        start = time.perf_counter()
        print(f"verify {name}", flush=True)
        result = verify_rewrite(
            name, args.examples, args.graph_examples, args.seed, progress=lambda m: print(m, flush=True)
        )
        results.append(result)
        verdict = "equivalent" if result.passed else f"NOT EQUIVALENT: {result.error}"
        print(f"  {name}: {verdict} ({time.perf_counter() - start:.1f} s)", flush=True)
        for key, stats in sorted(result.stats.items()):
            print(f"    {key}: {stats}", flush=True)
    md, js = write_rewrite_report(results, args.out)
    print(f"report: {md} and {js}")
    return 0 if all(r.passed for r in results) else 1


def _size(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected N or HxW with positive sizes, got {text!r}")
    return parts[0], parts[1]


def _stage_inputs(args, spec) -> tuple[str, ...] | None:
    """--split NAMES / --no-split / the model's own choice (the geometry encoder: image inputs)."""
    if args.no_split:
        return None
    if args.split is None:
        return spec.stage_inputs
    names = tuple(n for n in args.split.split(",") if n)
    unknown = [n for n in names if n not in spec.input_names]
    if not names or unknown:
        raise UsageError(
            f"--split takes input names separated by commas; unknown {unknown or [args.split]}, "
            f"the inputs are {', '.join(spec.input_names)}"
        )
    return names


def _rewrite_mode(args):
    """--rewrite: "auto" (the default), "all", "none", or a list of rewrite names."""
    rewrites = args.rewrite or ["auto"]
    if len(rewrites) == 1 and rewrites[0] in ("auto", "all", "none"):
        return rewrites[0]
    unknown = [r for r in rewrites if r not in REGISTRY]
    if unknown:
        raise UsageError(f"unknown rewrite {unknown[0]!r}; known: auto, all, none, {', '.join(REGISTRY)}")
    return rewrites


# Model options: each named model takes those its adapter has a keyword for (``--feat-size``
# sets ``feat_size``); the others are refused for it, naming the ones it takes.
MODEL_OPTIONS = ("points", "boxes", "batch", "feat_size", "image_size", "variant", "proposals")


def _option_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _model_options(args, build) -> dict:
    """The model options given on the command line, as keywords for ``build``."""
    accepted = inspect.signature(build).parameters
    given = {name: getattr(args, name) for name in MODEL_OPTIONS if getattr(args, name) is not None}
    refused = [name for name in given if name not in accepted]
    if refused:
        takes = [_option_flag(n) for n in MODEL_OPTIONS if n in accepted]
        raise UsageError(
            f"{_option_flag(refused[0])} does not apply to {args.target}; its options: {', '.join(takes)}, --checkpoint, --seed"
        )
    return given


def _geometry_encoder_option(args, name: str):
    """A geometry-encoder option as given, else its adapter's default."""
    value = getattr(args, name)
    return inspect.signature(MODELS["geometry_encoder"]).parameters[name].default if value is None else value


def _prompt_counts(args) -> tuple[int, int, int]:
    """--points/--boxes/--batch for the geometry encoder, its defaults where not given."""
    return tuple(_geometry_encoder_option(args, name) for name in ("points", "boxes", "batch"))


def _model_spec(args):
    """The ModelSpec the model options name (a model, or a saved .pt2), the padded-prompt limits
    when --max-* are given, and the seconds building it took."""
    limits = None
    if (args.max_points, args.max_boxes, args.max_batch) != (None, None, None):  # one module for varying counts
        if args.target != "geometry_encoder":
            raise UsageError("--max-points/--max-boxes/--max-batch apply to geometry_encoder only")
        try:
            limits = limits_from_options(args.max_points, args.max_boxes, args.max_batch, *_prompt_counts(args))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    start = time.perf_counter()
    if args.target in MODELS:
        build = MODELS[args.target]
        options = _model_options(args, build)
        if limits is not None:
            options.update(points=limits.max_points, boxes=limits.max_boxes, batch=limits.max_batch)
        try:
            spec = build(**options, seed=args.seed, checkpoint=args.checkpoint)
        except ValueError as exc:  # models.CheckpointError is one
            raise UsageError(str(exc)) from None
    elif args.target.endswith(".pt2") or Path(args.target).exists():
        if args.checkpoint:
            raise UsageError("--checkpoint applies to named models; a .pt2 holds its own weights")
        given = [_option_flag(name) for name in MODEL_OPTIONS if getattr(args, name) is not None]
        if given:
            raise UsageError(f"{given[0]} applies to named models; a .pt2 holds its own input shapes")
        try:
            spec = saved_program_spec(args.target, seed=args.seed)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    else:
        raise UsageError(f"unknown model {args.target!r}; known models: {', '.join(MODELS)} (or a path to a .pt2 file)")
    if getattr(args, "judged", False):
        spec = dataclasses.replace(spec, judged=True)
    build_s = time.perf_counter() - start
    print(
        f"[build     ] {build_s:7.2f} s  {spec.description.get('model')}, weights: {spec.description.get('weights')}",
        flush=True,
    )
    return spec, limits, build_s


def _apply(args) -> int:
    rewrites = _rewrite_mode(args)
    if (args.examples is not None and args.examples < 1) or (args.tvm_examples is not None and args.tvm_examples < 0):
        raise UsageError("--examples must be >= 1 and --tvm-examples >= 0")
    spec, limits, build_s = _model_spec(args)
    examples = spec.examples if args.examples is None else args.examples
    tvm_examples = examples if args.tvm_examples is None else args.tvm_examples
    stage_inputs = _stage_inputs(args, spec)
    out_dir = Path(args.out) if args.out else Path("out") / spec.name
    result = operate(
        spec,
        rewrites=rewrites,
        examples=examples,
        tvm_examples=tvm_examples,
        seed=args.seed,
        out_dir=out_dir,
        compile_tvm=not args.no_tvm,
        progress=lambda m: print(m, flush=True),
        schedules=args.schedules or spec.schedules,
        stage_inputs=stage_inputs,
        cache_dir=args.cache,
    )
    if limits is not None and result.tvm is not None:
        result = check_compiled(
            result,
            limits,
            _geometry_encoder_option(args, "feat_size"),
            tvm_examples,
            args.seed,
            _prompt_counts(args),
            progress=lambda m: print(m, flush=True),
        )
    report = result.report.with_earlier_stage("build", build_s)
    md, js = write_model_report(report, args.reports)
    for key, path in report.artifacts.items():
        print(f"artifact {key}: {path}")
    print(f"report: {md} and {js}")
    if not report.passed:
        print(
            f"surgery: equivalence FAILED ({len(report.failures)} failure(s)); counterexample in {md}", file=sys.stderr
        )
        return 1
    print("all equivalence checks passed")
    return 0


def _bench(args) -> int:
    from .bench import SYSTEMS, bench, write_bench_report

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise UsageError(f"unknown system {unknown[0] if unknown else ''!r}; systems: {', '.join(SYSTEMS)}")
    if min(args.rounds, args.calls) < 1 or args.warmup < 0 or args.kernels < 0:
        raise UsageError("--rounds and --calls must be >= 1, --warmup and --kernels >= 0")
    if (args.max_points, args.max_boxes, args.max_batch) != (None, None, None):
        raise UsageError("--max-points/--max-boxes/--max-batch apply to apply, not bench")
    spec, _, _ = _model_spec(args)
    try:
        report = bench(
            spec,
            systems,
            rounds=args.rounds,
            calls=args.calls,
            warmup=args.warmup,
            kernels=args.kernels,
            cache_dir=args.cache,
            progress=lambda m: print(m, flush=True),
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    report["command"] = "python -m surgery bench " + " ".join(sys.argv[2:] if args.argv is None else args.argv[1:])
    md, js, png = write_bench_report(report, args.reports)
    print(
        f"report: {md}, {js}" + (f", chart {png}" if png else " (no chart: pip install -e '.[bench]' for matplotlib)")
    )
    target = report["target"]
    if target:
        print(
            f"shipped TVM: {target['measured']:.2f}x the best peer (target <= {target['ratio']}x): "
            f"{'met' if target['met'] else 'MISSED'}"
        )
    return 0


def _locate(args) -> int:
    rewrites = _rewrite_mode(args)
    if args.save_probe is not None and args.save_probe not in REGISTRY:
        raise UsageError(f"--save-probe: unknown rewrite {args.save_probe!r}; known: {', '.join(REGISTRY)}")
    spec, _, build_s = _model_spec(args)
    out_dir = Path(args.out) if args.out else Path("out") / "locate" / spec.name
    location = locate(
        spec,
        rewrites=rewrites,
        schedules=args.schedules,
        out_dir=out_dir,
        cache_dir=args.cache,
        progress=lambda m: print(m, flush=True),
    )
    location.stages_s = {"build": build_s, **location.stages_s}
    md, js = write_locate_report(location, args.reports)
    for culprit in location.culprits:
        print(
            f"culprit ({culprit.stage}): {culprit.node.name} = {culprit.node.call}\n  at {culprit.node.where()}\n"
            f"  TVM: {culprit.error}"
            + (f"\n  reproducer: {culprit.reproducer['script']}" if culprit.reproducer else "")
            + f"\n  next step: {culprit.next_step}"
        )
    print(f"report: {md} and {js}")
    if args.save_probe is not None:
        _save_probe(location, args.save_probe)
    if location.diverges:
        print(
            f"surgery: locate: {location.verdict} ({len(location.culprits)} culprit(s)); details in {md}",
            file=sys.stderr,
        )
        return 1
    print("nothing diverges: TVM imports, builds and runs the program, every output within the judge's tolerance")
    return 0


def _save_probe(location, rewrite: str) -> None:
    """--save-probe: the first reproducer of an operator ``rewrite`` replaces (else the first)."""
    with_reproducer = [c for c in location.culprits if c.reproducer]
    if not with_reproducer:
        print("--save-probe: no reproducer to keep", file=sys.stderr)
        return
    chosen = next((c for c in with_reproducer if rewrite in c.rewrites), with_reproducer[0])
    name = f"{location.model}_{chosen.node.name}"
    try:
        case = keep_as_probe(chosen.reproducer["dir"], rewrite, name)
    except ProbeCaseError as exc:
        print(f"--save-probe: not kept: {exc}", file=sys.stderr)
        return
    print(f"probe case {case.name} kept in {case.directory}: --rewrite auto applies {rewrite} while TVM fails it")


def _probe_add(args) -> int:
    try:
        case = keep_as_probe(args.reproducer, args.rewrite, args.name)
    except ProbeCaseError as exc:
        raise UsageError(str(exc)) from None
    print(f"probe case {case.name} kept in {case.directory}: --rewrite auto applies {case.rewrite} while TVM fails it")
    return 0


def _probe_list(args) -> int:
    cases = user_cases()
    print(f"probe cases in {probes_dir()} (set $SURGERY_PROBES to keep them elsewhere): {len(cases) or 'none'}")
    for case in cases:
        print(f"  {case.name:24s} {case.rewrite:14s} {case.operator}: {case.failure[:100]}")
    return 0


def _probe_remove(args) -> int:
    try:
        print(f"removed {remove_case(args.name)}")
    except ProbeCaseError as exc:
        raise UsageError(str(exc)) from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m surgery", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="show models and rewrites")
    listing.add_argument("--markdown", action="store_true", help="as the Markdown tables and contracts the docs hold")
    listing.add_argument("--brief", action="store_true", help="with --markdown: the tables only, one line per entry")
    listing.set_defaults(run=_list)
    verify = sub.add_parser("verify", help="property-check rewrites and write an equivalence report")
    verify.add_argument("--rewrite", action="append", help="rewrite to check (repeatable; default: all)")
    verify.add_argument("--examples", type=int, default=2000, help="function-form hypothesis examples per rewrite")
    verify.add_argument(
        "--graph-examples", type=int, default=40, help="graph-form examples per rewrite (export+rewrite each)"
    )
    verify.add_argument("--seed", type=int, default=0)
    verify.add_argument("--out", default="reports", help="directory for rewrites.md / rewrites.json")
    verify.set_defaults(run=_verify)

    apply = sub.add_parser("apply", help="export, rewrite, verify, compile with TVM, run, report")
    _add_model_arguments(apply)
    _add_judged_argument(apply)
    _add_tvm_arguments(apply, schedules=None)
    apply.add_argument(
        "--examples", type=int, help="hypothesis examples for original vs rewritten (default: the model's, 20 or 3)"
    )
    apply.add_argument(
        "--tvm-examples", type=int, default=None, help="hypothesis examples for original vs TVM (default: --examples)"
    )
    apply.add_argument("--out", help="artifact directory (default: out/<model>)")
    apply.add_argument("--reports", default="reports", help="directory for <model>.md / <model>.json")
    apply.add_argument("--no-tvm", action="store_true", help="stop after the PyTorch verification")
    apply.add_argument(
        "--split",
        metavar="INPUTS",
        help="hoist what depends only on these inputs (comma-separated) into "
        "a stage compiled apart (default: the model's choice; geometry_encoder: img_feats,img_pos)",
    )
    apply.add_argument("--no-split", action="store_true", help="compile one graph")
    apply.set_defaults(run=_apply)

    bench = sub.add_parser(
        "bench",
        help="time eager PyTorch, ONNX Runtime, stock TVM and shipped TVM on a model; report with a chart",
    )
    _add_model_arguments(bench)
    _add_judged_argument(bench)
    bench.add_argument(
        "--systems",
        default="eager,onnxruntime,tvm_stock,tvm_shipped",
        help="comma-separated, from eager, onnxruntime, tvm_stock, tvm_shipped (default: all)",
    )
    bench.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    bench.add_argument("--calls", type=int, default=5, help="timed calls per system a round (one when slow; default 5)")
    bench.add_argument("--warmup", type=int, default=2, help="untimed calls before them (default 2)")
    bench.add_argument(
        "--kernels",
        type=int,
        default=0,
        metavar="N",
        help="then time the shipped build's kernels one by one; its N costliest in the report (default 0: none)",
    )
    bench.add_argument(
        "--cache", metavar="DIR", help="compiled-library cache (default: $SURGERY_CACHE or ~/.cache/surgery)"
    )
    bench.add_argument("--reports", default="reports", help="directory for bench_<model>.md/.json/.png")
    bench.set_defaults(run=_bench)

    locate = sub.add_parser(
        "locate",
        help="find where TVM goes wrong (import, build, numbers): culprit operators, "
        "their source lines, minimal reproducers, report",
    )
    _add_model_arguments(locate)
    _add_tvm_arguments(locate, schedules="default")
    locate.add_argument("--out", help="artifact directory: reproducers, TVM's log (default: out/locate/<model>)")
    locate.add_argument("--reports", default="reports", help="directory for locate_<model>.md / locate_<model>.json")
    locate.add_argument(
        "--save-probe",
        metavar="REWRITE",
        help="keep the reproducer found as a user probe case fixed by "
        "REWRITE, so that --rewrite auto applies REWRITE while TVM fails it (see 'probe add')",
    )
    locate.set_defaults(run=_locate)

    probe = sub.add_parser("probe", help="user probe cases: reproducers that make --rewrite auto apply a rewrite")
    actions = probe.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="keep a reproducer directory (from locate) as a probe case fixed by a rewrite")
    add.add_argument("reproducer", help="a reproducer directory written by locate (program.pt2, inputs.pt, case.json)")
    add.add_argument("--rewrite", required=True, help="the rewrite that fixes it")
    add.add_argument("--name", help="the case's name (default: the directory's)")
    add.set_defaults(run=_probe_add)
    actions.add_parser("list", help="the probe cases and where they are kept").set_defaults(run=_probe_list)
    remove = actions.add_parser("remove", help="forget a probe case")
    remove.add_argument("name")
    remove.set_defaults(run=_probe_remove)
    return parser


def _add_model_arguments(parser) -> None:
    """What to operate on and with which inputs: shared by apply and locate. The model options
    default to None: each model's adapter has its own defaults (see ``python -m surgery list``)."""
    parser.add_argument("target", help="a model name (see 'list') or the path of a saved ExportedProgram (.pt2)")
    parser.add_argument(
        "--checkpoint",
        help="weights: a SAM3 checkpoint or bare encoder state_dict (geometry_encoder), a save_pretrained "
        "directory (rt_detr, deformable_detr), a torchvision state_dict file (maskrcnn); default: seeded random weights",
    )
    parser.add_argument("--points", type=int, help="geometry_encoder: number of points (default 3)")
    parser.add_argument("--boxes", type=int, help="geometry_encoder: number of boxes (default 2)")
    parser.add_argument("--batch", type=int, help="batch size (default 1)")
    parser.add_argument(
        "--feat-size", type=_size, help="geometry_encoder: image feature map, N or HxW (default 72: SAM3 at 1008 px)"
    )
    parser.add_argument(
        "--image-size",
        type=_size,
        help="rt_detr, deformable_detr, maskrcnn: input image, N or HxW (default 640, 512 and 800x1088)",
    )
    parser.add_argument("--variant", help="rt_detr: the released architecture, r18vd (default) or r50vd")
    parser.add_argument("--proposals", type=int, help="maskrcnn: boxes per image the heads run on (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="weights, example inputs and hypothesis seed")
    for name, default in (("points", 16), ("boxes", 8), ("batch", 4)):
        parser.add_argument(
            f"--max-{name}",
            type=int,
            help=f"geometry_encoder: compile one module serving up to this many {name} (default {default} "
            "once any --max-* is given); shorter prompts are right-padded with SAM3's masks",
        )


def _add_judged_argument(parser) -> None:
    parser.add_argument(
        "--judged",
        action="store_true",
        help="judge float outputs against the program run in float64, within a multiple of eager's own error, "
        "instead of 1e-5 from eager: for deep networks whose float32 noise exceeds it (the detectors always are)",
    )


def _add_tvm_arguments(parser, schedules: str | None) -> None:
    """Which rewrites, which TVM build, which cache: shared by apply and locate. ``schedules``
    None: the model's own (``ModelSpec.schedules``)."""
    parser.add_argument(
        "--rewrite", action="append", help="auto (probe TVM; default), all, none, or rewrite names (repeatable)"
    )
    parser.add_argument(
        "--schedules",
        choices=["ours", "default"],
        default=schedules,
        help="ours: speed rewrites + surgery.schedules for this CPU (shipped); default: stock TVM's CPU pipeline "
        + (f"(default: {schedules})" if schedules else "(default: the model's, ours for every model)"),
    )
    parser.add_argument(
        "--cache", metavar="DIR", help="compiled-library cache (default: $SURGERY_CACHE or ~/.cache/surgery)"
    )


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.run(args)
    except UsageError as exc:
        print(f"surgery: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("surgery: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (python -m surgery list | head): stop quietly, as Python's docs
        # advise, pointing stdout at devnull so the interpreter's final flush does not fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
