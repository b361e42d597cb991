"""What the detectors share: seeded random weights that behave like a trained model's, their
health, synthetic images, image sizes; and for the DETR-style detectors from ``transformers`` a
tensor-only wrapper, checkpoint loading and the ModelSpec.

Why the weights need work. transformers' random initialisation is made for training, not for
testing a compiler: BatchNorm scales are drawn from N(0, 0.01) with running statistics left at
(0, 1), so every normalised feature map collapses to nearly a constant (std 1e-7 to 1e-13 across
positions in RT-DETR's hybrid encoder) and every query-selection score ties; deformable
attention starts with zero sampling-offset and attention-weight projections, so where it samples
does not depend on the query; the box heads' last layers are zero, so boxes are the reference
points; learned query embeddings are N(0, 0.02), so every reference point sits at the centre. An equivalence check on such a model tests almost nothing.

``look_trained`` fixes that the way data-dependent initialisation does (Mishkin & Matas, "All
you need is a good init", 2016): one forward pass over calibration images, in execution order,
sets each BatchNorm's running statistics to the mean and variance of what it actually receives,
and draws its affine scale and shift as a trained network's look (scale in [0.5, 1], shift
N(0, 0.25)); so every normalised map is unit-scale and varies across positions. The deformable
attention projections and the box heads' last layers get small seeded random weights, and
learned query embeddings unit-scale ones, so sampling locations, attention weights, reference
points and box refinements depend on the query.
``feature_health`` measures the result (tests/test_detectors.py checks it).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from hypothesis import strategies as st
from torch import Tensor, nn

from surgery.pipeline import ModelSpec

from .checkpoint import CheckpointError

# ImageNet normalisation, as the detectors' image processors apply it.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
OUTPUT_NAMES = ("logits", "pred_boxes", "last_hidden_state")
CALIBRATION_SEED = 12345  # calibration images, apart from the example inputs' seeds


class DetectorWrapper(nn.Module):
    """Tensor-only signature of a transformers ``*ForObjectDetection`` model, for torch.export.

    Input:  pixel_values       [B, 3, H, W] normalised image
    Output: logits             [B, Q, C]    class logits per query
            pred_boxes         [B, Q, 4]    normalised cx, cy, w, h in [0, 1]
            last_hidden_state  [B, Q, D]    the decoder's last hidden states
    """

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, pixel_values):
        out = self.detector(pixel_values=pixel_values)
        return out.logits, out.pred_boxes, out.last_hidden_state


# ----------------------------------------------------------------------------- building


def build_detector(
    model_class, config_class, config, seed: int, checkpoint: str | Path | None, calibration_size: tuple[int, int]
) -> nn.Module:
    """A transformers detector in eval mode: from a ``save_pretrained`` directory, or built from
    ``config()`` with seeded random weights made to look trained (calibrated on two synthetic
    images of ``calibration_size``)."""
    if checkpoint is not None:
        return load_pretrained(model_class, config_class, checkpoint)
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = model_class(config()).eval()
    return look_trained(model, synthetic_images(2, calibration_size, CALIBRATION_SEED), seed)


def detector_spec(
    name: str,
    label: str,
    build: Callable[[], nn.Module],
    image_size,
    stride: int,
    batch: int,
    seed: int,
    checkpoint: str | Path | None,
    query_dim: int | None = None,
) -> ModelSpec:
    """The ModelSpec of a detector ``build()`` makes, described as ``label``: its image size
    and batch checked before it is built, synthetic images as inputs, judged against float64."""
    size = check_image_size(tuple(image_size), stride)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    detector = build()
    description = {
        "model": label,
        "weights": f"checkpoint {checkpoint}"
        if checkpoint
        else f"seeded random (seed {seed}), BatchNorm calibrated and zero projections drawn to look trained",
        "image_size": list(size),
        "batch": batch,
        "parameters": sum(p.numel() for p in detector.parameters()),
    }
    return ModelSpec(
        name=name,
        module=DetectorWrapper(detector).eval(),
        example_args=(synthetic_images(batch, size, seed),),
        input_names=("pixel_values",),
        output_names=OUTPUT_NAMES,
        input_strategy=image_inputs(batch, size),
        description=description,
        judged=True,  # deep: float32 noise past 1e-5, judged against a float64 run instead
        examples=3,  # an example runs the detector three times, once in float64 node by node
        # our speed rewrites and schedules: stock TVM's scalar loops take over 30 s a call at 256x256
        schedules="ours",
        query_dim=query_dim,
    )


# ----------------------------------------------------------------------------- weights


def _is_batch_norm(module: nn.Module) -> bool:
    # nn.BatchNorm2d and transformers' FrozenBatchNorm2d classes (buffers, no nn base class)
    return all(isinstance(getattr(module, k, None), Tensor) for k in ("weight", "bias", "running_mean", "running_var"))


def pixel_values_forward(model: nn.Module, images: Tensor):
    """How a transformers detector runs on images [N, 3, H, W]."""
    return model(pixel_values=images)


@torch.no_grad()
def look_trained(
    model: nn.Module, calibration, seed: int, forward=pixel_values_forward, unit_scale: tuple[nn.Module, ...] = ()
) -> nn.Module:
    """Make a randomly initialised detector's activations look like a trained one's (see the
    module docstring): calibrate every BatchNorm on one ``forward(model, calibration)`` pass
    (by default ``calibration`` is images [N, 3, H, W]), in execution order, and rescale the
    weights of each ``unit_scale`` layer (a Linear or convolution) so that its output has unit
    standard deviation on that pass, as LSUV initialisation does; give the deformable-attention
    and box-head projections that start at zero small random weights, and learned query
    embeddings unit-scale ones. Deterministic for a given seed and calibration."""
    generator = torch.Generator().manual_seed(seed)
    calibrated: set[int] = set()

    def calibrate(module, inputs):
        if id(module) in calibrated:
            return
        calibrated.add(id(module))
        x = inputs[0]  # [N, C, H, W]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))
        channels = module.weight.shape[0]
        module.weight.copy_(0.5 + 0.5 * torch.rand(channels, generator=generator))
        module.bias.copy_(0.25 * torch.randn(channels, generator=generator))

    def rescale(module, inputs, output):
        if id(module) in calibrated:
            return None
        calibrated.add(id(module))
        factor = 1 / output.std()
        module.weight.mul_(factor)
        if module.bias is not None:
            module.bias.mul_(factor)
        return output * factor  # what the rescaled layer gives: the layers after it calibrate on that

    hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules() if _is_batch_norm(m)]
    hooks += [m.register_forward_hook(rescale) for m in unit_scale]
    _randomise_zero_projections(model, generator)
    was_training = model.training
    model.eval()  # BatchNorm normalises with the statistics calibrate() just set
    try:
        forward(model, calibration)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return model


def _randomise_zero_projections(model: nn.Module, generator: torch.Generator) -> None:
    """Deformable attention's offset and attention-weight projections, and each box head's last
    layer, start at zero: small random weights make them depend on the query, as trained. Learned
    query position embeddings start at N(0, 0.02), which puts every reference point at the
    image's centre: unit-scale ones spread them over the image, as trained."""
    for module in model.modules():
        queries = getattr(module, "query_position_embeddings", None)
        if isinstance(queries, nn.Embedding):
            queries.weight.copy_(torch.randn(queries.weight.shape, generator=generator))
        for name in ("sampling_offsets", "attention_weights"):
            linear = getattr(module, name, None)
            if isinstance(linear, nn.Linear):
                linear.weight.copy_(0.02 * torch.randn(linear.weight.shape, generator=generator))
        layers = getattr(module, "layers", None)
        if type(module).__name__.endswith("MLPPredictionHead") and isinstance(layers, nn.ModuleList):
            last = layers[-1]
            if isinstance(last, nn.Linear) and not last.weight.any():
                last.weight.copy_(0.01 * torch.randn(last.weight.shape, generator=generator))


@dataclasses.dataclass(frozen=True)
class FeatureHealth:
    """How alive a detector's activations are on some images: the smallest standard deviation
    across positions of any normalised feature map's channel-mean (0 when a map is constant),
    the median standard deviation of the normalised maps (1 for unit scale), the spread of the
    selection scores, and the smallest gap between two scores (0 when scores tie)."""

    min_position_std: float
    typical_scale: float
    score_std: float
    min_score_gap: float


@torch.no_grad()
def feature_health(model: nn.Module, images, scores_of, forward=pixel_values_forward) -> FeatureHealth:
    """Measure ``FeatureHealth`` of ``model`` on ``forward(model, images)`` (by default images
    [B, 3, H, W]). ``scores_of(outputs)`` returns the scores [B, P] the model ranks: the
    positions it selects queries from, its queries, or its boxes' classes."""
    position_stds, scales = [], []

    def record(module, inputs, output):
        position_stds.append(float(output.mean(dim=1).flatten(1).std(dim=1).min()))  # [B, H*W] -> std
        scales.append(float(output.std()))

    hooks = [m.register_forward_hook(record) for m in model.modules() if _is_batch_norm(m)]
    try:
        outputs = forward(model, images)
    finally:
        for hook in hooks:
            hook.remove()
    scores = scores_of(outputs)  # [B, P]
    ranked = scores.sort(dim=-1, descending=True).values
    gaps = (ranked[:, :-1] - ranked[:, 1:]).abs()
    return FeatureHealth(
        min(position_stds), float(torch.tensor(scales).median()), float(scores.std()), float(gaps.min())
    )


# ----------------------------------------------------------------------------- images


def synthetic_photographs(batch: int, size: tuple[int, int], seed: int) -> Tensor:
    """Seeded images [B, 3, H, W] in [0, 1] that look enough like photographs for a detector: a
    smooth background, a few bright and dark rectangles (objects with edges), mild noise."""
    g = torch.Generator().manual_seed(seed)
    H, W = size
    background = torch.rand(batch, 3, 4, 4, generator=g)  # [B, 3, 4, 4]
    image = nn.functional.interpolate(background, size=(H, W), mode="bilinear", align_corners=False)  # [B, 3, H, W]
    for b in range(batch):
        for _ in range(int(torch.randint(2, 7, (), generator=g))):
            y0, x0 = int(torch.randint(0, H - 8, (), generator=g)), int(torch.randint(0, W - 8, (), generator=g))
            h = int(torch.randint(8, max(9, H // 2), (), generator=g))
            w = int(torch.randint(8, max(9, W // 2), (), generator=g))
            image[b, :, y0 : y0 + h, x0 : x0 + w] = torch.rand(3, 1, 1, generator=g)
    return (image + 0.03 * torch.randn(image.shape, generator=g)).clamp(0, 1)  # [B, 3, H, W]


def synthetic_images(batch: int, size: tuple[int, int], seed: int) -> Tensor:
    """``synthetic_photographs`` normalised with ImageNet's mean and std, as the image processors do."""
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (synthetic_photographs(batch, size, seed) - mean) / std


def image_inputs(batch: int, size: tuple[int, int]):
    """Hypothesis strategy of wrapper inputs: one seeded synthetic image batch per example."""
    return st.integers(0, 2**31 - 1).map(lambda seed: (synthetic_images(batch, size, seed),))


def check_image_size(size: tuple[int, int], multiple: int) -> tuple[int, int]:
    """The image size as (H, W), checked: positive multiples of the backbone's largest stride."""
    H, W = size
    if H < multiple or W < multiple or H % multiple or W % multiple:
        raise ValueError(f"image size must be a multiple of {multiple} in each dimension, got {H}x{W}")
    return H, W


# ----------------------------------------------------------------------------- checkpoints


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' progress bars, its table of missing keys and its warning about model types:
    what doesn't fit is said in our one line instead."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        transformers_logging.enable_progress_bar()


def load_pretrained(model_class, config_class, directory: str | Path) -> nn.Module:
    """A model from a local ``save_pretrained`` directory (config.json + weights), no downloads.
    Raises ``CheckpointError`` saying why it can't be loaded."""
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a directory (expected a save_pretrained directory)")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has no config.json (expected a save_pretrained directory)")
    with _quiet_transformers():
        try:
            config = config_class.from_pretrained(path, local_files_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"checkpoint {str(path)!r}: config.json is not a {config_class.__name__}: {exc}"
            ) from None
        if config.model_type != config_class.model_type:
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds a {config.model_type!r} model, expected {config_class.model_type!r}"
            )
        try:
            model, info = model_class.from_pretrained(path, local_files_only=True, output_loading_info=True)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise CheckpointError(f"checkpoint {str(path)!r} can't be loaded: {type(exc).__name__}: {first}") from None
    problems = [
        f"{label}: {', '.join(sorted(info[key])[:8])}"
        + (f", ... ({len(info[key])} in all)" if len(info[key]) > 8 else "")
        for label, key in (("missing keys", "missing_keys"), ("unexpected keys", "unexpected_keys"))
        if info.get(key)
    ]
    problems += [f"wrong shapes: {m}" for m in sorted(map(str, info.get("mismatched_keys") or ()))[:8]]
    if problems:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit {model_class.__name__}: " + "; ".join(problems))
    return model.eval()
