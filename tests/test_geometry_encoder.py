"""SAM3's geometry encoder: the model adapter, checkpoints, and the apply command end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.geometry_encoder import (
    CHECKPOINT_PREFIX, CheckpointError, GeometryEncoderWrapper, PromptShape, build_geometry_encoder, example_inputs,
    load_checkpoint, pin_memory_passthrough,
)

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "surgery", *args], capture_output=True, text=True, cwd=cwd, timeout=1800)


@pytest.fixture(scope="module")
def encoder():
    return build_geometry_encoder(seed=0)


def test_production_configuration(encoder):
    assert type(encoder).__name__ == "SequenceGeometryEncoder" and type(encoder).__module__.startswith("sam3.")
    assert encoder.d_model == 256 and len(encoder.encode) == 3 and encoder.roi_size == 7
    assert encoder.cls_embed is not None and encoder.final_proj is not None and not encoder.encode_boxes_as_points
    for part in ("points_direct_project", "points_pool_project", "points_pos_enc_project",
                 "boxes_direct_project", "boxes_pool_project", "boxes_pos_enc_project"):
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
        "shape": ({**good, "cls_embed.weight": torch.zeros(2, 256)}, r"wrong shapes: cls_embed.weight \(2, 256\) \(expected \(1, 256\)\)"),
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


@pytest.mark.parametrize("args, message", [
    (["apply", "no_such_model"], "unknown model 'no_such_model'; known models: geometry_encoder"),
    (["apply", "missing.pt2"], "no such file: 'missing.pt2'"),
    (["apply", "geometry_encoder", "--rewrite", "bogus"], "unknown rewrite 'bogus'"),
    (["apply", "geometry_encoder", "--points", "0"], "points must be >= 1"),
    (["apply", "geometry_encoder", "--checkpoint", "nowhere.pt"], "does not exist"),
])
def test_bad_input_is_one_clear_line(args, message, tmp_path):
    result = run_cli(*args, "--out", str(tmp_path / "out"), "--reports", str(tmp_path / "reports"))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "reports").exists()


def test_corrupt_pt2_and_broken_checkpoint(tmp_path):
    corrupt = tmp_path / "corrupt.pt2"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    result = run_cli("apply", str(corrupt), "--reports", str(tmp_path))
    assert result.returncode == 2 and "cannot load an ExportedProgram" in result.stderr and "Traceback" not in result.stderr
    broken = tmp_path / "broken.pt"
    torch.save({"model": {"detector.geometry_encoder.cls_embed.weight": torch.zeros(1, 256)}}, broken)
    result = run_cli("apply", "geometry_encoder", "--checkpoint", str(broken), "--reports", str(tmp_path))
    assert result.returncode == 2 and "missing keys" in result.stderr and "Traceback" not in result.stderr
