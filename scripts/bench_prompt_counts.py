"""Latency cost of serving varying prompt counts from one module compiled at fixed maxima.

Compiles SAM3's geometry encoder with the installed stock TVM twice, with the rewrites its probe
chooses: at exact counts (default 3 points, 2 boxes, batch 1) and at the maxima (default 16
points, 8 boxes, batch 4, ``models/padded_prompts.py``). Then times, interleaved, in this one
process, medians over ``--repeats`` calls after a warm-up: the exact module, the padded module
called with the same prompts (padding and cutting back included), the padded module at full
load, and eager PyTorch on both. The outputs of the two modules on the same prompts are
compared too (valid rows; masks identical).

    python scripts/bench_prompt_counts.py             # writes reports/bench_prompt_counts.{md,json}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import surgery  # noqa: E402
from models.geometry_encoder import GeometryEncoderWrapper, PromptShape, build_geometry_encoder, example_inputs  # noqa: E402
from models.padded_prompts import PaddedGeometryEncoder, PromptLimits, valid_rows  # noqa: E402
from surgery import tvm_backend  # noqa: E402
from surgery.atomic import write_text  # noqa: E402
from surgery.equivalence import compare  # noqa: E402


def compile_at(wrapper, shape: PromptShape, needed):
    with torch.no_grad():
        program = torch.export.export(wrapper, example_inputs(shape))
    log: list = []
    with tvm_backend.native_log(log):
        fn, times = tvm_backend.compile_program(surgery.rewrite(program, needed))
    return fn, times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=3)
    parser.add_argument("--boxes", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--max-points", type=int, default=16)
    parser.add_argument("--max-boxes", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--feat-size", type=int, default=72)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "reports"))
    args = parser.parse_args(argv)
    feat = (args.feat_size, args.feat_size)
    try:
        limits = PromptLimits(args.max_points, args.max_boxes, args.max_batch).validate()
        exact = PromptShape(args.points, args.boxes, args.batch, feat).validate()
        if args.batch != 1:
            raise ValueError("--batch must be 1 (the exact module is compared with a batch-1 padded module too)")
        if args.boxes < 1:
            raise ValueError("--boxes must be >= 1 here: a module exported with 0 boxes does not build on TVM")
        if (
            args.points > limits.max_points
            or args.boxes > limits.max_boxes
            or args.batch > limits.max_batch
            or args.repeats < 1
        ):
            raise ValueError("the exact counts must fit the maxima, and --repeats >= 1")
    except ValueError as exc:
        print(f"bench_prompt_counts: error: {exc}", file=sys.stderr)
        return 2

    start = time.perf_counter()
    wrapper = GeometryEncoderWrapper(build_geometry_encoder(seed=0), feat).eval()
    needed = tvm_backend.probe().needed()
    print(f"rewrites (probe of apache-tvm {tvm_backend.tvm_versions()['apache-tvm']}): {needed}", flush=True)
    exact_fn, exact_times = compile_at(wrapper, exact, needed)
    print(f"exact module ({args.points} points, {args.boxes} boxes, batch {args.batch}): {exact_times}", flush=True)
    padded_fn, padded_times = compile_at(wrapper, limits.shape(feat), needed)
    print(f"padded module ({limits}): {padded_times}", flush=True)
    padded = PaddedGeometryEncoder(padded_fn, limits, feat)
    # The same maxima of points and boxes at batch 1: what padding tokens cost, apart from batch.
    limits1 = PromptLimits(limits.max_points, limits.max_boxes, 1)
    padded1_fn, padded1_times = compile_at(wrapper, limits1.shape(feat), needed)
    print(f"padded module ({limits1}): {padded1_times}", flush=True)
    padded1 = PaddedGeometryEncoder(padded1_fn, limits1, feat)

    small = example_inputs(exact, seed=1)
    full = example_inputs(limits.shape(feat), seed=2)
    with torch.no_grad():
        reference = wrapper(*small)
    a, b = exact_fn(*small), padded(*small)
    stats = [
        compare(torch.cat(valid_rows(*b)), torch.cat(valid_rows(*a))),
        compare(torch.cat(valid_rows(*b)), torch.cat(valid_rows(*reference))),
    ]
    agreed = bool(torch.equal(a[1], b[1]) and torch.equal(b[1], reference[1])) and all(s.within_bounds() for s in stats)
    agreement = {
        "padding_mask identical": bool(torch.equal(a[1], b[1]) and torch.equal(b[1], reference[1])),
        "exact vs padded module, valid rows": str(stats[0]),
        "padded module vs eager, valid rows": str(stats[1]),
    }

    cases = {
        f"TVM, exact module ({args.points}p {args.boxes}b batch {args.batch})": (exact_fn, small),
        f"TVM, padded module, same prompts ({args.points}p {args.boxes}b batch {args.batch})": (padded, small),
        f"TVM, padded module, full ({limits.max_points}p {limits.max_boxes}b batch {limits.max_batch})": (padded, full),
        f"TVM, padded module at batch 1 ({limits.max_points}p {limits.max_boxes}b), same prompts": (padded1, small),
        f"eager PyTorch ({args.points}p {args.boxes}b batch {args.batch})": (wrapper, small),
        f"eager PyTorch ({limits.max_points}p {limits.max_boxes}b batch {limits.max_batch})": (wrapper, full),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    with torch.no_grad():
        for fn, inputs in cases.values():
            fn(*inputs)  # warm-up
        for _ in range(args.repeats):  # interleaved, so load on the machine hits every case alike
            for name, (fn, inputs) in cases.items():
                t = time.perf_counter()
                fn(*inputs)
                times[name].append(1e3 * (time.perf_counter() - t))
    medians = {k: statistics.median(v) for k, v in times.items()}
    names = list(cases)
    ratio = medians[names[1]] / medians[names[0]]
    total = time.perf_counter() - start

    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    versions = tvm_backend.tvm_versions()
    lines = [
        "# Latency of one module for varying prompt counts (fixed maxima + SAM3's padding masks)",
        "",
        f"Generated {now} by `python scripts/bench_prompt_counts.py` ({total:.0f} s) on {platform.machine()}, "
        f"{os.cpu_count()} cores, apache-tvm {versions['apache-tvm']}, untuned (default schedules), target llvm, "
        f"{args.feat_size}x{args.feat_size} features, rewrites {needed}. Medians of {args.repeats} interleaved calls "
        "after a warm-up, one process.",
        "",
        "| case | median ms | min ms |",
        "|---|---:|---:|",
    ]
    lines += [f"| {k} | {medians[k]:.1f} | {min(times[k]):.1f} |" for k in names]
    lines += [
        "",
        f"**Cost of the choice: the padded module takes {ratio:.2f}x the exact module's time on the same "
        f"{args.points}-point, {args.boxes}-box, batch-{args.batch} prompts** "
        f"({medians[names[1]]:.0f} ms vs {medians[names[0]]:.0f} ms).",
        "",
        f"With the batch maximum at 1 (same {limits.max_points} points, {limits.max_boxes} boxes), the padded module "
        f"takes {medians[names[3]] / medians[names[0]]:.2f}x the exact module's time on the same prompts "
        f"({medians[names[3]]:.0f} ms).",
        "",
        f"Build: exact module import {exact_times['import_s']:.1f} s + build {exact_times['build_s']:.1f} s; "
        f"padded module import {padded_times['import_s']:.1f} s + build {padded_times['build_s']:.1f} s; "
        f"batch-1 padded module import {padded1_times['import_s']:.1f} s + build {padded1_times['build_s']:.1f} s.",
        "",
        "Eager PyTorch rows are for orientation; on this shared 2-core machine their medians and minima can differ a lot "
        "(other work running), so compare TVM rows with each other.",
        "",
        "Agreement on the same prompts: " + "; ".join(f"{k}: {v}" for k, v in agreement.items()),
        "",
    ]
    out = Path(args.out)
    md = write_text(out / "bench_prompt_counts.md", "\n".join(lines))
    js = write_text(
        out / "bench_prompt_counts.json",
        json.dumps(
            {
                "generated": now,
                "versions": versions,
                "rewrites": needed,
                "feat_size": args.feat_size,
                "repeats": args.repeats,
                "limits": vars(limits) if hasattr(limits, "__dict__") else str(limits),
                "exact": [args.points, args.boxes, args.batch],
                "median_ms": medians,
                "all_ms": times,
                "padded_over_exact": ratio,
                "build_s": {"exact": exact_times, "padded": padded_times, "padded_batch1": padded1_times},
                "agreement": agreement,
                "total_s": total,
            },
            indent=2,
        )
        + "\n",
    )
    print("\n".join(lines))
    print(f"report: {md} and {js}")
    return 0 if agreed else 1


if __name__ == "__main__":
    sys.exit(main())
