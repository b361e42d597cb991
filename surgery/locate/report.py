"""``locate_<model>.md`` and ``locate_<model>.json``: what ``locate`` found, for reading and for tools."""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path

from ..atomic import write_text
from ..equivalence.report import to_jsonable
from ..versions import installed_versions
from . import Culprit, Location

JUDGE_EXPLAINED = (
    "Each value TVM computes is compared with a float64 reference, and so is eager PyTorch's float32 value: TVM is "
    "wrong only where it is much further from float64 than eager float32 is, so rounding differences (another "
    "summation order, another exp) never count. Whole-program outputs are judged end to end. Operators (in the build "
    "with every intermediate tensor marked as an output) are judged on the inputs TVM computed for them: the same "
    "operator is run by PyTorch, in float32 and in float64, on TVM's inputs, so noise from upstream never blames an "
    "operator downstream; the first operator judged wrong is where TVM goes wrong."
)


def _judgement_cells(j) -> str:
    if j is None:
        return "- | - | - | -"
    if j.problem:
        return f"- | - | - | NO: {j.problem}"
    return f"{j.error:.3g} | {j.eager_error:.3g} | {j.tolerance:.3g} | {'yes' if j.ok else 'NO'}"


def _culprit_lines(number: int, c: Culprit) -> list[str]:
    lines = [
        f"### {number}. `{c.node.name}`: {c.node.operator()} ({c.stage})",
        "",
        f"- Call: `{c.node.call}` -> `{c.node.output}`",
        f"- Where: {c.node.where()}",
        f"- TVM{' (the operator on the inputs TVM computed for it)' if c.stage == 'numbers' else ''}: {c.error}",
        f"- Found: {c.how}",
    ]
    if c.alike:
        shown = "; ".join(f"`{a.name}` ({a.source or 'no source'})" for a in c.alike[:10])
        lines.append(
            f"- {len(c.alike)} more operator(s) of the same kind and argument types, which fail alike: {shown}"
            + (" ..." if len(c.alike) > 10 else "")
        )
    if c.path:
        lines += [
            "",
            'Error statistics along the path (max over elements; see "How errors were judged"):',
            "",
            "| node | operator | role | max abs TVM - float64 | max abs eager - float64 | tolerance | within |",
            "|---|---|---|---:|---:|---:|---|",
        ]
        lines += [
            f"| `{row['node']}` | {row['op']} | {row['role']} | {_judgement_cells(row['judgement'])} |"
            for row in c.path
        ]
        lines.append("")
    r = c.reproducer
    if r:
        verdict = (
            ""
            if "reproduces" not in r
            else f"; its script {'reproduces the failure' if r['reproduces'] else 'does NOT reproduce the failure'} "
            f"with stock TVM (exit {r['exit']}): `{'; '.join(r['output'].splitlines())}`"
        )
        lines.append(
            f"- Reproducer ({r['scope']}, {r['operators']} operator(s)): `{r['dir']}` "
            f"(`program.pt2`, `inputs.pt`, `reproduce.py`: `python {r['script']}`){verdict}"
        )
    else:
        lines.append("- Reproducer: none (no --out directory, or no piece smaller than the whole fails alone)")
    lines += [f"- Next step: {c.next_step}", ""]
    return lines


def write_locate_report(location: Location, out_dir: str | Path = "reports") -> tuple[Path, Path]:
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    data = {"generated": now, "versions": installed_versions(), **to_jsonable(dataclasses.asdict(location))}
    data["diverges"] = location.diverges
    verdict = location.verdict + (f": {len(location.culprits)} culprit(s)" if location.culprits else "")
    lines = [
        f"# Locate report: `{location.model}`",
        "",
        f"Generated {now} by `python -m surgery locate`. Verdict: **{verdict}**.",
        "",
    ]
    lines += ["## Program", ""] + [f"- {k}: {v}" for k, v in location.description.items()]
    applied = location.rewrites["applied"]
    lines += [
        f"- rewrites (`{location.rewrites['mode']}`): "
        + (
            ", ".join(f"{k} ({', '.join(f'{op} x{n}' for op, n in v.items())})" for k, v in applied.items())
            or "none applied"
        ),
        f"- TVM: {location.schedules} schedules; {location.operators} operators in the program TVM imports; run on the model's example inputs",
        f"- TVM on the whole program: {location.whole_failure or 'imports, builds, runs, and every output is within tolerance'}",
        "",
    ]
    lines += ["## How errors were judged", "", JUDGE_EXPLAINED, "", f"Rule: {location.judge}.", ""]
    if location.outputs:
        lines += [
            "## Outputs of the whole program",
            "",
            "| output | dtype | elements | max abs TVM - float64 | max abs eager - float64 | tolerance | within |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        lines += [
            f"| {name} | {j.dtype.replace('torch.', '')} | {j.elements} | {_judgement_cells(j)} |"
            for name, j in location.outputs.items()
        ]
        lines.append("")
    if location.culprits:
        lines += ["## Culprits", ""]
        for number, culprit in enumerate(location.culprits, 1):
            lines += _culprit_lines(number, culprit)
    elif location.diverges:
        lines += [
            "## Culprits",
            "",
            "None could be named: no piece of the program smaller than the whole fails on its own.",
            "",
        ]
    lines += [
        "## Versions and timings",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()),
        "",
        "- stages: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in location.stages_s.items())
        + f"; total {sum(location.stages_s.values()):.1f} s",
    ]
    lines += [f"- artifact {k}: `{v}`" for k, v in location.artifacts.items()]
    out_dir = Path(out_dir)
    md = write_text(out_dir / f"locate_{location.model}.md", "\n".join(lines) + "\n")
    js = write_text(out_dir / f"locate_{location.model}.json", json.dumps(data, indent=2) + "\n")
    return md, js
