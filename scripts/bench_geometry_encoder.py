"""Benchmark: SAM3's geometry encoder on this CPU, eager PyTorch vs ONNX Runtime vs TVM.

Systems, each checked against the original model's outputs before it is timed:
- ``eager``: the original module, ``torch.no_grad()``, all cores.
- ``onnxruntime``: the same model through ``torch.onnx.export(..., dynamo=True)``, CPU provider,
  all cores (needs the ``bench`` extra: ``pip install -e '.[bench]'``).
- ``tvm default``: the probe-chosen rewrites, one graph, stock TVM's CPU pipeline.
- ``tvm shipped, one call``: what ``surgery`` ships for a single call: rewrites, speed rewrites
  (``conv_as_matmul``, ``attention_reassociation``) and our schedules (``surgery.schedules``).
- ``tvm shipped, image+prompt``: the interactive configuration: ``surgery.stages.hoist`` splits
  the graph into an image stage (run once per image) and a prompt stage (run per click); the
  one-call latency is their sum, and each stage is timed on its own as well.
- ``tvm shipped, session: first prompt on an image``: ``surgery.stages.PromptSession`` over both
  builds, told to forget its image before each call: the first prompt on a new image, answered by
  the one-call build (the image stage runs after that answer, for the prompts after it).

Timing: ``--rounds`` rounds run each system in turn (interleaved, so drifting machine load hits
all alike): ``--warmup`` untimed calls (lasting at least 0.3 s), then ``--calls`` timed ones; medians over all timed calls. Ratios are
against the best peer (the faster of eager and ONNX Runtime), from the numbers of this one run.
Compiled TVM libraries are cached (``$SURGERY_CACHE``); a second run reuses them and the report
says so, with the compile times recorded when they were built.

    python scripts/bench_geometry_encoder.py          # writes reports/bench_geometry_encoder_stages.{md,json}
    python scripts/bench_geometry_encoder.py --rounds 3 --calls 5 --configs 3x2
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import surgery  # noqa: E402
from surgery.atomic import write_text  # noqa: E402
from surgery.bench import SLOW_CALL_S, WARMUP_S, cpu, warm_up  # noqa: E402
from surgery.equivalence.compare import compare  # noqa: E402
from surgery.stages import PromptSession  # noqa: E402
from surgery.versions import REPORTED, installed_versions  # noqa: E402

TARGET_ONE_CALL = 0.5  # shipped TVM one call <= 0.5 x the best peer
TARGET_PROMPT_FLOOR = 2.0  # prompt stage median <= 2 x its read floor on the same machine
READ_FLOOR = "  read floor (prompt stage's bytes)"
SESSION_FIRST = "tvm shipped, session: first prompt on an image"


def check(outputs, expected) -> dict:
    outputs = tuple(outputs)
    emb = compare(outputs[0].to(expected[0].dtype), expected[0])
    mask = compare(outputs[1].to(expected[1].dtype), expected[1])
    return {"embeddings": str(emb), "padding_mask": str(mask), "ok": emb.within_bounds() and mask.within_bounds()}


def build_systems(spec, log):
    """name -> (callable on the wrapper's 8 inputs, info)."""
    from surgery.pipeline import choose_rewrites
    from surgery.rewrites.base import decomposed
    from surgery.stages import hoist
    from surgery.tvm_backend import cache_root, compile_program, speed_rewrites

    args = spec.example_args
    systems = {}
    module = spec.module
    systems["eager"] = (lambda *a: module(*a), {"threads": torch.get_num_threads()})

    try:
        import onnxruntime as ort

        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(module, args, dynamo=True, verbose=False)
        path = cache_root() / "onnx" / f"{spec.name}.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx_program.save(str(path))
        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        ort_names = [i.name for i in session.get_inputs()]

        def run_ort(*a):
            return [torch.from_numpy(o) for o in session.run(None, {n: x.numpy() for n, x in zip(ort_names, a)})]

        systems["onnxruntime"] = (
            run_ort,
            {
                "version": ort.__version__,
                "threads": options.intra_op_num_threads,
                "export_s": time.perf_counter() - start,
            },
        )
    except ImportError as exc:
        log(f"onnxruntime not measured: {exc} (pip install -e '.[bench]')")
        systems["onnxruntime"] = (None, {"error": f"not installed: {exc}"})
    except Exception as exc:  # noqa: BLE001 - an exporter failure is a result to report
        log(f"onnxruntime failed: {type(exc).__name__}: {exc}")
        systems["onnxruntime"] = (None, {"error": f"{type(exc).__name__}: {str(exc)[:300]}"})

    with torch.no_grad():
        program = torch.export.export(module, args)
    names, _ = choose_rewrites("auto", progress=log)
    rewritten = surgery.rewrite(program, names)
    tvm_log: list = []
    fn, info = compile_program(rewritten, schedules="default", cache_dir=cache_root(), log=tvm_log)
    systems["tvm default"] = (fn, {"rewrites": names, **info})

    one_call, speed = speed_rewrites(rewritten)
    fn, info = compile_program(one_call, schedules="ours", cache_dir=cache_root(), log=tvm_log)
    systems["tvm shipped, one call"] = (fn, {"rewrites": names, "speed_rewrites": speed, **info})

    split_program, speed = speed_rewrites(rewritten, spec.stage_inputs)
    staged = hoist(decomposed(split_program), spec.stage_inputs, args)
    image_fn, image_info = compile_program(staged.stage, schedules="ours", cache_dir=cache_root(), log=tvm_log)
    prompt_fn, prompt_info = compile_program(staged.rest, schedules="ours", cache_dir=cache_root(), log=tvm_log)
    split_info = {
        "rewrites": names,
        "speed_rewrites": speed,
        "image_stage": image_info,
        "prompt_stage": prompt_info,
        "frontier_mib": staged.frontier_bytes() / 2**20,
        "hoisted_nodes": staged.hoisted_nodes,
    }
    systems["tvm shipped, image+prompt"] = (staged.compose(image_fn, prompt_fn), split_info)
    # a prompt session's first prompt on a new image (forgotten before each call; no background
    # thread, which would run the image stage during the next timed call)
    prompt_session = PromptSession(
        systems["tvm shipped, one call"][0], staged.compose(image_fn, prompt_fn), background=False
    )

    def first_prompt(*a):
        prompt_session.forget()
        return prompt_session(*a)

    systems[SESSION_FIRST] = (first_prompt, {})
    image_args, prompt_args = staged.split_args(args)
    frontier = tuple(image_fn(*image_args))
    systems["  image stage (once per image)"] = (lambda *a: image_fn(*image_args), split_info)
    systems["  prompt stage (per prompt)"] = (lambda *a: prompt_fn(*frontier, *prompt_args), split_info)
    reads = prompt_stage_reads(staged)
    split_info["prompt_reads"] = reads
    floor = torch.ones(int(reads["total_mb"] * 1e6) // 4)  # as many bytes as the prompt stage must read
    systems[READ_FLOOR] = (lambda *a: floor.sum(), {})
    return systems


_SPLITS = {torch.ops.aten.split_with_sizes.default, torch.ops.aten.split.Tensor}


def weight_bytes_read(program: torch.export.ExportedProgram) -> int:
    """Bytes of the program's weights and constants that its graph reads. A weight read only
    through a split (attention's packed q/k/v in-projection, whose k and v thirds went to the
    image stage) counts only the pieces some node reads; TVM folds the rest away."""
    signature = program.graph_signature
    held = {
        **signature.inputs_to_parameters,
        **signature.inputs_to_buffers,
        **getattr(signature, "inputs_to_lifted_tensor_constants", {}),
    }
    total = 0
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in held or not node.users:
            continue
        value = node.meta["val"]
        full = value.numel() * value.element_size()
        if all(
            user.op == "call_function"
            and user.target in _SPLITS
            and all(piece.target is operator.getitem for piece in user.users)
            for user in node.users
        ):
            pieces = {(user, piece.args[1]) for user in node.users for piece in user.users if piece.users}
            total += min(full, sum(user.meta["val"][index].numel() * value.element_size() for user, index in pieces))
        else:
            total += full
    return total


def prompt_stage_reads(staged, tokens: int = 72 * 72, head_width: int = 32, heads: int = 8) -> dict:
    """What one prompt-stage call must read whatever its schedules: every weight it reads and the
    cross-attention keys and values of the three layers (the image stage's tensors of heads x head
    width x tokens elements that the prompt's products reduce over head width, keys, or over
    tokens, values; plain ``[heads, ...]`` or packed into panels ``[heads * panels, ..., panel]``):
    every element of them enters every prompt's result. (The feature map the boxes pool from is left out: a small box needs only
    part of it.) How fast this machine reads that many bytes is timed with the systems, in the
    same rounds (the ``READ_FLOOR`` system: a 2-thread sum over a buffer of that size, warm as
    between two prompts): the one-off reading it replaced swung from 16 to 29 GB/s within one
    run on a shared 2-core EPYC. That time is a floor under the prompt stage here."""
    weights = weight_bytes_read(staged.rest)
    keys_values = sum(
        f["bytes"]
        for f in staged.frontier
        if len(f["shape"]) == 3
        and f["shape"][-2] in (head_width, tokens)  # the products' reduction: keys, values
        and math.prod(f["shape"]) == heads * head_width * tokens
    )
    total = weights + keys_values
    return {"weights_mb": weights / 1e6, "keys_values_mb": keys_values / 1e6, "total_mb": total / 1e6}


def measure(systems, args, rounds: int, calls: int, warmup: int) -> dict:
    """Every round runs each system untimed ``warmup`` times and for at least ``WARMUP_S``, then
    ``calls`` times timed. The untimed calls matter: the system before it leaves its thread pool
    spinning on a core (PyTorch's OpenMP for 200 ms, ONNX Runtime's and TVM's pools likewise)
    and the caches full of its own data; a block's first calls measure that hand-over (here 30,
    5, 4, 3.5 ms for a 2.6 ms prompt stage), not the system. A count of calls alone does not
    cover it for a fast system: five 3 ms prompt stages end before the spinning does, and the
    2-core EPYC timed the 3-point prompt stage at 7.15 ms that way against 3.3 ms alone."""
    times = {name: [] for name, (fn, _) in systems.items() if fn is not None}
    slow = set()  # stock TVM takes seconds a call: 1 untimed + 2 timed calls a round suffice
    with torch.no_grad():
        for name in times:
            start = time.perf_counter()
            systems[name][0](*args)
            if time.perf_counter() - start > SLOW_CALL_S:
                slow.add(name)
        for _ in range(rounds):
            for name in times:
                fn = systems[name][0]
                warm_up(fn, args, 1 if name in slow else warmup, WARMUP_S)
                for _ in range(min(calls, 2) if name in slow else calls):
                    start = time.perf_counter()
                    fn(*args)
                    times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"median_ms": statistics.median(t), "min_ms": min(t), "calls": len(t)} for name, t in times.items()}


def run_config(points: int, boxes: int, rounds: int, calls: int, warmup: int, log) -> dict:
    from models.geometry_encoder import geometry_encoder_spec

    spec = geometry_encoder_spec(points=points, boxes=boxes, batch=1)
    args = spec.example_args
    log(f"== {points} points + {boxes} boxes, batch 1, 72x72x256 image features")
    systems = build_systems(spec, log)
    with torch.no_grad():
        expected = spec.module(*args)
    checks = {}
    for name, (fn, info) in list(systems.items()):
        if fn is None or name.startswith("  "):
            continue  # stages alone are checked through their composition
        with torch.no_grad():
            checks[name] = check(fn(*args), expected)
        log(f"   check {name}: {'ok' if checks[name]['ok'] else 'MISMATCH'} (embeddings {checks[name]['embeddings']})")
        if not checks[name]["ok"]:
            systems[name] = (None, {**info, "error": "outputs differ from the original; not timed"})
    results = measure(systems, args, rounds, calls, warmup)
    peers = [results[n]["median_ms"] for n in ("eager", "onnxruntime") if n in results]
    best_peer = min(peers)
    rows = []
    for name, (_fn, info) in systems.items():
        row = {"system": name, "info": info, "check": checks.get(name)}
        if name in results:
            row.update(results[name])
            row["vs_best_peer"] = results[name]["median_ms"] / best_peer
        rows.append(row)
        log(
            f"   {name:36s} "
            + (
                f"{results[name]['median_ms']:9.2f} ms  {row['vs_best_peer']:6.2f}x best peer"
                if name in results
                else f"not timed: {info.get('error')}"
            )
        )
    one_call = min(
        results[n]["median_ms"] for n in ("tvm shipped, one call", "tvm shipped, image+prompt") if n in results
    )
    prompt = results.get("  prompt stage (per prompt)", {}).get("median_ms")
    split = results.get("tvm shipped, image+prompt", {}).get("median_ms")
    single = results.get("tvm shipped, one call", {}).get("median_ms")
    first = results.get(SESSION_FIRST, {}).get("median_ms")
    reads = next((info.get("prompt_reads") for _fn, info in systems.values() if info.get("prompt_reads")), None)
    floor = results.get(READ_FLOOR, {}).get("median_ms")
    if reads and floor:
        reads.update(floor_ms=floor, read_gb_per_s=reads["total_mb"] / floor)
    return {
        "points": points,
        "boxes": boxes,
        "batch": 1,
        "rows": rows,
        "best_peer_ms": best_peer,
        "targets": {
            "one_call_ratio": one_call / best_peer,
            "one_call_met": one_call / best_peer <= TARGET_ONE_CALL,
            "prompt_stage_ms": prompt,
            "prompt_floor_ms": floor,
            "prompt_stage_met": None not in (prompt, floor) and prompt <= TARGET_PROMPT_FLOOR * floor,
            "image_and_prompt_ms": split,
            "one_call_ms": single,
            "image_and_prompt_met": None not in (split, single) and split <= single,
            "session_first_prompt_ms": first,
        },
    }


def compile_line(info: dict) -> str:
    if not info:
        return ""
    if "image_stage" in info:
        return "image: " + compile_line(info["image_stage"]) + "; prompt: " + compile_line(info["prompt_stage"])
    if info.get("cached"):
        built = info.get("built", {})
        return (
            f"cached library (built in {built.get('import_s', 0) + built.get('build_s', 0):.1f} s)"
            if built
            else "cached library"
        )
    if "build_s" in info:
        return f"compiled in {info['import_s'] + info['build_s']:.1f} s"
    if "export_s" in info:
        return f"exported in {info['export_s']:.1f} s"
    return ""


def markdown(report: dict) -> str:
    lines = [
        "# Benchmark: SAM3 geometry encoder, eager PyTorch vs ONNX Runtime vs TVM",
        "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, threads: torch "
        f"{report['machine']['torch_threads']}, ONNX Runtime {report['machine']['ort_threads']}, TVM "
        f"{report['machine']['tvm_threads']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
        + ".",
        "",
        f"Command: `{report['command']}` ({report['rounds']} interleaved rounds; in each, every system runs "
        f"{report['warmup']} untimed calls (for at least {WARMUP_S} s), then {report['calls']} timed ones; medians of the timed calls). Every system's outputs were checked against "
        "the original model before timing (embeddings float32 max abs <= 1e-5, padding mask identical).",
        "",
    ]
    for config in report["configs"]:
        lines += [
            f"## {config['points']} points + {config['boxes']} boxes, batch 1, 72x72x256 features",
            "",
            "| system | median ms | vs best peer | build |",
            "|---|---:|---:|---|",
        ]
        for row in config["rows"]:
            if "median_ms" in row:
                lines.append(
                    f"| {row['system'].strip()} | {row['median_ms']:.2f} | {row['vs_best_peer']:.2f}x | {compile_line(row['info'])} |"
                )
            else:
                lines.append(f"| {row['system'].strip()} | not timed | | {row['info'].get('error', '')} |")
        t = config["targets"]
        reads = next(
            (row["info"].get("prompt_reads") for row in config["rows"] if row["info"].get("prompt_reads")), None
        )
        lines += [
            "",
            f"- One call, shipped TVM (the faster shipped configuration): {t['one_call_ratio']:.2f}x the best peer "
            f"(target <= {TARGET_ONE_CALL}x): **{'met' if t['one_call_met'] else 'MISSED'}**.",
            f"- Prompt stage median: {t['prompt_stage_ms']:.2f} ms, {t['prompt_stage_ms'] / t['prompt_floor_ms']:.1f}x "
            f"its read floor of {t['prompt_floor_ms']:.2f} ms below (target <= {TARGET_PROMPT_FLOOR}x): "
            f"**{'met' if t['prompt_stage_met'] else 'MISSED'}**.",
            f"- Image stage + one prompt: {t['image_and_prompt_ms']:.2f} ms against one call's {t['one_call_ms']:.2f} ms "
            f"(target: no slower): **{'met' if t['image_and_prompt_met'] else 'MISSED'}**.",
        ]
        if t.get("session_first_prompt_ms") is not None:
            lines += [
                "- A prompt session (`surgery.stages.PromptSession`) answers the first prompt on a new image with the "
                f"one-call build: {t['session_first_prompt_ms']:.2f} ms against one call's {t['one_call_ms']:.2f} ms "
                f"(the same build plus the session's bookkeeping: {t['session_first_prompt_ms'] / t['one_call_ms'] - 1:+.1%}); "
                "the image stage runs after that answer (in the background, or at the image's second prompt), and "
                "later prompts on the image run the prompt stage alone.",
            ]
        if reads:
            lines += [
                f"- Floor under any prompt stage on this machine: one call reads at least {reads['total_mb']:.1f} MB "
                f"({reads['weights_mb']:.1f} MB of weights, {reads['keys_values_mb']:.1f} MB of cross-attention keys and values "
                "from the image stage), "
                f"and this machine reads that many bytes in {reads['floor_ms']:.2f} ms ({reads['read_gb_per_s']:.0f} GB/s, "
                "2-thread sum over a warm buffer of that size, timed in the same rounds as the systems)."
            ]
        lines += [""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="3x2,8x4", help="POINTSxBOXES,... (default: 3x2,8x4)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls before each system's calls in every round")
    parser.add_argument("--out", default="reports", help="directory for bench_geometry_encoder_stages.{md,json}")
    args = parser.parse_args(argv)
    try:
        configs = [tuple(int(x) for x in c.lower().split("x")) for c in args.configs.split(",") if c]
        if not configs or any(len(c) != 2 or c[0] < 1 or c[1] < 0 for c in configs):
            raise ValueError
    except ValueError:
        print(
            f"bench: error: --configs takes POINTSxBOXES,... with points >= 1 and boxes >= 0, got {args.configs!r}",
            file=sys.stderr,
        )
        return 2
    if min(args.rounds, args.calls) < 1 or args.warmup < 0:
        print("bench: error: --rounds and --calls must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    torch.set_num_threads(os.cpu_count() or 1)
    from surgery.tvm_backend import configure_threads

    tvm_threads = configure_threads()

    def log(message: str) -> None:
        print(message, flush=True)

    report = {
        "command": "python scripts/bench_geometry_encoder.py"
        + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:] if argv is None else argv)),
        "machine": {
            "cpu": cpu()["name"],
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "ort_threads": os.cpu_count(),
            "tvm_threads": tvm_threads,
            "platform": platform.platform(),
        },
        "versions": installed_versions((*REPORTED, "onnxruntime", "onnx", "onnxscript")),
        "rounds": args.rounds,
        "calls": args.calls,
        "warmup": args.warmup,
        "configs": [run_config(p, b, args.rounds, args.calls, args.warmup, log) for p, b in configs],
    }
    out = Path(args.out)
    write_text(out / "bench_geometry_encoder_stages.json", json.dumps(report, indent=2, default=str))
    write_text(out / "bench_geometry_encoder_stages.md", markdown(report))
    log(f"report: {out / 'bench_geometry_encoder_stages.md'} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
