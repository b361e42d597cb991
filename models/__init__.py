"""Adapters for the models we operate on. Each returns a ``surgery.pipeline.ModelSpec``."""

from .checkpoint import CheckpointError
from .deformable_detr import deformable_detr_spec
from .geometry_encoder import geometry_encoder_spec
from .maskrcnn import maskrcnn_spec
from .rt_detr import rt_detr_spec

MODELS = {
    "geometry_encoder": geometry_encoder_spec,
    "rt_detr": rt_detr_spec,
    "deformable_detr": deformable_detr_spec,
    "maskrcnn": maskrcnn_spec,
}

__all__ = [
    "MODELS",
    "CheckpointError",
    "deformable_detr_spec",
    "geometry_encoder_spec",
    "maskrcnn_spec",
    "rt_detr_spec",
]
