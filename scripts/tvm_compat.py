"""Stock TVM 0.25, 0.26 and 0.27 side by side: ``apply MODEL`` under each, for each model.

Each version is installed with pip into its own target directory (``--root``, default
``~/.cache/surgery/tvm/<version>``; skipped when already there), together with the
apache-tvm-ffi it runs with, and used through ``PYTHONPATH``: nothing is installed system-wide
and the apache-tvm in site-packages is left alone. Then, per version, in a fresh process:

    PYTHONPATH=<target> python -m surgery apply MODEL --out out/tvm_compat/<v>/<model>/out --reports out/tvm_compat/<v>/<model>/reports

(its own directories, so the main reports are never overwritten). The rewrites are chosen by the
default target-aware probe of that TVM, as for any user. Writes ``reports/tvm_compat.md`` and
``.json``: per version and model the rewrites applied (and why), import/build status, max error
against PyTorch per output, latency, wall time. Exit 0 when every run passed, 1 otherwise, 2 on
bad input.

    python scripts/tvm_compat.py                       # the three versions, every model
    python scripts/tvm_compat.py --models geometry_encoder --versions 0.26.0 --examples 5

Rerunning a subset of models or versions keeps the previous report's rows for the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surgery.atomic import write_text  # noqa: E402
from surgery.paths import display_path  # noqa: E402

VERSIONS = ("0.25.0", "0.26.0", "0.27.0")
# Each model at a size that keeps a run to minutes (the detectors compile ~2,000 and ~7,500
# operators); examples as the model's apply defaults unless --examples is given.
MODEL_ARGS = {
    "geometry_encoder": [],
    "rt_detr": ["--image-size", "320"],
    "deformable_detr": ["--image-size", "256"],
    "maskrcnn": ["--image-size", "256", "--proposals", "16"],
}
# The apache-tvm-ffi each wheel runs with. The wheels only say ">=": 0.25.0's libtvm_runtime
# needs a symbol (tvm::ffi::json::Stringify(Any, Optional<int>)) that apache-tvm-ffi 0.1.13.post3,
# 0.1.14.post1 and 0.1.15.post2 no longer export, and imports with 0.1.12; 0.26/0.27 run with
# 0.1.15.post2 (what this project's environment has). Found by importing each combination.
FFI = {"0.25.0": "0.1.12", "0.26.0": "0.1.15.post2", "0.27.0": "0.1.15.post2"}


def install(version: str, root: Path, log) -> Path:
    """apache-tvm==version and its FFI into root/version (once; a temporary directory renamed
    into place, so an interrupted install never leaves a half-filled target)."""
    target = root / version
    if (target / "tvm" / "__init__.py").is_file() and (target / "tvm_ffi" / "__init__.py").is_file():
        log(f"  {version}: already installed in {target}")
        return target
    if target.exists():
        raise SystemExit(
            f"tvm_compat: {target} exists but holds no complete TVM install; remove it first (not touching it)"
        )
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=root))
    try:
        packages = [f"apache-tvm=={version}", f"apache-tvm-ffi=={FFI.get(version, '0.1.15.post2')}"]
        log(f"  {version}: pip install --no-deps --target {target} {' '.join(packages)}")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--disable-pip-version-check",
                "--target",
                str(tmp),
                *packages,
            ],
            check=True,
        )
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def env_for(target: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(target)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def importable(target: Path) -> tuple[bool, str]:
    code = (
        "import tvm, tvm_ffi; from tvm.relax.frontend.torch import from_exported_program; "
        "print(tvm.__version__, tvm_ffi.__version__, tvm.__file__)"
    )
    run = subprocess.run([sys.executable, "-c", code], env=env_for(target), capture_output=True, text=True, cwd=ROOT)
    if run.returncode:
        return False, (run.stderr.strip().splitlines() or ["?"])[-1][:300]
    return True, run.stdout.strip()


def run_apply(version: str, model: str, target: Path, work: Path, args) -> dict:
    runs = work / version / model
    out, reports = runs / "out", runs / "reports"
    examples = [] if args.examples is None else ["--examples", str(args.examples)]
    examples += [] if args.tvm_examples is None else ["--tvm-examples", str(args.tvm_examples)]
    command = (
        [sys.executable, "-m", "surgery", "apply", model, *MODEL_ARGS[model], "--out", out, "--reports", reports]
        + examples
        + ["--seed", str(args.seed)]
        + ([] if args.schedules is None else ["--schedules", args.schedules])
        + (["--no-split"] if args.schedules == "default" else [])
    )
    start = time.perf_counter()
    run = subprocess.run(command, env=env_for(target), capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    runs.mkdir(parents=True, exist_ok=True)
    write_text(runs / "apply.log", run.stdout + "\n--- stderr ---\n" + run.stderr)
    row = {
        "version": version,
        "model": model,
        "run_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "exit_code": run.returncode,
        "wall_s": wall,
        "log": shown(runs / "apply.log"),
        "command": f"PYTHONPATH={shown(target)} python "
        + " ".join(shown(a) if isinstance(a, Path) else a for a in command[1:]),
    }
    report_path = reports / f"{model}.json"
    if not report_path.is_file():
        row["error"] = (run.stderr.strip().splitlines() or ["no report written"])[-1][:300]
        return row
    report = json.loads(report_path.read_text())
    tvm_stats = report["equivalence"].get("original_vs_tvm", {})
    parts = [v for k, v in report["tvm"].items() if k.endswith("_build") and isinstance(v, dict)]
    row.update(
        {
            "tvm": report["versions"].get("apache-tvm") or report["versions"].get("tvm"),
            "schedules": report["tvm"].get("schedules"),
            "versions": report["versions"],
            "passed": report["passed"],
            "rewrites_applied": {k: sum(v.values()) for k, v in report["rewrites"]["applied"].items()},
            "reasons": report["rewrites"]["reasons"],
            # apply's "TVM build" stage imports and builds each compiled part (compile_program); its
            # per-part timings say how long the import took, and a failure names the step that failed
            "import": (
                "ok" if parts else "FAILED: " + report["tvm"]["error"] if "error" in report["tvm"] else "not run"
            ),
            "build": (
                "ok"
                if "build_s" in report["tvm"]
                else ("FAILED: " + report["tvm"]["error"] if "error" in report["tvm"] else "not run")
            ),
            "import_s": sum(p.get("import_s", 0.0) for p in parts) if parts else None,
            "build_s": sum(p.get("build_s", 0.0) for p in parts) if parts else report["tvm"].get("build_s"),
            "cached": bool(parts) and all(p.get("cached") for p in parts),
            "outputs": {name: _output_error(stats) for name, stats in tvm_stats.items()},
            "tvm_examples": report.get("tvm_examples"),
            "latency_ms": report.get("latency", {}),
            "failures": [f.get("check") + ": " + f.get("error", "")[:300] for f in report.get("failures", [])],
        }
    )
    return row


def _output_error(stats: dict) -> dict:
    """One output's error, TVM vs the original: max abs against eager; for judged models also
    the worst error against float64 and its tolerance."""
    error = {"max_abs": stats.get("max_abs"), "dtype": stats.get("dtype")}
    if "tolerance" in stats:
        error.update(error_vs_float64=stats["error"], tolerance=stats["tolerance"])
    return error


def _error_text(error: dict) -> str:
    if error.get("dtype") not in ("torch.float32", "torch.float64"):
        return "identical" if error["max_abs"] == 0 else f"{fmt(error['max_abs'])} differ"
    if "tolerance" in error:
        return f"{fmt(error['error_vs_float64'])} (tolerance {fmt(error['tolerance'])})"
    return fmt(error["max_abs"])


def shown(path: Path) -> str:
    """A path as the reports show it: relative to the project, the home directory as ~."""
    return display_path(path, ROOT)


def fmt(value, spec=".3g", missing="-"):
    return missing if value is None else format(value, spec)


def with_earlier_rows(rows: list[dict], args) -> list[dict]:
    """This run's rows, plus the previous report's rows for the (version, model) pairs not run this
    time (``--models`` or ``--versions`` a subset), so one model can be rerun without losing the
    others' results. Each row keeps the time it ran (``run_at``), which the report shows."""
    earlier = Path(args.reports) / "tvm_compat.json"
    try:
        previous = json.loads(earlier.read_text()) if earlier.is_file() else {}
    except (OSError, ValueError):
        previous = {}
    ran = {(r.get("version"), r.get("model")) for r in rows}
    failed_versions = {r["version"] for r in rows if "model" not in r}
    kept = [
        dict(r, run_at=r.get("run_at") or previous.get("generated"))
        for r in previous.get("rows", [])
        if r.get("model") in MODEL_ARGS
        and (r.get("version"), r["model"]) not in ran
        and r.get("version") not in failed_versions
    ]
    model_order = {m: i for i, m in enumerate(MODEL_ARGS)}
    return sorted(rows + kept, key=lambda r: (r["version"], model_order.get(r.get("model"), -1)))


def write_report(rows: list[dict], args, total_s: float) -> tuple[Path, Path]:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    examples = (
        "as each model's apply defaults (20 for the geometry encoder, 3 for the DETR detectors, 2 for Mask R-CNN)"
        if args.examples is None
        else f"{args.examples} (original vs rewritten PyTorch)"
    )
    lines = [
        "# Stock TVM versions: `apply MODEL` under each",
        "",
        f"Generated {now} by `python scripts/tvm_compat.py` in {total_s:.0f} s on {platform.machine()} "
        f"({os.cpu_count()} cores); rows for models or versions not run this time are kept from the previous "
        "report, each with the time it ran. Each version is installed in its own pip target directory and run in a fresh "
        "process through PYTHONPATH; rewrites chosen by the default target-aware probe of that TVM. "
        f"Examples: {examples}; seed {args.seed}. "
        "Shapes: the geometry encoder at its defaults (3 points, 2 boxes, batch 1, 72x72 features), RT-DETR r18vd "
        "at 320x320, Deformable DETR at 256x256, Mask R-CNN at 256x256 with 16 boxes. Error bounds: the geometry encoder's float32 outputs max abs <= 1e-05 "
        "from eager, its mask identical; the detectors' outputs judged against the original run in float64 "
        "(|TVM - float64| <= 16 x |eager - float64| + 8 ulp x scale; shown: TVM's worst error against float64 and "
        "its tolerance).",
        "",
        "| model | apache-tvm | apache-tvm-ffi | schedules | rewrites applied (calls replaced) | import | build | "
        "error per output, TVM vs PyTorch | TVM latency | eager latency | verdict | wall | run at |",
        "|---|---|---|---|---|---|---|---|---:|---:|---|---:|---|",
    ]
    for r in rows:
        if "passed" not in r:
            lines.append(
                f"| {r.get('model', '-')} | {r['version']} | - | - | - | - | - | - | - | - | FAILED: {r.get('error', '')} "
                f"| {fmt(r.get('wall_s'), '.0f')} s | {r.get('run_at', '-')} |"
            )
            continue
        applied = ", ".join(f"`{k}` ({v})" for k, v in r["rewrites_applied"].items()) or "none"
        build = "ok" if r["build"] == "ok" else "FAILED"
        imp = f"ok ({fmt(r['import_s'], '.1f')} s)" if r["import"] == "ok" else "FAILED"
        build = f"{build} ({fmt(r['build_s'], '.1f')} s)"
        if r.get("cached"):
            imp = build = "ok (compiled library reused from the cache)"
        errors = "; ".join(f"{name}: {_error_text(e)}" for name, e in r["outputs"].items()) or "-"
        lines.append(
            f"| {r['model']} | {r['tvm']} | {r['versions'].get('apache-tvm-ffi', '-')} | {r.get('schedules') or 'not recorded'} "
            f"| {applied} | {imp} | {build} "
            f"| {errors} | "
            f"{fmt(r['latency_ms'].get('tvm_ms'), '.0f')} ms | {fmt(r['latency_ms'].get('eager_ms'), '.0f')} ms | "
            f"{'passed' if r['passed'] else 'FAILED'} | {r['wall_s']:.0f} s | {r.get('run_at', '-')} |"
        )
    lines += ["", "Why each rewrite was applied or skipped (the probe's findings):", ""]
    for r in rows:
        if "reasons" in r:
            lines += [f"- **{r['model']}, {r['tvm']}**"] + [f"  - `{k}`: {v}" for k, v in r["reasons"].items()]
            lines += [f"  - failure: {f}" for f in r["failures"]]
    lines += [
        "",
        "Schedules: "
        + (
            "each model's shipped configuration, as the schedules column says (the geometry encoder: speed "
            "rewrites, our schedules, its image/prompt split; RT-DETR and Deformable DETR: stock TVM's CPU pipeline; "
            "Mask R-CNN: speed rewrites and our schedules)."
            if args.schedules is None
            else f"`--schedules {args.schedules}`"
            + (" `--no-split` (stock TVM CPU pipeline, one graph)." if args.schedules == "default" else ".")
        ),
        "",
        "Latencies are medians of 5 calls in the apply process (3 or 4 when the calls take over 30 s together), "
        "on a shared machine: compare them within one run only.",
        "",
        "Commands run:",
        "",
    ] + [f"- `{r['command']}`" for r in rows if "command" in r]
    md = write_text(Path(args.reports) / "tvm_compat.md", "\n".join(lines) + "\n")
    js = write_text(
        Path(args.reports) / "tvm_compat.json",
        json.dumps(
            {
                "generated": now,
                "total_s": total_s,
                "examples": args.examples,
                "tvm_examples": args.tvm_examples,
                "seed": args.seed,
                "rows": rows,
            },
            indent=2,
        )
        + "\n",
    )
    return md, js


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--versions", nargs="+", default=list(VERSIONS), help="apache-tvm versions (default: %(default)s)"
    )
    parser.add_argument(
        "--root", default=str(Path.home() / ".cache" / "surgery" / "tvm"), help="where the target directories go"
    )
    parser.add_argument(
        "--work", default=str(ROOT / "out" / "tvm_compat"), help="per-version artifacts, logs and reports"
    )
    parser.add_argument("--reports", default=str(ROOT / "reports"), help="where tvm_compat.md/.json go")
    parser.add_argument(
        "--models", nargs="+", default=list(MODEL_ARGS), choices=list(MODEL_ARGS), help="default: %(default)s"
    )
    parser.add_argument("--examples", type=int, help="default: each model's apply default")
    parser.add_argument("--tvm-examples", type=int, help="default: --examples, else each model's apply default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--schedules",
        choices=["default", "ours"],
        help="default: stock TVM's CPU pipeline, one graph; ours: speed rewrites and our schedules "
        "(default: each model's shipped configuration, as apply runs it)",
    )
    args = parser.parse_args(argv)
    bad = [v for v in args.versions if not re.fullmatch(r"\d+\.\d+\.\d+(\.post\d+)?", v)]
    if (
        bad
        or (args.examples is not None and args.examples < 1)
        or (args.tvm_examples is not None and args.tvm_examples < 1)
    ):
        print(
            f"tvm_compat: error: {'bad version ' + repr(bad[0]) if bad else '--examples and --tvm-examples must be >= 1'}",
            file=sys.stderr,
        )
        return 2
    start = time.perf_counter()
    rows = []
    for version in args.versions:
        print(f"apache-tvm {version}", flush=True)
        try:
            target = install(version, Path(args.root).expanduser(), lambda m: print(m, flush=True))
        except subprocess.CalledProcessError as exc:
            rows.append({"version": version, "error": f"pip install failed ({exc.returncode})", "wall_s": None})
            continue
        ok, detail = importable(target)
        print(f"  import: {detail}", flush=True)
        if not ok:
            rows.append({"version": version, "error": f"import tvm failed: {detail}", "wall_s": None})
            continue
        for model in args.models:
            row = run_apply(version, model, target, Path(args.work), args)
            verdict = "passed" if row.get("passed") else f"FAILED ({row.get('error') or row.get('failures')})"
            errors = "; ".join(f"{n}: {_error_text(e)}" for n, e in row.get("outputs", {}).items())
            print(
                f"  apply {model}: {verdict}; rewrites {row.get('rewrites_applied')}; {errors}; "
                f"tvm {fmt(row.get('latency_ms', {}).get('tvm_ms'), '.0f')} ms; {row['wall_s']:.0f} s",
                flush=True,
            )
            rows.append(row)
    rows = with_earlier_rows(rows, args)
    md, js = write_report(rows, args, time.perf_counter() - start)
    print(f"report: {md} and {js} ({time.perf_counter() - start:.0f} s)")
    return 0 if all(r.get("passed") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
