"""The C library from C: build examples/generate.c against the installed
package and check it generates what the Python loop generates."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pymoe

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def generate_exe(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("no C compiler (cc) on PATH")
    flags = subprocess.run([sys.executable, "-P", "-m", "pymoe", "--cflags", "--libs"], check=True,
                           capture_output=True, text=True).stdout.split()
    exe = tmp_path_factory.mktemp("c") / "generate"
    subprocess.run([cc, "-std=c11", "-Wall", "-Wextra", "-Werror", str(REPO / "examples" / "generate.c"),
                    "-o", str(exe), *flags], check=True)
    return exe


def c_greedy(exe, model_path, prompt, n):
    result = subprocess.run([str(exe), str(model_path), prompt, str(n)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    ids_line = next(line for line in result.stderr.splitlines() if line.startswith("ids:"))
    return [int(x) for x in ids_line.split()[1:]], result.stdout


def python_greedy(model_path, prompt, n):
    with pymoe.Model(model_path) as model, model.session(n_ctx=2048, sampling=pymoe.SamplingParams.greedy()) as s:
        out = list(s.generate(prompt, max_tokens=n))
        return [t.id for t in out], "".join(t.text for t in out)


def test_flags_point_at_the_installed_header_and_library():
    from pymoe import paths
    assert (paths.INCLUDE_DIR / "pymoe.h").is_file()
    assert (paths.LIB_DIR / "libpymoe.so").is_file()
    assert paths.RPC_SERVER.is_file()


def test_c_and_python_generate_the_same_tokens_tiny(generate_exe, dense_path):
    c_ids, _ = c_greedy(generate_exe, dense_path, "Once upon a time", 16)
    py_ids, _ = python_greedy(dense_path, "Once upon a time", 16)
    assert c_ids == py_ids and len(c_ids) == 16


@pytest.mark.slow
def test_c_and_python_generate_the_same_tokens_smollm2(generate_exe, smollm2_path):
    c_ids, c_text = c_greedy(generate_exe, smollm2_path, "The capital of France is", 32)
    py_ids, py_text = python_greedy(smollm2_path, "The capital of France is", 32)
    assert c_ids == py_ids and len(c_ids) > 0
    assert c_text.rstrip("\n") == py_text


def test_c_program_reports_errors(generate_exe, tmp_path):
    result = subprocess.run([str(generate_exe), str(tmp_path / "missing.gguf")], capture_output=True, text=True)
    assert result.returncode == 1
    assert "missing.gguf" in result.stderr and "file not found" in result.stderr
