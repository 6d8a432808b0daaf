"""`pymoe generate` driven as a subprocess: streaming and JSON output, the
draft, stop strings, bad input (one line, exit 2) and Ctrl-C (exit 130)."""
import json
import re
import signal
import subprocess
import sys
import time

import pytest

import tiny_models
from conftest import stderr_lines


def generate(*args, timeout=120):
    return subprocess.run([sys.executable, "-P", "-m", "pymoe", "generate", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def error_lines(r):
    return stderr_lines(r.stderr)


GREEDY = ["--temp", "0", "--ctx", "256", "--threads", "2"]


def test_json_reports_what_was_generated(dense_path):
    r = generate("-m", dense_path, "-p", "Once upon a time", "-n", 12, "--json", *GREEDY)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("text", "tokens", "n_prompt", "n_generated", "n_drafted", "n_accepted", "acceptance",
                "decode_tokens_per_s", "prefill_tokens_per_s", "load_seconds", "locked_bytes", "draft_max",
                "stop_reason"):
        assert key in out
    assert out["n_generated"] == len(out["tokens"]) <= 12 and out["n_prompt"] > 0
    assert out["stop_reason"] in ("max_tokens", "eog") and out["draft_max"] == 0 and out["n_drafted"] == 0


def test_streams_text_then_stats(dense_path):
    r = generate("-m", dense_path, "-p", "Once upon a time", "-n", 12, *GREEDY)
    assert r.returncode == 0, r.stderr
    j = json.loads(generate("-m", dense_path, "-p", "Once upon a time", "-n", 12, "--json", *GREEDY).stdout)
    assert r.stdout == j["text"] + "\n"
    assert "decode 12 tokens" in r.stderr or "stop: eog" in r.stderr


def test_with_a_draft_greedy_text_is_plain_greedy_text(llama_moe_path, dense_path):
    """F32 models: speculative greedy decoding emits exactly the plain greedy tokens."""
    plain = json.loads(generate("-m", llama_moe_path, "-p", "The cat", "-n", 24, "--json", *GREEDY).stdout)
    spec = generate("-m", llama_moe_path, "-d", dense_path, "-p", "The cat", "-n", 24, "--json", "--draft-max", 3,
                    *GREEDY)
    assert spec.returncode == 0, spec.stderr
    spec = json.loads(spec.stdout)
    assert spec["tokens"] == plain["tokens"]
    assert spec["draft_max"] == 3 and spec["n_drafted"] > 0 and 0 <= spec["n_accepted"] <= spec["n_drafted"]
    off = json.loads(generate("-m", llama_moe_path, "-d", dense_path, "-p", "The cat", "-n", 24, "--json",
                              "--draft-max", 0, *GREEDY).stdout)
    assert off["tokens"] == plain["tokens"] and off["n_drafted"] == 0


def test_a_stop_string_ends_the_text_before_it(dense_path):
    full = json.loads(generate("-m", dense_path, "-p", "Once upon a time", "-n", 40, "--json", *GREEDY).stdout)
    text = full["text"]
    assert len(text) > 12
    stop = text[8:11]
    r = generate("-m", dense_path, "-p", "Once upon a time", "-n", 40, "--stop", stop, *GREEDY)
    assert r.returncode == 0, r.stderr
    assert r.stdout == text[:text.find(stop)] + "\n"
    assert "stop: stop" in r.stderr


@pytest.fixture(scope="module")
def other_vocab_path(model_dir, monkeypatch_module):
    monkeypatch_module.setattr(tiny_models, "VOCAB_GGUF", tiny_models.REPO / "vendor" / "llama.cpp" / "models" /
                               "ggml-vocab-gpt-2.gguf")
    return tiny_models.write_model(model_dir / "gen-other-vocab.gguf", tiny_models.DENSE)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.parametrize("args,message", [
    (["-m", "/nonexistent.gguf", "-p", "x"], "/nonexistent.gguf"),
    (["-p", "x", "-n", "-2"], "argument -n/--n-predict/--predict: -2 is outside [-1, inf]"),
    (["-p", "x", "--top-p", "0"], "argument --top-p: 0 is outside (0, 1]"),
    (["-p", "x", "--vram", "8X"], "cannot read '8X' as a size"),
    (["-p", "x", "--draft-max", "99"], "argument --draft-max: 99 is outside"),
    (["-p", "x", "--batch", "64", "--ubatch", "128"], "--ubatch (128) must not exceed --batch (64)"),
    (["-p", "x", "--load", "fast"], "argument --load: invalid choice: 'fast'"),
    (["-f", "/nonexistent-prompt.txt"], "cannot read the prompt file"),
    (["-p", "word " * 300, "--ctx", "64"], "the context only 64"),
])
def test_bad_input_is_one_line_and_exit_2(dense_path, args, message):
    if args[0] != "-m":
        args = ["-m", dense_path, *args]
    r = generate(*args)
    assert r.returncode == 2, r.stderr
    lines = error_lines(r)
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr


def test_not_a_gguf_and_a_draft_of_another_vocabulary(dense_path, other_vocab_path, tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"hello, not a model")
    for args, message in ((["-m", bogus], "bogus.gguf"), (["-m", dense_path, "-d", other_vocab_path], "vocabular")):
        r = generate(*args, "-p", "x", "--ctx", "256")
        assert r.returncode == 2, r.stderr
        lines = error_lines(r)
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr


def test_ctrl_c_stops_with_partial_stats_and_130(dense_path):
    proc = subprocess.Popen([sys.executable, "-P", "-m", "pymoe", "generate", "-m", str(dense_path), "-p", "Once",
                             "-n", "60000", "--ctx", "65536", "--temp", "1", "--threads", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a runner started in the background ignores SIGINT, and so would its children
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = proc.stdout.read(1)  # generation has begun
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert first and proc.returncode == 130, err
    assert "stop: interrupted" in err and "Traceback" not in err


@pytest.mark.slow
def test_demo_runs_the_scenario(smollm2_path):
    r = subprocess.run([sys.executable, "-P", "-m", "pymoe", "demo", "--tokens", "8", "--threads", "2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "> Name three important inventions" in r.stdout and "> Correct the spelling" in r.stdout
    assert re.search(r"speculative, SmolLM2 drafts \(draft_max=auto\): \d+ tokens, median [\d.]+ tokens/s, acceptance",
                     r.stderr)
    assert re.search(r"speculative, drafts copied from the context \(lookup, draft_max=auto\): \d+ tokens, median "
                     r"[\d.]+ tokens/s", r.stderr)
    assert len(re.findall(r"plain decoding: \d+ tokens, median [\d.]+ tokens/s", r.stderr)) == 2
    # each ratio comes from three interleaved pairs, with their range, and a line says what it means
    assert len(re.findall(r"-> [\d.]+x plain \(median of 3 interleaved pairs, [\d.]+-[\d.]+\)", r.stderr)) == 2
    assert re.search(r"^the draft model: [\d.]+x", r.stderr, re.M)
    assert re.search(r"^lookup on the editing task: [\d.]+x", r.stderr, re.M)
    # stderr is a pipe: no progress bars, and at the end where the models are and what to run next
    assert "loading smollm2-moe" not in r.stderr and "\r" not in r.stderr
    assert "the demo's models: ~/" in r.stderr or "the demo's models: /" in r.stderr
    assert re.search(r"pymoe chat -m \S+smollm2-moe-E4-K2-q8_0-noise0.1.gguf -d \S+SmolLM2-135M-Instruct.Q4_1.gguf",
                     r.stderr), r.stderr
