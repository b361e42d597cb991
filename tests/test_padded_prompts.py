"""One compiled geometry encoder for varying numbers of points, boxes and images (fixed maximum
plus SAM3's right-padding masks, ``models/padded_prompts.py``).

The property test compiles the encoder with stock TVM once, at 16 points, 8 boxes, batch 4
(72 x 72 features), then hypothesis draws prompts of 1-16 points, 0-8 boxes, batch 1-4 (and,
within those, each image right-padded to its own count), random labels, points and boxes: the
compiled module's outputs, cut back to the unpadded sizes, must equal the original model run on
the unpadded prompts (mask identical, valid rows within float32 1e-5), and, per image, the
original run alone at exactly its valid counts.
"""

import json

import pytest
import torch
from helpers import run_cli_in_process
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_geometry_encoder import run_cli

import surgery
from models.geometry_encoder import GeometryEncoderWrapper, PromptShape, build_geometry_encoder, example_inputs
from models.padded_prompts import (
    PaddedGeometryEncoder,
    PromptLimits,
    exact_count_reference,
    limits_from_options,
    pad_prompts,
    valid_rows,
    varying_prompts,
)
from surgery.equivalence import assert_equivalent

pytestmark = [pytest.mark.sam3]

LIMITS = PromptLimits(max_points=16, max_boxes=8, max_batch=4)
SMALL = (8, 8)  # feature map for the PyTorch-only tests: the padding logic doesn't depend on its size


@pytest.fixture(scope="module")
def encoder():
    return build_geometry_encoder(seed=0)


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "limits, message",
    [
        (PromptLimits(0, 8, 4), "max_points must be an integer >= 1"),
        (PromptLimits(16, 0, 4), "max_boxes must be an integer >= 1.*does not build on TVM"),
        (PromptLimits(16, 8, -1), "max_batch must be an integer >= 1"),
    ],
)
def test_limits_reject_bad_values(limits, message):
    with pytest.raises(ValueError, match=message):
        limits.validate()


def test_limits_from_options():
    assert limits_from_options(None, None, None, 3, 2, 1) is None
    assert limits_from_options(None, 2, None, 1, 1, 1) == PromptLimits(16, 2, 4)
    with pytest.raises(ValueError, match="--boxes 3 exceeds --max-boxes 2"):
        limits_from_options(None, 2, None, 3, 3, 1)


def test_pad_prompts_rejects_what_does_not_fit():
    limits = PromptLimits(4, 2, 2)
    ok = example_inputs(PromptShape(3, 2, 2, SMALL))
    assert pad_prompts(ok, limits, SMALL).args[0].shape == (4, 2, 2)
    with pytest.raises(
        ValueError, match="5 points is outside what this module serves .1 to 4.; compile with a larger --max-points"
    ):
        pad_prompts(example_inputs(PromptShape(5, 2, 1, SMALL)), limits, SMALL)
    with pytest.raises(ValueError, match="3 batch is outside"):
        pad_prompts(example_inputs(PromptShape(1, 1, 3, SMALL)), limits, SMALL)
    with pytest.raises(ValueError, match=r"img_feats must have shape \(256, 2, 256\)"):
        pad_prompts(ok, limits, (16, 16))
    not_right_padded = list(ok)
    not_right_padded[2] = torch.tensor([[True, False, False], [False, False, False]])
    with pytest.raises(ValueError, match="point_mask must be a bool mask, True at padding, right-padded"):
        pad_prompts(not_right_padded, limits, SMALL)
    with pytest.raises(ValueError, match="expected the 8 inputs"):
        pad_prompts(ok[:7], limits, SMALL)


# ------------------------------------------------------------------ the padding, in PyTorch


def test_zero_boxes_run_in_pytorch_at_exact_counts(encoder):
    """The reference for 'no boxes': the original wrapper with a box tensor of size 0."""
    wrapper = GeometryEncoderWrapper(encoder, SMALL).eval()
    with torch.no_grad():
        embeddings, mask = wrapper(*example_inputs(PromptShape(2, 0, 1, SMALL)))
    assert embeddings.shape == (3, 1, 256) and not mask.any()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(args=varying_prompts(PromptLimits(6, 3, 3), SMALL), filler=st.integers(0, 2**31 - 1))
def test_padding_content_and_other_images_do_not_matter(encoder, args, filler):
    """What sits in padding slots, padding images included, never reaches a valid output: fill
    every padded slot with random values instead of the defaults and the valid rows are equal;
    the padded module (here the eager wrapper at the limits) equals the original at exact counts."""
    limits = PromptLimits(6, 3, 3)
    wrapper = GeometryEncoderWrapper(encoder, SMALL).eval()
    padded = pad_prompts(args, limits, SMALL)
    g = torch.Generator().manual_seed(filler)
    scrambled = []
    for name, big, small in zip(
        ("points", "point_labels", "point_mask", "boxes", "box_labels", "box_mask", "feats", "pos"), padded.args, args
    ):
        region = torch.ones(big.shape, dtype=torch.bool)
        region[tuple(slice(0, n) for n in small.shape)] = False
        if name.endswith("mask"):
            scrambled.append(big)
            continue
        noise = (
            torch.randint(0, 2, big.shape, generator=g).to(big.dtype)
            if not big.dtype.is_floating_point
            else torch.rand(big.shape, generator=g)
        )
        scrambled.append(torch.where(region, noise, big))
    with torch.no_grad():
        expected = wrapper(*args)
        a = padded.unpad(wrapper(*padded.args))
        b = padded.unpad(wrapper(*scrambled))
    for actual in (a, b):
        assert torch.equal(actual[1], expected[1])
        assert_equivalent(torch.cat(valid_rows(*actual)), torch.cat(valid_rows(*expected)))
    for i, (e, _) in enumerate(exact_count_reference(wrapper, args)):
        assert_equivalent(a[0][: e.shape[0], i], e[:, 0])


# ------------------------------------------------------------------ one TVM module, any counts


@pytest.fixture(scope="module")
def compiled(encoder, tmp_path_factory):
    """Export at the limits, rewrite for the installed TVM (its probe decides), build once."""
    from surgery import tvm_backend

    probe = tvm_backend.probe(cache_dir=tmp_path_factory.mktemp("probe"))
    wrapper = GeometryEncoderWrapper(encoder, (72, 72)).eval()
    with torch.no_grad():
        program = torch.export.export(wrapper, example_inputs(LIMITS.shape((72, 72))))
    fn, _ = tvm_backend.compile_program(surgery.rewrite(program, probe.needed()))
    return wrapper, PaddedGeometryEncoder(fn, LIMITS, (72, 72))


def _examples():
    return max(6, settings.default.max_examples // 100)  # dev 6, ci 20: each runs the model 1 + B times


@pytest.mark.tvm
@pytest.mark.slow
def test_one_tvm_module_serves_every_count(compiled):
    wrapper, padded_tvm = compiled

    @settings(max_examples=_examples(), deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(varying_prompts(LIMITS, (72, 72)))
    def check(args):
        Np, Nb, B = args[0].shape[0], args[3].shape[0], args[0].shape[1]
        event(f"points {Np}, boxes {Nb}, batch {B}")
        embeddings, mask = padded_tvm(*args)
        with torch.no_grad():
            e_embeddings, e_mask = wrapper(*args)
        assert embeddings.shape == e_embeddings.shape and torch.equal(mask, e_mask)
        assert_equivalent(
            torch.cat(valid_rows(embeddings, mask)), torch.cat(valid_rows(e_embeddings, e_mask)), context="TVM padded"
        )
        for b, (alone, alone_mask) in enumerate(exact_count_reference(wrapper, args)):
            L = alone.shape[0]
            assert not alone_mask.any() and not mask[b, :L].any() and mask[b, L:].all()
            assert_equivalent(embeddings[:L, b], alone[:, 0], context=f"image {b} alone at exact counts")

    check()


@pytest.mark.tvm
@pytest.mark.slow
def test_extreme_counts_on_tvm(compiled):
    """The corners, explicitly: 1 point and 0 boxes at batch 1, and everything at the maximum."""
    wrapper, padded_tvm = compiled
    for shape in (PromptShape(1, 0, 1), PromptShape(16, 8, 4)):
        args = example_inputs(shape, seed=3)
        embeddings, mask = padded_tvm(*args)
        with torch.no_grad():
            expected = wrapper(*args)
        assert embeddings.shape == (shape.points + shape.boxes + 1, shape.batch, 256) and not mask.any()
        assert_equivalent(embeddings, expected[0])


# ------------------------------------------------------------------ the command


@pytest.mark.parametrize(
    "options, message",
    [
        (["--max-boxes", "0"], "max_boxes must be an integer >= 1"),
        (["--max-points", "-3"], "max_points must be an integer >= 1"),
        (["--max-batch", "2", "--batch", "3"], "--batch 3 exceeds --max-batch 2"),
    ],
)
def test_apply_rejects_bad_limits(options, message, tmp_path):
    result = run_cli_in_process(
        "apply", "geometry_encoder", *options, "--out", str(tmp_path / "out"), "--reports", str(tmp_path / "reports")
    )
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "reports").exists()


def test_apply_rejects_limits_for_saved_programs(tmp_path):
    result = run_cli_in_process("apply", str(tmp_path / "x.pt2"), "--max-points", "4")
    assert result.returncode == 2 and "apply to geometry_encoder only" in result.stderr


@pytest.mark.tvm
@pytest.mark.slow
def test_apply_with_limits_end_to_end(tmp_path):
    """Small limits and a small feature map keep it quick; the full-size case is the property test above."""
    result = run_cli(
        "apply",
        "geometry_encoder",
        "--max-points",
        "4",
        "--max-boxes",
        "2",
        "--max-batch",
        "2",
        "--points",
        "2",
        "--boxes",
        "1",
        "--feat-size",
        "16",
        "--examples",
        "3",
        "--out",
        str(tmp_path / "out"),
        "--reports",
        str(tmp_path / "reports"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[padded    ]" in result.stdout
    report = json.loads((tmp_path / "reports" / "geometry_encoder.json").read_text())
    assert report["passed"] and report["padded"]["max_points"] == 4 and report["description"]["points"] == 4
    stats = report["equivalence"]["padded_tvm_vs_exact_counts"]
    assert stats["padding_mask"]["max_abs"] == 0 and stats["embeddings (image alone, exact counts)"]["max_abs"] <= 1e-5
    assert report["latency"]["tvm_padded_2p_1b_batch1_ms"] > 0
