"""Deformable DETR (``transformers.DeformableDetrForObjectDetection``), ready for torch.export.

``build_deformable_detr`` builds the official transformers class in the architecture of the
released SenseTime/deformable-detr checkpoint (transformers' default config: timm ResNet-50
backbone, 4 feature levels, 6 encoder and 6 decoder layers, 300 queries, single stage, no box
refinement; 40.0 M parameters), with 91 COCO classes, seeded random weights made to look
trained (``models.detection.look_trained``) or weights from a local ``save_pretrained``
directory. The backbone is built from timm's architecture alone (no pretrained download).

Multi-scale deformable attention samples every level with ``F.grid_sample``; the sine position
embedding divides a float tensor with ``torch.div(..., rounding_mode="floor")``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .detection import build_detector, detector_spec

STRIDE = 64  # the extra level downsamples the stride-32 map once more: sizes are multiples of 64


def deformable_detr_config():
    """The config of the released SenseTime/deformable-detr checkpoint (no pretrained backbone)."""
    from transformers import DeformableDetrConfig

    config = DeformableDetrConfig(num_labels=91)
    config.backbone_config.use_pretrained_backbone = False
    return config


def build_deformable_detr(
    seed: int = 0, checkpoint: str | Path | None = None, calibration_size: tuple[int, int] = (256, 256)
) -> torch.nn.Module:
    """``DeformableDetrForObjectDetection`` in eval mode: seeded random weights that look trained
    (calibrated on two synthetic images of ``calibration_size``), or a checkpoint directory."""
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

    return build_detector(
        DeformableDetrForObjectDetection,
        DeformableDetrConfig,
        deformable_detr_config,
        seed,
        checkpoint,
        calibration_size,
    )


def deformable_detr_spec(
    image_size=(512, 512),
    batch: int = 1,
    seed: int = 0,
    checkpoint: str | Path | None = None,
):
    """Deformable DETR (transformers DeformableDetrForObjectDetection, ResNet-50), random weights made to look trained."""
    return detector_spec(
        "deformable_detr",
        "transformers.DeformableDetrForObjectDetection (ResNet-50)",
        lambda: build_deformable_detr(seed, checkpoint),
        image_size,
        STRIDE,
        batch,
        seed,
        checkpoint,
    )
