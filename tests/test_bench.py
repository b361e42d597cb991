"""``surgery bench``: every system checked before it is timed, interleaved timing, the report and
its chart; bad input refused before anything is built."""

import json

import pytest
import torch

from surgery.bench import System, bench, check_systems, time_systems, write_bench_report
from surgery.pipeline import ModelSpec, export
from tests.helpers import run_cli_in_process


class SmallConvNet(torch.nn.Module):
    """A convolution, a product and a softmax: enough for each system to have work to do."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        features = torch.relu(self.conv(x)).mean(dim=(2, 3))  # [N, 16]
        return torch.softmax(self.head(features), dim=-1)  # [N, 10]


def small_spec() -> ModelSpec:
    return ModelSpec.from_module("small_conv", SmallConvNet(), (torch.rand(1, 3, 16, 16),))


def test_a_system_with_wrong_outputs_is_not_timed():
    spec = small_spec()
    exported = export(spec, progress=lambda m: None)
    right = System("eager", spec.module, {})
    wrong = System("tvm_shipped", lambda x: (spec.module(x) + 1e-3,), {})
    checks = check_systems(spec, [right, wrong], exported, progress=lambda m: None)
    assert checks["eager"]["ok"] and not checks["tvm_shipped"]["ok"]
    assert wrong.fn is None and "not timed" in wrong.info["error"]
    assert right.fn is not None


class WideProduct(torch.nn.Module):
    """Sums of 512 products of magnitude ~700: float32 rounding alone is ~1e-4 there."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(512, 512, bias=False)
        torch.nn.init.normal_(self.fc.weight)

    def forward(self, x):
        return self.fc(x)


def test_a_deep_networks_float32_noise_is_judged_against_float64_when_asked():
    """The most accurate float32 result there is (computed in float64, rounded once) differs
    from eager's by more than 1e-5 on large sums: wrong by the fixed bound, right when judged
    against the program run in float64 (``ModelSpec.judged``, the CLI's ``--judged``), whose
    bound eager's own error sets. An error of 1e-3 on top is wrong either way."""
    import copy
    import dataclasses

    spec = ModelSpec.from_module("wide", WideProduct(), (30 * torch.randn(64, 512),))
    exported = export(spec, progress=lambda m: None)
    exact = copy.deepcopy(spec.module).double()
    rounded = lambda x: (exact(x.double()).float(),)  # noqa: E731
    off = lambda x: (rounded(x)[0] + 1e-3 * rounded(x)[0].abs().max(),)  # noqa: E731
    for judged, ok in ((False, False), (True, True)):
        candidate, wrong = System("tvm_shipped", rounded, {}), System("onnxruntime", off, {})
        checks = check_systems(dataclasses.replace(spec, judged=judged), [candidate, wrong], exported, lambda m: None)
        assert checks["tvm_shipped"]["ok"] == ok and not checks["onnxruntime"]["ok"], checks


def test_bench_judges_a_saved_program_against_float64_with_judged(tmp_path):
    path = tmp_path / "wide.pt2"
    with torch.no_grad():
        torch.export.save(torch.export.export(WideProduct().eval(), (torch.randn(64, 512),)), path)
    for flag, bound in (([], "max_abs <= 1e-05"), (["--judged"], "float64")):
        result = run_cli_in_process(
            "bench", str(path), *flag, "--systems", "eager", "--rounds", "1", "--calls", "1", "--reports", str(tmp_path)
        )
        assert result.returncode == 0, result
        [row] = json.loads((tmp_path / "bench_wide.json").read_text())["rows"]
        assert bound in row["check"]["outputs"]["output0"], row


def test_each_round_starts_one_system_later_so_none_always_follows_the_same_one():
    """A system's speed depends on what ran just before it (threads still spinning, caches full
    of another's data): the rounds rotate the order, and every system is timed as often."""
    calls = []

    def recording(name):
        return System(name, lambda x: calls.append(name), {})

    systems = [recording(name) for name in ("a", "b", "c")]
    times = time_systems(systems, (torch.zeros(1),), rounds=3, calls=1, warmup=0, progress=lambda m: None, warmup_s=0)
    timed = calls[3:]  # after one untimed call each
    assert timed == ["a", "b", "c", "b", "c", "a", "c", "a", "b"], timed
    assert all(times[name]["calls"] == 3 for name in "abc")


def test_a_fast_systems_untimed_calls_last_until_the_previous_systems_threads_stop_spinning():
    """A round's untimed calls of a fast system go on for ``warmup_s``, not just ``warmup``
    calls: the system before it leaves its threads spinning for ~200 ms."""
    import time

    calls = []

    def timed_call(x):
        calls.append(time.perf_counter())
        time.sleep(0.001)

    times = time_systems([System("fast", timed_call, {})], (torch.zeros(1),), 1, 2, 1, lambda m: None, warmup_s=0.05)
    untimed = calls[1:-2]  # after the first call, before the two timed ones
    assert len(untimed) > 1 and calls[-2] - untimed[0] >= 0.05, len(untimed)
    assert times["fast"]["calls"] == 2


@pytest.mark.tvm
@pytest.mark.slow
def test_bench_times_every_system_and_writes_a_report_with_its_chart(tmp_path):
    lines = []
    report = bench(small_spec(), rounds=2, calls=2, warmup=1, cache_dir=tmp_path / "cache", progress=lines.append)
    rows = {row["system"]: row for row in report["rows"]}
    assert list(rows) == ["eager", "onnxruntime", "tvm_stock", "tvm_shipped"]
    for name, row in rows.items():
        assert row["check"]["ok"], (name, row)
        assert row["calls"] == 4 and 0 < row["min_ms"] <= row["median_ms"], (name, row)
    best = min(rows["eager"]["median_ms"], rows["onnxruntime"]["median_ms"])
    assert rows["tvm_shipped"]["vs_best_peer"] == pytest.approx(rows["tvm_shipped"]["median_ms"] / best)
    assert rows["tvm_shipped"]["info"]["schedules"] == "ours" and rows["tvm_stock"]["info"]["schedules"] == "default"
    assert any(line.startswith("   round 2/2:") for line in lines)
    assert report["cpu"]["cores"] >= 1 and report["cpu"]["name"]

    report["command"] = "test"
    md, js, png = write_bench_report(report, tmp_path / "reports")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert f"![latency per system]({png.name})" in text
    assert all(f"| {name} |" in text for name in rows)
    assert json.loads(js.read_text())["rows"][0]["system"] == "eager"

    assert report["kernels"] is None  # not asked for

    # A second run reuses the compiled libraries and says so; asked, it times the kernels.
    again = bench(small_spec(), ["tvm_shipped"], rounds=1, calls=1, warmup=0, kernels=50, cache_dir=tmp_path / "cache")
    assert again["rows"][0]["info"]["cached"] and again["best_peer_ms"] is None
    kernels = again["kernels"]
    times = [k["ms"] for k in kernels["top"]]
    assert times == sorted(times, reverse=True) and all(k["runs"] >= 1 for k in kernels["top"])
    assert any("matmul" in k["symbol"] for k in kernels["top"]), [k["symbol"] for k in kernels["top"]]
    assert kernels["summed_ms"] == pytest.approx(sum(times)) and kernels["plain_median_ms"] > 0
    again["command"] = "test"
    assert "Where shipped TVM's time goes" in write_bench_report(again, tmp_path / "again")[0].read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["bench", "no_such_model"], "unknown model 'no_such_model'"),
        (["bench", "small", "--systems", "eager,tvm"], "unknown system 'tvm'"),
        (["bench", "rt_detr", "--rounds", "0"], "--rounds and --calls must be >= 1"),
        (["bench", "rt_detr", "--kernels", "-1"], "--kernels >= 0"),
        (["bench", "geometry_encoder", "--max-points", "4"], "apply to apply, not bench"),
        (["bench", "rt_detr", "--points", "3"], "--points does not apply to rt_detr"),
    ],
)
def test_bench_refuses_bad_input_in_one_line(args, message):
    result = run_cli_in_process(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
