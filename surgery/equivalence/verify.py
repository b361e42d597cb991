"""Run a rewrite's property checks programmatically (for the CLI and reports, not only pytest).

``verify_rewrite`` draws ``examples`` cases from the rewrite's hypothesis strategy and checks the
function form on each, then ``graph_examples`` cases through the graph form (export, rewrite,
run). It records error statistics per dtype, and on failure hypothesis's shrunk counterexample.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed

from .. import rewrite
from ..rewrites import REGISTRY
from .compare import ErrorStats, accumulate, compare


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


class PropertyFailed(AssertionError):
    """A property failed; ``counterexample`` is hypothesis's shrunk failing input."""

    def __init__(self, message: str, counterexample):
        super().__init__(message)
        self.counterexample = counterexample


def check_property(strategy, check, examples: int, seed: int) -> int:
    """Run ``check`` on ``examples`` inputs drawn from ``strategy`` (reproducibly from ``seed``).

    Returns the number of examples run; raises PropertyFailed with the shrunk counterexample.
    """
    seen: list = [None, 0]

    @hypothesis_seed(seed)
    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        derandomize=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(strategy)
    def prop(case):
        seen[0] = case
        seen[1] += 1
        check(case)

    try:
        prop()
    except Exception as exc:  # hypothesis re-raises the shrunk failure last
        raise PropertyFailed(f"{type(exc).__name__}: {exc}".strip()[:2000], seen[0]) from exc
    return seen[1]


def verify_rewrite(
    name: str, examples: int = 2000, graph_examples: int = 50, seed: int = 0, progress=print
) -> Verification:
    rw = REGISTRY[name]()
    result = Verification(name, rw.contract, rw.settings(), examples, graph_examples, seed)
    start = time.perf_counter()

    def record(form, actual, expected, scale):
        stats = compare(actual, expected, scale=scale)
        key = f"{form} {expected.dtype}".replace("torch.", "")
        accumulate(result.stats, {key: stats})
        if not stats.within_bounds():
            raise AssertionError(f"{form} form not equivalent: {stats}")

    def in_contract(case):
        ok = case.within_contract() if hasattr(case, "within_contract") else True
        result.outside_contract += not ok
        return ok

    def run(form, n, check):
        progress(f"  {name}: {form} form, {n} examples ...")
        check_property(rw.cases(), check, n, seed)

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
        # this rewrite alone: with every rewrite, a case of one would also have to lie within
        # the others' contracts (a row_dispatch case's boxes beyond roi_align's static bound)
        rewritten = rewrite(program, [case.rewriter() if hasattr(case, "rewriter") else name])
        if in_contract(case):
            record("graph", rewritten.module()(*case.args()), case.reference(), case.scale)

    try:
        run("function", examples, function_form)
        run("graph", graph_examples, graph_form)
    except PropertyFailed as exc:
        result.passed = False
        result.error = str(exc)
        result.counterexample = repr(exc.counterexample)[:4000]
    result.seconds = time.perf_counter() - start
    return result
