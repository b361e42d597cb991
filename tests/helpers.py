import contextlib
import dataclasses
import io

import torch
from hypothesis import settings

from surgery.cli import main

GRAPH_FRACTION = 1 / 20


def graph_examples() -> int:
    return max(25, int(settings.default.max_examples * GRAPH_FRACTION))


def assert_identical(actual: torch.Tensor, expected: torch.Tensor, context: str = "") -> None:
    """The same dtype, shape and values: NaN where NaN, zeros of the same sign (what a
    bit-exact contract promises; NaN payloads aside)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, context
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan), context
    assert torch.equal(actual.masked_fill(nan, 0), expected.masked_fill(nan, 0)), context
    assert torch.equal(actual.signbit() & ~nan, expected.signbit() & ~nan), context


@dataclasses.dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli_in_process(*args: str) -> CliResult:
    """``python -m surgery ARGS`` run by this interpreter: for commands that stop early (bad
    input), where a fresh interpreter would spend most of the test importing torch again. The
    end-to-end tests run the real command in a subprocess."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
    return CliResult(code, out.getvalue(), err.getvalue())
