"""Where the shipped TVM build of SAM3's geometry encoder spends its time, kernel by kernel.

Builds (or loads from the cache) the shipped configuration of ``python -m surgery apply
geometry_encoder`` for one part: ``one`` (the one-call build), ``image`` or ``prompt`` (the two
stages of the split build), then times every call the relax VM makes (kernels and VM builtins)
through its instrument hook (``surgery.bench.kernel_times``), summed over ``--calls`` calls and
divided by their number. The hook adds ~2 us per call; the median of uninstrumented calls is
printed first. ``python -m surgery bench MODEL --kernels N`` does the same for any model.

    python scripts/profile_geometry_encoder.py --part prompt --points 3 --boxes 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["one", "image", "prompt"], default="prompt")
    parser.add_argument("--points", type=int, default=3)
    parser.add_argument("--boxes", type=int, default=2)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--top", type=int, default=25, help="rows of the table")
    args = parser.parse_args(argv)
    if args.points < 1 or args.boxes < 1 or args.calls < 1 or args.top < 1:
        print("profile: error: --points, --boxes, --calls and --top must be >= 1", file=sys.stderr)
        return 2

    import surgery
    from models.geometry_encoder import geometry_encoder_spec
    from surgery.bench import kernel_times
    from surgery.pipeline import choose_rewrites
    from surgery.rewrites.base import decomposed
    from surgery.stages import hoist
    from surgery.tvm_backend import cache_root, compile_program, configure_threads, speed_rewrites

    threads = configure_threads()
    spec = geometry_encoder_spec(points=args.points, boxes=args.boxes, batch=1)
    example = spec.example_args
    with torch.no_grad():
        program = torch.export.export(spec.module, example)
    names, _ = choose_rewrites("auto", progress=lambda m: None)
    rewritten = surgery.rewrite(program, names)
    if args.part == "one":
        part, inputs = speed_rewrites(rewritten)[0], example
    else:
        staged = hoist(decomposed(speed_rewrites(rewritten, spec.stage_inputs)[0]), spec.stage_inputs, example)
        image_args, prompt_args = staged.split_args(example)
        if args.part == "image":
            part, inputs = staged.stage, image_args
        else:
            with torch.no_grad():
                frontier = tuple(staged.stage.module()(*image_args))
            part, inputs = staged.rest, frontier + tuple(prompt_args)
    fn, info = compile_program(part, schedules="ours", cache_dir=cache_root())
    plain_ms, table = kernel_times(fn, inputs, calls=args.calls)
    total = sum(k.ms for k in table)
    print(
        f"{args.part} ({args.points} points + {args.boxes} boxes), TVM threads {threads}, "
        f"{'cached library' if info.get('cached') else 'compiled now'}: median {plain_ms:.2f} ms "
        f"uninstrumented, {total:.2f} ms summed over the VM's calls"
    )
    print(f"{'ms/call':>8} {'share':>6} {'calls':>5}  kernel or builtin  (argument shapes)")
    for k in table[: args.top]:
        print(f"{k.ms:8.3f} {k.ms / total:6.1%} {k.runs:5d}  {k.symbol}  {[tuple(s) for s in k.shapes]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
