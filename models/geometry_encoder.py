"""SAM3's geometry (prompt) encoder, from the official ``sam3`` package, ready for torch.export.

``build_geometry_encoder`` builds the real ``SequenceGeometryEncoder`` in SAM3's production
configuration (the one ``sam3.model_builder`` builds for the image model: d_model 256, 3
transformer layers, points and boxes each encoded by direct projection + pooling + position
encoding, 7x7 ROI pooling, CLS token, post-encode projection), with seeded random weights or
weights from a checkpoint. ``GeometryEncoderWrapper`` gives it a tensor-only signature.

SAM3 calls ``pin_memory()`` on a CPU tensor in ``_encode_boxes``, which fails on a machine
without CUDA. We don't edit site-packages: the wrapper runs the encoder inside
``pin_memory_passthrough()``, which makes ``Tensor.pin_memory`` return the tensor itself while
pinning is impossible (no accelerator), and restores it afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import warnings
from pathlib import Path

import torch
from hypothesis import strategies as st
from torch import Tensor, nn

from surgery.pipeline import ModelSpec

from .checkpoint import load_fitting, read_state_dict

D_MODEL = 256
CHECKPOINT_PREFIX = "detector.geometry_encoder."


def _import_sam3():
    # Imported when an encoder is built, not with this module: sam3 takes seconds to import.
    try:
        with warnings.catch_warnings():
            # sam3's import warns about torch.jit.script and CUDA autocast on a CPU-only machine:
            # noise about parts of SAM3 we don't use.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message="CUDA is not available")
            from sam3 import model_builder
            from sam3.model.geometry_encoders import Prompt
    except ImportError as exc:  # psutil is needed by sam3 0.1.4 but not declared by it
        raise ImportError(f"SAM3's geometry encoder needs the 'sam3' and 'psutil' packages: {exc}") from exc
    return model_builder, Prompt


_patch_lock = threading.RLock()


@contextlib.contextmanager
def pin_memory_passthrough():
    """While active, ``Tensor.pin_memory()`` on a CPU-only machine returns the tensor itself."""
    if torch.cuda.is_available():
        yield
        return
    with _patch_lock:
        original = torch.Tensor.pin_memory

        def pin_memory(self, *args, **kwargs):
            return self  # nothing to pin for: no accelerator to transfer to

        torch.Tensor.pin_memory = pin_memory
        try:
            yield
        finally:
            torch.Tensor.pin_memory = original


def build_geometry_encoder(seed: int = 0, checkpoint: str | Path | None = None) -> nn.Module:
    """SAM3's ``SequenceGeometryEncoder``, production configuration, in eval mode.

    Weights: seeded random (``seed``) unless ``checkpoint`` names a SAM3 checkpoint (keys under
    ``detector.geometry_encoder.``, possibly inside a ``"model"`` dict) or a bare encoder
    state_dict. Raises ``CheckpointError`` naming missing/unexpected keys or wrong shapes.
    """
    model_builder, _ = _import_sam3()
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        encoder = model_builder._create_geometry_encoder()
        _redraw_cloned_layers(encoder)
    if checkpoint is not None:
        load_checkpoint(encoder, checkpoint)
    return encoder.eval()


def _redraw_cloned_layers(encoder: nn.Module) -> None:
    """SAM3 builds its encoder layers as deep copies of one layer, so at random initialisation
    all three hold the same weights; a trained checkpoint's layers differ. A compiler that merges
    identical computations (TVM's common-subexpression elimination does) then does one layer's
    image-side work for three, and a benchmark on such weights flatters it. So every layer after
    the first draws its weights again, from the same seeded generator, with each module's own
    initialiser (children before parents, as at construction: attention's own initialiser then
    zeroes its output bias)."""
    for layer in list(getattr(encoder, "encode", []))[1:]:
        for module in reversed(list(layer.modules())):
            reset = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
            if callable(reset):
                reset()


def load_checkpoint(encoder: nn.Module, path: str | Path) -> None:
    state = read_state_dict(path)
    if any(k.startswith(CHECKPOINT_PREFIX) for k in state):
        state = {k[len(CHECKPOINT_PREFIX) :]: v for k, v in state.items() if k.startswith(CHECKPOINT_PREFIX)}
    load_fitting(encoder, state, path, "SAM3's geometry encoder")


class GeometryEncoderWrapper(nn.Module):
    """Tensor-only signature of SAM3's geometry encoder, for torch.export.

    Inputs (sequence first, batch second, SAM3's conventions; masks are True at padding):
        points        [Np, B, 2]    normalized xy in [0, 1]
        point_labels  [Np, B]       int64, 0 negative / 1 positive
        point_mask    [B, Np]       bool, right-padded
        boxes         [Nb, B, 4]    normalized cx, cy, w, h
        box_labels    [Nb, B]       int64
        box_mask      [B, Nb]       bool, right-padded
        img_feats     [H*W, B, 256] image features
        img_pos       [H*W, B, 256] image position embeddings
    Outputs: prompt embeddings [S, B, 256] and their padding mask [B, S], S = Np + Nb + 1 (CLS).
    """

    def __init__(self, encoder: nn.Module, feat_size: tuple[int, int] = (72, 72)):
        super().__init__()
        self.encoder = encoder
        self.feat_size = tuple(feat_size)

    def forward(self, points, point_labels, point_mask, boxes, box_labels, box_mask, img_feats, img_pos):
        _, Prompt = _import_sam3()
        prompt = Prompt(
            box_embeddings=boxes,
            box_mask=box_mask,
            box_labels=box_labels,
            point_embeddings=points,
            point_mask=point_mask,
            point_labels=point_labels,
        )
        with pin_memory_passthrough():
            embeds, mask = self.encoder(prompt, [img_feats], [self.feat_size], [img_pos])
        return embeds, mask


@dataclasses.dataclass(frozen=True)
class PromptShape:
    """Static sizes of one export: numbers of points and boxes, batch, feature map."""

    points: int = 3
    boxes: int = 2
    batch: int = 1
    feat_size: tuple[int, int] = (72, 72)

    def validate(self) -> PromptShape:
        if self.points < 1:
            raise ValueError(f"points must be >= 1 (SAM3 needs a non-empty point sequence), got {self.points}")
        if self.boxes < 0 or self.batch < 1 or min(self.feat_size) < 1:
            raise ValueError(f"boxes must be >= 0, batch >= 1 and feature sizes >= 1, got {self}")
        return self


def example_inputs(shape: PromptShape, seed: int = 0, valid_points=None, valid_boxes=None) -> tuple[Tensor, ...]:
    """Random unit-scale inputs for the wrapper; ``valid_*`` (per batch item) right-pad the rest."""
    g = torch.Generator().manual_seed(seed)
    Np, Nb, B = shape.points, shape.boxes, shape.batch
    H, W = shape.feat_size
    valid_points = [Np] * B if valid_points is None else list(valid_points)
    valid_boxes = [Nb] * B if valid_boxes is None else list(valid_boxes)
    points = torch.rand(Np, B, 2, generator=g)  # [Np, B, 2]
    point_labels = torch.randint(0, 2, (Np, B), generator=g)  # [Np, B]
    point_mask = torch.arange(Np)[None, :] >= torch.tensor(valid_points)[:, None]  # [B, Np]
    centers = 0.1 + 0.8 * torch.rand(Nb, B, 2, generator=g)  # [Nb, B, 2]
    sizes = 0.05 + 0.9 * torch.rand(Nb, B, 2, generator=g)  # [Nb, B, 2]
    boxes = torch.cat([centers, sizes], -1)  # [Nb, B, 4]
    box_labels = torch.randint(0, 2, (Nb, B), generator=g)  # [Nb, B]
    box_mask = torch.arange(Nb)[None, :] >= torch.tensor(valid_boxes, dtype=torch.long)[:, None]  # [B, Nb]
    img_feats = torch.randn(H * W, B, D_MODEL, generator=g)  # [H*W, B, 256]
    img_pos = torch.randn(H * W, B, D_MODEL, generator=g)  # [H*W, B, 256]
    return points, point_labels, point_mask, boxes, box_labels, box_mask, img_feats, img_pos


INPUT_NAMES = ("points", "point_labels", "point_mask", "boxes", "box_labels", "box_mask", "img_feats", "img_pos")
OUTPUT_NAMES = ("embeddings", "padding_mask")
# Computed once per image; everything depending only on them is hoisted into the image stage.
IMAGE_INPUTS = ("img_feats", "img_pos")


def prompt_inputs(shape: PromptShape):
    """Hypothesis strategy of wrapper inputs at ``shape``: right-padded prompts (at least one
    valid point per image, 0 to all boxes), labels 0/1, points anywhere in [0, 1] including
    the exact edges, boxes inside, straddling the image's edges and whole-image, and unit-scale
    features."""
    Np, Nb, B = shape.points, shape.boxes, shape.batch
    H, W = shape.feat_size
    edge = st.sampled_from([0.0, 1.0, 0.5, 1e-6, 1 - 1e-6])
    coord = st.one_of(st.floats(0, 1), edge)

    @st.composite
    def inputs(draw):
        seed = draw(st.integers(0, 2**31 - 1))
        valid_points = [draw(st.integers(1, Np)) for _ in range(B)]
        valid_boxes = [draw(st.integers(0, Nb)) for _ in range(B)]
        args = list(example_inputs(shape, seed, valid_points, valid_boxes))
        points = torch.tensor([[[draw(coord), draw(coord)] for _ in range(B)] for _ in range(Np)])  # [Np, B, 2]
        boxes = []
        for _ in range(Nb * B):
            kind = draw(st.sampled_from(["inside", "straddling", "whole", "tiny"]))
            if kind == "whole":
                boxes.append([0.5, 0.5, 1.0, 1.0])
            elif kind == "tiny":
                boxes.append([draw(coord), draw(coord), 1e-3, 1e-3])
            elif kind == "straddling":
                boxes.append([draw(edge), draw(coord), draw(st.floats(0.05, 1)), draw(st.floats(0.05, 1))])
            else:
                cx, cy = draw(st.floats(0.2, 0.8)), draw(st.floats(0.2, 0.8))
                boxes.append([cx, cy, draw(st.floats(0.01, 0.4)), draw(st.floats(0.01, 0.4))])
        args[0] = points
        args[3] = torch.tensor(boxes, dtype=torch.float32).reshape(Nb, B, 4)  # [Nb, B, 4]
        return tuple(args)

    return inputs()


def geometry_encoder_spec(
    points: int = 3,
    boxes: int = 2,
    batch: int = 1,
    feat_size=(72, 72),
    seed: int = 0,
    checkpoint: str | Path | None = None,
):
    """SAM3's geometry (prompt) encoder, production configuration, from the sam3 package.

    Returns the ModelSpec that ``surgery.pipeline.operate`` takes: module, inputs, strategy.
    """
    shape = PromptShape(points, boxes, batch, tuple(feat_size)).validate()
    encoder = build_geometry_encoder(seed=seed, checkpoint=checkpoint)
    wrapper = GeometryEncoderWrapper(encoder, shape.feat_size).eval()
    description = {
        "model": "sam3.model.geometry_encoders.SequenceGeometryEncoder (sam3.model_builder._create_geometry_encoder)",
        "weights": f"checkpoint {checkpoint}" if checkpoint else f"seeded random (seed {seed})",
        "points": points,
        "boxes": boxes,
        "batch": batch,
        "feat_size": list(shape.feat_size),
        "parameters": sum(p.numel() for p in encoder.parameters()),
    }
    return ModelSpec(
        name="geometry_encoder",
        module=wrapper,
        example_args=example_inputs(shape, seed),
        input_names=INPUT_NAMES,
        output_names=OUTPUT_NAMES,
        input_strategy=prompt_inputs(shape),
        description=description,
        stage_inputs=IMAGE_INPUTS,
        stage_names=("image", "prompt"),
    )
