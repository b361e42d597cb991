"""Equivalence reports people read and keep: Markdown for reading, JSON for tools."""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
from pathlib import Path

from ..atomic import write_text
from .compare import FLOAT32_MAX_ABS, FLOAT64_MAX_REL


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("torch", "torchvision", "apache-tvm", "apache-tvm-ffi", "sam3", "hypothesis", "numpy", "surgery"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def bounds_text() -> str:
    return (f"float64: normwise relative error <= {FLOAT64_MAX_REL:g}; float32: absolute error <= "
            f"{FLOAT32_MAX_ABS:g} on unit-scale data; integers and masks: identical; inf/NaN exactly "
            f"where the reference has them. Relative error = max|a-b| / max(max|reference|, max|input|).")


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


def write_rewrite_report(verifications, out_dir: str | Path = "reports", stem: str = "rewrites") -> tuple[Path, Path]:
    from ..rewrites import REGISTRY

    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    data = {"generated": now, "versions": versions(), "bounds": bounds_text(),
            "passed": all(v.passed for v in verifications), "rewrites": to_jsonable(verifications)}
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
            f"- Cases outside the contract (checked to raise, not compared): {v.outside_contract}",
            "",
            "| form, dtype | elements | max abs | max rel | max ULP | non-finite mismatches | bound | within |",
            "|---|---:|---:|---:|---:|---:|---|---|",
        ]
        for key, s in sorted(v.stats.items()):
            lines.append(f"| {key} | {s.elements} | {s.max_abs:.3g} | {s.max_rel:.3g} | {s.max_ulp} | "
                         f"{s.nonfinite_mismatches} | {s.bound()} | {'yes' if s.within_bounds() else 'NO'} |")
        if not v.passed:
            lines += ["", f"Failure: `{v.error}`", "", "Counterexample (shrunk by hypothesis):", "", "```",
                      v.counterexample or "", "```"]
        lines.append("")
    out_dir = Path(out_dir)
    md = write_text(out_dir / f"{stem}.md", "\n".join(lines))
    js = write_text(out_dir / f"{stem}.json", json.dumps(data, indent=2) + "\n")
    return md, js
