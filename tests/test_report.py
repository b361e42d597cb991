"""The model report: what is added to it after ``operate``, and the JSON and Markdown it is written as."""

import json

from surgery.equivalence.compare import ErrorStats
from surgery.equivalence.report import SurgeryReport, write_model_report


def _report(**changes) -> SurgeryReport:
    exact = ErrorStats("torch.bool", 4, 0.0, 0.0, 0, 0)
    fields = dict(
        model="tiny",
        description={"model": "Tiny"},
        passed=True,
        rewrites={"mode": "none", "applied": {}, "reasons": {}, "contracts": {}},
        census_before={"aten.add.Tensor": 1},
        census_after={"aten.add.Tensor": 1},
        examples=3,
        tvm_examples=0,
        seed=0,
        equivalence={"original_vs_rewritten": {"mask": exact}, "original_vs_tvm": {}},
        failures=(),
        tvm={},
        latency={"eager_ms": 1.0},
        stages_s={"export": 0.5},
        artifacts={},
    )
    return SurgeryReport(**{**fields, **changes})


def test_later_stages_and_checks_go_through_the_report():
    report = _report().with_earlier_stage("build", 2.0)
    assert list(report.stages_s) == ["build", "export"]
    bad = ErrorStats("torch.bool", 4, 1.0, 1.0, 1, 0)
    checked = report.with_check("padded", {"mask": bad}, [{"check": "padded", "error": "differs"}], {"padded_ms": 2.0})
    assert not checked.passed and checked.failures == ({"check": "padded", "error": "differs"},)
    assert list(checked.equivalence) == ["original_vs_rewritten", "original_vs_tvm", "padded"]
    assert checked.latency == {"eager_ms": 1.0, "padded_ms": 2.0}
    assert report.passed and "padded" not in report.equivalence  # the report checked is left as it was
    assert _report().with_check("padded", {"mask": ErrorStats("torch.bool", 4, 0.0, 0.0, 0, 0)}, [], {}).passed


def test_json_keys_and_markdown(tmp_path):
    md, js = write_model_report(_report(), tmp_path)
    data = json.loads(js.read_text())
    assert list(data) == [
        "generated",
        "versions",
        "bounds",
        "model",
        "description",
        "passed",
        "rewrites",
        "census_before",
        "census_after",
        "examples",
        "tvm_examples",
        "seed",
        "equivalence",
        "failures",
        "tvm",
        "latency",
        "stages_s",
        "artifacts",
    ]
    assert data["equivalence"]["original_vs_rewritten"]["mask"]["max_abs"] == 0.0 and data["failures"] == []
    assert "Verdict: **PASSED" in md.read_text()
    _, js = write_model_report(_report(padded={"max_points": 4}), tmp_path)
    assert json.loads(js.read_text())["padded"] == {"max_points": 4}
