"""The rewrites are plain PyTorch: importing surgery and its rewrites, or sizing matmul panels
to our kernel's tiles, loads no TVM (only ``surgery.tvm_backend`` and ``surgery.schedules`` do)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_TVM = "assert not any(m == 'tvm' or m.startswith('tvm.') for m in sys.modules), 'tvm imported'"


def _run(code: str) -> None:
    """``code`` in a fresh interpreter (this one has TVM loaded already), from the repository root."""
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_importing_surgery_and_its_rewrites_loads_no_tvm():
    _run(f"import surgery, surgery.rewrites, sys; {NO_TVM}")


def test_sizing_matmul_panels_loads_no_tvm():
    _run(
        f"import sys; from surgery.rewrites.matmul_packing import panel_width; "
        f"assert panel_width(13, 2048, 256) == 32; {NO_TVM}"
    )
