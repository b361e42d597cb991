"""Stock TVM: the probe, every rewrite's output on TVM, and the whole-model property test.

The whole-model test compiles SAM3's geometry encoder once per shape (8 points, 4 boxes, batch 1
and 2, 72 x 72 features) and then draws prompts with hypothesis: 1-8 valid points and 0-4 valid
boxes per image through SAM3's own right-padding masks, labels, points on the image's edges,
boxes inside, straddling, whole-image and tiny, random unit-scale features. Original PyTorch,
rewritten PyTorch and TVM must agree: embeddings within float32 1e-5 absolute, masks exactly.
TVM three ways: stock schedules; as shipped for one call (speed rewrites, our schedules); as
shipped for interactive use (image stage + prompt stage, both compiled, composed).
"""

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings

import surgery
from models.geometry_encoder import (
    IMAGE_INPUTS,
    GeometryEncoderWrapper,
    PromptShape,
    build_geometry_encoder,
    example_inputs,
    prompt_inputs,
)
from surgery import tvm_backend
from surgery.equivalence import assert_equivalent
from surgery.rewrites import REGISTRY
from surgery.stages import hoist

pytestmark = [pytest.mark.tvm, pytest.mark.slow]


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    return tvm_backend.probe(cache_dir=tmp_path_factory.mktemp("probe"))


def test_probe_finds_the_known_converter_bugs(probe):
    # apache-tvm 0.27 (pinned): grid_sampler_2d takes the grid in the wrong layout, and float
    # floor_divide by an int scalar fails to import, and select/index with a negative index read
    # out of bounds (take, mode="fast"). Its roi_align and scatter converters are right.
    assert probe.findings["grid_sample"].needed and "wrong numbers" in probe.findings["grid_sample"].reason
    assert probe.findings["floor_divide"].needed and "fails" in probe.findings["floor_divide"].reason
    assert probe.findings["negative_index"].needed and "wrong numbers" in probe.findings["negative_index"].reason
    assert not probe.findings["roi_align"].needed and not probe.findings["scatter"].needed
    assert sorted(probe.needed()) == [
        "bool_arithmetic",
        "div_rounding",
        "floor_divide",
        "grid_sample",
        "negative_index",
        "row_dispatch",
    ]


def test_probe_finds_nonzero_fails_to_import(probe):
    # torch.where(mask)[0] (MultiScaleRoIAlign's level dispatch): no converter for nonzero.
    finding = probe.findings["row_dispatch"]
    assert finding.needed and "converter fails" in finding.reason and "nonzero" in finding.reason


def _box_pooler_case(height: int, width: int, seed: int):
    """Mask R-CNN's box pooler (MultiScaleRoIAlign, 4 maps at strides 4-32 of a height x width
    image, 8 channels, 7x7, sampling 2) on boxes of every level and one of padding: the case and
    its boxes."""
    from surgery.rewrites.row_dispatch import MultiScaleCase

    generator = torch.Generator().manual_seed(seed)
    features = tuple(torch.randn(1, 8, height // s, width // s, generator=generator) for s in (4, 8, 16, 32))
    sizes = torch.tensor([20.0, 60, 130, 200, 300, 420, 600, 0])  # levels 2, 2, 3, 3, 4, 4, 5 and padding
    corners = torch.rand(8, 2, generator=generator) * torch.tensor([float(width), float(height)])
    boxes = torch.cat([corners, corners + sizes[:, None]], dim=1)
    return MultiScaleCase(features, (boxes,), (height, width), (7, 7), 2, ()), boxes


def test_multiscale_roi_align_runs_on_tvm_after_row_dispatch(probe):
    """Mask R-CNN's box pooler (MultiScaleRoIAlign, 4 maps, 7x7, sampling 2), rewritten with
    what this TVM needs, builds and matches the eager module on boxes over every level."""
    import torchvision

    case, boxes = _box_pooler_case(128, 160, seed=0)
    program = torch.export.export(case.module(), case.args())
    rewritten = surgery.rewrite(program, probe.needed())
    fn, _ = tvm_backend.compile_program(rewritten)
    levels = torchvision.ops.poolers.LevelMapper(2, 5)([boxes])
    assert set(levels.tolist()) == {0, 1, 2, 3}
    assert_equivalent(fn(*case.args())[0], case.reference(), context="TVM")


def test_multiscale_roi_align_as_shipped_pools_fine_levels_from_taps(probe):
    """The same pooler on maps where roi_align_taps takes the three finest levels (7x7 bins on
    64x80, 32x40 and 16x20: work ratios 51, 14 and 4.1) and roi_align_separable the coarsest
    (8x10: 1.3), built as shipped (speed rewrites, our schedules): TVM matches the eager module."""
    case, _ = _box_pooler_case(256, 320, seed=1)
    program = torch.export.export(case.module(), case.args())
    rewritten, replaced = tvm_backend.speed_rewrites(surgery.rewrite(program, probe.needed()))
    assert replaced["roi_align_taps"] == {"torchvision.roi_align.default": 3}
    assert replaced["roi_align_separable"] == {"torchvision.roi_align.default": 1}
    fn, _ = tvm_backend.compile_program(rewritten, schedules="ours")
    assert_equivalent(fn(*case.args())[0], case.reference(), context="TVM")


def test_deformable_attention_as_shipped_matches_eager(probe):
    """Multi-scale deformable attention as transformers' PyTorch path computes it (a grid sampler
    per level, stacked, weighted and summed), on samples inside, straddling and outside the
    maps: built as shipped, its off-map taps read an appended zero (masked_gather_padding), its
    taps are read with broadcast indices (gather_as_index) and weighted, and summed over the
    points, in the kernel that gathers them (no gather kernel of its own), its sum over levels
    is split per level (sum_over_concat), its taps are read as channels-last rows
    (channels_last_gathers), and TVM matches the eager module."""
    import torch.nn.functional as F
    import tvm

    from surgery import schedules

    shapes = [(6, 8), (3, 4)]

    class DeformableAttention(torch.nn.Module):
        def forward(self, value, locations, weights):
            heads, channels = value.shape[2], value.shape[3]
            queries, levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
            per_level = value.split([h * w for h, w in shapes], dim=1)
            grids = 2 * locations - 1
            samples = []
            for level, (h, w) in enumerate(shapes):
                v = per_level[level].flatten(2).transpose(1, 2).reshape(heads, channels, h, w)
                g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
                samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
            weights = weights.transpose(1, 2).reshape(heads, 1, queries, levels * points)
            out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1)  # [heads, channels, queries]
            return out.view(1, heads * channels, queries).transpose(1, 2).contiguous()

    generator = torch.Generator().manual_seed(0)
    tokens = sum(h * w for h, w in shapes)
    args = (
        torch.randn(1, tokens, 2, 4, generator=generator),
        torch.rand(1, tokens, 2, 2, 3, 2, generator=generator) * 1.4 - 0.2,
        torch.rand(1, tokens, 2, 2, 3, generator=generator),
    )
    program = surgery.rewrite(torch.export.export(DeformableAttention(), args), probe.needed())
    rewritten, replaced = tvm_backend.speed_rewrites(program)
    assert replaced["masked_gather_padding"] == {"aten.where of aten.gather": 8}  # 4 taps x 2 levels
    assert replaced["gather_as_index"] == {"aten.gather.default": 8}
    assert replaced["sum_over_concat"] == {"aten.sum.dim_IntList": 1}
    assert replaced["channels_last_gathers"] == {"aten.index.Tensor": 8}
    target = tvm_backend.host_target("ours")
    with target:
        mod = schedules.pipeline(target)(tvm_backend.import_program(rewritten))
    kernels = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    gathering = [name for name in kernels if "index_tensor" in name]
    assert len(gathering) == 2 and all(name.startswith("fused_") for name in gathering), kernels  # one a level
    assert all(name.endswith(("_sum", "_sum1")) for name in gathering), gathering  # with the sum over points
    fn, _ = tvm_backend.compile_program(rewritten, schedules="ours")
    assert_equivalent(fn(*args)[0], DeformableAttention()(*args), context="TVM")


def test_probe_finds_float_division_with_rounding_mode_fails_to_import(probe):
    # torch.div(x, 2, rounding_mode="floor") (Deformable DETR): the 2 becomes an int32 constant.
    finding = probe.findings["div_rounding"]
    assert finding.needed and "converter fails" in finding.reason
    assert "Binary operators must have the same datatype" in finding.reason


def test_probe_finds_arithmetic_of_booleans_fails_to_build(probe):
    # (anchors > eps) * (anchors < 1 - eps) (RT-DETR) imports, then LLVM code generation fails.
    finding = probe.findings["bool_arithmetic"]
    assert finding.needed and "converter fails" in finding.reason
    assert "MatchesCode(DLDataTypeCode::kDLFloat)" in finding.reason


def test_probe_is_cached(probe, tmp_path):
    first = tvm_backend.probe(cache_dir=tmp_path)
    again = tvm_backend.probe(cache_dir=tmp_path)
    assert again.cached and not first.cached and again.needed() == first.needed()


@pytest.mark.parametrize("name", list(REGISTRY))
def test_each_rewrite_output_runs_on_tvm(name, probe):
    """The rewritten probe case (the converter-bug case) imports, builds and matches on TVM,
    with the rewrites of what it emits where this TVM needs them (roi_align emits grid_sample):
    those whose operators the rewrite leaves in the program."""
    case = REGISTRY[name]().probe_case()
    program = torch.export.export(case.module(), case.args())
    emitted = surgery.op_census(surgery.rewrite(program, name))
    names = [name] + [
        other
        for other, cls in REGISTRY.items()
        if other != name and probe.findings[other].needed and any(str(op) in emitted for op in cls().targets())
    ]
    program = surgery.rewrite(program, names)
    fn, _ = tvm_backend.compile_program(program)
    assert_equivalent(fn(*case.args())[0], case.reference(), scale=case.scale, context=name)


SHAPES = [PromptShape(points=8, boxes=4, batch=2), PromptShape(points=8, boxes=4, batch=1)]


@pytest.fixture(scope="module")
def compiled(probe):
    """One export, rewrite and TVM build per shape, reused by every hypothesis example."""
    encoder = build_geometry_encoder(seed=0)
    out = {}
    for shape in SHAPES:
        wrapper = GeometryEncoderWrapper(encoder, shape.feat_size).eval()
        with torch.no_grad():
            program = torch.export.export(wrapper, example_inputs(shape))
        rewritten = surgery.rewrite(program, probe.needed())
        fn, _ = tvm_backend.compile_program(rewritten)
        # What surgery ships: speed rewrites and our schedules, as one graph and as the
        # image/prompt split (image stage once per image, prompt stage per prompt).
        one_call, _ = tvm_backend.speed_rewrites(rewritten)
        shipped, _ = tvm_backend.compile_program(one_call, schedules="ours")
        split_program, _ = tvm_backend.speed_rewrites(rewritten, IMAGE_INPUTS)
        staged = hoist(split_program.run_decompositions(), IMAGE_INPUTS, example_inputs(shape))
        image_fn, _ = tvm_backend.compile_program(staged.stage, schedules="ours")
        prompt_fn, _ = tvm_backend.compile_program(staged.rest, schedules="ours")
        out[shape] = (
            wrapper,
            rewritten.module(),
            {
                "TVM default": fn,
                "TVM shipped, one call": shipped,
                "TVM shipped, image+prompt": staged.compose(image_fn, prompt_fn),
            },
        )
    return out


def _whole_model_examples():
    return max(5, settings.default.max_examples // 100)


@pytest.mark.sam3
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"batch{s.batch}")
def test_whole_model_original_rewritten_tvm_agree(compiled, shape):
    wrapper, rewritten, tvm_fns = compiled[shape]

    @settings(max_examples=_whole_model_examples(), deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(prompt_inputs(shape))
    def check(args):
        event(f"valid points {sorted((~args[2]).sum(1).tolist())}, valid boxes {sorted((~args[5]).sum(1).tolist())}")
        with torch.no_grad():
            embeds, mask = wrapper(*args)
            r_embeds, r_mask = rewritten(*args)
        assert torch.equal(r_mask, mask)
        assert_equivalent(r_embeds, embeds, context="rewritten PyTorch")
        for label, tvm_fn in tvm_fns.items():
            t_embeds, t_mask = tvm_fn(*args)
            assert torch.equal(t_mask, mask), label
            assert_equivalent(t_embeds, embeds, context=label)

    check()


@pytest.mark.sam3
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"batch{s.batch}")
def test_points_on_the_image_corner(compiled, shape):
    """Hypothesis's shrunk counterexample, kept: every point at (0, 0), boxes all masked out.
    With FMA contraction on (LLVM's a*b+c -> fma under TVM) the compiled encoder was 0.0096
    off here; the shipped target turns FMA off (surgery.tvm_backend.host_target)."""
    wrapper, _, tvm_fns = compiled[shape]
    B = shape.batch
    args = list(example_inputs(shape, seed=1, valid_points=[3, 8][:B], valid_boxes=[0] * B))
    args[0] = torch.zeros_like(args[0])  # [Np, B, 2] points on the corner
    with torch.no_grad():
        embeds, mask = wrapper(*args)
    for label, tvm_fn in tvm_fns.items():
        t_embeds, t_mask = tvm_fn(*args)
        assert torch.equal(t_mask, mask), label
        assert_equivalent(t_embeds, embeds, context=label)


class _Prompted(torch.nn.Module):
    """A small module with all three troublesome operators, as a notebook user might bring."""

    def forward(self, feats, points, boxes):
        import torchvision

        sampled = torch.nn.functional.grid_sample(feats, points * 2 - 1, align_corners=False)  # [1, C, P, 1]
        pooled = torchvision.ops.roi_align(feats, [boxes * 8], 2).mean((2, 3))  # [K, C]
        table = torch.zeros(6, feats.shape[1]).scatter(0, torch.arange(2)[:, None].expand(2, feats.shape[1]), pooled)
        return sampled[0, :, :, 0].T @ table.T  # [P, 6]


def test_notebook_flow_on_your_own_module(tmp_path):
    from surgery.pipeline import ModelSpec, operate

    args = (torch.randn(1, 3, 8, 8), torch.rand(1, 4, 1, 2), torch.tensor([[0.1, 0.2, 0.6, 0.9], [0.0, 0.0, 1.0, 1.0]]))
    spec = ModelSpec.from_module("prompted", _Prompted(), args)
    result = operate(spec, rewrites="all", examples=10, out_dir=tmp_path, progress=lambda m: None)
    assert result.passed, result.report.failures
    # the three operators, plus what the scatter rewrite's replacement needs on older TVMs
    assert set(result.report.rewrites["applied"]) - {"full_like", "where_scalar"} == {
        "roi_align",
        "grid_sample",
        "scatter",
    }
    assert_equivalent(result.tvm(*args)[0], _Prompted()(*args))
    assert_equivalent(result.rewritten_module(*args), _Prompted()(*args))
    assert (tmp_path / "prompted.tvm.so").is_file() and (tmp_path / "prompted.rewritten.pt2").is_file()
