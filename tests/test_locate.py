"""``surgery.locate``: known faults of stock TVM (apache-tvm 0.27) injected into small programs
must be named, node for node, every time; a program TVM gets right must pass.

- wrong numbers: ``grid_sampler_2d`` left unrewritten (its converter reads the [N, H, W, 2] grid
  as [N, 2, H, W]; with a 2 x 2 grid the shapes agree and only the numbers are wrong);
- build failure: a product of two bools, ``(x > 0) * (x < 1)`` (LLVM codegen wants floats);
- import failure: float ``x // 2`` (the converter pairs a float tensor with an int constant).
"""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from surgery import probes, tvm_backend
from surgery.cli import main
from surgery.equivalence.judge import (
    evaluate_along,
    evaluate_graph,
    judge,
    judge_outputs,
    reordered_at_ties,
    unpermuted,
)
from surgery.locate import NOTHING, locate, next_step, search
from surgery.locate.reproducer import keep_as_probe
from surgery.locate.search import Failure, Search
from surgery.pipeline import ModelSpec


class GridSampled(torch.nn.Module):
    def forward(self, features, grid):
        scaled = features * 2 + 1
        sampled = torch.nn.functional.grid_sample(scaled, grid, align_corners=False)  # the fault
        return sampled.relu() + 1


class BoolProduct(torch.nn.Module):
    def forward(self, x):
        inside = (x > 0) * (x < 1)  # the fault
        return inside.float() + x.cos()


class FloorDivision(torch.nn.Module):
    def forward(self, x):
        y = x.sin() * 4
        return y // 2 + (y + 1) // 2  # the faults: two alike


class GridThenPermute(torch.nn.Module):
    def forward(self, features, grid):
        sampled = torch.nn.functional.grid_sample(features, grid, align_corners=False)  # wrong shape in TVM
        return sampled.squeeze(-1).permute(2, 0, 1)  # where TVM's import fails


class Attention(torch.nn.Module):
    """Matmuls, softmax, layer norm, masks: rounding differs from eager everywhere, nothing is wrong."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(32, 32)
        self.norm = torch.nn.LayerNorm(32)

    def forward(self, x, mask):
        scores = (self.proj(x) @ x.transpose(-1, -2)) / 8
        weights = scores.masked_fill(~mask, -1e4).softmax(-1)
        return self.norm(weights @ x).exp(), mask.sum(-1)


def grid_args():
    g = torch.Generator().manual_seed(0)
    return torch.rand(1, 2, 5, 7, generator=g), torch.rand(1, 2, 2, 2, generator=g) * 2 - 1


def attention_args():
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(2, 16, 16, generator=g) > 0.3) | torch.eye(16, dtype=torch.bool)
    return torch.randn(2, 16, 32, generator=g), mask


PROGRAMS = {
    "grid": (GridSampled, grid_args),
    "bools": (BoolProduct, lambda: (torch.linspace(-1, 2, 24).reshape(4, 6),)),
    "floordiv": (FloorDivision, lambda: (torch.linspace(-3, 3, 20).reshape(4, 5),)),
    "attention": (Attention, attention_args),
    "grid_permute": (GridThenPermute, lambda: (torch.rand(1, 2, 5, 7), torch.rand(1, 3, 1, 2) * 2 - 1)),
}


def spec(name: str) -> ModelSpec:
    module, args = PROGRAMS[name]
    return ModelSpec.from_module(name, module(), args())


@pytest.fixture(scope="module")
def located(tmp_path_factory):
    """locate on each program, once (reproducer scripts are run by the tests that check them)."""
    found = {}

    def get(name):
        if name not in found:
            root = tmp_path_factory.mktemp(name)
            found[name] = locate(
                spec(name),
                rewrites="none",
                out_dir=root / "out",
                cache_dir=root / "cache",
                progress=lambda m: None,
                run_reproducers=False,
            )
        return found[name]

    return get


@pytest.mark.tvm
def test_wrong_numbers_name_the_grid_sampler(located):
    found = located("grid")
    assert found.verdict == "wrong numbers" and len(found.culprits) == 1
    culprit = found.culprits[0]
    # aten.grid_sampler as exported (TVM's importer decomposes it to grid_sampler_2d)
    assert culprit.stage == "numbers" and culprit.node.op in (
        "aten.grid_sampler.default",
        "aten.grid_sampler_2d.default",
    )
    assert "test_locate.py" in culprit.node.source and "the fault" in culprit.node.source
    assert culprit.reproducer["scope"] == "the operator alone"
    roles = {row["role"]: row for row in culprit.path}
    assert roles["input"]["judgement"].ok and not roles["suspect"]["judgement"].ok  # inputs agree, output does not
    assert culprit.rewrites == ["grid_sample"] and "--rewrite grid_sample" in culprit.next_step
    assert not found.outputs["output0"].ok


@pytest.mark.tvm
def test_build_failure_names_the_bool_product(located):
    found = located("bools")
    assert found.verdict == "build failure" and [c.node.op for c in found.culprits] == ["aten.mul.Tensor"]
    culprit = found.culprits[0]
    assert "(x > 0) * (x < 1)" in culprit.node.source and "bool" in culprit.node.call
    assert culprit.rewrites == ["bool_arithmetic"] and "--rewrite bool_arithmetic" in culprit.next_step


def test_next_step_without_a_rewrite_is_an_upstream_report():
    step = next_step("aten.erfinv.default", [], {}, "out/repro_erfinv")
    assert step.startswith("no registered rewrite replaces aten.erfinv.default") and "upstream" in step
    assert "out/repro_erfinv/reproduce.py" in step


@pytest.mark.tvm
def test_import_failure_names_every_floor_division(located):
    found = located("floordiv")
    assert found.verdict == "import failure" and [c.node.op for c in found.culprits] == ["aten.floor_divide.default"]
    culprit = found.culprits[0]
    assert [a.op for a in culprit.alike] == ["aten.floor_divide.default"]  # the second `// 2`, same signature
    assert "y // 2" in culprit.node.source and "float32[4, 5]" in culprit.node.call
    assert culprit.rewrites == ["floor_divide"]


@pytest.mark.tvm
def test_import_failure_downstream_names_the_converter_that_made_the_wrong_shape(located):
    found = located("grid_permute")  # SAM3's point sampling: grid_sample -> squeeze -> permute
    assert found.verdict == "import failure" and "PermuteDims" in found.whole_failure
    assert [c.node.op for c in found.culprits] == ["aten.grid_sampler.default"]
    assert (
        "converter makes output 0 float32[1, 2, 1, 2], PyTorch computes float32[1, 2, 3, 1]" in found.culprits[0].error
    )
    assert "arises downstream of it" in found.culprits[0].how


@pytest.mark.tvm
def test_wrong_numbers_by_bisection_when_marking_every_tensor_is_too_big(tmp_path, monkeypatch):
    monkeypatch.setattr(search, "MARK_ALL_BYTES", 0)
    found = locate(
        spec("grid"),
        rewrites="none",
        out_dir=tmp_path,
        cache_dir=tmp_path,
        progress=lambda m: None,
        run_reproducers=False,
    )
    assert [c.node.op for c in found.culprits] == ["aten.grid_sampler.default"]
    assert "the first 3 operators fail, the first 2 do not" in found.culprits[0].how
    assert found.culprits[0].reproducer["scope"] == "the operator alone"


@pytest.mark.tvm
def test_a_program_tvm_gets_right_passes(located):
    found = located("attention")
    assert found.verdict == NOTHING and not found.diverges and not found.culprits
    assert set(found.outputs) == {"output0", "output1"} and all(j.ok for j in found.outputs.values())


@pytest.mark.tvm
@pytest.mark.slow
@pytest.mark.parametrize("name", ["grid", "bools", "floordiv"])
def test_reproducer_script_reproduces(located, name):
    reproducer = located(name).culprits[0].reproducer
    script = Path(reproducer["script"]).read_text()
    assert "surgery" not in script.replace("python -m surgery locate", "")  # torch and TVM only
    done = subprocess.run(
        [sys.executable, reproducer["script"]], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert ("WRONG" if name == "grid" else "TVM fails") in done.stdout
    case = json.loads(Path(reproducer["case"]).read_text())
    assert case["node"]["name"] == located(name).culprits[0].node.name


@pytest.mark.tvm
@pytest.mark.slow
def test_cli_exit_codes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SURGERY_PROBES", str(tmp_path / "probes"))
    saved = tmp_path / "grid.pt2"
    module, args = PROGRAMS["grid"]
    torch.export.save(torch.export.export(module(), args()), saved)
    common = [
        "--out",
        str(tmp_path / "out"),
        "--reports",
        str(tmp_path / "reports"),
        "--cache",
        str(tmp_path / "cache"),
    ]
    assert main(["locate", str(saved), "--rewrite", "grid_sample", *common]) == 0
    assert main(["locate", str(saved), "--rewrite", "none", "--save-probe", "grid_sample", *common]) == 1
    out = capsys.readouterr().out
    assert "culprit (numbers): grid_sampler" in out and "reproduces with stock TVM" in out
    assert [(c.name, c.rewrite) for c in probes.user_cases()] == [("grid_grid_sampler", "grid_sample")]
    report = json.loads((tmp_path / "reports" / "locate_grid.json").read_text())
    assert report["verdict"] == "wrong numbers" and report["culprits"][0]["reproducer"]["reproduces"]
    assert "aten.grid_sampler" in (tmp_path / "reports" / "locate_grid.md").read_text()


@pytest.mark.parametrize(
    "argv",
    [
        ["locate", "no_such_model"],
        ["locate", "missing.pt2"],
        ["locate", "geometry_encoder", "--rewrite", "bogus"],
        ["locate", "geometry_encoder", "--save-probe", "bogus"],
    ],
)
def test_cli_bad_input_exits_2_with_one_line(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("surgery: error:") and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- the judge


def test_judge_accepts_rounding_and_rejects_errors():
    reference = torch.linspace(-3, 3, 100, dtype=torch.float64).exp()
    eager = reference.float()
    reordered = (reference * (1 + 3e-7)).float()  # a few ulps off, as another summation order gives
    assert judge(reordered, eager, reference).ok
    assert not judge(eager + 1e-3, eager, reference).ok
    exact = torch.arange(8.0)
    assert judge(exact + 2e-7, exact, exact.double(), scale=1.0).ok  # within the floor where eager is exact
    assert not judge(
        torch.tensor([1, 2, 4]), torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3])
    ).ok  # integers: identical
    nan = torch.tensor([1.0, float("nan")])
    assert not judge(torch.tensor([1.0, 2.0]), nan, nan.double()).ok


def test_float64_reference_casts_dtype_arguments():
    class Zeros(torch.nn.Module):
        def forward(self, x):
            return x + torch.zeros(3, dtype=torch.float32) + 1 / 3

    program = torch.export.export(Zeros(), (torch.ones(3),)).run_decompositions()
    (value,), _ = evaluate_graph(program.module(), (torch.ones(3),), float64=True)
    assert value.dtype == torch.float64 and value[0].item() == 1 + 1 / 3


class NearTieSelection(torch.nn.Module):
    """Picks one of two scores that tie in float32 and not in float64 (1 + 1e-9), as topk may at
    a near-tie, and returns what the choice selects."""

    def __init__(self):
        super().__init__()
        self.nudge = torch.nn.Parameter(torch.tensor([0.0, 1e-9]))

    def forward(self, scores, payload):
        chosen = (scores + self.nudge).topk(1).indices  # [1]
        return payload[chosen] + 0.0 * scores.max(dim=0).values  # [1]


def test_float64_reference_follows_float32_choices_at_near_ties():
    """In float64 the nudged second score wins, in float32 the two tie and the first wins: a
    plain float64 run selects another payload (20 vs 10), so eager's own "error" would excuse
    anything. The float64 run along float32's path chooses as float32 did: a candidate that
    chose otherwise is judged wrong, one that chose the same is right."""
    module = torch.export.export(NearTieSelection(), (torch.ones(2), torch.tensor([10.0, 20.0]))).module()
    inputs = (torch.ones(2), torch.tensor([10.0, 20.0]))
    (plain,), _ = evaluate_graph(module, inputs, float64=True)
    assert plain.item() == 20.0  # the path float64 alone takes
    eager, along = evaluate_along(module, inputs)
    assert eager[0].item() == 10.0 and along[0].item() == 10.0
    assert judge_outputs(module, inputs, (torch.tensor([10.0]),))[0].ok
    assert not judge_outputs(module, inputs, (torch.tensor([20.0]),))[0].ok


class Ranked(torch.nn.Module):
    """Rows of a payload in the order topk ranks their scores, as a detector orders its queries."""

    def forward(self, scores, payload):
        _, order = scores.topk(3, dim=1)  # [1, 3]
        return (payload.gather(1, order[..., None].expand(-1, -1, 2)),)  # [1, 3, 2]


def test_reordering_is_accepted_only_at_verified_near_ties():
    """Two scores one float32 ulp apart may be ranked either way: a candidate that swapped their
    rows is mapped back and accepted; one that swapped rows whose scores are 0.4 apart is not."""
    scores = torch.tensor([[0.5, 0.5 + 2**-23, 0.9]])  # ranks: 2, 1, 0
    payload = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]])
    module = torch.export.export(Ranked(), (scores, payload)).module()
    selections = []
    eager, _ = evaluate_along(module, (scores, payload), selections)
    assert eager[0][0, :, 0].tolist() == [3.0, 2.0, 1.0] and len(selections) == 1
    near_tie_swapped = (eager[0][:, [0, 2, 1]],)
    permutation = reordered_at_ties(near_tie_swapped, eager, selections)
    assert permutation is not None and permutation.tolist() == [[0, 2, 1]]
    assert torch.equal(unpermuted(near_tie_swapped[0], permutation), eager[0])
    assert reordered_at_ties((eager[0][:, [1, 0, 2]],), eager, selections) is None  # 0.9 vs 0.5: no tie
    assert reordered_at_ties((eager[0] + 1,), eager, selections) is None  # not a reordering at all


def test_bisection_finds_the_first_failing_prefix():
    search = Search(SimpleNamespace(units=list(range(100))), {}, None, lambda m: None)
    count, failure = search.first_failing_prefix(lambda k: Failure("build", "boom") if k >= 37 else None)
    assert count == 37 and failure.message == "boom"


# ----------------------------------------------------------------------------- probe cases


def test_probe_case_digest_follows_the_cases(tmp_path):
    reproducer = tmp_path / "repro"
    reproducer.mkdir()
    for name, text in (("program.pt2", "p"), ("inputs.pt", "i"), ("case.json", '{"operator": "aten.x"}')):
        (reproducer / name).write_text(text)
    root = tmp_path / "probes"
    empty = probes.digest(root)
    case = probes.add_case(reproducer, "grid_sample", "mine", root)
    assert case.rewrite == "grid_sample" and [c.name for c in probes.user_cases(root)] == ["mine"]
    added = probes.digest(root)
    probes.remove_case("mine", root)
    assert added != empty and probes.digest(root) == empty


@pytest.mark.tvm
@pytest.mark.slow
def test_kept_reproducer_makes_auto_apply_its_rewrite(located, tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_PROBES", str(tmp_path / "probes"))
    reproducer = located("grid").culprits[0].reproducer["dir"]
    with pytest.raises(probes.ProbeCaseError, match="replaces none"):
        keep_as_probe(reproducer, "scatter")
    keep_as_probe(reproducer, "grid_sample", "grid_case")
    found = tvm_backend.probe(cache_dir=tmp_path / "cache")
    assert found.findings["grid_sample"].needed and "'grid_case'" in found.findings["grid_sample"].reason
    assert tvm_backend.probe(cache_dir=tmp_path / "cache").cached
    probes.remove_case("grid_case")
    again = tvm_backend.probe(cache_dir=tmp_path / "cache")  # another key: the cases changed
    assert not again.cached and "grid_case" not in again.findings["grid_sample"].reason
