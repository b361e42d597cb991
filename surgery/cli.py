"""``python -m surgery``: a thin shell over the library.

    python -m surgery list                     # models and rewrites, with their contracts
    python -m surgery verify [--rewrite NAME]  # property-check rewrites, write reports/rewrites.*
"""

from __future__ import annotations

import argparse
import sys
import time


class UsageError(Exception):
    """Bad input from the user: one clear line on stderr, exit 2, no traceback."""


def _list(args) -> int:
    from .rewrites import REGISTRY

    print("rewrites (applied in this order):")
    for name, cls in REGISTRY.items():
        print(f"  {name:12s} {cls.summary}")
        print(f"  {'':12s} contract: {cls.contract}")
    return 0


def _verify(args) -> int:
    from .equivalence.report import write_rewrite_report
    from .equivalence.verify import verify_rewrite
    from .rewrites import REGISTRY

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
        result = verify_rewrite(name, args.examples, args.graph_examples, args.seed,
                                progress=lambda m: print(m, flush=True))
        results.append(result)
        verdict = "equivalent" if result.passed else f"NOT EQUIVALENT: {result.error}"
        print(f"  {name}: {verdict} ({time.perf_counter() - start:.1f} s)", flush=True)
        for key, stats in sorted(result.stats.items()):
            print(f"    {key}: {stats}", flush=True)
    md, js = write_rewrite_report(results, args.out)
    print(f"report: {md} and {js}")
    return 0 if all(r.passed for r in results) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m surgery", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="show models and rewrites").set_defaults(run=_list)
    verify = sub.add_parser("verify", help="property-check rewrites and write an equivalence report")
    verify.add_argument("--rewrite", action="append", help="rewrite to check (repeatable; default: all)")
    verify.add_argument("--examples", type=int, default=2000, help="function-form hypothesis examples per rewrite")
    verify.add_argument("--graph-examples", type=int, default=40, help="graph-form examples per rewrite (export+rewrite each)")
    verify.add_argument("--seed", type=int, default=0)
    verify.add_argument("--out", default="reports", help="directory for rewrites.md / rewrites.json")
    verify.set_defaults(run=_verify)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UsageError as exc:
        print(f"surgery: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("surgery: interrupted", file=sys.stderr)
        return 130
