"""One compiled geometry encoder for any number of points, boxes and images, up to a maximum.

The choice: a **fixed maximum** with SAM3's own right-padding masks, not symbolic shapes. The
encoder is exported and compiled once at ``(max_points, max_boxes, max_batch)``; a call with
fewer is padded up to it (``pad_prompts``), run, and cut back (``PaddedPrompts.unpad``).

Why the valid outputs don't depend on the padding (SAM3's ``SequenceGeometryEncoder``):
points, boxes and the CLS token are packed by ``concat_padded_sequences``, which moves each
image's valid tokens to the front (points, then boxes, then CLS) and marks the rest as padding;
the transformer layers mask padded keys in self-attention (``tgt_key_padding_mask``) and
everything else (projections, pooling, layer norms, cross-attention to the image) works per
token; images in a batch never mix. So for image ``b`` with ``n`` valid points and ``m`` valid
boxes, rows ``0 .. n+m`` of ``embeddings[:, b]`` are the same whatever the padding, and the
padding mask is ``arange(S) >= n + m + 1``.

Mapping back: the original model run on prompts of ``Np`` points and ``Nb`` boxes (each image's
masks right-padding its own counts within them) gives ``S = Np + Nb + 1`` rows; the padded
module gives ``max_points + max_boxes + 1``. ``unpad`` keeps the first ``S`` rows and the first
``B`` images: the mask is then identical to the original's, and every valid row equal. Rows the
mask marks as padding hold whatever the transformer computed from padding tokens, in the
original as here: unspecified, and never compared.

Zero boxes: a model *exported* with 0 boxes runs in PyTorch but stock TVM fails to build it (a
reshape of an empty tensor); here ``max_boxes >= 1`` and "no boxes" is a masked-out box, SAM3's
own convention, so no such module is ever built.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from hypothesis import strategies as st
from torch import Tensor

from surgery.equivalence.compare import ErrorStats, accumulate, compare
from surgery.equivalence.verify import PropertyFailed, check_property
from surgery.pipeline import latency_ms

from .geometry_encoder import D_MODEL, INPUT_NAMES, OUTPUT_NAMES, PromptShape, example_inputs, prompt_inputs

if TYPE_CHECKING:
    from surgery.pipeline import Surgery

# Values of padding slots: never seen by a valid output (masked), but kept finite and inside the
# image so no padding slot can produce inf/NaN anywhere.
PAD_POINT = (0.5, 0.5)
PAD_BOX = (0.5, 0.5, 0.25, 0.25)  # cx, cy, w, h


@dataclasses.dataclass(frozen=True)
class PromptLimits:
    """The maxima one compiled module serves."""

    max_points: int = 16
    max_boxes: int = 8
    max_batch: int = 4

    def validate(self) -> PromptLimits:
        for name in ("max_points", "max_boxes", "max_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                hint = (
                    " (no boxes at all is a masked-out box; a module exported with 0 boxes does not build on TVM)"
                    if name == "max_boxes"
                    else ""
                )
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}{hint}")
        return self

    def shape(self, feat_size=(72, 72)) -> PromptShape:
        return PromptShape(self.max_points, self.max_boxes, self.max_batch, tuple(feat_size)).validate()


def _right_padded(mask: Tensor) -> bool:
    counts = (~mask).sum(1, keepdim=True)
    return bool(torch.equal(mask, torch.arange(mask.shape[1])[None, :] >= counts))


@dataclasses.dataclass
class PaddedPrompts:
    """Wrapper inputs padded to the limits, and the sizes of what was padded."""

    args: tuple[Tensor, ...]  # the 8 wrapper inputs at (max_points, max_boxes, max_batch)
    points: int  # Np of the unpadded inputs
    boxes: int  # Nb
    batch: int  # B

    def unpad(self, outputs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """(embeddings [S, B, 256], padding_mask [B, S]) of the unpadded call, S = Np + Nb + 1."""
        embeddings, mask = outputs[0], outputs[1]
        S = self.points + self.boxes + 1
        return embeddings[:S, : self.batch], mask[: self.batch, :S]


def pad_prompts(args: Sequence[Tensor], limits: PromptLimits, feat_size=(72, 72)) -> PaddedPrompts:
    """Pad the 8 wrapper inputs (``GeometryEncoderWrapper``'s order and layout, any
    ``1 <= Np <= max_points``, ``0 <= Nb <= max_boxes``, ``1 <= B <= max_batch``, masks
    right-padded as SAM3 requires) to the limits. Raises ``ValueError`` naming what doesn't fit."""
    limits.validate()
    if len(args) != len(INPUT_NAMES):
        raise ValueError(f"expected the {len(INPUT_NAMES)} inputs {', '.join(INPUT_NAMES)}, got {len(args)}")
    points, point_labels, point_mask, boxes, box_labels, box_mask, img_feats, img_pos = args
    H, W = feat_size
    if points.dim() != 3 or points.shape[2] != 2:
        raise ValueError(f"points must be [Np, B, 2], got {tuple(points.shape)}")
    Np, B = points.shape[:2]
    if boxes.dim() != 3 or boxes.shape[2] != 4 or boxes.shape[1] != B:
        raise ValueError(f"boxes must be [Nb, B, 4] with B={B}, got {tuple(boxes.shape)}")
    Nb = boxes.shape[0]
    expected = {
        "point_labels": (Np, B),
        "point_mask": (B, Np),
        "box_labels": (Nb, B),
        "box_mask": (B, Nb),
        "img_feats": (H * W, B, D_MODEL),
        "img_pos": (H * W, B, D_MODEL),
    }
    for name, tensor in zip(INPUT_NAMES, args):
        if name in expected and tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"{name} must have shape {expected[name]} (Np={Np}, Nb={Nb}, B={B}, feature map {H}x{W}), "
                f"got {tuple(tensor.shape)}"
            )
    for name, limit, value, low in (
        ("points", limits.max_points, Np, 1),
        ("boxes", limits.max_boxes, Nb, 0),
        ("batch", limits.max_batch, B, 1),
    ):
        if not low <= value <= limit:
            raise ValueError(
                f"{value} {name} is outside what this module serves ({low} to {limit}); "
                f"compile with a larger --max-{name}"
                if value > limit
                else f"{value} {name}: at least {low} needed"
            )
    for name, mask in (("point_mask", point_mask), ("box_mask", box_mask)):
        if mask.dtype != torch.bool or not _right_padded(mask):
            raise ValueError(f"{name} must be a bool mask, True at padding, right-padded (SAM3's convention)")

    P, K, BB = limits.max_points, limits.max_boxes, limits.max_batch

    def grow(tensor: Tensor, sizes: tuple[int, ...], fill) -> Tensor:
        out = torch.empty(sizes, dtype=tensor.dtype)
        out[...] = torch.as_tensor(fill, dtype=tensor.dtype)
        out[tuple(slice(0, n) for n in tensor.shape)] = tensor
        return out

    padded_points = grow(points, (P, BB, 2), PAD_POINT)
    padded_point_mask = grow(point_mask, (BB, P), True)
    padded_point_mask[B:, 0] = False  # a padding image gets one valid point: no image without tokens
    padded = (
        padded_points,
        grow(point_labels, (P, BB), 0),
        padded_point_mask,
        grow(boxes, (K, BB, 4), PAD_BOX),
        grow(box_labels, (K, BB), 0),
        grow(box_mask, (BB, K), True),
        grow(img_feats, (H * W, BB, D_MODEL), 0.0),
        grow(img_pos, (H * W, BB, D_MODEL), 0.0),
    )
    return PaddedPrompts(padded, Np, Nb, B)


class PaddedGeometryEncoder:
    """A geometry encoder compiled at the limits, called with prompts of any count up to them.

    ``fn`` takes the 8 wrapper inputs at ``limits.shape(feat_size)`` (a ``TvmFunction``, a
    rewritten program's module, the wrapper itself); calling this object with inputs of any
    ``Np <= max_points``, ``Nb <= max_boxes``, ``B <= max_batch`` returns what the original
    wrapper returns for them: identical padding mask, equal valid embedding rows.
    """

    def __init__(self, fn: Callable, limits: PromptLimits, feat_size=(72, 72)):
        self.fn, self.limits, self.feat_size = fn, limits.validate(), tuple(feat_size)

    def __call__(self, *args: Tensor) -> tuple[Tensor, Tensor]:
        padded = pad_prompts(args, self.limits, self.feat_size)
        return padded.unpad(self.fn(*padded.args))


def valid_rows(embeddings: Tensor, mask: Tensor) -> list[Tensor]:
    """Per image, its valid embedding rows [L_b, 256] (the mask is False there, a prefix)."""
    return [embeddings[: int((~mask[b]).sum()), b] for b in range(mask.shape[0])]


def varying_prompts(limits: PromptLimits, feat_size=(72, 72)):
    """Hypothesis strategy of unpadded wrapper inputs: 1..max_points points and 0..max_boxes
    boxes (the tensors' own sizes), batch 1..max_batch, and within that each image right-padded
    to its own count (at least one valid point), random labels, points anywhere in [0, 1] with
    the exact edges, boxes inside, straddling, whole-image and tiny, unit-scale features."""

    @st.composite
    def inputs(draw):
        shape = PromptShape(
            draw(st.integers(1, limits.max_points)),
            draw(st.integers(0, limits.max_boxes)),
            draw(st.integers(1, limits.max_batch)),
            tuple(feat_size),
        )
        return draw(prompt_inputs(shape))

    return inputs()


def exact_count_reference(wrapper: torch.nn.Module, args: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Per image, the original wrapper run alone (batch 1) at exactly its valid counts: no
    padding at all. Returns (embeddings [L_b, 1, 256], padding_mask [1, L_b]) per image."""
    points, point_labels, point_mask, boxes, box_labels, box_mask, img_feats, img_pos = args
    out = []
    for b in range(points.shape[1]):
        n, m = int((~point_mask[b]).sum()), int((~box_mask[b]).sum())
        single = (
            points[:n, b : b + 1],
            point_labels[:n, b : b + 1],
            point_mask[b : b + 1, :n],
            boxes[:m, b : b + 1],
            box_labels[:m, b : b + 1],
            box_mask[b : b + 1, :m],
            img_feats[:, b : b + 1],
            img_pos[:, b : b + 1],
        )
        with torch.no_grad():
            out.append(wrapper(*single))
    return out


def check_against_exact_counts(
    padded_fn: PaddedGeometryEncoder, wrapper: torch.nn.Module, examples: int, seed: int, failures: list | None = None
) -> dict:
    """Property check: on ``examples`` hypothesis draws of ``varying_prompts``, the padded
    module's outputs equal (a) the original wrapper on the same unpadded inputs (mask identical,
    valid rows within the bounds) and (b) per image, the original run alone at exactly its valid
    counts. Returns error statistics per output (``accumulate``d over examples); a failure is
    appended to ``failures`` with hypothesis's shrunk counterexample."""
    total: dict[str, ErrorStats] = {}

    def check(args):
        with torch.no_grad():
            expected = wrapper(*args)
        actual = padded_fn(*args)
        stats = {OUTPUT_NAMES[1]: compare(actual[1], expected[1])}
        if stats[OUTPUT_NAMES[1]].within_bounds():
            stats[OUTPUT_NAMES[0]] = compare(torch.cat(valid_rows(*actual)), torch.cat(valid_rows(*expected)))
        for b, (e_embeddings, e_mask) in enumerate(exact_count_reference(wrapper, args)):
            L = e_embeddings.shape[0]
            accumulate(
                stats,
                {
                    f"{OUTPUT_NAMES[0]} (image alone, exact counts)": compare(actual[0][:L, b], e_embeddings[:, 0]),
                    f"{OUTPUT_NAMES[1]} (image alone, exact counts)": compare(actual[1][b, :L], e_mask[0]),
                },
            )
        accumulate(total, stats)
        bad = {k: str(v) for k, v in stats.items() if not v.within_bounds()}
        assert not bad, f"padded vs exact counts: {bad}"

    if examples < 1:
        return total
    try:
        check_property(varying_prompts(padded_fn.limits, padded_fn.feat_size), check, examples, seed)
    except PropertyFailed as exc:
        if failures is None:
            raise
        failures.append(
            {
                "check": "padded vs exact counts",
                "error": str(exc),
                "counterexample": {n: tuple(a.shape) for n, a in zip(INPUT_NAMES, exc.counterexample)}
                if isinstance(exc.counterexample, tuple)
                else repr(exc.counterexample)[:2000],
            }
        )
    return total


def median_ms(fn: Callable, args, repeats: int = 5) -> float:
    return latency_ms(fn, args, repeats)


def latency_inputs(points: int, boxes: int, batch: int, feat_size=(72, 72), seed: int = 0) -> tuple[Tensor, ...]:
    """Unpadded inputs of the given counts, all valid: what the latency comparisons call with."""
    return example_inputs(PromptShape(points, boxes, batch, tuple(feat_size)).validate(), seed)


# ----------------------------------------------------------------------------- the apply command


def limits_from_options(max_points, max_boxes, max_batch, points: int, boxes: int, batch: int) -> PromptLimits | None:
    """``--max-points/--max-boxes/--max-batch`` -> limits (None when none is given; those not
    given default to 16, 8, 4). ``--points/--boxes/--batch`` then name the counts the latency is
    measured at and must fit. Raises ValueError with the reason."""
    if max_points is None and max_boxes is None and max_batch is None:
        return None
    defaults = PromptLimits()
    limits = PromptLimits(
        defaults.max_points if max_points is None else max_points,
        defaults.max_boxes if max_boxes is None else max_boxes,
        defaults.max_batch if max_batch is None else max_batch,
    ).validate()
    for name, value, limit in (
        ("points", points, limits.max_points),
        ("boxes", boxes, limits.max_boxes),
        ("batch", batch, limits.max_batch),
    ):
        if value > limit:
            raise ValueError(
                f"--{name} {value} exceeds --max-{name} {limit} (with --max-*, --{name} is the count latency is measured at)"
            )
    return limits


def check_compiled(
    result: Surgery,
    limits: PromptLimits,
    feat_size,
    examples: int,
    seed: int,
    latency_counts: tuple[int, int, int],
    progress: Callable[[str], None] = print,
) -> Surgery:
    """The ``apply --max-*`` stage, after ``surgery.pipeline.operate`` compiled the encoder at the
    limits: check the padded TVM module against the original at exact counts on ``examples``
    hypothesis draws and measure its latency at ``latency_counts`` (points, boxes, batch).
    Returns the ``Surgery`` with both in its report (``equivalence["padded_tvm_vs_exact_counts"]``,
    ``latency``, ``padded``); a failure fails it."""
    start = time.perf_counter()
    wrapper = result.spec.module
    padded = PaddedGeometryEncoder(result.tvm, limits, feat_size)
    failures: list[dict] = []
    stats = check_against_exact_counts(padded, wrapper, examples, seed, failures)
    progress(
        f"[padded    ] {time.perf_counter() - start:7.2f} s  {examples} examples, 1-{limits.max_points} points, "
        f"0-{limits.max_boxes} boxes, batch 1-{limits.max_batch}: " + "; ".join(f"{k}: {v}" for k, v in stats.items())
    )
    points, boxes, batch = latency_counts
    args = latency_inputs(points, boxes, batch, feat_size, seed)
    latency = {f"tvm_padded_{points}p_{boxes}b_batch{batch}_ms": median_ms(padded, args)}
    with torch.no_grad():
        latency[f"eager_{points}p_{boxes}b_batch{batch}_ms"] = median_ms(wrapper, args)
    report = dataclasses.replace(
        result.report.with_check("padded_tvm_vs_exact_counts", stats, failures, latency),
        padded={**dataclasses.asdict(limits), "examples": examples, "latency_counts": list(latency_counts)},
    )
    progress("[latency   ] " + ", ".join(f"{k} {v:.1f}" for k, v in report.latency.items()))
    return dataclasses.replace(result, report=report)
