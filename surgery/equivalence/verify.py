"""Run a rewrite's property checks programmatically (for the CLI and reports, not only pytest).

``verify_rewrite`` draws ``examples`` cases from the rewrite's hypothesis strategy and checks the
function form on each, then ``graph_examples`` cases through the graph form (export, rewrite,
run). It records error statistics per dtype, and on failure hypothesis's shrunk counterexample.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from hypothesis import HealthCheck, given, seed as hypothesis_seed, settings

from .compare import ErrorStats, compare
from .strategies import strategy_for


@dataclasses.dataclass
class Verification:
    rewrite: str
    contract: str
    settings: dict
    examples: int
    graph_examples: int
    seed: int
    passed: bool = True
    stats: dict[str, ErrorStats] = dataclasses.field(default_factory=dict)  # "form dtype" -> stats
    outside_contract: int = 0
    counterexample: str | None = None
    error: str | None = None
    seconds: float = 0.0


def verify_rewrite(name: str, examples: int = 2000, graph_examples: int = 50, seed: int = 0, progress=print) -> Verification:
    import surgery
    from surgery.rewrites import REGISTRY

    rw = REGISTRY[name]()
    result = Verification(name, rw.contract, rw.settings(), examples, graph_examples, seed)
    start = time.perf_counter()
    last_case: list = [None]

    def record(form, actual, expected, scale):
        stats = compare(actual, expected, scale=scale)
        key = f"{form} {expected.dtype}".replace("torch.", "")
        result.stats[key] = result.stats[key].merge(stats) if key in result.stats else stats
        if not stats.within_bounds():
            raise AssertionError(f"{form} form not equivalent: {stats}")

    def in_contract(case):
        ok = case.within_contract() if hasattr(case, "within_contract") else True
        result.outside_contract += not ok
        return ok

    def run(form, n, check):
        common = dict(database=None, deadline=None, derandomize=False,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

        @hypothesis_seed(seed)
        @settings(max_examples=n, **common)
        @given(strategy_for(name))
        def prop(case):
            last_case[0] = case
            check(case)

        progress(f"  {name}: {form} form, {n} examples ...")
        prop()

    def function_form(case):
        expected = case.reference()
        if in_contract(case):
            record("function", case.rewritten(), expected, case.scale)
        else:
            try:
                case.rewritten()
            except ValueError:
                return
            raise AssertionError("a case outside the contract did not raise")

    def graph_form(case):
        program = torch.export.export(case.module(), case.args())
        rewritten = surgery.rewrite(program)
        if in_contract(case):
            record("graph", rewritten.module()(*case.args()), case.reference(), case.scale)

    try:
        run("function", examples, function_form)
        run("graph", graph_examples, graph_form)
    except Exception as exc:  # hypothesis re-raises the shrunk failure last
        result.passed = False
        result.error = f"{type(exc).__name__}: {exc}".strip()[:2000]
        result.counterexample = repr(last_case[0])[:4000]
    result.seconds = time.perf_counter() - start
    return result
