"""Mask R-CNN from torchvision: weights that look trained, the heads on given boxes, checkpoints,
options, export, and chaining with torchvision's own inference."""

import pytest
import torch
from helpers import run_cli_in_process

from models.detection import feature_health
from models.maskrcnn import (
    LEVEL_SIDES,
    MaskRCNNHeads,
    build_maskrcnn,
    detect,
    example_inputs,
    heads_health,
    maskrcnn_spec,
    run_heads,
    synthetic_proposals,
)
from surgery.rewrites.base import op_census

SIZE = (128, 160)


@pytest.fixture(scope="module")
def maskrcnn():
    model = build_maskrcnn(seed=0)
    assert not any(m.training for m in model.modules())
    return model


def unpadded(inputs):
    """The same inputs with every row valid: no padding ties among the scores."""
    image, proposals, mask = inputs
    return image, proposals, torch.zeros_like(mask)


def best_class_logit(outputs):
    return outputs[0].max(dim=-1).values  # [B, P]


# ---------------------------------------------------------------- weights that look trained


@pytest.mark.slow  # builds and runs ResNet-50 FPN twice
def test_random_weights_look_trained(maskrcnn):
    """torchvision's init with no weights leaves nn.BatchNorm2d at its default statistics: some
    backbone maps are nearly constant across positions and the RoI heads' activations are
    18x unit scale. After look_trained the backbone's normalised maps and the heads' outputs are
    unit-scale and vary, and the class and mask logits differ across boxes and positions (on
    images and boxes the calibration never saw)."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    inputs = unpadded(example_inputs(1, (256, 256), 32, seed=7))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        raw = MaskRCNNHeads(maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval())
    before, before_heads = feature_health(raw, inputs, best_class_logit, run_heads), heads_health(raw, inputs)
    assert before.min_position_std < 0.01 and before_heads.typical_scale > 10, (before, before_heads)
    heads = MaskRCNNHeads(maskrcnn).eval()
    after, after_heads = feature_health(heads, inputs, best_class_logit, run_heads), heads_health(heads, inputs)
    assert after.min_position_std > 0.01 and 0.3 < after.typical_scale < 3, after  # backbone BatchNorms
    assert after.score_std > 0.3 and after.min_score_gap > 0, after  # no two boxes' best logits tie
    assert 0.3 < after_heads.typical_scale < 3 and after_heads.min_position_std > 0.01, after_heads
    assert after_heads.min_class_std_across_boxes > 0.1 and after_heads.min_mask_std > 0.1, after_heads


@pytest.mark.slow  # builds ResNet-50 FPN three times
def test_look_trained_is_seeded(maskrcnn):
    a = build_maskrcnn(seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), maskrcnn.state_dict().values()))
    b = build_maskrcnn(seed=1)
    key = "roi_heads.box_predictor.cls_score.weight"
    assert not torch.equal(a.state_dict()[key], b.state_dict()[key])


def test_synthetic_inputs_are_seeded_and_reach_every_level():
    """Boxes land on every FPN level the image allows (torchvision's own LevelMapper decides),
    each image has padding rows, and a seed gives the same draw."""
    from torchvision.ops.poolers import LevelMapper

    boxes, mask = synthetic_proposals(2, 40, (512, 640), seed=3)
    levels = LevelMapper(2, 5)(list(boxes.unbind(0)))  # [80, 1], 0..3
    assert set(levels.flatten().tolist()) == {0, 1, 2, 3}
    assert len(LEVEL_SIDES) == 4
    assert (boxes[..., 2:] > boxes[..., :2]).all() and boxes.min() >= 0
    assert (boxes[..., 2] <= 640).all() and (boxes[..., 3] <= 512).all()
    assert mask.any(dim=1).all() and not mask[:, 0].any()  # right-padded, some padding per image
    again = example_inputs(2, (512, 640), 40, seed=3)
    assert torch.equal(again[1], boxes) and torch.equal(again[2], mask)
    assert not torch.equal(example_inputs(2, (512, 640), 40, seed=4)[1], boxes)


# ---------------------------------------------------------------- the heads on given boxes


@pytest.mark.slow  # runs ResNet-50 FPN three times
def test_padded_rows_are_zero_and_leave_the_others_alone(maskrcnn):
    heads = MaskRCNNHeads(maskrcnn).eval()
    image, boxes, mask = example_inputs(2, SIZE, 6, seed=5)
    with torch.no_grad():
        outputs = heads(image, boxes, mask)
        moved = heads(image, torch.where(mask[..., None], boxes.flip(1), boxes), mask)  # other boxes at padding
        alone = heads(image[:1], boxes[:1, :1], mask[:1, :1])  # the first box of the first image, on its own
    for output, other in zip(outputs, moved):
        assert (output[mask] == 0).all() and (output[~mask] != 0).any()
        torch.testing.assert_close(other, output, rtol=0, atol=1e-5)  # measured: identical
    for output, single in zip(outputs, alone):
        # measured 1.4e-05: the heads' matmuls round otherwise for 1 row than for 12
        torch.testing.assert_close(single[0, 0], output[0, 0], rtol=0, atol=1e-4)


# ---------------------------------------------------------------- checkpoints


@pytest.mark.slow  # builds ResNet-50 FPN
def test_checkpoint_round_trip(maskrcnn, tmp_path):
    """--checkpoint FILE loads a torchvision state_dict: the spec's module gives the saved
    model's outputs exactly; one saved from FrozenBatchNorm2d (torchvision's trained models),
    without BatchNorm's counters, loads too."""
    state = maskrcnn.state_dict()
    torch.save(state, tmp_path / "maskrcnn.pt")
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, tmp_path / "frozen.pt")
    for name in ("maskrcnn.pt", "frozen.pt"):
        spec = maskrcnn_spec(image_size=SIZE, proposals=4, seed=5, checkpoint=tmp_path / name)
        with torch.no_grad():
            expected = MaskRCNNHeads(maskrcnn)(*spec.example_args)
            actual = spec.module(*spec.example_args)
        assert all(torch.equal(a, e) for a, e in zip(actual, expected))
        assert spec.description["weights"] == f"checkpoint {tmp_path / name}"


@pytest.mark.slow  # builds ResNet-50 FPN per case
def test_bad_checkpoints_are_one_clear_line(maskrcnn, tmp_path):
    state = maskrcnn.state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith("roi_heads.mask_")}, tmp_path / "no_masks.pt")
    torch.save({**state, "roi_heads.box_predictor.cls_score.weight": torch.zeros(2, 1024)}, tmp_path / "classes.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    (tmp_path / "garbage.pt").write_bytes(b"this is not a checkpoint")
    cases = [
        (tmp_path / "nowhere.pt", "does not exist or is not a file"),
        (tmp_path / "garbage.pt", "is not a readable torch checkpoint"),
        (tmp_path / "list.pt", "holds no state_dict (got list)"),
        (tmp_path / "no_masks.pt", "does not fit torchvision's maskrcnn_resnet50_fpn: missing keys: roi_heads.mask_"),
        (
            tmp_path / "classes.pt",
            "wrong shapes: roi_heads.box_predictor.cls_score.weight (2, 1024) (expected (91, 1024))",
        ),
    ]
    for checkpoint, message in cases:
        result = run_cli_in_process(
            "apply", "maskrcnn", "--checkpoint", str(checkpoint), "--reports", str(tmp_path / "reports")
        )
        assert result.returncode == 2 and message in result.stderr, (checkpoint, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "reports").exists()


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["maskrcnn", "--points", "3"],
            "--points does not apply to maskrcnn; its options: --batch, --image-size, --proposals",
        ),
        (["maskrcnn", "--variant", "r50vd"], "--variant does not apply to maskrcnn"),
        (["rt_detr", "--proposals", "10"], "--proposals does not apply to rt_detr"),
        (
            ["maskrcnn", "--image-size", "800x1066"],
            "image size must be a multiple of 32 in each dimension, got 800x1066",
        ),
        (["maskrcnn", "--proposals", "0"], "proposals must be >= 1, got 0"),
        (["maskrcnn", "--batch", "0"], "batch must be >= 1"),
    ],
)
def test_model_options_are_checked(args, message, tmp_path):
    result = run_cli_in_process("apply", *args, "--reports", str(tmp_path / "reports"))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- export


@pytest.mark.slow  # exports ResNet-50 FPN with both heads
def test_export_matches_the_wrapper():
    """The heads export with torch.export; MultiScaleRoIAlign's per-level dispatch is in the
    graph as one-argument where (nonzero), index and index_put per level and pooler, and the
    exported program gives the wrapper's outputs on inputs it was not exported with."""
    spec = maskrcnn_spec(image_size=SIZE, proposals=6, batch=2, seed=0)
    with torch.no_grad():
        program = torch.export.export(spec.module, spec.example_args)
    census = op_census(program)
    levels_x_poolers = 4 * 2
    assert census["aten.where.default"] == levels_x_poolers and census["aten.index_put_.default"] == levels_x_poolers
    assert census["torchvision.roi_align.default"] == levels_x_poolers
    inputs = example_inputs(2, SIZE, 6, seed=11)
    with torch.no_grad():
        for actual, expected in zip(program.module()(*inputs), spec.module(*inputs)):
            torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)  # measured: identical


# ---------------------------------------------------------------- chaining with torchvision


def in_order_of(actual: dict, expected: dict) -> dict:
    """``actual``'s detections in ``expected``'s order: detections sort by score, and two whose
    scores tie within rounding may come out in either order (seen with one thread, where the
    heads' matmuls round otherwise on 16 rows than on 80). Each expected detection takes the
    nearest actual box of its label; every actual detection must be taken once."""
    assert len(actual["boxes"]) == len(expected["boxes"])
    other_label = expected["labels"][:, None] != actual["labels"][None, :]  # [n, n]
    distance = torch.cdist(expected["boxes"], actual["boxes"]).masked_fill(other_label, float("inf"))  # [n, n]
    order = distance.argmin(dim=1)  # [n]
    assert sorted(order.tolist()) == list(range(len(order)))
    return {key: value[order] for key, value in actual.items()}


@pytest.mark.slow  # runs Mask R-CNN end to end, then the heads a few times
def test_detect_with_the_heads_is_torchvisions_inference(maskrcnn):
    """torchvision's own code around the heads (RPN, postprocess_detections, class masks,
    pasting) gives what model(images) gives: the same detections, boxes, scores and masks."""
    maskrcnn.transform.min_size, maskrcnn.transform.max_size = (SIZE[0],), SIZE[1]  # no resizing
    maskrcnn.rpn._post_nms_top_n = {"training": 2000, "testing": 40}  # fewer proposals: fewer calls
    images = list(example_inputs(2, SIZE, 1, seed=9)[0])
    try:
        with torch.no_grad():
            expected = maskrcnn(images)
        actual = detect(maskrcnn, MaskRCNNHeads(maskrcnn), images, SIZE, 16)
    finally:
        maskrcnn.transform.min_size, maskrcnn.transform.max_size = (800,), 1333
        maskrcnn.rpn._post_nms_top_n = {"training": 2000, "testing": 1000}
    assert sum(len(e["boxes"]) for e in expected) > 0
    for a, e in zip(actual, expected):
        a = in_order_of(a, e)
        assert torch.equal(a["labels"], e["labels"])
        # measured: boxes 4.4e-05 relative (the decoded deltas' rounding, times box sizes up to 160 px)
        torch.testing.assert_close(a["boxes"], e["boxes"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a["scores"], e["scores"], rtol=0, atol=5e-5)  # measured 7.5e-06
        torch.testing.assert_close(a["masks"], e["masks"], rtol=0, atol=5e-4)  # measured 9.5e-05


# ---------------------------------------------------------------- the whole job


@pytest.mark.slow
@pytest.mark.tvm
def test_apply_maskrcnn_end_to_end(tmp_path):
    """``apply maskrcnn`` at a small size: the probe picks row_dispatch for the level dispatch
    (TVM cannot import nonzero), no data-dependent operator is left, and original vs rewritten
    vs TVM agree on drawn images and boxes, judged against the original run in float64."""
    import json
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "surgery", "apply", "maskrcnn", "--image-size", "128x160", "--proposals", "6"]
        + ["--examples", "1", "--tvm-examples", "1", "--schedules", "default"]
        + ["--out", str(tmp_path / "out"), "--reports", str(tmp_path / "reports")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "reports" / "maskrcnn.json").read_text())
    assert report["passed"]
    assert report["rewrites"]["applied"]["row_dispatch"] == {"aten.index_put.default": 8, "aten.nonzero.default": 8}
    assert not {"aten.nonzero.default", "aten.index_put.default", "aten.index.Tensor"} & set(report["census_after"])
    for check in ("original_vs_rewritten", "original_vs_tvm"):
        stats = report["equivalence"][check]
        assert set(stats) == {"class_logits", "box_regression", "mask_logits"}
        for output in stats.values():
            assert output["error"] <= output["tolerance"], output
    assert (tmp_path / "out" / "maskrcnn.tvm.so").is_file()
