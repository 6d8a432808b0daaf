"""The library is silent by default; its log reaches Python on request."""
import logging
import subprocess
import sys
import textwrap

import pytest

import pymoe
from conftest import SANITIZED, stderr_lines


def test_nothing_reaches_stderr_by_default(dense_path, tmp_path):
    # under make sanitize, auto's mlock falls back with a warning (ASan makes mlock a no-op): expected there
    quiet = 'warnings.filterwarnings("ignore", "mlock: llama.cpp could not lock")' if SANITIZED else ""
    script = textwrap.dedent(f"""
        import warnings
        import pymoe
        {quiet}
        with pymoe.Model({str(dense_path)!r}) as m, m.session(n_ctx=64) as s:
            s.feed(m.tokenize("hello"))
            print("ok")
    """)
    result = subprocess.run([sys.executable, "-P", "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    # a GPU build without a usable GPU says so once (tests/test_build_info.py); nothing else
    assert stderr_lines(result.stderr) == []


def test_llama_log_goes_to_the_pymoe_llama_logger(dense_path, caplog):
    with caplog.at_level(logging.DEBUG, logger="pymoe.llama"):
        with pymoe.Model(dense_path):
            pass
    lines = [r.getMessage() for r in caplog.records if r.name == "pymoe.llama"]
    assert any("llama_model_loader" in line for line in lines)
    assert all("\n" not in line for line in lines)  # whole lines, one record each


def test_own_warnings_become_python_warnings(dense_model):
    with pytest.warns(pymoe.PymoeWarning, match="longer than the 2048"):
        dense_model.session(n_ctx=4096).close()
