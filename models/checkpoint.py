"""The error every adapter raises for weights it can't load, and the state_dict checks the
adapters that take a ``torch.save``d state_dict share."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn


class CheckpointError(ValueError):
    """A checkpoint that can't be loaded into the model: the message says why."""


def read_state_dict(path: str | Path) -> dict:
    """The state_dict a ``torch.save``d file holds (directly, or under ``"model"`` as training
    checkpoints keep it). Raises ``CheckpointError`` when the file is missing, unreadable, or
    holds something else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a readable torch checkpoint: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"checkpoint {str(path)!r} holds no state_dict (got {type(state).__name__})")
    return state


def load_fitting(module: nn.Module, state: dict, path: str | Path, what: str) -> None:
    """Load ``state`` (read from ``path``) into ``module`` (described as ``what``) when every key
    and shape fits; else raise ``CheckpointError`` naming the missing and unexpected keys and the
    wrong shapes, the first eight of each."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{k} {tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__} (expected {tuple(expected[k].shape)})"
        for k, v in state.items()
        if k in expected and (not isinstance(v, Tensor) or v.shape != expected[k].shape)
    )
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong_shape)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"checkpoint {str(Path(path))!r} does not fit {what}: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)
