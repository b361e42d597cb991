"""Stock Apache TVM (the ``apache-tvm`` wheel, unmodified) as a backend for rewritten programs.

- ``probe()`` inspects the installed TVM: its exported-program converter table, and for every
  rewrite a small behavioural check (import, build, run, compare) built from the converter bugs
  we know of. A rewrite is *needed* when its operator has no converter, fails to import, or
  gives wrong numbers. Nothing here looks at version strings: the probe asks TVM itself.
- ``import_program`` / ``build`` / ``TvmFunction`` import a program with
  ``tvm.relax.frontend.torch.from_exported_program``, fold input-independent subgraphs to
  constants (``relax.transform.FoldConstant``), compile for the host CPU (llvm) and call the
  result with torch tensors through the relax VM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import torch

PROBE_FORMAT = 3  # bump when the probe cases change, so cached verdicts are recomputed


@contextlib.contextmanager
def native_log(lines: list):
    """Collect what TVM's C++ side writes to stderr (hundreds of 'Warning:' lines per build of a
    real model) into ``lines`` instead of the terminal. Python exceptions still propagate."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read().decode(errors="replace").splitlines())


def tvm_versions() -> dict[str, str]:
    """Versions of the TVM that ``import tvm`` gives (which may sit in a target directory on
    PYTHONPATH rather than in site-packages) and of its FFI."""
    out = {}
    for dist in ("apache-tvm", "apache-tvm-ffi"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    try:
        import tvm

        out["apache-tvm"] = getattr(tvm, "__version__", out["apache-tvm"])
    except ImportError:
        pass
    return out


def _tvm():
    try:
        import tvm
        from tvm import relax
        from tvm.relax.frontend.torch import from_exported_program
    except ImportError as exc:
        raise RuntimeError(f"stock TVM is not importable (pip install apache-tvm): {exc}") from exc
    return tvm, relax, from_exported_program


def converter_table() -> frozenset[str]:
    """Operator names (``"scatter.src"``) the installed TVM's exported-program importer converts."""
    _tvm()
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    return frozenset(ExportedProgramImporter().create_convert_map())


def import_program(program: torch.export.ExportedProgram):
    """ExportedProgram -> relax IRModule, with input-independent subgraphs folded to constants."""
    tvm, relax, from_exported_program = _tvm()
    mod = from_exported_program(program, keep_params_as_input=False)
    return relax.transform.FoldConstant()(mod)


def build(mod, target: str = "llvm"):
    tvm, relax, _ = _tvm()
    return tvm.compile(mod, target=target) if hasattr(tvm, "compile") else relax.build(mod, target=target)


def _to_tvm(array: np.ndarray, device):
    tvm, _, _ = _tvm()
    if hasattr(tvm.runtime, "tensor"):
        return tvm.runtime.tensor(array, device=device)
    return tvm.nd.array(array, device=device)


def _to_torch(value) -> list[torch.Tensor]:
    if hasattr(value, "numpy"):
        return [torch.from_numpy(value.numpy())]
    out = []
    for item in value:  # tuples (Array of tensors) come back nested
        out.extend(_to_torch(item))
    return out


class TvmFunction:
    """A compiled program called like the original: torch tensors in, tuple of tensors out."""

    def __init__(self, executable, device=None):
        tvm, relax, _ = _tvm()
        self.device = device or tvm.cpu()
        self.executable = executable
        self.vm = relax.VirtualMachine(executable, self.device)

    @classmethod
    def load(cls, path: str | Path) -> "TvmFunction":
        tvm, _, _ = _tvm()
        return cls(tvm.runtime.load_module(str(path)))

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = [_to_tvm(np.ascontiguousarray(a.detach().cpu().numpy()), self.device) for a in args]
        return tuple(_to_torch(self.vm["main"](*inputs)))

    def export_library(self, path: str | Path) -> None:
        self.executable.export_library(str(path))


def compile_program(program: torch.export.ExportedProgram, target: str = "llvm") -> tuple[TvmFunction, dict]:
    """Import, build and wrap a program; also returns the stage timings in seconds."""
    start = time.perf_counter()
    mod = import_program(program)
    imported = time.perf_counter()
    executable = build(mod, target)
    built = time.perf_counter()
    return TvmFunction(executable), {"import_s": imported - start, "build_s": built - imported}


# ----------------------------------------------------------------------------- probe


@dataclasses.dataclass
class Finding:
    rewrite: str
    needed: bool
    reason: str


@dataclasses.dataclass
class TvmProbe:
    versions: dict
    findings: dict[str, Finding]
    seconds: float
    cached: bool = False

    def needed(self) -> list[str]:
        return [name for name, f in self.findings.items() if f.needed]


def _probe_one(name: str, rewrite, converters: frozenset[str]) -> Finding:
    from .equivalence.compare import compare

    ops = [str(op).split(".", 1)[1] for op in rewrite.decompositions()]  # "scatter.src"
    missing = [op for op in ops if op not in converters]
    case = rewrite.probe_case()
    program = torch.export.export(case.module(), case.args()).run_decompositions()
    present = [op for op in ops if any(str(n.target).endswith(op) for n in program.graph.nodes if n.op == "call_function")]
    # An operator torch's default decomposition removes before TVM sees it (where.ScalarOther)
    # needs no converter of its own: then the behavioural check decides.
    if missing and present and set(missing) >= set(present):
        return Finding(name, True, f"no converter for {', '.join(missing)}")
    try:
        with native_log([]):
            fn, _ = compile_program(program)
        actual = fn(*case.args())
    except Exception as exc:  # the converter exists but the import or build fails
        first = (str(exc).strip().splitlines() or [""])[-1][:200]
        return Finding(name, True, f"converter fails on {rewrite.probe_note}: {type(exc).__name__}: {first}")
    expected = case.reference()
    stats = compare(actual[0].to(expected.dtype), expected, scale=case.scale) if actual[0].shape == expected.shape else None
    if stats is None or not stats.within_bounds():
        got = f"shape {tuple(actual[0].shape)} vs {tuple(expected.shape)}" if stats is None else str(stats)
        return Finding(name, True, f"converter gives wrong numbers on {rewrite.probe_note}: {got}")
    return Finding(name, False, f"converter correct on {rewrite.probe_note}")


def probe(cache_dir: str | Path | None = None, progress: Callable[[str], None] = lambda m: None) -> TvmProbe:
    """Which rewrites the installed TVM needs, and why. Cached per TVM version on disk."""
    from .rewrites import REGISTRY

    versions = tvm_versions()
    cache_dir = Path(cache_dir or os.environ.get("SURGERY_CACHE", Path.home() / ".cache" / "surgery"))
    key = f"tvm-probe-v{PROBE_FORMAT}-{versions['apache-tvm']}-{versions['apache-tvm-ffi']}-torch{torch.__version__}.json"
    cached = cache_dir / key
    if cached.is_file():
        try:
            data = json.loads(cached.read_text())
            if set(data["findings"]) != set(REGISTRY):
                raise KeyError("cached verdicts are for another set of rewrites")
            return TvmProbe(data["versions"], {k: Finding(**v) for k, v in data["findings"].items()}, data["seconds"], cached=True)
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is recomputed
    start = time.perf_counter()
    converters = converter_table()
    findings = {}
    for name, cls in REGISTRY.items():
        progress(f"probing TVM's converter for {name}")
        findings[name] = _probe_one(name, cls(), converters)
    result = TvmProbe(versions, findings, time.perf_counter() - start)
    from .atomic import write_text

    try:
        write_text(cached, json.dumps({"versions": versions, "seconds": result.seconds,
                                       "findings": {k: dataclasses.asdict(v) for k, v in findings.items()}}, indent=2))
    except OSError:
        pass  # a read-only home is no reason to fail; we just probe again next time
    return result
