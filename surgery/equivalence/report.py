"""Equivalence reports people read and keep: Markdown for reading, JSON for tools."""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Sequence
from pathlib import Path

from ..atomic import write_text
from ..rewrites import REGISTRY, SPEED_REWRITES
from ..versions import installed_versions
from .compare import FLOAT32_MAX_ABS, FLOAT64_MAX_REL, ErrorStats
from .judge import JudgedStats, rule_text


def bounds_text(judged: bool = False) -> str:
    """The bounds the checks hold outputs to; ``judged``: those of a model judged against a float64
    run of its original program (``ModelSpec.judged``), whose table columns are against eager."""
    if judged:
        return (
            f"judged against the original program run in float64: {rule_text()}. The max abs/rel/ULP columns "
            "are against eager float32."
        )
    return (
        f"float64: normwise relative error <= {FLOAT64_MAX_REL:g}; float32: absolute error <= "
        f"{FLOAT32_MAX_ABS:g} on unit-scale data; integers and masks: identical; inf/NaN exactly "
        f"where the reference has them. Relative error = max|a-b| / max(max|reference|, max|input|)."
    )


def to_jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return "nan"
    if isinstance(obj, float) and obj in (float("inf"), float("-inf")):
        return str(obj)
    return obj


@dataclasses.dataclass(frozen=True)
class SurgeryReport:
    """What one ``surgery.pipeline.operate`` run found; ``write_model_report`` writes it down.
    Checks run afterwards on what it compiled add themselves with ``with_check``."""

    model: str
    description: dict  # the model, its shapes and weights, as its ModelSpec says
    passed: bool
    rewrites: dict  # mode, applied (rewrite -> replaced operators), reasons (rewrite -> why), contracts
    census_before: dict[str, int]  # operator -> count, sorted
    census_after: dict[str, int]
    examples: int  # hypothesis examples, original vs rewritten PyTorch
    tvm_examples: int  # original vs TVM; 0 when nothing was compiled
    seed: int
    equivalence: dict[str, dict[str, ErrorStats]]  # check -> output -> error statistics
    failures: tuple[dict, ...]  # check, error and, for property checks, the shrunk counterexample
    tvm: dict  # schedules, target, speed_rewrites, split, <part>_build, build_s, error, log_lines
    latency: dict[str, float]  # median milliseconds per callable
    stages_s: dict[str, float]  # seconds per stage, in the order they ran
    artifacts: dict[str, str]  # what -> path
    padded: dict | None = None  # apply --max-*: the limits, examples and latency counts of the padded check

    def with_earlier_stage(self, name: str, seconds: float) -> SurgeryReport:
        """This report with a stage that ran before ``operate`` (the command's model build) timed first."""
        return dataclasses.replace(self, stages_s={name: seconds, **self.stages_s})

    def with_check(
        self, name: str, stats: dict[str, ErrorStats], failures: Sequence[dict], latency: dict[str, float]
    ) -> SurgeryReport:
        """This report with one more equivalence check, its latencies, and its failures, which fail it."""
        return dataclasses.replace(
            self,
            passed=self.passed and not failures,
            equivalence={**self.equivalence, name: stats},
            failures=(*self.failures, *failures),
            latency={**self.latency, **latency},
        )

    def to_json(self) -> dict:
        """The report as JSON-ready data (``padded`` only where there was a padded check)."""
        data = to_jsonable(self)
        if self.padded is None:
            del data["padded"]
        return data


def write_rewrite_report(verifications, out_dir: str | Path = "reports", stem: str = "rewrites") -> tuple[Path, Path]:
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    data = {
        "generated": now,
        "versions": installed_versions(),
        "bounds": bounds_text(),
        "passed": all(v.passed for v in verifications),
        "rewrites": to_jsonable(verifications),
    }
    lines = [
        "# Rewrite equivalence report",
        "",
        f"Generated {now} by `python -m surgery verify`. Verdict: "
        f"**{'all rewrites equivalent' if data['passed'] else 'FAILED'}**.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()),
        "",
        f"Bounds: {data['bounds']}",
        "",
    ]
    for v in verifications:
        lines += [
            f"## `{v.rewrite}`: {REGISTRY[v.rewrite].summary}",
            "",
            f"- Verdict: **{'equivalent' if v.passed else 'NOT EQUIVALENT'}** "
            f"({v.examples} function-form and {v.graph_examples} graph-form hypothesis examples, seed {v.seed}, "
            f"{v.seconds:.1f} s)",
            f"- Contract: {v.contract}",
            f"- Settings: {v.settings or 'defaults'}",
            f"- Cases outside the contract (function form: checked to raise; graph form: not compared): {v.outside_contract}",
            "",
            "| form, dtype | elements | max abs | max rel | max ULP | non-finite mismatches | bound | within |",
            "|---|---:|---:|---:|---:|---:|---|---|",
        ]
        for key, s in sorted(v.stats.items()):
            lines.append(
                f"| {key} | {s.elements} | {s.max_abs:.3g} | {s.max_rel:.3g} | {s.max_ulp} | "
                f"{s.nonfinite_mismatches} | {s.bound()} | {'yes' if s.within_bounds() else 'NO'} |"
            )
        if not v.passed:
            lines += [
                "",
                f"Failure: `{v.error}`",
                "",
                "Counterexample (shrunk by hypothesis):",
                "",
                "```",
                v.counterexample or "",
                "```",
            ]
        lines.append("")
    out_dir = Path(out_dir)
    md = write_text(out_dir / f"{stem}.md", "\n".join(lines))
    js = write_text(out_dir / f"{stem}.json", json.dumps(data, indent=2) + "\n")
    return md, js


def write_model_report(report: SurgeryReport, out_dir: str | Path = "reports") -> tuple[Path, Path]:
    """``<model>.md`` and ``<model>.json`` for one ``surgery.pipeline.operate`` run."""
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    judged = any(isinstance(s, JudgedStats) for stats in report.equivalence.values() for s in stats.values())
    data = {"generated": now, "versions": installed_versions(), "bounds": bounds_text(judged), **report.to_json()}
    name = report.model
    verdict = "PASSED: every equivalence check within bounds" if report.passed else "FAILED"
    lines = [f"# Surgery report: `{name}`", "", f"Generated {now}. Verdict: **{verdict}**.", ""]
    lines += ["## Model", ""] + [f"- {k}: {v}" for k, v in report.description.items()] + [""]
    lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()), ""]
    lines += [
        "## Rewrites",
        "",
        f"Mode: `{report.rewrites['mode']}`.",
        "",
        "| rewrite | decision and why | replaced |",
        "|---|---|---|",
    ]
    for rw in REGISTRY:
        replaced = report.rewrites["applied"].get(rw)
        lines.append(
            f"| `{rw}` | {report.rewrites['reasons'].get(rw, '')} | "
            f"{', '.join(f'{k} x{v}' for k, v in replaced.items()) if replaced else '-'} |"
        )
    lines += ["", "Contracts of the rewrites applied:", ""]
    lines += [f"- `{n}`: {c}" for n, c in report.rewrites["contracts"].items()] or ["- (none applied)"]
    lines += ["", "## Operator census", "", "| operator | before | after |", "|---|---:|---:|"]
    before, after = report.census_before, report.census_after
    for op in sorted(set(before) | set(after)):
        if before.get(op, 0) != after.get(op, 0):
            lines.append(f"| `{op}` | {before.get(op, 0)} | {after.get(op, 0)} |")
    lines += [
        "",
        f"Operators whose count did not change are omitted ({len(set(before) & set(after))} in both; "
        f"the JSON report has the full census).",
        "",
    ]
    lines += [
        "## Equivalence",
        "",
        f"Bounds: {data['bounds']}",
        "",
        f"Hypothesis examples: {report.examples} (original vs rewritten PyTorch), "
        f"{report.tvm_examples} (original vs TVM), seed {report.seed}.",
        "",
        "| check | output | max abs | max rel | max ULP | non-finite mismatches | bound | within |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for check, stats in report.equivalence.items():
        for output, s in stats.items():
            lines.append(
                f"| {check.replace('_', ' ')} | {output} | {s.max_abs:.3g} | {s.max_rel:.3g} | {s.max_ulp} | "
                f"{s.nonfinite_mismatches} | {s.bound()} | {'yes' if s.within_bounds() else 'NO'} |"
            )
    if report.failures:
        lines += ["", "### Failures", ""]
        for f in report.failures:
            lines += [f"- {f['check']}: `{f.get('error', '')}`"]
            if f.get("counterexample"):
                lines += [
                    "",
                    "  Counterexample (shrunk by hypothesis):",
                    "",
                    "```json",
                    json.dumps(to_jsonable(f["counterexample"]), indent=2),
                    "```",
                    "",
                ]
    lines += ["", "## TVM and timings", ""]
    tvm = report.tvm
    if tvm.get("error"):
        lines.append(f"- TVM failed: `{tvm['error']}`")
    if "schedules" in tvm:
        lines.append(
            f"- target `{tvm['target']}`, {tvm['schedules']} schedules"
            + (
                " (surgery.schedules: our CPU rules, dlight style)"
                if tvm["schedules"] == "ours"
                else " (stock TVM CPU pipeline)"
            )
        )
    for speed_name, replaced in tvm.get("speed_rewrites", {}).items():
        lines.append(
            f"- speed rewrite `{speed_name}`: {', '.join(f'{k} x{v}' for k, v in replaced.items())}; contract: "
            f"{SPEED_REWRITES[speed_name].contract}"
        )
    if "split" in tvm:
        split = tvm["split"]
        frontier_mib = sum(f["bytes"] for f in split["frontier"]) / 2**20
        lines.append(
            f"- split: {split['hoisted_nodes']} operators depending only on {', '.join(split['stage_inputs'])} "
            f"hoisted into a stage of their own (run once per {'/'.join(split['stage_inputs'])}); "
            f"{split['rest_nodes']} left per call; {len(split['frontier'])} tensors ({frontier_mib:.1f} MiB) handed over"
        )
    for part in ("whole", "stage", "rest"):
        info = tvm.get(f"{part}_build")
        if info:
            how = (
                "reused from the cache"
                + (
                    f" (built in {info['built']['import_s'] + info['built']['build_s']:.1f} s)"
                    if info.get("built")
                    else ""
                )
                if info["cached"]
                else f"import {info['import_s']:.1f} s + build {info['build_s']:.1f} s"
            )
            lines.append(f"- TVM library ({part}): {how}")
    for k, v in report.latency.items():
        lines.append(f"- latency {k.replace('_ms', '')}: {v:.2f} ms (median)")
    lines += ["- stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in report.stages_s.items())]
    for k, v in report.artifacts.items():
        lines.append(f"- artifact {k}: `{v}`")
    out_dir = Path(out_dir)
    md = write_text(out_dir / f"{name}.md", "\n".join(lines) + "\n")
    js = write_text(out_dir / f"{name}.json", json.dumps(data, indent=2) + "\n")
    return md, js
