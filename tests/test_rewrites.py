"""Unit tests: the rewrite API, each rewrite's edges and choices, and the comparison metrics."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import assert_identical

import surgery
from surgery.equivalence import assert_equivalent, compare, ulp_distance
from surgery.rewrites import RewriteError
from surgery.rewrites.grid_sample import grid_sample
from surgery.rewrites.roi_align import RoiAlignToGridSample, roi_align
from surgery.rewrites.scatter import ScatterTooLarge, ScatterToSelect, scatter


class AllThree(torch.nn.Module):
    def forward(self, x, boxes, grid, index, src):
        pooled = torchvision.ops.roi_align(x, boxes, (3, 3), 0.5, -1, True)  # [K, C, 3, 3]
        sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        table = src.new_zeros(4, 6)
        table.scatter_(1, index, src)  # in place: a training-IR graph keeps scatter_
        return pooled, sampled, table


def all_three_args():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 10, 8, generator=g)
    boxes = torch.tensor([[0, 1.0, 2, 9, 15], [1, -3, -2, 4, 4], [0, 10, 10, 10, 10]])
    grid = torch.rand(2, 4, 5, 2, generator=g) * 2.4 - 1.2
    index = torch.tensor([[0, 1], [2, 3], [4, 5], [1, 0]])
    src = torch.randn(4, 2, generator=g)
    return x, boxes, grid, index, src


@pytest.fixture(scope="module")
def program():
    return torch.export.export(AllThree(), all_three_args())


def test_rewrite_removes_all_and_matches(program):
    rewritten = surgery.rewrite(program)
    census = surgery.op_census(rewritten)
    assert not any("roi_align" in op or "grid_sampler" in op or "scatter" in op for op in census), census
    for a, b in zip(rewritten.module()(*all_three_args()), program.module()(*all_three_args())):
        assert_equivalent(a, b, scale=4.0)


def test_rewritten_program_saves_and_loads(program, tmp_path):
    path = tmp_path / "rewritten.pt2"
    torch.export.save(surgery.rewrite(program), path)
    loaded = torch.export.load(path)
    for a, b in zip(loaded.module()(*all_three_args()), program.module()(*all_three_args())):
        assert_equivalent(a, b, scale=4.0)


def test_order_is_canonical_whatever_the_caller_says(program):
    _, log = surgery.rewrite_with_log(program, ["grid_sample", "roi_align"])
    assert [rw.name for rw, _ in log] == ["roi_align", "grid_sample"]
    # roi_align emits a grid sampler; grid_sample ran after it, so none is left.
    assert not any("grid_sampler" in op for op in surgery.op_census(log[-1][1].program))


def test_graph_rewrites_share_one_copy_of_the_graph_with_the_same_result():
    """Graph rewrites in a row edit one copy of the graph (values refreshed by fake-tensor
    propagation, no retrace between them) and give what applying them one by one gives."""

    class Product(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(64, 256) / 8, requires_grad=False)

        def forward(self, x):  # x [12, 1, 64]
            rows = x.permute(1, 0, 2).reshape(12, 64)  # [12, 64], the source's memory order
            return torch.relu(rows @ self.weight)  # [12, 256]

    x, module = torch.randn(12, 1, 64), Product()
    program = torch.export.export(module, (x,))
    names = ["layout_round_trips", "matmul_packing"]
    assert [[rw.name for rw in group] for group in surgery._sharing_a_retrace(surgery.rewrites.resolve(names))] == [
        names
    ]
    together, log = surgery.rewrite_with_log(program, names)
    assert dict(log[1][1].replaced) == {"matrix products": 1}
    one_by_one = program
    for rw in surgery.rewrites.resolve(names):
        one_by_one = rw(one_by_one).program
    assert surgery.op_census(together) == surgery.op_census(one_by_one)
    assert torch.equal(together.module()(x), one_by_one.module()(x))
    scale = float((x.abs().squeeze(1) @ module.weight.abs()).max())
    assert_equivalent(together.module()(x), program.module()(x), scale=scale)


def test_graph_rewrites_keep_an_input_named_like_a_builtin():
    """``nn.Sequential.forward(input)``: copying the graph renames the placeholder ``input``; the
    rewritten program still validates and computes what the original does."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU()).eval()
    x = torch.randn(12, 64)
    program = torch.export.export(module, (x,))
    assert program.graph_signature.user_inputs == ("input",)
    rewritten, log = surgery.rewrite_with_log(program, ["matmul_packing"])
    assert dict(log[0][1].replaced) == {"matrix products": 1}
    rewritten.validate()
    assert_equivalent(rewritten.module()(x), module(x), scale=float((x.abs() @ module[0].weight.abs().T).max()) + 1)


@pytest.mark.parametrize("columns, padded", [(116, 128), (232, 240), (24, None), (128, None)])
def test_matmul_packing_pads_a_weights_columns_to_whole_vectors_where_cheap(columns, padded):
    """A linear layer of 116 or 232 outputs (whole 4-float vectors, not 16-float ones) is packed
    with zero columns up to 128 or 240 and its result sliced back; 24 (a third more) and 128 keep
    their columns. The program computes what the original does, bias included."""
    torch.manual_seed(0)
    module = torch.nn.Linear(64, columns).eval()
    x = torch.randn(12, 64)
    rewritten, log = surgery.rewrite_with_log(torch.export.export(module, (x,)), ["matmul_packing"])
    census = surgery.op_census(rewritten)
    assert census["aten.constant_pad_nd.default"] == (padded is not None)
    if padded is not None:
        [panels] = [n.meta["val"].shape for n in rewritten.graph.nodes if n.target is torch.ops.aten.bmm.default]
        assert panels[0] * panels[2] == padded and panels[2] % 16 == 0, panels
    assert_equivalent(rewritten.module()(x), module(x), scale=float((x.abs() @ module.weight.abs().T).max()) + 1)


def test_table_rewrites_share_one_retrace_with_the_same_result(program):
    """roi_align, grid_sample, scatter, ... applied in one run_decompositions give the program
    that applying them one after another gives; each counts the calls of the program as given."""
    names = ["roi_align", "grid_sample", "scatter", "full_like", "where_scalar"]
    assert [[rw.name for rw in group] for group in surgery._sharing_a_retrace(surgery.rewrites.resolve(names))] == [
        names
    ]
    together, log = surgery.rewrite_with_log(program, names)
    one_by_one = program
    for rw in surgery.rewrites.resolve(names):
        one_by_one = rw(one_by_one).program
    assert surgery.op_census(together) == surgery.op_census(one_by_one)
    for a, b in zip(together.module()(*all_three_args()), one_by_one.module()(*all_three_args())):
        assert torch.equal(a, b)
    given = surgery.op_census(program)
    assert dict(log[1][1].replaced) == {"aten.grid_sampler.default": given["aten.grid_sampler.default"]}
    assert all(result.program is together for _, result in log)


def test_roi_align_alone_leaves_its_grid_sampler(program):
    census = surgery.op_census(surgery.rewrite(program, "roi_align"))
    assert "torchvision.roi_align.default" not in census
    assert census["aten.grid_sampler.default"] == 2  # the model's own, and roi_align's


def test_inplace_scatter_is_rewritten_alone(program):
    assert "aten.scatter_.value" in surgery.op_census(program) or "aten.scatter_.src" in surgery.op_census(program)
    census = surgery.op_census(surgery.rewrite(program, ["scatter"]))
    assert not any("scatter" in op for op in census), census


def test_rewrite_reports_untouched_program():
    class Plain(torch.nn.Module):
        def forward(self, x):
            return x + 1

    ep = torch.export.export(Plain(), (torch.ones(2),))
    _, log = surgery.rewrite_with_log(ep)
    assert [rw.name for rw, _ in log] == list(surgery.REGISTRY)
    assert not any(res.modified for _, res in log)


def test_unknown_rewrite_lists_known_ones(program):
    with pytest.raises(
        RewriteError,
        match="unknown rewrite 'roialign'; known rewrites: row_dispatch, roi_align, grid_sample, scatter, floor_divide, "
        "div_rounding, bool_arithmetic, full_like, where_scalar, negative_index",
    ):
        surgery.rewrite(program, ["roialign"])


def test_rewrite_rejects_non_programs():
    with pytest.raises(TypeError, match="expects a torch.export.ExportedProgram"):
        surgery.rewrite(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------ roi_align


def test_roi_align_list_boxes_and_empty():
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    boxes = [torch.tensor([[0.0, 0, 3, 3]], dtype=torch.float64), torch.zeros(0, 4, dtype=torch.float64)]
    assert_equivalent(roi_align(x, boxes, 2), torchvision.ops.roi_align(x, boxes, 2))
    empty = torch.zeros(0, 5, dtype=torch.float64)
    assert roi_align(x, empty, (2, 3)).shape == (0, 2, 2, 3)


def test_roi_align_contract_edge():
    """Exact up to the bound, an error one step beyond it (default bound: ceil(H/PH) = 3)."""
    x = torch.randn(1, 2, 9, 9, dtype=torch.float64)
    at_edge = torch.tensor([[0, 0.0, 0.0, 9.0, 9.0]], dtype=torch.float64)  # 9/3 = 3 samples per bin
    assert_equivalent(roi_align(x, at_edge, 3, aligned=True), torchvision.ops.roi_align(x, at_edge, 3, aligned=True))
    beyond = torch.tensor([[0, 0.0, 0.0, 9.0 + 1e-9, 9.0]], dtype=torch.float64)  # needs 4 along x
    with pytest.raises(
        ValueError, match=r"needs 3x4 samples per bin, beyond the static bound 3x3.*max_samples_per_bin=\(3, 4\)"
    ):
        roi_align(x, beyond, 3, aligned=True)
    # With the bound raised as the message says, the same box is exact.
    assert_equivalent(
        roi_align(x, beyond, 3, aligned=True, max_samples_per_bin=(3, 4)),
        torchvision.ops.roi_align(x, beyond, 3, aligned=True),
    )


def test_roi_align_graph_caps_beyond_bound():
    """A rewritten graph can't raise on data: beyond the bound it pools with the bound's samples."""
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    big = torch.tensor([[0, -10.0, -10.0, 30.0, 30.0]], dtype=torch.float64)  # 40 px: needs 10 per bin

    class M(torch.nn.Module):
        def forward(self, x, b):
            return torchvision.ops.roi_align(x, b, 4, 1.0, -1, False)

    rewritten = surgery.rewrite(
        torch.export.export(M(), (x, big)), [RoiAlignToGridSample(max_samples_per_bin=3), "grid_sample"]
    )
    capped = torchvision.ops.roi_align(x, big, 4, 1.0, 3, False)
    assert_equivalent(rewritten.module()(x, big), capped)
    assert compare(rewritten.module()(x, big), torchvision.ops.roi_align(x, big, 4)).max_abs > 1e-6


def test_why_not_torchvision_pure_python_roi_align():
    """torchvision's _roi_align lacks the kernel's rule that samples beyond -1 contribute 0."""
    from torchvision.ops.roi_align import _roi_align

    x = torch.randn(1, 1, 6, 6, dtype=torch.float64)
    rois = torch.tensor([[0, -5.0, -5.0, 2.0, 2.0]], dtype=torch.float64)
    kernel = torchvision.ops.roi_align(x, rois, 2, 1.0, 2, False)
    python = _roi_align.__wrapped__(x, rois, 1.0, 2, 2, 2, False)
    assert compare(python, kernel).max_abs > 1e-3
    assert_equivalent(roi_align(x, rois, 2, 1.0, 2, False), kernel)


# ------------------------------------------------------------------ grid_sample


def test_why_not_torch_decomp_grid_sampler():
    """torch._decomp masks the weight, not the value: inf at pixel (0, 0) leaks into zero padding."""
    from torch._decomp.decompositions import grid_sampler_2d

    x = torch.randn(1, 1, 4, 4)
    x[0, 0, 0, 0] = float("inf")
    grid = torch.full((1, 1, 1, 2), 5.0)  # far outside: grid_sample gives 0
    assert F.grid_sample(x, grid, align_corners=False).item() == 0.0
    assert torch.isnan(grid_sampler_2d(x, grid, 0, 0, False)).all()
    assert grid_sample(x, grid).item() == 0.0


def test_grid_sample_refuses_unknown_modes():
    x, grid = torch.randn(1, 1, 3, 3), torch.zeros(1, 2, 2, 2)
    with pytest.raises(ValueError, match="mode must be one of"):
        grid_sample(x, grid, mode="area")
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        grid_sample(x, grid, padding_mode="wrap")


def test_grid_sampler_3d_is_left_alone():
    class M(torch.nn.Module):
        def forward(self, x, g):
            return F.grid_sample(x, g, align_corners=False)

    x, g = torch.randn(1, 2, 3, 4, 5), torch.rand(1, 2, 2, 2, 3) * 2 - 1
    rewritten = surgery.rewrite(torch.export.export(M(), (x, g)))
    assert_equivalent(rewritten.module()(x, g), M()(x, g))


# ------------------------------------------------------------------ scatter


def scatter_loop(input, dim, index, src):
    """Reference for duplicate indices: a serial loop, later entries overwrite earlier ones."""
    out = input.clone()
    for pos in torch.cartesian_prod(*[torch.arange(n) for n in index.shape]).reshape(-1, index.dim()).tolist():
        target = list(pos)
        target[dim] = int(index[tuple(pos)])
        out[tuple(target)] = src[tuple(pos)] if isinstance(src, torch.Tensor) else src
    return out


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_scatter_duplicates_last_entry_wins(dim):
    g = torch.Generator().manual_seed(dim + 5)
    input = torch.randn(4, 5, generator=g)
    index = torch.randint(0, input.shape[dim], (3, 4), generator=g)  # duplicates along dim
    src = torch.randn(4, 5, generator=g)
    assert torch.equal(scatter(input, dim, index, src), scatter_loop(input, dim % 2, index, src))


def test_scatter_nan_and_inf_come_through_exactly():
    input = torch.tensor([1.0, float("nan"), 3.0, float("-inf")])
    src = torch.tensor([float("inf"), float("nan"), -0.0])
    index = torch.tensor([2, 0, 3])
    expected = torch.scatter(input, 0, index, src)
    actual = scatter(input, 0, index, src)
    assert torch.equal(actual.isnan(), expected.isnan())
    assert torch.equal(actual[~actual.isnan()], expected[~expected.isnan()])
    assert torch.signbit(actual[3]) and actual[3] == 0  # -0.0 kept


def test_scatter_refuses_huge_intermediates():
    input, index = torch.zeros(4, 10_000), torch.zeros(4, 10_000, dtype=torch.int64)
    with pytest.raises(ScatterTooLarge, match="400,000,000 elements .* above the limit of 67,108,864"):
        scatter(input, 1, index, 1.0)

    class M(torch.nn.Module):
        def forward(self, x, i):
            return x.scatter(1, i, 1.0)

    with pytest.raises(ScatterTooLarge):
        surgery.rewrite(torch.export.export(M(), (input, index)))
    small = ScatterToSelect(max_intermediate_elements=10)
    with pytest.raises(ScatterTooLarge):
        surgery.rewrite(torch.export.export(M(), (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int64))), [small])


def test_scatter_eager_checks_index_range():
    with pytest.raises(IndexError, match=r"index out of range \[0, 3\)"):
        scatter(torch.zeros(3), 0, torch.tensor([3]), 1.0)


def test_scatter_scalar_tensor_and_value_casts():
    assert torch.equal(scatter(torch.tensor(5.0), 0, torch.tensor(0), torch.tensor(2.0)), torch.tensor(2.0))
    ints = torch.zeros(3, dtype=torch.int64)
    assert torch.equal(scatter(ints, 0, torch.tensor([1]), 2.7), torch.scatter(ints, 0, torch.tensor([1]), 2.7))


# ------------------------------------------------------------------ metrics


def test_ulp_distance_counts_representable_floats():
    a = torch.tensor([1.0, -0.0, 1e-30, -2.0], dtype=torch.float32)
    b = torch.nextafter(a, torch.tensor(float("inf")))
    assert ulp_distance(a, b).tolist() == [1, 1, 1, 1]
    assert ulp_distance(torch.tensor([-1e-45]), torch.tensor([1e-45])).item() == 2


def test_compare_flags_what_differs():
    ref = torch.tensor([1.0, float("nan"), float("inf")], dtype=torch.float64)
    assert compare(ref.clone(), ref).within_bounds()
    assert not compare(torch.tensor([1.0, 0.0, float("inf")], dtype=torch.float64), ref).within_bounds()
    assert not compare(
        torch.tensor([1.0 + 1e-11, float("nan"), float("inf")], dtype=torch.float64), ref
    ).within_bounds()
    assert compare(ref[:2], ref).shape_mismatch
    f32 = torch.zeros(3)
    assert not compare(f32 + 2e-5, f32).within_bounds() and compare(f32 + 5e-6, f32).within_bounds()
    with pytest.raises(AssertionError, match="not equivalent"):
        assert_equivalent(f32 + 1, f32)


# ------------------------------------------------------------------ negative_index


class _Indexed(torch.nn.Module):
    """RT-DETR's ``outputs_class[:, -1]``, an index tensor of unknown sign, and index tensors
    known to be non-negative (topk's indices, arange)."""

    def forward(self, x, i):
        _, top = x.sum(2).topk(2, dim=1)  # [B, 2]
        return x[:, -1], x[:, 1], x[:, i], x[:, top], x[torch.arange(2), 3]


def test_negative_index_normalises_only_what_may_be_negative():
    from surgery.locate import rewrites_replacing

    x, i = torch.randn(2, 5, 4), torch.tensor([-1, 0, -3])
    program = torch.export.export(_Indexed(), (x, i))
    select = next(n for n in program.graph.nodes if n.target is torch.ops.aten.select.int and n.args[2] == -1)
    assert rewrites_replacing(select) == ["negative_index"]
    rewritten, log = surgery.rewrite_with_log(program, ["negative_index"])
    assert dict(log[0][1].replaced) == {"aten.select.int": 1, "aten.index.Tensor": 1}
    assert surgery.op_census(rewritten)["aten.where.self"] == 1  # i only: topk and arange left alone
    for a, b in zip(rewritten.module()(x, i), _Indexed()(x, i)):
        assert torch.equal(a, b)
    again, log = surgery.rewrite_with_log(rewritten, ["negative_index"])
    assert not log[0][1].modified and again is rewritten  # its own normalisation is known non-negative


def test_negative_index_looks_in_core_aten():
    """torch.take accepts negative indices and is index.Tensor only once decomposed, as TVM's
    importer decomposes it; a program with nothing to normalise comes back in core ATen, uncopied."""

    class Take(torch.nn.Module):
        def forward(self, x, i):
            return torch.take(x, i), x[:, 1]

    x, i = torch.randn(3, 4), torch.tensor([-1, 2, -12])
    program = torch.export.export(Take(), (x, i))
    rewritten, log = surgery.rewrite_with_log(program, ["negative_index"])
    assert dict(log[0][1].replaced) == {"aten.index.Tensor": 1}
    assert all(torch.equal(a, b) for a, b in zip(rewritten.module()(x, i), Take()(x, i)))
    core = torch.export.export(Take(), (x, i)).run_decompositions()
    core = surgery.rewrite(core, ["negative_index"])  # i normalised: nothing left to do
    assert surgery.rewrite(core, ["negative_index"]) is core


# ------------------------------------------------------------------ floor_divide


def test_floor_divide_overflowing_quotients():
    """torch's own vectorized fmod (the rewrite's basis) returns NaN when a / b overflows, where
    floor_divide returns inf: the rewrite handles that case apart. 18 elements: vectorized path."""
    from surgery.rewrites.floor_divide import floor_divide

    a = torch.tensor([1.0, -3.0, 10.0, 1e-40, -1e-40, 3e-41] * 3)
    b = torch.tensor([1e-42, 1e-42, 2.7794e-38, 1e-42, 3e-42, 1.1e-42] * 3)
    assert torch.isnan(torch.fmod(a, b)[:3]).all()
    assert torch.equal(floor_divide(a, b), torch.floor_divide(a, b))
    assert torch.equal(floor_divide(a, b)[:3], torch.tensor([float("inf"), float("-inf"), float("inf")]))


def test_floor_divide_rounds_like_pytorch_not_like_floor_of_quotient():
    from surgery.rewrites.floor_divide import floor_divide

    a, b = torch.tensor([1.0], dtype=torch.float64), 0.1
    assert torch.floor(a / b).item() == 10.0 and torch.floor_divide(a, b).item() == 9.0
    assert floor_divide(a, b).item() == 9.0


# ------------------------------------------------------------------ div_rounding

NONFINITE = [float("inf"), float("-inf"), float("nan")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rounding_mode", ["floor", "trunc"])
def test_div_rounding_edges_are_bit_exact(rounding_mode, dtype):
    """Signed zeros, inf, NaN, division by zero (number and tensor), subnormals, quotients that
    overflow, near multiples; 18+ elements, so PyTorch takes its vectorized path."""
    from surgery.rewrites.div_rounding import div_rounding

    a = torch.tensor(
        [-0.5, 0.5, -0.0, 0.0, 1.0, -1.0, 7.0, -7.0, 1e-45, -3e-41, 1e30, 0.3, *NONFINITE] * 2, dtype=dtype
    )
    tensor_divisors = [
        torch.tensor([2.0, -2.0, 3.0, -3.0, 0.1, 0.1, 0.0, -0.0, 1e-42, 1e-42, 1e-30, 0.1, 2.0, -0.0, 1.0] * 2),
        torch.tensor(2),
        torch.tensor(-0.0, dtype=torch.float64),
    ]
    for b in [2, -2, 0, 0.1, -0.3, 0.0, -0.0, float("inf"), *[t.to(dtype) if t.ndim else t for t in tensor_divisors]]:
        assert_identical(div_rounding(a, b, rounding_mode), torch.div(a, b, rounding_mode=rounding_mode), f"{b!r}")


def test_div_rounding_known_values():
    from surgery.rewrites.div_rounding import div_rounding

    def div(a, b, mode):
        return div_rounding(torch.tensor([a]), b, mode).item()

    assert div(1.0, 0.1, "floor") == 9.0 and torch.floor(torch.tensor([1.0]) / 0.1).item() == 10.0
    assert div(-0.5, 2, "trunc") == 0.0 and math.copysign(1, div(-0.5, 2, "trunc")) == -1  # -0.0
    assert div(-0.5, 2, "floor") == -1.0
    assert div(-7.0, 2, "trunc") == -3.0 and div(-7.0, 2, "floor") == -4.0
    assert div(1.0, 0, "trunc") == math.inf and div(-1.0, 0.0, "floor") == -math.inf
    assert math.isnan(div(0.0, 0, "trunc")) and math.isnan(div(0.0, -0.0, "floor"))


class _Divisions(torch.nn.Module):
    def forward(self, x, y, i):
        return (
            torch.div(x, 2, rounding_mode="floor"),  # Deformable DETR: div.Tensor_mode
            x // 2,  # floor_divide, the floor_divide rewrite's
            torch.div(x, y, rounding_mode="trunc"),
            torch.div(i, 2, rounding_mode="floor"),  # integer: left alone
            torch.div(x, y, rounding_mode=None),  # true division: left alone
            torch.div(x.half(), 3, rounding_mode="trunc"),  # reduced precision: left alone
            x.clone().div_(y, rounding_mode="floor"),  # in place
        )


def test_div_rounding_takes_float_floor_and_trunc_only():
    args = (torch.tensor([1.0, -0.5, 7.0, -0.0]), torch.tensor([0.1, 2.0, -2.0, 3.0]), torch.tensor([7, -7, 3, 0]))
    program = torch.export.export(_Divisions(), args)
    census = surgery.op_census(program)
    assert census["aten.div.Tensor_mode"] == 5 and census["aten.floor_divide.default"] == 1
    assert census["aten.div_.Tensor_mode"] == 1
    rewritten, log = surgery.rewrite_with_log(program, ["div_rounding"])
    assert dict(log[0][1].replaced) == {"aten.div.Tensor_mode": 2, "aten.div_.Tensor_mode": 1}
    after = surgery.op_census(rewritten)
    assert after["aten.div.Tensor_mode"] == 3 and after["aten.floor_divide.default"] == 1
    for actual, expected in zip(rewritten.module()(*args), _Divisions()(*args)):
        assert_identical(actual, expected)


# ------------------------------------------------------------------ bool_arithmetic


class _Masks(torch.nn.Module):
    """RT-DETR's anchor valid mask among float, integer and mixed products and sums."""

    def forward(self, anchors, weight, counts):
        valid = (anchors > 0.01) * (anchors < 0.99)  # bool * bool
        either = (anchors > 0.5) + (weight > 0)  # bool + bool
        scaled = anchors * weight + weight  # float
        masked = anchors * valid  # float * bool
        counted = counts * valid + counts  # int * bool, int + int
        flagged = valid * True  # bool * number: TVM builds it, left alone
        kept = torch.add(valid, either, alpha=0)  # alpha 0: valid itself, left alone
        return valid, either, scaled, masked, counted, flagged, kept, torch.maximum(valid, either)


def test_bool_arithmetic_replaces_only_boolean_operands():
    g = torch.Generator().manual_seed(0)
    args = (torch.rand(6, 4, generator=g), torch.randn(6, 4, generator=g), torch.arange(24).reshape(6, 4))
    program = torch.export.export(_Masks(), args)
    before = surgery.op_census(program)
    rewritten, log = surgery.rewrite_with_log(program, ["bool_arithmetic"])
    assert dict(log[0][1].replaced) == {"aten.add.Tensor": 1, "aten.maximum.default": 1, "aten.mul.Tensor": 1}
    after = surgery.op_census(rewritten)
    assert after["aten.mul.Tensor"] == before["aten.mul.Tensor"] - 1 == 4
    assert after["aten.add.Tensor"] == before["aten.add.Tensor"] - 1 == 3
    assert after["aten.logical_and.default"] == 1 and after["aten.logical_or.default"] == 2
    for actual, expected in zip(rewritten.module()(*args), _Masks()(*args)):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected)


def test_bool_arithmetic_follows_pytorch_alpha():
    """a + alpha * b of booleans is a | b for any non-zero alpha, a for alpha 0."""
    from surgery.rewrites.bool_arithmetic import bool_arithmetic

    a = torch.tensor([True, True, False, False])
    b = torch.tensor([True, False, True, False])
    for alpha in [True, 1, 2, -1]:
        assert torch.equal(torch.add(a, b, alpha=alpha), bool_arithmetic("add", a, b))
    assert torch.equal(torch.add(a, b, alpha=0), a)
    with pytest.raises(RuntimeError, match="Subtraction.*bool tensors is not supported"):
        torch.sub(a, b)  # nothing to rewrite


def test_inplace_bool_product_is_rewritten():
    class InPlace(torch.nn.Module):
        def forward(self, x):
            mask = x > 0
            mask.mul_(x < 1)
            return mask

    x = torch.tensor([-1.0, 0.5, 2.0, 0.0])
    program = torch.export.export(InPlace(), (x,))
    assert surgery.op_census(program)["aten.mul_.Tensor"] == 1
    rewritten = surgery.rewrite(program, ["bool_arithmetic"])
    assert not any(op.startswith("aten.mul") for op in surgery.op_census(rewritten))
    assert torch.equal(rewritten.module()(x), InPlace()(x))


# ------------------------------------------------------------------ full_like


def test_full_like_rewrites_multihead_attention_key_padding_mask():
    """nn.MultiheadAttention turns a bool key padding mask into a float one with
    zeros_like(mask, dtype=float).masked_fill(mask, -inf) (F._canonical_mask): the pattern some
    TVMs mis-convert. After the rewrite no *_like op is left and the outputs are bit-identical."""
    from surgery.rewrites.full_like import FullLikeToFull

    attention = torch.nn.MultiheadAttention(8, 2).eval()

    class M(torch.nn.Module):
        def forward(self, x, mask):
            return attention(x, x, x, key_padding_mask=mask, need_weights=False)[0]

    x, mask = torch.randn(5, 2, 8), torch.tensor([[False] * 3 + [True] * 2, [False] * 5])
    program = torch.export.export(M(), (x, mask))
    assert surgery.op_census(program)["aten.zeros_like.default"] >= 1
    rewritten = surgery.rewrite(program, [FullLikeToFull()])
    census = surgery.op_census(rewritten)
    assert not any(op.endswith("_like.default") for op in census) and census["aten.full.default"] >= 1
    assert torch.equal(rewritten.module()(x, mask), program.module()(x, mask))


def test_full_like_keeps_dtype_and_shape_of_empty_and_scalar():
    from surgery.rewrites.full_like import full_like

    for input, value, dtype in [
        (torch.zeros(0, 3, dtype=torch.bool), float("-inf"), torch.float32),
        (torch.tensor(True), 7, torch.int64),
        (torch.ones(2, 2), -0.0, None),
    ]:
        expected = torch.full_like(input, value, dtype=dtype)
        actual = full_like(input, value, dtype=dtype)
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        assert torch.equal(actual, expected) and torch.equal(actual.signbit(), expected.signbit())


# ------------------------------------------------------------------ where_scalar


def test_where_scalar_follows_torch_type_promotion():
    from surgery.rewrites.where_scalar import where_scalar

    c = torch.tensor([[True, False, True]])
    for input, other in [
        (torch.tensor([1, 2, 3]), -1),
        (torch.tensor([1, 2, 3]), -1.5),
        (torch.tensor([True]), 3),
        (torch.tensor([0.5], dtype=torch.float64), float("nan")),
        (2, torch.tensor([1, 2, 3], dtype=torch.int32)),
        (True, False),
        (1, 0),
        (1.0, 0),
        (-0.0, True),
    ]:
        expected = torch.where(c, input, other)
        actual = where_scalar(c, input, other)
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, (input, other)
        assert torch.equal(actual.isnan(), expected.isnan()) if actual.is_floating_point() else True
        assert torch.equal(torch.nan_to_num(actual), torch.nan_to_num(expected))
        if actual.is_floating_point():
            assert torch.equal(actual.signbit(), expected.signbit())


def test_where_scalar_after_scatter_leaves_no_number_operand():
    """The scatter rewrite's replacement selects with where(match, position, -1); after
    where_scalar no where with a number operand is left and the results are unchanged."""

    class M(torch.nn.Module):
        def forward(self, x, index, src):
            return x.scatter(0, index, src)

    args = (torch.zeros(5, 3), torch.tensor([[1, 0, 4], [3, 2, 0]]), torch.randn(2, 3))
    program = torch.export.export(M(), args)
    scattered = surgery.rewrite(program, ["scatter"])
    assert surgery.op_census(scattered)["aten.where.ScalarOther"] >= 1
    rewritten = surgery.rewrite(program, ["scatter", "where_scalar"])
    census = surgery.op_census(rewritten)
    assert not any(op.startswith("aten.where.Scalar") for op in census), census
    assert torch.equal(rewritten.module()(*args), M()(*args))


# ------------------------------------------------------------------ row_dispatch


def _multiscale_boxes(generator, count: int, image_size) -> torch.Tensor:
    """Boxes of sqrt(area) 16-700 px (log-uniform: every FPN level), some straddling the image,
    the last one zero-area padding."""
    H, W = image_size
    size = torch.exp(torch.empty(count).uniform_(math.log(16), math.log(700), generator=generator))
    aspect = torch.empty(count).uniform_(0.5, 2.0, generator=generator).sqrt()
    x1 = torch.rand(count, generator=generator) * W - size / 4
    y1 = torch.rand(count, generator=generator) * H - size / 4
    boxes = torch.stack([x1, y1, x1 + size * aspect, y1 + size / aspect], dim=1)
    boxes[-1] = 0.0
    return boxes


def _has_unbacked_sizes(program) -> bool:
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    values = [n.meta.get("val") for n in program.graph.nodes]
    return bool(free_unbacked_symbols(list(program.range_constraints))) or any(
        free_unbacked_symbols(v) for v in values if v is not None
    )


@pytest.mark.slow
@pytest.mark.parametrize("output_size", [7, 14], ids=["box pooler 7x7", "mask pooler 14x14"])
def test_row_dispatch_rewrites_multiscale_roi_align_bit_exact(output_size):
    """torchvision's MultiScaleRoIAlign (Mask R-CNN's poolers) exports with nonzero and unbacked
    sizes; rewritten, static shapes only and the eager module's results bit for bit, on boxes
    drawn over every level."""
    from torchvision.ops.poolers import LevelMapper

    from surgery.rewrites.row_dispatch import MultiScaleModule

    image_size, generator = (128, 160), torch.Generator().manual_seed(0)
    pooler = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], output_size, 2)
    module = MultiScaleModule(pooler, 4, image_size)
    features = [torch.randn(1, 4, 128 // s, 160 // s, generator=generator) for s in (4, 8, 16, 32)]
    program = torch.export.export(module, (*features, _multiscale_boxes(generator, 12, image_size)))
    assert surgery.op_census(program)["aten.where.default"] == 4 and _has_unbacked_sizes(program)
    rewritten, log = surgery.rewrite_with_log(program, ["row_dispatch"])
    assert dict(log[0][1].replaced) == {"aten.index_put.default": 4, "aten.nonzero.default": 4}
    census = surgery.op_census(rewritten)
    assert census["torchvision.roi_align.default"] == 4 and census["aten.where.self"] == 4
    assert not {"aten.nonzero.default", "aten.index_put.default", "aten._assert_scalar.default"} & set(census)
    assert not _has_unbacked_sizes(rewritten)
    levels_seen = set()
    for _ in range(5):
        boxes = _multiscale_boxes(generator, 12, image_size)
        levels_seen |= set(LevelMapper(2, 5)([boxes]).tolist())
        assert torch.equal(
            rewritten.module()(*features, boxes),
            pooler({str(i): f for i, f in enumerate(features)}, [boxes], [image_size]),
        )
    assert levels_seen == {0, 1, 2, 3}


def test_row_dispatch_runs_before_roi_align():
    """With both, roi_align pools every box on every level, after row_dispatch: alone on the
    dispatched graph its replacement cannot be traced on an unbacked number of boxes."""
    from surgery.rewrites.row_dispatch import MultiScaleCase

    generator = torch.Generator().manual_seed(1)
    features = tuple(torch.randn(1, 2, 64 // s, 64 // s, generator=generator) for s in (4, 8, 16, 32))
    case = MultiScaleCase(features, (_multiscale_boxes(generator, 5, (64, 64)),), (64, 64), (2, 2), 1, ())
    program = torch.export.export(case.module(), case.args())
    rewritten, log = surgery.rewrite_with_log(program, ["roi_align", "row_dispatch"])
    assert [rw.name for rw, _ in log] == ["row_dispatch", "roi_align"]
    assert dict(log[1][1].replaced) == {"torchvision.roi_align.default": 4}
    assert "aten.nonzero.default" not in surgery.op_census(rewritten)
    assert_equivalent(rewritten.module()(*case.args()), case.reference())
    with pytest.raises(Exception, match="data-dependent"):
        surgery.rewrite(program, ["roi_align"])


def _dispatched(f, x, mask):
    from surgery.rewrites.row_dispatch import DispatchCase

    case = DispatchCase(x, mask, f)
    program = torch.export.export(case.module(), case.args())
    rewritten, log = surgery.rewrite_with_log(program, ["row_dispatch"])
    return case, rewritten, log[0][1]


_WEIGHT = torch.linspace(-1, 1, 12).reshape(3, 4)


@pytest.mark.parametrize(
    "f",
    [
        lambda r: 2 * r + 1,
        lambda r: (r * torch.tensor([1.0, -2.0, 0.5])).relu().sqrt(),  # operand broadcast along dim 0
        lambda r: torch.where(r > 0, r, r / 3).to(torch.float64),
        lambda r: r.view(r.shape[0], 3, 1).expand(-1, 3, 2).permute(0, 2, 1).clamp(-0.5, 0.5),
        lambda r: r[:, 1:] - r[:, :1],
    ],
    ids=["affine", "broadcast operand", "where and cast", "layout keeping dim 0", "columns"],
)
def test_row_dispatch_takes_row_wise_computations(f):
    x = torch.linspace(-2, 2, 7 * 3).reshape(7, 3).sin()
    case, rewritten, result = _dispatched(f, x, x[:, 0] > 0)
    assert dict(result.replaced) == {"aten.index_put.default": 1, "aten.nonzero.default": 1}
    assert "aten.nonzero.default" not in surgery.op_census(rewritten)
    for mask in (x[:, 0] > 0, torch.zeros(7, dtype=torch.bool), torch.ones(7, dtype=torch.bool)):
        assert_identical(rewritten.module()(x, mask), dataclasses.replace(case, mask=mask).reference())


def test_row_dispatch_takes_matrix_products_within_bounds():
    """linear on the selected rows: row-wise, though BLAS may sum a row's terms in another order
    for another number of rows (not bit-exact across row counts: measured)."""
    x = torch.linspace(-2, 2, 9 * 4).reshape(9, 4).cos()
    case, rewritten, result = _dispatched(lambda r: F.linear(r, _WEIGHT, torch.ones(3)), x, x[:, 1] > 0)
    assert result.modified and "aten.nonzero.default" not in surgery.op_census(rewritten)
    assert_equivalent(rewritten.module()(*case.args()), case.reference())


@pytest.mark.parametrize(
    "f",
    [
        lambda r: r.sum(0, keepdim=True).expand_as(r),
        lambda r: torch.softmax(r, dim=0),
        lambda r: r.cumsum(0),
        lambda r: r.flip(0),
        lambda r: r - r.mean(0),
        lambda r: r.exp(),  # row-wise, but vectorised and scalar exp may differ in the last bit
        lambda r: F.linear(r.T, torch.ones(r.shape[0], r.shape[0])).T,  # rows mixed by a product
        lambda r: r * r.shape[0],  # each row scaled by the number selected
    ],
    ids=["sum over rows", "softmax over rows", "cumsum over rows", "flip", "centred", "exp", "rows mixed", "count"],
)
def test_row_dispatch_leaves_non_row_wise_computations_alone(f):
    x = torch.linspace(-2, 2, 6 * 3).reshape(6, 3).sin()
    case, rewritten, result = _dispatched(f, x, x[:, 0] > 0)
    assert not result.modified
    assert surgery.op_census(rewritten)["aten.nonzero.default"] == 1
    assert torch.equal(rewritten.module()(*case.args()), case.reference())


def test_row_dispatch_leaves_accumulation_alone():
    class Accumulate(torch.nn.Module):
        def forward(self, x, mask):
            idx = torch.where(mask)[0]
            return torch.ones_like(x).index_put((idx,), 2 * x[idx], accumulate=True)

    x = torch.randn(5, 2)
    _, log = surgery.rewrite_with_log(torch.export.export(Accumulate(), (x, x[:, 0] > 0)), ["row_dispatch"])
    assert not log[0][1].modified


# ------------------------------------------------------------------ speed rewrites on deep graphs


def test_matmul_packing_finds_weights_behind_a_backbone_deep_chain():
    """A weight reaches its product through thousands of nodes in a backbone: found without
    recursion (Python's limit is 1,000 frames), and an activation is not taken for a weight."""
    from surgery.rewrites.matmul_packing import _weight_nodes

    graph = torch.fx.Graph()
    weight, activation = graph.placeholder("p_weight"), graph.placeholder("x")
    chain = weight
    for _ in range(5000):
        chain = graph.call_function(torch.ops.aten.add.Tensor, (chain, 1.0))
    product = graph.call_function(torch.ops.aten.mm.default, (activation, chain))
    graph.output(product)
    found = _weight_nodes(graph, {"p_weight"})
    assert chain in found and weight in found
    assert activation not in found and product not in found


def test_roi_align_separable_result_can_be_viewed_as_roi_align_s():
    """Mask R-CNN's box head flattens the pooled boxes with a view: the separable pooling's
    result must be laid out as roi_align's is."""

    class PoolFlatten(torch.nn.Module):
        def forward(self, x, boxes, padding):
            pooled = torchvision.ops.roi_align(x, boxes, 7, 0.25, 2)  # [K, C, 7, 7]
            return torch.where(padding[:, None, None, None], 0.0, pooled).flatten(1)  # [K, C*49]

    x = torch.randn(1, 8, 20, 24)
    boxes = torch.tensor([[0, 1.0, 2.0, 40.0, 30.0], [0, 10.0, 5.0, 90.0, 70.0]])
    args = (x, boxes, torch.tensor([False, True]))
    # decomposed, as the correctness rewrites leave it: the flatten is a view by then
    program = torch.export.export(PoolFlatten(), args).run_decompositions()
    rewritten = surgery.rewrites.SPEED_REWRITES["roi_align_separable"]()(program).program
    assert "torchvision.roi_align.default" not in surgery.op_census(rewritten)
    assert_equivalent(rewritten.module()(*args), PoolFlatten()(*args))


def test_roi_align_taps_takes_large_maps_and_leaves_small_ones_to_the_separable_form():
    """Mask R-CNN's FPN levels (7x7 and 14x14 bins, 2 samples, on 200x272 down to 25x34) are
    pooled from gathered taps; SAM3's adaptive 7x7 bins on 72x72 and an 8x8 map stay separable.
    Both forms in one program give roi_align's numbers, and the result can be viewed as
    roi_align's."""
    from surgery.rewrites.roi_align_taps import taps_cheaper

    assert taps_cheaper((1, 256, 200, 272), 14, 14, 2) and taps_cheaper((1, 256, 100, 136), 7, 7, 2)
    assert taps_cheaper((1, 256, 25, 34), 14, 14, 2) and taps_cheaper((1, 256, 25, 34), 7, 7, 2)
    assert not taps_cheaper((1, 256, 72, 72), 7, 7, 0) and not taps_cheaper((1, 256, 8, 8), 7, 7, 2)

    class TwoLevels(torch.nn.Module):
        def forward(self, fine, coarse, boxes):
            a = torchvision.ops.roi_align(fine, boxes, 7, 0.25, 2)  # [K, C, 7, 7], taps
            b = torchvision.ops.roi_align(coarse, boxes, 7, 0.015625, 2)  # [K, C, 7, 7], separable
            return (a + b).flatten(1)  # [K, C*49]

    torch.manual_seed(0)
    fine, coarse = torch.randn(1, 8, 96, 128), torch.randn(1, 8, 8, 8)
    boxes = torch.tensor([[0, 1.0, 2.0, 40.0, 30.0], [0, 100.0, 50.0, 390.0, 370.0], [0, -8.0, 300.0, 520.0, 390.0]])
    program = torch.export.export(TwoLevels(), (fine, coarse, boxes)).run_decompositions()
    rewritten, log = surgery.rewrite_with_log(program, ["roi_align_taps", "roi_align_separable"])
    assert [dict(result.replaced) for _, result in log] == [{"torchvision.roi_align.default": 1}] * 2
    assert "torchvision.roi_align.default" not in surgery.op_census(rewritten)
    assert_equivalent(rewritten.module()(fine, coarse, boxes), TwoLevels()(fine, coarse, boxes))


class _TwoStageHead(torch.nn.Module):
    """A two-stage DETR's query selection (RT-DETR's, as transformers writes it): every anchor
    scored and boxed, the best ``queries`` kept by topk, their boxes and features gathered."""

    def __init__(self, queries: int = 6):
        super().__init__()
        self.queries = queries
        self.enc_output = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16))
        self.score_head = torch.nn.Linear(16, 5)
        self.box_head = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))

    def forward(self, memory, anchors):  # [B, anchors, 16], [1, anchors, 4]
        output = self.enc_output(memory)
        scores = self.score_head(output)  # [B, anchors, 5]
        boxes = self.box_head(output) + anchors  # [B, anchors, 4]
        index = torch.topk(scores.max(-1).values, self.queries, dim=1).indices  # [B, queries]
        kept = boxes.gather(1, index.unsqueeze(-1).repeat(1, 1, 4))  # [B, queries, 4]
        target = output.gather(1, index.unsqueeze(-1).repeat(1, 1, 16))  # [B, queries, 16]
        return kept.sigmoid(), target


def test_gathered_rows_only_boxes_just_the_anchors_a_two_stage_detr_keeps():
    """The box head runs on the 6 kept anchors, not the 40 (the anchors gathered to match); the
    score head and the features both heads read stay whole; the same numbers within the bound."""
    torch.manual_seed(0)
    module = _TwoStageHead().eval()
    args = (torch.randn(2, 40, 16), torch.randn(1, 40, 4))
    program = torch.export.export(module, args).run_decompositions()
    rewritten, log = surgery.rewrite_with_log(program, ["gathered_rows_only"])
    assert dict(log[0][1].replaced) == {"aten.gather.default": 1}
    rows = sorted(
        node.meta["val"].shape[0] for node in rewritten.graph.nodes if node.target is torch.ops.aten.addmm.default
    )
    assert rows == [2 * 6, 2 * 6, 2 * 40, 2 * 40], rows  # the box head's two on the kept rows
    with torch.no_grad():
        expected = module(*args)
    for actual, wanted in zip(rewritten.module()(*args), expected):
        assert_equivalent(actual, wanted)


def test_sum_over_concat_splits_deformable_attentions_sum_over_levels():
    """Deformable DETR's (stack(levels, -2).flatten(-2) * weights).sum(-1): one sum per level,
    no stack left, the same numbers within the bound."""

    class LevelSum(torch.nn.Module):
        def forward(self, a, b, c, weights):
            return (torch.stack([a, b, c], dim=-2).flatten(-2) * weights).sum(-1)  # [heads, 4, queries]

    torch.manual_seed(0)
    args = (*(torch.randn(2, 4, 5, 3) for _ in range(3)), torch.rand(2, 1, 5, 9))
    program = torch.export.export(LevelSum(), args).run_decompositions()
    rewritten, log = surgery.rewrite_with_log(program, ["sum_over_concat"])
    assert dict(log[0][1].replaced) == {"aten.sum.dim_IntList": 1}
    census = surgery.op_census(rewritten)
    assert "aten.stack.default" not in census and "aten.cat.default" not in census
    assert census["aten.sum.dim_IntList"] == 3
    assert_equivalent(rewritten.module()(*args), LevelSum()(*args))
