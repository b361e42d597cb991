"""User probe cases: reproducers a user has filed with the rewrite that fixes them, so that
``--rewrite auto`` applies that rewrite whenever the installed TVM still fails the case, without
editing this package.

They live in ``$SURGERY_PROBES`` (default ``$XDG_CONFIG_HOME/surgery/probes``, i.e.
``~/.config/surgery/probes``: user data, kept when the cache is cleared), one directory per case
holding a reproducer as ``surgery.locate`` writes it (``program.pt2``, ``inputs.pt``,
``case.json``, ``reproduce.py``) plus the rewrite's name in ``case.json``. ``surgery.tvm_backend.probe``
runs every case and keys its cached verdicts on ``digest()`` of them all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

REPRODUCER_FILES = ("program.pt2", "inputs.pt", "case.json", "reproduce.py")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class ProbeCaseError(ValueError):
    """A probe case that cannot be stored, found or read."""


def probes_dir() -> Path:
    if os.environ.get("SURGERY_PROBES"):
        return Path(os.environ["SURGERY_PROBES"])
    config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config) / "surgery" / "probes"


@dataclasses.dataclass
class ProbeCase:
    name: str
    directory: Path
    rewrite: str
    operator: str
    failure: str  # what TVM did when the case was filed

    @property
    def program(self) -> Path:
        return self.directory / "program.pt2"

    @property
    def inputs(self) -> Path:
        return self.directory / "inputs.pt"

    @classmethod
    def read(cls, directory: Path) -> ProbeCase:
        try:
            case = json.loads((directory / "case.json").read_text())
            return cls(directory.name, directory, case["rewrite"], case.get("operator", "?"), case.get("failure", ""))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ProbeCaseError(f"{str(directory)!r} is not a probe case: {type(exc).__name__}: {exc}") from None


def user_cases(root: Path | None = None) -> list[ProbeCase]:
    """Every probe case in ``root`` (default ``probes_dir()``), by name; unreadable ones skipped."""
    root = probes_dir() if root is None else Path(root)
    cases = []
    for directory in sorted(root.iterdir()) if root.is_dir() else []:
        if directory.is_dir() and not directory.name.startswith("."):
            try:
                cases.append(ProbeCase.read(directory))
            except ProbeCaseError:
                continue
    return cases


def digest(root: Path | None = None) -> str:
    """A digest of every case's files: changes whenever a case is added, removed or edited."""
    hasher = hashlib.sha256()
    for case in user_cases(root):
        for name in REPRODUCER_FILES[:3]:
            path = case.directory / name
            hasher.update(f"{case.name}/{name}".encode())
            hasher.update(path.read_bytes() if path.is_file() else b"")
    return hasher.hexdigest()


def add_case(reproducer: str | Path, rewrite: str, name: str | None = None, root: Path | None = None) -> ProbeCase:
    """Copy a reproducer directory in as a probe case for ``rewrite`` (replacing a case of the
    same name in one step: the new directory is complete before it takes the name)."""
    reproducer = Path(reproducer)
    missing = [f for f in REPRODUCER_FILES[:3] if not (reproducer / f).is_file()]
    if missing:
        raise ProbeCaseError(f"{str(reproducer)!r} is not a reproducer directory (no {', '.join(missing)})")
    name = name or reproducer.name
    if not _NAME.match(name):
        raise ProbeCaseError(f"probe case names are letters, digits, '_', '.' and '-': {name!r}")
    root = probes_dir() if root is None else Path(root)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        for file in REPRODUCER_FILES:
            if (reproducer / file).is_file():
                shutil.copyfile(reproducer / file, staging / file)
        case = json.loads((staging / "case.json").read_text())
        case["rewrite"] = rewrite
        (staging / "case.json").write_text(json.dumps(case, indent=2) + "\n")
        target = root / name
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ProbeCase.read(target)


def remove_case(name: str, root: Path | None = None) -> Path:
    root = probes_dir() if root is None else Path(root)
    target = root / name
    if not _NAME.match(name) or not (target / "case.json").is_file():
        raise ProbeCaseError(f"no probe case {name!r} in {str(root)!r}")
    shutil.rmtree(target)
    return target
