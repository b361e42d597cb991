"""Regenerate every generated part of the docs: the text between
``<!-- begin generated: python -m surgery ... -->`` and ``<!-- end generated -->`` in README.md and
docs/*.md is replaced by that command's output (tests/test_docs.py checks they agree).

    python scripts/regenerate_docs.py
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = re.compile(
    r"(<!-- begin generated: (python -m surgery [^>]*?) -->\n)(.*?)(<!-- end generated -->)", re.DOTALL
)


def output_of(command: str) -> str:
    args = shlex.split(command)
    run = subprocess.run([sys.executable, *args[1:]], capture_output=True, text=True, cwd=ROOT, check=True)
    return run.stdout if run.stdout.endswith("\n") else run.stdout + "\n"


def main() -> int:
    outputs: dict[str, str] = {}

    def regenerated(match: re.Match) -> str:
        command = match[2]
        if command not in outputs:
            outputs[command] = output_of(command)
        return match[1] + outputs[command] + match[4]

    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        new = GENERATED.sub(regenerated, text)
        if new != text:
            doc.write_text(new)
            print(f"regenerated {doc.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
