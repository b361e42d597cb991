"""Benchmark: the rewritten roi_align against torchvision's C++ kernel and its pure-PyTorch
``_roi_align``, on SAM3-shaped inputs (256 x 72 x 72 features, 7 x 7 output, adaptive sampling);
with ``--multiscale``, torchvision's MultiScaleRoIAlign against the program the ``row_dispatch``
rewrite makes of it (every box pooled on every level), on Mask R-CNN shapes.

Time: medians over interleaved repeats in this process, after a warm-up, all cores.
Peak memory: one fresh subprocess per (implementation, boxes), the rise of the process's peak
resident set (VmHWM, reset through /proc/self/clear_refs) over the call. Ratios come from the
numbers of this one run.

    python scripts/bench_roi_align.py                 # writes reports/bench_roi_align.{md,json}
    python scripts/bench_roi_align.py --boxes 1,4 --repeats 3
    python scripts/bench_roi_align.py --multiscale    # writes reports/bench_roi_align_multiscale.{md,json}
    python scripts/bench_roi_align.py --multiscale --boxes 100 --repeats 3 --no-tvm
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgery.atomic import write_text  # noqa: E402
from surgery.equivalence import compare  # noqa: E402
from surgery.rewrites.roi_align import roi_align as rewritten_roi_align  # noqa: E402

C, H, W, OUT = 256, 72, 72, 7
# torchvision's _roi_align lays out [K, C, 7, 7, H, W] intermediates (about ten of them live at
# once); past this estimate it would not fit the machine, so it is skipped, and the report says so.
PURE_PYTORCH_LIMIT_BYTES = 12e9
SLOW_REPEATS = 3


def pure_pytorch_estimate(K: int) -> float:
    return 10 * K * C * OUT * OUT * H * W * 4


def implementations():
    from torchvision.ops.roi_align import _roi_align

    eager_pure = _roi_align.__wrapped__  # the function itself, not its torch.compile wrapper
    return {
        "torchvision C++ kernel": lambda x, boxes: torchvision.ops.roi_align(x, boxes, OUT),
        "surgery (grid_sample)": lambda x, boxes: rewritten_roi_align(x, boxes, OUT),
        "torchvision _roi_align": lambda x, boxes: eager_pure(
            x, torchvision.ops._utils.convert_boxes_to_roi_format(boxes), 1.0, OUT, OUT, -1, False
        ),
    }


def make_inputs(K: int, dist: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, C, H, W, generator=g)
    if dist == "random":  # SAM3's prompt format: normalized cx, cy, w, h, uniform in [0, 1]
        cxcywh = torch.rand(K, 4, generator=g)
    else:  # "large": boxes as large as the map, the worst case for sample counts
        cxcywh = torch.cat([0.5 + 0.1 * torch.rand(K, 2, generator=g), torch.full((K, 2), 1.0)], 1)
    xyxy = torch.cat([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], 1)
    return x, [xyxy * torch.tensor([W, H, W, H], dtype=torch.float32)]


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def measure_memory_child(impl: str, K: int, dist: str) -> None:
    x, boxes = make_inputs(K, dist)
    fn = implementations()[impl]
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current RSS
    baseline = _status("VmRSS")
    out = fn(x, boxes)
    peak = _status("VmHWM")
    print(json.dumps({"peak_bytes": peak - baseline, "output_bytes": out.numel() * out.element_size()}))


def measure_memory(impl: str, K: int, dist: str) -> int:
    proc = subprocess.run(
        [sys.executable, __file__, "--memory-child", impl, str(K), dist], capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]


# ----------------------------------------------------------------------------- multiscale
# Mask R-CNN's poolers: four FPN maps of 256 channels at strides 4-32 of an 800 x 1088 image;
# boxes 7 x 7 and masks 14 x 14, sampling_ratio 2.
IMAGE = (800, 1088)
STRIDES = (4, 8, 16, 32)
POOLERS = {"box 7x7": 7, "mask 14x14": 14}
MULTISCALE_REPEATS = 5


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def multiscale_inputs(K: int, seed: int = 0):
    """The maps, and K proposals: sqrt(area) log-uniform in 16-800 px (every level), aspect
    0.5-2, inside the image."""
    g = torch.Generator().manual_seed(seed)
    features = tuple(torch.randn(1, C, IMAGE[0] // s, IMAGE[1] // s, generator=g) for s in STRIDES)
    size = torch.empty(K).uniform_(math.log(16), math.log(800), generator=g).exp()
    aspect = torch.empty(K).uniform_(0.5, 2.0, generator=g).sqrt()
    w, h = (size * aspect).clamp(max=IMAGE[1] - 1), (size / aspect).clamp(max=IMAGE[0] - 1)
    x1, y1 = torch.rand(K, generator=g) * (IMAGE[1] - w), torch.rand(K, generator=g) * (IMAGE[0] - h)
    return features, torch.stack([x1, y1, x1 + w, y1 + h], dim=1)


def multiscale_implementations(output_size: int, features, boxes, tvm: bool):
    """name -> callable(*features, boxes): the eager module, the rewritten program run by
    PyTorch, and (``tvm``) that program built by the installed TVM."""
    from surgery import rewrite
    from surgery.rewrites.row_dispatch import MultiScaleModule

    pooler = torchvision.ops.MultiScaleRoIAlign([str(i) for i in range(len(STRIDES))], output_size, 2)
    module = MultiScaleModule(pooler, len(STRIDES), IMAGE)
    program = rewrite(torch.export.export(module, (*features, boxes)), ["row_dispatch"])
    impls = {"torchvision MultiScaleRoIAlign (eager)": module, "row_dispatch, PyTorch": program.module()}
    if tvm:
        from surgery.tvm_backend import compile_program

        fn, _ = compile_program(program)
        impls["row_dispatch, TVM"] = lambda *args: fn(*args)[0]
    return impls


def multiscale(args, counts: list[int]) -> int:
    from surgery.rewrites.row_dispatch import CONTRACT
    from surgery.tvm_backend import tvm_versions

    rows = []
    for pooler_name, output_size in POOLERS.items():
        for K in counts:
            features, boxes = multiscale_inputs(K)
            impls = multiscale_implementations(output_size, features, boxes, args.tvm)
            reference = impls["torchvision MultiScaleRoIAlign (eager)"](*features, boxes)
            outputs = {n: fn(*features, boxes) for n, fn in impls.items()}  # also the warm-up
            if not torch.equal(outputs["row_dispatch, PyTorch"], reference):
                print(f"the rewritten program is not bit-exact ({pooler_name}, K={K})", file=sys.stderr)
                return 1
            times = {n: [] for n in impls}
            for _ in range(args.repeats):  # interleaved: drift hits every implementation alike
                for n, fn in impls.items():
                    start = time.perf_counter()
                    fn(*features, boxes)
                    times[n].append(time.perf_counter() - start)
            for n in impls:
                row = {
                    "pooler": pooler_name,
                    "boxes": K,
                    "impl": n,
                    "ms": 1e3 * statistics.median(times[n]),
                    "max_abs_vs_eager": compare(outputs[n], reference).max_abs,
                    "bit_exact": torch.equal(outputs[n], reference),
                }
                rows.append(row)
                print(f"{pooler_name:10s} K={K:4d}  {n:40s} {row['ms']:9.1f} ms", flush=True)

    eager = {(r["pooler"], r["boxes"]): r["ms"] for r in rows if r["impl"].startswith("torchvision")}
    tvm = f", apache-tvm {tvm_versions()['apache-tvm']}" if args.tvm else ""
    lines = [
        "# MultiScaleRoIAlign benchmark: eager against the row_dispatch rewrite",
        "",
        f"`python scripts/bench_roi_align.py --multiscale` on {cpu_name()} ({platform.machine()}, "
        f"{os.cpu_count()} cores), torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"torchvision {torchvision.__version__}{tvm}. Mask R-CNN's poolers: four FPN maps of {C} channels "
        f"at strides {', '.join(map(str, STRIDES))} of a {IMAGE[0]} x {IMAGE[1]} image, sampling_ratio 2, "
        "float32; proposals of sqrt(area) log-uniform in 16-800 px (every level), inside the image. "
        f"Median of {args.repeats} interleaved repeats after a warm-up call. The rewritten program "
        "pools every box on every level and keeps each box's level with `where`: "
        f"{len(STRIDES)} times the roi_align work of the eager module, which pools each box once.",
        "",
        "| pooler | K | impl | time (ms) | time vs eager | max abs error vs eager | bit-exact |",
        "|---|---:|---|---:|---:|---:|---|",
    ]
    lines += [
        f"| {r['pooler']} | {r['boxes']} | {r['impl']} | {r['ms']:.1f} | "
        f"{r['ms'] / eager[(r['pooler'], r['boxes'])]:.2f}x | {r['max_abs_vs_eager']:.2g} | "
        f"{'yes' if r['bit_exact'] else 'no'} |"
        for r in rows
    ]
    lines += ["", f"Contract of the rewrite: {CONTRACT}.", ""]
    out = Path(args.out)
    write_text(out / "bench_roi_align_multiscale.md", "\n".join(lines) + "\n")
    write_text(out / "bench_roi_align_multiscale.json", json.dumps({"cpu": cpu_name(), "rows": rows}, indent=2) + "\n")
    print(f"report: {out / 'bench_roi_align_multiscale.md'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", help="comma-separated box counts (default 1,4,16,64; --multiscale: 100,1000)")
    parser.add_argument("--dists", default="random,large", help="box size distributions: random, large")
    parser.add_argument("--repeats", type=int, help=f"default 21; --multiscale: {MULTISCALE_REPEATS}")
    parser.add_argument("--multiscale", action="store_true", help="MultiScaleRoIAlign against row_dispatch")
    parser.add_argument("--no-tvm", dest="tvm", action="store_false", help="--multiscale: without the TVM build")
    parser.add_argument("--out", default="reports", help="directory for the reports")
    parser.add_argument("--memory-child", nargs=3, metavar=("IMPL", "K", "DIST"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        impl, K, dist = args.memory_child
        measure_memory_child(impl, int(K), dist)
        return 0
    boxes = args.boxes or ("100,1000" if args.multiscale else "1,4,16,64")
    args.repeats = args.repeats or (MULTISCALE_REPEATS if args.multiscale else 21)
    try:
        counts = [int(k) for k in boxes.split(",")]
    except ValueError:
        parser.error(f"--boxes must be comma-separated integers, got {boxes!r}")
    if args.multiscale:
        if any(k < 1 for k in counts) or args.repeats < 1:
            parser.error("--boxes and --repeats must be positive")
        return multiscale(args, counts)
    dists = args.dists.split(",")
    if any(d not in ("random", "large") for d in dists) or any(k < 1 for k in counts) or args.repeats < 1:
        parser.error("--dists takes random,large; --boxes and --repeats must be positive")

    impls = implementations()
    rows, accuracy = [], []
    for dist in dists:
        for K in counts:
            x, boxes = make_inputs(K, dist)
            names = [
                n
                for n in impls
                if n != "torchvision _roi_align" or pure_pytorch_estimate(K) <= PURE_PYTORCH_LIMIT_BYTES
            ]
            # Check before timing, in float64 where rounding can't hide a wrong rule: the rewrite
            # must match the C++ kernel within the float64 bound. In float32 on a 72 x 72 map,
            # coordinate rounding alone moves the kernel itself ~2e-5 off exact arithmetic, so
            # the float32 numbers are reported (below), not gated on.
            x64, boxes64 = x.double(), [b.double() for b in boxes]
            exact = impls["torchvision C++ kernel"](x64, boxes64)
            scale = float(x.abs().max())
            check64 = compare(impls["surgery (grid_sample)"](x64, boxes64), exact, scale=scale)
            if not check64.within_bounds():
                print(
                    f"the rewrite disagrees with the C++ kernel in float64 ({dist}, K={K}): {check64}", file=sys.stderr
                )
                return 1
            reference = impls["torchvision C++ kernel"](x, boxes)
            errors = {name: compare(impls[name](x, boxes), reference, scale=scale) for name in names[1:]}
            accuracy.append(
                {
                    "dist": dist,
                    "boxes": K,
                    "float64_ours_vs_cpp_max_rel": check64.max_rel,
                    "float32_ours_vs_cpp": errors["surgery (grid_sample)"].max_abs,
                    "float32_cpp_vs_float64": compare(reference.double(), exact).max_abs,
                    "float32_ours_vs_float64": compare(
                        impls["surgery (grid_sample)"](x, boxes).double(), exact
                    ).max_abs,
                }
            )
            times = {n: [] for n in names}
            for i in range(args.repeats):  # interleaved: drift hits every implementation alike
                for n in names:
                    if n == "torchvision _roi_align" and i >= SLOW_REPEATS:
                        continue  # seconds per call: a few repeats are plenty
                    start = time.perf_counter()
                    impls[n](x, boxes)
                    times[n].append(time.perf_counter() - start)
            memory = {n: measure_memory(n, K, dist) for n in names}
            for n in impls:
                row = {"dist": dist, "boxes": K, "impl": n}
                if n in names:
                    row.update(
                        ms=1e3 * statistics.median(times[n]),
                        peak_mb=memory[n] / 2**20,
                        max_abs_vs_cpp=errors[n].max_abs if n in errors else 0.0,
                    )
                else:
                    row.update(skipped=f"would need ~{pure_pytorch_estimate(K) / 1e9:.0f} GB")
                rows.append(row)
                shown = f"{row['ms']:9.2f} ms  {row['peak_mb']:9.1f} MB" if "ms" in row else row["skipped"]
                print(f"{dist:6s} K={K:3d}  {n:24s} {shown}", flush=True)

    def get(dist, K, impl, key):
        return next((r.get(key) for r in rows if (r["dist"], r["boxes"], r["impl"]) == (dist, K, impl)), None)

    lines = [
        "# roi_align benchmark",
        "",
        f"`python scripts/bench_roi_align.py` on {platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), torchvision {torchvision.__version__}. "
        f"Input 1 x {C} x {H} x {W} float32, output {OUT} x {OUT}, sampling_ratio=-1 (adaptive), aligned=False. "
        f"Boxes: `random` = SAM3-style normalized cxcywh uniform in [0, 1]; `large` = boxes the size of "
        f"the map (the C++ kernel's worst case, 11 x 11 samples per bin, which is our static bound). "
        f"Median of {args.repeats} interleaved repeats ({SLOW_REPEATS} for `_roi_align`, seconds a call); peak memory = rise of peak RSS over one call in a fresh process.",
        "",
        "| boxes | K | impl | time (ms) | peak memory (MB) | time vs C++ | memory: _roi_align / ours | max abs error vs C++ |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    summary = []
    for dist in dists:
        for K in counts:
            cpp = get(dist, K, "torchvision C++ kernel", "ms")
            ours_mem = get(dist, K, "surgery (grid_sample)", "peak_mb")
            for impl in impls:
                ms, mb = get(dist, K, impl, "ms"), get(dist, K, impl, "peak_mb")
                if ms is None:
                    lines.append(f"| {dist} | {K} | {impl} | skipped: {get(dist, K, impl, 'skipped')} | | | | |")
                    continue
                pure_ratio = f"{mb / ours_mem:.1f}x" if impl == "torchvision _roi_align" and ours_mem else ""
                err = get(dist, K, impl, "max_abs_vs_cpp")
                lines.append(
                    f"| {dist} | {K} | {impl} | {ms:.2f} | {mb:.1f} | {ms / cpp:.2f}x | {pure_ratio} | {err:.2g} |"
                )
            summary.append(
                {
                    "dist": dist,
                    "boxes": K,
                    "time_ratio_vs_cpp": get(dist, K, "surgery (grid_sample)", "ms") / cpp,
                    "memory_ratio_pure_over_ours": (get(dist, K, "torchvision _roi_align", "peak_mb") or 0) / ours_mem
                    if get(dist, K, "torchvision _roi_align", "peak_mb")
                    else None,
                }
            )
    from surgery.rewrites.roi_align import CONTRACT

    lines += [
        "",
        f"Contract of the rewrite: {CONTRACT}.",
        "",
        "Accuracy. float64: the rewrite against the C++ kernel run in float64 (normwise max rel, "
        "bound 1e-12; checked before timing). float32: max abs errors of the rewrite and of the C++ kernel "
        "against the float64 result, and between the two; reported, not gated on (see README, precision note).",
        "",
        "| boxes | K | float64 ours vs C++ (rel) | float32 ours vs C++ | float32 C++ vs float64 | float32 ours vs float64 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {a['dist']} | {a['boxes']} | {a['float64_ours_vs_cpp_max_rel']:.2g} | {a['float32_ours_vs_cpp']:.3g} | "
        f"{a['float32_cpp_vs_float64']:.3g} | {a['float32_ours_vs_float64']:.3g} |"
        for a in accuracy
    ]
    lines += [
        "",
        "`_roi_align` lacks the C++ kernel's boundary rule (a sample beyond -1 or the map's size "
        "contributes 0), hence its errors on boxes that straddle the map's edge.",
        "",
        "Targets: time within 3x of the C++ kernel; peak memory at least 10x below `_roi_align`.",
        "",
    ]
    for s in summary:
        mem = (
            f", memory {s['memory_ratio_pure_over_ours']:.1f}x below _roi_align"
            if s["memory_ratio_pure_over_ours"]
            else ""
        )
        verdict = "met" if s["time_ratio_vs_cpp"] <= 3 else "MISSED"
        lines.append(
            f"- {s['dist']}, K={s['boxes']}: time {s['time_ratio_vs_cpp']:.2f}x the C++ kernel ({verdict}){mem}"
        )
    out = Path(args.out)
    write_text(out / "bench_roi_align.md", "\n".join(lines) + "\n")
    write_text(
        out / "bench_roi_align.json",
        json.dumps({"rows": rows, "summary": summary, "accuracy": accuracy}, indent=2) + "\n",
    )
    print("\n".join(lines[-len(summary) :]))
    print(f"report: {out / 'bench_roi_align.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
