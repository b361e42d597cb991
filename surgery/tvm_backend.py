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
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision  # noqa: F401  programs holding torchvision ops need it registered before loading

from . import rewrite_with_log
from .atomic import atomic_path, write_text
from .equivalence.compare import compare
from .equivalence.judge import judge_outputs
from .paths import display_path
from .probes import digest, user_cases
from .rewrites import REGISTRY, SPEED_REWRITES, ConvIm2col, MatmulPacking
from .versions import installed_versions

# TVM (and surgery.schedules, which imports it) is imported inside the functions that use it:
# it takes seconds to import, rewriting and verifying never need it, and where it is missing
# only the functions that use it fail.

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
    out = installed_versions(("apache-tvm", "apache-tvm-ffi"))
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


def error_line(exc: BaseException, limit: int = 500) -> str:
    """An exception in one line: its type and the last line of its message (TVM's errors end
    with the check that failed, after a C++ backtrace)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {(lines or [''])[-1].strip()[:limit]}"


def converter_table() -> frozenset[str]:
    """Operator names (``"scatter.src"``) the installed TVM's exported-program importer converts."""
    _tvm()
    from tvm.relax.frontend.torch.exported_program_translator import (
        ExportedProgramImporter,
    )

    return frozenset(ExportedProgramImporter().create_convert_map())


def convert_program(program: torch.export.ExportedProgram):
    """ExportedProgram -> relax IRModule, as TVM's exported-program importer gives it."""
    _, _, from_exported_program = _tvm()
    return from_exported_program(program, keep_params_as_input=False)


def output_types(mod) -> list[tuple[tuple[int, ...] | None, str]]:
    """(shape, dtype) of each tensor an imported module's ``main`` returns, as TVM's importer
    inferred them (shape None where not static): what the converters claim they compute."""
    main = mod["main"]
    returned = getattr(main, "ret_ty", None) or getattr(main, "ret_struct_info", None)  # 0.27 / older
    types = []
    for field in list(returned.fields) if hasattr(returned, "fields") else [returned]:
        try:
            shape = tuple(int(v) for v in field.shape.values)
        except (AttributeError, TypeError, ValueError):
            shape = None
        types.append((shape, str(getattr(field, "dtype", ""))))
    return types


def fold_constants(mod):
    """Input-independent subgraphs of an imported module computed and replaced by constants."""
    _, relax, _ = _tvm()
    return relax.transform.FoldConstant()(mod)


def import_program(program: torch.export.ExportedProgram):
    """ExportedProgram -> relax IRModule, with input-independent subgraphs folded to constants."""
    return fold_constants(convert_program(program))


SCHEDULES = ("ours", "default")


@functools.cache
def builder_digest() -> str:
    """A digest of the code that turns a program into a library (this module, the schedule rules
    and the tile plans of products and convolutions): part of a cached library's key, so a
    library built by other code is never loaded."""
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    plans = [here / "matmul_tiling.py", here / "conv_tiling.py"]
    for path in sorted([here / "tvm_backend.py", *plans, *(here / "schedules").glob("*.py")]):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def host_target(schedules: str = "ours", fma: bool = False):
    """``"default"``: plain ``llvm`` as stock TVM builds it. ``"ours"``: llvm for this CPU
    (``mcpu`` = the host's, e.g. znver4) and its core count, for our schedules; on x86 with FMA
    off unless ``fma`` (the target ``build`` compiles contraction-safe matmul kernels for)."""
    tvm, _, _ = _tvm()
    if schedules == "default":
        return "llvm"
    from tvm.target import codegen

    target = {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": os.cpu_count() or 1}
    if codegen.llvm_get_system_triple().startswith("x86_64") and not fma:
        # No FMA: TVM lets LLVM contract a*b+c into one fused multiply-add (one rounding where
        # PyTorch rounds twice). With it, the whole-model property test found a batch-2 prompt
        # (points on the image's edge) where the encoder came out 0.0096 off; without it, and
        # with stock TVM's plain llvm target (no FMA either), 2.2e-6. LLVM ties AVX-512 to FMA,
        # so this target has AVX2 only; matmul and row-reduction kernels with no step function
        # reading a contracted value get both back (schedules.FMA_ANNOTATION).
        target["mattr"] = ["-fma"]
    return tvm.target.Target(target)


def build(mod, target=None, schedules: str = "default"):
    """Compile an imported module for the host CPU: stock TVM's CPU pipeline as it is
    (``"default"``), or with our schedule rules applied after fusion (``"ours"``)."""
    if schedules not in SCHEDULES:
        raise ValueError(f"schedules must be one of {SCHEDULES}, got {schedules!r}")
    tvm, relax, _ = _tvm()
    target = host_target(schedules) if target is None else target
    if schedules == "ours":
        from .schedules import pipeline

        target = tvm.target.Target(target)
        fma_target = host_target(schedules, fma=True)
        if str(target) != str(host_target(schedules)) or str(fma_target) == str(target):
            return tvm.compile(mod, target=target, relax_pipeline=pipeline(target))
        return _build_with_fma_kernels(mod, target, fma_target)
    return tvm.compile(mod, target=target) if hasattr(tvm, "compile") else relax.build(mod, target=target)


def _build_with_fma_kernels(mod, target, fma_target):
    """``tvm.compile`` with our pipeline, except that the kernels our Matmul rule marked
    contraction-safe (``surgery.schedules.FMA_ANNOTATION``) are compiled for ``fma_target`` as a
    library of their own, linked into the executable: TVM compiles every CPU kernel of one module
    for one LLVM target, and FMA must stay off for the rest. These are the steps of
    ``relax.build`` (TVM 0.27), with the kernels split in two before code generation."""
    tvm, relax, _ = _tvm()
    from tvm.relax import vm_build

    from .schedules import is_fma_kernel, pipeline

    with target:
        mod = pipeline(target)(mod)
    attrs = dict(mod.attrs) if mod.attrs else {}
    ext_libs = list(attrs.get("external_mods", []))
    params = dict(attrs.get("const_name_to_constant", {}))
    builder = relax.ExecBuilder()
    mod = vm_build._vmcodegen(builder, mod, "bytecode")
    kernels = vm_build._filter_tir(mod)
    if kernels is None:
        return vm_build._vmlink(builder=builder, target=target, tir_mod=None, ext_libs=ext_libs, params=params)
    fma = {gv: f for gv, f in kernels.functions.items() if is_fma_kernel(f)}
    rest = {gv: f for gv, f in kernels.functions.items() if gv not in fma}
    if fma:
        ext_libs.append(tvm.tirx.build(tvm.IRModule(fma, attrs=kernels.attrs), target=fma_target))
    return vm_build._vmlink(
        builder=builder,
        target=target,
        tir_mod=tvm.IRModule(rest, attrs=kernels.attrs),
        ext_libs=ext_libs,
        params=params,
    )


def speed_rewrites(
    program: torch.export.ExportedProgram, stage_inputs: Sequence[str] = ()
) -> tuple[torch.export.ExportedProgram, dict]:
    """The speed rewrites (``surgery.rewrites.SPEED_REWRITES``) on a program, for this CPU: what
    the shipped build compiles. Returns the program and what each replaced. With
    ``stage_inputs`` (the program will be cut into a stage computed from those inputs and the
    rest, ``surgery.stages.hoist``) attention is not reassociated, since the split hoists the
    key/value projections out of the per-call path and reassociating them would move that work
    back into it; and products whose right-hand side the stage computes are packed in the stage."""
    from .schedules.matmul import vector_registers

    registers, lanes = vector_registers(host_target())
    configured = {
        MatmulPacking.name: MatmulPacking(stage_inputs, registers, lanes),
        # the Conv schedule rule computes most convolutions in place; im2col takes the rest
        ConvIm2col.name: ConvIm2col(leave_direct=True),
    }
    rewrites = [
        configured.get(name, name)
        for name in SPEED_REWRITES
        if not (stage_inputs and name == "attention_reassociation")
    ]
    program, log = rewrite_with_log(program, rewrites)
    return program, {rw.name: dict(result.replaced) for rw, result in log if result.modified}


def program_fingerprint(program: torch.export.ExportedProgram) -> str:
    """A digest of everything that decides a compiled library: graph, signature, and the bytes
    of every parameter, buffer and constant."""
    digest = hashlib.sha256()
    digest.update(str(program.graph_module.code).encode())
    digest.update(str(program.graph_signature).encode())
    tensors = dict(program.state_dict)
    tensors.update(getattr(program, "constants", {}) or {})
    for name in sorted(tensors):
        value = tensors[name]
        if isinstance(value, torch.Tensor):
            value = value.detach().contiguous().cpu()
            digest.update(f"{name}{tuple(value.shape)}{value.dtype}".encode())
            digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where compiled libraries and probe verdicts are kept: ``cache_dir``, else
    ``$SURGERY_CACHE``, else ``~/.cache/surgery``."""
    return Path(cache_dir or os.environ.get("SURGERY_CACHE", Path.home() / ".cache" / "surgery"))


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_threads(threads: int | None = None) -> int:
    """Give TVM's CPU thread pool one thread per core; returns the count it runs with.

    Left alone, TVM's runtime uses ``std::thread::hardware_concurrency() / 2`` threads on x86
    (``threading_backend.cc`` assumes every core is two hyper-threads), so on a 2-core machine
    without hyper-threading every parallel kernel ran on one core: half the machine idle. A
    ``TVM_NUM_THREADS`` (or ``OMP_NUM_THREADS``) the user set wins over ours. TVM reads the
    variable at each parallel launch until its pool starts, so this must run before the first
    multi-threaded call; ``TvmFunction`` calls it."""
    tvm, _, _ = _tvm()
    if threads is not None:
        os.environ["TVM_NUM_THREADS"] = str(int(threads))
    elif not (os.environ.get("TVM_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")):
        os.environ["TVM_NUM_THREADS"] = str(cpu_cores())
    return int(tvm.get_global_func("runtime.NumThreads")())


def _to_tvm(value, device):
    """torch tensor -> TVM tensor; zero-copy through DLPack where this TVM has it (a contiguous
    CPU tensor is shared, not copied), else through numpy."""
    tvm, _, _ = _tvm()
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if hasattr(tvm.runtime, "from_dlpack") and value.device.type == "cpu":
            try:
                return tvm.runtime.from_dlpack(value.contiguous())
            except Exception:  # noqa: BLE001 - e.g. an alignment TVM refuses: copy instead
                pass
        value = np.ascontiguousarray(value.cpu().numpy())
    elif not isinstance(value, np.ndarray):
        return value  # already a TVM tensor (a stage's output handed to the next stage)
    if hasattr(tvm.runtime, "tensor"):
        return tvm.runtime.tensor(value, device=device)
    return tvm.nd.array(value, device=device)


def _to_torch(value) -> list[torch.Tensor]:
    if hasattr(value, "numpy"):
        try:
            return [torch.from_dlpack(value)]  # zero-copy view of TVM's output
        except Exception:  # noqa: BLE001 - older TVMs: copy through numpy
            return [torch.from_numpy(value.numpy())]
    out = []
    for item in value:  # tuples (Array of tensors) come back nested
        out.extend(_to_torch(item))
    return out


class TvmFunction:
    """A compiled program called like the original: torch tensors in, tuple of tensors out."""

    def __init__(self, executable, device=None):
        tvm, relax, _ = _tvm()
        configure_threads()
        self.device = device or tvm.cpu()
        self.executable = executable
        self.vm = relax.VirtualMachine(executable, self.device)

    # The shared library holding this function, if any (loaded from it, or exported to the
    # cache): exporting it again copies that file instead of compiling the code once more.
    path: Path | None = None

    @classmethod
    def load(cls, path: str | Path) -> TvmFunction:
        tvm, _, _ = _tvm()
        fn = cls(tvm.runtime.load_module(str(path)))
        fn.path = Path(path)
        return fn

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = [_to_tvm(a, self.device) for a in args]
        return tuple(_to_torch(self.vm["main"](*inputs)))

    def export_library(self, path: str | Path) -> None:
        if self.path is not None:  # a loaded library can't be re-exported: copy its file
            shutil.copyfile(self.path, path)
            return
        self.executable.export_library(str(path))


def compile_program(
    program: torch.export.ExportedProgram,
    target=None,
    schedules: str = "default",
    cache_dir: str | Path | None = None,
    log: list | None = None,
) -> tuple[TvmFunction, dict]:
    """Import, build and wrap a program; also returns timings and whether a cached library was
    reused. With ``cache_dir`` (or ``$SURGERY_CACHE``) given, the library is stored under a key
    of the program's fingerprint, the TVM version, the target and the schedules, and a second
    call with the same program loads it instead of compiling."""
    start = time.perf_counter()
    library = None
    if cache_dir is not None:
        versions = tvm_versions()
        key = hashlib.sha256(
            "|".join(
                [
                    program_fingerprint(program),
                    versions["apache-tvm"],
                    versions["apache-tvm-ffi"],
                    str(host_target(schedules) if target is None else target),
                    schedules,
                    builder_digest(),
                    torch.__version__,
                ]
            ).encode()
        ).hexdigest()[:32]
        library = cache_root(cache_dir) / "tvm-lib" / f"{key}.so"
        if library.is_file():
            try:
                with native_log(log if log is not None else []):  # TVM logs a line per loaded scope
                    fn = TvmFunction.load(library)
                info = {
                    "import_s": 0.0,
                    "build_s": 0.0,
                    "cached": True,
                    "library": display_path(library),
                    "load_s": time.perf_counter() - start,
                }
                with contextlib.suppress(OSError, ValueError):  # when it was built, how long it took
                    info["built"] = json.loads(library.with_suffix(".json").read_text())
                return fn, info
            except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt below
                pass
    sink = log if log is not None else []
    with native_log(sink):
        mod = import_program(program)
    imported = time.perf_counter()
    with native_log(sink):
        executable = build(mod, target, schedules)
    built = time.perf_counter()
    fn = TvmFunction(executable)
    info = {"import_s": imported - start, "build_s": built - imported, "cached": False}
    if library is not None:
        try:
            with atomic_path(library, suffix=".so") as tmp, native_log(sink):
                fn.export_library(tmp)
            fn.path = library
            info["library"] = display_path(library)
            write_text(
                library.with_suffix(".json"),
                json.dumps(
                    {
                        "import_s": info["import_s"],
                        "build_s": info["build_s"],
                        "schedules": schedules,
                        "target": str(host_target(schedules) if target is None else target),
                        "tvm": versions,
                    },
                    indent=2,
                ),
            )
        except OSError:
            pass  # an unwritable cache only costs the next run a rebuild
    return fn, info


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
    ops = [str(op).split(".", 1)[1] for op in rewrite.decompositions()]  # "scatter.src"
    missing = [op for op in ops if op not in converters]
    case = rewrite.probe_case()
    program = torch.export.export(case.module(), case.args()).run_decompositions()
    present = [
        op for op in ops if any(str(n.target).endswith(op) for n in program.graph.nodes if n.op == "call_function")
    ]
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
    stats = (
        compare(actual[0].to(expected.dtype), expected, scale=case.scale) if actual[0].shape == expected.shape else None
    )
    if stats is None or not stats.within_bounds():
        got = f"shape {tuple(actual[0].shape)} vs {tuple(expected.shape)}" if stats is None else str(stats)
        return Finding(name, True, f"converter gives wrong numbers on {rewrite.probe_note}: {got}")
    return Finding(name, False, f"converter correct on {rewrite.probe_note}")


def program_problem(program: torch.export.ExportedProgram, inputs) -> str | None:
    """What stock TVM gets wrong on ``program`` fed ``inputs``: its failure, or outputs the float64
    judge (``surgery.equivalence.judge``) finds wrong; None when it gets it right."""
    try:
        with native_log([]):
            fn, _ = compile_program(program)
        outputs = fn(*inputs)
    except Exception as exc:  # noqa: BLE001 - the failure the case was filed for
        return f"TVM fails: {error_line(exc, 200)}"
    wrong = [j for j in judge_outputs(program.module(), inputs, outputs) if not j.ok]
    return f"wrong numbers: {wrong[0]}" if wrong else None


def _user_case_problem(case) -> str | None:
    """What TVM gets wrong on a user probe case (``surgery.probes``), or None."""
    return program_problem(torch.export.load(case.program), tuple(torch.load(case.inputs)))


def probe(
    cache_dir: str | Path | None = None,
    progress: Callable[[str], None] = lambda m: None,
    probes_root: str | Path | None = None,
) -> TvmProbe:
    """Which rewrites the installed TVM needs, and why: the rewrites' own cases, then the user's
    probe cases in ``probes_root`` (default ``surgery.probes.probes_dir()``), each marking its
    rewrite needed when TVM still fails it. Cached per TVM version and user cases on disk."""
    versions = tvm_versions()
    cases = [c for c in user_cases(probes_root) if c.rewrite in REGISTRY]
    key = (
        f"tvm-probe-v{PROBE_FORMAT}-{versions['apache-tvm']}-{versions['apache-tvm-ffi']}-torch{torch.__version__}"
        + (f"-cases{digest(probes_root)[:16]}" if cases else "")
        + ".json"
    )
    cached = cache_root(cache_dir) / key
    if cached.is_file():
        try:
            data = json.loads(cached.read_text())
            if set(data["findings"]) != set(REGISTRY):
                raise KeyError("cached verdicts are for another set of rewrites")
            return TvmProbe(
                data["versions"], {k: Finding(**v) for k, v in data["findings"].items()}, data["seconds"], cached=True
            )
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is recomputed
    start = time.perf_counter()
    converters = converter_table()
    findings = {}
    for name, cls in REGISTRY.items():
        progress(f"probing TVM's converter for {name}")
        findings[name] = _probe_one(name, cls(), converters)
    for case in cases:
        progress(f"probing TVM on user probe case {case.name} (fixed by {case.rewrite})")
        problem = _user_case_problem(case)
        if problem is not None:
            earlier = findings[case.rewrite]
            reason = f"user probe case {case.name!r} ({case.directory}): {problem}"
            findings[case.rewrite] = Finding(
                case.rewrite, True, f"{earlier.reason}; {reason}" if earlier.needed else reason
            )
    result = TvmProbe(versions, findings, time.perf_counter() - start)
    try:
        write_text(
            cached,
            json.dumps(
                {
                    "versions": versions,
                    "seconds": result.seconds,
                    "findings": {k: dataclasses.asdict(v) for k, v in findings.items()},
                },
                indent=2,
            ),
        )
    except OSError:
        pass  # a read-only home is no reason to fail; we just probe again next time
    return result
