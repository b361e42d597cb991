"""Paths as reports show them: relative to the project (or working) directory, and the home
directory as ``~``, so that a committed report names no one's machine."""

from __future__ import annotations

import os
from pathlib import Path


def display_path(path: str | os.PathLike, root: str | os.PathLike | None = None) -> str:
    """``path`` relative to ``root`` (default: the working directory) when it lies under it, else
    under ``~`` when it lies in the home directory, else as given."""
    path = Path(path)
    root = Path.cwd() if root is None else Path(root)
    if not path.is_absolute():
        return str(path)
    if path.is_relative_to(root):
        return path.relative_to(root).as_posix()
    if path.is_relative_to(Path.home()):
        return (Path("~") / path.relative_to(Path.home())).as_posix()
    return str(path)
