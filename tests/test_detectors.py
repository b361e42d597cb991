"""The DETR-style detectors from transformers: weights that look trained, checkpoints, options."""

import json

import pytest
import torch
from helpers import run_cli_in_process
from test_geometry_encoder import run_cli

from models.deformable_detr import build_deformable_detr, deformable_detr_config
from models.detection import DetectorWrapper, feature_health, synthetic_images
from models.rt_detr import build_rt_detr, rt_detr_config, rt_detr_spec, selection_scores


def query_scores(outputs):
    return outputs.logits.max(dim=-1).values  # [B, Q]


@pytest.fixture(scope="module")
def rt_detr():
    return build_rt_detr("r18vd", seed=0)


# ---------------------------------------------------------------- weights that look trained


@pytest.mark.slow  # builds a 20-40 M parameter detector
def test_rt_detr_random_weights_look_trained(rt_detr):
    """transformers' own random init collapses RT-DETR's features to constants and ties every
    query-selection score; after look_trained they are unit-scale, vary across positions and
    no two scores tie (on images the calibration never saw)."""
    from transformers import RTDetrForObjectDetection

    images = synthetic_images(1, (320, 320), seed=7)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        raw = RTDetrForObjectDetection(rt_detr_config("r18vd")).eval()
    before = feature_health(raw, images, selection_scores)
    assert before.min_position_std < 1e-6 and before.min_score_gap == 0  # what the check would test on
    after = feature_health(rt_detr, images, selection_scores)
    assert after.min_position_std > 0.01, after  # every normalised map varies across positions
    assert 0.3 < after.typical_scale < 3, after  # unit scale
    assert after.score_std > 0.1 and after.min_score_gap > 0, after  # no ties among 2,100 anchors


@pytest.mark.slow  # builds a 20-40 M parameter detector
def test_deformable_detr_random_weights_look_trained():
    """Deformable DETR's own random init leaves some normalised maps constant and every
    reference point at the image's centre; after look_trained they vary and spread out."""
    from transformers import DeformableDetrForObjectDetection

    images = synthetic_images(1, (256, 256), seed=7)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        raw = DeformableDetrForObjectDetection(deformable_detr_config()).eval()
    before = feature_health(raw, images, query_scores)
    with torch.no_grad():
        raw_boxes = raw(pixel_values=images).pred_boxes  # [1, 300, 4]
    assert before.min_position_std == 0 and raw_boxes[..., :2].std() < 0.02
    model = build_deformable_detr(seed=0)
    after = feature_health(model, images, query_scores)
    with torch.no_grad():
        boxes = model(pixel_values=images).pred_boxes  # [1, 300, 4]
    assert after.min_position_std > 0.01 and 0.3 < after.typical_scale < 3, after
    assert after.min_score_gap > 0, after
    assert boxes[..., :2].std() > 0.1  # box centres spread over the image


@pytest.mark.slow  # builds a 20-40 M parameter detector
def test_look_trained_is_seeded():
    a, b = build_rt_detr("r18vd", seed=3), build_rt_detr("r18vd", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = build_rt_detr("r18vd", seed=4)
    assert not torch.equal(a.state_dict()["model.enc_score_head.weight"], c.state_dict()["model.enc_score_head.weight"])


# ---------------------------------------------------------------- checkpoints


@pytest.mark.slow  # builds a 20-40 M parameter detector
def test_rt_detr_checkpoint_round_trip(rt_detr, tmp_path):
    """--checkpoint DIR loads a save_pretrained directory: the spec's module gives the saved
    model's outputs exactly."""
    rt_detr.save_pretrained(tmp_path / "ckpt")
    spec = rt_detr_spec(image_size=(128, 128), seed=5, checkpoint=tmp_path / "ckpt")
    (images,) = spec.example_args
    with torch.no_grad():
        expected = DetectorWrapper(rt_detr)(images)
        actual = spec.module(images)
    assert all(torch.equal(a, e) for a, e in zip(actual, expected))
    assert spec.description["weights"] == f"checkpoint {tmp_path / 'ckpt'}"


@pytest.mark.slow  # builds a 20-40 M parameter detector
def test_bad_checkpoints_are_one_clear_line(rt_detr, tmp_path):
    rt_detr.save_pretrained(tmp_path / "r18vd")
    config = json.loads((tmp_path / "r18vd" / "config.json").read_text())
    config["decoder_layers"] = 4  # a layer the weights don't have
    (tmp_path / "deeper").mkdir()
    (tmp_path / "deeper" / "config.json").write_text(json.dumps(config))
    for name in ("model.safetensors",):
        (tmp_path / "deeper" / name).symlink_to(tmp_path / "r18vd" / name)
    deformable_detr_config().save_pretrained(tmp_path / "deformable")
    (tmp_path / "empty").mkdir()
    cases = [
        (tmp_path / "nowhere", "is not a directory"),
        (tmp_path / "empty", "has no config.json"),
        (tmp_path / "deformable", "holds a 'deformable_detr' model, expected 'rt_detr'"),
        (tmp_path / "deeper", "does not fit RTDetrForObjectDetection: missing keys: model.decoder.bbox_embed.3."),
    ]
    for checkpoint, message in cases:
        result = run_cli_in_process(
            "apply", "rt_detr", "--checkpoint", str(checkpoint), "--reports", str(tmp_path / "reports")
        )
        assert result.returncode == 2 and message in result.stderr, (checkpoint, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "reports").exists()
    assert (tmp_path / "r18vd" / "model.safetensors").is_file()  # the user's files are left as they were


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    "args, message",
    [
        (["rt_detr", "--points", "3"], "--points does not apply to rt_detr; its options: --batch, --image-size"),
        (["deformable_detr", "--variant", "r50vd"], "--variant does not apply to deformable_detr"),
        (["geometry_encoder", "--image-size", "320"], "--image-size does not apply to geometry_encoder"),
        (["rt_detr", "--image-size", "100"], "image size must be a multiple of 32 in each dimension, got 100x100"),
        (["deformable_detr", "--image-size", "96"], "image size must be a multiple of 64"),
        (["rt_detr", "--variant", "r99"], "unknown RT-DETR variant 'r99'; known: r18vd, r50vd"),
        (["rt_detr", "--batch", "0"], "batch must be >= 1"),
        (["saved.pt2", "--image-size", "320"], "--image-size applies to named models"),
    ],
)
def test_model_options_are_checked(args, message, tmp_path):
    result = run_cli_in_process("apply", *args, "--reports", str(tmp_path / "reports"))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- the command end to end


@pytest.mark.slow
@pytest.mark.tvm
def test_apply_rt_detr_end_to_end(tmp_path):
    """What `python -m surgery apply rt_detr` does, at a small image: the probe of stock TVM
    chooses the rewrites RT-DETR needs (grid_sample, the boolean product, the negative select
    that picks the last decoder layer's logits), and original vs rewritten vs TVM agree on drawn
    images, judged against the original run in float64 along eager's path."""
    result = run_cli(
        "apply",
        "rt_detr",
        "--image-size",
        "160",
        "--examples",
        "2",
        "--tvm-examples",
        "2",
        "--out",
        str(tmp_path / "out"),
        "--reports",
        str(tmp_path / "reports"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "reports" / "rt_detr.json").read_text())
    assert report["passed"] and report["tvm"]["schedules"] == "ours"  # the detectors ship our schedules
    applied = report["rewrites"]["applied"]
    assert applied["grid_sample"] == {"aten.grid_sampler.default": 9}  # 3 decoder layers x 3 levels
    assert applied["bool_arithmetic"] == {"aten.mul.Tensor": 1}
    assert applied["negative_index"] == {"aten.select.int": 2}  # logits and boxes of the last layer
    # the encoder's box head runs on the 300 anchors topk keeps, not all 525 at 160x160
    assert report["tvm"]["speed_rewrites"]["gathered_rows_only"] == {"aten.gather.default": 1}
    for check in ("original_vs_rewritten", "original_vs_tvm"):
        stats = report["equivalence"][check]
        assert set(stats) == {"logits", "pred_boxes", "last_hidden_state"}
        for output in stats.values():  # within 16x eager's own error, and that error is rounding
            assert output["error"] <= output["tolerance"] and output["eager_error"] < 1e-3, output
    assert "float64" in report["bounds"]
    assert (tmp_path / "out" / "rt_detr.tvm.so").is_file()
