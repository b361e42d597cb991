"""surgery: rewrite exported PyTorch graphs into plain arithmetic that every backend accepts.

import surgery
program = torch.export.export(model, args)
clean = surgery.rewrite(program)                  # all rewrites, in the right order
clean = surgery.rewrite(program, ["scatter"])     # just some
clean.module()(*args)                             # same results as program.module()(*args)
"""

from __future__ import annotations

import torch

from .rewrites import REGISTRY, Rewrite, RewriteError, RewriteResult, op_census, resolve
from .rewrites.base import apply_in_place, apply_together, by_graph, by_table

__version__ = "0.1.0"


def rewrite_with_log(
    program: torch.export.ExportedProgram, rewrites=None
) -> tuple[torch.export.ExportedProgram, list[tuple[Rewrite, RewriteResult]]]:
    """Like ``rewrite``, also returning each rewrite with what it replaced."""
    if not isinstance(program, torch.export.ExportedProgram):
        raise TypeError(f"surgery.rewrite expects a torch.export.ExportedProgram, got {type(program).__name__}")
    log = []
    for group in _sharing_a_retrace(resolve(rewrites)):
        if len(group) == 1:
            results = [group[0](program)]
        elif by_graph(group[0]):
            program, results = apply_in_place(group, program)
        else:
            program, results = apply_together(group, program)
        program = results[-1].program
        log += zip(group, results)
    return program, log


def _sharing_a_retrace(rewrites: list[Rewrite]) -> list[list[Rewrite]]:
    """Runs of consecutive decomposition-table rewrites whose tables share no operator, and runs
    of consecutive graph rewrites: each run is applied in one retrace; any other rewrite is a
    run of its own."""
    groups: list[list[Rewrite]] = []
    for rw in rewrites:
        last = groups[-1] if groups else None
        if (
            last
            and by_table(rw)
            and all(map(by_table, last))
            and not set(rw.decompositions()) & set().union(*(o.decompositions() for o in last))
        ) or (last and by_graph(rw) and all(map(by_graph, last))):
            last.append(rw)
        else:
            groups.append([rw])
    return groups


def rewrite(program: torch.export.ExportedProgram, rewrites=None) -> torch.export.ExportedProgram:
    """Apply the named rewrites (default: all) in the right order.

    ``rewrites`` is None, a name, or a list of names and/or ``Rewrite`` instances (to change a
    rewrite's settings, e.g. ``RoiAlignToGridSample(max_samples_per_bin=4)``). The result holds
    none of the rewritten operators and its ``.module()`` gives the original's results within
    each rewrite's contract. Unknown names raise ``RewriteError`` listing the known ones.
    """
    return rewrite_with_log(program, rewrites)[0]


__all__ = ["REGISTRY", "Rewrite", "RewriteError", "RewriteResult", "op_census", "rewrite", "rewrite_with_log"]
