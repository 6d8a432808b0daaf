"""The C library from C: build examples/generate.c against the installed
package and check it generates what the Python loop generates."""
import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pymoe
from conftest import needs_real_mlock

REPO = Path(__file__).resolve().parent.parent


def build_example(tmp_path_factory, name):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("no C compiler (cc) on PATH")
    flags = subprocess.run([sys.executable, "-P", "-m", "pymoe", "--cflags", "--libs"], check=True,
                           capture_output=True, text=True).stdout.split()
    exe = tmp_path_factory.mktemp("c") / name
    subprocess.run([cc, "-std=c11", "-Wall", "-Wextra", "-Werror", str(REPO / "examples" / f"{name}.c"),
                    "-o", str(exe), *flags], check=True)
    return exe


@pytest.fixture(scope="module")
def generate_exe(tmp_path_factory):
    return build_example(tmp_path_factory, "generate")


@pytest.fixture(scope="module")
def speculative_exe(tmp_path_factory):
    return build_example(tmp_path_factory, "speculative")


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
    flags = subprocess.run([sys.executable, "-P", "-m", "pymoe", "--cflags", "--libs"], check=True,
                           capture_output=True, text=True).stdout.split()
    assert f"-I{paths.INCLUDE_DIR}" in flags and f"-L{paths.LIB_DIR}" in flags and "-lpymoe" in flags
    # the installed header is this checkout's, and the library exports every function it declares
    header = (REPO / "csrc" / "pymoe.h").read_text()
    assert (paths.INCLUDE_DIR / "pymoe.h").read_text() == header
    declared = set(re.findall(r"^PYMOE_API\b[^;(]*?\b(pymoe_\w+)\s*\(", header, re.M))
    assert len(declared) > 60
    lib = ctypes.CDLL(str(paths.LIB_DIR / "libpymoe.so"))
    assert [name for name in sorted(declared) if not hasattr(lib, name)] == []
    lib.pymoe_version.restype = ctypes.c_char_p
    assert lib.pymoe_version().decode() == pymoe.__version__
    assert paths.RPC_SERVER.is_file() and os.access(paths.RPC_SERVER, os.X_OK)


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


@pytest.mark.parametrize("source, k", [("model", "3"), ("model", "auto"), ("ngram", "3"), ("ngram", "auto")])
def test_c_speculative_loop_streams_what_python_generates(speculative_exe, dense_path, model_dir, source, k):
    from pymoe.upcycle import upcycle
    target_path = model_dir / "c-target.gguf"
    if not target_path.exists():
        upcycle(dense_path, target_path, n_experts=4, n_experts_used=2, noise=1.0, expert_type="f32", seed=3)
    prompt = "The quick brown fox" if source == "model" else "1 2 3 4 1 2 3 4 1 2 3 4"
    draft_arg = str(dense_path) if source == "model" else "ngram"
    result = subprocess.run([str(speculative_exe), str(target_path), draft_arg, prompt, "40", k],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    ids_line = next(line for line in result.stderr.splitlines() if line.startswith("ids:"))
    c_ids = [int(x) for x in ids_line.split()[1:]]
    with pymoe.Model(target_path) as target, pymoe.Model(dense_path) as draft:
        k_max = 8 if source == "model" else 16
        with pymoe.Speculative(target, draft if source == "model" else "ngram",
                               draft_max="auto" if k == "auto" else int(k), k_max=k_max, temperature=0,
                               n_ctx=2048) as spec:
            py_ids = list(spec.generate_tokens(prompt, max_tokens=40))
    assert c_ids == py_ids and len(c_ids) == 40
    assert "of" in result.stderr and "drafts accepted" in result.stderr


def test_c_speculative_loop_under_a_json_schema_is_what_python_generates(speculative_exe, dense_path, model_dir):
    import json
    from pymoe.upcycle import upcycle
    target_path = model_dir / "c-target.gguf"
    if not target_path.exists():
        upcycle(dense_path, target_path, n_experts=4, n_experts_used=2, noise=1.0, expert_type="f32", seed=3)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string", "maxLength": 8}},
              "required": ["n", "s"]}
    result = subprocess.run([str(speculative_exe), str(target_path), str(dense_path), "JSON:", "80", "3",
                             json.dumps({"json_schema": schema})], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    c_ids = [int(x) for x in next(line for line in result.stderr.splitlines() if line.startswith("ids:")).split()[1:]]
    with pymoe.Model(target_path) as target, target.session(n_ctx=2048, sampling=pymoe.SamplingParams(
            temperature=0, json_schema=schema)) as s:
        py_ids = list(s.generate_tokens("JSON:", max_tokens=80))
        assert s.stop_reason == "eog"
        assert set(json.loads(target.detokenize(py_ids))) >= {"n", "s"}
    assert c_ids == py_ids
    bad = subprocess.run([str(speculative_exe), str(target_path), "ngram", "x", "8", "3", '{"grammar": "root ::= ("}'],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "does not parse" in bad.stderr


@pytest.mark.parametrize("k", ["3", "auto"])
def test_c_speculative_loop_with_the_mtp_head_streams_what_python_generates(speculative_exe, model_dir, k):
    import tiny_models
    target_path = model_dir / "c-mtp-qwen35moe.gguf"
    if not target_path.exists():
        tiny_models.write_model(target_path, tiny_models.QWEN35MOE_MTP)
    result = subprocess.run([str(speculative_exe), str(target_path), "mtp", "The quick brown fox", "40", k],
                            capture_output=True, text=True, errors="replace", timeout=300)  # pieces of characters
    assert result.returncode == 0, result.stderr
    ids_line = next(line for line in result.stderr.splitlines() if line.startswith("ids:"))
    with pymoe.Model(target_path, mtp=True) as target:
        with pymoe.Speculative(target, "mtp", draft_max="auto" if k == "auto" else int(k), k_max=8, temperature=0,
                               n_ctx=2048) as spec:
            py_ids = list(spec.generate_tokens("The quick brown fox", max_tokens=40))
            drafted = spec.stats.drafted
    assert [int(x) for x in ids_line.split()[1:]] == py_ids and len(py_ids) == 40
    assert k == "auto" or drafted > 0


def test_c_speculative_reports_a_vocabulary_mismatch(speculative_exe, dense_path, model_dir, monkeypatch):
    import tiny_models
    monkeypatch.setattr(tiny_models, "VOCAB_GGUF", REPO / "vendor" / "llama.cpp" / "models" / "ggml-vocab-gpt-2.gguf")
    other = tiny_models.write_model(model_dir / "c-other-vocab.gguf", tiny_models.DENSE)
    result = subprocess.run([str(speculative_exe), str(dense_path), str(other)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "vocabulary" in result.stderr and "tokens" in result.stderr


@needs_real_mlock  # the example loads with auto, which locks
def test_the_memory_pre_check_from_c(tmp_path_factory, model_dir):
    import tiny_models
    exe = build_example(tmp_path_factory, "memory_plan")
    path = tiny_models.write_model(model_dir / "c-placement.gguf", tiny_models.PLACEMENT_MOE)
    import pymoe.rpc
    with pymoe.rpc.LocalRpcServer() as server:
        out = subprocess.run([str(exe), str(path), "2", server.endpoint, "--load"], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        plan = pymoe.memory_plan(path, n_cpu_moe=2, rpc_servers=[server.endpoint])
    # device names of RPC servers count up per process ("RPC0" there, maybe "RPC3" here): compare in order
    planned = [int(line.split()[2]) for line in out.stdout.splitlines() if line.startswith("device ")]
    allocated = [int(line.split()[3]) for line in out.stdout.splitlines() if line.startswith("allocated on ")]
    assert planned == list(plan.placement.bytes) and len(allocated) == len(planned) == 2
    for p, a in zip(planned, allocated):
        assert abs(p - a) <= 0.01 * p
    assert "load mode: mlock" in out.stdout and "loaded with mlock" in out.stdout
