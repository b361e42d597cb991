"""Property tests: every rewrite's function form and graph form against the original operator.

Function form: the replacement function (e.g. ``surgery.rewrites.roi_align.roi_align``) on the
drawn inputs equals the stock operator within the project bounds (float64 relative <= 1e-12,
float32 absolute <= 1e-5 on unit-scale data; integers identical; inf/NaN where the reference has
them). Graph form: a module calling the operator is exported, rewritten with all rewrites, the
rewritten operators are gone, and the rewritten program's outputs equal the original's.
"""

import pytest
import torch
from helpers import assert_identical, graph_examples
from hypothesis import event, given, settings
from hypothesis import strategies as st

import surgery
from surgery.equivalence import assert_equivalent
from surgery.rewrites import REGISTRY, resolve, strategy_for
from surgery.rewrites.base import GraphRewrite

REWRITES = list(REGISTRY)


def _replaceable_calls(program) -> set[str]:
    """Operators of calls some registered rewrite replaces (bool_arithmetic takes only the
    products of booleans: float products of other replacements stay)."""
    rewrites = resolve()
    return set(surgery.op_census(program, lambda node: any(rw.replaces(node) for rw in rewrites)))


# Those that remove operators; a graph rewrite (negative_index) changes arguments and has a
# graph-form test of its own.
OPERATOR_REWRITES = [name for name, cls in REGISTRY.items() if not issubclass(cls, GraphRewrite)]


def _within_contract(case) -> bool:
    return case.within_contract() if hasattr(case, "within_contract") else True


@pytest.mark.parametrize("name", REWRITES)
@given(data=st.data())
def test_function_form(name, data):
    case = data.draw(strategy_for(name), label="case")
    event(f"dtype={case.input.dtype}")
    for kind in getattr(case, "kinds", ()):
        event(f"box={kind}")
    expected = case.reference()
    if not _within_contract(case):
        event("outside contract: raises")
        with pytest.raises(ValueError, match="beyond the static bound"):
            case.rewritten()
        return
    assert_equivalent(case.rewritten(), expected, scale=case.scale, context=repr(case))


@pytest.mark.parametrize("name", ["floor_divide", "div_rounding", "bool_arithmetic", "row_dispatch"])
@given(data=st.data())
def test_function_form_is_bit_exact(name, data):
    """What these contracts promise beyond the project bounds: the same values, NaN where NaN
    and zeros of the same sign."""
    case = data.draw(strategy_for(name), label="case")
    assert_identical(case.rewritten(), case.reference(), context=repr(case))


@pytest.mark.slow
@pytest.mark.parametrize("name", OPERATOR_REWRITES)
@settings(max_examples=graph_examples())
@given(data=st.data())
def test_graph_form(name, data):
    case = data.draw(strategy_for(name), label="case")
    program = torch.export.export(case.module(), case.args())
    assert surgery.op_census(program, REGISTRY[name]().replaces), "op not in graph"
    rewritten = surgery.rewrite(program)
    left = _replaceable_calls(rewritten)
    assert not left, f"rewritten graph still calls {left}"
    if not _within_contract(case):
        event("outside contract: graph caps samples")
        return  # checked by test_roi_align_graph_caps_beyond_bound
    expected = program.module()(*case.args())
    assert_equivalent(rewritten.module()(*case.args()), expected, scale=case.scale, context=repr(case))
    assert_equivalent(expected, case.reference(), scale=case.scale, context="export changed the op?")


@pytest.mark.slow
@settings(max_examples=graph_examples())
@given(data=st.data())
def test_negative_index_graph_form(data):
    """Every negative select and possibly negative index tensor normalised, the others left as
    they were, nothing left to normalise after all rewrites, and the outputs bit for bit."""
    from surgery.rewrites.negative_index import needs_normalising

    case = data.draw(strategy_for("negative_index"), label="case")
    program = torch.export.export(case.module(), case.args())
    shape = case.input.shape
    selects = sorted((n.args[1], n.args[2] % shape[n.args[1]]) for n in program.graph.nodes if _is_select(n))
    rewritten, log = surgery.rewrite_with_log(program)
    replaced = dict(log[-1][1].replaced)
    event(f"replaced {sorted(replaced)}")
    negative_selects = sum(1 for pick in case.picks if pick[0] == "select" and pick[2] < 0)
    assert replaced.get("aten.select.int", 0) == negative_selects
    assert replaced.get("aten.index.Tensor", 0) == sum(1 for pick in case.picks if pick[0] == "index")
    # each select at the same position, counted from the start
    assert sorted((n.args[1], n.args[2]) for n in rewritten.graph.nodes if _is_select(n)) == selects
    assert not any(needs_normalising(n) for n in rewritten.graph.nodes)
    assert torch.equal(rewritten.module()(*case.args()), program.module()(*case.args()))
    assert torch.equal(program.module()(*case.args()), case.reference())


@pytest.mark.slow
# Each example exports a four-level pooler and traces it twice (3.5 to 12.7 s each here), so this
# runs the graph-form minimum in every profile; the function form runs the profile's full count.
@settings(max_examples=25)
@given(data=st.data())
def test_row_dispatch_graph_form(data):
    """MultiScaleRoIAlign exported: each level's index_put and nonzero gone, no unbacked size
    left, and the rewritten program gives the eager module's results bit for bit."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    case = data.draw(strategy_for("row_dispatch"), label="case")
    for kind in case.kinds:
        event(f"box={kind}")
    program = torch.export.export(case.module(), case.args())
    rewritten, log = surgery.rewrite_with_log(program, ["row_dispatch"])
    levels = len(case.features)
    assert dict(log[0][1].replaced) == {"aten.index_put.default": levels, "aten.nonzero.default": levels}
    assert not {"aten.nonzero.default", "aten.index_put.default"} & set(surgery.op_census(rewritten))
    assert not free_unbacked_symbols(
        [*rewritten.range_constraints, *(n.meta.get("val") for n in rewritten.graph.nodes)]
    )
    assert_identical(rewritten.module()(*case.args()), case.reference(), context=repr(case))


def _is_select(node) -> bool:
    return node.target is torch.ops.aten.select.int


# ------------------------------------------------------------------ speed rewrites
# Not chosen by the TVM probe (TVM converts their operators), applied for speed; same two forms.

from surgery.rewrites import SPEED_REWRITES  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SPEED_REWRITES))
@settings(max_examples=graph_examples())  # attention's function form exports and rewrites a module
@given(data=st.data())
def test_speed_rewrite_function_form(name, data):
    case = data.draw(strategy_for(name), label="case")
    event(f"dtype={case.input.dtype}")
    if not _within_contract(case):
        event("outside contract: raises")
        with pytest.raises(ValueError, match="beyond the static bound"):
            case.rewritten()
        return
    assert_equivalent(case.rewritten(), case.reference(), scale=case.scale, context=repr(case))


@pytest.mark.slow
@settings(max_examples=graph_examples())
@given(data=st.data())
def test_conv_as_matmul_graph_form(data):
    name = "conv_as_matmul"
    case = data.draw(strategy_for(name), label="case")
    program = torch.export.export(case.module(), case.args())
    rewritten, log = surgery.rewrite_with_log(program, [name])
    replaced = sum(result.replaced.get("aten.convolution.default", 0) for _, result in log)
    covers = case.weight.shape[2:] == case.input.shape[2:] and case.padding == 0 and case.groups == 1
    event("covers input: rewritten" if covers else "left as a convolution")
    assert replaced == (1 if covers else 0)
    assert ("aten.convolution.default" in surgery.op_census(rewritten)) == (not covers)
    expected = program.module()(*case.args())
    assert_equivalent(rewritten.module()(*case.args()), expected, scale=case.scale, context=repr(case))


@pytest.mark.slow
@settings(max_examples=graph_examples())
@given(data=st.data())
def test_conv_im2col_graph_form(data):
    name = "conv_im2col"
    case = data.draw(strategy_for(name), label="case")
    program = torch.export.export(case.module(), case.args())
    rewritten, log = surgery.rewrite_with_log(program, [name])
    replaced = sum(result.replaced.get("aten.convolution.default", 0) for _, result in log)
    event(f"transposed={case.transposed}, rewritten={case.taken()}")
    assert replaced == (1 if case.taken() else 0)
    assert ("aten.convolution.default" in surgery.op_census(rewritten)) == (not case.taken())
    expected = program.module()(*case.args())
    assert_equivalent(rewritten.module()(*case.args()), expected, scale=case.scale, context=repr(case))


@pytest.mark.sam3
@pytest.mark.slow
def test_attention_reassociation_rewrites_every_cross_attention_product_of_the_geometry_encoder():
    """Both products (scores, values) of all three layers' cross-attention; self-attention (one
    packed projection) is left alone. Outputs within the float32 bound."""
    from models.geometry_encoder import geometry_encoder_spec

    spec = geometry_encoder_spec(points=3, boxes=2)
    program = torch.export.export(spec.module, spec.example_args)
    rewritten, log = surgery.rewrite_with_log(program, ["attention_reassociation"])
    assert dict(log[0][1].replaced) == {"aten.bmm.default (scores)": 3, "aten.bmm.default (values)": 3}
    with torch.no_grad():
        expected = spec.module(*spec.example_args)
    actual = rewritten.module()(*spec.example_args)
    assert_equivalent(actual[0], expected[0])
    assert torch.equal(actual[1], expected[1])


@pytest.mark.slow
@settings(max_examples=graph_examples())
@given(data=st.data())
def test_roi_align_separable_graph_form(data):
    case = data.draw(strategy_for("roi_align_separable"), label="case")
    program = torch.export.export(case.module(), case.args())
    rewritten = surgery.rewrite(program, ["roi_align_separable"])
    assert "torchvision.roi_align.default" not in surgery.op_census(rewritten)
    if not _within_contract(case):
        return  # beyond the bound the graph caps samples per bin, as roi_align's does
    assert_equivalent(rewritten.module()(*case.args()), case.reference(), scale=case.scale, context=repr(case))


@pytest.mark.slow
@settings(max_examples=graph_examples())
@given(data=st.data())
def test_roi_align_taps_graph_form(data):
    """Taken where the cost rule says (every call with ``min_ratio=0``), the rest left for
    roi_align_separable; the taken calls' results within the contract."""
    from surgery.rewrites import RoiAlignTaps

    case = data.draw(strategy_for("roi_align_taps"), label="case")
    forced = data.draw(st.booleans(), label="forced")
    rewrite = RoiAlignTaps(min_ratio=0) if forced else RoiAlignTaps()
    taken = case.taken(min_ratio=0 if forced else RoiAlignTaps().min_ratio)
    event(f"taken={taken}")
    program = torch.export.export(case.module(), case.args())
    result = rewrite(program)
    assert sum(result.replaced.values()) == int(taken)
    assert ("torchvision.roi_align.default" in surgery.op_census(result.program)) == (not taken)
    if not _within_contract(case):
        return  # beyond the bound the graph caps samples per bin, as roi_align's does
    assert_equivalent(result.program.module()(*case.args()), case.reference(), scale=case.scale, context=repr(case))


@pytest.mark.slow
@settings(max_examples=graph_examples())
@given(data=st.data())
def test_masked_gather_padding_graph_form(data):
    """Every masked tap taken, one padded copy of the map for all of them, as exported and as
    decomposed to core ATen; bit-exact, inf and NaN in the map included."""
    case = data.draw(strategy_for("masked_gather_padding"), label="case")
    program = torch.export.export(case.module(), case.args())
    if data.draw(st.booleans(), label="decomposed"):
        program = program.run_decompositions()
    rewritten, log = surgery.rewrite_with_log(program, ["masked_gather_padding"])
    assert sum(sum(result.replaced.values()) for _, result in log) == len(case.pixels)
    padded = [
        node
        for node in rewritten.graph.nodes
        if node.target is torch.ops.aten.cat.default and node.args[0][-1].target is torch.ops.aten.full.default
    ]
    assert len(padded) == 1
    assert_identical(rewritten.module()(*case.args()), case.reference(), context=repr(case))


@pytest.mark.slow
@settings(max_examples=graph_examples())
@given(data=st.data())
def test_gather_as_index_graph_form(data):
    """Taken exactly where the index is expanded over a dimension, as exported and as
    decomposed to core ATen; bit-exact."""
    case = data.draw(strategy_for("gather_as_index"), label="case")
    program = torch.export.export(case.module(), case.args())
    if data.draw(st.booleans(), label="decomposed"):
        program = program.run_decompositions()
    rewritten, log = surgery.rewrite_with_log(program, ["gather_as_index"])
    event(f"taken={case.taken()}")
    assert sum(result.replaced.get("aten.gather.default", 0) for _, result in log) == int(case.taken())
    assert ("aten.gather.default" in surgery.op_census(rewritten)) == (not case.taken())
    assert_identical(rewritten.module()(*case.args()), case.reference(), context=repr(case))


@pytest.mark.slow
@settings(max_examples=graph_examples())
@given(data=st.data())
def test_channels_last_gathers_graph_form(data):
    """Both taps taken exactly where channels are read whole and a sum over at least two points
    shrinks the tensor before its layout is needed (never for a gather returned as it is), as
    exported and as decomposed to core ATen; the gathers then read channels-last rows (the map
    permuted, the channels innermost); results within the bound."""
    case = data.draw(strategy_for("channels_last_gathers"), label="case")
    program = torch.export.export(case.module(), case.args())
    if data.draw(st.booleans(), label="decomposed"):
        program = program.run_decompositions()
    rewritten, log = surgery.rewrite_with_log(program, ["channels_last_gathers"])
    event(f"tail={case.tail}, taken={case.taken()}")
    assert sum(result.replaced.get("aten.index.Tensor", 0) for _, result in log) == (2 if case.taken() else 0)
    gathers = [node for node in rewritten.graph.nodes if node.target is torch.ops.aten.index.Tensor]
    assert len(gathers) == 2
    channels = case.x.shape[1]
    for node in gathers:
        shape = node.meta["val"].shape
        assert (shape[-1] == channels and len(node.args[1]) == 2) == case.taken(), (shape, node.args[1])
    assert_equivalent(rewritten.module()(*case.args()), case.reference(), scale=case.scale, context=repr(case))


@pytest.mark.slow
@settings(max_examples=graph_examples())
@given(data=st.data())
def test_sum_over_concat_graph_form(data):
    """Split exactly where the parts are contiguous slices of the summed axis (found by viewing
    the parts' numbers), as exported and as decomposed to core ATen; results within the bound."""
    case = data.draw(strategy_for("sum_over_concat"), label="case")
    program = torch.export.export(case.module(), case.args())
    if data.draw(st.booleans(), label="decomposed"):
        program = program.run_decompositions()
    rewritten, log = surgery.rewrite_with_log(program, ["sum_over_concat"])
    event(f"taken={case.taken()}")
    assert sum(result.replaced.get("aten.sum.dim_IntList", 0) for _, result in log) == int(case.taken())
    census = surgery.op_census(rewritten)
    assert ("aten.cat.default" in census or "aten.stack.default" in census) == (not case.taken())
    assert_equivalent(rewritten.module()(*case.args()), case.reference(), scale=case.scale, context=repr(case))


@pytest.mark.slow
@settings(max_examples=graph_examples())
@given(data=st.data())
def test_gathered_rows_only_graph_form(data):
    """Taken exactly where a gather of whole rows reads a chain of linear layers nothing else
    reads, with fewer rows kept than there are; the products then run on the kept rows only (no
    product has as many rows as the input), as exported and as decomposed to core ATen; results
    within the bound."""
    case = data.draw(strategy_for("gathered_rows_only"), label="case")
    program = torch.export.export(case.module(), case.args())
    if data.draw(st.booleans(), label="decomposed"):
        program = program.run_decompositions()
    rewritten, log = surgery.rewrite_with_log(program, ["gathered_rows_only"])
    event(f"taken={case.taken()}")
    assert sum(result.replaced.get("aten.gather.default", 0) for _, result in log) == int(case.taken())
    batch, rows = case.x.shape[:2]
    product_rows = [
        node.meta["val"].shape[0]
        for node in rewritten.graph.nodes
        if node.op == "call_function" and node.target in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default)
    ]
    if case.taken():
        assert product_rows and all(r == batch * case.index.shape[1] for r in product_rows), product_rows
    else:
        assert all(r == batch * rows for r in product_rows), product_rows
    assert_equivalent(rewritten.module()(*case.args()), case.reference(), scale=case.scale, context=repr(case))


@pytest.mark.slow
@settings(max_examples=graph_examples())
@given(data=st.data())
def test_matmul_packing_graph_form(data):
    """Packed exactly where the rule says (a weight, or an activation with a long enough
    reduction times an activation, or a right-hand side computed from a stage's inputs alone,
    wider than one panel), and the program's outputs unchanged."""
    case = data.draw(strategy_for("matmul_packing"), label="case")
    program = torch.export.export(case.module(), case.args())
    rewritten, log = surgery.rewrite_with_log(program, [case.rewriter()])
    expected_packed = case.packs()
    event(
        ("staged, " if case.staged else "")
        + ("packed" if expected_packed else "weight A, left alone" if case.a_is_weight else "left alone")
    )
    assert sum(result.replaced.get("matrix products", 0) for _, result in log) == int(expected_packed)
    census = surgery.op_census(rewritten)
    assert census["aten.bmm.default"] == int(expected_packed or case.staged)
    assert (census["aten.clone.default"] >= 1) == expected_packed  # the panels' copy
    padded = expected_packed and case.columns() > case.b.shape[-1]
    if padded:
        event("a weight's columns padded to whole vectors")
    assert (census["aten.constant_pad_nd.default"] >= 1) == padded
    assert_equivalent(
        rewritten.module()(*case.args()), program.module()(*case.args()), scale=case.scale, context=repr(case)
    )


@pytest.mark.sam3
@pytest.mark.slow
def test_layout_round_trips_removes_the_geometry_encoders_feature_round_trip():
    """SAM3's [HW, 1, C] -> NCHW -> [H, W*C] (roi_align_separable) becomes one view of the layer
    norm's output; a chain that reorders elements (NCHW for the point sampling) stays."""
    from surgery.rewrites.layout_round_trips import LayoutCase

    x = torch.randn(12, 1, 5)  # [HW, 1, C], H=3, W=4
    steps = (
        ("permute", (1, 2, 0)),
        ("reshape", (1, 5, 3, 4)),
        ("select0",),
        ("permute", (1, 2, 0)),
        ("clone",),
        ("reshape", (3, 20)),
    )
    case = LayoutCase(x, steps)
    program = torch.export.export(case.module(), case.args())
    rewritten, log = surgery.rewrite_with_log(program, ["layout_round_trips"])
    assert dict(log[0][1].replaced) == {"layout chains": 1}
    assert "aten.permute.default" not in surgery.op_census(rewritten)
    assert torch.equal(rewritten.module()(x), case.reference())
    reorder = LayoutCase(x, (("permute", (1, 2, 0)), ("clone",), ("reshape", (60,))))
    _, log = surgery.rewrite_with_log(torch.export.export(reorder.module(), (x,)), ["layout_round_trips"])
    assert not log[0][1].modified


@pytest.mark.slow
@settings(max_examples=graph_examples())
@given(data=st.data())
def test_gather_through_permute_graph_form(data):
    """Rewritten exactly when the index is the same for every other position; bit-exact."""
    case = data.draw(strategy_for("gather_through_permute"), label="case")
    program = torch.export.export(case.module(), case.args())
    rewritten, log = surgery.rewrite_with_log(program, ["gather_through_permute"])
    event("broadcast index: rewritten" if case.broadcast else "varying index: left alone")
    assert log[0][1].modified == case.broadcast
    assert ("aten.gather.default" in surgery.op_census(rewritten)) == (not case.broadcast)
    assert torch.equal(rewritten.module()(*case.args()), case.reference())
