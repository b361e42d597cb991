"""What is installed: the versions reports record and cache keys are made of."""

from __future__ import annotations

import platform
from collections.abc import Iterable
from importlib import metadata

# What the reports record: the interpreter and the distributions a result depends on.
REPORTED = ("python", "torch", "torchvision", "apache-tvm", "apache-tvm-ffi", "sam3", "hypothesis", "numpy", "surgery")


def installed_versions(names: Iterable[str] = REPORTED) -> dict[str, str]:
    """Version by name: ``"python"`` is the interpreter, any other name an installed
    distribution ("not installed" where it isn't)."""
    return {name: platform.python_version() if name == "python" else _distribution_version(name) for name in names}


def _distribution_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"
