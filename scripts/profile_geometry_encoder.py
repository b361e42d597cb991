"""Where the shipped TVM build of SAM3's geometry encoder spends its time, kernel by kernel.

Builds (or loads from the cache) the shipped configuration of ``python -m surgery apply
geometry_encoder`` for one part: ``one`` (the one-call build), ``image`` or ``prompt`` (the two
stages of the split build), then times every call the relax VM makes (kernels and VM builtins)
through its instrument hook, summed over ``--calls`` calls and divided by their number. The hook
adds ~2 us per call; the median of uninstrumented calls is printed first.

    python scripts/profile_geometry_encoder.py --part prompt --points 3 --boxes 2
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
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
    from surgery.pipeline import choose_rewrites
    from surgery.rewrites.base import decomposed
    from surgery.stages import hoist
    from surgery.tvm_backend import _to_tvm, cache_root, compile_program, configure_threads, speed_rewrites

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
        staged = hoist(decomposed(speed_rewrites(rewritten, split=True)[0]), spec.stage_inputs, example)
        image_args, prompt_args = staged.split_args(example)
        if args.part == "image":
            part, inputs = staged.stage, image_args
        else:
            with torch.no_grad():
                frontier = tuple(staged.stage.module()(*image_args))
            part, inputs = staged.rest, frontier + tuple(prompt_args)
    fn, info = compile_program(part, schedules="ours", cache_dir=cache_root())
    vm, device = fn.vm, fn.device
    tvm_inputs = [_to_tvm(a, device) for a in inputs]
    main_fn = vm["main"]
    for _ in range(5):
        main_fn(*tvm_inputs)
    plain = []
    for _ in range(args.calls):
        start = time.perf_counter()
        main_fn(*tvm_inputs)
        plain.append(time.perf_counter() - start)

    spent: dict[str, float] = collections.defaultdict(float)
    count: collections.Counter = collections.Counter()
    shapes: dict[str, list] = {}
    started: list[float] = []

    def instrument(func, symbol, before, _ret, *call_args):
        if before:
            started.append(time.perf_counter())
        else:
            spent[symbol] += time.perf_counter() - started.pop()
            count[symbol] += 1
            shapes.setdefault(symbol, [tuple(a.shape) for a in call_args if hasattr(a, "shape")])
        return 0

    vm.set_instrument(instrument)
    for _ in range(args.calls):
        main_fn(*tvm_inputs)
    total = sum(spent.values()) / args.calls
    print(
        f"{args.part} ({args.points} points + {args.boxes} boxes), TVM threads {threads}, "
        f"{'cached library' if info.get('cached') else 'compiled now'}: median {1e3 * statistics.median(plain):.2f} ms "
        f"uninstrumented, {1e3 * total:.2f} ms summed over the VM's calls"
    )
    print(f"{'ms/call':>8} {'share':>6} {'calls':>5}  kernel or builtin  (argument shapes)")
    for symbol, seconds in sorted(spent.items(), key=lambda kv: -kv[1])[: args.top]:
        per_call = seconds / args.calls
        print(
            f"{1e3 * per_call:8.3f} {per_call / total:6.1%} {count[symbol] // args.calls:5d}  {symbol}  {shapes[symbol]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
