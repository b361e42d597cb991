"""SAM3's geometry encoder: the model adapter, checkpoints, and the apply command end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_cli_in_process

from models.checkpoint import CheckpointError
from models.geometry_encoder import (
    CHECKPOINT_PREFIX,
    GeometryEncoderWrapper,
    PromptShape,
    build_geometry_encoder,
    example_inputs,
    load_checkpoint,
    pin_memory_passthrough,
)

pytestmark = [pytest.mark.sam3]

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "surgery", *args], capture_output=True, text=True, cwd=cwd, timeout=1800
    )


@pytest.fixture(scope="module")
def encoder():
    return build_geometry_encoder(seed=0)


def test_production_configuration(encoder):
    assert type(encoder).__name__ == "SequenceGeometryEncoder" and type(encoder).__module__.startswith("sam3.")
    assert encoder.d_model == 256 and len(encoder.encode) == 3 and encoder.roi_size == 7
    assert encoder.cls_embed is not None and encoder.final_proj is not None and not encoder.encode_boxes_as_points
    for part in (
        "points_direct_project",
        "points_pool_project",
        "points_pos_enc_project",
        "boxes_direct_project",
        "boxes_pool_project",
        "boxes_pos_enc_project",
    ):
        assert getattr(encoder, part) is not None, part
    assert not encoder.training


def test_seeded_weights_are_reproducible_and_leave_global_rng_alone(encoder):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    again = build_geometry_encoder(seed=0)
    assert torch.rand(1) == before  # building did not consume the caller's random stream
    for (k, a), (_, b) in zip(encoder.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    other = build_geometry_encoder(seed=1)
    assert not torch.equal(other.label_embed.weight, encoder.label_embed.weight)


def test_seeded_layers_differ_like_a_trained_checkpoints(encoder):
    """SAM3 deep-copies one layer three times; identical random layers would let a compiler's
    common-subexpression elimination do one layer's image-side work for all three."""
    layers = list(encoder.encode)
    assert len(layers) == 3
    for name in (
        "cross_attn_image.in_proj_weight",
        "cross_attn_image.out_proj.weight",
        "linear1.weight",
        "linear2.weight",
    ):
        weights = [layer.state_dict()[name] for layer in layers]
        for i in range(3):
            for j in range(i + 1, 3):
                assert not torch.equal(weights[i], weights[j]), (name, i, j)
        assert all(abs(float(w.std() / weights[0].std()) - 1) < 0.1 for w in weights), name  # same initialiser


def test_runs_on_cpu_and_restores_pin_memory(encoder):
    original = torch.Tensor.pin_memory
    shape = PromptShape(points=2, boxes=1, batch=1, feat_size=(8, 8))
    with torch.no_grad():
        embeds, mask = GeometryEncoderWrapper(encoder, shape.feat_size)(*example_inputs(shape))
    assert embeds.shape == (4, 1, 256) and mask.shape == (1, 4) and mask.dtype == torch.bool
    assert torch.Tensor.pin_memory is original
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):  # what the passthrough exists for
            torch.ones(1).pin_memory()
        with pin_memory_passthrough():
            t = torch.ones(1)
            assert t.pin_memory() is t


@pytest.mark.parametrize("layout", ["sam3_model_dict", "sam3_flat", "bare"])
def test_checkpoint_loading(tmp_path, encoder, layout):
    source = build_geometry_encoder(seed=7).state_dict()
    if layout == "bare":
        state = source
    else:
        state = {CHECKPOINT_PREFIX + k: v for k, v in source.items()}
        state["detector.backbone.some.weight"] = torch.zeros(3)  # the rest of SAM3 is ignored
        if layout == "sam3_model_dict":
            state = {"model": state, "epoch": 3}
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    loaded = build_geometry_encoder(seed=0, checkpoint=path)
    for k, v in source.items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_broken_checkpoints_name_the_problem(tmp_path, encoder):
    good = encoder.state_dict()
    cases = {
        "missing": ({k: v for k, v in good.items() if k != "cls_embed.weight"}, "missing keys: cls_embed.weight"),
        "unexpected": ({**good, "extra.weight": torch.zeros(1)}, "unexpected keys: extra.weight"),
        "shape": (
            {**good, "cls_embed.weight": torch.zeros(2, 256)},
            r"wrong shapes: cls_embed.weight \(2, 256\) \(expected \(1, 256\)\)",
        ),
        "not_a_dict": ([1, 2, 3], "holds no state_dict"),
    }
    for name, (state, message) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(state, path)
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(build_geometry_encoder(seed=0), path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_checkpoint(encoder, garbage)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(encoder, tmp_path / "nowhere.pt")


# ---------------------------------------------------------------- the command: bad input


@pytest.mark.parametrize(
    "args, message",
    [
        (["apply", "no_such_model"], "unknown model 'no_such_model'; known models: geometry_encoder"),
        (["apply", "missing.pt2"], "no such file: 'missing.pt2'"),
        (["apply", "geometry_encoder", "--rewrite", "bogus"], "unknown rewrite 'bogus'"),
        (["apply", "geometry_encoder", "--points", "0"], "points must be >= 1"),
        (["apply", "geometry_encoder", "--checkpoint", "nowhere.pt"], "does not exist"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, tmp_path):
    result = run_cli_in_process(*args, "--out", str(tmp_path / "out"), "--reports", str(tmp_path / "reports"))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "reports").exists()


@pytest.mark.slow
def test_corrupt_pt2_and_broken_checkpoint(tmp_path):
    corrupt = tmp_path / "corrupt.pt2"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    result = run_cli("apply", str(corrupt), "--reports", str(tmp_path))
    assert (
        result.returncode == 2
        and "cannot load an ExportedProgram" in result.stderr
        and "Traceback" not in result.stderr
    )
    broken = tmp_path / "broken.pt"
    torch.save({"model": {"detector.geometry_encoder.cls_embed.weight": torch.zeros(1, 256)}}, broken)
    result = run_cli("apply", "geometry_encoder", "--checkpoint", str(broken), "--reports", str(tmp_path))
    assert result.returncode == 2 and "missing keys" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------- the command end to end


@pytest.fixture(scope="module")
def applied(tmp_path_factory):
    """`python -m surgery apply geometry_encoder` with the defaults but fewer examples."""
    tmp = tmp_path_factory.mktemp("apply")
    result = run_cli(
        "apply", "geometry_encoder", "--examples", "4", "--out", str(tmp / "out"), "--reports", str(tmp / "reports")
    )
    return tmp, result


@pytest.mark.tvm
@pytest.mark.slow
def test_apply_geometry_encoder_end_to_end(applied):
    tmp, result = applied
    assert result.returncode == 0, result.stdout + result.stderr
    for stage in ("build", "export", "rewrite", "verify", "TVM prepare", "TVM build", "TVM run"):
        assert f"[{stage:10s}]" in result.stdout, stage
    report = json.loads((tmp / "reports" / "geometry_encoder.json").read_text())
    assert report["passed"] and not report["failures"]
    assert report["versions"]["torch"].startswith("2.14.1") and report["versions"]["sam3"] == "0.1.4"
    # what TVM 0.27 needs of the encoder's operators (its probe also asks for div_rounding and
    # bool_arithmetic, which find nothing to replace there)
    assert set(report["rewrites"]["applied"]) == {"grid_sample", "floor_divide"}
    assert "wrong numbers" in report["rewrites"]["reasons"]["grid_sample"]
    assert (
        report["census_before"]["aten.grid_sampler.default"] == 1
        and "aten.grid_sampler.default" not in report["census_after"]
    )
    assert report["equivalence"]["original_vs_tvm"]["embeddings"]["max_abs"] <= 1e-5
    assert report["equivalence"]["original_vs_tvm"]["padding_mask"]["max_abs"] == 0
    assert report["tvm"]["build_s"] > 0 and report["latency"]["tvm_ms"] > 0 and report["latency"]["eager_ms"] > 0
    # shipped by default: image stage and prompt stage compiled apart, each timed
    assert report["tvm"]["split"]["stage_inputs"] == ["img_feats", "img_pos"]
    assert report["latency"]["tvm_stage_ms"] > 0 and report["latency"]["tvm_rest_ms"] > 0
    markdown = (tmp / "reports" / "geometry_encoder.md").read_text()
    assert "Verdict: **PASSED" in markdown and "Contracts of the rewrites applied" in markdown


@pytest.mark.tvm
@pytest.mark.slow
def test_apply_artifacts_load_and_run(applied):
    tmp, result = applied
    from models.geometry_encoder import PromptShape
    from surgery.pipeline import load_program
    from surgery.stages import StagedFunction

    args = example_inputs(PromptShape(), seed=5)
    original = load_program(tmp / "out" / "geometry_encoder.original.pt2").module()
    rewritten = load_program(tmp / "out" / "geometry_encoder.rewritten.pt2").module()
    compiled = StagedFunction.load(tmp / "out" / "geometry_encoder.stages.json")
    assert {p.name for p in (tmp / "out").glob("*.so")} == {
        "geometry_encoder.image.tvm.so",
        "geometry_encoder.prompt.tvm.so",
    }
    with torch.no_grad():
        expected = original(*args)
        from surgery.equivalence import assert_equivalent

        assert_equivalent(rewritten(*args)[0], expected[0])
    assert_equivalent(compiled(*args)[0], expected[0])
    assert torch.equal(compiled(*args)[1], expected[1])
    assert not list((tmp / "out").glob(".*.tmp*")), "a temporary file was left behind"


@pytest.mark.tvm
@pytest.mark.slow
def test_apply_saved_program(applied, tmp_path):
    tmp, _ = applied
    result = run_cli(
        "apply",
        str(tmp / "out" / "geometry_encoder.original.pt2"),
        "--examples",
        "3",
        "--out",
        str(tmp_path / "out"),
        "--reports",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "geometry_encoder.original.json").read_text())
    assert report["passed"] and "saved ExportedProgram" in report["description"]["model"]


@pytest.mark.tvm
@pytest.mark.slow
def test_apply_without_rewrites_fails_on_tvm_and_says_why(tmp_path):
    result = run_cli(
        "apply",
        "geometry_encoder",
        "--rewrite",
        "none",
        "--examples",
        "2",
        "--out",
        str(tmp_path / "out"),
        "--reports",
        str(tmp_path),
    )
    assert result.returncode == 1
    report = json.loads((tmp_path / "geometry_encoder.json").read_text())
    assert not report["passed"] and report["failures"][0]["check"] in ("TVM prepare", "TVM build", "original vs TVM")
    assert "FAILED" in (tmp_path / "geometry_encoder.md").read_text()
