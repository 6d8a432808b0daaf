"""Build a test's own C program (tests/c/) against pure parts of csrc/."""
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def build(tmp_path_factory, name: str, *sources: str) -> Path:
    """tests/c/<name>.c with the given csrc/ files, warnings as errors; the executable."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("no C compiler (cc) on PATH")
    exe = tmp_path_factory.mktemp(name) / name
    subprocess.run([cc, "-std=c11", "-O2", "-Wall", "-Werror", "-I", str(REPO / "csrc"),
                    str(REPO / "tests" / "c" / f"{name}.c"), *(str(REPO / "csrc" / s) for s in sources),
                    "-o", str(exe), "-lm"], check=True)
    return exe
