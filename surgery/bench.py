"""Benchmark one model on this CPU: eager PyTorch, ONNX Runtime, stock TVM and the shipped TVM
build, interleaved in one run, each checked against eager before it is timed.

    from surgery.bench import bench, write_bench_report
    report = bench(spec)                       # spec: a surgery.pipeline.ModelSpec
    write_bench_report(report, "reports")      # bench_<model>.md, .json and .png

Systems (``SYSTEMS``):
- ``eager``: the original module under ``torch.no_grad()``, all cores.
- ``onnxruntime``: ``torch.onnx.export(..., dynamo=True)``, CPU provider, all cores (the
  ``bench`` extra: ``pip install -e '.[bench]'``).
- ``tvm_stock``: the probe-chosen rewrites, stock TVM's CPU pipeline (``--schedules default``).
- ``tvm_shipped``: what ``apply`` builds with ``--schedules ours``: the same rewrites, the speed
  rewrites and our schedules for this CPU.

Timing: every system is called once untimed; then ``rounds`` rounds each run every system in turn
(interleaved, so drifting load hits all alike): ``warmup`` untimed calls lasting at least
``WARMUP_S``, then ``calls`` timed ones (one timed call, for a system slower than
``SLOW_CALL_S`` a call). The untimed calls outlast the previous system's threads, which spin on
the cores after its last call (PyTorch's OpenMP for ~200 ms): two 4 ms calls of the geometry
encoder did not, and its five timed calls after eager PyTorch took ~7.5 ms where they take ~4
(Zen 5 EPYC). Each round starts one system later than the one before, so that no system
always follows the same one: on a 2-core EPYC the same ONNX Runtime session took 415.6 ms a call after eager PyTorch and 498.2 ms after
shipped TVM in one run (RT-DETR, medians of 3 rounds). Medians over all timed
calls; ratios against the faster of eager and ONNX Runtime, from this one run. Compiled TVM
libraries are cached like ``apply``'s; the report says when a library was reused and how long
building it took.

Where the shipped build's time goes (``kernels=N``, ``--kernels N``): after the timing, the
shipped build's kernels and VM builtins timed one by one through the relax VM's instrument hook
(``kernel_times``), the ``N`` costliest in the report.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .atomic import atomic_path, write_text
from .equivalence.judge import largest_magnitude
from .pipeline import ModelSpec, _compare_outputs, _float64_reference, _judge_outputs, _outputs, export, rewrite
from .versions import REPORTED, installed_versions

SYSTEMS = ("eager", "onnxruntime", "tvm_stock", "tvm_shipped")
PEERS = ("eager", "onnxruntime")
SLOW_CALL_S = 0.5
WARMUP_S = 0.3  # untimed calls last at least this long: the previous system's threads stop spinning
# Shipped TVM's median over the best peer's that the project aims for, per model.
TARGETS = {"geometry_encoder": 0.5, "rt_detr": 1.0, "deformable_detr": 1.0, "maskrcnn": 1.0}


@dataclasses.dataclass
class System:
    name: str
    fn: Callable | None  # None: not built (``info["error"]`` says why) or its outputs were wrong
    info: dict


def cpu() -> dict:
    """The CPU this runs on: its name, cores and the vector extensions the schedules decide by."""
    name, flags = platform.processor() or "unknown", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    vector = [isa for isa in ("avx512f", "avx2", "fma") if isa in flags]
    return {"name": name, "cores": os.cpu_count(), "vector": vector, "platform": platform.platform()}


def _onnxruntime(module, args, cache_dir: Path) -> System:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return System("onnxruntime", None, {"error": f"not installed ({exc}): pip install -e '.[bench]'"})
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(module, args, dynamo=True, verbose=False)
        with atomic_path(cache_dir / "model.onnx", suffix=".onnx") as tmp:
            onnx_program.save(str(tmp))
        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        session = ort.InferenceSession(str(cache_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - an exporter failure is a result to report
        return System("onnxruntime", None, {"error": f"{type(exc).__name__}: {str(exc).strip()[:300]}"})
    names = [i.name for i in session.get_inputs()]

    def run(*a):
        return tuple(torch.from_numpy(o) for o in session.run(None, {n: x.numpy() for n, x in zip(names, a)}))

    info = {"version": ort.__version__, "threads": options.intra_op_num_threads, "build_s": time.perf_counter() - start}
    return System("onnxruntime", run, info)


def _tvm(name: str, program, schedules: str, cache_dir: str | Path | None, log: list) -> System:
    from .tvm_backend import cache_root, compile_program, speed_rewrites

    start = time.perf_counter()
    try:
        speed = {}
        if schedules == "ours":
            program, speed = speed_rewrites(program)
        fn, info = compile_program(program, schedules=schedules, cache_dir=cache_root(cache_dir), log=log)
    except Exception as exc:  # noqa: BLE001 - a build failure is a result to report
        return System(
            name, None, {"error": f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[-1][:300]}"}
        )
    info = {**info, "schedules": schedules, "speed_rewrites": speed, "prepare_s": time.perf_counter() - start}
    return System(name, fn, info)


def build_systems(
    spec: ModelSpec, systems: Sequence[str] = SYSTEMS, cache_dir=None, progress: Callable[[str], None] = print
):
    """The systems named, built; and the exported program they were built from."""
    from .tvm_backend import cache_root

    exported = export(spec, progress=progress)
    module = spec.module if spec.module is not None else exported.program.module()
    built = []
    if "eager" in systems:
        built.append(System("eager", module, {"threads": torch.get_num_threads()}))
    if "onnxruntime" in systems:
        start = time.perf_counter()
        onnx_dir = cache_root(cache_dir) / "onnx" / spec.name
        built.append(_onnxruntime(module, spec.example_args, onnx_dir))
        progress(f"[onnxruntime] {time.perf_counter() - start:7.2f} s  {built[-1].info.get('error', 'exported')}")
    if "tvm_stock" in systems or "tvm_shipped" in systems:
        rewritten = rewrite(exported, "auto", progress=progress)
        log: list[str] = []
        for name, schedules in (("tvm_stock", "default"), ("tvm_shipped", "ours")):
            if name in systems:
                start = time.perf_counter()
                built.append(_tvm(name, rewritten.program, schedules, cache_dir, log))
                info = built[-1].info
                what = info.get("error") or ("cached library" if info.get("cached") else f"{schedules} schedules")
                progress(f"[{name:10s}] {time.perf_counter() - start:7.2f} s  {what}")
                built[-1].info["rewrites"] = sorted(rewritten.applied)
    return built, exported


def check_systems(spec: ModelSpec, systems: list[System], exported, progress=print) -> dict[str, dict]:
    """Each system's outputs on the example inputs against eager's (judged against float64 for
    judged specs, as ``apply`` does); a system whose outputs are wrong is not timed."""
    args = spec.example_args
    with torch.no_grad():
        expected = _outputs(exported.reference(*args))
        float64 = _float64_reference(spec, exported)
        reference = float64(*args) if float64 else None
    checks = {}
    for system in systems:
        if system.fn is None:
            continue
        with torch.no_grad():
            actual = system.fn(*args)
        stats = (
            _judge_outputs(spec, actual, expected, reference, largest_magnitude(args))
            if reference is not None
            else _compare_outputs(spec, actual, expected)
        )
        ok = all(s.within_bounds() for s in stats.values())
        checks[system.name] = {"ok": ok, "outputs": {k: str(v) for k, v in stats.items()}}
        hint = "" if ok or reference is not None else " (a deep network's float32 noise can exceed 1e-5: --judged)"
        progress(f"   check {system.name}: {'ok' if ok else 'WRONG OUTPUTS, not timed'}{hint}")
        if not ok:
            system.fn, system.info["error"] = None, "outputs differ from eager's; not timed"
    return checks


def warm_up(fn: Callable, args, calls: int, seconds: float) -> None:
    """Untimed calls of ``fn``: at least ``calls`` of them, lasting at least ``seconds``."""
    start = time.perf_counter()
    done = 0
    while done < calls or time.perf_counter() - start < seconds:
        fn(*args)
        done += 1


def time_systems(
    systems: list[System], args, rounds: int, calls: int, warmup: int, progress=print, warmup_s: float = WARMUP_S
) -> dict:
    """Median, min and count of timed calls per system (see the module's docstring): each
    system's untimed calls in a round are at least ``warmup`` and last at least ``warmup_s``."""
    live = [s for s in systems if s.fn is not None]
    times: dict[str, list[float]] = {s.name: [] for s in live}
    slow = set()
    with torch.no_grad():
        for system in live:
            start = time.perf_counter()
            system.fn(*args)
            if time.perf_counter() - start > SLOW_CALL_S:
                slow.add(system.name)
        for round_ in range(rounds):
            start_at = round_ % len(live)
            for system in live[start_at:] + live[:start_at]:
                if system.name not in slow:
                    warm_up(system.fn, args, warmup, warmup_s)
                for _ in range(1 if system.name in slow else calls):
                    start = time.perf_counter()
                    system.fn(*args)
                    times[system.name].append((time.perf_counter() - start) * 1e3)
            progress(
                f"   round {round_ + 1}/{rounds}: "
                + ", ".join(f"{n} {statistics.median(t):.1f} ms" for n, t in times.items())
            )
    return {n: {"median_ms": statistics.median(t), "min_ms": min(t), "calls": len(t)} for n, t in times.items()}


@dataclasses.dataclass
class KernelTime:
    """One kernel or VM builtin of a TVM function: its time and how often it runs, per call."""

    symbol: str
    ms: float  # per call of the function, all its runs together
    runs: int  # per call of the function
    shapes: list  # of its tensor arguments, at its first run


def kernel_times(fn, args, calls: int = 3) -> tuple[float, list[KernelTime]]:
    """The median of ``calls`` plain calls of a compiled ``TvmFunction`` on ``args`` (ms), and
    every kernel and VM builtin it runs, costliest first, timed through the relax VM's instrument
    hook over ``calls`` more calls (the hook adds ~2 us a run)."""
    from .tvm_backend import _to_tvm

    vm, inputs = fn.vm, [_to_tvm(a, fn.device) for a in args]
    main = vm["main"]
    main(*inputs)
    plain = []
    for _ in range(calls):
        start = time.perf_counter()
        main(*inputs)
        plain.append((time.perf_counter() - start) * 1e3)
    spent: dict[str, float] = collections.defaultdict(float)
    runs: collections.Counter = collections.Counter()
    shapes: dict[str, list] = {}
    started: list[float] = []

    def instrument(_func, symbol, before, _ret, *call_args):
        if before:
            started.append(time.perf_counter())
        else:
            spent[symbol] += time.perf_counter() - started.pop()
            runs[symbol] += 1
            shapes.setdefault(symbol, [list(a.shape) for a in call_args if hasattr(a, "shape")])
        return 0

    vm.set_instrument(instrument)
    try:
        for _ in range(calls):
            main(*inputs)
    finally:
        vm.set_instrument(None)  # later calls run uninstrumented
    table = [KernelTime(sym, 1e3 * sec / calls, runs[sym] // calls, shapes[sym]) for sym, sec in spent.items()]
    return statistics.median(plain), sorted(table, key=lambda k: -k.ms)


def bench(
    spec: ModelSpec,
    systems: Sequence[str] = SYSTEMS,
    *,
    rounds: int = 3,
    calls: int = 5,
    warmup: int = 2,
    kernels: int = 0,
    cache_dir=None,
    progress: Callable[[str], None] = print,
) -> dict:
    """Build, check and time the systems named on the spec's example inputs: the report's data."""
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise ValueError(f"unknown system {unknown[0] if unknown else None!r}; systems: {', '.join(SYSTEMS)}")
    if min(rounds, calls) < 1 or warmup < 0 or kernels < 0:
        raise ValueError("rounds and calls must be >= 1, warmup and kernels >= 0")
    from .tvm_backend import configure_threads

    torch.set_num_threads(os.cpu_count() or 1)
    tvm_threads = configure_threads()
    built, exported = build_systems(spec, systems, cache_dir, progress)
    checks = check_systems(spec, built, exported, progress)
    progress(f"[time      ] {rounds} rounds of {warmup} untimed + {calls} timed calls (one timed when slow)")
    timed = time_systems(built, spec.example_args, rounds, calls, warmup, progress)
    peers = [timed[p]["median_ms"] for p in PEERS if p in timed]
    best_peer = min(peers) if peers else None
    rows = []
    for system in built:
        row = {"system": system.name, "info": system.info, "check": checks.get(system.name)}
        if system.name in timed:
            row.update(timed[system.name])
            row["vs_best_peer"] = row["median_ms"] / best_peer if best_peer else None
        rows.append(row)
    shipped = timed.get("tvm_shipped", {}).get("median_ms")
    target = TARGETS.get(spec.name)
    kernel_table = None
    shipped_fn = next((s.fn for s in built if s.name == "tvm_shipped" and s.fn is not None), None)
    if kernels and shipped_fn is not None:
        profiled = min(calls, 3)
        progress(f"[kernels   ] the shipped build's kernels, timed one by one over {profiled} calls")
        plain_ms, table = kernel_times(shipped_fn, spec.example_args, calls=profiled)
        kernel_table = {
            "plain_median_ms": plain_ms,
            "summed_ms": sum(k.ms for k in table),
            "top": [dataclasses.asdict(k) for k in table[:kernels]],
        }
    return {
        "model": spec.name,
        "description": spec.description,
        "inputs": {n: list(a.shape) for n, a in zip(spec.input_names, spec.example_args) if hasattr(a, "shape")},
        "cpu": cpu(),
        "threads": {"torch": torch.get_num_threads(), "tvm": tvm_threads},
        "versions": installed_versions((*REPORTED, "onnxruntime", "onnx", "onnxscript")),
        "rounds": rounds,
        "calls": calls,
        "warmup": warmup,
        "rows": rows,
        "best_peer_ms": best_peer,
        "kernels": kernel_table,
        "target": None
        if target is None or shipped is None or best_peer is None
        else {"ratio": target, "measured": shipped / best_peer, "met": shipped / best_peer <= target},
    }


# ----------------------------------------------------------------------------- report


def _build_text(info: dict) -> str:
    if "error" in info:
        return info["error"]
    if info.get("cached"):
        built = info.get("built", {})
        took = built.get("import_s", 0) + built.get("build_s", 0)
        return f"cached library (built in {took:.0f} s)" if built else "cached library"
    if "import_s" in info:
        return f"compiled in {info['prepare_s']:.0f} s (import {info['import_s']:.0f} s, build {info['build_s']:.0f} s)"
    if "build_s" in info:
        return f"exported in {info['build_s']:.0f} s"
    return ""


def markdown(report: dict, chart: str | None) -> str:
    c = report["cpu"]
    lines = [
        f"# Benchmark: `{report['model']}`",
        "",
        f"CPU: {c['name']}, {c['cores']} cores, vector extensions: {', '.join(c['vector']) or 'none'}; "
        f"threads: torch {report['threads']['torch']}, TVM {report['threads']['tvm']}.",
        f"Model: {report['description'].get('model')}; inputs: "
        + ", ".join(f"{n} {tuple(s)}" for n, s in report["inputs"].items())
        + ".",
        f"Command: `{report['command']}`: {report['rounds']} interleaved rounds of {report['warmup']} untimed calls "
        f"(for at least {WARMUP_S} s) and {report['calls']} timed calls per system (one timed call a round for systems slower than {SLOW_CALL_S} s); "
        "medians of the timed calls. Every system's outputs were checked against eager's before timing.",
        "",
    ]
    if chart:
        lines += [f"![latency per system]({chart})", ""]
    lines += ["| system | median | min | calls | vs best peer | build |", "|---|---:|---:|---:|---:|---|"]
    for row in report["rows"]:
        if "median_ms" in row:
            ratio = f"{row['vs_best_peer']:.2f}x" if row.get("vs_best_peer") is not None else "-"
            lines.append(
                f"| {row['system']} | {row['median_ms']:.1f} ms | {row['min_ms']:.1f} ms | {row['calls']} | {ratio} | "
                f"{_build_text(row['info'])} |"
            )
        else:
            lines.append(f"| {row['system']} | not timed | | | | {_build_text(row['info'])} |")
    target = report["target"]
    if target:
        lines += [
            "",
            f"Target: shipped TVM <= {target['ratio']}x the faster of eager and ONNX Runtime: "
            f"**{target['measured']:.2f}x, {'met' if target['met'] else 'MISSED'}**.",
        ]
    if report.get("kernels"):
        k = report["kernels"]
        lines += [
            "",
            f"Where shipped TVM's time goes: its {len(k['top'])} costliest kernels and VM builtins, timed one by one "
            f"(a call: {k['plain_median_ms']:.1f} ms plain, {k['summed_ms']:.1f} ms summed over all of them).",
            "",
            "| ms a call | share | runs a call | kernel | argument shapes |",
            "|---:|---:|---:|---|---|",
        ]
        for row in k["top"]:
            name = row["symbol"] if len(row["symbol"]) <= 80 else row["symbol"][:77] + "..."
            lines.append(
                f"| {row['ms']:.2f} | {row['ms'] / k['summed_ms']:.1%} | {row['runs']} | `{name}` | "
                f"{', '.join('x'.join(map(str, shape)) or 'scalar' for shape in row['shapes'])} |"
            )
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + "."]
    return "\n".join(lines) + "\n"


def chart_png(report: dict, path: Path) -> bool:
    """A bar chart of each timed system's median latency; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in report["rows"] if "median_ms" in r]
    if not rows:
        return False
    names = [r["system"] for r in rows][::-1]
    medians = [r["median_ms"] for r in rows][::-1]
    figure, axes = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.4), dpi=110)
    colors = ["#4c72b0" if n.startswith("tvm") else "#999999" for n in names]
    bars = axes.barh(names, medians, color=colors)
    if max(medians) / min(medians) > 30:
        axes.set_xscale("log")
    for bar, value in zip(bars, medians):
        axes.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value:.1f} ms", va="center", fontsize=9)
    axes.set_xlabel("median latency per call (ms), lower is better")
    axes.set_title(f"{report['model']} on {report['cpu']['name']}", fontsize=10)
    axes.margins(x=0.25)
    figure.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return True


def write_bench_report(report: dict, out_dir: str | Path) -> tuple[Path, Path, Path | None]:
    """``bench_<model>.md``, ``.json`` and the chart ``.png`` (when matplotlib is installed)."""
    out = Path(out_dir)
    stem = f"bench_{report['model']}"
    png = out / f"{stem}.png"
    out.mkdir(parents=True, exist_ok=True)
    drawn = chart_png(report, png)
    md = write_text(out / f"{stem}.md", markdown(report, png.name if drawn else None))
    js = write_text(out / f"{stem}.json", json.dumps(report, indent=2, default=str))
    return md, js, png if drawn else None
