"""RT-DETR (``transformers.RTDetrForObjectDetection``), ready for torch.export.

``build_rt_detr`` builds the official transformers class in the architecture of a released
checkpoint: ``r18vd`` (PekingU/rtdetr_r18vd: ResNet-18-vd, 3 decoder layers, hidden expansion
0.5; 20.2 M parameters) or ``r50vd`` (PekingU/rtdetr_r50vd: transformers' default RT-DETR
config; 42.9 M), 80 COCO classes, with seeded random weights made to look trained
(``models.detection.look_trained``) or weights from a local ``save_pretrained`` directory.

The decoder samples each feature level with ``F.grid_sample`` (multi-scale deformable attention's
pure-PyTorch path), selects its 300 queries with ``topk``, and masks anchors with
``(anchors > eps) * (anchors < 1 - eps)``: a product of booleans.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .detection import build_detector, detector_spec

VARIANTS = ("r18vd", "r50vd")
STRIDE = 32  # the backbone's largest stride: image sizes are multiples of it


def rt_detr_config(variant: str = "r18vd"):
    """The config of a released RT-DETR checkpoint, as transformers' conversion script sets it."""
    from transformers import RTDetrConfig

    if variant not in VARIANTS:
        raise ValueError(f"unknown RT-DETR variant {variant!r}; known: {', '.join(VARIANTS)}")
    config = RTDetrConfig(num_labels=80)
    if variant == "r18vd":
        config.backbone_config.hidden_sizes = [64, 128, 256, 512]
        config.backbone_config.depths = [2, 2, 2, 2]
        config.backbone_config.layer_type = "basic"
        config.encoder_in_channels = [128, 256, 512]
        config.hidden_expansion = 0.5
        config.decoder_layers = 3
    return config


def build_rt_detr(
    variant: str = "r18vd",
    seed: int = 0,
    checkpoint: str | Path | None = None,
    calibration_size: tuple[int, int] = (320, 320),
) -> torch.nn.Module:
    """``RTDetrForObjectDetection`` in eval mode: seeded random weights that look trained
    (calibrated on two synthetic images of ``calibration_size``), or a checkpoint directory."""
    from transformers import RTDetrConfig, RTDetrForObjectDetection

    return build_detector(
        RTDetrForObjectDetection, RTDetrConfig, lambda: rt_detr_config(variant), seed, checkpoint, calibration_size
    )


def selection_scores(outputs) -> torch.Tensor:
    """The per-position scores RT-DETR selects its queries from: the encoder's best class logit
    at each anchor [B, P] (invalid anchors included, as the model ranks them)."""
    return outputs.enc_outputs_class.max(dim=-1).values


def rt_detr_spec(
    image_size=(640, 640),
    variant: str = "r18vd",
    batch: int = 1,
    seed: int = 0,
    checkpoint: str | Path | None = None,
):
    """RT-DETR (transformers RTDetrForObjectDetection, r18vd or r50vd), random weights made to look trained."""
    return detector_spec(
        "rt_detr",
        f"transformers.RTDetrForObjectDetection ({variant if checkpoint is None else 'from checkpoint'})",
        lambda: build_rt_detr(variant, seed, checkpoint),
        image_size,
        STRIDE,
        batch,
        seed,
        checkpoint,
        query_dim=1,  # queries ranked by topk: near-ties may order them otherwise (verified, docs/detectors.md)
    )
