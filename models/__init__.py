"""Adapters for the models we operate on. Each returns a ``surgery.pipeline.ModelSpec``."""

from .geometry_encoder import geometry_encoder_spec

MODELS = {
    "geometry_encoder": geometry_encoder_spec,
}

__all__ = ["MODELS", "geometry_encoder_spec"]
