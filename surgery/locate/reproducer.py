"""Reproducers a user can attach to an upstream bug report: the failing piece of the program as
a ``.pt2``, the tensors it was fed (``torch.save``), and a script of a few lines that needs only
torch and TVM (not this package). A reproducer directory is also what ``surgery probe add``
turns into a probe case.

    <dir>/program.pt2    the piece (torch.export.save)
    <dir>/inputs.pt      its inputs, PyTorch's values in the failing run (torch.save of a tuple)
    <dir>/reproduce.py   imports, builds with tvm.compile(target="llvm"), runs, compares; exit 1 = reproduced
    <dir>/case.json      what it is: the operator, the failure, the tolerances the script applies
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from .. import rewrite_with_log
from ..atomic import atomic_path, write_text
from ..equivalence.judge import ERROR_FACTOR, FLOOR_ULPS, judge_outputs
from ..pipeline import load_program
from ..probes import ProbeCaseError, add_case
from ..rewrites import REGISTRY
from ..tvm_backend import program_problem
from .graph import NodeInfo, Subprogram

CASE_FORMAT = 1
SCRIPT_TIMEOUT_S = 600

SCRIPT = '''"""Reproducer written by `python -m surgery locate`: {title}.

{details}
Needs only torch and TVM. Run: python reproduce.py
Exit status 1: reproduced (TVM fails, or its numbers are further from PyTorch's than the tolerance).
"""
import sys
from pathlib import Path

import torch
{extra_imports}import tvm
from tvm.relax.frontend.torch import from_exported_program

HERE = Path(__file__).resolve().parent
# Largest acceptable max |TVM - PyTorch| per output: float32 rounding as judged against float64
# (|TVM - float64| <= {factor} x |PyTorch - float64| + {floor} ulp of the value's scale); integers and bools: identical.
TOLERANCE = {tolerance}

program = torch.export.load(HERE / "program.pt2")
inputs = torch.load(HERE / "inputs.pt")
expected = program.module()(*inputs)
try:
    executable = tvm.compile(from_exported_program(program), target="llvm")
    vm = tvm.relax.VirtualMachine(executable, tvm.cpu())
    actual = vm["main"](*[tvm.runtime.tensor(x.numpy()) for x in inputs])
except Exception as exc:
    print(f"TVM fails: {{type(exc).__name__}}: {{str(exc).strip().splitlines()[-1]}}")
    sys.exit(1)
failed = False
for i, (got, want, tolerance) in enumerate(zip(actual, expected, TOLERANCE)):
    got = torch.from_numpy(got.numpy())
    if got.shape != want.shape or got.dtype != want.dtype:
        print(f"output {{i}}: TVM gives {{got.dtype}}{{list(got.shape)}}, PyTorch {{want.dtype}}{{list(want.shape)}}")
        failed = True
        continue
    if want.is_floating_point():
        finite = torch.isfinite(want)
        same_nonfinite = torch.equal(torch.isfinite(got), finite) and torch.equal(got[~finite].nan_to_num(), want[~finite].nan_to_num())
        difference = (got[finite].double() - want[finite].double()).abs().max().item() if finite.any() else 0.0
    else:
        same_nonfinite, difference = True, float((got != want).sum())
    ok = same_nonfinite and difference <= tolerance
    print(f"output {{i}}: max abs difference {{difference:.3g}} (tolerance {{tolerance:.3g}})"
          f"{{'' if same_nonfinite else ', inf/NaN where PyTorch has none or others'}}: {{'ok' if ok else 'WRONG'}}")
    failed |= not ok
print("reproduced" if failed else "not reproduced: TVM agrees with PyTorch")
sys.exit(1 if failed else 0)
'''


def tolerances(sub: Subprogram) -> list[float]:
    """What the script accepts per output: the judge's tolerance plus PyTorch's own error
    (|TVM - PyTorch| <= |TVM - float64| + |PyTorch - float64|); 0 for integers and bools."""
    eager = sub.program.module()(*sub.inputs)
    return [j.tolerance + j.eager_error for j in judge_outputs(sub.program.module(), sub.inputs, eager)]


def script_text(title: str, info: NodeInfo, failure: str, uses_torchvision: bool, tolerance: list[float]) -> str:
    details = f"Operator: {info.call} -> {info.output}\nNode {info.name!r}; {info.where()}\nFailure seen: {failure}\n"
    return SCRIPT.format(
        title=title,
        details=details,
        factor=ERROR_FACTOR,
        floor=FLOOR_ULPS,
        tolerance=repr(tolerance),
        extra_imports="import torchvision  # noqa: F401  registers torchvision's operators\n"
        if uses_torchvision
        else "",
    )


def save(directory: Path, sub: Subprogram, info: NodeInfo, failure: str, scope: str, context: dict) -> dict:
    """Write a reproducer directory (each file atomically); returns its paths and description."""
    directory = Path(directory)
    uses_torchvision = any(
        str(n.target).startswith("torchvision.") for n in sub.program.graph.nodes if n.op == "call_function"
    )
    tolerance = tolerances(sub)
    program_path, inputs_path, script_path, case_path = (
        directory / name for name in ("program.pt2", "inputs.pt", "reproduce.py", "case.json")
    )
    with atomic_path(program_path, suffix=".pt2") as tmp:
        torch.export.save(sub.program, tmp)
    with atomic_path(inputs_path, suffix=".pt") as tmp:
        torch.save(tuple(t.detach().clone() for t in sub.inputs), tmp)
    step = failure.split(":", 1)[0]
    title = f"{info.op} ({scope}): {'wrong numbers' if step == 'numbers' else step + ' fails'}"
    write_text(script_path, script_text(title, info, failure, uses_torchvision, tolerance))
    case = {
        "format": CASE_FORMAT,
        "operator": info.op,
        "node": vars(info),
        "failure": failure,
        "scope": scope,
        "operators": [u.name for u in sub.units],
        "tolerance": tolerance,
        **context,
    }
    write_text(case_path, json.dumps(case, indent=2) + "\n")
    return {
        "dir": str(directory),
        "program": str(program_path),
        "inputs": str(inputs_path),
        "script": str(script_path),
        "case": str(case_path),
        "scope": scope,
        "operators": len(sub.units),
    }


def run_script(script: str | Path, timeout: float = SCRIPT_TIMEOUT_S) -> dict:
    """Run a reproducer script in a fresh interpreter: does stock TVM fail on it?"""
    try:
        done = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"reproduces": False, "exit": None, "output": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return {
        "reproduces": done.returncode == 1,
        "exit": done.returncode,
        "output": "\n".join(lines[-6:]) or (done.stderr.strip().splitlines() or [""])[-1],
    }


def keep_as_probe(directory: str | Path, rewrite: str, name: str | None = None, root: Path | None = None):
    """Keep a reproducer as a user probe case (``surgery.probes``) for ``rewrite``, once it is
    shown that TVM fails the reproducer and gets it right after the rewrite."""
    if rewrite not in REGISTRY:
        raise ProbeCaseError(f"unknown rewrite {rewrite!r}; known rewrites: {', '.join(REGISTRY)}")
    directory = Path(directory)
    try:
        program, inputs = load_program(directory / "program.pt2"), tuple(torch.load(directory / "inputs.pt"))
    except (OSError, ValueError, RuntimeError) as exc:
        raise ProbeCaseError(f"{str(directory)!r} is not a reproducer directory: {exc}") from None
    before = program_problem(program, inputs)
    if before is None:
        raise ProbeCaseError(
            f"stock TVM gets {str(directory)!r} right: as a probe case it would never ask for {rewrite}"
        )
    fixed, log = rewrite_with_log(program, [rewrite])
    if not any(result.modified for _, result in log):
        raise ProbeCaseError(f"{rewrite} replaces none of the operators in {str(directory)!r}")
    after = program_problem(fixed, inputs)
    if after is not None:
        raise ProbeCaseError(f"{rewrite} does not fix {str(directory)!r}: after it, {after}")
    return add_case(directory, rewrite, name, root)
